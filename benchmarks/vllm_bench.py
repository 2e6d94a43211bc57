"""vLLM engine benchmarks: steered vs unsteered vLLM, vLLM vs steerlab's torch engine.

Run from ``.venv-vllm`` (``make vllm``)::

    VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python -m benchmarks.vllm_bench --out out.json

Every figure is greedy decoding of exactly ``--new`` tokens per request (``ignore_eos``), fp32,
eager mode, on the default model. Within one run the variants are interleaved round by round and
the median of ``--rounds`` is kept, so the ratios compare like with like on a shared machine.

* ``offline``: ``llm.generate`` on N prompts at once (N = 1, 8, 32): unsteered, the same batch
  with 8 different steering configs (4 layers each, positions alternating ``all``/``last``),
  and steerlab's ``model.generate`` on the same prompts (batched, KV cache).
* ``clients``: C concurrent clients (threads) each sending one request through the server's
  engine interface (``VLLMEngine`` vs ``TorchEngine``), steered with 8 different configs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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


def offline(llm: Any, model: sl.SteeredModel, sizes: list[int], new: int, rounds: int) -> Any:
    import vllm
    from vllm.inputs import TokensPrompt

    import steerlab.vllm as slv
    from steerlab.vllm.spec import EXTRA_ARGS_KEY, to_wire

    steers = configs(model)
    tok = llm.get_tokenizer()
    rows = []
    for n in sizes:
        items = prompts(n)
        reqs = [TokensPrompt(prompt_token_ids=tok(p)["input_ids"]) for p in items]
        plain = vllm.SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        steered = [
            vllm.SamplingParams(
                temperature=0.0,
                max_tokens=new,
                ignore_eos=True,
                extra_args={EXTRA_ARGS_KEY: to_wire([steers[i % 8]])},
            )
            for i in range(n)
        ]
        assert slv.EXTRA_ARGS_KEY == EXTRA_ARGS_KEY
        times: dict[str, list[float]] = {"vllm": [], "vllm_steered": [], "torch_steered": []}
        llm.generate(reqs, plain, use_tqdm=False)  # warm-up
        for _ in range(rounds):
            times["vllm"].append(timed(llm.generate, reqs, plain, use_tqdm=False))
            times["vllm_steered"].append(timed(llm.generate, reqs, steered, use_tqdm=False))
            steering = [steers[i % 8] for i in range(n)]
            times["torch_steered"].append(timed(_torch_generate, model, items, steering, new))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "batch": n,
                "tokens": n * new,
                "seconds": med,
                "tokens_per_s": {k: n * new / v for k, v in med.items()},
                "steered_over_unsteered": med["vllm_steered"] / med["vllm"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _torch_generate(model: sl.SteeredModel, items: list[str], steering: list[Any], new: int) -> Any:
    # exactly `new` tokens per row (EOS ignored), per-row steering, as vLLM's ignore_eos runs
    batch = model.encode(items)
    with model.steer(steering), torch.no_grad():
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
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--render", action="store_true", help="write results/vllm.{json,md} and the doc section"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    import steerlab.vllm as slv

    model = sl.load_model()
    results: dict[str, Any] = {
        "new_tokens": args.new,
        "threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
        "command": "python -m benchmarks.vllm_bench " + " ".join(sys.argv[1:]),
    }
    llm = slv.load(max_model_len=512, max_num_seqs=64, seed=0)
    results["offline"] = offline(
        llm, model, [int(x) for x in args.sizes.split(",")], args.new, args.rounds
    )
    llm.llm_engine.engine_core.shutdown()
    del llm
    if not args.skip_clients:
        from steerlab.server.engine import TorchEngine
        from steerlab.vllm.engine import VLLMEngine

        vengine = VLLMEngine(dtype="float32", max_model_len=512, max_num_seqs=64, seed=0)
        tengine = TorchEngine(model, max_batch=64)
        for i, steer in enumerate(configs(model)):
            scaled = steer.vector.scaled(float(steer.strength))  # type: ignore[arg-type]
            vengine.vectors.register(f"cfg{i}", scaled)
            tengine.vectors.register(f"cfg{i}", scaled)
        vengine.start()
        tengine.start()
        try:
            results["clients"] = clients(
                {"vllm": vengine, "torch": tengine},
                model,
                [int(x) for x in args.clients.split(",")],
                args.new,
            )
        finally:
            vengine.shutdown()
            tengine.shutdown()
    results["load_average_end"] = list(os.getloadavg())
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    if args.render:
        section = render(results)
        (RESULTS / "vllm.json").write_text(text)
        (RESULTS / "vllm.md").write_text(section)
        doc = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
        body = doc.read_text()
        cut = body.find(SECTION_TITLE)
        doc.write_text((body[:cut] if cut >= 0 else body.rstrip() + "\n\n") + section)


SECTION_TITLE = "## vLLM engine"
RESULTS = Path(__file__).resolve().parent / "results"


def render(results: dict[str, Any]) -> str:
    """The markdown section for docs/benchmarks.md."""
    new = results["new_tokens"]
    lines = [
        SECTION_TITLE,
        "",
        "Measured by `benchmarks/vllm_bench.py` in `.venv-vllm` (vllm-cpu 0.32.0, fp32, eager "
        f"mode, greedy, exactly {new} new tokens per request, default model). Load average at "
        f"start {results['load_average_start']}, at end {results['load_average_end']} on "
        f"{os.cpu_count()} CPUs (above the CPU count, other processes competed; ratios from "
        "interleaved rounds, medians). Command: "
        f"`{results['command']}`.",
        "",
        "### Offline batches: steered vs unsteered vLLM, and the torch engine",
        "",
        "Steered: 8 different configurations (4 layers each, positions alternating "
        "`last`/`all`) spread over the batch. Torch: `model.generate`-equivalent with per-row "
        "steering (HF generate under `model.steer([...])`, KV cache).",
        "",
        "| batch | vLLM tok/s | vLLM steered tok/s | steered / unsteered time "
        "| torch steered tok/s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["offline"]:
        tps = row["tokens_per_s"]
        lines.append(
            f"| {row['batch']} | {tps['vllm']:.1f} | {tps['vllm_steered']:.1f} | "
            f"{row['steered_over_unsteered']:.3f} | {tps['torch_steered']:.1f} |"
        )
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
