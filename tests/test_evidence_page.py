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


def test_caa_moves_counts_cells_beyond_two_standard_errors_within_the_budget() -> None:
    def point(m: float, p: float, sem: float, kl: float) -> dict[str, float]:
        return {"multiplier": m, "p_matching": p, "p_sem": sem, "kl_neutral": kl}

    result = {
        "behaviour": "b",
        "results": [
            point(0.0, 0.50, 0.03, 0.0),
            # 2 se of the difference: 2 * sqrt(0.03² + 0.04²) = 0.10
            point(1.0, 0.61, 0.04, 0.1),  # moves
            point(-1.0, 0.41, 0.04, 0.1),  # 0.09: does not
            point(8.0, 0.90, 0.04, 3.0),  # beyond, but over the damage budget
        ],
        "trained": {
            "loss_curve": [1.386] * 6,
            "results": [point(0.0, 0.50, 0.03, 0.0), point(-1.0, 0.30, 0.04, 0.2)],
        },
    }
    assert evidence.caa_moves([result]) == [
        "b mean diff x+1: 0.500 -> 0.610 (KL 0.10)",
        "b trained x-1: 0.500 -> 0.300 (KL 0.20)",
    ]
    text = "\n".join(evidence.reading_lines([result], []))
    assert (
        "Of the 3 test cells" in text
    )  # x+8 is over the budget and ", 2 differ from unsteered" in text
    assert "1 of 1 (b)" in text  # the flat loss curve


def test_iti_lines_and_a_run_cut_short() -> None:
    rows = [
        {**_row("prompting", 0.20, 0.03, 0.0), "strength": 0.0, "concept": 0.2},
        {**_row("mean_diff", 0.30, 0.04, 0.3), "strength": 0.2, "concept": 0.3},
        {**_row("iti", 0.45, 0.05, 0.4), "strength": 2.0, "concept": 0.5, "wrong_way": 0.1},
    ]
    result = {
        "concept": "food",
        "rows": rows,
        "iti": {"k": 16, "heads": {"3": [5]}, "accuracy": {"3.5": 0.9}, "seconds": 12},
    }
    text = "\n".join(evidence.iti_lines([result]))
    # vs mean_diff: 0.45 - 0.30 ± sqrt(0.05² + 0.04²); vs prompting: 0.25 ± sqrt(0.05² + 0.03²)
    assert (
        "| food | 2 | 0.50 | 0.450 ± 0.050 | 0.400 | 0.10 | 0.300 | 0.300 | +0.150 ± 0.064 "
        "| +0.250 ± 0.058 | 3.5: 0.90 | 12 |" in text
    )
    assert evidence.iti_lines([{"concept": "x", "rows": rows}]) == []
    meta = {"concept_run": {"started": "t0", "sizes": "S", "command": "c"}}
    line = evidence._run_line(meta, "concept", "Concept part")
    assert line.startswith("Concept part: started t0 and stopped before it finished")


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
        iti = rows.get("iti")
        if iti is not None:
            assert f"| {result['concept']} | iti | {iti['strength']:g} |" in page
            assert f"| {result['concept']} | {iti['strength']:g} | {iti['concept']:.2f} |" in page
    if concepts:
        assert f"A trained method wins on {len(wins)} of {len(concepts)} concepts" in page
