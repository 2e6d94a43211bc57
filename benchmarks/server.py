"""Benchmark ``steerlab serve``: throughput and latency of steered requests under concurrency.

``python -m benchmarks.server [--model tiny:llama] [--requests 32] [--max-tokens 32]``

The same set of requests (prompts x 8 different steering configurations: vectors, strengths,
positions) is served end to end over HTTP (the real app under uvicorn, clients in threads,
greedy decoding) at 1, 8 and 32 concurrent clients, steered and unsteered. Concurrency 1 is
"one at a time": each request is served alone. Throughput is generated tokens / wall time;
latency is each request's wall time. Conditions run in interleaved rounds and the medians over
rounds are reported. Results go to ``benchmarks/results/server.json`` and the "Server" section
of ``docs/benchmarks.md`` (between markers; the rest of the report is left alone).

Head-of-line scenario (``--scenarios hol``): a few greedy streams run; after each has produced
``--baseline-tokens`` tokens a prompt of ``--long-tokens`` tokens (about 4k) arrives. Each
stream's inter-token gaps before the long prompt arrived (baseline) and while it was being
read (until its first token) are compared (p95, pooled over streams), with the engine's default
chunked prefill and with prefill of whole prompts (``prefill_chunk=None``, the behaviour
before chunking), in one run. Results go to ``benchmarks/results/server_hol.json`` and their
own section of ``docs/benchmarks.md``.

Engine against batched generate (``--scenarios batch``): the torch engine behind ``steerlab
serve`` (HTTP excluded: each client thread submits its request to the engine and reads its
stream) against ``model.generate_ids`` of the same prompts as one batch (per-row steering), at
``--batch-clients`` (8 and 32) concurrent clients, steered and unsteered, in interleaved rounds
(the order rotates each round), medians over rounds. Results go to
``benchmarks/results/server_batch.json`` and their own section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, load_average, machine_info

RESULTS = ROOT / "benchmarks" / "results" / "server.json"
HOL_RESULTS = ROOT / "benchmarks" / "results" / "server_hol.json"
BATCH_RESULTS = ROOT / "benchmarks" / "results" / "server_batch.json"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- server-benchmark:start -->", "<!-- server-benchmark:end -->"
HOL_START, HOL_END = "<!-- server-hol:start -->", "<!-- server-hol:end -->"
BATCH_START, BATCH_END = "<!-- server-batch:start -->", "<!-- server-batch:end -->"
PROMPTS = [
    "The movie last night was",
    "Tell me about the weather this weekend.",
    "My first day at the new job",
    "The restaurant downtown is",
    "Write a sentence about the sea.",
    "The football match ended",
    "Our trip to the coast",
    "The customer service at the bank",
]


def _configs(names: list[str]) -> list[list[dict[str, Any]]]:
    a, b = names[0], names[1 % len(names)]
    return [
        [{"vector": a, "strength": 4.0, "positions": "all"}],
        [{"vector": a, "strength": -4.0, "positions": "all"}],
        [{"vector": b, "strength": 6.0, "positions": "last"}],
        [{"vector": b, "strength": -6.0, "positions": "generated"}],
        [{"vector": a, "strength": 2.0, "positions": "prompt"}],
        [{"vector": a, "strength": 8.0, "positions": "last"}],
        [{"vector": b, "strength": 3.0, "positions": "all"}],
        [
            {"vector": a, "strength": 3.0, "positions": "all"},
            {"vector": b, "strength": -3.0, "positions": "last"},
        ],
    ]


def _load(model: str | None) -> Any:
    import steerlab as sl

    if model and model.startswith("tiny:"):
        from steerlab.testing import tiny_model

        return tiny_model(model.split(":", 1)[1])
    return sl.load_model(model)


def _vectors(model: Any) -> dict[str, Any]:
    import steerlab as sl

    gen = torch.Generator().manual_seed(0)
    layers = [model.n_layers // 3, model.n_layers // 2]
    probe = model.activations(PROMPTS[:4], layers=layers)
    out = {}
    for i, layer in enumerate(layers):
        direction = torch.randn(model.d_model, generator=gen)
        scale = float(probe[layer].norm(dim=-1).mean()) / 8
        out[f"v{i}"] = sl.SteeringVector({layer: direction / direction.norm() * scale})
    return out


def _run(url: str, jobs: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def one(body: dict[str, Any]) -> None:
        nonlocal tokens
        start = time.perf_counter()
        reply = httpx.post(url + "/v1/completions", json=body, timeout=3600)
        elapsed = time.perf_counter() - start
        reply.raise_for_status()
        with lock:
            latencies.append(elapsed)
            tokens += int(reply.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(jobs),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results dict (also written to disk)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server", description=__doc__)
    parser.add_argument("--model", default=None, help="model (default: the default model)")
    parser.add_argument("--requests", type=int, default=32, help="requests per condition")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels")
    parser.add_argument("--doc", default=str(DOC), help="report to update, or 'none'")
    parser.add_argument("--out", default=str(RESULTS), help="results json, or 'none'")
    parser.add_argument(
        "--scenarios",
        default="throughput,hol,batch",
        help="throughput, hol (head of line) and/or batch (engine vs batched generate_ids)",
    )
    parser.add_argument(
        "--batch-clients", default="8,32", help="batch: concurrency levels (= batch sizes)"
    )
    parser.add_argument("--streams", type=int, default=4, help="hol: running streams")
    parser.add_argument("--long-tokens", type=int, default=4000, help="hol: long prompt tokens")
    parser.add_argument(
        "--baseline-tokens", type=int, default=24, help="hol: tokens per stream before it arrives"
    )
    args = parser.parse_args(argv)
    scenarios = {name.strip() for name in args.scenarios.split(",") if name.strip()}
    known = {"throughput", "hol", "batch"}
    if not scenarios <= known:
        parser.error(f"unknown scenarios: {sorted(scenarios - known)}")
    out: dict[str, Any] = {}
    if "throughput" in scenarios:
        out = _throughput(args, argv)
    if "hol" in scenarios:
        out["hol"] = _head_of_line(args, argv)
    if "batch" in scenarios:
        out["batch"] = _against_generate(args, argv)
    return out


def _throughput(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:

    from steerlab.server.app import create_app, serve_in_thread
    from steerlab.server.engine import TorchEngine

    torch.manual_seed(0)
    model = _load(args.model)
    levels = [int(c) for c in args.clients.split(",")]
    engine = TorchEngine(model, max_batch=max(levels))
    for name, vector in _vectors(model).items():
        engine.vectors.register(name, vector)
    configs = _configs(engine.vectors.names())
    jobs_steered = [
        {
            "model": "default",
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "steering": configs[i % len(configs)],
        }
        for i in range(args.requests)
    ]
    jobs_plain = [{k: v for k, v in job.items() if k != "steering"} for job in jobs_steered]
    conditions = [(kind, c) for c in levels for kind in ("steered", "unsteered")]
    runs: dict[str, list[dict[str, Any]]] = {f"{k}@{c}": [] for k, c in conditions}
    load_start = load_average()
    started = time.perf_counter()
    with serve_in_thread(create_app(engine, max_tokens_cap=max(1024, args.max_tokens))) as url:
        _run(url, jobs_steered[:4], 4)  # warm-up
        for round_index in range(args.rounds):
            order = (
                conditions[round_index % len(conditions) :]
                + conditions[: round_index % len(conditions)]
            )
            for kind, clients in order:
                jobs = jobs_steered if kind == "steered" else jobs_plain
                result = _run(url, jobs, clients)
                runs[f"{kind}@{clients}"].append(result)
                print(
                    f"{kind:9s} clients={clients:3d} {result['tokens_per_s']:8.1f} tok/s "
                    f"p50 {result['p50_s']:.2f}s p95 {result['p95_s']:.2f}s",
                    flush=True,
                )
    summary = {
        key: {
            field: statistics.median(r[field] for r in results)
            for field in ("tokens_per_s", "p50_s", "p95_s", "wall_s", "tokens")
        }
        for key, results in runs.items()
    }
    solo = summary["steered@1"]["tokens_per_s"] if "steered@1" in summary else None
    for key, row in summary.items():
        kind, clients = key.split("@")
        row["vs_one_at_a_time"] = row["tokens_per_s"] / solo if solo else None
        plain = summary.get(f"unsteered@{clients}")
        row["steered_time_ratio"] = (
            plain["tokens_per_s"] / row["tokens_per_s"] if kind == "steered" and plain else None
        )
    results = {
        **_run_record(argv, started, model.name, load_start),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "engine": {"decode_steps": engine.steps, "max_rows": engine.max_rows_seen},
        "runs": runs,
        "summary": summary,
    }
    if args.out != "none":
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    if args.doc != "none":
        update_doc(Path(args.doc), results)
    return results


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def _long_prompt(model: Any, tokens: int) -> str:
    """Text of about ``tokens`` tokens (the benchmark prompts repeated, cut at a token)."""
    text = " ".join(PROMPTS)
    while len(model.tokenizer(text)["input_ids"]) < tokens:
        text = text + " " + text
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][: tokens - 2]
    return str(model.tokenizer.decode(ids))


def _gaps_once(url: str, streams: int, baseline: int, long_prompt: str, cap: int) -> dict[str, Any]:
    """Run ``streams`` greedy streams; once each has ``baseline`` tokens send the long prompt
    (non-streaming, one token) and stop the streams when it is answered."""
    import httpx

    # per stream, the token times of each of its requests (a stream whose request ends, at an
    # end-of-sequence token, sends the next one at once)
    stamps: list[list[list[float]]] = [[] for _ in range(streams)]
    stop = threading.Event()

    def stream(i: int) -> None:
        body = {
            "model": "default",
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": cap,
            "temperature": 0,
            "stream": True,
        }
        while not stop.is_set():
            times: list[float] = []
            stamps[i].append(times)
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())
                    if stop.is_set():
                        break  # closing the connection cancels the request on the server

    def tokens(i: int) -> int:
        return sum(len(times) for times in stamps[i])

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    while min(tokens(i) for i in range(streams)) < baseline:
        if not all(thread.is_alive() for thread in threads):
            raise RuntimeError("a stream failed before its baseline tokens (see its error)")
        time.sleep(0.01)
    arrived = time.perf_counter()
    reply = httpx.post(
        url + "/v1/completions",
        json={"model": "default", "prompt": long_prompt, "max_tokens": 1, "temperature": 0},
        timeout=3600,
    )
    answered = time.perf_counter()
    reply.raise_for_status()
    stop.set()
    for thread in threads:
        thread.join()
    before: list[float] = []
    during: list[float] = []
    for per_stream in stamps:
        for times in per_stream:
            # from a request's 2nd token on: decoding gaps only (the first waits for its prompt)
            for a, b in itertools.pairwise(times[1:]):
                if b <= arrived:
                    before.append(b - a)
                elif a < answered:  # the gap overlaps the time the long prompt was being read
                    during.append(b - a)
    return {
        "long_prompt_tokens": int(reply.json()["usage"]["prompt_tokens"]),
        "long_first_token_s": answered - arrived,
        "baseline_gaps": len(before),
        "baseline_p50_ms": 1e3 * _p(before, 0.5),
        "baseline_p95_ms": 1e3 * _p(before, 0.95),
        "during_gaps": len(during),
        "during_p50_ms": 1e3 * _p(during, 0.5),
        "during_p95_ms": 1e3 * _p(during, 0.95),
        "during_max_ms": 1e3 * max(during, default=0.0),
        "p95_ratio": _p(during, 0.95) / _p(before, 0.95) if before else None,
    }


def _head_of_line(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """The head-of-line scenario (see the module docstring)."""
    from steerlab.server.app import create_app, serve_in_thread
    from steerlab.server.engine import DEFAULT_PREFILL_CHUNK, TorchEngine

    torch.manual_seed(0)
    model = _load(args.model)
    engine = TorchEngine(model, max_batch=max(8, args.streams + 1))
    context = engine._max_positions or 8192
    long_tokens = min(args.long_tokens, context - 8)
    long_prompt = _long_prompt(model, long_tokens)
    cap = min(4096, context - 64)
    load_start = load_average()
    started = time.perf_counter()
    modes: dict[str, Any] = {}
    with serve_in_thread(create_app(engine, max_tokens_cap=cap)) as url:
        _gaps_once(url, 1, 3, PROMPTS[0], cap)  # warm-up
        print("warm-up done", flush=True)
        for mode, chunk in (("chunked", DEFAULT_PREFILL_CHUNK), ("whole", None)):
            engine.prefill_chunk = chunk
            modes[mode] = _gaps_once(url, args.streams, args.baseline_tokens, long_prompt, cap)
            row = modes[mode]
            print(
                f"{mode:8s} baseline p95 {row['baseline_p95_ms']:.0f} ms, while a "
                f"{row['long_prompt_tokens']}-token prompt is read p95 "
                f"{row['during_p95_ms']:.0f} ms (x{row['p95_ratio']:.2f}), its first token "
                f"after {row['long_first_token_s']:.1f} s",
                flush=True,
            )
    results = {
        **_run_record(argv, started, model.name, load_start),
        "streams": args.streams,
        "baseline_tokens": args.baseline_tokens,
        "prefill_chunk": DEFAULT_PREFILL_CHUNK,
        "modes": modes,
    }
    out = HOL_RESULTS if args.out == str(RESULTS) else Path(args.out).with_suffix(".hol.json")
    if args.out != "none":
        out.write_text(json.dumps(results, indent=2, default=str))
    if args.doc != "none":
        _replace_section(Path(args.doc), render_hol(results), HOL_START, HOL_END)
    return results


def _engine_once(engine: Any, requests: list[Any]) -> dict[str, Any]:
    """Serve ``requests`` with one client thread each (all at once); tokens/s over the wall."""
    counts = [0] * len(requests)

    def one(index: int) -> None:
        ids = [event.token_id for event in engine.submit(requests[index])]
        # counted as generate_ids counts them: an end-of-sequence token is not returned
        counts[index] = len(ids) - (bool(ids) and ids[-1] in engine.emitter.eos)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"tokens": sum(counts), "wall_s": wall, "tokens_per_s": sum(counts) / wall}


def _generate_once(
    model: Any, prompts: list[str], steering: Any, max_tokens: int
) -> dict[str, Any]:
    """``model.generate_ids`` of ``prompts`` as one batch; tokens/s over the wall."""
    start = time.perf_counter()
    out = model.generate_ids(prompts, steering=steering, max_new_tokens=max_tokens)
    wall = time.perf_counter() - start
    tokens = sum(len(row) for row in out)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def _against_generate(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """The engine-against-batched-generate scenario (see the module docstring)."""
    import steerlab as sl
    from steerlab.server.engine import GenerationRequest, SteeringEntry, TorchEngine

    torch.manual_seed(0)
    model = _load(args.model)
    levels = [int(c) for c in args.batch_clients.split(",")]
    engine = TorchEngine(model, max_batch=max(levels))
    vectors = _vectors(model)
    for name, vector in vectors.items():
        engine.vectors.register(name, vector)
    # one steering entry per row (generate_ids takes one Steering per row)
    configs = [c[0] for c in _configs(engine.vectors.names()) if len(c) == 1]
    conditions = [(kind, n) for n in levels for kind in ("steered", "unsteered")]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        f"{k}@{n}": {"engine": [], "generate": []} for k, n in conditions
    }
    load_start = load_average()
    started = time.perf_counter()
    engine.start()
    try:
        for round_index in range(args.rounds + 1):  # round 0 warms both up, not counted
            shift = round_index % len(conditions)
            for kind, n in conditions[shift:] + conditions[:shift]:
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
                rows = [configs[i % len(configs)] for i in range(n)]
                if kind == "unsteered":
                    rows = []
                requests = [
                    GenerationRequest(
                        prompt=prompt,
                        max_tokens=args.max_tokens,
                        temperature=0.0,
                        steering=(SteeringEntry(**rows[i]),) if rows else (),
                    )
                    for i, prompt in enumerate(prompts)
                ]
                steering = [
                    sl.Steering(
                        vectors[row["vector"]], strength=row["strength"], positions=row["positions"]
                    )
                    for row in rows
                ] or None
                order = ("engine", "generate") if round_index % 2 == 0 else ("generate", "engine")
                for which in order:
                    if which == "engine":
                        result = _engine_once(engine, requests)
                    else:
                        result = _generate_once(model, prompts, steering, args.max_tokens)
                    if round_index:
                        runs[f"{kind}@{n}"][which].append(result)
                    print(
                        f"batch {kind:9s} n={n:3d} {which:8s} {result['tokens_per_s']:8.1f} tok/s"
                        + ("" if round_index else " (warm-up)"),
                        flush=True,
                    )
    finally:
        engine.shutdown()
    summary: dict[str, Any] = {}
    for key, pair_runs in runs.items():
        engine_tps = statistics.median(r["tokens_per_s"] for r in pair_runs["engine"])
        generate_tps = statistics.median(r["tokens_per_s"] for r in pair_runs["generate"])
        ratios = [
            e["tokens_per_s"] / g["tokens_per_s"]
            for e, g in zip(pair_runs["engine"], pair_runs["generate"])
        ]
        summary[key] = {
            "engine_tokens_per_s": engine_tps,
            "generate_tokens_per_s": generate_tps,
            "ratio": statistics.median(ratios),
            "ratios": ratios,
        }
    results = {
        **_run_record(argv, started, model.name, load_start),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "engine": {"decode_steps": engine.steps, "forward_passes": engine.forwards},
        "runs": runs,
        "summary": summary,
    }
    out = BATCH_RESULTS if args.out == str(RESULTS) else Path(args.out).with_suffix(".batch.json")
    if args.out != "none":
        out.write_text(json.dumps(results, indent=2, default=str))
    if args.doc != "none":
        _replace_section(Path(args.doc), render_batch(results), BATCH_START, BATCH_END)
    return results


def _run_record(
    argv: list[str] | None, started: float, model_name: str, load_start: Any
) -> dict[str, Any]:
    """What every scenario's results record about the run: the command line (``argv``, or this
    process's arguments), date, wall time since ``started``, model, machine and load."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["python -m benchmarks.server", *args]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "model": model_name,
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": load_average()},
    }


