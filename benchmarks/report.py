"""Render a results dict as the markdown report ``docs/benchmarks.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

_FLOORS = {
    "extraction": "transformers_bare_forward",
    "generation": "transformers_unsteered",
    "strength_sweep": "steerlab_one_at_a_time",
    "layer_sweep": "steerlab_one_at_a_time",
    "head_ablation": "steerlab_one_at_a_time",
}

_TITLES = {
    "extraction": "1. Extraction",
    "generation": "2. Steered generation",
    "strength_sweep": "3. Strength sweep",
    "layer_sweep": "4. Layer sweep",
    "head_ablation": "5. Head ablation scan",
    "memory": "6. Peak memory of extraction",
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def target_table(rows: list[dict[str, Any]]) -> str:
    """The targets as a markdown table."""
    marks = {"pass": "**pass**", "miss": "**MISS**"}
    lines = [
        "| target | ratio (medians) | target | result | ratio (fastest runs) | note |",
        "| --- | ---: | :---: | :---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['what']} | {_fmt(row['ratio'])} | {row['target']} | "
            f"{marks.get(row['status'], row['status'])} | {_fmt(row.get('ratio_of_min'))} | "
            f"{row.get('note', '')} |"
        )
    return "\n".join(lines)


def _timing_table(data: dict[str, Any], floor: str | None) -> str:
    timings = data.get("timings", {})
    base = timings.get(floor, {}).get("median") if floor else None
    lines = [
        f"| variant | median s | min s | max s | runs | / {floor or 'floor'} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, t in timings.items():
        rel = t["median"] / base if base else None
        lines.append(
            f"| {name} | {t['median']:.3f} | {t['min']:.3f} | {t['max']:.3f} | "
            f"{len(t['times'])} | {_fmt(rel)} |"
        )
    return "\n".join(lines)


def _checks(data: dict[str, Any]) -> str:
    checks = data.get("checks")
    if not checks:
        return ""
    items = []
    for key, value in checks.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        items.append(f"`{key}` = {value}")
    return "Checks: " + "; ".join(items) + "."


def _bounds(results: dict[str, Any]) -> list[str]:
    """Block-pass counts: the best speedup prefix reuse can give, whatever the implementation."""
    model = results.get("model", {})
    n = int(model.get("n_layers") or 0)
    if n == 0:
        return []
    loads = results.get("workloads", {})
    lines = []
    sweep = loads.get("strength_sweep", {}).get("params")
    if sweep and isinstance(sweep.get("layers"), list) and len(sweep["layers"]) == 1:
        k, layer = len(sweep["strengths"]), int(sweep["layers"][0])
        tail = n - layer
        one = k * n
        batched = n + tail + k * tail  # clean pass to the end, exactness replay, k tails
        lines.append(
            f"* strength sweep at layer {layer}: one-at-a-time runs {k} x {n} = {one} block "
            f"passes; prefix reuse runs {n} (clean pass) + {tail} (exactness replay) + "
            f"{k} x {tail} (steered tails) = {batched}: at most **{one / batched:.2f}x** faster."
        )
    sweep = loads.get("layer_sweep", {}).get("params")
    if sweep and sweep.get("layers") == n:
        k = len(sweep["strengths"])
        one = n * k * n
        tails = n * (n + 1) // 2
        shared = n + n + k * tails
        lines.append(
            f"* layer sweep ({n} layers x {k} strengths): one-at-a-time {one} block passes; one "
            f"clean pass + exactness replay + each layer's tail per strength {shared}: at most "
            f"**{one / shared:.2f}x** faster."
        )
    ablation = loads.get("head_ablation", {}).get("params")
    if ablation:
        h = int(ablation["heads"])
        one = n * h * n
        fast = n + 2 * n + h * (n * (n + 1) // 2)
        lines.append(
            f"* head scan ({n} layers x {h} heads): one-at-a-time {one} block passes; re-running "
            f"only the blocks from the ablated layer on {fast} (**{one / fast:.2f}x** at most)."
        )
    return lines


def _profile_block(key: str, profile: dict[str, Any]) -> str:
    lines = [
        f"#### Profile: `{key}` ({profile.get('label', '')}), {profile['total_s']:.2f} s "
        f"under cProfile",
        "",
        "| function | calls | own s | cumulative s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in profile["by_tottime"][:12]:
        lines.append(
            f"| `{row['function']}` | {row['ncalls']} | {row['tottime']:.3f} | "
            f"{row['cumtime']:.3f} |"
        )
    ours = profile.get("steerlab_by_cumtime") or []
    if ours:
        lines += [
            "",
            "steerlab's own functions (cumulative includes the model code they call):",
            "",
            "| function | calls | own s | cumulative s |",
            "| --- | ---: | ---: | ---: |",
        ]
        for row in ours[:8]:
            lines.append(
                f"| `{row['function']}` | {row['ncalls']} | {row['tottime']:.3f} | "
                f"{row['cumtime']:.3f} |"
            )
    return "\n".join(lines)


def _peer_section(results: dict[str, Any]) -> list[str]:
    peers = results.get("peers", {})
    if not peers:
        return ["No peers were run (`--peers none`)."]
    out: list[str] = []
    for name, data in peers.items():
        out.append(f"### {name}")
        out.append("")
        status = data.get("status")
        if status != "ok":
            out.append(f"**{status}**: {data.get('reason', '')}")
            if data.get("traceback"):
                out += ["", "```", data["traceback"][-1500:], "```"]
            out.append("")
            continue
        versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
        out.append(f"Requirement `{data.get('requirement')}`; venv: {versions}.")
        for note in data.get("adaptations", []):
            out.append(f"Adaptation: {note}.")
        out.append("")
        for workload, load in data.get("workloads", {}).items():
            out.append(f"{workload} (`floor` = plain transformers in the peer's venv):")
            out.append("")
            out.append(_timing_table(load, "floor"))
            out.append("")
            checks = _checks(load)
            if checks:
                out += [checks, ""]
    return out


def render(results: dict[str, Any], *, results_path: Path | None = None) -> str:
    """The full markdown report."""
    m = results.get("machine", {})
    model = results.get("model", {})
    cfg = results.get("config", {})
    rel = (
        str(results_path.resolve().relative_to(ROOT))
        if results_path and results_path.resolve().is_relative_to(ROOT)
        else str(results_path)
    )
    lines = [
        "# Benchmarks",
        "",
        "<!-- generated by `python -m benchmarks.run`; edit benchmarks/report.py, not this "
        "file -->",
        "",
        "steerlab against the tools a user would pick instead, in one run on one machine, model",
        "and prompt set, as ratios of medians over interleaved repeats (each variant once untimed",
        "first). Peers: plain transformers without steering (the floor), nnsight running the",
        "seed's recipes, steering-vectors and repeng in their own virtual environments.",
        "",
        "## How to run",
        "",
        "```sh",
        "make bench                               # = .venv/bin/python -m benchmarks.run",
        "python -m benchmarks.run --quick         # small sizes, a few minutes",
        "python -m benchmarks.run --workloads extraction,generation --peers none",
        "python -m benchmarks.run --help          # every size is an option",
        "```",
        "",
        f"This report comes from: `{results.get('command')}` "
        f"({results.get('created')}, {results.get('wall_s')} s wall). Raw results: `{rel}`.",
        "",
        "## Method",
        "",
        "* Same model object, prompts and steering vectors for every tool; every tool's output is "
        "checked against steerlab's (activations to float tolerance, generated token ids "
        "exactly), so the timings compare the same computation.",
        "* Each variant runs once untimed (warm-up), then the variants of a workload are timed "
        "in rotating interleaved order (A B C, B C A, ...). The ratios are ratios of medians, "
        "as the targets ask; the ratio of the fastest runs and, for variants timed in the same "
        "rounds, the range of per-round ratios are given too, and a verdict whose threshold "
        "lies inside that range is flagged as within the machine's run-to-run noise.",
        "* Other processes: each timed run records the share of the CPUs other processes used "
        "during it (`/proc/stat` minus this process); a run above `--max-contention` is timed "
        "again (`--retries`), and each workload first waits (up to `--wait-quiet` s) for the "
        "machine to be quiet.",
        "* Overheads smaller than the noise are also measured directly: the time spent inside "
        "steerlab's steering hooks during one generation, and the time one extraction spends "
        "in steerlab's own code (everything outside the model's forward plus the capture "
        "hooks' reduction).",
        "* Steering semantics: steerlab and steering-vectors/repeng add the vector at every "
        "token; the nnsight seed recipe edits `h.output[:, -1, :]` at every step, which is "
        'steerlab\'s `positions="last"` (the token ids of the two are checked equal).',
        "* Peers run in their own venvs (`benchmarks/work/venvs/`, built on first use) with the "
        "same CPU torch; each also times plain transformers of its own venv (its floor). Their "
        "times come from another process at another moment, so they cannot be paired round by "
        "round: a few percent either way is noise; the notes give each tool's ratio to its own "
        "floor.",
        "",
        "## Machine",
        "",
        f"* CPU: {m.get('cpu')} ({m.get('logical_cpus')} logical CPUs, AVX-512: "
        f"{m.get('cpu_flags_avx512')}), {m.get('memory_gib')} GiB RAM; "
        f"torch threads: {m.get('torch_threads')}",
        f"* Python {m.get('python')}, torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}, nnsight {m.get('nnsight')}, steerlab {m.get('steerlab')}, "
        f"numpy {m.get('numpy')}",
        f"* {m.get('platform')}",
        f"* Load average (1/5/15 min) at start {results.get('load_average_start')}, at end "
        f"{results.get('load_average_end')}. Above the core count means other processes "
        "competed for the CPU; interleaving spreads that over all variants, but absolute "
        "seconds are then inflated.",
        "",
        "## Model and sizes",
        "",
        f"{model.get('name')} ({model.get('model_type')}, {model.get('n_layers')} layers, "
        f"d_model {model.get('d_model')}, {model.get('n_heads')} heads / "
        f"{model.get('n_kv_heads')} kv heads, {model.get('dtype')}, CPU).",
        "",
        f"Repeats {cfg.get('repeats')} (layer sweep and head scan: "
        f"{cfg.get('heavy_repeats')}; peers: {cfg.get('peer_repeats')}); extraction "
        f"{cfg.get('extract_prompts')} prompts in "
        f"batches of {cfg.get('extract_batch')}; generation batch {cfg.get('gen_batch')} x "
        f"{cfg.get('gen_tokens')} new tokens (greedy, EOS suppressed until the last token so "
        f"every tool generates the same number); strength sweep {cfg.get('sweep_strengths')} x "
        f"{cfg.get('sweep_prompts')} prompts; layer sweep all layers x "
        f"{cfg.get('layer_sweep_strengths')} x {cfg.get('layer_sweep_prompts')} prompts; head "
        f"scan all heads x {cfg.get('ablation_prompts')} prompts; memory at "
        f"{', '.join(str(n) for n in cfg.get('memory_sizes', ()))} prompts.",
        "",
        "## Targets",
        "",
        target_table(results.get("targets", [])),
        "",
    ]
    bounds = _bounds(results)
    if bounds:
        lines += [
            "### What prefix reuse can give at most",
            "",
            "Counting decoder-block passes (each block of each prompt batch costs about the "
            "same; the embedding and the last-position unembedding are small):",
            "",
            *bounds,
            "",
            "The measured speedups can exceed these counts because the one-at-a-time path also "
            "pays per-call costs (tokenising, installing hooks, smaller batches). Beyond them, "
            "prefix reuse cannot go: every configuration that steers all tokens at layer L must "
            "recompute blocks L.. for every token, and on a CPU that arithmetic is the time "
            "(see the profiles below: `linear` dominates). A 3x target needs less arithmetic "
            "per configuration, for example re-running only the last token over the clean "
            "run's key/value cache when the intervention touches only the last position.",
            "",
        ]
    lines += last_position_section()
    lines += ["## Workloads", ""]
    for workload, data in results.get("workloads", {}).items():
        lines += [f"### {_TITLES.get(workload, workload)}", ""]
        if data.get("status") not in (None, "ok"):
            lines += [f"**{data.get('status')}**: {data.get('reason', '')}", ""]
            continue
        if workload == "memory":
            lines += [_memory_table(data), ""]
            continue
        params = ", ".join(f"{k}={v}" for k, v in data.get("params", {}).items())
        lines += [f"Parameters: {params}. Wall time {data.get('wall_s')} s.", ""]
        lines += [_timing_table(data, _FLOORS.get(workload)), ""]
        if data.get("breakdown"):
            parts = ", ".join(f"{k} {v:.3f}" for k, v in data["breakdown"].items())
            lines += [f"One batched run, broken down: {parts}.", ""]
        checks = _checks(data)
        if checks:
            lines += [checks, ""]
    lines += ["## Peers in their own environments", "", *_peer_section(results), ""]
    profiles = results.get("profiles", {})
    if profiles:
        lines += ["## Profiles of missed targets", ""]
        for key, profile in profiles.items():
            lines += [_profile_block(key, profile), ""]
    server_results = ROOT / "benchmarks" / "results" / "server.json"
    if server_results.exists():  # the server benchmark (benchmarks/server.py) keeps its section
        from benchmarks.server import render as render_server

        lines += [render_server(json.loads(server_results.read_text())), ""]
    # the vLLM engine's section is measured by benchmarks/vllm_bench.py in its own venv
    vllm_section = Path(__file__).resolve().parent / "results" / "vllm.md"
    if vllm_section.is_file():
        lines += [vllm_section.read_text().rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


LAST_POSITION_RESULTS = Path(__file__).resolve().parent / "results" / "last_position.json"


def last_position_section(path: Path = LAST_POSITION_RESULTS) -> list[str]:
    """The section on last-position sweeps (``python -m benchmarks.last_position``), if run."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    med = data["medians"]
    layers = data["layers"]
    return [
        "### Last-position sweeps: re-running one token over the key/value cache",
        "",
        "When every configuration steers only the last prompt position (the seed's `[:, -1]`, "
        "CAA's answer token), nothing before that position can change, so `sweeps.sweep` "
        "(mode `prefix`, upgraded to `last`) runs the prompts once with a key/value cache and "
        "re-runs only the last token per configuration (`model.last_token_cache` / "
        "`model.run_last`). Counting token-block passes as above, one-at-a-time costs "
        "`configs x layers x T` for prompts of `T` tokens; the last-token path costs one clean "
        "pass `layers x T`, one exactness replay `layers x 1` and `configs x layers x 1`: at "
        f"most **{data['block_pass_bound']:.2f}x** here ({data['configs']} configurations = "
        f"{len(layers)} layers x {len(data['strengths'])} strengths, {data['prompts']} prompts "
        f"of {data['mean_prompt_tokens']:.1f} tokens on average; attention over the cache "
        "counted as free).",
        "",
        "| variant | median s | / last |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {value:.2f} | {value / med['last']:.2f} |" for name, value in med.items()],
        "",
        f"Measured: **{data['speedup_last_vs_one_at_a_time']:.2f}x** faster than one-at-a-time "
        f"(target >= 5x: **{'pass' if data['speedup_last_vs_one_at_a_time'] >= 5 else 'MISS'}**"
        f"), {data['speedup_last_vs_batched']:.2f}x faster than all configurations "
        "as rows of full passes. Exactness: one row (first prompt, layer "
        f"{layers[len(layers) // 2]}, strength {data['strengths'][-1]:g}) differs from the full "
        f"recomputation by {data['max_abs_diff_one_row_vs_full']:.2e} in the logits; the whole "
        f"behaviour grid from the naive sweep's by {data['max_abs_diff_grid_vs_naive']:.2e}.",
        *_last_position_precision(data),
        f"Run {data['when']} (`python -m benchmarks.last_position`, {data['repeats']} timed "
        f"repeat(s) after a warm-up, load average {data['load_average']}: a busy shared "
        "machine, so the seconds are inflated; the ratio is of runs interleaved in one "
        "process). Raw: `benchmarks/results/last_position.json`.",
        "",
    ]


