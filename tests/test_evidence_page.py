"""The evidence page generator (benchmarks/evidence.py) on hand-made results: the CAA table
reports the validation gap that chose the layer beside the test numbers and the paper's row."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import evidence  # noqa: E402

from _caa_data import write_caa  # noqa: E402


def _points(p: list[float], sem: float) -> list[dict[str, float]]:
    return [
        {"multiplier": m, "p_matching": x, "n": 16, "p_sem": sem}
        for m, x in zip((-1.0, 0.0, 1.0), p, strict=True)
    ]


def test_caa_table_row_and_summary(tmp_path: Path) -> None:
    data = write_caa(tmp_path / "CAA")
    (data / evidence.PAPER_TSV).write_text(
        "# comment\nbehavior\tsystem_prompt\tmultiplier\tp_matching\tsource_commit\n"
        "sycophancy\tNone\t-1.0\t0.637\tx\nsycophancy\tNone\t0.0\t0.757\tx\n"
        "sycophancy\tNone\t1.0\t0.814\tx\nsycophancy\tpos\t1.0\t0.9\tx\n"
    )
    result = {
        "behaviour": "sycophancy",
        "layer": 6,
        "model": "m",
        "results": _points([0.4, 0.5, 0.6], 0.03),
        "layer_sweep": [{"layer": 6, "results": _points([0.4, 0.5, 0.6], 0.03)}],
        "validation_sweep": [
            {"layer": 3, "results": _points([0.5, 0.5, 0.55], 0.02)},
            {"layer": 6, "results": _points([0.45, 0.5, 0.7], 0.02)},
        ],
    }
    run = {"when": "now", "seconds": 600, "load_average": [2.0, 3.5], "sizes": "S", "command": "c"}
    meta = {"model": "m", "n_layers": 30, "machine": "x", "data": str(data), "caa_run": run}
    page = evidence.render([result], [], meta)
    # layer, validation gap (0.70 - 0.45), test cells, test gap ± sqrt(0.03² + 0.03²), paper
    assert (
        "| sycophancy | 6 | +0.250 | 0.400 | 0.500 | 0.600 | +0.200 ± 0.042 | 0.637 | 0.757 "
        "| 0.814 |" in page
    )
    assert "the test gap exceeds twice its standard error for 1 (sycophancy)" in page
    assert (
        "CAA part: finished now, 10 min wall, load average 2 at the start and 3.5 at the end"
        in page
    )
    assert "Concept part: not run." in page
    assert "Not run in this budget: coordinate-other-ais" in page


def _row(name: str, combined: float, sem: float, kl: float | None) -> dict[str, object]:
    return {"name": name, "combined": combined, "combined_sem": sem, "kl_neutral": kl}


def test_beats_prompting_needs_one_standard_error_and_small_damage() -> None:
    prompting = _row("prompting", 0.50, 0.03, None)
    # margin sqrt(0.03² + 0.04²) = 0.05: 0.56 is beyond it, 0.54 is not; KL 0.6 > 0.5 fails
    result = {
        "concept": "c",
        "rows": [
            prompting,
            _row("trained", 0.56, 0.04, 0.2),
            _row("loreft", 0.54, 0.04, 0.2),
            _row("pca", 0.90, 0.04, 0.6),
        ],
    }
    assert evidence.beats_prompting(result, "trained") is True
    assert evidence.beats_prompting(result, "loreft") is False
    assert evidence.beats_prompting(result, "pca") is False
    assert evidence.beats_prompting(result, "probe") is None
    lines = "\n".join(evidence.concept_target_lines([result]))
    assert "trained 1 of 1 (c); loreft 0 of 1 (none); pca 0 of 1 (none)" in lines
    assert "the target is **not met**" in lines  # one concept of the five asked for


def _load(name: str) -> list[dict[str, object]]:
    path = ROOT / "docs" / "evidence" / name
    return json.loads(path.read_text()) if path.is_file() else []


def test_published_page_matches_its_json() -> None:
    """docs/evidence.md's trained-vector rows, larger multipliers and the target count are the
    ones its JSON gives (computed here directly, not through the renderer's helpers)."""
    page = (ROOT / "docs" / "evidence.md").read_text()
    for r in _load("caa.json"):
        t = r.get("trained")
        if not t:
            continue
        p = {x["multiplier"]: x for x in t["results"]}
        gap = p[1.0]["p_matching"] - p[-1.0]["p_matching"]
        curve = t["loss_curve"]
        assert f"| {r['behaviour']} | {r['layer']} |" in page
        assert f"| {p[-1.0]['p_matching']:.3f} | {p[0.0]['p_matching']:.3f} |" in page
        assert f"{gap:+.3f} ± " in page
        assert (
            f"{sum(curve[:5]) / len(curve[:5]):.3f} → {sum(curve[-5:]) / len(curve[-5:]):.3f}"
            in page
        )
        for x in r["results"]:
            if abs(x["multiplier"]) > 1:
                assert f"{x['p_matching']:.3f} ({x['kl_neutral']:.2f})" in page
    concepts = _load("concepts.json")
    wins = set()
    for result in concepts:
        rows = {row["name"]: row for row in result["rows"]}
        base = rows["prompting"]
        for name in ("trained", "loreft"):
            row = rows.get(name)
            if row is None:
                continue
            margin = math.sqrt(row["combined_sem"] ** 2 + base["combined_sem"] ** 2)
            if row["combined"] - base["combined"] > margin and row["kl_neutral"] <= 0.5:
                wins.add(result["concept"])
            assert f"| {result['concept']} | {name} | {row['strength']:g} |" in page
            if row.get("wrong_way") is not None:
                assert f"| {row['wrong_way']:.2f} |" in page
    if concepts:
        assert f"A trained method wins on {len(wins)} of {len(concepts)} concepts" in page
