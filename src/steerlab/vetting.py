"""Checking steering against a model before it runs: vectors made for another model, a
direction to ablate being added, a LoReFT vector under another operator, and what a persistent
edit may hold.

:meth:`~steerlab.model.SteeredModel.check_vectors` and :func:`steerlab.model.edit` delegate here.

>>> import torch, steerlab as sl
>>> from steerlab.testing import tiny_model
>>> model = tiny_model("gpt2")
>>> check_vectors(model, [sl.Steering(sl.SteeringVector({1: torch.ones(32)}))], checked=set())
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableSet, Sequence
from typing import Any

from steerlab.deprecation import loose_steering_keywords, warn_deprecated
from steerlab.dispatch import Intervention
from steerlab.errors import InvalidInputError, VectorMismatchError
from steerlab.operators import loreft_op_refusal
from steerlab.positions import PositionSpec
from steerlab.steering import RowSteering, Steering, normalize_steering, steering_with
from steerlab.vectors import SteeringVector

__all__ = [
    "LOOSE_KEYWORDS",
    "check_vectors",
    "checked_steering",
    "edit_interventions",
    "fold_loose",
]

LOOSE_KEYWORDS = ("strength", "positions", "op", "when")
"""The loose steering keywords, deprecated where a call takes ``steering=``."""


def check_vectors(
    model: Any,
    interventions: Sequence[Intervention],
    *,
    checked: MutableSet[SteeringVector],
    force: bool = False,
) -> None:
    """Refuse steering vectors unfit for ``model`` (see
    :meth:`~steerlab.model.SteeredModel.check_vectors`); a vector that passes without ``force``
    is added to ``checked`` and not checked against the model again.
    """
    steerings: list[Steering] = []
    for item in interventions:
        if isinstance(item, Steering):
            steerings.append(item)
        elif isinstance(item, RowSteering):
            steerings.extend(row for row in item.rows if row is not None)
    for steering in steerings:
        vector = steering.vector
        # such a vector ablates by default (op=None); only an explicit op="add" adds it
        if vector.metadata.get("operation") == "project_out" and steering.resolved_op == "add":
            message = (
                "this vector is marked operation='project_out' (a direction to ablate): "
                "project it out with sl.DirectionalAblation(vec), or mark it for steering "
                "with vec.with_metadata(operation='add')"
            )
            if not force:
                raise VectorMismatchError(message + " (or pass force=True to add it anyway)")
            warnings.warn("adding " + message, stacklevel=4)
        op = steering.resolved_op
        refusal = loreft_op_refusal(vector, op)
        if refusal is not None:
            message = refusal + (" (op=None means 'add')" if steering.op is None else "")
            if not force:
                raise VectorMismatchError(
                    message + f"; or pass force=True to apply op {op!r} to Rᵀb anyway"
                )
            doing = "adding Rᵀb" if op == "add" else f"applying op {op!r} to Rᵀb"
            warnings.warn(f"{doing}: {message}", stacklevel=4)
        if vector in checked:
            continue
        vector.check_compatible(model, force=force)
        if not force:  # a forced vector is checked (and warned about) again next time
            checked.add(vector)


def edit_interventions(
    steering: Any,
    *,
    strength: float | Mapping[int, float] | None = None,
    positions: PositionSpec | None = None,
    layers: Sequence[int] | None = None,
    tokenizer: Any = None,
) -> list[Intervention]:
    """The interventions of a persistent edit (see :func:`steerlab.model.edit`): ``steering``
    (one item, or a tuple of them, deprecated) normalized; a per-row list, or a LoReFT vector
    whose op is not ``"loreft"``, refused.

    >>> import torch, steerlab as sl
    >>> [type(i).__name__ for i in edit_interventions(sl.SteeringVector({0: torch.ones(4)}))]
    ['Steering']
    """
    if isinstance(steering, list):
        raise InvalidInputError(
            "a per-row list cannot be a persistent edit (rows change from call to call); pass "
            "one intervention, and chain model.edit(a).edit(b) to stack edits"
        )
    loose_steering_keywords("edit", strength=strength, positions=positions, layers=layers)
    if isinstance(steering, tuple):
        warn_deprecated("edit(model, (a, b))", "model.edit(a).edit(b)")
    items = list(steering) if isinstance(steering, tuple) else [steering]
    new: list[Intervention] = []
    for item in items:
        new.extend(
            normalize_steering(
                item,
                strength=strength,
                positions=positions,
                layers=layers,
                tokenizer=tokenizer,
            )
        )
    for item in new:
        refusal = (
            loreft_op_refusal(item.vector, item.resolved_op) if isinstance(item, Steering) else None
        )
        if refusal is not None:
            raise VectorMismatchError(
                refusal + ": edit with model.edit(sl.Steering(vec, op='loreft'))"
            )
    return new


def checked_steering(
    model: Any,
    steering: Any,
    *,
    strength: float | Mapping[int, float] | None,
    positions: PositionSpec | None,
    layers: Sequence[int] | None,
    op: str | None,
    when: Any,
    force: bool,
    checked: MutableSet[SteeringVector],
) -> list[Intervention]:
    """``steering`` as interventions, its vectors checked against ``model`` (``steer`` and
    ``add_steering`` differ only in the scope they activate them in)."""
    interventions = normalize_steering(
        steering,
        strength=strength,
        positions=positions,
        layers=layers,
        op=op,
        when=when,
        tokenizer=model.tokenizer,
    )
    check_vectors(model, interventions, checked=checked, force=force)
    return interventions


def fold_loose(call: str, steering: Any, **loose: Any) -> Any:
    """``steering`` with the deprecated loose keywords of ``call`` folded in (warning once).

    >>> fold_loose("logits", None) is None
    True
    """
    loose_steering_keywords(call, **loose)
    return steering_with(steering, **loose)
