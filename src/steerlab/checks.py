"""Argument checks shared by every public entry point: numbers and lists of strings.

Python lets ``int(1.5)`` and ``int(True)`` through silently, so ``layers=[1.5]`` used to mean
layer 1. These helpers refuse anything that is not an integer (numpy and 0-d torch integers are
fine) with :class:`~steerlab.errors.InvalidInputError` naming the argument. The string-list
checks do the same for prompts and texts: one string where a list belongs, an empty list, or a
non-string item is refused with a message saying which.

Every module of steerlab may import this one (it needs only :mod:`steerlab.errors`).

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
from collections.abc import Sequence
from typing import Any

import torch

from steerlab.errors import InvalidInputError

__all__ = [
    "as_int",
    "as_positive_int",
    "as_finite_float",
    "check_prompts",
    "check_prompt_list",
    "check_texts",
]


def as_int(value: Any, what: str) -> int:
    """``value`` as an ``int``, refusing bools, floats (even ``2.0``), strings and the rest.

    >>> as_int(True, "layer")
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: layer must be an integer, got True (bool)
    """
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


def check_prompts(prompts: Sequence[str] | str) -> list[str]:
    """The prompts of one call as a new list: one string is a list of one; an empty list or a
    non-string item is refused.

    >>> check_prompts("the cat"), check_prompts(("a", "b"))
    (['the cat'], ['a', 'b'])
    >>> check_prompts(["a", 3])
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: prompt 1 is a int, not a string
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence):
        raise InvalidInputError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    items = list(prompts)
    if not items:
        raise InvalidInputError("the prompt list is empty")
    for i, prompt in enumerate(items):
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt {i} is a {type(prompt).__name__}, not a string")
    return items


def check_prompt_list(items: object, what: str) -> tuple[str, ...]:
    """One side's prompts (``what``: ``"positive"``, ``"negative"``...) as a tuple; unlike
    :func:`check_prompts` a single string is refused, since a contrast side is a list.

    >>> check_prompt_list(["i love it"], "positive")
    ('i love it',)
    >>> check_prompt_list("i love it", "positive")
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: positive prompts must be a list of strings, not one string
    """
    if isinstance(items, str):
        raise InvalidInputError(f"{what} prompts must be a list of strings, not one string")
    if not isinstance(items, Sequence):
        raise InvalidInputError(f"{what} prompts must be a list of strings, got {type(items)}")
    if len(items) == 0:
        raise InvalidInputError(f"the {what} prompt list is empty")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidInputError(f"{what} prompt {i} is a {type(item).__name__}, not a string")
    return tuple(items)


def check_texts(texts: Sequence[str]) -> list[str]:
    """Texts to score as a new list (an empty list is fine: no scores); one string is refused.

    >>> check_texts(["good", "bad"]), check_texts([])
    (['good', 'bad'], [])
    >>> check_texts("good")
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: texts must be a list of strings, not one string
    """
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, not one string")
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidInputError(f"text {i} is a {type(text).__name__}, not a string")
    return items
