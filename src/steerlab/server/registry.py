"""The registries of named vectors and conditions that requests refer to by name.

A request never carries a tensor: its :class:`~steerlab.server.requests.SteeringEntry` names a
vector of the engine's :class:`VectorRegistry`, and its ``when`` a condition of the engine's
:class:`ConditionRegistry`. Both are thread-safe and check each item on registration.

>>> VectorRegistry.check_name("calm-v2")
'calm-v2'
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from steerlab.conditions import Condition
from steerlab.errors import InvalidInputError
from steerlab.vectors import SteeringVector

__all__ = ["ConditionRegistry", "VectorRegistry"]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


# --- the registries of named vectors and conditions -------------------------------------------
_T = TypeVar("_T")


class _Registry(Generic[_T]):
    """``name -> item``, thread-safe, each item checked on registration (see subclasses)."""

    kind = "item"

    def __init__(self, check: Callable[[_T], None] | None = None) -> None:
        self._check = check
        self._items: dict[str, _T] = {}
        self._lock = threading.Lock()

    @classmethod
    def check_name(cls, name: str) -> str:
        """``name`` if it is a valid name (letters, digits, ``_ . -``; 128 chars at most)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInputError(
                f"invalid {cls.kind} name {name!r}: use letters, digits, '_', '.', '-' "
                f"(at most 128 characters, not starting with '.' or '-')"
            )
        return name

    def _accepts(self, item: object) -> bool:
        raise NotImplementedError

    def _load(self, file: Path) -> _T:
        raise NotImplementedError

    def register(self, name: str, item: _T) -> None:
        """Add ``item`` under ``name`` after checking it fits the model; names are unique."""
        self.check_name(name)
        if not self._accepts(item):
            raise InvalidInputError(f"not a {self.kind}: {type(item).__name__}")
        if self._check is not None:
            self._check(item)
        with self._lock:
            if name in self._items:
                raise InvalidInputError(f"a {self.kind} named {name!r} is already registered")
            self._items[name] = item

    def register_file(self, path: str | os.PathLike[str], name: str | None = None) -> str:
        """Load a steerlab file and register it under ``name`` (default: the file stem)."""
        file = Path(path)
        chosen = file.stem if name is None else name
        self.check_name(chosen)
        self.register(chosen, self._load(file))
        return chosen

    def register_bytes(self, name: str, data: bytes) -> None:
        """Register the file whose content is ``data`` (as uploaded)."""
        self.check_name(name)
        with tempfile.TemporaryDirectory(prefix="steerlab-upload-") as folder:
            file = Path(folder, f"{name}.safetensors")
            file.write_bytes(data)
            item = self._load(file)
        self.register(name, item)

    def register_dir(self, folder: str | os.PathLike[str]) -> list[str]:
        """Register every ``folder/*.safetensors`` under its stem; returns the names (sorted)."""
        path = Path(folder)
        if not path.is_dir():
            raise InvalidInputError(f"{self.kind} folder {path} does not exist")
        return [self.register_file(file) for file in sorted(path.glob("*.safetensors"))]

    def get(self, name: str) -> _T:
        """The item registered as ``name``, or ``InvalidInputError`` naming the known ones."""
        with self._lock:
            item = self._items.get(name)
            known = sorted(self._items)
        if item is None:
            raise InvalidInputError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(known) or 'none'}"
            )
        return item

    def remove(self, name: str) -> _T | None:
        """Unregister ``name``; returns its item, or ``None`` if nothing had that name.
        Requests already submitted hold the item itself and are unaffected."""
        with self._lock:
            return self._items.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        with self._lock:
            return sorted(self._items)

    def items(self) -> list[tuple[str, _T]]:
        """``(name, item)`` pairs, sorted by name."""
        with self._lock:
            return sorted(self._items.items(), key=lambda pair: pair[0])

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class VectorRegistry(_Registry[SteeringVector]):
    """Named steering vectors a server can use: ``name -> SteeringVector``, thread-safe.

    ``check`` (given by the engine) refuses vectors that do not fit the served model; it runs on
    every registration. Files go through :meth:`SteeringVector.load`'s validation, bytes through
    the very same code (written to a temporary file first).

    >>> import torch
    >>> reg = VectorRegistry()
    >>> reg.register("calm", SteeringVector({1: torch.ones(4)}))
    >>> "calm" in reg, reg.names()
    (True, ['calm'])
    >>> reg.register("calm", SteeringVector({1: torch.ones(4)}))
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: a vector named 'calm' is already registered
    """

    kind = "vector"

    def _accepts(self, item: object) -> bool:
        return isinstance(item, SteeringVector)

    def _load(self, file: Path) -> SteeringVector:
        return SteeringVector.load(file)


class ConditionRegistry(_Registry[Condition]):
    """Named conditions (:class:`~steerlab.conditions.Condition`) that steering entries name in
    ``when``, thread-safe; files go through :meth:`Condition.load`'s validation (format,
    checksum), and ``check`` (given by the engine) refuses conditions the model cannot read.

    >>> import torch
    >>> reg = ConditionRegistry()
    >>> reg.register("cats", Condition(torch.ones(4), layer=1, threshold=0.5))
    >>> reg.get("dogs")
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: unknown condition 'dogs'; registered: cats
    """

    kind = "condition"

    def _accepts(self, item: object) -> bool:
        return isinstance(item, Condition)

    def _load(self, file: Path) -> Condition:
        return Condition.load(file)
