"""vLLM engine benchmarks: steered vs unsteered vLLM, vLLM vs steerlab's torch engine.

Run from ``.venv-vllm`` (``make vllm``)::

    VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python -m benchmarks.vllm_bench --out out.json

Every figure is greedy decoding of exactly ``--new`` tokens per request (``ignore_eos``), fp32,
on the default model, vLLM compiled (its default; ``--eager`` for eager mode). Within one run
the variants are interleaved round by round and the median of ``--rounds`` is kept, so the
ratios compare like with like on a shared machine.

* ``offline``: ``llm.generate`` on N prompts at once (N = 1, 8, 32): vLLM as it comes (an
  engine started without steerlab's plugin, ``VLLM_PLUGINS=""``), then one engine with the
  plugin: unsteered and the same batch with 8 different steering configs (4 layers each,
  positions alternating ``all``/``last``); one engine alive at a time (plain, plugin, plain
  again; see :func:`offline_vllm`), the plugin engine's two variants interleaved; and
  steerlab's ``model.generate`` on the same prompts (batched, KV cache; ``--skip-torch``).
* ``clients``: C concurrent clients (threads) each sending one request through the server's
  engine interface (``VLLMEngine`` vs ``TorchEngine``), steered with 8 different configs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import steerlab as sl

SUBJECTS = [
    "The movie",
    "The new restaurant downtown",
    "This book",
    "The weather this weekend",
    "Our trip to the coast",
    "The concert last night",
    "My first day at the new job",
    "The hotel room",
]


def prompts(n: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]} (review {i}) was" for i in range(n)]


def configs(model: sl.SteeredModel) -> list[sl.Steering]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        vec = sl.SteeringVector(
            {layer: torch.randn(model.d_model, generator=gen) / 2 for layer in (6, 10, 14, 18)}
        )
        out.append(sl.Steering(vec, strength=2.0 + i, positions="all" if i % 2 else "last"))
    return out


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def offline_vllm(
    load: Callable[[bool], Any], model: sl.SteeredModel, sizes: list[int], new: int, rounds: int
) -> Any:
    """Seconds per batch size: vLLM without the plugin (``vllm``), and an engine with it,
    unsteered (``vllm_plugin``) and steered with 8 configs (``vllm_steered``).

    One engine is alive at a time, in three phases: plain, plugin, plain again. Two engines
    alive at once time each other's idle polling (a vLLM worker busy-polls its queue for a
    second after each step, on the core the other engine's worker is bound to): measured that
    way the plugin engine, unsteered, came out at 0.94x plain at batch 1, and alone at 1.00x.
    Within the plugin phase, unsteered and steered rounds are interleaved; the plain figure is
    the median over both plain phases, and each phase's median is kept to show the drift.
    """
    plain_first = _vllm_phase(load(False), model, sizes, new, rounds, steered=False)
    plugin = _vllm_phase(load(True), model, sizes, new, rounds, steered=True)
    plain_last = _vllm_phase(load(False), model, sizes, new, rounds, steered=False)
    out = {}
    for n in sizes:
        pooled = plain_first[n]["vllm"] + plain_last[n]["vllm"]
        out[n] = {
            "vllm": statistics.median(pooled),
            "vllm_plugin": statistics.median(plugin[n]["vllm_plugin"]),
            "vllm_steered": statistics.median(plugin[n]["vllm_steered"]),
            "vllm_phases": [
                statistics.median(plain_first[n]["vllm"]),
                statistics.median(plain_last[n]["vllm"]),
            ],
        }
        print(json.dumps({"batch": n, "seconds": out[n]}), flush=True)
    return out


def _vllm_phase(
    llm: Any, model: sl.SteeredModel, sizes: list[int], new: int, rounds: int, *, steered: bool
) -> dict[int, dict[str, list[float]]]:
    """All rounds of one engine (then shut down): per size, seconds of each round per variant."""
    import vllm
    from vllm.inputs import TokensPrompt

    from steerlab.vllm.spec import EXTRA_ARGS_KEY, to_wire

    steers = configs(model)
    tok = llm.get_tokenizer()

    def runs(n: int) -> dict[str, Callable[[], Any]]:
        reqs = [TokensPrompt(prompt_token_ids=tok(p)["input_ids"]) for p in prompts(n)]
        plain = vllm.SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        if not steered:
            return {"vllm": functools.partial(llm.generate, reqs, plain, use_tqdm=False)}
        params = [
            vllm.SamplingParams(
                temperature=0.0,
                max_tokens=new,
                ignore_eos=True,
                extra_args={EXTRA_ARGS_KEY: to_wire([steers[i % 8]])},
            )
            for i in range(n)
        ]
        return {
            "vllm_plugin": functools.partial(llm.generate, reqs, plain, use_tqdm=False),
            "vllm_steered": functools.partial(llm.generate, reqs, params, use_tqdm=False),
        }

    try:
        return {n: _round_times(runs(n), rounds) for n in sizes}
    finally:
        llm.llm_engine.engine_core.shutdown()


def offline_torch(model: sl.SteeredModel, sizes: list[int], new: int, rounds: int) -> Any:
    """Seconds per batch size: steerlab's torch generate, unsteered and with the same 8 configs."""
    steers = configs(model)

    def runs(n: int) -> dict[str, Callable[[], Any]]:
        items = prompts(n)
        steering = [steers[i % 8] for i in range(n)]
        return {
            "torch": functools.partial(_torch_generate, model, items, None, new),
            "torch_steered": functools.partial(_torch_generate, model, items, steering, new),
        }

    return _timed_rows(runs, sizes, rounds)


