"""Peak memory of ``SteeredModel.activations`` as the number of prompts grows (workload 6).

Each size runs in a fresh subprocess (``python -m benchmarks.memory --n N ...``) so one size's
allocations cannot hide another's. Inside, after loading the model and one small warm-up
extraction, the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs`` resets
``VmHWM``), the extraction runs, and ``VmHWM`` is read back: the peak resident memory *of the
extraction itself*, not of loading the model. Where ``clear_refs`` is not writable the probe falls
back to ``ru_maxrss`` and says so.

The returned activations are part of any extraction's memory (``n x layers x d_model`` floats), so
the probe reports ``result_bytes`` and ``overhead_bytes = peak - rss_before - result_bytes``:
what extraction needs beyond its own answer. That overhead must not grow with ``n``.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import short_prompts


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def load_model(spec: str) -> Any:
    """``"default"``, a model folder, or ``"tiny:<arch>"`` (steerlab's tiny random models)."""
    import steerlab as sl

    if spec.startswith("tiny:"):
        from steerlab.testing import tiny_model

        return tiny_model(spec.split(":", 1)[1])
    return sl.load_model(None if spec == "default" else spec)


def measure(
    model: Any, n: int, *, layers: list[int] | None, batch_size: int, seed: int = 2
) -> dict[str, Any]:
    """Extract last-token activations of ``n`` prompts and report the peak RSS it took."""
    prompts = short_prompts(n, seed=seed)
    model.activations(
        prompts[: min(n, batch_size)], layers=layers, batch_size=batch_size, progress=False
    )
    gc.collect()
    exact = _reset_peak()
    before = _status_kib("VmRSS") or 0
    start = time.perf_counter()
    acts = model.activations(prompts, layers=layers, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") if exact else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result_bytes = sum(t.numel() * t.element_size() for t in acts.values())
    return {
        "n_prompts": n,
        "n_layers": len(acts),
        "batch_size": batch_size,
        "seconds": seconds,
        "rss_before_bytes": before * 1024,
        "peak_rss_bytes": peak * 1024,
        "result_bytes": result_bytes,
        "overhead_bytes": peak * 1024 - before * 1024 - result_bytes,
        "peak_method": "VmHWM after clear_refs" if exact else "ru_maxrss (includes model load)",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="default, a folder, or tiny:<arch>")
    parser.add_argument("--n", type=int, required=True, help="number of prompts")
    parser.add_argument("--layers", default="all", help="'all' or comma-separated layers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    print(json.dumps(measure(model, args.n, layers=layers, batch_size=args.batch_size)))


if __name__ == "__main__":
    main()