def render_batch(results: dict[str, Any]) -> str:
    """The engine-against-batched-generate section for ``docs/benchmarks.md``."""
    summary = results["summary"]
    load = results["load_average"]
    lines = [
        BATCH_START,
        "## Server engine against batched `generate_ids`",
        "",
        f"`{results['command'].strip()}` ({results['date']}, {results['wall_s']:.0f} s wall) on "
        f"{results['model']}: N client threads each submit one greedy request of "
        f"{results['max_tokens']} tokens to the torch engine behind `steerlab serve` (HTTP "
        f"excluded) and read its stream, against `model.generate_ids` of the same N prompts "
        f"as one batch (steered: one of 7 steering configurations per row, the same in both). "
        f"Tokens per second over the wall time; medians over {results['rounds']} interleaved "
        f"round(s) after a warm-up round; the ratio is engine / generate_ids within each "
        f"round. Load average at start/end: {load['start']} / {load['end']} "
        f"({results['machine'].get('logical_cpus', '?')} logical CPUs).",
        "",
        "| requests | clients = batch | engine tokens/s | generate_ids tokens/s | "
        "engine / generate_ids |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, row in sorted(summary.items(), key=lambda kv: (int(kv[0].split("@")[1]), kv[0])):
        kind, n = key.split("@")
        lines.append(
            f"| {kind} | {n} | {row['engine_tokens_per_s']:.1f} | "
            f"{row['generate_tokens_per_s']:.1f} | {row['ratio']:.2f} |"
        )
    worst = min(row["ratio"] for row in summary.values())
    cpus = results["machine"].get("logical_cpus") or 1
    lines += [""]
    if (load["start"] or [0.0])[0] > cpus:
        lines.append(
            f"* Read with care: the load average ({load['start'][0]}) was above the {cpus} "
            f"CPUs (other jobs shared the machine), so absolute tokens/s are a fraction of an "
            f"idle machine's and each ratio carries run-to-run noise of that size (an "
            f"unsteered ratio far above 1 is noise: the engine does the same forward passes)."
        )
    lines += [
        f"* Target: the engine at >= 0.9x the tokens/s of batched `generate_ids`: worst ratio "
        f"**{worst:.2f}** ({'met' if worst >= 0.9 else 'missed'}).",
        f"* Engine: {results['engine']['decode_steps']} batched decoding steps and "
        f"{results['engine']['forward_passes']} forward passes in all (prompts read together).",
        "",
        BATCH_END,
    ]
    return "\n".join(lines)


def render_hol(results: dict[str, Any]) -> str:
    """The head-of-line section for ``docs/benchmarks.md``."""
    chunked, whole = results["modes"]["chunked"], results["modes"]["whole"]
    lines = [
        HOL_START,
        "## Server: a long prompt arriving beside running streams",
        "",
        f"`{results['command'].strip()}` ({results['date']}, {results['wall_s']:.0f} s wall) on "
        f"{results['model']}: {results['streams']} greedy streams run; once each has "
        f"{results['baseline_tokens']} tokens a prompt of {chunked['long_prompt_tokens']} "
        f"tokens arrives (one token asked). Gaps between a stream's tokens before it arrived "
        f"(baseline) and until it is answered, pooled over the streams. Load average at "
        f"start/end: {results['load_average']['start']} / {results['load_average']['end']} "
        f"({results['machine'].get('logical_cpus', '?')} logical CPUs).",
        "",
        "| prefill | baseline gap p50 / p95 (ms) | gap while it is read p50 / p95 / max (ms) | "
        "p95 ratio | its first token (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in (
        (f"chunked (default, {results['prefill_chunk']} tokens at most)", chunked),
        ("whole prompt (before chunking)", whole),
    ):
        lines.append(
            f"| {name} | {row['baseline_p50_ms']:.0f} / {row['baseline_p95_ms']:.0f} | "
            f"{row['during_p50_ms']:.0f} / {row['during_p95_ms']:.0f} / "
            f"{row['during_max_ms']:.0f} | {row['p95_ratio']:.2f} | "
            f"{row['long_first_token_s']:.1f} |"
        )
    ratio = chunked["p95_ratio"]
    lines += [
        "",
        f"* Target: p95 gap while a ~4k-token prompt is read <= 3x the baseline p95, with "
        f"chunked prefill: **{ratio:.2f}x** ({'met' if ratio <= 3 else 'missed'}).",
        "",
        HOL_END,
    ]
    return "\n".join(lines)


def _replace_section(doc: Path, section: str, start: str, end: str) -> None:
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


def render(results: dict[str, Any]) -> str:
    """The markdown section for ``docs/benchmarks.md``."""
    summary = results["summary"]
    top = max(int(k.split("@")[1]) for k in summary)
    lines = [
        START,
        "## Server (`steerlab serve`)",
        "",
        f"`{results['command'].strip()}` ({results['date']}, {results['wall_s']:.0f} s wall): "
        f"{results['requests']} completion requests of {results['max_tokens']} greedy tokens "
        f"on {results['model']}, prompts x 8 steering configurations (2 vectors, strengths "
        f"-8..8, positions all/last/prompt/generated, one request with two entries), sent "
        f"over HTTP to the app under uvicorn by 1, 8 or 32 client threads; the unsteered run "
        f"sends the same requests without `steering`. 1 client = one at a time. Medians over "
        f"{results['rounds']} interleaved round(s). Load average at start/end: "
        f"{results['load_average']['start']} / {results['load_average']['end']} "
        f"(this machine has {results['machine'].get('logical_cpus', '?')} logical CPUs).",
        "",
        "| requests | clients | tokens/s | p50 latency (s) | p95 latency (s) | "
        "x one-at-a-time | unsteered/steered speed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, row in sorted(summary.items(), key=lambda kv: (int(kv[0].split("@")[1]), kv[0])):
        kind, clients = key.split("@")
        ratio = row.get("steered_time_ratio")
        lines.append(
            f"| {kind} | {clients} | {row['tokens_per_s']:.1f} | {row['p50_s']:.2f} | "
            f"{row['p95_s']:.2f} | {row['vs_one_at_a_time']:.2f} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} |"
        )
    speedup = summary[f"steered@{top}"]["vs_one_at_a_time"]
    overhead = summary[f"steered@{top}"]["steered_time_ratio"]
    ratios = [r["steered_time_ratio"] for r in summary.values() if r.get("steered_time_ratio")]
    load = (results.get("load_average") or {}).get("start") or [0.0]
    cpus = results["machine"].get("logical_cpus") or 1
    lines += [""]
    if load[0] > cpus:
        lines.append(
            f"* Read with care: the load average ({load[0]}) was above the {cpus} CPUs (other "
            f"jobs shared the machine), so absolute tokens/s are a fraction of an idle "
            f"machine's, and the unsteered/steered ratios ({min(ratios):.2f}..{max(ratios):.2f} "
            f"across concurrency levels) are run-to-run noise of that size, not a steering "
            f"cost (the steering hooks add a few vector additions per step)."
        )
    lines += [
        f"* Target: >= 4x the one-at-a-time throughput at {top} clients: "
        f"**{speedup:.2f}x** ({'met' if speedup >= 4 else 'missed'}).",
        f"* Target: steered within 1.05x of unsteered (time per token at {top} clients): "
        f"**{overhead:.3f}** ({'met' if overhead <= 1.05 else 'missed'}).",
        f"* Engine: {results['engine']['decode_steps']} batched decoding steps, up to "
        f"{results['engine']['max_rows']} requests in one forward pass.",
        "",
        END,
    ]
    return "\n".join(lines)


def update_doc(doc: Path, results: dict[str, Any]) -> None:
    """Replace (or append) the server section of ``doc``."""
    _replace_section(doc, render(results), START, END)


if __name__ == "__main__":
    main()
