"""Smoke test of the server benchmark harness (benchmarks/server.py) on a tiny model: the
results schema, the ratios and the report section (replaced in place, the rest kept)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import server as bench  # noqa: E402


def test_server_benchmark_harness(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    out = tmp_path / "server.json"
    args = [
        "--model",
        "tiny:llama",
        "--requests",
        "4",
        "--max-tokens",
        "3",
        "--clients",
        "1,2",
        "--doc",
        str(doc),
        "--out",
        str(out),
        "--scenarios",
        "throughput",
    ]
    results = bench.main(args)
    saved = json.loads(out.read_text())
    assert set(saved["summary"]) == {"steered@1", "unsteered@1", "steered@2", "unsteered@2"}
    row = saved["summary"]["steered@2"]
    assert row["tokens"] == results["summary"]["unsteered@2"]["tokens"] > 0
    assert saved["summary"]["steered@1"]["vs_one_at_a_time"] == pytest.approx(1.0)
    assert row["steered_time_ratio"] == pytest.approx(
        saved["summary"]["unsteered@2"]["tokens_per_s"] / row["tokens_per_s"]
    )
    bench.main(args)  # a second run replaces the section instead of appending another
    text = doc.read_text()
    assert text.count(bench.START) == 1 and "kept" in text
    assert "| steered | 2 |" in text and "x one-at-a-time" in text


def test_head_of_line_scenario(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    out = tmp_path / "server.json"
    args = ["--model", "tiny:llama", "--scenarios", "hol", "--streams", "2"]
    args += ["--long-tokens", "60", "--baseline-tokens", "4", "--doc", str(doc), "--out", str(out)]
    results = bench.main(args)["hol"]
    saved = json.loads(out.with_suffix(".hol.json").read_text())
    assert set(saved["modes"]) == {"chunked", "whole"}
    for row in results["modes"].values():
        assert row["baseline_gaps"] >= 2 * 2 and row["during_gaps"] >= 1
        assert row["p95_ratio"] == pytest.approx(row["during_p95_ms"] / row["baseline_p95_ms"])
        assert 40 <= row["long_prompt_tokens"] <= 60
    text = doc.read_text()
    assert text.count(bench.HOL_START) == 1 and "kept" in text and "| whole prompt" in text


def test_engine_against_batched_generate_scenario(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    out = tmp_path / "server.json"
    args = ["--model", "tiny:llama", "--scenarios", "batch", "--batch-clients", "2,3"]
    args += ["--max-tokens", "3", "--doc", str(doc), "--out", str(out)]
    results = bench.main(args)["batch"]
    saved = json.loads(out.with_suffix(".batch.json").read_text())
    assert set(saved["summary"]) == {"steered@2", "unsteered@2", "steered@3", "unsteered@3"}
    for key, row in results["summary"].items():
        engine_run, generate_run = (results["runs"][key][w][0] for w in ("engine", "generate"))
        # the same requests: as many tokens from the engine as from generate_ids
        assert engine_run["tokens"] == generate_run["tokens"] > 0
        assert row["ratio"] == pytest.approx(
            engine_run["tokens_per_s"] / generate_run["tokens_per_s"]
        )
    text = doc.read_text()
    assert text.count(bench.BATCH_START) == 1 and "kept" in text and "| steered | 3 |" in text
