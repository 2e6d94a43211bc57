"""CLI commands for steering vectors: ``compute``, ``analyze`` and ``scan``.

Thin shells over :func:`steerlab.compute_vector`, :mod:`steerlab.analysis` and the vector file
format. Data comes from a built-in set or a file (``--data``) or from two text files
(``--positive``/``--negative``); the model from ``--model`` (default: the embedded default).

>>> import typer
>>> from typer.testing import CliRunner
>>> app = typer.Typer()
>>> register(app)
>>> "--method" in CliRunner().invoke(app, ["compute", "--help"]).output
True
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from steerlab import grammar
from steerlab.cli._common import check_output_file, check_output_folder

__all__ = ["parse_layers", "parse_positions", "register"]


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="Model folder, .gguf file or hub id (default: the embedded model)."
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        help="Built-in set name (sentiment, formality) or a .jsonl/.csv/.tsv/.json data file.",
    ),
]
PositiveOpt = Annotated[
    Path | None,
    typer.Option("--positive", help="Text file of positive prompts, one a line (with --negative)."),
]
NegativeOpt = Annotated[
    Path | None,
    typer.Option("--negative", help="Text file of negative prompts, one a line (with --positive)."),
]
PairedOpt = Annotated[
    bool,
    typer.Option(
        "--paired/--unpaired",
        help="With --positive/--negative: line i of both files belong together.",
    ),
]
MethodOpt = Annotated[
    str,
    typer.Option("--method", "-m", help="Direction method: mean_diff, pca, pca_center or probe."),
]
LayersOpt = Annotated[
    str,
    typer.Option(
        "--layers",
        "-l",
        help="Layers: 'all', an index, a list '8,10,-1', an inclusive range '6-12' or a step "
        "'0:30:3'.",
    ),
]
PositionsOpt = Annotated[
    str,
    typer.Option(
        "--positions",
        "-p",
        help="Token read per prompt: 'last', 'mean', or an index (-2: CAA answer letter).",
    ),
]
ChatOpt = Annotated[
    bool, typer.Option("--chat", help="Wrap each prompt in the model's chat template.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the train/held-out split.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Prompts per forward pass.")]


def parse_layers(text: str) -> list[int] | None:
    """``--layers`` of the vector commands (:func:`steerlab.grammar.parse_layers`): ``"all"``
    (and ``"auto"``) → ``None``, every layer.

    >>> parse_layers("all"), parse_layers("2-4,-1")
    (None, [2, 3, 4, -1])
    """
    layers = grammar.parse_layers(text, what="--layers", text=True)
    return None if layers == grammar.ALL else layers


def parse_positions(text: str) -> str | int:
    """``"last"``/``"mean"`` stay strings; an integer string becomes an int.

    >>> parse_positions("-2"), parse_positions("last")
    (-2, 'last')
    """
    if text in ("last", "mean"):
        return text
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(
            f"positions must be 'last', 'mean' or an integer index, not {text!r}"
        ) from None


def _load_model(name: str | None) -> Any:
    import steerlab

    # looked up on the package at call time, so tests (and users) can swap the loader
    return steerlab.load_model(name)


def _load_data(data: str | None, positive: Path | None, negative: Path | None, paired: bool) -> Any:
    from steerlab import data as datamod

    if data is not None and (positive is not None or negative is not None):
        raise typer.BadParameter("give either --data or --positive/--negative, not both")
    if data is not None:
        return datamod.load_dataset(data)
    if positive is None or negative is None:
        raise typer.BadParameter("give --data NAME_OR_FILE, or both --positive and --negative")
    return datamod.load_text_pair(positive, negative, paired=paired)


def compute(
    out: Annotated[Path, typer.Option("--out", "-o", help="Vector file to write (.safetensors).")],
    data: DataOpt = None,
    positive: PositiveOpt = None,
    negative: NegativeOpt = None,
    paired: PairedOpt = False,
    method: MethodOpt = "mean_diff",
    layers: LayersOpt = "all",
    positions: PositionsOpt = "last",
    model: ModelOpt = None,
    chat: ChatOpt = False,
    normalize: Annotated[
        bool, typer.Option("--normalize", help="Save unit-norm directions.")
    ] = False,
    strength: Annotated[
        float | None,
        typer.Option("--strength", help="Recommended strength to record in the metadata."),
    ] = None,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 16,
    plane: Annotated[
        bool | None,
        typer.Option(
            "--plane/--no-plane",
            help="mean_diff: store the rotation plane of --op rotate (reads every layer). "
            "Default: only when --layers includes the last layer.",
            show_default=False,
        ),
    ] = None,
    site: Annotated[
        str,
        typer.Option(
            "--site",
            help="Where to read the activations: resid, attn_out, mlp_out, head (per-head "
            "outputs) or router (mixture of experts); the file records it.",
        ),
    ] = "resid",
) -> None:
    """Compute a steering vector from contrastive data and save it."""
    from steerlab.methods import METHODS, compute_vector
    from steerlab.sites import check_site

    if method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    site = check_site(site, "--site")
    layer_list = parse_layers(layers)
    where = parse_positions(positions)
    check_output_file(out)  # before minutes of computing, not after
    dataset = _load_data(data, positive, negative, paired)
    lm = _load_model(model)
    vec = compute_vector(
        lm,
        dataset,
        layers=layer_list,
        method=method,
        read_at=where,
        seed=seed,
        batch_size=batch_size,
        chat=chat,
        plane=plane,
        site=site,
    )
    if normalize:
        vec = vec.normalized()
    if strength is not None:
        vec = vec.with_metadata(recommended_strength=float(strength))
    path = vec.save(out)
    summary = vec.metadata["dataset"]
    typer.echo(
        f"wrote {path}: {method} on {summary['name']!r} ({summary['n_positive']} positive, "
        f"{summary['n_negative']} negative, {'paired' if summary['paired'] else 'unpaired'}), "
        f"model {vec.metadata['model_name']!r}" + ("" if site == "resid" else f", site {site!r}")
    )
    info = vec.metadata.get("layer_info", {})
    typer.echo("  layer      norm  held-out acc")
    for layer, norm in vec.norms().items():
        acc = info.get(str(layer), {}).get("heldout_accuracy")
        typer.echo(f"  {layer:>5}  {norm:>8.4f}  {'-' if acc is None else f'{acc:.3f}':>12}")


def analyze(
    vector: Annotated[Path, typer.Argument(help="Vector file written by compute or save().")],
    model: ModelOpt = None,
    layers: LayersOpt = "all",
    k: Annotated[int, typer.Option("-k", help="Tokens listed per direction and sign.")] = 10,
    through_norm: Annotated[
        bool,
        typer.Option(
            "--through-norm/--raw",
            help="Logit lens through the final norm, or raw lm_head.weight @ v (default).",
        ),
    ] = False,
    lens: Annotated[
        bool,
        typer.Option("--lens/--no-lens", help="Load the model and show the logit lens."),
    ] = True,
    plots: Annotated[
        Path | None,
        typer.Option("--plots", help="Folder to write PNGs to (norms, cosine, logit lens)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Analyse even if the vector is for another model.")
    ] = False,
) -> None:
    """Show what a vector file holds: metadata, norms, cosines across layers, logit lens."""
    from steerlab.analysis import cosine_matrix, logit_lens, plot_norms
    from steerlab.vectors import SteeringVector

    if plots is not None:
        check_output_folder(plots)
    vec = SteeringVector.load(vector)
    chosen = parse_layers(layers)
    if chosen is not None:
        vec = vec.select([layer for layer in chosen])
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
    meta = vec.metadata
    dataset = meta.get("dataset") or {}
    typer.echo(f"{vector}: {len(vec)} layer(s) of size {vec.d_model}")
    for key in ("model_name", "method", "positions", "operation", "normalization"):
        if key in meta:
            typer.echo(f"  {key}: {meta[key]}")
    if dataset:
        typer.echo(f"  dataset: {dataset.get('name')} ({dataset.get('n_positive')} positive)")
    for key in ("recommended_strength", "library_version", "created"):
        if key in meta:
            typer.echo(f"  {key}: {meta[key]}")
    typer.echo("norms:")
    for layer, norm in vec.norms().items():
        typer.echo(f"  layer {layer:>3}: {norm:.4f}")
    if len(vec) > 1:
        matrix = cosine_matrix(vec)
        typer.echo("cosine similarity across layers:")
        typer.echo(matrix.table())
        if plots is not None:
            matrix.plot(plots / "cosine.png", title="Cosine similarity across layers")
    if plots is not None:
        plot_norms(vec, plots / "norms.png")
    if lens:
        lm = _load_model(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vec.check_compatible(lm, force=force)
        for warning in caught:
            typer.echo(f"warning: {warning.message}", err=True)
        for layer in vec.layers:
            result = logit_lens(lm, vec, layer, k, through_norm=through_norm)
            typer.echo(result.table())
            if plots is not None:
                result.plot(plots / f"logit_lens_layer{layer}.png")
    if plots is not None:
        typer.echo(f"plots written to {plots}")


def scan(
    data: DataOpt = None,
    positive: PositiveOpt = None,
    negative: NegativeOpt = None,
    paired: PairedOpt = False,
    method: MethodOpt = "mean_diff",
    layers: LayersOpt = "all",
    positions: PositionsOpt = "last",
    model: ModelOpt = None,
    chat: ChatOpt = False,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Share of examples held out for scoring.")
    ] = 0.25,
    seed: SeedOpt = 0,
    probe: Annotated[
        bool, typer.Option("--probe/--no-probe", help="Also score a logistic probe per layer.")
    ] = True,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write the separability curve to this PNG.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write every layer's scores to this JSON file.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Save the scanned vector (all layers, train split)."),
    ] = None,
    batch_size: BatchOpt = 16,
) -> None:
    """Scan layers: a method at every layer, scored on held-out examples; the best layer wins."""
    from steerlab.analysis import scan_layers
    from steerlab.methods import METHODS

    if method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    layer_list = parse_layers(layers)
    where = parse_positions(positions)
    for path in (plot, json_out, out):
        if path is not None:
            check_output_file(path)
    dataset = _load_data(data, positive, negative, paired)
    lm = _load_model(model)
    result = scan_layers(
        lm,
        dataset,
        layers=layer_list,
        method=method,
        read_at=where,
        test_fraction=test_fraction,
        seed=seed,
        probe=probe,
        batch_size=batch_size,
        chat=chat,
    )
    typer.echo(result.table())
    typer.echo(f"best layer (held-out Cohen's d): {result.best_layer()}")
    if plot is not None:
        typer.echo(f"plot written to {result.plot(plot)}")
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
        typer.echo(f"scores written to {json_out}")
    if out is not None:
        typer.echo(f"vector written to {result.vector.save(out)}")


def register(app: typer.Typer) -> None:
    """Add ``compute``, ``analyze`` and ``scan`` to ``app``."""
    app.command("compute")(compute)
    app.command("analyze")(analyze)
    app.command("scan")(scan)
