"""The CLI's core commands, on a tiny model (the loader is patched; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import steerlab as sl
from steerlab.cli import app
from steerlab.testing import tiny_model


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> sl.SteeredModel:
    model = tiny_model("llama")
    monkeypatch.setattr(sl, "load_model", lambda *a, **k: model)
    return model


def test_help_everywhere() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "generate"):
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "--model" in sub.output


def test_generate_steered_matches_library(patched: sl.SteeredModel, tmp_path: Path) -> None:
    vec = sl.SteeringVector(
        {1: torch.randn(patched.d_model, generator=torch.Generator().manual_seed(0))}
    )
    file = tmp_path / "v.safetensors"
    vec.save(file)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "generate",
            "the cat sat",
            "--vector",
            str(file),
            "--strength",
            "3",
            "--positions",
            "last",
            "--max-new-tokens",
            "5",
            "--force",
        ],
    )
    assert result.exit_code == 0, result.output
    expected = patched.generate(
        "the cat sat", max_new_tokens=5, steering=vec.scaled(3.0), positions="last"
    )
    assert ("the cat sat" + expected).split() == result.output.split()


def test_generate_unsteered(patched: sl.SteeredModel) -> None:
    result = CliRunner().invoke(app, ["generate", "a dog", "--max-new-tokens", "4"])
    assert result.exit_code == 0
    assert result.output.split() == ("a dog" + patched.generate("a dog", max_new_tokens=4)).split()
