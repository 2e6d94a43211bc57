"""CLI command ``train``: a trained steering vector (BiPO / likelihood) or a LoReFT intervention.

A thin shell over :func:`steerlab.train_vector` and :func:`steerlab.train_intervention`. Data
is a JSONL file of ``{"prompt", "chosen", "rejected"}`` objects, a CAA A/B ``.json`` file, or
any paired contrast data ``steerlab compute --data`` takes. Ctrl-C stops at a step boundary and
writes the vector so far (marked ``interrupted`` in its metadata) before exiting with 130; the
file is written atomically, so it is complete or absent.

>>> import typer
>>> from typer.testing import CliRunner
>>> app = typer.Typer()
>>> register(app)
>>> "--objective" in CliRunner().invoke(app, ["train", "--help"]).output
True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from steerlab.cli._common import check_output_file
from steerlab.positions import Positions

__all__ = ["register", "training_data"]


def training_data(spec: str) -> Any:
    """What ``--data`` names, in a form :func:`steerlab.preference_items` takes: the path of a
    JSONL file of prompt/chosen/rejected objects or of a CAA ``.json`` file as it is, anything
    else through :func:`steerlab.load_dataset` (built-in names, contrast files).

    >>> training_data("sentiment").name
    'sentiment'
    """
    from steerlab.data import load_dataset
    from steerlab.errors import DataError

    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        return path
    if path.suffix == ".jsonl" and path.is_file():
        try:
            with path.open(encoding="utf-8") as handle:
                first = next((line for line in handle if line.strip()), "")
            keys = json.loads(first) if first else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"cannot read {path}: {err}") from None
        if isinstance(keys, dict) and "prompt" in keys:
            return path
    return load_dataset(spec)


def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Vector file to write (.safetensors).")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="JSONL of {prompt, chosen, rejected}, a CAA A/B .json file, or paired contrast "
            "data (a built-in name or file, as for compute).",
        ),
    ],
    layer: Annotated[
        int, typer.Option("--layer", "-l", help="Layer to steer (negative: from the end).")
    ],
    objective: Annotated[
        str | None,
        typer.Option("--objective", help="preference (BiPO, the default) or likelihood."),
    ] = None,
    rank: Annotated[
        int,
        typer.Option(
            "--rank",
            help="Train a LoReFT intervention of this rank (likelihood) instead of a vector.",
        ),
    ] = 0,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 100,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 0.01,
    positions: Annotated[
        str,
        typer.Option(
            "--positions",
            "-p",
            help="Tokens steered: all, prompt, generated, last, an index, 0,3, 2:, first:K, "
            "after:TEXT, between:A,B or outside:A,B.",
        ),
    ] = "all",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Items per step.")] = 8,
    beta: Annotated[float, typer.Option("--beta", help="BiPO's beta (preference).")] = 0.1,
    penalty: Annotated[
        float, typer.Option("--penalty", help="Weight of the size penalty (likelihood, LoReFT).")
    ] = 1e-3,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the item order (and LoReFT init).")
    ] = 0,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Model folder, .gguf file or hub id (default: the embedded model)."
        ),
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap each prompt in the chat template.")
    ] = False,
) -> None:
    """Train a steering vector (or, with --rank, a LoReFT intervention) and save it."""
    import steerlab

    if rank < 0:
        raise typer.BadParameter(f"--rank must be 0 (a vector) or positive, got {rank}")
    if rank and objective not in (None, "likelihood"):
        raise typer.BadParameter(
            f"--rank trains LoReFT with the likelihood objective, not {objective!r}"
        )
    check_output_file(out)  # before minutes of training, not after
    items = steerlab.preference_items(training_data(data))
    # looked up on the package at call time, so tests (and users) can swap the loader
    lm = steerlab.load_model(model)
    common: dict[str, Any] = dict(
        layer=layer,
        steps=steps,
        lr=lr,
        positions=Positions.parse(positions, what="--positions"),
        seed=seed,
        batch_size=batch_size,
        penalty=penalty,
        chat=chat,
    )
    if rank:
        vec = steerlab.train_intervention(lm, items, rank=rank, **common)
    else:
        vec = steerlab.train_vector(
            lm, items, objective=objective or "preference", beta=beta, **common
        )
    path = vec.save(out)
    meta = vec.metadata
    what = f"LoReFT rank {rank}" if rank else f"{meta['objective']} vector"
    norm = next(iter(vec.norms().values()))
    typer.echo(
        f"wrote {path}: {what} at layer {vec.layers[0]}, {meta['steps']} steps on "
        f"{meta['n_items']} items, loss {meta['loss_curve'][0]:.4f} -> {meta['final_loss']:.4f}, "
        f"norm {norm:.4g}"
        if meta["steps"]
        else f"wrote {path}: no step completed"
    )
    if meta["interrupted"]:
        typer.echo(
            f"interrupted after {meta['steps']} of {meta['steps_requested']} steps: the file "
            f"holds the vector so far (metadata interrupted=true)",
            err=True,
        )
        raise typer.Exit(130)


def register(app: typer.Typer) -> None:
    """Add ``train`` to ``app``."""
    app.command("train")(train)
