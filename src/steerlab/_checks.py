"""Argument checks shared by every public entry point (integers that must really be integers).

Python lets ``int(1.5)`` and ``int(True)`` through silently, so ``layers=[1.5]`` used to mean
layer 1. These helpers refuse anything that is not an integer (numpy and 0-d torch integers are
fine) with :class:`~steerlab.errors.InvalidInputError` naming the argument.

>>> as_int(3, "layer"), as_int(-1, "layer")
(3, -1)
>>> as_int(1.5, "layer")
Traceback (most recent call last):
    ...
steerlab.errors.InvalidInputError: layer must be an integer, got 1.5 (float)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from steerlab.errors import InvalidInputError

__all__ = ["as_int", "as_positive_int", "as_finite_float"]


def as_int(value: Any, what: str) -> int:
    """``value`` as an ``int``, refusing bools, floats (even ``2.0``), strings and the rest."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputError(
            f"{what} must be an integer, got {value!r} ({type(value).__name__})"
        )
    return int(value)


def as_positive_int(value: Any, what: str) -> int:
    """An ``int`` of at least 1.

    >>> as_positive_int(0, "batch_size")
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: batch_size must be a positive integer, got 0
    """
    number = as_int(value, what)
    if number < 1:
        raise InvalidInputError(f"{what} must be a positive integer, got {number}")
    return number


def as_finite_float(value: Any, what: str) -> float:
    """A finite ``float`` from a real number (no bools, strings or NaN/inf).

    >>> as_finite_float(2, "strength")
    2.0
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidInputError(f"{what} must be finite, got {number}")
    return number
