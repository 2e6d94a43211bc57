"""Every command that loads a model says what is wrong with ``--model`` in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import steerlab as sl
from steerlab.cli import app


def _commands(tmp_path: Path) -> dict[str, list[str]]:
    vec = tmp_path / "v.safetensors"
    sl.SteeringVector({1: torch.ones(32)}).save(vec)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the capital of france is\n")
    out = str(tmp_path / "out")
    return {
        "demo": ["demo"],
        "generate": ["generate", "the cat"],
        "compute": ["compute", "-d", "sentiment", "-o", str(tmp_path / "c.safetensors")],
        "scan": ["scan", "-d", "sentiment"],
        "sweep": ["sweep", "-d", "sentiment", "--out", out],
        "ablate": ["ablate", "-f", str(prompts), "--target", " paris", "--foil", " x", "-o", out],
        "bake": ["bake", str(vec), "--strength", "2", "--out", out],
    }


@pytest.mark.parametrize(
    "command", ["demo", "generate", "compute", "scan", "sweep", "ablate", "bake"]
)
@pytest.mark.parametrize("problem", ["missing", "not-a-model", "fake-gguf"])
def test_a_bad_model_path_is_one_line_not_a_traceback(
    command: str, problem: str, tmp_path: Path
) -> None:
    if problem == "missing":
        model, expected = tmp_path / "nowhere", "no such file or folder"
    elif problem == "not-a-model":
        model, expected = tmp_path / "empty", "holds no model"
        model.mkdir()
    else:
        model, expected = tmp_path / "m.gguf", "not a GGUF file"
        model.write_text("{}")
    args = [*_commands(tmp_path)[command], "--model", str(model)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "error:" in result.output and expected in result.output
    assert "Traceback" not in result.output
