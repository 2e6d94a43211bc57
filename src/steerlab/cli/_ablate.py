"""CLI commands for ablation and persistent edits: ``ablate``, ``bake`` and ``export-gguf``.

Thin shells over :func:`steerlab.ablation.ablation_scan`, :func:`steerlab.editing.bake` and
:func:`steerlab.editing.export_gguf`.

>>> import typer
>>> from typer.testing import CliRunner
>>> app = typer.Typer()
>>> register(app)
>>> "--target" in CliRunner().invoke(app, ["ablate", "--help"]).output
True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from steerlab.cli._common import (
    HeadsOpt,
    SiteOpt,
    check_output_file,
    check_output_folder,
    site_options,
)
from steerlab.grammar import ALL, parse_layers

__all__ = ["register"]

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="Model folder, .gguf file or hub id (default: the embedded model)."
    ),
]


def _load_model(name: str | None) -> Any:
    import steerlab as sl

    return sl.load_model(name)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise typer.BadParameter(f"no such file: {path}")
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line.strip()]


def _parse_ints(text: str | None, what: str) -> list[int] | None:
    """``--layers``/``--heads`` (:func:`steerlab.grammar.parse_layers`); ``"all"`` → ``None``."""
    values = parse_layers(text, what=f"--{what}", text=True)
    return None if values == ALL else values


def ablate(
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Prompts to score (or use --prompts-file).")
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts-file", "-f", help="Text file, one prompt a line.")
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            "-t",
            help="Target token for metric logit_diff (once, or once per prompt), e.g. ' Paris'.",
        ),
    ] = None,
    foil: Annotated[
        list[str] | None,
        typer.Option("--foil", help="Token subtracted from the target (once, or once per prompt)."),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="logit_diff (target minus foil at the last token) or loss (on the prompts)."
        ),
    ] = "logit_diff",
    component: Annotated[
        str, typer.Option(help="What to ablate: head, attn, mlp or block (one per layer).")
    ] = "head",
    layers: Annotated[
        str, typer.Option(help="Layers to scan: all, '12', '8,10,-1' or '6-12'.")
    ] = "all",
    heads: Annotated[
        str | None, typer.Option(help="Heads to scan (component head): '0,3' or '0-4'.")
    ] = None,
    mean_prompts: Annotated[
        Path | None,
        typer.Option(
            "--mean-prompts",
            help="Calibration prompts (one a line): mean ablation instead of zero ablation.",
        ),
    ] = None,
    means_cache: Annotated[
        Path | None,
        typer.Option(help="File to cache the calibration means in (reused when it matches)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Rows per forward pass (ablations x prompts).")
    ] = 128,
    chat: Annotated[bool, typer.Option(help="Wrap prompts in the chat template.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Folder for scan.csv, scan.json and heatmap.png (created)."
        ),
    ] = None,
    top: Annotated[int, typer.Option(help="How many units to print, by |change|.")] = 20,
    model: ModelOpt = None,
) -> None:
    """Ablate every head (or component) of every layer and rank them by the metric change."""
    from steerlab.ablation import ablation_scan, compute_means

    items = list(prompts or [])
    if prompts_file is not None:
        items.extend(_read_lines(prompts_file))
    if not items:
        raise typer.BadParameter("give prompts as arguments or with --prompts-file")
    chosen_layers = _parse_ints(layers, "layers")
    chosen_heads = _parse_ints(heads, "heads")

    def one_or_many(values: list[str] | None) -> Any:
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    if out is not None:
        check_output_folder(out)
    steered = _load_model(model)
    means = None
    if mean_prompts is not None:
        means = compute_means(
            steered,
            _read_lines(mean_prompts),
            layers=chosen_layers,
            components=[component],
            chat=chat,
            cache=means_cache,
        )
    scan = ablation_scan(
        steered,
        items,
        metric=metric,
        target=one_or_many(target),
        foil=one_or_many(foil),
        component=component,
        layers=chosen_layers,
        heads=chosen_heads,
        means=means,
        batch_size=batch_size,
        chat=chat,
    )
    typer.echo(scan.format(top))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        scan.to_csv(out / "scan.csv")
        scan.heatmap(out / "heatmap.png")
        summary = {
            "model": scan.model_name,
            "metric": scan.metric,
            "component": scan.component,
            "ablation": scan.ablation,
            "layers": list(scan.layers),
            "units": list(scan.units),
            "baseline_mean": float(scan.baseline.mean()),
            "scores": scan.scores.tolist(),
            "prompts": items,
        }
        (out / "scan.json").write_text(json.dumps(summary, indent=2) + "\n")
        typer.echo(f"wrote {out / 'scan.csv'}, {out / 'scan.json'} and {out / 'heatmap.png'}")


def bake(
    vector_file: Annotated[Path, typer.Argument(help="Steering vector file (.safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the model into.")],
    strength: Annotated[float, typer.Option("--strength", "-s", help="Multiplier.")] = 1.0,
    layers: Annotated[
        str | None,
        typer.Option(help="Layers to apply it at, e.g. '12' or '6,8,10' (default: the file's)."),
    ] = None,
    ablate_direction: Annotated[
        bool,
        typer.Option(
            "--ablate/--add",
            help=(
                "Bake a directional ablation (orthogonalize every residual writer and the "
                "embeddings against the vector) instead of adding it. Default: --ablate when "
                "the file's operation is project_out."
            ),
            show_default=False,
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    force: Annotated[
        bool, typer.Option(help="Use a vector made for another model anyway.")
    ] = False,
    model: ModelOpt = None,
    site: SiteOpt = None,
    heads: HeadsOpt = None,
) -> None:
    """Write a model folder with the vector baked into its weights (plain transformers loads it)."""
    import steerlab as sl
    from steerlab.ablation import DirectionalAblation
    from steerlab.editing import bake as bake_model

    chosen = _parse_ints(layers, "layers")
    check_output_folder(out)
    vec = sl.SteeringVector.load(vector_file)
    steered = _load_model(model)
    vec.check_compatible(steered, force=force)
    project_out = ablate_direction or vec.metadata.get("operation") == "project_out"
    if project_out:
        if (site, heads) != (None, None):
            raise sl.InvalidInputError(
                "--site and --heads apply to added steering; a directional ablation (--ablate) "
                "acts on every residual writer"
            )
        if chosen is not None:
            vec = vec.select(chosen)
        if len(vec.layers) != 1:
            raise sl.InvalidInputError(
                f"--ablate needs one direction; the file has layers {list(vec.layers)}: pick "
                f"one with --layers"
            )
        edit: Any = DirectionalAblation.everywhere(vec)
    else:
        where = site_options(steered, vec, site=site, heads=heads)
        edit = sl.Steering(vec, strength=strength, layers=chosen, **where)
    path = bake_model(steered, edit, out, overwrite=overwrite)
    what = "directional ablation" if project_out else f"steering at strength {strength:g}"
    typer.echo(f"wrote {path} ({what}); load it with AutoModelForCausalLM.from_pretrained")


def export_gguf(
    vector_file: Annotated[Path, typer.Argument(help="Steering vector file (.safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .gguf file to write.")],
    strength: Annotated[float, typer.Option("--strength", "-s", help="Multiplier.")] = 1.0,
    layers: Annotated[
        str | None,
        typer.Option(help="Only these layers, e.g. '6-12' (default: all of the file's)."),
    ] = None,
    model_hint: Annotated[
        str | None,
        typer.Option(help="controlvector.model_hint (default: the file's model_type)."),
    ] = None,
) -> None:
    """Write a llama.cpp control vector (steerlab layer L becomes direction.L)."""
    import steerlab as sl
    from steerlab.editing import export_gguf as export

    chosen = _parse_ints(layers, "layers")
    check_output_file(out)
    vec = sl.SteeringVector.load(vector_file)
    if chosen is not None:
        vec = vec.select(chosen)
    path = export(vec, out, strength=strength, model_hint=model_hint)
    names = ", ".join(f"direction.{layer}" for layer in vec.layers)
    typer.echo(f"wrote {path} ({names}); use it with llama.cpp's --control-vector {path}")


def register(app: typer.Typer) -> None:
    """Add ``ablate``, ``bake`` and ``export-gguf`` to ``app``."""
    app.command("ablate")(ablate)
    app.command("bake")(bake)
    app.command("export-gguf")(export_gguf)
