"""Hook dispatch: interventions activated through hooks that never leak.

An :class:`Intervention` describes an edit and lists the :class:`HookSpec` hooks it needs.
Activating it never registers and removes hooks on the shared modules per call: each site gets
one permanent, inert dispatcher hook the first time it is used, and what the dispatchers run is
read at call time from two plans:

- :func:`activate` (``with model.steer(...)``, per-call ``steering=``): this thread or asyncio
  task only, through a :class:`contextvars.ContextVar`. Threads sharing one model never see each
  other's steering.
- :func:`install` (``model.add_steering``): every thread, until ``handle.remove()``.

Order: global installations first (in installation order), then this context's (outer
``with model.steer(...)`` first, inner ones next, per-call ``steering=`` last), and within a list
in list order.

>>> import torch
>>> layer = nn.Linear(2, 2)
>>> doubled = HookSpec(layer, "forward", lambda module, args, output: output * 2)
>>> with scoped_hooks([doubled]):
...     inside = layer(torch.ones(1, 2))
>>> bool(torch.equal(inside, 2 * layer(torch.ones(1, 2)))), count_hooks(layer)
(True, 0)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from torch import nn

from steerlab.adapter import ModelAdapter
from steerlab.errors import InvalidInputError
from steerlab.tracking import PositionTracker

__all__ = [
    "HookHandle",
    "HookSpec",
    "Intervention",
    "ScopedStack",
    "activate",
    "active_trackers",
    "count_hooks",
    "install",
    "scoped_hooks",
    "strip_dispatchers",
]


# --- the intervention protocol -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HookSpec:
    """One hook an intervention needs.

    ``kind`` is ``"forward"`` (``fn(module, args, output)``), ``"forward_pre"``
    (``fn(module, args)``) or ``"forward_pre_kwargs"`` (``fn(module, args, kwargs)``); each
    follows PyTorch's hook contract (return ``None`` or the replacement).
    """

    module: nn.Module
    kind: str
    fn: Callable[..., Any]


class Intervention:
    """Base class: something that edits the model's computation through hooks.

    Subclasses implement :meth:`hooks`. ``rows`` (the batch size a per-row intervention was built
    for) is ``None`` for interventions that apply to every row alike.
    """

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        raise NotImplementedError


# --- dispatch: hooks installed once per site, plans read per call ---------------------------------
#
# Steering never registers and removes hooks on the shared modules per call. Each site that ever
# needs a hook gets one permanent, inert *dispatcher*; what it runs is read at call time from two
# plans: the global one (``install``/``add_steering``: every thread, until removed) and the one of
# the current context (``activate``/``with model.steer``/``steering=``: this thread or asyncio task
# only, a ``ContextVar``). A call therefore never mutates state another thread is reading, and
# threads with different steering on one model get exactly their single-threaded results.
_HOOK_KINDS = ("forward", "forward_pre", "forward_pre_kwargs")


@dataclasses.dataclass(frozen=True, eq=False)
class _Installation:
    """The hooks of one installation, by site: what dispatchers run while it is active."""

    backbone: nn.Module | None
    tracker: PositionTracker | None
    specs: tuple[HookSpec, ...]
    sites: Mapping[tuple[int, str], tuple[Callable[..., Any], ...]]

    @classmethod
    def build(
        cls, specs: Sequence[HookSpec], backbone: nn.Module | None, tracker: PositionTracker | None
    ) -> _Installation:
        sites: dict[tuple[int, str], list[Callable[..., Any]]] = {}
        for spec in specs:
            if spec.kind not in _HOOK_KINDS:
                raise InvalidInputError(f"unknown hook kind {spec.kind!r}")
            sites.setdefault((id(spec.module), spec.kind), []).append(spec.fn)
        return cls(backbone, tracker, tuple(specs), {k: tuple(v) for k, v in sites.items()})


_T = TypeVar("_T")


class _Owner:
    """Held only by the frame of one ``with`` block: its entry ends when that frame does."""

    __slots__ = ("__weakref__",)


class ScopedStack(Generic[_T]):
    """A per-context stack (thread / asyncio task) whose entries end with their ``with`` block.

    An entry is live while the frame of the ``with`` block that pushed it exists, so even an
    interrupt that strikes inside the block's own clean-up cannot leave the entry behind: once
    the block is gone, so is its entry.

    >>> stack = ScopedStack[str]("example")
    >>> with stack.pushed("a"):
    ...     with stack.pushed("b"):
    ...         inside = stack.items()
    >>> inside, stack.items()
    (('a', 'b'), ())
    """

    def __init__(self, name: str) -> None:
        self._var: contextvars.ContextVar[tuple[tuple[_T, weakref.ref[_Owner]], ...]] = (
            contextvars.ContextVar(name, default=())
        )

    def items(self) -> tuple[_T, ...]:
        """The live entries of this context, oldest first."""
        entries = self._var.get()
        if not entries:
            return ()
        return tuple(item for item, owner in entries if owner() is not None)

    def discard(self, item: _T) -> None:
        """End ``item``'s entry early in this context (a handle's ``remove``)."""
        self._var.set(tuple(entry for entry in self._var.get() if entry[0] is not item))

    @contextlib.contextmanager
    def pushed(self, item: _T) -> Iterator[None]:
        """Push ``item`` for the duration of the ``with`` block."""
        owner = _Owner()
        previous = tuple(entry for entry in self._var.get() if entry[1]() is not None)
        try:
            self._var.set((*previous, (item, weakref.ref(owner))))
            yield
        finally:
            self._var.set(previous)


# Appended to and removed from in single list operations (atomic under the GIL), read as a
# tuple snapshot: no lock, so no interrupt can leave one held.
_GLOBAL_PLAN: list[_Installation] = []
_CONTEXT_PLAN: ScopedStack[_Installation] = ScopedStack("steerlab_plan")


class _Dispatcher:
    """The one permanent hook of a site: runs the active plans' hooks for it, in order.

    Inert (returns ``None`` at once) when nothing is active, and after a ``deepcopy`` of the
    model (it looks sites up by module identity), so copies and bakes are unaffected.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, module: nn.Module, *rest: Any) -> Any:
        context = _CONTEXT_PLAN.items()
        if not _GLOBAL_PLAN and not context:
            return None
        if _canonical(module, self.kind) is not self:
            return None  # a duplicate left by two first-time installs racing: inert
        key = (id(module), self.kind)
        result: Any = None
        for plan in (tuple(_GLOBAL_PLAN), context):
            for installation in plan:
                if self.kind == "forward_pre_kwargs" and installation.backbone is module:
                    tracker = installation.tracker
                    if tracker is not None:
                        tracker.pre_hook(module, *rest)
                for fn in installation.sites.get(key, ()):
                    value = fn(module, *rest)
                    if value is None:
                        continue
                    if self.kind == "forward":
                        rest = (rest[0], value)
                    elif self.kind == "forward_pre":
                        rest = (value if isinstance(value, tuple) else (value,),)
                    else:
                        rest = tuple(value)
                    result = value
        if result is None:
            return None
        if self.kind == "forward":
            return rest[1]
        return rest[0] if self.kind == "forward_pre" else rest


