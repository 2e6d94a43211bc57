"""Core commands: ``steerlab demo`` (the main job) and ``steerlab generate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from steerlab.cli._common import ExpertsOpt, HeadsOpt, SiteOpt, parse_numbers, site_options
from steerlab.grammar import parse_layers, parse_strength, resolve_all
from steerlab.positions import Positions

__all__ = ["register"]

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model folder, .gguf file or cached hub id (default: embedded SmolLM2-135M).",
    ),
]


def _load(model: str | None) -> Any:
    """The model, or a one-line error and exit code 1 (never a traceback) when it cannot load."""
    import steerlab as sl

    try:
        return sl.load_model(model)
    except sl.SteerlabError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None


def demo(
    model: ModelOption = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Candidate layers, e.g. '10,15,20', '8-20', '0:30:3' or 'all' (default: 8 "
            "spread over the middle)."
        ),
    ] = None,
    strengths: Annotated[
        str, typer.Option(help="Candidate strengths (multipliers of the raw vector).")
    ] = "0,1,2,4,8",
    max_kl: Annotated[
        float, typer.Option(help="Damage budget: mean KL(unsteered || steered), nats.")
    ] = 0.5,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 24,
    n_prompts: Annotated[int, typer.Option(help="How many held-out prompts to show.")] = 3,
    out: Annotated[Path, typer.Option(help="Where to save the sentiment vector.")] = Path(
        "steerlab-sentiment.safetensors"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the train/held-out split.")] = 0,
) -> None:
    """Build a sentiment vector, pick layer and strength, show steered text, measure the shift."""
    from steerlab.demo import run_demo

    loaded = _load(model)
    run_demo(
        model=loaded,
        layers=resolve_all(parse_layers(layers, what="--layers", text=True), loaded.n_layers),
        strengths=parse_numbers(strengths, "--strengths"),
        max_kl=max_kl,
        max_new_tokens=max_new_tokens,
        n_prompts=n_prompts,
        out=out,
        seed=seed,
    )


def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    vector: Annotated[
        Path | None, typer.Option("--vector", "-v", help="Steering vector file (.safetensors).")
    ] = None,
    model: ModelOption = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Layers to apply it at, e.g. '12', '6,8,10', '6-12' or 'all' (default: the "
            "file's)."
        ),
    ] = None,
    strength: Annotated[
        str,
        typer.Option(
            "--strength", "-s", help="Multiplier, or per layer: '15:4,16:2' (layer:strength)."
        ),
    ] = "1",
    positions: Annotated[
        str,
        typer.Option(
            help="all | last | prompt | generated | 0,3 | 2: | first:K | after:TEXT | "
            "between:A,B | outside:A,B"
        ),
    ] = "all",
    op: Annotated[
        str | None,
        typer.Option(
            "--op",
            help="Steering operator: add (default), add_norm, clamp, cap, ablate, rotate, "
            "affine, loreft (a project_out vector defaults to ablate).",
        ),
    ] = None,
    when: Annotated[
        Path | None,
        typer.Option(
            "--when",
            help="Condition file (sl.fit_condition(...).save): steer only prompts that satisfy it.",
        ),
    ] = None,
    when_per_token: Annotated[
        bool, typer.Option(help="Apply the --when condition token by token instead.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 40,
    chat: Annotated[bool, typer.Option(help="Wrap prompts in the chat template.")] = False,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    compare: Annotated[
        bool, typer.Option(help="Also print the unsteered continuation side by side.")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="Apply a vector made for another model anyway.")
    ] = False,
    site: SiteOpt = None,
    heads: HeadsOpt = None,
    experts: ExpertsOpt = None,
) -> None:
    """Generate text, optionally steered by a vector file."""
    import steerlab as sl
    from steerlab.operators import is_loreft

    if vector is None and (site, heads, experts) != (None, None, None):
        raise sl.InvalidInputError("--site, --heads and --experts need a --vector")
    steered_model = _load(model)
    steering = None
    if vector is not None:
        vec = sl.SteeringVector.load(vector)
        vec.check_compatible(steered_model, force=force)
        chosen = resolve_all(
            parse_layers(layers, what="--layers", text=True), steered_model.n_layers
        )
        condition = None
        if when is not None:
            condition = sl.Condition.load(when)
            if when_per_token:
                condition = condition.per_token()
        steering = sl.Steering(
            vec,
            strength=parse_strength(strength, what="--strength", text=True),
            positions=Positions.parse(positions, what="--positions"),
            layers=chosen,
            op=op,
            when=condition,
            **site_options(steered_model, vec, site=site, heads=heads, experts=experts),
        )
        if is_loreft(vec) and steering.resolved_op != "loreft":
            # the library's message speaks of op='loreft' and force=True; here the fix is an option
            typer.echo(
                f"error: {vector} is a LoReFT intervention (steerlab train --rank): op "
                f"{steering.resolved_op!r} on its direction is not the trained edit; apply it "
                f"with --op loreft",
                err=True,
            )
            raise typer.Exit(code=2)
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        chat=chat,
        do_sample=sample,
        temperature=temperature,
        seed=seed,
    )
    texts = steered_model.generate(list(prompt), steering=steering, **options)
    if compare and steering is not None:
        baseline = steered_model.generate(list(prompt), **options)
        _print_comparison(list(prompt), baseline, texts, parse_strength(strength, text=True))
        return
    for p, t in zip(prompt, texts):
        # user and model text are data: never markup, never wrapped (click drops the bold
        # when the output is not a terminal)
        typer.echo(typer.style(p, bold=True) + t)


def _print_comparison(
    prompts: list[str], baseline: list[str], steered: list[str], strength: float | dict[int, float]
) -> None:
    label = (
        f"x{strength:g}"
        if isinstance(strength, float)
        else "x" + ",".join(f"{k}:{v:g}" for k, v in strength.items())
    )
    if not sys.stdout.isatty():
        for p, b, t in zip(prompts, baseline, steered):
            typer.echo(f"prompt: {p}\nunsteered: {b}\nsteered ({label}): {t}\n")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table("prompt", "unsteered", f"steered ({label})", show_lines=True)
    for p, b, t in zip(prompts, baseline, steered):
        table.add_row(Text(p), Text(b), Text(t))  # Text: brackets in them are not markup
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add ``demo`` and ``generate`` to ``app``."""
    app.command("demo")(demo)
    app.command("generate")(generate)
