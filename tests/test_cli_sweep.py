"""``steerlab sweep``: end to end on a tiny saved model, and its argument checking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steerlab.cli import app
from steerlab.testing import tiny_hf_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_sweep_end_to_end(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            "--model", str(model_dir),
            "--layers", "0-2",
            "--strengths", "-4,4",
            "--max-kl", "0.05",
            "--seed", "7",
            "--examples", "1",
            "--max-new-tokens", "3",
            "--out", str(out),
            "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "recommended: layer" in result.output and "held-out (12 prompts)" in result.output
    assert "layer 2" in result.output and "s=-4" in result.output
    for name in ("sweep.json", "sweep.csv", "curves.png", "heatmap.png", "report.html"):
        assert (out / name).is_file(), name
    data = json.loads((out / "sweep.json").read_text())
    assert data["settings"]["layers"] == [0, 1, 2]
    assert data["settings"]["strengths"] == [-4.0, 0.0, 4.0]
    assert data["settings"]["seed"] == 7 and data["max_kl"] == 0.05
    assert f"wrote html: {out / 'report.html'}" in result.output


def test_sweep_with_user_words_and_prompts(model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie was\nthe food was\n\nmy day was\nthe city is\n")
    result = CliRunner().invoke(
        app,
        [
            "sweep", "--model", str(model_dir), "--layers", "1", "--strengths", "2",
            "--eval-prompts", str(prompts), "--target-words", "good, great",
            "--contrast-words", "bad", "--examples", "0", "--out", str(tmp_path / "o"),
            "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert sorted(data["settings"]["train_prompts"] + data["settings"]["test_prompts"]) == sorted(
        ["the movie was", "the food was", "my day was", "the city is"]
    )
    assert len(data["settings"]["behaviour_options"]["target_ids"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strengths", "1,x"], "not a number"),
        (["--layers", "3-1"], "empty range"),
        (["--layers", "a"], "not a layer"),
        (["--mode", "fast"], "mode must be one of"),
        (["--positions", "1:2:3:4"], "--positions: unknown spec"),
        (["--max-kl", "-1"], "non-negative"),
    ],
)
def test_sweep_rejects_bad_arguments(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["sweep", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_sweep_reports_library_errors_without_a_traceback(model_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["sweep", "--model", str(model_dir), "--data", str(tmp_path / "missing.jsonl"),
         "--out", str(tmp_path / "o"), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "error:" in result.output and "missing.jsonl" in result.output
    assert "Traceback" not in result.output


def test_sweep_help_documents_every_option() -> None:
    result = CliRunner().invoke(app, ["sweep", "--help"])
    assert result.exit_code == 0
    for option in ("--data", "--layers", "--strengths", "--max-kl", "--mode", "--out"):
        assert option in result.output
