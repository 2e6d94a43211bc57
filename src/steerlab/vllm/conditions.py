"""``when=`` conditions on vLLM: their wire form and the gates that apply them in a step.

A steering entry may carry ``"when": {"direction": [...], "layer": A, "threshold": t,
"comparison": "greater" | "less", "scope": "prompt" | "token"}``, a
:class:`~steerlab.conditions.Condition` as JSON. Inside the worker, each such entry of each
request of a step becomes a :class:`Gate`: at layer ``A`` (the residual stream after block
``A``, before any steering there, as the library's probe reads it) the gate scores the
request's tokens with :func:`~steerlab.conditions.condition_score` and decides which of them
the entry may edit at its layers (all ``>= A``, as in the library):

* ``scope="token"``: each token by its own score;
* ``scope="prompt"`` (CAST): the whole request by the score of its prompt's mean hidden
  state, decided in the forward pass that holds the whole prompt and kept for every later step
  of the request. A prompt split over several passes (chunked prefill) cannot be decided: the
  entry is then not applied and the worker logs why. A prompt whose blocks came from the prefix
  cache reuses the verdict of the request that computed them (the cache keys such blocks by the
  whole prompt, :mod:`steerlab.vllm.cache`, so the verdict is the same).

>>> import torch
>>> from steerlab.conditions import Condition
>>> wire = condition_to_wire(Condition(torch.tensor([1.0, 0.0]), layer=1, threshold=0.5))
>>> back = condition_from_wire(wire)
>>> back.layer, back.threshold, back.comparison, back.scope
(1, 0.5, 'greater', 'prompt')
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from steerlab.conditions import Condition, condition_score
from steerlab.errors import InvalidInputError, VectorMismatchError

__all__ = [
    "Gate",
    "GatedEdit",
    "check_gated_layers",
    "condition_digest",
    "condition_from_wire",
    "condition_to_wire",
]

_FIELDS = {"direction", "layer", "threshold", "comparison", "scope"}


def condition_to_wire(condition: Condition) -> dict[str, Any]:
    """The JSON form of a condition (float32 directions survive the round trip exactly)."""
    return {
        "direction": condition.direction.to(torch.float32).tolist(),
        "layer": int(condition.layer),
        "threshold": float(condition.threshold),
        "comparison": condition.comparison,
        "scope": condition.scope,
    }


def condition_from_wire(raw: Any) -> Condition:
    """A :class:`~steerlab.conditions.Condition` from its JSON form (bad input raises
    :class:`~steerlab.errors.InvalidInputError` naming the field).

    >>> condition_from_wire({"direction": [1.0], "layer": 0})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: steering 'when' must be {'direction', 'layer', ...
    """
    if (
        not isinstance(raw, Mapping)
        or not {"direction", "layer", "threshold"} <= set(raw)
        or (set(raw) - _FIELDS)
    ):
        raise InvalidInputError(
            "steering 'when' must be {'direction', 'layer', 'threshold'} and optionally "
            "'comparison' and 'scope'"
        )
    try:
        direction = torch.tensor(raw["direction"], dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"when.direction must be a list of numbers: {error}") from None
    try:
        return Condition(
            direction,
            layer=raw["layer"],
            threshold=raw["threshold"],
            comparison=raw.get("comparison", "greater"),
            scope=raw.get("scope", "prompt"),
        )
    except (InvalidInputError, VectorMismatchError) as error:
        raise InvalidInputError(f"steering 'when': {error}") from None


def check_gated_layers(
    condition: Condition, params: Mapping[int, Any], *, n_layers: int, d_model: int
) -> None:
    """Refuse a condition the model cannot read, or steering layers below the condition's layer
    (the forward pass reaches them before the condition is read), as the library does.

    >>> c = Condition(torch.ones(2), layer=1, threshold=0.0)
    >>> check_gated_layers(c, {0: {}}, n_layers=3, d_model=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: a condition read at layer 1 cannot gate steering at ...
    """
    if condition.direction.shape[0] != d_model:
        raise VectorMismatchError(
            f"the condition's direction has size {condition.direction.shape[0]} but the "
            f"model's hidden size is {d_model}"
        )
    if condition.layer >= n_layers:
        raise VectorMismatchError(
            f"the condition reads layer {condition.layer} but the model has {n_layers}"
        )
    below = sorted(layer for layer in params if layer < condition.layer)
    if below:
        raise InvalidInputError(
            f"a condition read at layer {condition.layer} cannot gate steering at layers "
            f"{below} below it (the forward pass reaches them first); fit the condition with "
            f"layers=[...] below the steering layers"
        )


def condition_digest(condition: Condition) -> bytes:
    """A digest of what the condition decides by (prefix-cache keys, shared verdicts)."""
    hasher = hashlib.sha256(repr(sorted(condition_to_wire(condition).items())[1:]).encode())
    hasher.update(condition.direction.to(torch.float32).contiguous().numpy().tobytes())
    return hasher.digest()


@dataclasses.dataclass
class Gate:
    """One conditioned entry of one request in one step: rows ``start:stop`` of the flattened
    batch. ``whole_prompt`` is the prompt's length when this step holds the whole prompt and the
    verdict is still open (``0`` otherwise); ``verdict`` is a verdict known from an earlier step.
    :meth:`evaluate` fills ``mask`` (over the whole flattened batch) at the condition's layer.

    >>> c = Condition(torch.tensor([1.0, 0.0]), layer=0, threshold=0.5, scope="token")
    >>> gate = Gate(c, start=1, stop=3)
    >>> gate.evaluate(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    >>> gate.mask.tolist()
    [False, True, False]
    """

    condition: Condition
    start: int
    stop: int
    whole_prompt: int = 0
    verdict: bool | None = None
    decided: bool = False  # whether evaluate() decided the verdict in this step
    mask: torch.Tensor | None = None

    def evaluate(self, stream: torch.Tensor) -> None:
        """Decide, from the residual stream ``[tokens, d_model]`` at the condition's layer."""
        condition = self.condition
        hidden = stream[self.start : self.stop].to(torch.float32)
        direction = condition.direction.to(hidden.device)
        if condition.scope == "token":
            fired = condition.test(condition_score(hidden, direction))
        else:
            if self.verdict is None and self.whole_prompt:
                pooled = hidden[: self.whole_prompt].sum(dim=0) / self.whole_prompt
                self.verdict = bool(condition.test(condition_score(pooled[None], direction))[0])
                self.decided = True
            fired = torch.full((self.stop - self.start,), bool(self.verdict), device=hidden.device)
        mask = torch.zeros(stream.shape[0], dtype=torch.bool, device=stream.device)
        mask[self.start : self.stop] = fired
        self.mask = mask


@dataclasses.dataclass(frozen=True)
class GatedEdit:
    """An operator applied at one layer to those of ``rows`` (flattened batch, on the CPU)
    where ``gate`` fired."""

    rows: torch.Tensor
    op: str
    params: Mapping[str, torch.Tensor]
    gate: Gate

    def fired_rows(self, device: torch.device) -> torch.Tensor:
        """The rows the gate let through (empty when it did not run on this rank)."""
        mask = self.gate.mask
        rows = self.rows.to(device)
        if mask is None:
            return rows[:0]
        return rows[mask.to(device).index_select(0, rows)]
