"""``make evidence``: the CAA behaviour table and the concept evaluation on the default model.

Runs :func:`steerlab.caa.evaluate_caa` for the CAA behaviours (vectors normalised across
behaviours per layer, a layer sweep, multipliers -1/0/+1 and larger ones, the damage metrics)
plus a ``preference``-trained vector (:func:`steerlab.training.train_vector`) at the layer chosen
on validation, and :func:`steerlab.concepts.evaluate_concept` for the built-in concepts with a
preference-trained vector and a LoReFT intervention (:func:`steerlab.training.train_intervention`,
both trained on instruction -> positive / negative concept text) beside mean_diff/pca/probe,
prompting and unsteered. Writes ``docs/evidence.md`` with tables, figures
(``docs/evidence/*.png``, loss curves included) and the raw JSON (``docs/evidence/*.json``).
Sizes are options so the run fits a shared 2-core machine (``--help``); the two parts can run
as separate processes (``--skip-concepts`` / ``--skip-caa``, each writing its part of
``meta.json``). Each finished concept / behaviour is saved at once, so a run stopped at a
deadline keeps what it finished.

    python -m benchmarks.evidence                 # everything, default sizes
    python -m benchmarks.evidence --render-only   # rebuild docs/evidence.md from the JSON
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OUT = DOCS / "evidence"
PAPER_TSV = "RESULTS_layer13_llama2-7b-chat_ab.tsv"


def log(message: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


# --- runs -----------------------------------------------------------------------------------------
def _curve(vector: Any) -> list[float]:
    return [round(float(x), 5) for x in vector.metadata.get("loss_curve", [])]


def run_caa(model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    import steerlab as sl
    from steerlab.caa import (
        CAA_BEHAVIOURS,
        caa_generate_splits,
        caa_vector,
        evaluate_caa,
        find_caa_data,
        normalize_across,
    )

    root = find_caa_data(args.data)
    layers = list(range(args.first_layer, model.n_layers, args.layer_step))
    behaviours = list(CAA_BEHAVIOURS) if args.behaviours == "all" else args.behaviours.split(",")
    multipliers = sorted({-1.0, 0.0, 1.0, *(float(m) for m in args.caa_multipliers.split(","))})
    raw, splits = {}, {}
    for behaviour in behaviours:
        start = time.perf_counter()
        # --validation generate items (from the end) choose the layer: they stay out of the vector
        train, _ = caa_generate_splits(
            behaviour, data=root, train_limit=args.train_limit, validation=args.validation
        )
        splits[behaviour] = train
        raw[behaviour] = caa_vector(model, train, layers=layers)
        log(f"caa vector {behaviour}: {len(train)} pairs, {time.perf_counter() - start:.0f} s")
    vectors = normalize_across(raw) if len(raw) > 1 else raw
    results = []
    for behaviour in behaviours:
        start = time.perf_counter()
        result = evaluate_caa(
            model,
            behaviour,
            data=root,
            layer="best",
            sweep_layers=layers,
            multipliers=multipliers,
            limit=args.limit,
            validation=args.validation,
            open_ended=args.open_limit > 0,
            open_limit=args.open_limit or None,
            damage_passages=args.damage_passages,
            vector=vectors[behaviour],
            model_name="SmolLM2-135M-Instruct",
        )
        data = result.to_dict()
        data["seconds"] = round(time.perf_counter() - start)
        cells = ", ".join(f"{p['p_matching']:.3f}" for p in data["results"])
        log(f"caa {behaviour}: layer {result.layer}: {cells} ({data['seconds']} s)")
        steps = args.train_steps if args.caa_train_steps is None else args.caa_train_steps
        lr = args.train_lr if args.caa_train_lr is None else args.caa_train_lr
        batch = args.train_batch if args.caa_train_batch is None else args.caa_train_batch
        if steps > 0:
            # the trained vector at the layer mean difference chose on validation, trained on
            # the same generate items, judged on the same test items
            start = time.perf_counter()
            trained = sl.train_vector(
                model,
                splits[behaviour],
                layer=result.layer,
                objective="preference",
                steps=steps,
                lr=lr,
                chat=True,
                progress=False,
                batch_size=batch,
            )
            took = time.perf_counter() - start
            scored = evaluate_caa(
                model,
                behaviour,
                data=root,
                layer=result.layer,
                multipliers=[-1.0, 0.0, 1.0],
                limit=args.limit,
                damage_passages=args.damage_passages,
                vector=trained,
                model_name="SmolLM2-135M-Instruct",
            ).to_dict()
            data["trained"] = {
                "objective": "preference",
                "steps": steps,
                "lr": lr,
                "batch": batch,
                "n_items": len(splits[behaviour].prompts),
                "norm": round(float(trained[result.layer].norm()), 4),
                "loss_curve": _curve(trained),
                "train_seconds": round(took),
                "results": scored["results"],
            }
            cells = ", ".join(f"{p['p_matching']:.3f}" for p in scored["results"])
            log(f"caa {behaviour} trained: {cells} ({time.perf_counter() - start:.0f} s)")
        results.append(data)
        _save(Path(args.caa_json), results)
    return results


def concept_training_items(concept: Any, instructions: list[str], n: int) -> list[dict[str, str]]:
    """Preference items for one concept: each train instruction answered by a positive text
    (chosen) or its paired negative text (rejected), cycling over the instructions."""
    return [
        {"prompt": instructions[i % len(instructions)], "chosen": f" {pos}", "rejected": f" {neg}"}
        for i, (pos, neg) in enumerate(zip(concept.positive[:n], concept.negative[:n], strict=True))
    ]


def _grid(text: str) -> list[float]:
    return [float(s) for s in text.split(",")]


def run_concepts(model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    import steerlab as sl
    from steerlab.concepts import builtin_concepts, concept_instructions, evaluate_concept
    from steerlab.site_methods import iti_vector

    instructions = concept_instructions()[: args.instructions]
    cut = args.n_train or len(instructions) // 2
    results = []
    for name in args.concepts.split(","):
        start = time.perf_counter()
        concept = builtin_concepts()[name]
        extra: dict[str, Any] = {}
        curves: dict[str, Any] = {}
        iti_info: dict[str, Any] = {}
        if args.iti_k > 0:
            # ITI (Li et al. 2023): the top-K heads by held-out probe accuracy on the concept's
            # contrast pairs, each shifted by its mean difference, at its own grid of multiples
            began = time.perf_counter()
            pairs = args.max_pairs or len(concept.positive)
            iti = iti_vector(
                model, list(concept.positive[:pairs]), list(concept.negative[:pairs]), k=args.iti_k
            )
            extra["iti"] = (iti, "add", _grid(args.iti_strengths))
            iti_info = {
                "k": args.iti_k,
                "heads": iti.metadata["heads"],
                "accuracy": {
                    f"{layer}.{key.split('_')[1]}": round(value, 3)
                    for layer, accs in iti.metadata["layer_info"].items()
                    for key, value in accs.items()
                },
                "seconds": round(time.perf_counter() - began),
            }
        if args.train_steps > 0:
            items = concept_training_items(concept, instructions[:cut], args.max_pairs or 10**6)
            options = dict(
                layer=args.concept_layer,
                steps=args.train_steps,
                lr=args.train_lr,
                chat=True,
                progress=False,
                batch_size=args.train_batch,
            )
            began = time.perf_counter()
            trained = sl.train_vector(model, items, objective="preference", **options)
            extra["trained"] = (trained, "add", _grid(args.extra_strengths))
            curves["trained"] = {
                "objective": "preference",
                "loss_curve": _curve(trained),
                "norm": round(float(trained[args.concept_layer].norm()), 4),
                "seconds": round(time.perf_counter() - began),
            }
            began = time.perf_counter()
            reft = sl.train_intervention(model, items, rank=args.rank, **options)
            extra["loreft"] = (reft, "loreft", _grid(args.loreft_strengths))
            curves["loreft"] = {
                "objective": "likelihood",
                "rank": args.rank,
                "loss_curve": _curve(reft),
                "seconds": round(time.perf_counter() - began),
            }
            log(f"concept {name}: trained in {time.perf_counter() - start:.0f} s")
        result = evaluate_concept(
            model,
            concept,
            layer=args.concept_layer,
            operators=args.operators.split(","),
            strengths=[float(s) for s in args.strengths.split(",")],
            scale=args.scale,
            instructions=instructions,
            n_train=cut,
            max_new_tokens=args.max_new_tokens,
            damage_passages=args.damage_passages,
            max_pairs=args.max_pairs,
            model_name="SmolLM2-135M-Instruct",
            progress=False,
            extra=extra,
            max_kl=args.max_kl or None,
        )
        data = result.to_dict()
        data["training"] = {
            "n_items": len(concept.positive[: args.max_pairs or None]),
            "steps": args.train_steps,
            "lr": args.train_lr,
            **curves,
        }
        if iti_info:
            data["iti"] = iti_info
        data["seconds"] = round(time.perf_counter() - start)
        results.append(data)
        best = result.best()
        log(f"concept {name}: best {best.name} {best.combined:.3f} ({data['seconds']} s)")
        _save(OUT / "concepts.json", results)
    return results


def _previous(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())) if path.is_file() else []


def _merged_caa() -> list[dict[str, Any]]:
    """``caa.json`` plus any ``caa-*.json`` written by runs split over processes, one entry per
    behaviour in the paper's order."""
    from steerlab.caa import CAA_BEHAVIOURS

    found: dict[str, dict[str, Any]] = {}
    for path in [OUT / "caa.json", *sorted(OUT.glob("caa-*.json"))]:
        for entry in _previous(path):
            found[entry["behaviour"]] = entry
    order = {b: i for i, b in enumerate(CAA_BEHAVIOURS)}
    merged = sorted(found.values(), key=lambda e: order.get(e["behaviour"], len(order)))
    if merged:
        _save(OUT / "caa.json", merged)
    return merged


