"""Last-position sweep: one-at-a-time vs re-running only the last token over the KV cache.

A layer x strength sweep whose steering touches only the last prompt position (the seed's
``[:, -1]``, CAA's answer token) is timed three ways on the default model, interleaved:

* ``one_at_a_time``: ``sweeps.sweep(mode="naive")``, one full forward pass per configuration;
* ``batched``: all configurations as rows of full forward passes (``mode="batched"``), which
  recomputes every block for every token;
* ``last``: ``sweeps.sweep`` default, which re-runs one token per prompt and configuration over
  the clean run's key/value cache.

Exactness is checked on one row against the full recomputation (the naive sweep's numbers).
Results go to ``benchmarks/results/last_position.json``; ``docs/benchmarks.md`` cites them.

    python -m benchmarks.last_position --prompts 16 --layer-step 3 --strengths 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def block_pass_bound(n_layers: int, configs: int, tokens: float) -> float:
    """Token-block passes one-at-a-time over those of the last-token path.

    One-at-a-time: ``configs`` full passes of ``tokens`` tokens through ``n_layers`` blocks.
    Last-token path: one clean pass, one exactness replay of one token, then one token per
    configuration (attention over the cache is counted as free; it is a small share at these
    lengths).

    >>> round(block_pass_bound(30, 20, 12.0), 2)
    7.27
    """
    one_at_a_time = configs * n_layers * tokens
    fast = n_layers * tokens + n_layers + configs * n_layers
    return one_at_a_time / fast


def _float64_row_diff(model: Any, prompts: list[str], vector: Any, strength: float) -> float:
    """The one-row check in float64, where rounding cannot hide a wrong algorithm: the
    last-token path must equal the full pass to ~1e-12, not just to fp32's ~1e-5."""
    import steerlab as sl

    model.hf_model.to(torch.float64)
    try:
        steering = sl.Steering(vector, strength, "last")
        full = model.next_token_logits(prompts[:1], steering=steering)
        fast = model.run_last(model.last_token_cache(prompts), steering=[steering] * len(prompts))
        return float((fast[0].double() - full[0].double()).abs().max())
    finally:
        model.hf_model.to(torch.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--layer-step", type=int, default=3)
    parser.add_argument("--strengths", type=int, default=4, help="non-zero strengths")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/last_position.json"))
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    import steerlab as sl
    from benchmarks.common import metric_token_ids, text_prompts
    from steerlab.evaluation import NextTokenTask
    from steerlab.sweeps import sweep

    model = sl.load_model()
    prompts = text_prompts(args.prompts)
    pos, neg = metric_token_ids(model.tokenizer)
    task = NextTokenTask(
        tuple(prompts), "logprob_diff", {"target_ids": tuple(pos), "contrast_ids": tuple(neg)}
    )
    layers = list(range(0, model.n_layers, args.layer_step))
    gen = torch.Generator().manual_seed(0)
    vector = sl.SteeringVector(
        {layer: torch.randn(model.d_model, generator=gen) for layer in layers}
    )
    strengths = [float(s) for s in torch.linspace(-8, 8, args.strengths).tolist()]

    def run(mode: str) -> Any:
        return sweep(
            model, vector, behaviour=task, layers=layers, strengths=strengths,
            positions="last", mode=mode, progress=False,
        )  # fmt: skip

    variants = {"one_at_a_time": "naive", "batched": "batched", "last": "prefix"}
    results = {name: run(mode) for name, mode in variants.items()}  # warm-up and numbers
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            run(variants[name])
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) for name, v in times.items()}
    # one row (the first prompt at one configuration) against the full recomputation
    layer, strength = layers[len(layers) // 2], strengths[-1]
    steered = model.next_token_logits(
        prompts[:1], steering=sl.Steering(vector.select([layer]), strength, "last")
    )
    fast_rows = model.run_last(
        model.last_token_cache(prompts),
        steering=[sl.Steering(vector.select([layer]), strength, "last")] * len(prompts),
    )
    row_diff = float((fast_rows[0] - steered[0]).abs().max())
    # fp32 rounding alone: the same full pass, the row batched with the others vs solo
    batched_full = model.next_token_logits(
        prompts, steering=sl.Steering(vector.select([layer]), strength, "last")
    )
    fp32_floor = float((batched_full[0] - steered[0]).abs().max())
    fp64_diff = _float64_row_diff(model, prompts, vector.select([layer]), strength)
    grid_diff = float(
        (results["last"].behaviour_scores - results["one_at_a_time"].behaviour_scores).abs().max()
    )
    tokens = sum(len(model.tokenizer(p)["input_ids"]) for p in prompts) / len(prompts)
    configs = len(layers) * len(strengths)
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": "SmolLM2-135M-Instruct",
        "n_layers": model.n_layers,
        "prompts": len(prompts),
        "mean_prompt_tokens": tokens,
        "layers": layers,
        "strengths": strengths,
        "configs": configs,
        "repeats": args.repeats,
        "times": times,
        "medians": medians,
        "speedup_last_vs_one_at_a_time": medians["one_at_a_time"] / medians["last"],
        "speedup_last_vs_batched": medians["batched"] / medians["last"],
        "block_pass_bound": block_pass_bound(model.n_layers, configs, tokens),
        "mode_used": results["last"].mode,
        "max_abs_diff_one_row_vs_full": row_diff,
        "max_abs_diff_grid_vs_naive": grid_diff,
        "fp32_floor_batched_vs_solo_full": fp32_floor,
        "max_abs_diff_one_row_vs_full_float64": fp64_diff,
        "load_average": list(__import__("os").getloadavg()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
