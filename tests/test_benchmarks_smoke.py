"""Smoke test of the benchmark harness (benchmarks/) on a tiny random model.

Runs every in-process workload at toy sizes (no peers, no nnsight, no profiling) and checks the
results schema, the target rows and the rendered report. The real numbers come from
``python -m benchmarks.run`` (docs/benchmarks.md); this only guards the harness itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import run as bench  # noqa: E402
from benchmarks.common import SCHEMA, summary, time_variants  # noqa: E402
from benchmarks.workloads import WORKLOADS  # noqa: E402

TINY_ARGS = [
    "--model", "tiny:llama", "--peers", "none", "--no-nnsight", "--no-profile",
    "--threads", "1", "--repeats", "1", "--heavy-repeats", "1",
    "--extract-prompts", "6", "--extract-batch", "4",
    "--gen-batch", "2", "--gen-tokens", "2",
    "--sweep-prompts", "3", "--sweep-strengths", "2",
    "--layer-sweep-prompts", "2", "--layer-sweep-strengths", "2",
    "--ablation-prompts", "2",
    "--memory-sizes", "8,16", "--memory-inprocess",
    "--retries", "0", "--wait-quiet", "0",
    "--layer-sweep-rows", "--ablation-full-path",
]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    res = bench.main([*TINY_ARGS, "--out", str(out / "r.json"), "--doc", str(out / "r.md")])
    res["_out"] = out
    return res


def test_results_schema(results: dict) -> None:
    saved = json.loads((results["_out"] / "r.json").read_text())
    assert saved["schema"] == SCHEMA
    for key in ("created", "command", "config", "machine", "model", "workloads", "targets"):
        assert key in saved
    assert saved["model"]["n_layers"] == 3 and saved["model"]["d_model"] == 32
    assert saved["machine"]["torch"] and saved["machine"]["cpu"]
    assert set(saved["workloads"]) == set(WORKLOADS)
    for name, data in saved["workloads"].items():
        assert data["status"] == "ok", (name, data.get("reason"))
        if name == "memory":
            assert [row["n_prompts"] for row in data["rows"]] == [8, 16]
            assert all(row["result_bytes"] == row["n_prompts"] * 3 * 32 * 4 for row in data["rows"])
            continue
        for timing in data["timings"].values():
            assert timing["median"] > 0 and len(timing["times"]) >= 1


def test_variants_agree(results: dict) -> None:
    loads = results["workloads"]
    assert loads["extraction"]["checks"]["max_abs_diff_vs_block_hooks"] < 1e-4
    for sweep in ("strength_sweep", "layer_sweep"):
        checks = loads[sweep]["checks"]
        assert checks["prefix_mode_used"] == "prefix" and checks["batched_mode_used"] == "batched"
        for mode in ("batched", "prefix"):
            assert checks[f"max_abs_diff_behaviour_{mode}_vs_naive"] < 1e-4
            assert checks[f"max_abs_diff_kl_{mode}_vs_naive"] < 1e-4
    assert loads["head_ablation"]["checks"]["max_abs_diff_fast_vs_one_at_a_time"] < 1e-4
    assert loads["generation"]["checks"]["new_tokens_per_row"] == [2]
    # the harness leaves no hooks behind, so the scan can take its fast path
    assert loads["head_ablation"]["checks"]["path"] == "fast"
    assert loads["head_ablation"]["checks"]["max_abs_diff_full_vs_one_at_a_time"] < 1e-4


def test_targets_and_report(results: dict) -> None:
    rows = {row["id"]: row for row in results["targets"]}
    for key in ("gen_one_layer_vs_transformers", "extraction_vs_bare_forward",
                "strength_sweep_speedup", "layer_sweep_speedup", "head_ablation_speedup",
                "memory_flat"):  # fmt: skip
        assert rows[key]["status"] in ("pass", "miss"), rows[key]
        assert isinstance(rows[key]["ratio"], float)
        if key != "memory_flat":  # a toy extraction may not move the peak RSS at all
            assert rows[key]["ratio"] > 0
    # nnsight was switched off: its rows say so instead of disappearing
    assert rows["extraction_vs_nnsight"]["status"] == "n/a"
    report = (results["_out"] / "r.md").read_text()
    assert "| target | ratio (medians) | target | result |" in report
    assert "tiny-llama" in report
    # the report can be re-rendered from the saved JSON alone, identically
    again = results["_out"] / "again.md"
    bench.main(["--render", str(results["_out"] / "r.json"), "--doc", str(again)])
    assert again.read_text() == report


def test_time_variants_interleaves() -> None:
    calls: list[str] = []
    timings = time_variants(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, retries=0
    )
    # one untimed warm-up each, then a b, then b a (rotating order)
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert set(timings) == {"a", "b"} and len(timings["a"]["times"]) == 2
    assert summary([3.0, 1.0, 2.0])["median"] == 2.0


def test_contended_sample_is_retimed(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import common

    shares = iter([0.9, 0.05])  # first run: another process hogged the CPUs; second: quiet
    monkeypatch.setattr(common.ContentionProbe, "share", lambda self: next(shares))
    calls: list[str] = []
    timings = time_variants({"a": lambda: calls.append("a")}, repeats=1, retries=2)
    assert calls == ["a", "a", "a"]  # warm-up, contended run, retimed run
    assert timings["a"]["contention"] == [0.05]
