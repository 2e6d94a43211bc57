"""CLI group ``steerlab eval``: ``caa`` (the CAA behaviour table) and ``concept`` (AxBench-style).

Thin shells over :func:`steerlab.caa.evaluate_caa` and
:func:`steerlab.concepts.evaluate_concept`; both write JSON (``--out``) and print a table.

>>> import typer
>>> from typer.testing import CliRunner
>>> app = typer.Typer()
>>> register(app)
>>> "--multipliers" in CliRunner().invoke(app, ["eval", "caa", "--help"]).output
True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from steerlab.cli._common import parse_numbers
from steerlab.errors import SteerlabError
from steerlab.grammar import parse_layers, resolve_all

__all__ = ["register"]

eval_app = typer.Typer(
    name="eval",
    help="Evaluate steering the way papers do: CAA's A/B table, AxBench-style concepts.",
    no_args_is_help=True,
)


def _layer(text: str) -> int | str:
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"layer: {text!r} is not a block index or 'best'") from None


def _write_json(path: Path, data: Any) -> None:
    from steerlab.files import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


@eval_app.command("caa")
def caa(
    behaviour: Annotated[
        str, typer.Option(help="A CAA behaviour (e.g. sycophancy), or 'all' for the seven.")
    ],
    layer: Annotated[
        str,
        typer.Option(
            help="Block to steer, or 'best' (largest effect among --sweep-layers on held-out "
            "validation items)."
        ),
    ] = "13",
    multipliers: Annotated[
        str, typer.Option(help="Comma-separated multipliers of the vector, in output order.")
    ] = "-1,0,1",
    limit: Annotated[
        int | None, typer.Option(help="Use the first N A/B test items (50 per behaviour).")
    ] = None,
    train_limit: Annotated[
        int | None, typer.Option(help="Use the first N generate items for the vector.")
    ] = None,
    validation: Annotated[
        int,
        typer.Option(
            help="With --layer best: N generate items from the end (never in the vector) "
            "choose the layer; the test items only report it."
        ),
    ] = 16,
    method: Annotated[str, typer.Option(help="Direction method (mean_diff, pca, probe).")] = (
        "mean_diff"
    ),
    sweep_layers: Annotated[
        str | None,
        typer.Option(help="Also score these layers (e.g. 0:30:3 or 3,6,9) for a layer sweep."),
    ] = None,
    open_ended: Annotated[
        bool,
        typer.Option(
            "--open-ended/--no-open-ended",
            help="Also score log p(matching answer text) - log p(other answer text).",
        ),
    ] = False,
    open_limit: Annotated[
        int | None, typer.Option(help="Items for the open-ended score (default: all).")
    ] = None,
    damage: Annotated[
        bool,
        typer.Option("--damage/--no-damage", help="Measure KL and perplexity on neutral text."),
    ] = True,
    damage_passages: Annotated[
        int | None, typer.Option(help="Neutral passages for the damage metrics (default all).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="A CAA data folder (default: the copy bundled with steerlab)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model folder or cached hub id (default: SmolLM2)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="JSON file to write.")] = Path("caa.json"),
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress", help="Progress bars (default: on a terminal only)."
        ),
    ] = None,
) -> None:
    """Reproduce CAA's A/B behaviour table: p(answer matching the behaviour) per multiplier."""
    values = parse_numbers(multipliers, "multipliers")
    chosen = _layer(layer)
    sweep_spec = parse_layers(sweep_layers, what="--sweep-layers", text=True)
    for name, value in (("limit", limit), ("train-limit", train_limit), ("open-limit", open_limit)):
        if value is not None and value < 1:
            raise typer.BadParameter(f"--{name} must be positive")
    if chosen == "best" and validation < 1:
        raise typer.BadParameter("--validation must be positive with --layer best")
    try:
        import steerlab as sl
        from steerlab.caa import (
            CAA_BEHAVIOURS,
            caa_generate_splits,
            caa_vector,
            evaluate_caa,
            find_caa_data,
            normalize_across,
        )

        root = find_caa_data(data)
        behaviours = list(CAA_BEHAVIOURS) if behaviour == "all" else [behaviour]
        steered = sl.load_model(model)
        swept = resolve_all(sweep_spec, steered.n_layers)
        name = model or "SmolLM2-135M-Instruct"
        vectors: dict[str, Any] = {}
        held_out = validation if chosen == "best" else 0
        if behaviour == "all":  # CAA normalises the seven vectors of a layer to one norm
            wanted = set(steered.adapter.resolve_layers(swept)) if swept else set()
            if chosen != "best":
                wanted.add(steered.adapter.resolve_layer(int(chosen)))
            layers = sorted(wanted)
            raw = {}
            for b in behaviours:  # the validation items stay out of every vector
                train, _ = caa_generate_splits(
                    b, data=root, train_limit=train_limit, validation=held_out
                )
                raw[b] = caa_vector(steered, train, layers=layers, method=method)
            vectors = normalize_across(raw)
        outputs = []
        for b in behaviours:
            result = evaluate_caa(
                steered,
                b,
                data=root,
                layer=chosen,
                multipliers=values,
                limit=limit,
                train_limit=train_limit,
                validation=validation,
                method=method,
                sweep_layers=swept,
                open_ended=open_ended,
                open_limit=open_limit,
                damage=damage,
                damage_passages=damage_passages,
                vector=vectors.get(b),
                model_name=name,
                progress=progress,
            )
            outputs.append(result.to_dict())
            cells = "  ".join(
                f"x{p['multiplier']:+g}: {p['p_matching']:.3f}" for p in outputs[-1]["results"]
            )
            typer.echo(f"{b} (layer {result.layer}): {cells}")
        _write_json(out, outputs[0] if behaviour != "all" else outputs)
    except SteerlabError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"wrote {out}")


