"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [options]`` (``make bench``).

Loads the default model once, runs the selected workloads in-process (steerlab, plain
transformers, nnsight), the peers (steering-vectors, repeng) in their own venvs, evaluates the
targets, profiles every steerlab variant that misses one, and writes

* ``benchmarks/results/<name>.json`` (raw timings, checks, machine, versions, targets), and
* ``docs/benchmarks.md`` (the report), unless ``--doc none``.

``--model tiny:llama`` runs on steerlab's tiny random model (the smoke test does this).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks import peers as peer_mod
from benchmarks import report, targets, workloads
from benchmarks.common import (
    BENCH_DIR,
    ROOT,
    SCHEMA,
    WorkloadResult,
    load_average,
    log,
    machine_info,
    profile_top,
    wait_until_quiet,
)

QUICK = {
    "repeats": 2,
    "heavy_repeats": 1,
    "extract_prompts": 64,
    "gen_tokens": 16,
    "sweep_prompts": 16,
    "layer_sweep_prompts": 8,
    "layer_sweep_strengths": 2,
    "ablation_prompts": 4,
    "memory_sizes": (200, 1000),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = workloads.Config()
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument(
        "--model",
        default="default",
        help="'default' (SmolLM2-135M-Instruct), a model folder, or tiny:<arch>",
    )
    p.add_argument(
        "--workloads",
        default=",".join(workloads.WORKLOADS),
        help=f"comma-separated subset of {','.join(workloads.WORKLOADS)}",
    )
    p.add_argument(
        "--peers",
        help=f"comma-separated peers run in their own venvs, or 'none' (default "
        f"{','.join(d.peers)}; none with --quick)",
    )
    p.add_argument("--no-nnsight", action="store_true", help="skip the nnsight recipes")
    p.add_argument(
        "--peer-repeats",
        type=int,
        help=f"timed repeats inside the peers' drivers ({d.peer_repeats})",
    )
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    p.add_argument("--repeats", type=int, help=f"timed repeats per variant ({d.repeats})")
    p.add_argument(
        "--heavy-repeats",
        type=int,
        help=f"timed repeats of the layer sweep and head scan ({d.heavy_repeats})",
    )
    p.add_argument("--extract-prompts", type=int, help=f"workload 1 ({d.extract_prompts})")
    p.add_argument("--extract-batch", type=int, help=f"batch size ({d.extract_batch})")
    p.add_argument("--gen-batch", type=int, help=f"workload 2 batch ({d.gen_batch})")
    p.add_argument("--gen-tokens", type=int, help=f"new tokens ({d.gen_tokens})")
    p.add_argument("--gen-strength", type=float, help=f"steering strength ({d.gen_strength})")
    p.add_argument("--sweep-prompts", type=int, help=f"workload 3 prompts ({d.sweep_prompts})")
    p.add_argument("--sweep-strengths", type=int, help=f"strengths ({d.sweep_strengths})")
    p.add_argument("--sweep-layer", type=int, help="steered layer (default: middle)")
    p.add_argument(
        "--layer-sweep-prompts", type=int, help=f"workload 4 prompts ({d.layer_sweep_prompts})"
    )
    p.add_argument(
        "--layer-sweep-strengths", type=int, help=f"strengths per layer ({d.layer_sweep_strengths})"
    )
    p.add_argument("--ablation-prompts", type=int, help=f"workload 5 ({d.ablation_prompts})")
    p.add_argument(
        "--layer-sweep-rows",
        action="store_true",
        help="also time sweep(mode='batched') in the layer sweep (slow)",
    )
    p.add_argument(
        "--ablation-full-path",
        action="store_true",
        help="also time ablation_scan(fast=False) (batched full forwards)",
    )
    p.add_argument("--memory-sizes", help="comma-separated prompt counts (1000,3000,10000)")
    p.add_argument("--memory-layers", help="'all' or comma-separated layers (all)")
    p.add_argument(
        "--memory-inprocess",
        action="store_true",
        help="measure memory in this process (tests only; sizes then share a peak)",
    )
    p.add_argument(
        "--max-contention",
        type=float,
        help=f"retime a sample when other processes used more than this share of the "
        f"CPUs during it ({d.max_contention})",
    )
    p.add_argument("--retries", type=int, help=f"retimings of a contended sample ({d.retries})")
    p.add_argument(
        "--wait-quiet",
        type=float,
        help=f"before each workload, wait up to this many seconds for other processes "
        f"to leave the CPUs ({d.wait_quiet:g}; 0 = never wait)",
    )
    p.add_argument("--no-profile", action="store_true", help="do not profile missed targets")
    p.add_argument("--work-dir", default=str(BENCH_DIR / "work"), help="venvs and scratch files")
    p.add_argument("--out", help="results JSON (benchmarks/results/{full,quick}.json)")
    p.add_argument("--doc", help="markdown report, or 'none' (docs/benchmarks.md)")
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="only re-render the report (--doc) from a saved results file",
    )
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> workloads.Config:
    config = workloads.Config()
    if args.quick:
        config = replace(config, **QUICK)  # type: ignore[arg-type]
    overrides: dict[str, Any] = {}
    for name in (
        "repeats",
        "heavy_repeats",
        "peer_repeats",
        "extract_prompts",
        "extract_batch",
        "gen_batch",
        "gen_tokens",
        "gen_strength",
        "sweep_prompts",
        "sweep_strengths",
        "sweep_layer",
        "layer_sweep_prompts",
        "layer_sweep_strengths",
        "ablation_prompts",
        "memory_layers",
        "max_contention",
        "retries",
        "wait_quiet",
    ):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.memory_sizes:
        overrides["memory_sizes"] = tuple(int(x) for x in args.memory_sizes.split(","))
    if args.peers is None:
        peers = () if args.quick else config.peers
    else:
        peers = () if args.peers in ("", "none") else tuple(args.peers.split(","))
    unknown = [p for p in peers if p not in peer_mod.PEERS]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; known: {sorted(peer_mod.PEERS)}")
    overrides.update(
        threads=args.threads,
        nnsight=not args.no_nnsight,
        peers=peers,
        memory_inprocess=args.memory_inprocess,
        ablation_full_path=args.ablation_full_path,
        layer_sweep_rows=args.layer_sweep_rows,
    )
    return replace(config, **overrides)


