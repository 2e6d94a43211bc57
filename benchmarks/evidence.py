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
        if args.train_steps > 0:
            # the trained vector at the layer mean difference chose on validation, trained on
            # the same generate items, judged on the same test items
            start = time.perf_counter()
            trained = sl.train_vector(
                model,
                splits[behaviour],
                layer=result.layer,
                objective="preference",
                steps=args.train_steps,
                lr=args.train_lr,
                chat=True,
                progress=False,
                batch_size=args.train_batch,
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
                "steps": args.train_steps,
                "lr": args.train_lr,
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


def run_concepts(model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    import steerlab as sl
    from steerlab.concepts import builtin_concepts, concept_instructions, evaluate_concept

    instructions = concept_instructions()[: args.instructions]
    cut = args.n_train or len(instructions) // 2
    results = []
    for name in args.concepts.split(","):
        start = time.perf_counter()
        concept = builtin_concepts()[name]
        extra: dict[str, Any] = {}
        curves: dict[str, Any] = {}
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
            extra["trained"] = (trained, "add")
            curves["trained"] = {
                "objective": "preference",
                "loss_curve": _curve(trained),
                "norm": round(float(trained[args.concept_layer].norm()), 4),
                "seconds": round(time.perf_counter() - began),
            }
            began = time.perf_counter()
            reft = sl.train_intervention(model, items, rank=args.rank, **options)
            extra["loreft"] = (reft, "loreft")
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
            extra_strengths=[float(s) for s in args.extra_strengths.split(",")],
        )
        data = result.to_dict()
        data["training"] = {
            "n_items": len(concept.positive[: args.max_pairs or None]),
            "steps": args.train_steps,
            "lr": args.train_lr,
            **curves,
        }
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
        f"({_scale_words(args.scale)}), trained candidates at {args.extra_strengths} times "
        f"their learned size, {args.instructions} instructions ({cut} choose the strength, "
        f"{args.instructions - cut} held out), {args.max_new_tokens} new tokens, greedy"
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
        "first half of the instructions and the table reports the second half. Prompting = "
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
    lines += [
        "## Reading",
        "",
        READING.strip(),
        "",
    ]
    return "\n".join(lines)


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
**Sizes and time (this run).** The machine (2 cores) was shared with six other agents: load
average 17-20 for most of the run, each of the two processes (CAA and concepts, side by side,
one torch thread each) got about a tenth of a core. The run was therefore cut far below the
issue's sizes and stopped at a fixed deadline: the CAA part covers the behaviours in its table
(the others are listed as not run), the concept part the concepts in its table. Training one
concept's two candidates (15 steps each) took 17 minutes of wall time at that load; a full
5-concept run needs an unloaded machine (or `make evidence` on a GPU). The earlier run's
7-behaviour and 3-concept results are in the git history of `docs/evidence/`.

**CAA: does any method move this model's A/B behaviour?** Barely, and only by pushing hard.

* Mean difference at the paper's x-1 / x+1 moves p(matching) by -0.002 (sycophancy) and
  +0.009 (survival-instinct) on the 16 test items (standard error of a gap 0.07). At x+8 it
  rises to 0.547 and 0.578 from 0.465 / 0.493 unsteered, and x-8 gives 0.477 / 0.460, but the
  cost is 2.6-6.1 nats per token of KL on neutral text: the text is being damaged, not steered.
  At KL <= 0.5 (x±2 and below, sycophancy x-4) no cell moves beyond its standard error.
* The `preference` (BiPO) vector for sycophancy, trained on the same 24 generate items at the
  layer mean difference chose (27), kept its loss at 2 log 2 = 1.386 for all 20 steps (batch 2,
  lr 0.05; final norm 5.1) and moved held-out p(matching) the wrong way (-0.019). A flat loss on
  the training items says the training found no direction that separates the matching from the
  other letter there; with so few steps this is also compatible with undertraining, which this
  run cannot rule out. For survival-instinct (layer 13) the loss dipped (1.386 to 1.06-1.30 in
  the last steps, norm 10.8) and held-out p(matching) went 0.479 / 0.493 / 0.506: +0.027 ±
  0.062, within noise, at KL 0.00 on neutral text.

**Concepts: the target is not met in this run** (count above, from the JSON).

* Sentiment (20 held-out instructions): the unsteered model already writes upbeat text
  (presence 0.69). The trained vector reaches the highest presence of the steered candidates
  (0.81, prompting 0.76) at KL 0.09, but its combined score (0.785 ± 0.020) is level with
  prompting (0.764 ± 0.024), within one standard error. mean_diff at 0.1 has the best combined
  score (0.824 ± 0.016): beyond one standard error of prompting, within one of unsteered
  (0.805 ± 0.020). LoReFT (rank 4, 15
  likelihood steps, loss 5.8 → 2.7) over-steers: presence 0.78 but combined 0.43 and KL 0.54
  on neutral text ("I was thrilled of the food was delicious"), above the 0.5 limit.
* Formality: prompting wins (0.330 ± 0.078 combined, presence 0.33). The trained vector is the
  best steered candidate (0.157 ± 0.063, presence 0.15, KL 0.15: "I am pleased to inform you
  that..."); mean_diff/pca/probe at 0.1 change nothing measurable; LoReFT derails the text
  (0.01, KL 0.57).
* Food: the unsteered model never mentions food (0.00) and prompting barely (0.069 ± 0.047).
  mean_diff at 0.4 scores highest (0.265 ± 0.059) but at KL 1.05, over the limit. LoReFT
  (0.139 ± 0.051, KL 0.48) beats prompting by 0.070 against a margin of 0.069: the one win
  counted for a trained method, by a hair. The trained vector wrote no food word on the
  held-out instructions (0.00) though its loss fell 1.386 → 0.36 on the training pairs.
* Wrong way: the share of held-out instructions whose concept score falls below the unsteered
  one is 0.10-0.30 for sentiment (prompting 0.25) and 0-0.10 for formality and food, where
  the unsteered score is mostly 0 and cannot fall.
* The trained vector's loss fell steadily for every concept (1.386 → 0.73 / 0.43 / 0.36 in 15
  steps): on the concept texts there is a direction to learn, unlike on the A/B letters. Music
  and animals were not run (deadline), so the 3-of-5 target could not be met in this run.
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
    parser.add_argument("--extra-strengths", default="0.5,1,2", help="trained candidates' grid")
    parser.add_argument("--caa-multipliers", default="-8,-4,-2,2,4,8", help="beside -1, 0, 1")
    parser.add_argument("--train-steps", type=int, default=40, help="0: no trained vectors")
    parser.add_argument("--train-lr", type=float, default=0.05)
    parser.add_argument("--train-batch", type=int, default=4, help="items per training step")
    parser.add_argument("--rank", type=int, default=4, help="LoReFT rank")
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
        parts = [("caa", run_caa, "caa.json"), ("concept", run_concepts, "concepts.json")]
        results: dict[str, list[dict[str, Any]]] = {}
        for part, runner, name in parts:
            if args.skip_caa if part == "caa" else args.skip_concepts:
                results[part] = _previous(OUT / name)
                continue
            began, load = time.perf_counter(), os.getloadavg()[0]
            results[part] = runner(model, args)
            ours[f"{part}_run"] = {
                "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "seconds": round(time.perf_counter() - began),
                "load_average": [round(load, 1), round(os.getloadavg()[0], 1)],
                "sizes": _sizes(part, args, model.n_layers),
                "command": "python -m benchmarks.evidence " + " ".join(argv or sys.argv[1:]),
            }
        caa, concepts = results["caa"], results["concept"]
        # read again just before writing: the other part's process may have written meanwhile
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        meta.update(ours)
        _save(meta_path, meta)
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