# The canonical dispatcher of each (module, kind) lives in the module's own __dict__ under this
# name, claimed with dict.setdefault (one atomic step): no lock, and a deep copy of the model
# carries copies that only ever look up the copy's own (absent) plans.
_DISPATCHER_ATTR = "_steerlab_dispatchers"


def _canonical(module: nn.Module, kind: str) -> _Dispatcher | None:
    entry = module.__dict__.get(_DISPATCHER_ATTR, {}).get(kind)
    return None if entry is None else entry[0]


def _hook_dict(module: nn.Module, kind: str) -> Any:
    return module._forward_hooks if kind == "forward" else module._forward_pre_hooks


def _ensure_dispatchers(installation: _Installation) -> None:
    """Give every site of ``installation`` its dispatcher, placed after the site's other hooks.

    Keeping the dispatcher last gives steerlab's hooks the place they had when they were
    registered per call: after any hook of the user's own, so reads see the final value.
    """
    needed: list[tuple[nn.Module, str]] = [(spec.module, spec.kind) for spec in installation.specs]
    if installation.backbone is not None:
        needed.insert(0, (installation.backbone, "forward_pre_kwargs"))
    # PyTorch snapshots a module's hooks before running them, and each step here (register,
    # setdefault, move_to_end) is one atomic operation, so this is safe while other threads run
    # forward passes or install too. A dispatcher is registered before it is claimed, so
    # whichever claim wins, the winner is already in place when any installer returns.
    for module, kind in needed:
        table = module.__dict__.setdefault(_DISPATCHER_ATTR, {})
        hooks = _hook_dict(module, kind)
        entry = table.get(kind)
        if entry is None or entry[1].id not in hooks:
            dispatcher = _Dispatcher(kind)
            if kind == "forward":
                handle = module.register_forward_hook(dispatcher)
            elif kind == "forward_pre":
                handle = module.register_forward_pre_hook(dispatcher)
            else:
                handle = module.register_forward_pre_hook(dispatcher, with_kwargs=True)
            if entry is None:
                winner = table.setdefault(kind, (dispatcher, handle))
            else:  # the claimed one was stripped from the hooks: replace the claim
                table[kind] = winner = (dispatcher, handle)
            if winner[0] is not dispatcher:
                handle.remove()  # another thread's claim won; ours would only be inert
            entry = winner
        if next(reversed(hooks), None) != entry[1].id and entry[1].id in hooks:
            hooks.move_to_end(entry[1].id)