def load(spec: str) -> tuple[Any, str | None]:
    """The model and, for real models, the folder the peers load."""
    import steerlab as sl
    from steerlab.loading import default_model_path

    if spec.startswith("tiny:"):
        from steerlab.testing import tiny_model

        return tiny_model(spec.split(":", 1)[1]), None
    if spec == "default":
        path = default_model_path()
        return sl.load_model(), str(path)
    return sl.load_model(spec), spec


def _rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _wait_quiet(cfg: workloads.Config) -> float | None:
    if cfg.wait_quiet <= 0:
        return None
    return wait_until_quiet(max_share=cfg.max_contention, timeout=cfg.wait_quiet, log_fn=log)


def run_peers(ctx: workloads.Context, selected: list[str]) -> dict[str, Any]:
    cfg = ctx.config
    out: dict[str, Any] = {}
    wanted = [w for w in ("extraction", "generation") if w in selected]
    if not cfg.peers or not wanted:
        return out
    if ctx.model_path is None:
        for skipped in cfg.peers:
            out[skipped] = {
                "status": "n/a",
                "reason": "peers need a model folder (not a tiny model)",
            }
        return out
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    for name in cfg.peers:
        peer = peer_mod.PEERS[name]
        log(f"[peer] {name}")
        spec: dict[str, Any] = {
            "model_path": ctx.model_path,
            "threads": cfg.threads,
            "repeats": cfg.peer_repeats,
            **ctx.timing(),
        }
        if "extraction" in wanted:
            spec["extraction"] = workloads.extraction_peer_spec(ctx)
            spec["extraction_out"] = str(ctx.work_dir / f"{name}-extraction.pt")
        if "generation" in wanted:
            spec["generation"] = workloads.generation_peer_spec(ctx)
        _wait_quiet(cfg)
        started = time.perf_counter()
        result = peer_mod.run_peer(peer, spec, ctx.work_dir)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        if result.get("status") == "ok":
            _peer_checks(ctx, name, result, spec)
        out[name] = result
    return out


