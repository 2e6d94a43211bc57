"""The steering an edited model records on top of its edits: for every thread
(``edited.add_steering``) and for one thread's ``with edited.steer(...)`` blocks.

:class:`~steerlab.model.EditedModel` keeps one :class:`EditStack` and applies its
:meth:`~EditStack.items` after its edits on every call.

>>> import torch, steerlab as sl
>>> stack = EditStack("example")
>>> step = sl.Steering(sl.SteeringVector({0: torch.ones(4)}))
>>> handle = stack.record((step,))
>>> len(stack.items()), handle.active
(1, True)
>>> handle.remove(); stack.items(), handle.active
([], False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from steerlab.dispatch import HookHandle, Intervention, ScopedStack

__all__ = ["EditStack"]

Entry = tuple[Intervention, ...]


class EditStack:
    """Interventions recorded for every thread, then those pushed in this thread / task."""

    def __init__(self, name: str) -> None:
        # recorded for every thread, replaced whole, never mutated
        self.recorded: tuple[Entry, ...] = ()
        # pushed by ``with edited.steer(...)``: this thread / task only
        self.scoped: ScopedStack[Entry] = ScopedStack(name)

    def record(self, entry: Entry) -> HookHandle:
        """Record ``entry`` for every thread until the returned handle is removed."""
        handle = _RecordedHandle(self, entry)
        try:
            self.recorded = (*self.recorded, entry)
            return handle
        except BaseException:  # an interrupt between recording and returning: undo
            handle.remove()
            raise

    @contextlib.contextmanager
    def pushed(self, entry: Entry) -> Iterator[HookHandle]:
        """Apply ``entry`` in this thread / task for a ``with`` block."""
        with self.scoped.pushed(entry):
            yield _ScopedHandle(self, entry)

    def items(self) -> list[Intervention]:
        """What every call applies after the edits: the recorded entries, then the pushed."""
        return [i for entry in (*self.recorded, *self.scoped.items()) for i in entry]

    def clear(self) -> None:
        """Drop what was recorded for every thread."""
        self.recorded = ()


class _EntryHandle(HookHandle):
    """Handle of one entry on an :class:`EditStack` (the subclasses say where it lives)."""

    def __init__(self, owner: EditStack, entry: Entry) -> None:
        super().__init__(None)
        self._owner = owner
        self._entry = entry


class _RecordedHandle(_EntryHandle):
    """Handle of steering recorded on an :class:`EditStack` for every thread."""

    @property
    def active(self) -> bool:
        return any(item is self._entry for item in self._owner.recorded)

    def remove(self) -> None:
        self._owner.recorded = tuple(
            item for item in self._owner.recorded if item is not self._entry
        )


class _ScopedHandle(_EntryHandle):
    """Handle of steering pushed on an :class:`EditStack` for this context only."""

    @property
    def active(self) -> bool:
        return any(item is self._entry for item in self._owner.scoped.items())

    def remove(self) -> None:
        self._owner.scoped.discard(self._entry)
