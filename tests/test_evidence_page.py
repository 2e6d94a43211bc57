"""The evidence page generator (benchmarks/evidence.py) on hand-made results: the CAA table
reports the validation gap that chose the layer beside the test numbers and the paper's row."""

from __future__ import annotations

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