def _peer_checks(
    ctx: workloads.Context, name: str, result: dict[str, Any], spec: dict[str, Any]
) -> None:
    loads = result.get("workloads", {})
    if "extraction" in loads:
        try:
            loads["extraction"]["checks"] = workloads.compare_peer_extraction(
                ctx, name, spec["extraction_out"]
            )
        except Exception as error:  # a broken comparison must not hide the timings
            loads["extraction"]["checks"] = {"error": f"{type(error).__name__}: {error}"}
    gen = loads.get("generation")
    ours = ctx.peer_results.get("generation_tokens")
    if gen and ours:
        new_tokens = gen.pop("new_tokens", {})
        gen["checks"] = {
            f"{config}_tokens_equal_steerlab_all": new_tokens.get(config)
            == ours.get(f"steerlab_{config}_all")
            for config in workloads.generation_configs(ctx)
        }
        gen["checks"]["floor_tokens_equal_transformers_unsteered"] = new_tokens.get(
            "floor"
        ) == ours.get("transformers_unsteered")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        saved: dict[str, Any] = json.loads(Path(args.render).read_text())
        saved["targets"] = targets.evaluate(saved)
        doc = Path(args.doc or ROOT / "docs" / "benchmarks.md")
        doc.write_text(report.render(saved, results_path=Path(args.render)))
        log(f"report: {doc}")
        return saved
    config = build_config(args)
    torch.set_num_threads(config.threads)
    selected = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in selected if w not in workloads.WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; known: {list(workloads.WORKLOADS)}")
    name = "quick" if args.quick else "full"
    if args.model != "default":
        name += "-" + "".join(c if c.isalnum() else "_" for c in args.model)[-40:]
    out_path = Path(args.out) if args.out else BENCH_DIR / "results" / f"{name}.json"
    # Only a full run on the default model rewrites the report unless --doc says otherwise.
    if args.doc == "none" or (args.doc is None and name != "full"):
        doc_path = None
    else:
        doc_path = Path(args.doc or ROOT / "docs" / "benchmarks.md")
    command = "python -m benchmarks.run" + (
        " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "mode": name,
        "config": asdict(config),
        "machine": machine_info(),
        "load_average_start": load_average(),
    }
    log(f"loading model {args.model} ...")
    model, model_path = load(args.model)
    adapter = model.adapter
    results["model"] = {
        "name": model.name,
        "path": model_path,
        "model_type": adapter.model_type,
        "n_layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "n_heads": adapter.n_heads,
        "n_kv_heads": adapter.n_kv_heads,
        "dtype": str(model.dtype),
    }
    ctx = workloads.Context(
        model=model,
        model_spec=args.model if args.model != "default" else "default",
        model_path=model_path,
        config=config,
        work_dir=Path(args.work_dir),
        vector=workloads.build_vector(model),
        layers_path=adapter.spec.layers,
    )
    results["workloads"] = {}
    profilers: dict[str, Any] = {}
    for workload in selected:
        quiet = _wait_quiet(config)
        t0 = time.perf_counter()
        try:
            result: WorkloadResult = workloads.WORKLOADS[workload](ctx)
            data = result.data
            for key, prof in result.profilers.items():
                profilers[f"{workload}/{key}"] = prof
        except Exception as error:  # one broken workload must not lose the others
            data = {
                "status": "error",
                "reason": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()[-3000:],
            }
            log(data["traceback"])
        data.setdefault("status", "ok")
        data["contention_before"] = None if quiet is None else round(quiet, 3)
        data["wall_s"] = round(time.perf_counter() - t0, 1)
        data["rss_after_mib"] = _rss_mib()
        if workload == "generation" and "tokens" in data:
            ctx.peer_results["generation_tokens"] = data.pop("tokens")
        results["workloads"][workload] = data
    results["peers"] = run_peers(ctx, selected)
    results["targets"] = targets.evaluate(results)
    results["profiles"] = {}
    if not args.no_profile:
        for row in results["targets"]:
            key = row.get("profile_key")
            if row["status"] == "miss" and key in profilers and key not in results["profiles"]:
                log(f"[profile] {key} (target {row['id']} missed)")
                results["profiles"][key] = {
                    "label": profilers[key].label,
                    **profile_top(profilers[key].fn),
                }
    results["load_average_end"] = load_average()
    results["wall_s"] = round(time.perf_counter() - started, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    log(f"results: {out_path}")
    if doc_path is not None:
        doc_path.parent.mkdir(parents=True, exist_ok=True)
        doc_path.write_text(report.render(results, results_path=out_path))
        log(f"report: {doc_path}")
    log(report.target_table(results["targets"]))
    return results


if __name__ == "__main__":
    main()