def _timed_rows(
    make_runs: Callable[[int], dict[str, Callable[[], Any]]], sizes: list[int], rounds: int
) -> dict[int, dict[str, float]]:
    """Median seconds per variant and size (see :func:`_round_times`)."""
    out: dict[int, dict[str, float]] = {}
    for n in sizes:
        times = _round_times(make_runs(n), rounds)
        out[n] = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({"batch": n, "seconds": out[n]}), flush=True)
    return out


def _round_times(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each round per variant: one warm-up each, then rounds in rotating order."""
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(runs[name]))
    return times


def offline_rows(seconds: dict[int, dict[str, Any]], new: int) -> list[dict[str, Any]]:
    """The offline table's rows from both engines' medians."""
    rows = []
    for n, med in sorted(seconds.items()):
        phases = med.get("vllm_phases", [])
        rows.append(
            {
                "batch": n,
                "tokens": n * new,
                "seconds": med,
                "tokens_per_s": {
                    k: n * new / v for k, v in med.items() if isinstance(v, (int, float))
                },
                # plain vLLM in the phase before and after the plugin engine's
                "vllm_phases_tokens_per_s": [n * new / v for v in phases],
                # tokens/s ratios against vLLM as it comes (target: steered >= 0.95)
                "steered_vs_default": med["vllm"] / med["vllm_steered"],
                "plugin_vs_default": med["vllm"] / med["vllm_plugin"],
                "steered_vs_plugin": med["vllm_plugin"] / med["vllm_steered"],
                **(
                    {"torch_steered_over_unsteered": med["torch_steered"] / med["torch"]}
                    if "torch" in med
                    else {}
                ),
            }
        )
    return rows


def _torch_generate(
    model: sl.SteeredModel, items: list[str], steering: list[Any] | None, new: int
) -> Any:
    # exactly `new` tokens per row (EOS ignored), per-row steering, as vLLM's ignore_eos runs
    import contextlib

    batch = model.encode(items)
    scope = model.steer(steering) if steering else contextlib.nullcontext()
    with scope, torch.no_grad():
        return model.hf_model.generate(  # type: ignore[operator]
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=model.pad_token_id,
        )


def clients(engines: dict[str, Any], model: sl.SteeredModel, counts: list[int], new: int) -> Any:
    from steerlab.server.engine import GenerationRequest, SteeringEntry

    rows = []
    for c in counts:
        row: dict[str, Any] = {"clients": c}
        for name, engine in engines.items():
            reqs = [
                GenerationRequest(
                    prompt=p,
                    max_tokens=new,
                    temperature=0.0,
                    steering=(SteeringEntry(f"cfg{i % 8}", 1.0, "all" if i % 2 else "last"),),
                )
                for i, p in enumerate(prompts(c))
            ]

            def one(req: Any, engine: Any = engine) -> tuple[float, int]:
                start = time.perf_counter()
                n = sum(1 for e in engine.submit(req) if e.token_id >= 0)
                return time.perf_counter() - start, n

            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                done = list(pool.map(one, reqs))
            wall = time.perf_counter() - start
            lat = sorted(d for d, _ in done)
            row[name] = {
                "tokens_per_s": sum(n for _, n in done) / wall,
                "p50_s": lat[len(lat) // 2],
                "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,8,32")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-clients", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--eager", action="store_true", help="vLLM in eager mode")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--render", action="store_true", help="write results/vllm.{json,md} and the doc section"
    )
    parser.add_argument(
        "--from-json", type=Path, default=None, help="only render (with --render) a saved run"
    )
    args = parser.parse_args()
    if args.from_json:
        publish(json.loads(args.from_json.read_text()))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))

    import steerlab.vllm as slv

    model = sl.load_model()
    results: dict[str, Any] = {
        "new_tokens": args.new,
        "threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
        "command": "python -m benchmarks.vllm_bench " + " ".join(sys.argv[1:]),
        # vLLM-CPU binds its worker's OpenMP threads to cores (and may reserve one for the
        # front end): how many cores each engine computes on is part of the result
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("VLLM_", "OMP_"))},
    }
    # One engine alive at a time: an idle vLLM engine core keeps its CPU threads busy, so a
    # torch measurement beside it would time the contention, not the engine.
    sizes = [int(x) for x in args.sizes.split(",")]
    # torch first: a vLLM engine process can still be winding down after shutdown, and the
    # torch rows measured then came out up to 3x slow at batch 1
    seconds: dict[int, dict[str, Any]] = (
        {n: {} for n in sizes}
        if args.skip_torch
        else offline_torch(model, sizes, args.new, args.rounds)
    )
    results["eager"] = args.eager
    options = {"max_model_len": 512, "max_num_seqs": 64, "seed": 0, "enforce_eager": args.eager}

    def load(plugin: bool) -> Any:
        if plugin:
            return slv.load(**options)
        # vLLM as it comes: its engine processes load no plugin (they inherit VLLM_PLUGINS)
        os.environ["VLLM_PLUGINS"] = ""
        try:
            return slv.load(**options)
        finally:
            del os.environ["VLLM_PLUGINS"]

    for n, med in offline_vllm(load, model, sizes, args.new, args.rounds).items():
        seconds[n].update(med)
    results["offline"] = offline_rows(seconds, args.new)
    if not args.skip_clients:
        from steerlab.server.engine import TorchEngine
        from steerlab.vllm.engine import VLLMEngine

        counts = [int(x) for x in args.clients.split(",")]
        per_engine: dict[str, list[dict[str, Any]]] = {}
        for name in ("torch", "vllm"):
            engine: Any = (
                VLLMEngine(dtype="float32", max_model_len=512, max_num_seqs=64, seed=0)
                if name == "vllm"
                else TorchEngine(model, max_batch=64)
            )
            for i, steer in enumerate(configs(model)):
                engine.vectors.register(
                    f"cfg{i}",
                    steer.vector.scaled(float(steer.strength)),  # type: ignore[arg-type]
                )
            engine.start()
            try:
                per_engine[name] = clients({name: engine}, model, counts, args.new)
            finally:
                engine.shutdown()
        results["clients"] = [
            {"clients": c, "vllm": v["vllm"], "torch": t["torch"]}
            for c, v, t in zip(counts, per_engine["vllm"], per_engine["torch"], strict=True)
        ]
    results["load_average_end"] = list(os.getloadavg())
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    if args.render:
        publish(results)


SECTION_TITLE = "## vLLM engine"
RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parent.parent / "docs"
PLOT = "vllm_throughput.png"


def publish(results: dict[str, Any]) -> None:
    """Write results/vllm.{json,md}, the throughput plot and the section of docs/benchmarks.md."""
    section = render(results)
    (RESULTS / "vllm.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "vllm.md").write_text(section)
    plot(results, DOCS / PLOT)
    doc = DOCS / "benchmarks.md"
    body = doc.read_text()
    doc.write_text(replace_section(body, section))


def replace_section(body: str, section: str) -> str:
    r"""``body`` with its ``## vLLM engine`` section (up to the next ``## `` heading or marker
    line) replaced by ``section``, or ``section`` appended; the sections after it stay.

    >>> replace_section("# R\n\n## vLLM engine\nold\n\n## Next\nkept\n", "## vLLM engine\nnew\n")
    '# R\n\n## vLLM engine\nnew\n\n## Next\nkept\n'
    """
    cut = body.find(SECTION_TITLE)
    if cut < 0:
        return body.rstrip() + "\n\n" + section
    ends = [
        i + 1
        for marker in ("\n## ", "\n<!-- ")
        if (i := body.find(marker, cut + len(SECTION_TITLE))) >= 0
    ]
    rest = body[min(ends) :] if ends else ""
    return body[:cut] + section + ("\n" + rest if rest else "")


def plot(results: dict[str, Any], path: Path) -> None:
    """Tokens per second against batch size (offline) and concurrent clients (engines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("offline", "batch", "requests in one offline batch")]
    if results.get("clients"):
        panels.append(("clients", "clients", "concurrent clients (engine interface)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, x_key, xlabel) in zip(axes[0], panels, strict=True):
        rows = results[key]
        xs = [row[x_key] for row in rows]
        names = (
            list(rows[0]["tokens_per_s"])
            if key == "offline"
            else [k for k in rows[0] if k != "clients"]
        )
        for name in names:
            ys = [
                row["tokens_per_s"][name] if key == "offline" else row[name]["tokens_per_s"]
                for row in rows
            ]
            ax.plot(xs, ys, marker="o", label=name.replace("_", " "))
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("generated tokens / s")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"vLLM-CPU vs steerlab's torch engine, {results['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load(values: list[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def render(results: dict[str, Any]) -> str:
    """The markdown section for docs/benchmarks.md."""
    new = results["new_tokens"]
    lines = [
        SECTION_TITLE,
        "",
        "Measured by `benchmarks/vllm_bench.py` in `.venv-vllm` (vllm-cpu 0.32.0, fp32, "
        + ("eager mode" if results.get("eager") else "compiled, vLLM's default")
        + f", greedy, exactly {new} new tokens per request, default model). Load average at "
        f"start {_load(results['load_average_start'])}, at end "
        f"{_load(results['load_average_end'])} on {os.cpu_count()} CPUs ("
        + (
            "above the CPU count: other processes competed"
            if max(results["load_average_start"][0], results["load_average_end"][0])
            > (os.cpu_count() or 1) + 0.5
            else "a quiet machine"
        )
        + "; ratios from rounds interleaved in rotating order, medians). Command: "
        f"`{results['command']}`"
        + (
            " with " + ", ".join(f"`{k}={v}`" for k, v in results["env"].items())
            if results.get("env")
            else ""
        )
        + f"; torch used {results['threads']} thread(s).",
        "",
        "### Offline batches: steered vLLM vs vLLM as it comes",
        "",
        'Default: vLLM without steerlab (an engine started with `VLLM_PLUGINS=""`). Plugin: '
        "an engine with steerlab's plugin, unsteered requests. Steered: the same engine, 8 "
        "different configurations (4 layers each, positions alternating `last`/`all`) spread "
        "over the batch. One engine is alive at a time, in three phases: plain, plugin, "
        "plain again (two live engines time each other's idle polling: a vLLM worker "
        "busy-polls for a second after each step). Plugin and steered rounds interleave "
        "within the plugin phase; the default figure is the median over both plain phases, "
        "whose own medians are shown to bound the drift. "
        + (
            "Torch: `model.generate`-equivalent with per-row steering (HF generate under "
            "`model.steer([...])`, KV cache), measured before the vLLM engines start."
            if "torch" in results["offline"][0]["tokens_per_s"]
            else "Torch: not measured in this run (`--skip-torch`)."
        ),
        "",
        "| batch | default vLLM tok/s (phase 1 / 3) | plugin tok/s | steered tok/s | "
        "steered / default (target >= 0.95) | plugin / default | steered / plugin | "
        "torch tok/s | torch steered tok/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["offline"]:
        tps = row["tokens_per_s"]
        ratio = row["steered_vs_default"]
        phases = " / ".join(f"{v:.1f}" for v in row.get("vllm_phases_tokens_per_s", []))
        lines.append(
            f"| {row['batch']} | {tps['vllm']:.1f}" + (f" ({phases})" if phases else "") + " | "
            f"{tps['vllm_plugin']:.1f} | "
            f"{tps['vllm_steered']:.1f} | {ratio:.3f} ({'pass' if ratio >= 0.95 else 'MISS'}) | "
            f"{row['plugin_vs_default']:.3f} | "
            + (f"{row['steered_vs_plugin']:.3f} | " if "steered_vs_plugin" in row else "– | ")
            + " | ".join(f"{tps[k]:.1f}" if k in tps else "–" for k in ("torch", "torch_steered"))
            + " |"
        )
    worst = min(row["steered_vs_default"] for row in results["offline"])
    lines += [
        "",
        f"Reading: steered vLLM runs at {worst:.3f}x or more of the tokens/s of vLLM as it "
        f"comes (target >= 0.95: {'met' if worst >= 0.95 else 'missed'} at every batch size"
        + ("" if worst >= 0.95 else " only where the column says pass")
        + "). On a CPU and a 135M model the engines are close, and vLLM's worth is scale "
        "(tensor/pipeline parallelism, paged KV cache), not single-machine speed. vLLM-CPU's "
        "automatic thread binding reserves one of the 2 cores for its front end, while torch "
        "computes on both.",
        "",
        f"![tokens per second against load]({PLOT})",
    ]
    if results.get("clients"):
        lines += [
            "",
            "### Concurrent clients through the server's engine interface",
            "",
            "Each client sends one steered request (8 configurations) and reads its token "
            "stream; `VLLMEngine` vs `TorchEngine` (continuous batching), HTTP layer excluded.",
            "",
            "| clients | vLLM tok/s | vLLM p50 / p95 s | torch tok/s | torch p50 / p95 s |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in results["clients"]:
            v, t = row["vllm"], row["torch"]
            lines.append(
                f"| {row['clients']} | {v['tokens_per_s']:.1f} | {v['p50_s']:.2f} / "
                f"{v['p95_s']:.2f} | {t['tokens_per_s']:.1f} | {t['p50_s']:.2f} / "
                f"{t['p95_s']:.2f} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