def _last_position_precision(data: dict[str, Any]) -> list[str]:
    """What the fp32 difference means: the float64 replay and the fp32 floor, when measured."""
    if "max_abs_diff_one_row_vs_full_float64" not in data:
        return []
    f64 = data["max_abs_diff_one_row_vs_full_float64"]
    return [
        "That fp32 difference is rounding, not approximation: the same full pass with the row "
        "batched beside the others instead of alone already differs by "
        f"{data['fp32_floor_batched_vs_solo_full']:.2e}, and with the model in float64 the "
        f"one-row check gives {f64:.1e} (target <= 1e-5: **{'pass' if f64 <= 1e-5 else 'MISS'}"
        "**; logits are returned as float32, so 0 means equal to the last float32 bit). ",
    ]


def _memory_table(data: dict[str, Any]) -> str:
    lines = [
        "Each size in a fresh process; peak = `VmHWM` after resetting it post-load.",
        "",
        "| prompts | layers | seconds | RSS before MiB | peak MiB | activations MiB | "
        "overhead MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in data.get("rows", []):
        if "error" in row:
            lines.append(f"| {row['n_prompts']} | error: {row['error'][-200:]} | | | | | |")
            continue
        mib = 2**20
        lines.append(
            f"| {row['n_prompts']} | {row['n_layers']} | {row['seconds']:.1f} | "
            f"{row['rss_before_bytes'] / mib:.0f} | {row['peak_rss_bytes'] / mib:.0f} | "
            f"{row['result_bytes'] / mib:.0f} | {row['overhead_bytes'] / mib:.0f} |"
        )
    return "\n".join(lines)
