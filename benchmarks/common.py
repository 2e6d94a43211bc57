"""Shared pieces of the benchmark harness: prompts, timing, machine description, metric tokens.

Everything here is deterministic (fixed seeds, fixed word lists), so two runs of the suite time
exactly the same inputs, and the peer drivers receive the very prompts the in-process tools use.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA = "steerlab-bench/1"
ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent

# --- prompts -------------------------------------------------------------------------------------
_SUBJECTS = (
    "The movie",
    "The new restaurant downtown",
    "This book",
    "The weather this weekend",
    "Our trip to the coast",
    "The concert last night",
    "My first day at the new job",
    "The hotel room",
    "The customer service",
    "Her latest song",
    "The train ride home",
    "The museum exhibition",
    "The coffee at this place",
    "My neighbour's garden",
    "The football match",
    "The final exam",
    "The software update",
    "The birthday party",
    "The view from the hill",
    "The city council meeting",
    "The documentary about whales",
    "His new haircut",
    "The dinner my friend cooked",
    "The flight to Tokyo",
)
_VERBS = ("was", "felt", "seemed", "turned out to be", "is honestly", "looked")
_ADJECTIVES = (
    "wonderful",
    "terrible",
    "surprisingly good",
    "quite boring",
    "absolutely amazing",
    "a complete disaster",
    "pleasant enough",
    "awful",
    "delightful",
    "disappointing",
    "fantastic",
    "dreadful",
    "lovely",
    "painfully slow",
    "excellent",
    "sad",
)
_TAILS = (
    ".",
    ", and I think that",
    " so I told my friend",
    ", which means",
    "! Next time",
    " and everyone agreed that",
    ". In the end",
    " because",
)

POSITIVE_EXAMPLES = (
    "I love this! It's fantastic",
    "This is wonderful and amazing",
    "I'm so happy about this",
    "What a delightful, lovely day",
    "The food was excellent and the staff were kind",
    "Best concert I have ever been to",
    "I feel great, everything went well",
    "Such a beautiful and joyful story",
)
NEGATIVE_EXAMPLES = (
    "I hate this! It's terrible",
    "This is awful and horrible",
    "I'm so sad about this",
    "What a dreadful, miserable day",
    "The food was disgusting and the staff were rude",
    "Worst concert I have ever been to",
    "I feel awful, everything went wrong",
    "Such an ugly and painful story",
)
# Next-token behaviour metric: log-odds of a positive over a negative sentiment continuation.
POSITIVE_WORDS = (" good", " great", " wonderful", " amazing", " excellent", " lovely", " happy")
NEGATIVE_WORDS = (" bad", " terrible", " awful", " horrible", " boring", " poor", " sad")


def text_prompts(n: int, *, seed: int = 0) -> list[str]:
    """``n`` short review-like sentences (about 8-16 tokens), deterministic for a seed."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ADJECTIVES)}"
        f"{rng.choice(_TAILS)}"
        for _ in range(n)
    ]


def short_prompts(n: int, *, seed: int = 2) -> list[str]:
    """``n`` short prompts (about 3-8 tokens), deterministic for a seed."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)}" for _ in range(n)]


def open_prompts(n: int, *, seed: int = 1) -> list[str]:
    """``n`` prompts that stop right before an evaluative word (for next-token metrics)."""
    rng = random.Random(seed)
    combos = [f"{s} {v}" for s in _SUBJECTS for v in _VERBS]
    rng.shuffle(combos)
    return [combos[i % len(combos)] for i in range(n)]


def first_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The first token id of each word (leading space kept), de-duplicated, unknowns dropped."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out: list[int] = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if ids and ids[0] != unk and ids[0] not in out:
            out.append(int(ids[0]))
    return out


def metric_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of the positive and negative words, with any shared id removed from both."""
    pos = first_token_ids(tokenizer, POSITIVE_WORDS)
    neg = first_token_ids(tokenizer, NEGATIVE_WORDS)
    shared = set(pos) & set(neg)
    return [t for t in pos if t not in shared], [t for t in neg if t not in shared]


def sentiment_logodds(logits: torch.Tensor, pos: Sequence[int], neg: Sequence[int]) -> torch.Tensor:
    """Per row: ``logsumexp(logits[pos]) - logsumexp(logits[neg])`` (softmax normaliser cancels)."""
    logits = logits.double()
    return torch.logsumexp(logits[:, list(pos)], dim=-1) - torch.logsumexp(
        logits[:, list(neg)], dim=-1
    )


