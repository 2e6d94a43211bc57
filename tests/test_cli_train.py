"""CLI: steerlab train (vectors and LoReFT) on a tiny model swapped in for the default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import steerlab
from steerlab.cli import app
from steerlab.testing import tiny_model
from steerlab.vectors import SteeringVector

runner = CliRunner()
ITEMS = [
    {"prompt": f"{s} was", "chosen": " good", "rejected": " bad"}
    for s in ("the cat", "the dog", "my house", "the city", "the film")
]


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> Any:
    lm = tiny_model("llama")
    monkeypatch.setattr(steerlab, "load_model", lambda name=None, **kw: lm)
    return lm


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    return path


def test_train_writes_the_library_vector(model: Any, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.safetensors"
    args = ["train", "-d", str(data), "-l", "1", "--steps", "3", "--lr", "0.05", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "preference vector at layer 1, 3 steps on 5 items" in result.output
    vec = SteeringVector.load(out)
    want = steerlab.train_vector(model, ITEMS, layer=1, steps=3, lr=0.05)
    assert torch.equal(vec[1], want[1])
    assert vec.metadata["data_hash"] == want.metadata["data_hash"]


def test_train_loreft_with_rank(model: Any, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    args = ["train", "-d", str(data), "-l", "-2", "--rank", "2", "--steps", "2", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    vec = SteeringVector.load(out)
    want = steerlab.train_intervention(model, ITEMS, layer=1, rank=2, steps=2)
    assert all(torch.equal(vec.extras[k][1], want.extras[k][1]) for k in want.extras)


def test_user_mistakes_are_one_line_errors(model: Any, data: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "v.safetensors")
    cases = [
        (["-d", str(data), "-l", "1", "--objective", "dpo"], 2, "objective must be one of"),
        (["-d", str(data), "-l", "9"], 2, "layer 9 is out of range"),
        (["-d", str(data), "-l", "1", "--steps", "0"], 2, "steps must be a positive integer"),
        (["-d", str(data), "-l", "1", "--rank", "2", "--objective", "preference"], 2, "--rank"),
        (["-d", str(tmp_path / "none.jsonl"), "-l", "1"], 1, "none.jsonl"),
    ]
    for extra, code, message in cases:
        result = runner.invoke(app, ["train", *extra, "-o", out])
        assert result.exit_code == code, (extra, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
        assert "Traceback" not in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b"}\n')
    result = runner.invoke(app, ["train", "-d", str(bad), "-l", "1", "-o", out])
    assert result.exit_code == 1 and "line 1" in result.stderr and "rejected" in result.stderr
    assert set(tmp_path.iterdir()) == {data, bad}, "nothing written"


def test_ctrl_c_writes_the_vector_so_far_and_nothing_partial(
    model: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = steerlab.train_vector

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        def stop(step: int, loss: float) -> None:
            if step == 2:
                raise KeyboardInterrupt

        return real(*args, **{**kwargs, "progress": stop})

    monkeypatch.setattr(steerlab, "train_vector", interrupted)
    out = tmp_path / "v.safetensors"
    result = runner.invoke(
        app, ["train", "-d", str(data), "-l", "1", "--steps", "9", "-o", str(out)]
    )
    assert result.exit_code == 130, result.output
    assert "interrupted after 2 of 9 steps" in result.stderr
    vec = SteeringVector.load(out)
    assert vec.metadata["interrupted"] is True and vec.metadata["steps"] == 2
    assert torch.equal(vec[1], real(model, ITEMS, layer=1, steps=2)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefs.jsonl", "v.safetensors"]


def test_generate_with_a_loreft_file_needs_op_loreft(model: Any, tmp_path: Path) -> None:
    out = tmp_path / "reft.safetensors"
    steerlab.train_intervention(model, ITEMS, layer=1, rank=1, steps=1).save(out)
    base = ["generate", "the cat", "--vector", str(out), "--max-new-tokens", "3"]
    for extra, op in (([], "add"), (["--op", "add"], "add"), (["--op", "ablate"], "ablate")):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "--op loreft" in lines[0]
        assert f"op {op!r}" in lines[0]
        assert "Traceback" not in result.output and result.stdout == ""
    result = runner.invoke(app, [*base, "--op", "loreft"])
    assert result.exit_code == 0, result.output
    want = model.generate(
        ["the cat"],
        steering=steerlab.Steering(SteeringVector.load(out), op="loreft"),
        max_new_tokens=3,
    )
    assert result.stdout == f"the cat{want[0]}\n"