def _active_installations() -> tuple[_Installation, ...]:
    return (*_GLOBAL_PLAN, *_CONTEXT_PLAN.items())


def active_trackers(backbone: nn.Module) -> list[PositionTracker]:
    """The position trackers active on ``backbone`` for calls made here (global ones first)."""
    return [
        inst.tracker
        for inst in _active_installations()
        if inst.backbone is backbone and inst.tracker is not None
    ]


def strip_dispatchers(module: nn.Module) -> int:
    """Remove steerlab's dispatcher hooks from ``module`` and its submodules (for a deep copy
    that leaves steerlab's hands, such as a baked model); returns how many were removed.

    >>> strip_dispatchers(nn.Linear(2, 2))
    0
    """
    removed = 0
    for sub in module.modules():
        sub.__dict__.pop(_DISPATCHER_ATTR, None)
        for name in ("_forward_hooks", "_forward_pre_hooks"):
            hooks = getattr(sub, name)
            for key in [k for k, fn in hooks.items() if isinstance(fn, _Dispatcher)]:
                del hooks[key]
                sub._forward_hooks_with_kwargs.pop(key, None)
                sub._forward_pre_hooks_with_kwargs.pop(key, None)
                removed += 1
    return removed


class HookHandle:
    """Removes exactly what one installation added. Idempotent; usable as a context manager.

    >>> HookHandle(None).remove()
    """

    def __init__(self, installation: _Installation | None, *, scope: str = "global") -> None:
        self._installation = installation
        self._scope = scope

    @property
    def tracker(self) -> PositionTracker | None:
        """The position tracker of this installation (``None`` once removed)."""
        return None if self._installation is None else self._installation.tracker

    @property
    def active(self) -> bool:
        """True until :meth:`remove` is called."""
        return self._installation is not None

    def remove(self) -> None:
        """Deactivate this installation's hooks; later calls do nothing.

        Safe against an interrupt at any point: the installation is dropped from its plan
        first (one assignment), and the handle forgets it only afterwards, so calling
        ``remove`` again finishes the job.
        """
        installation = self._installation
        if installation is None:
            return
        if self._scope == "global":
            with contextlib.suppress(ValueError):  # already gone: idempotent
                _GLOBAL_PLAN.remove(installation)
        else:
            _CONTEXT_PLAN.discard(installation)
        self._installation = None

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _prepare(adapter: ModelAdapter, interventions: Sequence[Intervention]) -> _Installation:
    tracker = PositionTracker()
    specs: list[HookSpec] = []
    for intervention in interventions:
        if not isinstance(intervention, Intervention):
            raise InvalidInputError(f"not an intervention: {intervention!r}")
        specs.extend(intervention.hooks(adapter, tracker))
    installation = _Installation.build(specs, adapter.backbone, tracker)
    _ensure_dispatchers(installation)
    return installation


