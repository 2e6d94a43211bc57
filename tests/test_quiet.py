"""Library calls are quiet unless watched: bars only on a terminal, for long work only."""

from __future__ import annotations

import io
import sys

import pytest

import steerlab as sl
from steerlab import progress
from steerlab.testing import tiny_model

PROMPTS = [f"the cat sat on day {w}" for w in ("one", "two", "three", "four", "five", "six")]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_long_work_from_a_script_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    model = tiny_model("gpt2")
    capfd.readouterr()
    model.activations(PROMPTS, layers=[1], batch_size=1)
    sl.compute_means(model, PROMPTS, layers=[1], batch_size=1)
    sl.mean_diff(model, PROMPTS[:3], PROMPTS[3:], layers=[1], batch_size=1)
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""


def test_a_terminal_sees_bars_for_long_work_only(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress.progress_bar(10, "work", None)
    assert not bar.disable and bar.delay == progress._PROGRESS_DELAY_S > 0
    bar.close()
    one_step = progress.progress_bar(1, "work", None)
    assert one_step.disable  # a single step is not long work
    one_step.close()
    # Past the delay the bar is drawn on the terminal.
    monkeypatch.setattr(progress, "_PROGRESS_DELAY_S", 0.0)
    tiny_model("gpt2").activations(PROMPTS, layers=[1], batch_size=1)
    assert "activations" in terminal.getvalue()


def test_progress_flag_overrides_the_terminal_check(monkeypatch: pytest.MonkeyPatch) -> None:
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    assert progress.progress_bar(10, "work", None).disable
    forced = progress.progress_bar(1, "work", True)
    assert not forced.disable and forced.delay == 0
    forced.close()
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert progress.progress_bar(10, "work", False).disable


def test_interactive_follows_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert progress.interactive()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.interactive()
    monkeypatch.setattr(sys, "stderr", None)
    assert not progress.interactive()
