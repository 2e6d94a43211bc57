"""CLI command ``steerlab sweep``: pick the layer and strength, validate on held-out prompts.

A thin shell over :func:`steerlab.tuning.tune`: prints the layer × strength table, the
recommendation and the held-out numbers, and writes ``sweep.json``, ``sweep.csv``,
``curves.png``, ``heatmap.png``, ``vector.safetensors`` and ``report.html`` into ``--out``.

>>> import typer
>>> from typer.testing import CliRunner
>>> app = typer.Typer()
>>> register(app)
>>> "--max-kl" in CliRunner().invoke(app, ["sweep", "--help"]).output
True
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from steerlab.cli._common import parse_numbers
from steerlab.grammar import parse_layers, resolve_all
from steerlab.positions import Positions

__all__ = ["register"]


def _words(text: str | None) -> list[str] | None:
    if text is None:
        return None
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise typer.BadParameter("give at least one word")
    # the token a BPE vocabulary uses for a word inside a sentence carries its leading space
    return [" " + w for w in words]


def _prompt_file(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as err:
        raise typer.BadParameter(f"cannot read {path}: {err.strerror}") from None
    if len(lines) < 2:
        raise typer.BadParameter(f"{path}: need at least 2 prompts (one a line)")
    return lines


def sweep(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Paired dataset: built-in name (sentiment, formality), a data file, or a CAA "
            "A/B .json file.",
        ),
    ] = "sentiment",
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Model folder, .gguf file or hub id (default: the embedded model)."
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Candidate layers, e.g. '6,12,18', '8-20', '0:30:3' or 'all' (default: 8 "
            "spread over the middle)."
        ),
    ] = None,
    strengths: Annotated[
        str,
        typer.Option(help="Comma-separated multipliers of the raw vector; 0 is always added."),
    ] = "0,0.5,1,2,4,8",
    max_kl: Annotated[
        float,
        typer.Option(help="Damage budget: mean KL(unsteered || steered) per next token, nats."),
    ] = 0.5,
    test_fraction: Annotated[
        float, typer.Option(help="Fraction of pairs and prompts held out for validation.")
    ] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed of the train/held-out splits.")] = 0,
    method: Annotated[
        str, typer.Option(help="Direction method (mean_diff, pca, probe, ...).")
    ] = "mean_diff",
    positions: Annotated[
        str,
        typer.Option(
            help="Where to steer: all | last | prompt | generated | 0,3 | 2: | first:K | "
            "after:TEXT | between:A,B | outside:A,B"
        ),
    ] = "all",
    op: Annotated[
        str,
        typer.Option(
            "--op",
            help="Steering operator, or a comma-separated list to compare on the same data "
            "(add, add_norm, clamp, cap, ablate, rotate, affine, loreft).",
        ),
    ] = "add",
    eval_prompts: Annotated[
        Path | None,
        typer.Option(
            help="Text file of evaluation prompts, one a line (default: the built-in set's "
            "neutral prompts, else the pairs' texts)."
        ),
    ] = None,
    target_words: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated words the steering should make likely, e.g. happy,great."
        ),
    ] = None,
    contrast_words: Annotated[
        str | None,
        typer.Option(help="Comma-separated words it should make unlikely, e.g. sad,awful."),
    ] = None,
    examples: Annotated[
        int, typer.Option(help="Held-out prompts to generate from, unsteered and steered.")
    ] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per example generation.")] = 32,
    mode: Annotated[
        str,
        typer.Option(
            help="prefix (batched rows + prefix reuse, fastest), batched, or naive (one "
            "configuration per forward pass); all give the same numbers."
        ),
    ] = "prefix",
    chat: Annotated[bool, typer.Option(help="Wrap prompts in the chat template.")] = False,
    out: Annotated[
        Path, typer.Option(help="Folder for sweep.json/.csv, plots, vector and report.html.")
    ] = Path("steerlab-sweep"),
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show progress bars.")
    ] = True,
) -> None:
    """Sweep layer × strength on a train split, recommend a point, validate it on held-out data."""
    from steerlab.sweeps import MODES
    from steerlab.tuning import tune

    if mode not in MODES:
        raise typer.BadParameter(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if max_kl < 0 or not math.isfinite(max_kl):
        raise typer.BadParameter("--max-kl must be a non-negative number")
    values = parse_numbers(strengths, "strengths")
    chosen = parse_layers(layers, what="--layers", text=True)
    where = Positions.parse(positions, what="--positions")
    ops = [o.strip() for o in op.split(",") if o.strip()]
    from steerlab.operators import OPERATORS

    unknown = [o for o in ops if o not in OPERATORS]
    if not ops or unknown:
        raise typer.BadParameter(f"--op: unknown {unknown or op!r}; use {', '.join(OPERATORS)}")
    targets, contrasts = _words(target_words), _words(contrast_words)
    prompts = _prompt_file(eval_prompts)
    import steerlab as sl

    steered_model = sl.load_model(model)
    result = tune(
        steered_model,
        data,
        layers=resolve_all(chosen, steered_model.n_layers),
        strengths=values,
        max_kl=max_kl,
        test_fraction=test_fraction,
        seed=seed,
        method=method,
        positions=where,
        eval_prompts=prompts,
        target_words=targets,
        contrast_words=contrasts,
        n_examples=examples,
        max_new_tokens=max_new_tokens,
        mode=mode,
        chat=chat,
        progress=progress,
        op=ops[0] if len(ops) == 1 else ops,
    )
    paths = result.save(out)
    typer.echo(result.summary())
    for example in result.examples:
        typer.echo(f"\n> {example.prompt}")
        typer.echo(f"  unsteered: {example.baseline.strip()}")
        typer.echo(f"  steered:   {example.steered.strip()}")
    typer.echo("")
    for name, path in paths.items():
        typer.echo(f"wrote {name}: {path}")


def register(app: typer.Typer) -> None:
    """Add ``sweep`` to ``app``."""
    app.command("sweep")(sweep)
