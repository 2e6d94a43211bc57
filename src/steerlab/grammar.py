"""The two small grammars besides positions: layer lists and strengths.

One parser per grammar, called by every front end (library, CLI, server, vLLM wire), so each
accepts the same forms with the same messages; ``what`` names the argument in the message
(``--layers``, ``steering[0].strength``). Positions have theirs in
:meth:`steerlab.positions.Positions.parse`.

==========================  ============================================================
layer list                  layers
==========================  ============================================================
``"12"``, ``"8,10,-1"``     those layers (negative ones count from the last)
``"6-12"``, ``"-3--1"``     an inclusive range
``"0:30:3"``                a Python range (stop excluded, step optional)
``"all"``                   every layer of the model (:data:`ALL`)
``"auto"``, ``""``          the command's default (``None``)
==========================  ============================================================

Parts combine with commas (``"2-4,8,-1"``); Python and JSON give a list of ints. A strength is
a finite number or a per-layer map: ``{15: 4.0}``, JSON's ``{"15": 4.0}``, or on the command
line ``4`` and ``15:4,16:2``.

>>> parse_layers("2-4,8,-1", text=True), parse_layers("0:9:4", text=True)
([2, 3, 4, 8, -1], [0, 4, 8])
>>> parse_strength("15:4,16:2", text=True), parse_strength({"15": 4})
({15: 4.0, 16: 2.0}, {15: 4.0})
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from steerlab.checks import as_finite_float, as_int
from steerlab.errors import InvalidInputError

__all__ = ["ALL", "LayerList", "parse_layers", "parse_strength", "resolve_all"]

ALL: Literal["all"] = "all"
"""What :func:`parse_layers` returns for ``"all"``: every layer of the model."""

LayerList = list[int] | Literal["all"] | None
"""A parsed layer list: explicit layers, :data:`ALL`, or ``None`` (the caller's default)."""

_INT = r"-?\d+"
_RANGE = re.compile(rf"({_INT})\s*-\s*({_INT})")
_STEP = re.compile(rf"({_INT})\s*:\s*({_INT})(?:\s*:\s*({_INT}))?")
_LAYER_FORMS = "a layer ('12'), a range ('6-12'), a step ('0:30:3'), 'all' or 'auto'"


def parse_layers(spec: Any, *, what: str = "layers", text: bool = False) -> LayerList:
    """A layer list (an int, a sequence of ints, or with ``text=True`` the text forms) as
    ``[layers]``, ``"all"`` or ``None``.

    Text is the command line's spelling; Python and JSON callers pass numbers (``"4"`` is not
    an int there, as everywhere in steerlab), so text is read only where ``text=True``.

    >>> parse_layers(" 8 - 10 ", text=True), parse_layers([3, -1]), parse_layers(None)
    ([8, 9, 10], [3, -1], None)
    >>> parse_layers("8-x", text=True)
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: layers: '8-x' is not a layer ('12'), a range ...
    """
    if spec is None:
        return None
    if isinstance(spec, str) and text:
        words = spec.strip()
        if words in ("", "auto"):
            return None
        if words == ALL:
            return ALL
        layers: list[int] = []
        for part in (p.strip() for p in words.split(",")):
            if part:
                layers.extend(_layer_part(part, what))
        if not layers:
            raise InvalidInputError(f"{what}: give at least one layer, got {spec!r}")
        return layers
    if isinstance(spec, bool):
        raise InvalidInputError(f"{what} must be layer numbers, got {spec!r}")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (Sequence, torch.Tensor)) and not isinstance(spec, (str, bytes)):
        values = [as_int(v, f"{what}: each layer") for v in spec]
        if not values:
            raise InvalidInputError(f"{what}: the list of layers is empty")
        return values
    raise InvalidInputError(f"{what} must be layer numbers, got {spec!r} ({type(spec).__name__})")


def _layer_part(part: str, what: str) -> list[int]:
    if re.fullmatch(_INT, part):
        return [int(part)]
    match = _RANGE.fullmatch(part)
    if match:
        low, high = int(match.group(1)), int(match.group(2))
        if high < low:
            raise InvalidInputError(f"{what}: empty range {part!r}")
        return list(range(low, high + 1))
    match = _STEP.fullmatch(part)
    if match:
        start, stop = int(match.group(1)), int(match.group(2))
        step = 1 if match.group(3) is None else int(match.group(3))
        if step <= 0:
            raise InvalidInputError(f"{what}: the step of {part!r} must be positive")
        values = list(range(start, stop, step))
        if not values:
            raise InvalidInputError(f"{what}: empty range {part!r}")
        return values
    raise InvalidInputError(f"{what}: {part!r} is not {_LAYER_FORMS}")


def resolve_all(layers: LayerList, n_layers: int) -> list[int] | None:
    """``"all"`` as the list of every layer of a model with ``n_layers``; anything else as is.

    >>> resolve_all("all", 3), resolve_all(None, 3)
    ([0, 1, 2], None)
    """
    if layers == ALL:
        return list(range(n_layers))
    return None if layers is None else list(layers)


def parse_strength(
    value: Any, *, what: str = "strength", text: bool = False
) -> float | dict[int, float]:
    """A strength: one finite number, or a non-empty ``{layer: finite number}`` map.

    Map keys are ints or their decimal text (JSON object keys are strings). With ``text=True``
    (the command line) a string is read too: a number or ``"LAYER:STRENGTH,..."``.

    >>> parse_strength(2), parse_strength(" -1.5 ", text=True)
    (2.0, -1.5)
    >>> parse_strength({"15": float("inf")})
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: strength for layer 15 must be finite, got inf
    """
    if isinstance(value, str) and text:
        words = value.strip()
        if ":" not in words:
            return as_finite_float(_number(words, what), what)
        pairs: dict[str, float] = {}
        for part in (p.strip() for p in words.split(",")):
            key, _, number = part.partition(":")
            if not part or not re.fullmatch(_INT, key.strip()):
                raise InvalidInputError(
                    f"{what}: {part!r} is not LAYER:STRENGTH (e.g. '15:4,16:2')"
                )
            if key.strip() in pairs:
                raise InvalidInputError(f"{what}: layer {key.strip()} is given twice")
            pairs[key.strip()] = _number(number.strip(), f"{what} for layer {key.strip()}")
        value = pairs
    if isinstance(value, Mapping):
        if not value:
            raise InvalidInputError(f"{what}: the per-layer map is empty; give {{layer: strength}}")
        out: dict[int, float] = {}
        for key, number in value.items():
            layer = _layer_key(key, what)
            if layer in out:
                raise InvalidInputError(f"{what}: layer {layer} is given twice")
            out[layer] = as_finite_float(number, f"{what} for layer {layer}")
        return out
    return as_finite_float(value, what)


def _layer_key(key: Any, what: str) -> int:
    if isinstance(key, str) and re.fullmatch(_INT, key.strip()):
        return int(key)
    if isinstance(key, bool) or not isinstance(key, numbers.Integral):
        raise InvalidInputError(
            f"{what}: per-layer keys must be integers (layer numbers), got {key!r}"
        )
    return int(key)


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidInputError(f"{what} must be a number, got {text!r}") from None