def install(adapter: ModelAdapter, interventions: Sequence[Intervention]) -> HookHandle:
    """Activate ``interventions`` for every thread until ``handle.remove()``.

    Nothing becomes active until every intervention has produced its hooks, so validation errors
    leave the model untouched. For steering that only the current thread (or asyncio task) sees,
    use :func:`activate`.

    >>> import torch, transformers
    >>> from steerlab.adapter import ModelAdapter
    >>> from steerlab.steering import Steering
    >>> from steerlab.vectors import SteeringVector
    >>> hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2,
    ...     vocab_size=16))
    >>> adapter = ModelAdapter(hf)
    >>> handle = install(adapter, [Steering(SteeringVector({1: torch.ones(8)}), strength=2.0)])
    >>> count_hooks(hf)
    2
    >>> handle.remove(); count_hooks(hf)
    0
    """
    installation = _prepare(adapter, interventions)
    handle = HookHandle(installation, scope="global")
    try:
        _GLOBAL_PLAN.append(installation)
        return handle
    except BaseException:
        handle.remove()
        raise


@contextlib.contextmanager
def activate(adapter: ModelAdapter, interventions: Sequence[Intervention]) -> Iterator[HookHandle]:
    """Activate ``interventions`` for calls made in this thread (or asyncio task) inside the
    ``with`` block; other threads using the same model are not affected.

    >>> import torch, transformers
    >>> from steerlab.adapter import ModelAdapter
    >>> from steerlab.steering import Steering
    >>> from steerlab.vectors import SteeringVector
    >>> hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2,
    ...     vocab_size=16))
    >>> with activate(ModelAdapter(hf), [Steering(SteeringVector({1: torch.ones(8)}))]):
    ...     inside = count_hooks(hf)
    >>> inside, count_hooks(hf)
    (2, 0)
    """
    installation = _prepare(adapter, interventions)
    with _CONTEXT_PLAN.pushed(installation):
        yield HookHandle(installation, scope="context")


@contextlib.contextmanager
def scoped_hooks(specs: Sequence[HookSpec]) -> Iterator[None]:
    """Run raw hooks (reads, captures) during the ``with`` block, in this context only.

    The hooks run after every intervention already active at their sites, so a read sees the
    steered value.

    >>> import torch
    >>> lin = nn.Linear(2, 2)
    >>> seen = []
    >>> with scoped_hooks([HookSpec(lin, "forward", lambda m, a, out: seen.append(out.shape))]):
    ...     _ = lin(torch.zeros(1, 2))
    >>> _ = lin(torch.zeros(1, 2)); seen
    [torch.Size([1, 2])]
    """
    installation = _Installation.build(specs, None, None)
    _ensure_dispatchers(installation)
    with _CONTEXT_PLAN.pushed(installation):
        yield


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# transformers 5 leaves these on blocks for good after one output_hidden_states/output_attentions
# call; they only record outputs while one of its collectors is active, never change them.
_INERT_HOOK_PREFIX = "install_output_capuring_hook."


def count_hooks(module: nn.Module) -> int:
    """Hooks active on ``module`` and its submodules that can change its computation here.

    Counts foreign forward/backward (pre-)hooks, except transformers' own output-capturing hooks
    (they stay installed after any ``output_hidden_states=True`` call and change nothing) and
    steerlab's inert dispatchers, plus the hooks of every steerlab activation visible to this
    thread (global ones and this context's), a position tracker counting as one.

    >>> count_hooks(nn.Linear(2, 2))
    0
    """
    total = 0
    inside: set[int] = set()
    for sub in module.modules():
        inside.add(id(sub))
        for name in _HOOK_DICTS:
            for hook in getattr(sub, name, {}).values():
                qualname = getattr(hook, "__qualname__", "")
                if not isinstance(hook, _Dispatcher) and not qualname.startswith(
                    _INERT_HOOK_PREFIX
                ):
                    total += 1
    for installation in _active_installations():
        total += sum(1 for spec in installation.specs if id(spec.module) in inside)
        if installation.tracker is not None and id(installation.backbone) in inside:
            total += 1
    return total