def _update_meta(path: Path, ours: dict[str, Any]) -> None:
    # read again just before writing: another part's process may have written meanwhile
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta.update(ours)
    _save(path, meta)


def _save(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


# --- the paper's numbers ----------------------------------------------------------------------
def paper_table(data: str | None) -> dict[str, dict[float, float]]:
    """``{behaviour: {multiplier: p}}`` of the paper's layer-13, no-system-prompt rows."""
    from steerlab.caa import find_caa_data

    try:
        path = find_caa_data(data) / PAPER_TSV
        lines = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#")
        ]
    except Exception:  # the table is context, not a requirement of the run
        return {}
    table: dict[str, dict[float, float]] = {}
    for row in csv.DictReader(lines, delimiter="\t"):
        if row["system_prompt"] == "None":
            table.setdefault(row["behavior"], {})[float(row["multiplier"])] = float(
                row["p_matching"]
            )
    return table


# --- figures --------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def caa_figure(
    results: list[dict[str, Any]], path: Path, paper: dict[str, dict[float, float]] | None = None
) -> None:
    """One panel per behaviour: p(matching) on the test items over layers at x-1, x0, x+1; the
    dashed line is the layer chosen on the validation items; triangles mark the paper's
    Llama-2-7b-chat values at its layer 13 (the scale of the effect being reproduced)."""
    n = len(results)
    cols = 4 if n > 4 else n
    rows = math.ceil(n / cols)
    figure = _figure(3.2 * cols, 2.6 * rows)
    styles = {-1.0: ("tab:blue", "x-1"), 0.0: ("0.5", "x0"), 1.0: ("tab:red", "x+1")}
    for k, result in enumerate(results):
        ax = figure.add_subplot(rows, cols, k + 1)
        sweep = result.get("layer_sweep", [])
        layers = [entry["layer"] for entry in sweep]
        for m, (colour, label) in styles.items():
            values = [
                next(p["p_matching"] for p in entry["results"] if p["multiplier"] == m)
                for entry in sweep
            ]
            ax.plot(layers, values, marker="o", markersize=3, color=colour, label=label)
        ax.axvline(
            result["layer"], color="0.7", linestyle="--", linewidth=1, label="chosen (validation)"
        )
        ref = (paper or {}).get(result["behaviour"], {})
        for m, (colour, _) in styles.items():
            if m in ref:
                ax.plot([13], [ref[m]], marker="^", color=colour, linestyle="none",
                        label="paper L13 (Llama-2-7b)" if m == 1.0 else None)  # fmt: skip
        ax.set_title(result["behaviour"], fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("p(matching)", fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")


def concept_figure(results: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars per concept and candidate, on the held-out instructions: the combined score
    (top; standard error bars) and concept presence alone (bottom)."""
    names: list[str] = []
    for result in results:
        for row in result["rows"]:
            if row["name"] not in names:
                names.append(row["name"])
    figure = _figure(1.6 + 1.1 * len(results) * max(1, len(names)) / 3, 5.6)
    width = 0.8 / len(names)
    steered = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
               "tab:pink", "tab:olive", "tab:cyan"]  # fmt: skip
    colours = {"unsteered": "0.6", "prompting": "black"}
    for name in names:
        if name not in colours:
            colours[name] = steered[(len(colours) - 2) % len(steered)]
    panels = [("combined", "combined score (harmonic mean)"), ("concept", "concept presence")]
    for k, (key, label) in enumerate(panels):
        ax = figure.add_subplot(2, 1, k + 1)
        for j, name in enumerate(names):
            xs, ys, errs = [], [], []
            for i, result in enumerate(results):
                row = next((r for r in result["rows"] if r["name"] == name), None)
                if row is None:
                    continue
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(row[key])
                errs.append(row["combined_sem"])
            bars = errs if key == "combined" else None
            ax.bar(xs, ys, width=width, yerr=bars, label=name, color=colours[name], capsize=2)
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([r["concept"] for r in results])
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"held-out {label}", fontsize=8)
        if k == 0:
            ax.legend(fontsize=6, ncol=4)
    figure.tight_layout()
    figure.savefig(path, format="png", bbox_inches="tight")


def _sizes(part: str, args: argparse.Namespace, n_layers: int) -> str:
    trained = (
        f"trained vectors: {args.train_steps} steps, lr {args.train_lr}, batch {args.train_batch}"
        if args.train_steps
        else "no trained vectors"
    )
    if part == "caa":
        steps = args.train_steps if args.caa_train_steps is None else args.caa_train_steps
        lr = args.train_lr if args.caa_train_lr is None else args.caa_train_lr
        batch = args.train_batch if args.caa_train_batch is None else args.caa_train_batch
        trained = (
            f"trained vectors: {steps} steps, lr {lr}, batch {batch}"
            if steps
            else "no trained vectors"
        )
        return (
            f"{args.train_limit} generate pairs and {args.limit} A/B test items per behaviour "
            f"(of 290-1000 and 50), {args.validation} generate items of each behaviour "
            "held out to choose the layer (both sets balanced over the answer letters), "
            f"{args.open_limit} open-ended items, layers "
            f"{args.first_layer}..{n_layers - 1} step {args.layer_step}, multipliers -1, 0, 1 "
            f"and {args.caa_multipliers}, {args.damage_passages} neutral passages; {trained}"
        )
    cut = args.n_train or args.instructions // 2
    return (
        f"layer {args.concept_layer}, operators {args.operators}, strengths {args.strengths} "
        f"({_scale_words(args.scale)}), the trained vector at {args.extra_strengths} times "
        f"its learned size, LoReFT at {args.loreft_strengths}"
        + (
            f", ITI over the top {args.iti_k} heads at {args.iti_strengths} times their mean "
            "differences"
            if args.iti_k
            else ", no ITI"
        )
        + f", {args.instructions} instructions ({cut} choose the strength, "
        f"{args.instructions - cut} held out), "
        + (
            f"strength chosen among those with KL <= {args.max_kl} on neutral text, "
            if args.max_kl
            else "strength chosen on score alone, "
        )
        + f"{args.max_new_tokens} new tokens, greedy"
        + (f", {args.max_pairs} contrast pairs" if args.max_pairs else "")
        + f", {args.damage_passages} neutral passages; {trained}, LoReFT rank {args.rank}"
    )


def _scale_words(scale: str) -> str:
    if scale == "residual":
        return "fractions of the mean residual norm at the layer"
    return "multiples of each method's raw vector"


# --- the page ---------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _gap_se(result: dict[str, Any]) -> float:
    pts = {p["multiplier"]: p for p in result["results"]}
    return math.hypot(pts[1.0].get("p_sem", 0.0), pts[-1.0].get("p_sem", 0.0))


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{x:+.3f}"


def _run_line(meta: dict[str, Any], part: str, label: str) -> str:
    run = meta.get(f"{part}_run")
    if not run:
        return f"{label}: not run."
    if "seconds" not in run:
        return (
            f"{label}: started {run['started']} and stopped before it finished (cut at the "
            f"deadline; the tables hold every item it finished) (`{run['command'].strip()}`)."
        )
    low, high = run["load_average"]
    return (
        f"{label}: finished {run['when']}, {run['seconds'] / 60:.0f} min wall, load average "
        f"{low:g} at the start and {high:g} at the end (`{run['command'].strip()}`)."
    )


def _p(result: dict[str, Any], m: float, key: str = "results") -> float:
    return float(next(p["p_matching"] for p in result[key] if p["multiplier"] == m))


def render(caa: list[dict[str, Any]], concepts: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    paper = paper_table(meta.get("data"))
    lines = [
        "# Evidence: CAA's behaviour table and an AxBench-style concept evaluation",
        "",
        "<!-- generated by `make evidence` (python -m benchmarks.evidence); the reading is "
        "written in benchmarks/evidence.py -->",
        "",
        f"Model: {meta['model']} ({meta['n_layers']} layers), on {meta['machine']}. "
        f"{_run_line(meta, 'caa', 'CAA part')} {_run_line(meta, 'concept', 'Concept part')} "
        "Raw numbers: `docs/evidence/caa.json`, `docs/evidence/concepts.json`, "
        "`docs/evidence/meta.json`.",
        "",
        "## 1. CAA reproduction (Rimsky/Panickssery et al. 2024)",
        "",
        "Protocol as in the paper's code (see `steerlab.caa`): the vector is the mean difference "
        "of the residual stream at the answer letter over the generate split (chat template, the "
        "assistant's reply `(A` vs `(B`), the seven behaviours' vectors rescaled per layer to "
        "their mean norm; on the A/B test split the prompt ends with `(` and the vector is added "
        "at the positions after the instruction (here: that one token); the score is "
        "p(matching letter) / (p(A) + p(B)), averaged over items.",
        "",
        f"Sizes (CPU budget): {meta.get('caa_run', {}).get('sizes', '–')}. **Layer choice:** "
        "the layer of the sweep where p(x+1) - p(x-1) is largest on the *validation* items "
        "(generate items from the end of each behaviour's file, never part of its vector); "
        "every number in the table is on the disjoint *test* items at that layer. `val gap` "
        "is the gap that chose the layer; `± se` is sqrt(se(x+1)^2 + se(x-1)^2) over items "
        "(conservative: the two are measured on the same items).",
        "",
        "| behaviour | layer | val gap | x-1 | x0 | x+1 | test gap ± se | paper x-1 | paper x0 "
        "| paper x+1 | KL neutral x-1 / x+1 | ppl neutral x-1 / x0 / x+1 "
        "| open-ended p x-1 / x0 / x+1 |",
        "| --- " + "| ---: " * 12 + "|",
    ]
    for r in caa:
        ref = paper.get(r["behaviour"], {})
        pts = {p["multiplier"]: p for p in r["results"]}
        gap = _p(r, 1.0) - _p(r, -1.0)
        se = _gap_se(r)
        chosen = next((v for v in r.get("validation_sweep", []) if v["layer"] == r["layer"]), None)
        val_gap = _p(chosen, 1.0) - _p(chosen, -1.0) if chosen else None
        kl = f"{_fmt(pts[-1.0].get('kl_neutral'))} / {_fmt(pts[1.0].get('kl_neutral'))}"
        ppl = " / ".join(_fmt(pts[m].get("perplexity_neutral"), 2) for m in (-1.0, 0.0, 1.0))
        opened = (
            " / ".join(_fmt(_p(r, m, "open_ended")) for m in (-1.0, 0.0, 1.0))
            if r.get("open_ended")
            else "–"
        )
        lines.append(
            f"| {r['behaviour']} | {r['layer']} | {_signed(val_gap)} | {_fmt(_p(r, -1.0))} | "
            f"{_fmt(_p(r, 0.0))} | {_fmt(_p(r, 1.0))} | {gap:+.3f} ± {se:.3f} | "
            f"{_fmt(ref.get(-1.0))} | {_fmt(ref.get(0.0))} | {_fmt(ref.get(1.0))} | {kl} | {ppl} "
            f"| {opened} |"
        )
    from steerlab.caa import CAA_BEHAVIOURS

    missing = [b for b in CAA_BEHAVIOURS if b not in {r["behaviour"] for r in caa}]
    if missing:
        lines += [
            "",
            f"Not run in this budget: {', '.join(missing)} (their paper numbers: "
            + "; ".join(
                f"{b} {_fmt(paper.get(b, {}).get(-1.0))} / {_fmt(paper.get(b, {}).get(0.0))} / "
                f"{_fmt(paper.get(b, {}).get(1.0))}"
                for b in missing
            )
            + ").",
        ]
    paper_gaps = {b: v[1.0] - v[-1.0] for b, v in paper.items() if 1.0 in v and -1.0 in v}
    ours = {r["behaviour"]: _p(r, 1.0) - _p(r, -1.0) for r in caa}
    same_sign = [b for b in ours if b in paper_gaps and ours[b] * paper_gaps[b] > 0]
    monotone = [r["behaviour"] for r in caa if _p(r, -1.0) < _p(r, 0.0) < _p(r, 1.0)]
    clear = [r["behaviour"] for r in caa if ours[r["behaviour"]] > 2 * _gap_se(r)]
    sems = [p.get("p_sem", 0.0) for r in caa for p in r["results"]]
    lines += [
        "",
        "Paper columns: Llama-2-7b-chat, layer 13, no system prompt, 50 items "
        "(`RESULTS_layer13_llama2-7b-chat_ab.tsv`). Damage: steering left on at every token "
        "of the shipped neutral corpus; `ppl` x0 is the unsteered perplexity. Open-ended: "
        "mean sigmoid(log p(matching answer text) - log p(other answer text)), steering every "
        "answer token, choices removed from the question.",
        "",
        f"Measured: the effect has the paper's sign for {len(same_sign)} of {len(ours)} "
        f"behaviours ({', '.join(same_sign) or 'none'}); p(matching) rises monotonically "
        f"-1 < 0 < +1 for {len(monotone)} ({', '.join(monotone) or 'none'}); the test gap "
        f"exceeds twice its standard error for {len(clear)} ({', '.join(clear) or 'none'}). "
        f"Typical standard error of one cell: "
        f"{_fmt(sorted(sems)[len(sems) // 2] if sems else None)}.",
        "",
        "![p(matching) over layers per behaviour](evidence/caa_layers.png)",
        "",
    ]
    lines += caa_trained_lines(caa)
    lines += [
        "## 2. AxBench-style concept evaluation",
        "",
        "For each concept the vector comes from its contrastive prompts at one layer; each "
        "candidate (method x operator) generates greedy continuations of everyday "
        "instructions with the steering on; each continuation is scored for "
        "concept presence, fluency and instruction relevance (each in [0, 1], definitions in "
        "`steerlab.scorers`), combined by their harmonic mean; the strength is chosen on the "
        "first instructions (the strength-choice set, also the prompts the trained candidates "
        "train on) and the table reports the rest (held out, never seen by any choice or "
        "training). Prompting = "
        "the instruction plus a hint asking for the concept, unsteered, judged against the "
        "original instruction.",
        "",
        f"Sizes: {meta.get('concept_run', {}).get('sizes', '–')}. Operators compared: "
        f"{', '.join(concepts[0]['settings']['operators']) if concepts else '–'}; steering at "
        "every token but the first (the attention sink, whose residual along these directions "
        "is tens to hundreds of times larger: `clamp` there reverses the effect). A strength "
        "is a fraction of the mean residual norm at the layer (every method's direction is "
        "rescaled to that norm), so the same number means the same push for every method and "
        "concept.",
        "",
        "| concept | candidate | strength | concept | fluency | relevance | combined | "
        "ppl (unsteered judge) | KL neutral | wrong way | consistency | example (held-out) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for result in concepts:
        for row in result["rows"]:
            example = row["example"].replace("|", "/").replace("\n", " ")[:90]
            lines.append(
                f"| {result['concept']} | {row['name']} | {row['strength']:g} | "
                f"{_fmt(row['concept'], 2)} | {_fmt(row['fluency'], 2)} | "
                f"{_fmt(row['relevance'], 2)} | **{_fmt(row['combined'])}** ± "
                f"{_fmt(row['combined_sem'])} | "
                f"{_fmt(row['perplexity'], 1)} | {_fmt(row['kl_neutral'])} | "
                f"{_fmt(row.get('wrong_way'), 2)} | {_fmt(row.get('consistency'), 2)} | {example} |"
            )
    wins, presence = [], []
    for result in concepts:
        top = max(result["rows"], key=lambda r: r["concept"])
        presence.append(f"{result['concept']}: {top['name']} ({top['concept']:.2f})")
        rows = {r["name"]: r for r in result["rows"]}
        steered = [r for r in result["rows"] if r["name"] not in ("unsteered", "prompting")]
        best = max(steered, key=lambda r: r["combined"]) if steered else None
        if "prompting" in rows and best is not None:
            winner = (
                "prompting" if rows["prompting"]["combined"] >= best["combined"] else best["name"]
            )
            wins.append(f"{result['concept']}: {winner}")
    lines += [
        "",
        f"Best held-out combined score per concept: {'; '.join(wins) or '–'}. Highest concept "
        f"presence alone: {'; '.join(presence) or '–'}.",
        "",
        "![held-out combined score per concept and candidate](evidence/concepts.png)",
        "",
    ]
    lines += concept_target_lines(concepts)
    if _curve_series(caa, concepts):
        lines += ["![training loss per step](evidence/training_curves.png)", ""]
    lines += iti_lines(concepts)
    lines += timing_lines(caa, concepts)
    lines += ["## Reading", "", *reading_lines(caa, concepts), "", READING.strip(), ""]
    return "\n".join(lines)


def _diff(row: dict[str, Any], other: dict[str, Any]) -> str:
    margin = math.hypot(row["combined_sem"], other["combined_sem"])
    return f"{row['combined'] - other['combined']:+.3f} ± {margin:.3f}"


def iti_lines(concepts: list[dict[str, Any]]) -> list[str]:
    """ITI (head site) beside the residual candidates, same protocol and held-out items."""
    rows = [(r, {x["name"]: x for x in r["rows"]}) for r in concepts if r.get("iti")]
    if not rows:
        return []
    k = rows[0][0]["iti"]["k"]
    lines = [
        "### ITI (attention heads) beside residual steering",
        "",
        f"Inference-time intervention (Li et al. 2023) as `steerlab.site_methods.iti_vector`: "
        f"one logistic probe per (layer, head) on the heads' outputs at the last token of the "
        f"concept's contrast pairs (a quarter held out), the top {k} heads by held-out probe "
        "accuracy, each shifted by its mean difference before the output projection "
        '(`site="head"`). Same protocol as every row above: strength (a multiple of the mean '
        "differences) chosen on the strength-choice instructions within the damage budget, "
        "reported on the held-out ones, damage with the steering on at every token but the "
        "first. `vs mean_diff` / `vs prompting`: held-out combined difference ± one standard "
        "error of the difference.",
        "",
        "| concept | ITI strength | concept | combined | KL neutral | wrong way | mean_diff "
        "combined | mean_diff KL | vs mean_diff | vs prompting | heads (layer.head: accuracy) "
        "| s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for result, by in rows:
        iti, md, pr = by["iti"], by.get("mean_diff"), by.get("prompting")
        heads = ", ".join(f"{h}: {a:.2f}" for h, a in list(result["iti"]["accuracy"].items()))
        lines.append(
            f"| {result['concept']} | {iti['strength']:g} | {_fmt(iti['concept'], 2)} | "
            f"{_fmt(iti['combined'])} ± {_fmt(iti['combined_sem'])} | "
            f"{_fmt(iti['kl_neutral'])} | {_fmt(iti.get('wrong_way'), 2)} | "
            f"{_fmt(md['combined']) if md else '–'} | {_fmt(md['kl_neutral']) if md else '–'} | "
            f"{_diff(iti, md) if md else '–'} | {_diff(iti, pr) if pr else '–'} | {heads} | "
            f"{result['iti']['seconds']} |"
        )
    lines.append("")
    return lines


def timing_lines(caa: list[dict[str, Any]], concepts: list[dict[str, Any]]) -> list[str]:
    """Wall time of each finished part on this machine, from the JSON."""
    lines = ["### Time per part (this machine, one torch thread)", ""]
    if concepts:
        lines += [
            "| concept | total s | trained vector s | LoReFT s | ITI s |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in concepts:
            t = r.get("training", {})
            lines.append(
                f"| {r['concept']} | {r.get('seconds', '–')} | "
                f"{t.get('trained', {}).get('seconds', '–')} | "
                f"{t.get('loreft', {}).get('seconds', '–')} | "
                f"{r.get('iti', {}).get('seconds', '–')} |"
            )
        lines.append("")
    if caa:
        lines += [
            "| behaviour | mean difference sweep + multipliers s | trained vector s |",
            "| --- | ---: | ---: |",
        ]
        for r in caa:
            lines.append(
                f"| {r['behaviour']} | {r.get('seconds', '–')} | "
                f"{r.get('trained', {}).get('train_seconds', '–')} |"
            )
        lines.append("")
    return lines


def caa_moves(caa: list[dict[str, Any]]) -> list[str]:
    """Every CAA test cell within the damage budget whose p(matching) differs from x0 by
    more than twice the standard error of the difference (mean difference at any multiplier,
    the trained vector at x-1 / x+1), as ``behaviour method xm: p0 -> p``."""
    found = []
    for r in caa:
        sources = [("mean diff", r["results"])]
        if r.get("trained"):
            sources.append(("trained", r["trained"]["results"]))
        for label, pts in sources:
            zero = next(p for p in pts if p["multiplier"] == 0.0)
            for p in pts:
                kl = p.get("kl_neutral")
                if p["multiplier"] == 0.0 or kl is None or kl > KL_LIMIT:
                    continue
                se = math.hypot(p.get("p_sem", 0.0), zero.get("p_sem", 0.0))
                if abs(p["p_matching"] - zero["p_matching"]) > 2 * se:
                    found.append(
                        f"{r['behaviour']} {label} x{p['multiplier']:+g}: "
                        f"{zero['p_matching']:.3f} -> {p['p_matching']:.3f} (KL {kl:.2f})"
                    )
    return found


def reading_lines(caa: list[dict[str, Any]], concepts: list[dict[str, Any]]) -> list[str]:
    """The page's answers, computed from the JSON."""
    lines = []
    if caa:
        moved = caa_moves(caa)
        n_cells = sum(
            1
            for r in caa
            for key in ("results", "trained")
            for p in (r["results"] if key == "results" else r.get("trained", {}).get("results", []))
            if p["multiplier"] != 0.0 and (p.get("kl_neutral") or 0.0) <= KL_LIMIT
        )
        flat = [
            r["behaviour"]
            for r in caa
            if r.get("trained")
            and sum(r["trained"]["loss_curve"][-5:]) / len(r["trained"]["loss_curve"][-5:])
            > 0.98 * sum(r["trained"]["loss_curve"][:5]) / len(r["trained"]["loss_curve"][:5])
        ]
        lines += [
            f"**CAA: does any method move this model's A/B behaviour?** Of the {n_cells} test "
            f"cells (mean difference at every multiplier, the trained vector at x-1 / x+1, "
            f"{len(caa)} behaviours) within the damage budget (KL <= {KL_LIMIT} on neutral "
            f"text), {len(moved)} differ from unsteered by more than twice the standard error "
            "of the difference" + (": " + "; ".join(moved) if moved else "") + ". Trained "
            f"vectors whose loss stayed flat (last 5 steps within 2% of the first 5): "
            f"{len(flat)} of {sum(1 for r in caa if r.get('trained'))} "
            f"({', '.join(flat) or 'none'}).",
            "",
        ]
    if concepts:
        best = []
        for r in concepts:
            by = {x["name"]: x for x in r["rows"]}
            pr = by.get("prompting")
            ok = [by[n] for n in TRAINED if n in by]
            if not pr or not ok:
                continue
            top = max(ok, key=lambda x: x["combined"])
            best.append(
                f"{r['concept']}: {top['name']} {top['combined']:.3f} ± {top['combined_sem']:.3f} "
                f"(KL {_fmt(top['kl_neutral'], 2)}) vs prompting {pr['combined']:.3f} ± "
                f"{pr['combined_sem']:.3f}"
            )
        lines += [
            "**Concepts: best trained candidate against prompting** (held-out combined score "
            "± se): " + "; ".join(best) + ".",
            "",
        ]
    return lines


TRAINED = ("trained", "loreft")
KL_LIMIT = 0.5


def beats_prompting(result: dict[str, Any], name: str) -> bool | None:
    """Whether candidate ``name`` beats prompting by more than one standard error of the
    difference (sqrt(se^2 + se^2), items treated as independent) at KL <= KL_LIMIT on neutral
    text; None when either row is missing."""
    rows = {r["name"]: r for r in result["rows"]}
    if name not in rows or "prompting" not in rows:
        return None
    row, base = rows[name], rows["prompting"]
    kl = row.get("kl_neutral")
    margin = math.hypot(row["combined_sem"], base["combined_sem"])
    return bool(row["combined"] - base["combined"] > margin and kl is not None and kl <= KL_LIMIT)


def concept_target_lines(concepts: list[dict[str, Any]]) -> list[str]:
    """The headline target, counted from the JSON, and the trained vectors' loss curves."""
    if not concepts:
        return []
    names: list[str] = []
    for result in concepts:
        names += [r["name"] for r in result["rows"] if r["name"] not in names]
    names = [n for n in names if n not in ("unsteered", "prompting")]
    counts = []
    for name in names:
        won = [r["concept"] for r in concepts if beats_prompting(r, name)]
        counts.append(f"{name} {len(won)} of {len(concepts)} ({', '.join(won) or 'none'})")
    trained_wins = {r["concept"] for r in concepts for n in TRAINED if beats_prompting(r, n)}
    met = len(trained_wins) >= 3 and len(concepts) >= 5
    lines = [
        "**Target** (issue 19): a trained method (`trained`, `loreft`) beats prompting by more "
        f"than one standard error of the difference, at KL <= {KL_LIMIT} nats/token on neutral "
        f"text, on at least 3 of 5 concepts. Counted from `concepts.json`: "
        + "; ".join(counts)
        + f". A trained method wins on {len(trained_wins)} of {len(concepts)} concepts: the "
        f"target is **{'met' if met else 'not met'}**.",
        "",
        "| concept | candidate | objective | steps | first loss | last loss | norm | train s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in concepts:
        training = result.get("training", {})
        for name in TRAINED:
            entry = training.get(name)
            if not entry or not entry.get("loss_curve"):
                continue
            curve = entry["loss_curve"]
            lines.append(
                f"| {result['concept']} | {name} | {entry['objective']} | {len(curve)} | "
                f"{curve[0]:.3f} | {curve[-1]:.3f} | {_fmt(entry.get('norm'), 1)} | "
                f"{entry.get('seconds', '–')} |"
            )
    lines.append("")
    return lines


def _at(points: list[dict[str, Any]], m: float, key: str = "p_matching") -> Any:
    return next((p.get(key) for p in points if p["multiplier"] == m), None)


def caa_trained_lines(caa: list[dict[str, Any]]) -> list[str]:
    """Trained (preference) beside mean difference at the same layer, and mean difference at
    larger multipliers, both on the test items, from ``caa.json``."""
    lines: list[str] = []
    trained = [r for r in caa if r.get("trained")]
    if trained:
        lines += [
            "",
            "### Trained (`preference`, BiPO) beside mean difference",
            "",
            "Same layer (chosen for mean difference on the validation items), same generate "
            "items to train on, same held-out test items. The trained vector is applied at "
            "x-1 / x0 / x+1 of its learned norm. Loss: the BiPO loss per step on a minibatch "
            "of the training items (2 log 2 = 1.386 at v = 0); a flat curve means the vector "
            "found nothing on the training items that moves the answer.",
            "",
            "| behaviour | layer | mean diff gap ± se | trained x-1 | x0 | x+1 | trained gap ± se "
            "| KL x-1 / x+1 | norm | loss first 5 → last 5 steps | train s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in trained:
            t = r["trained"]
            pts = t["results"]
            gap = _at(pts, 1.0) - _at(pts, -1.0)
            se = math.hypot(_at(pts, 1.0, "p_sem") or 0.0, _at(pts, -1.0, "p_sem") or 0.0)
            curve = t["loss_curve"]
            head, tail = curve[:5], curve[-5:]
            lines.append(
                f"| {r['behaviour']} | {r['layer']} | {_p(r, 1.0) - _p(r, -1.0):+.3f} ± "
                f"{_gap_se(r):.3f} | {_fmt(_at(pts, -1.0))} | {_fmt(_at(pts, 0.0))} | "
                f"{_fmt(_at(pts, 1.0))} | {gap:+.3f} ± {se:.3f} | "
                f"{_fmt(_at(pts, -1.0, 'kl_neutral'))} / {_fmt(_at(pts, 1.0, 'kl_neutral'))} | "
                f"{t['norm']:.1f} | {sum(head) / len(head):.3f} → {sum(tail) / len(tail):.3f} | "
                f"{t['train_seconds']} |"
            )
    multipliers = sorted({p["multiplier"] for r in caa for p in r["results"]})
    if any(abs(m) > 1 for m in multipliers):
        lines += [
            "",
            "### Mean difference at larger multipliers",
            "",
            "p(matching) on the test items at the chosen layer; in brackets the KL (nats per "
            "token) on neutral text with the vector on at every token.",
            "",
            "| behaviour | " + " | ".join(f"x{m:+g}" for m in multipliers) + " |",
            "| --- " + "| ---: " * len(multipliers) + "|",
        ]
        for r in caa:
            cells = [
                f"{_fmt(_at(r['results'], m))} ({_fmt(_at(r['results'], m, 'kl_neutral'), 2)})"
                for m in multipliers
            ]
            lines.append(f"| {r['behaviour']} | " + " | ".join(cells) + " |")
    if lines:
        lines.append("")
    return lines


def _curve_series(
    caa: list[dict[str, Any]], concepts: list[dict[str, Any]]
) -> list[tuple[str, list[float]]]:
    series = [
        (f"caa {r['behaviour']}", r["trained"]["loss_curve"]) for r in caa if r.get("trained")
    ]
    for result in concepts:
        for name in TRAINED:
            entry = result.get("training", {}).get(name)
            if entry and entry.get("loss_curve"):
                series.append((f"{result['concept']} {name}", entry["loss_curve"]))
    return series


def curves_figure(caa: list[dict[str, Any]], concepts: list[dict[str, Any]], path: Path) -> None:
    """The training loss per step of every trained vector (CAA behaviours and concepts)."""
    series = _curve_series(caa, concepts)
    if not series:
        return
    figure = _figure(7.5, 3.2)
    panels = [("caa", "CAA (preference)"), ("trained", "concepts: trained (preference)"),
              ("loreft", "concepts: loreft (likelihood)")]  # fmt: skip
    for k, (key, title) in enumerate(panels):
        ax = figure.add_subplot(1, 3, k + 1)
        for label, curve in series:
            if (key == "caa") == label.startswith("caa") and (key == "caa" or label.endswith(key)):
                ax.plot(
                    range(1, len(curve) + 1),
                    curve,
                    label=label.split(" ")[1 if key == "caa" else 0],
                    linewidth=1,
                )
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("loss", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    figure.tight_layout()
    figure.savefig(path, format="png", bbox_inches="tight")


READING = """
**CAA, in numbers.** No: on this model, at these sizes, nothing moves the A/B answer beyond
noise within the damage budget (count above).

* Mean difference at x-1 / x+1 (KL 0.01-0.03): test gaps from -0.039 to +0.025, standard
  errors 0.037-0.069; the paper's sign for 3 of 7 behaviours, as chance would give.
* Larger multipliers: up to x±4 the KL stays at or under 0.44 and the largest change from x0 is
  corrigible-neutral-HHH at x-4 (0.511 to 0.591) and hallucination at x+4 (0.470 to 0.404),
  both *against* the multiplier's sign, as is sycophancy at x+4 (0.437). From x-4 to x+4,
  p(matching) rises step by step for refusal (0.510 to 0.592), survival-instinct (0.490 to
  0.507) and myopic-reward (0.476 to 0.485), each step well within a standard error, and falls
  step by step for corrigible-neutral-HHH (0.591 to 0.466). At x±8 the text is damaged (KL
  0.55-2.18) and p(matching) still moves by 0.11 at most.
* The trained (BiPO) vectors: test gaps from -0.007 to +0.095 (corrigible-neutral-HHH, ± 0.078;
  refusal +0.074 ± 0.069), five of seven positive, none beyond 1.3 standard errors. Their loss
  on the training items stayed at 2 log 2 for six of seven (minibatch noise around 1.39 over 10
  steps, while the norms grew to 7-13: the steps did not agree on a direction);
  survival-instinct's fell to 1.27 and moved held-out p(matching) by +0.023 ± 0.059. With 10
  steps of 2 items this is compatible with undertraining, which this budget cannot rule out.

**Concepts, one by one** (held-out combined score ± se; KL on neutral text in nats/token).

* Sentiment: the unsteered model already writes upbeat text (presence 0.69, combined 0.801 ±
  0.020). The trained vector at its learned size (KL 0.06) raises presence to 0.82 and scores
  0.822 ± 0.019 against prompting's 0.773 ± 0.023: it beats prompting because the hinted prompt
  costs fluency and relevance (0.83 / 0.75 against 0.84 / 0.84), not because it is far more
  positive; against unsteered it is within one standard error. mean_diff, pca, probe and ITI
  at their smallest strengths (0.816-0.827, KL 0.03-0.04) are level with it.
* Formality: prompting wins (0.363 ± 0.077, presence 0.35). The best steered rows are ITI at 3
  (0.226 ± 0.080, KL 0.39), pca and mean_diff at 0.3 (0.21, KL 0.22) and the trained vector
  (0.158 ± 0.063, KL 0.13).
* Food: the unsteered model never names a food, prompting in 1 of 20 held-out continuations
  (0.034 ± 0.034), the trained vector (KL 0.35) in 4 of 20 (0.135 ± 0.062); no other candidate
  passes 0.07 within the budget.
* Music: prompting 0.199 ± 0.070. LoReFT scores higher (0.312 ± 0.047, presence 0.65) but at KL
  0.58: no strength of its grid was within the budget on the strength-choice measurement, so it
  kept its least damaging one and does not count. pca at 0.2 is level with prompting (0.186,
  KL 0.24); the trained vector lower (0.097).
* Animals: prompting names an animal in 1 of 20 (0.031 ± 0.031), LoReFT at 0.5 (KL 0.32) in 6
  of 20 (0.108 ± 0.038), at a cost in fluency (0.43 against 0.86; perplexity 49 against 2.8);
  every other candidate 0.034 or less.
* The count above says the target is met by its letter (sentiment and food by the trained
  vector, animals by LoReFT), but every one of the three wins is 1.4-1.6 standard errors of the
  difference, none beyond two, and there are ten such comparisons (two trained methods, five
  concepts): read it as "trained steering is at least level with prompting here, ahead on the
  topics the small model does not take up from a hint", not as a clear win. Prompting is weak on
  the topic concepts partly because 12 new tokens leave little room for a topic to appear.
* Training: the preference loss fell from 2 log 2 = 1.386 to 0.32-0.94 in 10 steps for every
  concept (learned norms 18-19, an eighth of the mean residual norm at layer 12, 146).
  LoReFT's likelihood loss jumped at step 2 (to 9-12 from 4.9-6.4) and ended near its start
  (3.9-5.1): at lr 0.15 and 10 steps it is undertrained, and its rows (combined 0.02-0.43, the
  worst on sentiment) say more about this budget than about the method.
* ITI: on this protocol it never beats mean_diff beyond a standard error (table above). Between 26
  and 59 of the 270 heads reach held-out probe accuracy 1.0 on each concept (16 pairs, 8
  held-out texts; measured separately with `head_probes`), so the top 16 is decided by the tie
  order (lowest layer first) rather than by the probes: a larger contrast set or a
  margin-based ranking is needed before this selection means much on a 135M model.

**How to read the concept numbers.** Scores are the built-in scorers (word lists, VADER), not an
LLM judge: the concept score of a continuation is 0 unless it uses one of the concept's words
(food, music, animals, formality) or reads as positive (sentiment), and the harmonic mean makes
a continuation without the concept score 0 whatever its fluency. `± se` is the standard error
over the held-out instructions; "beats prompting" needs the difference to exceed
sqrt(se² + se²), which treats the two rows as independent although they share instructions.
Every candidate's strength, the trained vectors and LoReFT saw only the strength-choice
instructions (and the concept's contrast texts); the damage budget of the strength choice is
measured on the neutral corpus, which is neither. With 6 strength-choice instructions the
choice is coarse: where every strength scores 0 there, the first of the grid is kept.

**Time.** The machine has 2 cores shared with six other agents' test and benchmark processes;
every process runs in its own scheduler group (Linux autogroups), so this single-threaded run
got a third to a half of a core for most of its time whatever the niceness. The sizes above
were chosen to finish in about an hour of that; the time table gives what each part took.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="CAA data folder (default ../shared/data/CAA)")
    parser.add_argument("--behaviours", default="all")
    parser.add_argument("--limit", type=int, default=16, help="A/B test items per behaviour")
    parser.add_argument("--train-limit", type=int, default=32, help="generate items per behaviour")
    parser.add_argument(
        "--validation", type=int, default=16, help="held-out generate items choosing the layer"
    )
    parser.add_argument("--open-limit", type=int, default=8, help="open-ended items")
    parser.add_argument("--first-layer", type=int, default=0)
    parser.add_argument("--layer-step", type=int, default=3)
    parser.add_argument("--damage-passages", type=int, default=4)
    parser.add_argument("--concepts", default="sentiment,formality,food,music,animals")
    parser.add_argument("--concept-layer", type=int, default=12)
    parser.add_argument("--strengths", default="0.1,0.2,0.4,0.8")
    parser.add_argument("--scale", default="residual", help="residual (fractions) or raw")
    parser.add_argument("--instructions", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--caa-json", default=str(OUT / "caa.json"), help="where CAA results go")
    parser.add_argument("--max-pairs", type=int, default=None, help="contrast pairs per concept")
    parser.add_argument("--n-train", type=int, default=4, help="instructions choosing strength")
    parser.add_argument("--operators", default="add", help="operators of the statistical methods")
    parser.add_argument("--extra-strengths", default="0.5,1,2,4", help="trained vector's grid")
    parser.add_argument("--loreft-strengths", default="0.25,0.5,1", help="LoReFT's grid")
    parser.add_argument("--iti-k", type=int, default=16, help="ITI heads (0: no ITI candidate)")
    parser.add_argument("--iti-strengths", default="1,2,4", help="ITI's grid (mean differences)")
    parser.add_argument(
        "--max-kl", type=float, default=0.5, help="damage budget of the strength choice (0: none)"
    )
    parser.add_argument("--caa-multipliers", default="-8,-4,-2,2,4,8", help="beside -1, 0, 1")
    parser.add_argument("--train-steps", type=int, default=40, help="0: no trained vectors")
    parser.add_argument("--train-lr", type=float, default=0.05)
    parser.add_argument("--train-batch", type=int, default=4, help="items per training step")
    parser.add_argument("--rank", type=int, default=4, help="LoReFT rank")
    parser.add_argument("--caa-train-steps", type=int, default=None, help="default --train-steps")
    parser.add_argument("--caa-train-lr", type=float, default=None, help="default --train-lr")
    parser.add_argument("--caa-train-batch", type=int, default=None, help="default --train-batch")
    parser.add_argument("--skip-caa", action="store_true")
    parser.add_argument("--skip-concepts", action="store_true")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    import steerlab as sl

    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    meta_path = OUT / "meta.json"
    if args.render_only:
        caa = _merged_caa()
        concepts = _previous(OUT / "concepts.json")
        meta = json.loads(meta_path.read_text())
    else:
        torch.manual_seed(0)
        model = sl.load_model()
        ours: dict[str, Any] = {
            "model": "SmolLM2-135M-Instruct",
            "n_layers": model.n_layers,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
            f"{torch.get_num_threads()}",
            "command": "make evidence",
            "data": args.data,
        }
        # each part records its own sizes, time and load, so the two parts can run as separate
        # processes (--skip-caa / --skip-concepts) and still describe the page together
        # the headline (concepts) first, so a run stopped at a deadline has it
        parts = [("concept", run_concepts, "concepts.json"), ("caa", run_caa, "caa.json")]
        results: dict[str, list[dict[str, Any]]] = {}
        for part, runner, name in parts:
            if args.skip_caa if part == "caa" else args.skip_concepts:
                results[part] = _previous(OUT / name)
                continue
            began, load = time.perf_counter(), os.getloadavg()[0]
            # recorded before the part runs: a run cut short still says what it was running
            ours[f"{part}_run"] = {
                "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "sizes": _sizes(part, args, model.n_layers),
                "command": "python -m benchmarks.evidence " + " ".join(argv or sys.argv[1:]),
            }
            _update_meta(meta_path, ours)
            results[part] = runner(model, args)
            ours[f"{part}_run"].update(
                when=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                seconds=round(time.perf_counter() - began),
                load_average=[round(load, 1), round(os.getloadavg()[0], 1)],
            )
            _update_meta(meta_path, ours)
        caa, concepts = results["caa"], results["concept"]
        meta = json.loads(meta_path.read_text())
    if caa:
        caa_figure(caa, OUT / "caa_layers.png", paper_table(meta.get("data")))
    if concepts:
        concept_figure(concepts, OUT / "concepts.png")
    curves_figure(caa, concepts, OUT / "training_curves.png")
    (DOCS / "evidence.md").write_text(render(caa, concepts, meta), encoding="utf-8")
    log(f"wrote {DOCS / 'evidence.md'} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