# --- timing ------------------------------------------------------------------------------------
_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have spent busy (``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    steal = ticks[7] if len(ticks) > 7 else 0  # the hypervisor's share is not ours either
    return (sum(ticks[:8]) - idle - steal) / _CLK


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ContentionProbe:
    """How much CPU *other* processes used while a timed block ran.

    ``share`` = (busy CPU time of the whole machine - this process's CPU time) / (wall time x
    cores): 0 on an otherwise idle machine, 1 when other processes kept every core busy. On a
    shared machine a timing taken while another job runs measures that job too, so samples with
    a high share are retried (see :func:`time_variants`).
    """

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.start_busy = _busy_cpu_seconds()
        self.start_own = _own_cpu_seconds()
        self.start = time.perf_counter()

    def share(self) -> float | None:
        busy = _busy_cpu_seconds()
        if busy is None or self.start_busy is None:
            return None
        wall = time.perf_counter() - self.start
        others = (busy - self.start_busy) - (_own_cpu_seconds() - self.start_own)
        return max(0.0, others) / max(wall * self.cores, 1e-9)


def summary(times: Sequence[float], contention: Sequence[float | None] = ()) -> dict[str, Any]:
    """Median, min, max and the raw list of wall-clock seconds (plus contention per sample)."""
    out: dict[str, Any] = {
        "times": [round(t, 6) for t in times],
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
    }
    if contention:
        out["contention"] = [None if c is None else round(c, 3) for c in contention]
    return out


def wait_until_quiet(
    *, max_share: float, timeout: float, window: float = 5.0, log_fn: Callable[[str], None] | None
) -> float | None:
    """Wait (up to ``timeout`` s) for a ``window`` in which other processes use little CPU."""
    deadline = time.perf_counter() + timeout
    while True:
        probe = ContentionProbe()
        time.sleep(window)
        share = probe.share()
        if share is None or share <= max_share or time.perf_counter() >= deadline:
            return share
        if log_fn is not None:
            log_fn(f"  machine busy (other processes use {share:.0%} of the CPUs); waiting ...")


def time_variants(
    variants: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmups: Mapping[str, Callable[[], Any]] | None = None,
    log: Callable[[str], None] | None = None,
    max_contention: float = 0.15,
    retries: int = 2,
) -> dict[str, dict[str, Any]]:
    """Time each variant ``repeats`` times, interleaved in rotating order.

    Interleaving (A B C, B C A, C A B, ...) spreads slow drifts of the machine (thermal, other
    processes) over every variant instead of charging them to whichever runs last. Each variant
    runs once untimed first (or its ``warmups`` entry) so one-time costs (kernel selection,
    tracing caches, lazy imports) are not measured. A sample during which other processes used
    more than ``max_contention`` of the CPUs is taken again (up to ``retries`` times; the least
    contended one is kept) and the contention of every kept sample is recorded.
    """
    names = list(variants)
    for name in names:
        warm = (warmups or {}).get(name, variants[name])
        warm()
    times: dict[str, list[float]] = {name: [] for name in names}
    shares: dict[str, list[float | None]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            best: tuple[float, float | None] | None = None
            for attempt in range(retries + 1):
                gc.collect()
                probe = ContentionProbe()
                start = time.perf_counter()
                variants[name]()
                elapsed = time.perf_counter() - start
                share = probe.share()
                if best is None or (share or 0.0) < (best[1] or 0.0):
                    best = (elapsed, share)
                if log is not None:
                    busy = "" if share is None else f"  (others: {share:.0%} CPU)"
                    log(f"    {name:<28s} run {rep + 1}/{repeats}: {elapsed:8.3f} s{busy}")
                if share is None or share <= max_contention or attempt == retries:
                    break
                if log is not None:
                    log("      machine busy during that run; timing it again")
            assert best is not None
            times[name].append(best[0])
            shares[name].append(best[1])
    return {name: summary(times[name], shares[name]) for name in names}


def ratio(numerator: Mapping[str, Any], denominator: Mapping[str, Any]) -> float:
    """Ratio of two timing medians."""
    return float(numerator["median"]) / float(denominator["median"])


@dataclass
class Profiled:
    """A callable kept in memory (never in JSON) so a missed target can be profiled."""

    fn: Callable[[], Any]
    label: str


@dataclass
class WorkloadResult:
    """What one workload returns: JSON-able ``data`` plus in-memory profilers."""

    data: dict[str, Any]
    profilers: dict[str, Profiled] = field(default_factory=dict)


def profile_top(fn: Callable[[], Any], *, top: int = 18) -> dict[str, Any]:
    """cProfile one call of ``fn``: total seconds and the top entries by internal time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    rows: list[dict[str, Any]] = []
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in entries.items():
        rows.append(
            {
                "function": f"{_short_path(filename)}:{line}({func})",
                "ncalls": int(ncalls),
                "tottime": round(float(tottime), 4),
                "cumtime": round(float(cumtime), 4),
            }
        )
    by_tottime = sorted(rows, key=lambda r: -r["tottime"])[:top]
    by_cumtime = sorted(rows, key=lambda r: -r["cumtime"])[:top]
    ours = sorted(
        (r for r in rows if r["function"].startswith("steerlab/")), key=lambda r: -r["cumtime"]
    )[:top]
    return {
        "total_s": round(total, 4),
        "by_tottime": by_tottime,
        "by_cumtime": by_cumtime,
        "steerlab_by_cumtime": ours,
    }


def _short_path(filename: str) -> str:
    for marker in ("site-packages/", "src/", "benchmarks/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# --- machine -------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, load and library versions of the process running the suite."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "nnsight": _package_version("nnsight"),
        "steerlab": _package_version("steerlab"),
        "numpy": _package_version("numpy"),
    }
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        total_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(total_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        info["cpu_flags_avx512"] = "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes competing for the cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def log(message: str) -> None:
    """Progress line on stderr (stdout stays clean for JSON in drivers)."""
    print(message, file=sys.stderr, flush=True)
