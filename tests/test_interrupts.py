"""A KeyboardInterrupt at any line of the install/activate/remove paths leaves nothing behind.

A trace function raises ``KeyboardInterrupt`` at the N-th line steerlab executes in those paths,
for every N until a run completes without one. After each interrupted run (and, where the
interrupt hit ``remove``, one more ``remove``) the model must carry no active steering, and
its logits must be bit-identical to a clean model's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
import torch

import steerlab as sl
import steerlab.dispatch
import steerlab.editing
import steerlab.model
import steerlab.steering
import steerlab.tracking
from steerlab.interventions import active_trackers
from steerlab.testing import hook_count, tiny_model

PROMPTS = ["the cat sat on the", "a dog"]
_TRACED_FILES = {
    # the three parts of steerlab.interventions
    steerlab.dispatch.__file__,
    steerlab.tracking.__file__,
    steerlab.steering.__file__,
    steerlab.model.__file__,
    steerlab.editing.__file__,
}
_TRACED_FUNCTIONS = {
    # dispatch.py, tracking.py, steering.py: activation machinery (not the hooks' arithmetic)
    "install",
    "activate",
    "scoped_hooks",
    "_prepare",
    "_ensure_dispatchers",
    "remove",
    "__init__",
    "_set_global",
    "_without",
    "build",
    "pushed",
    "discard",
    "items",
    # model.py / editing.py: the scopes around them
    "steer",
    "_call_scope",
    "_activate",
    "add_steering",
    "add_interventions",
    "_call_interventions",
    "_checked",
    "applied",
}


class _Interrupter:
    def __init__(self, at: int) -> None:
        self.at = at
        self.count = 0
        self.fired = False

    def global_trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        if code.co_filename in _TRACED_FILES and code.co_name in _TRACED_FUNCTIONS:
            return self.local_trace
        return None

    def local_trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and not self.fired:
            self.count += 1
            if self.count == self.at:
                self.fired = True
                raise KeyboardInterrupt(f"injected at line event {self.at}")
        return self.local_trace


def _inject(at: int, action: Callable[[], Any]) -> bool:
    """Run ``action`` with an interrupt at line event ``at``; True when it fired."""
    interrupter = _Interrupter(at)
    sys.settrace(interrupter.global_trace)
    try:
        action()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    return interrupter.fired


def _clean(model: sl.SteeredModel, reference: torch.Tensor) -> None:
    assert hook_count(model.hf_model) == 0
    assert active_trackers(model.adapter.backbone) == []
    assert torch.equal(model.logits(PROMPTS), reference)


def _sweep(model: sl.SteeredModel, action: Callable[[], Any], after: Callable[[], None]) -> int:
    reference = model.logits(PROMPTS)
    points = 0
    for at in range(1, 5000):
        fired = _inject(at, action)
        after()
        _clean(model, reference)
        if not fired:
            return points
        points += 1
    raise AssertionError("the traced path never finished")


def test_interrupt_anywhere_in_steer_and_per_call_steering() -> None:
    model = tiny_model("llama")
    vec = sl.SteeringVector({1: torch.ones(model.d_model)})

    def action() -> None:
        with model.steer(vec, strength=2.0, positions="last"):
            model.logits(PROMPTS, steering=vec.scaled(0.5))

    points = _sweep(model, action, lambda: None)
    assert points > 50  # the paths were really traced


def test_interrupt_anywhere_in_add_steering_and_remove() -> None:
    model = tiny_model("gpt2")
    vec = sl.SteeringVector({0: torch.ones(model.d_model)})
    handles: list[Any] = []

    def action() -> None:
        handles.append(model.add_steering(vec, strength=2.0))
        handles[-1].remove()

    def after() -> None:
        # what the caller can do after an interrupt: remove the handle it holds, again
        while handles:
            handles.pop().remove()

    points = _sweep(model, action, after)
    assert points > 10


@pytest.mark.parametrize("scoped", [True, False])
def test_interrupt_anywhere_in_edited_model_steering(scoped: bool) -> None:
    model = tiny_model("gpt2")
    edited = model.edit(sl.SteeringVector({0: torch.ones(model.d_model)}), strength=1.0)
    vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    handles: list[Any] = []
    clean_edited = edited.logits(PROMPTS)

    def action() -> None:
        if scoped:
            with edited.steer(vec, strength=2.0):
                edited.logits(PROMPTS)
        else:
            handles.append(edited.add_steering(vec, strength=2.0))
            edited.logits(PROMPTS)
            handles[-1].remove()

    def after() -> None:
        while handles:
            handles.pop().remove()
        assert torch.equal(edited.logits(PROMPTS), clean_edited)

    assert _sweep(model, action, after) > 10
