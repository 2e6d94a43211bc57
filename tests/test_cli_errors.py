"""Issue 9 part 5: the CLI never prints a traceback for a user's mistake.

The per-case table (missing/corrupt vector, ``-s nan``, ``--layers 99``, other-model vector,
empty prompt, missing model, output paths, markup in prompts, ...) lives in
``tests/attack_table.py`` and runs in ``test_errors.py``; here: the central handler itself
(exit codes, ``--debug``, ``STEERLAB_DEBUG``), a real process, and that new commands get it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import steerlab as sl
from steerlab.cli import ErrorHandlingGroup, app, exit_code_for
from steerlab.testing import tiny_model

SRC = Path(__file__).resolve().parents[1] / "src"


def _corrupt_file(tmp_path: Path) -> Path:
    data = sl.SteeringVector({1: torch.ones(4)}).save(tmp_path / "v.safetensors").read_bytes()
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(data[:-3])
    return path


def test_error_is_one_line_on_stderr_with_exit_code_1(tmp_path: Path) -> None:
    corrupt = _corrupt_file(tmp_path)
    result = CliRunner().invoke(app, ["analyze", str(corrupt), "--no-lens"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert str(corrupt) in result.stderr and "truncated" in result.stderr
    assert "Traceback" not in result.output


def test_bad_usage_exits_2_and_points_to_help() -> None:
    result = CliRunner().invoke(app, ["export-gguf", "--frobnicate"])
    assert result.exit_code == 2
    assert result.stderr.strip().split("\n") == [
        "error: No such option: --frobnicate (see 'steerlab export-gguf --help')"
    ]


@pytest.mark.parametrize("how", ["flag-after", "flag-before", "env"])
def test_debug_shows_the_traceback(tmp_path: Path, how: str) -> None:
    corrupt = str(_corrupt_file(tmp_path))
    args = ["analyze", corrupt, "--no-lens"]
    env = {}
    if how == "flag-after":
        args.append("--debug")
    elif how == "flag-before":
        args.insert(0, "--debug")
    else:
        env["STEERLAB_DEBUG"] = "1"
    result = CliRunner().invoke(app, args, env=env)
    # with --debug the exception propagates (CliRunner catches it; a shell prints it)
    assert isinstance(result.exception, sl.VectorFileError)
    assert result.exit_code == 1


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    corrupt = str(_corrupt_file(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("STEERLAB_DEBUG", None)
    code = "from steerlab.cli import main; main()"
    quiet = subprocess.run(
        [sys.executable, "-c", code, "analyze", corrupt, "--no-lens"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert quiet.returncode == 1
    assert quiet.stderr.strip().split("\n") == [quiet.stderr.strip()]
    assert "Traceback" not in quiet.stderr and "truncated" in quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-c", code, "analyze", corrupt, "--no-lens", "--debug"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert loud.returncode == 1
    assert "Traceback" in loud.stderr and "VectorFileError" in loud.stderr


def test_unexpected_errors_are_one_line_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("something deep broke")

    monkeypatch.setattr(sl, "load_model", broken)
    result = CliRunner().invoke(app, ["generate", "hi"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: internal error (RuntimeError: something deep broke); rerun with --debug for "
        "the traceback"
    )


def test_a_new_command_gets_the_handler_for_free() -> None:
    """Commands other branches add (serve, eval, ...) register on the same app: no try/except."""

    def shout(word: str) -> None:
        raise sl.InvalidInputError(f"cannot shout {word!r}")

    local = typer.Typer(cls=ErrorHandlingGroup)
    local.command("shout")(shout)
    local.command("other")(lambda: None)
    result = CliRunner().invoke(local, ["shout", "x"])
    assert (result.exit_code, result.stderr) == (2, "error: cannot shout 'x'\n")


def test_exit_codes() -> None:
    assert exit_code_for(sl.InvalidInputError("x")) == 2
    assert exit_code_for(sl.LayerIndexError("x")) == 2
    assert exit_code_for(sl.VectorFileNotFoundError("x")) == 2
    assert exit_code_for(sl.VectorFileError("x")) == 1
    assert exit_code_for(sl.VectorMismatchError("x")) == 1
    assert exit_code_for(sl.FileWriteError("x")) == 1
    assert exit_code_for(KeyboardInterrupt()) == 130
    assert exit_code_for(RuntimeError("x")) == 1


def test_compare_output_keeps_brackets_when_piped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model = tiny_model("llama")
    monkeypatch.setattr(sl, "load_model", lambda *a, **k: model)
    vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    file = str(vec.save(tmp_path / "v.safetensors"))
    prompt = "[bold]x[/y]"
    args = ["generate", prompt, "-v", file, "--compare", "--max-new-tokens", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"prompt: {prompt}" in result.stdout
    steered = model.generate(prompt, max_new_tokens=2, steering=vec)
    assert f"steered (x1): {steered}" in result.stdout