@eval_app.command("concept")
def concept(
    name: Annotated[
        str, typer.Option("--concept", help="Built-in concept: sentiment, formality, food.")
    ] = "sentiment",
    layer: Annotated[int, typer.Option(help="Block to steer.")] = 12,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "mean_diff,pca,probe",
    strengths: Annotated[
        str,
        typer.Option(
            help="Strengths tried on the train instructions (with --scale residual: fractions "
            "of the mean residual norm at the layer)."
        ),
    ] = "0.1,0.2,0.4,0.8",
    scale: Annotated[
        str,
        typer.Option(
            help="residual: every direction rescaled to the mean residual norm; raw: each "
            "method's own norm."
        ),
    ] = "residual",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per continuation.")] = 24,
    instructions: Annotated[
        int | None, typer.Option(help="Use the first N shipped instructions (default all 40).")
    ] = None,
    prompting: Annotated[
        bool, typer.Option("--prompting/--no-prompting", help="Include the prompting baseline.")
    ] = True,
    damage: Annotated[
        bool,
        typer.Option("--damage/--no-damage", help="Measure KL and perplexity on neutral text."),
    ] = True,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model folder or cached hub id (default: SmolLM2)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="JSON file to write.")] = Path("concept.json"),
    judge_url: Annotated[
        str | None,
        typer.Option(
            help="An OpenAI-compatible endpoint (…/v1) whose model judges concept, relevance "
            "and fluency 0-2 (AxBench); default: the built-in scorers."
        ),
    ] = None,
    judge_model: Annotated[
        str | None, typer.Option(help="The judge's model name (with --judge-url).")
    ] = None,
    judge_key: Annotated[
        str | None,
        typer.Option(help="API key for the judge (default: $OPENAI_API_KEY, else 'EMPTY')."),
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress", help="Progress bars (default: on a terminal only)."
        ),
    ] = None,
) -> None:
    """AxBench-style: steer continuations of instructions, score concept x fluency x relevance."""
    values = parse_numbers(strengths, "strengths")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen:
        raise typer.BadParameter("methods: give at least one")
    if max_new_tokens < 1:
        raise typer.BadParameter("--max-new-tokens must be positive")
    if (judge_url is None) != (judge_model is None):
        raise typer.BadParameter("--judge-url and --judge-model go together")
    try:
        import steerlab as sl
        from steerlab.concepts import concept_instructions, evaluate_concept
        from steerlab.judge import Judge

        judge = None
        if judge_url is not None and judge_model is not None:
            key = judge_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
            judge = Judge(judge_url, judge_model, api_key=key)

        items = concept_instructions()
        if instructions is not None:
            if not 2 <= instructions <= len(items):
                raise typer.BadParameter(f"--instructions must be between 2 and {len(items)}")
            items = items[:instructions]
        steered = sl.load_model(model)
        result = evaluate_concept(
            steered,
            name,
            layer=layer,
            methods=chosen,
            strengths=values,
            scale=scale,
            instructions=items,
            max_new_tokens=max_new_tokens,
            prompting=prompting,
            damage=damage,
            model_name=model or "SmolLM2-135M-Instruct",
            progress=progress,
            judge=judge,
        )
        _write_json(out, result.to_dict())
    except SteerlabError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    for row in result.rows:
        typer.echo(
            f"{row.name:>18} s={row.strength:<5g} concept {row.concept:.2f}  fluency "
            f"{row.fluency:.2f}  relevance {row.relevance:.2f}  combined {row.combined:.3f}"
            + ("" if row.wrong_way is None else f"  wrong-way {row.wrong_way:.2f}")
            + ("" if row.consistency is None else f"  consistency {row.consistency:.2f}")
        )
    unparsed = sum(r.unparsed for r in result.rows) + result.settings["judge_unparsed_train"]
    if judge is not None:
        typer.echo(f"judge replies without a rating: {unparsed}")
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the ``eval`` group to ``app``."""
    app.add_typer(eval_app, name="eval")
