"""Interventions: what is done at a site, activated through hooks that never leak.

An :class:`Intervention` describes an edit (add a steering vector, ablate a head, ...) and lists
the hooks it needs. Activating it never registers and removes hooks on the shared modules per
call: each site gets one permanent, inert dispatcher hook the first time it is used, and what the
dispatchers run is read at call time from two plans:

- :func:`activate` (``with model.steer(...)``, per-call ``steering=``): this thread or asyncio
  task only, through a :class:`contextvars.ContextVar`. Threads sharing one model never see each
  other's steering.
- :func:`install` (``model.add_steering``): every thread, until ``handle.remove()``.

Every activation also brings a :class:`PositionTracker` (per-thread state) that the backbone's
dispatcher feeds with each forward call's attention mask; it works out the *absolute* index of
every token (prompt start = 0, padding = -1), so position specs mean the same thing with or
without a KV cache.

Order: global installations first (in installation order), then this context's (outer
``with model.steer(...)`` first, inner ones next, per-call ``steering=`` last), and within a list
in list order. Reads (``model.activations``) see the result of all of them.

>>> import torch, transformers
>>> from steerlab.adapter import ModelAdapter
>>> from steerlab.vectors import SteeringVector
>>> hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2,
...     vocab_size=16))
>>> adapter = ModelAdapter(hf)
>>> steering = Steering(SteeringVector({1: torch.ones(8)}), strength=2.0)
>>> with activate(adapter, [steering]):
...     steered = hf(torch.tensor([[1, 2, 3]])).logits
>>> plain = hf(torch.tensor([[1, 2, 3]])).logits
>>> bool((steered != plain).any()), count_hooks(hf)
(True, 0)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar, Union

import torch
from torch import nn

from steerlab.adapter import ModelAdapter
from steerlab.errors import InvalidInputError, VectorMismatchError
from steerlab.grammar import parse_layers, parse_strength
from steerlab.operators import Add, Operator, check_extras, get_operator, stack_params
from steerlab.positions import Positions, PositionSpec, marker_flags
from steerlab.sites import (
    check_experts,
    check_site,
    check_site_override,
    head_mask,
    output_hidden,
    replace_output_hidden,
    reroute,
    site_hook,
    site_width,
)
from steerlab.vectors import SteeringVector

__all__ = [
    "HookHandle",
    "HookSpec",
    "Intervention",
    "PositionTracker",
    "RowSteering",
    "ScopedStack",
    "SequenceState",
    "Steering",
    "SteeringLike",
    "active_trackers",
    "activate",
    "count_hooks",
    "direction_at",
    "install",
    "normalize_steering",
    "output_hidden",
    "positions_without_2d_mask",
    "replace_output_hidden",
    "scoped_hooks",
    "steering_with",
    "strip_dispatchers",
]


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


_TRACKING_IDS: weakref.WeakSet[PositionTracker] = weakref.WeakSet()


# --- position tracking --------------------------------------------------------------------------
class PositionTracker(threading.local):
    """Knows, during each forward call, the absolute index of every token in the batch.

    ``prompt_lengths_override`` (set by steerlab's own ``generate``/``logits`` for the duration
    of a call) pins the prompt length ``P`` of each row; otherwise ``P`` is read off the first
    forward call of a sequence (one that starts with an empty cache).

    The state is per thread (a :class:`threading.local`): one tracker serves steering installed
    for every thread, and two threads running forward passes at once never see each other's
    positions.

    Token history: when an installed intervention selects tokens by content (``after:``,
    ``between:``, ``outside:``) it sets ``track_ids``; the tracker then keeps each row's token
    ids by absolute index (a new token is appended, a token that differs from the recorded one
    at its index truncates the row's history there: a new sequence), so a mask at token ``i``
    is computed from tokens ``0..i`` whether they arrive one per call (KV cache) or all at once.
    Scans are incremental: each row's marker state is carried from one call to the next.

    What is remembered about a row between calls lives in its :class:`SequenceState`. The
    tracker makes one per row of the batch it sees; ``sequences_override`` (set, like
    ``prompt_lengths_override``, for the duration of a call) hands each row its own instead,
    for a server that regroups sequences between calls: a request's token ids, marker scans and
    condition verdicts then follow it from one batch to the next.
    """

    def __init__(self) -> None:
        self.abs_index: torch.Tensor | None = None
        self.prompt_lengths: torch.Tensor | None = None
        self.all_real: bool = True
        self.prompt_lengths_override: torch.Tensor | None = None
        self.sequences_override: list[SequenceState] | None = None
        self.sequences: list[SequenceState] | None = None
        self._have_ids = False
        self._borrowed = False
        self._masks: dict[Positions, torch.Tensor] = {}

    @property
    def history(self) -> list[list[int]] | None:
        """Each row's recorded token ids (``None`` when the last call brought no ids)."""
        if self.sequences is None or not self._have_ids:
            return None
        return [state.ids for state in self.sequences]

    # configuration, not state: shared by every thread (a data descriptor on the class, so the
    # per-thread attribute dict never shadows it)
    @property
    def track_ids(self) -> bool:
        """Whether this tracker records token ids (set when content-based positions are used)."""
        return self in _TRACKING_IDS

    @track_ids.setter
    def track_ids(self, value: bool) -> None:
        if value:
            _TRACKING_IDS.add(self)
        else:
            _TRACKING_IDS.discard(self)

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook on the backbone (registered ``with_kwargs=True``)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            ids = kwargs.get("inputs_embeds")
        if not isinstance(ids, torch.Tensor) or ids.ndim < 2:
            return
        batch, length = ids.shape[0], ids.shape[1]
        mask = kwargs.get("attention_mask")
        if (
            isinstance(mask, torch.Tensor)
            and mask.ndim == 2
            and mask.shape[0] == batch
            and mask.shape[1] >= length
        ):
            offset = mask.shape[1] - length
            real = mask.bool()
            cum = real.long().cumsum(dim=1) - 1
            current_real = real[:, offset:]
            abs_index = torch.where(
                current_real, cum[:, offset:], torch.full_like(cum[:, offset:], -1)
            )
            inferred = real.long().sum(dim=1)
            self.all_real = bool(current_real.all())
        else:
            offset = _cache_length(kwargs)
            abs_index, inferred = positions_without_2d_mask(
                kwargs, batch, length, offset, ids.device
            )
            self.all_real = bool((abs_index >= 0).all())
        self.abs_index = abs_index
        self._masks = {}
        given = self.sequences_override
        if given is not None:
            if len(given) != batch:
                raise InvalidInputError(
                    f"{len(given)} sequence states were given for a batch of {batch} rows"
                )
            self.sequences = list(given)
        elif self._borrowed:
            self.sequences = None  # the lent states went back with their call
        self._borrowed = given is not None
        if self.track_ids:
            ids_now = kwargs.get("input_ids", args[0] if args else None)
            self._record(ids_now if isinstance(ids_now, torch.Tensor) else None, abs_index)
        override = self.prompt_lengths_override
        if override is not None and override.shape[0] == batch:
            self.prompt_lengths = override.to(ids.device)
        elif offset == 0 or self.prompt_lengths is None or self.prompt_lengths.shape[0] != batch:
            self.prompt_lengths = inferred if offset == 0 else torch.full_like(inferred, offset)

    def _record(self, ids: torch.Tensor | None, abs_index: torch.Tensor) -> None:
        if ids is None or ids.ndim != 2:
            self._have_ids = False  # embeddings only: content specs refuse in mask()
            return
        self._have_ids = True
        batch = ids.shape[0]
        if self.sequences is None or len(self.sequences) != batch:
            self.sequences = [SequenceState() for _ in range(batch)]
        for row, (tokens, indices) in enumerate(zip(ids.tolist(), abs_index.tolist())):
            self.sequences[row].record(tokens, indices, row=row)

    def mask(self, positions: Positions) -> torch.Tensor:
        """Boolean ``[batch, seq]`` mask of the tokens ``positions`` selects in this call."""
        if self.abs_index is None or self.prompt_lengths is None:
            raise RuntimeError("PositionTracker used outside a forward call")
        if not positions.needs_ids:
            return positions.mask(self.abs_index, self.prompt_lengths)
        cached = self._masks.get(positions)
        if cached is not None:
            return cached
        if self.sequences is None or not self._have_ids:
            raise InvalidInputError(
                f"positions {positions.describe()!r} need the token ids of the call (input_ids); "
                f"this forward call has none"
            )
        rows = []
        for state, indices in zip(self.sequences, self.abs_index.tolist()):
            flags = state.flags(positions)
            rows.append([0 <= i < len(flags) and flags[i] for i in indices])
        out = torch.tensor(rows, dtype=torch.bool).to(self.abs_index.device)
        self._masks[positions] = out
        return out


@dataclasses.dataclass(eq=False)
class SequenceState:
    """What a :class:`PositionTracker` remembers about one row's sequence between calls.

    ``ids``: its token ids by absolute index (recorded while content-based positions are in
    use); ``scans``: for each content spec, the selection flag of every recorded token and the
    scan state after the last one (see :func:`~steerlab.positions.marker_flags`);
    ``verdicts``: for each prompt-level condition, whether the prompt satisfied it (written by
    the condition's probe when it reads the whole prompt, read back on later calls).

    >>> state = SequenceState()
    >>> state.record([4, 5, 6], [0, 1, 2])
    >>> state.flags(Positions.after(ids=[5]))
    [False, True, True]
    >>> state.record([7], [3]); state.flags(Positions.after(ids=[5]))
    [False, True, True, True]
    """

    ids: list[int] = dataclasses.field(default_factory=list)
    scans: dict[Positions, tuple[list[bool], bool]] = dataclasses.field(default_factory=dict)
    verdicts: dict[Any, bool] = dataclasses.field(default_factory=dict)

    def record(self, tokens: Sequence[int], indices: Sequence[int], *, row: int = 0) -> None:
        """Record ``tokens`` at absolute ``indices`` (``-1``: padding, skipped).

        A token equal to the one recorded at its index changes nothing; a different one starts
        a new sequence there (the history, scans and verdicts from that index on are dropped).
        """
        ids = self.ids
        for token, index in zip(tokens, indices):
            if index < 0:
                continue
            if index < len(ids):
                if ids[index] == token:
                    continue
                del ids[index:]
                self.scans = {}
                self.verdicts = {}
            if index != len(ids):
                raise InvalidInputError(
                    f"token history of row {row} has {len(ids)} tokens but the call brings "
                    f"token {index}; content-based positions need every token of the sequence"
                )
            ids.append(int(token))

    def flags(self, positions: Positions) -> list[bool]:
        """Selection flag of every recorded token for the content spec ``positions``."""
        flags, state = self.scans.get(positions, ([], False))
        if len(flags) < len(self.ids):
            more, state = marker_flags(positions, self.ids, start=len(flags), state=state)
            flags.extend(more)
            self.scans[positions] = (flags, state)
        return flags


def positions_without_2d_mask(
    kwargs: Mapping[str, Any], batch: int, length: int, offset: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(abs_index [batch, length], real tokens so far [batch])`` for a forward call whose
    attention mask is not the usual 2-D padding mask.

    Read, in order of preference, off:

    * a 4-D mask ``[batch, 1, query, key]`` (what some models' ``generate`` builds before the
      backbone runs, e.g. Gemma 2 with its ``HybridCache`` on transformers 4.x): the last query
      attends to exactly the real keys up to it, padding excluded, so its row is the padding
      mask; the current tokens sit at keys ``cache_position`` (or the last ``length`` keys);
    * ``position_ids`` ``[batch, length]``: no padding information, every token counted real;
    * otherwise ``offset .. offset + length - 1`` (``offset``: the KV cache length).

    >>> mask = torch.tensor([[0, 1, 1], [1, 1, 1]]).bool()  # row 0 left-padded by one
    >>> causal = torch.ones(3, 3).tril().bool()
    >>> four_d = (mask[:, None, :] & causal[None])[:, None]
    >>> cpu = torch.device("cpu")
    >>> abs_index, real = positions_without_2d_mask({"attention_mask": four_d}, 2, 3, 0, cpu)
    >>> abs_index.tolist(), real.tolist()
    ([[-1, 0, 1], [0, 1, 2]], [2, 3])
    """
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[0] == batch:
        last = mask[:, 0, -1, :]
        attended = last if last.dtype == torch.bool else last == 0
        keys = attended.shape[1]
        where = kwargs.get("cache_position")
        if not (isinstance(where, torch.Tensor) and where.ndim == 1 and where.numel() == length):
            where = torch.arange(keys - length, keys, device=attended.device)
        where = where.to(attended.device).long()
        cum = attended.long().cumsum(dim=1) - 1
        current = attended[:, where]
        abs_index = torch.where(current, cum[:, where], torch.full_like(cum[:, where], -1))
        return abs_index, attended.long().sum(dim=1)
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2:
        if position_ids.shape == (batch, length) or position_ids.shape == (1, length):
            abs_index = position_ids.long().expand(batch, length)
            return abs_index, abs_index[:, -1] + 1
    abs_index = torch.arange(offset, offset + length, device=device).expand(batch, length)
    return abs_index, torch.full((batch,), offset + length, dtype=torch.long, device=device)


def _cache_length(kwargs: Mapping[str, Any]) -> int:
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        get = getattr(cache, "get_seq_length", None)
        if callable(get):
            return int(get())
        if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
            return int(cache[0][0].shape[-2])
    return 0


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


# --- additive steering ---------------------------------------------------------------------------
class _DefaultPositions(str):
    """The default of :attr:`Steering.positions`: equal to ``"all"`` (and read as ``"all"``
    everywhere), but of its own type, so :func:`normalize_steering` can tell "not given" (a call's
    ``positions=`` fills it in) from an explicit ``"all"`` (kept). A type rather than an identity
    check, because copies, pickles and ``dataclasses.replace`` keep the type but not the object.
    """

    __slots__ = ()


_ALL_BY_DEFAULT: PositionSpec = _DefaultPositions("all")


@dataclasses.dataclass(frozen=True)
class Steering(Intervention):
    """Steer the residual stream at the vector's layers with an operator (default: add).

    ``strength`` is one number or a ``{layer: strength}`` mapping (the seed's per-layer weights);
    with a mapping, or with ``layers``, a single-layer vector is applied at each of those layers.
    Layers and strength keys must be integers; the mapping and ``layers`` are copied, so later
    changes to the caller's objects do not leak in.
    ``op`` names a registered operator (:mod:`steerlab.operators`: ``"add"``, ``"add_norm"``,
    ``"clamp"``, ``"cap"``, ``"ablate"``, ``"rotate"``, ``"affine"``, ``"loreft"``); ``None``
    means ``"add"``, or ``"ablate"`` for a vector whose metadata says
    ``operation="project_out"``. ``when`` is a
    :class:`~steerlab.conditions.Condition`: only rows whose prompt satisfies it (or, for a
    per-token condition, only tokens where it fires) are steered.
    ``site`` (:mod:`steerlab.sites`; ``None``: the vector's own, ``"resid"`` by default) is
    where the operator acts: the residual stream, a block's attention or MLP output, or the
    per-head outputs; ``heads=[...]`` with ``site="head"`` adds only those heads' slices of the
    direction (the rest of the vector is ignored). On a mixture of experts, ``site="router"``
    adds the vector (one entry per expert) to the router logits, ``experts=[...]`` keeping only
    those experts' entries; with ``site="mlp_out"``, ``experts=[...]`` adds the vector only at
    tokens routed to one of those experts.

    >>> import torch
    >>> from steerlab.vectors import SteeringVector
    >>> s = Steering(SteeringVector({2: torch.ones(4)}), strength={6: 0.5, 8: 1.0}, op="clamp")
    >>> s.positions, s.resolved_op
    ('all', 'clamp')
    """

    vector: SteeringVector
    strength: float | Mapping[int, float] = 1.0
    positions: PositionSpec = _ALL_BY_DEFAULT
    layers: Sequence[int] | None = None
    op: str | Operator | None = None
    when: Any = None
    site: str | None = None
    heads: Sequence[int] | None = None
    experts: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.vector, SteeringVector):
            raise InvalidInputError(
                f"Steering needs a SteeringVector, got {type(self.vector).__name__}; wrap a raw "
                f"tensor with sl.SteeringVector.from_tensor(t, layers=[...])"
            )
        Positions.parse(self.positions)
        # the one parser of each grammar (steerlab.grammar), so every front end agrees
        object.__setattr__(self, "strength", parse_strength(self.strength))
        layers = parse_layers(self.layers)
        if isinstance(layers, list):
            object.__setattr__(self, "layers", tuple(layers))
        if self.op is not None:
            get_operator(self.op)
        if self.when is not None and not callable(getattr(self.when, "probe", None)):
            raise InvalidInputError(
                f"when= takes a Condition (sl.fit_condition / sl.Condition.load), not "
                f"{type(self.when).__name__}"
            )
        if self.site is not None:
            object.__setattr__(self, "site", check_site(self.site))
            check_site_override(self.vector.metadata.get("site"), self.site)
        site = self.resolved_site
        if self.heads is not None:
            if site != "head":
                raise InvalidInputError(f"heads= only applies to site='head', not {site!r}")
            if isinstance(self.heads, int):
                object.__setattr__(self, "heads", (self.heads,))
            if isinstance(self.heads, (str, bytes)) or not isinstance(self.heads, Sequence):
                raise InvalidInputError(f"heads must be a list of integers, got {self.heads!r}")
            object.__setattr__(self, "heads", tuple(self.heads))
            if self.operator.name != "add":
                raise InvalidInputError(
                    f"heads= selects slices of an added direction; op {self.operator.name!r} "
                    f"acts on the whole head activation (leave heads= out)"
                )
        if self.experts is not None:
            if site not in ("router", "mlp_out"):
                raise InvalidInputError(
                    f"experts= applies to site='router' or 'mlp_out', not {site!r}"
                )
            if isinstance(self.experts, int):
                object.__setattr__(self, "experts", (self.experts,))
            if isinstance(self.experts, (str, bytes)) or not isinstance(self.experts, Sequence):
                raise InvalidInputError(f"experts must be a list of integers, not {self.experts!r}")
            object.__setattr__(self, "experts", tuple(self.experts))

    @property
    def resolved_site(self) -> str:
        """The site this steering acts at: ``site``, or the vector's own."""
        if self.site is not None:
            return self.site
        try:
            return self.vector.site
        except VectorMismatchError as err:
            raise InvalidInputError(str(err)) from None

    @property
    def operator(self) -> Operator:
        """The operator this steering applies (``op``, or the vector's default)."""
        if self.op is not None:
            return get_operator(self.op)
        if self.vector.metadata.get("operation") == "project_out":
            return get_operator("ablate")
        return get_operator("add")

    @property
    def resolved_op(self) -> str:
        """Name of :attr:`operator`."""
        return self.operator.name

    def width(self, adapter: ModelAdapter) -> int:
        """The size of the activation at :attr:`resolved_site` (``d_model`` for ``"resid"``)."""
        site = self.resolved_site
        return adapter.d_model if site == "resid" else site_width(adapter, site)

    def _targets(self, adapter: ModelAdapter) -> dict[int, tuple[float, dict[str, torch.Tensor]]]:
        vector = self.vector
        site = self.resolved_site
        width = self.width(adapter)
        if vector.d_model != width:
            where = "the model's hidden size" if site == "resid" else f"site {site!r}'s width"
            raise VectorMismatchError(
                f"steering vector has size {vector.d_model} but {where} is {width}"
            )
        keep = head_mask(adapter, self.heads) if self.heads is not None else None
        if self.experts is not None:
            experts = list(check_experts(adapter, self.experts))
            if site == "router":
                keep = torch.zeros(width, dtype=torch.bool)
                keep[experts] = True
        vec_layers = {layer: adapter.resolve_layer(layer) for layer in vector.layers}
        if isinstance(self.strength, Mapping):
            pairs = [(k, adapter.resolve_layer(k), float(v)) for k, v in self.strength.items()]
        else:
            chosen = self.layers if self.layers is not None else list(vec_layers.values())
            pairs = [(k, adapter.resolve_layer(k), float(self.strength)) for k in chosen]
        targets: dict[int, float] = {}
        given: dict[int, int] = {}
        for raw, layer, strength in pairs:
            if layer in targets:
                # {-1: a, 2: b} on a 3-layer model: one of them would be dropped silently
                raise InvalidInputError(
                    f"layer {layer} is given twice (as {given[layer]} and {raw}) after resolving "
                    f"negative indices; give each layer once"
                )
            targets[layer], given[layer] = strength, raw
        by_resolved = {resolved: vector.directions[raw] for raw, resolved in vec_layers.items()}
        out: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}
        for layer, strength in targets.items():
            direction = direction_at(by_resolved, layer, use="applied", known=vector.layers)
            if keep is not None:
                direction = torch.where(keep, direction, torch.zeros_like(direction))
            if not bool(torch.isfinite(direction.to(torch.float32) * strength).all()):
                raise InvalidInputError(
                    f"strength {strength:g} at layer {layer} overflows float32 (strength x "
                    f"direction is not finite); use a smaller strength"
                )
            extras: dict[str, torch.Tensor] = {}
            for name, per_layer in vector.extras.items():
                resolved_extra = {adapter.resolve_layer(k): t for k, t in per_layer.items()}
                if layer in resolved_extra or len(resolved_extra) == 1:
                    extras[name] = direction_at(resolved_extra, layer, use="applied")
            out[layer] = (strength, {"direction": direction, **extras})
        return out

    def layer_deltas(self, adapter: ModelAdapter) -> dict[int, torch.Tensor]:
        """``{resolved layer: strength × direction}`` in float32, validated against the model."""
        return {
            layer: tensors["direction"].to(torch.float32) * strength
            for layer, (strength, tensors) in self._targets(adapter).items()
        }

    def layer_params(self, adapter: ModelAdapter) -> dict[int, dict[str, torch.Tensor]]:
        """``{resolved layer: operator constants}`` (see :meth:`Operator.params`), validated."""
        op = self.operator
        out: dict[int, dict[str, torch.Tensor]] = {}
        for layer, (strength, tensors) in self._targets(adapter).items():
            extras = {k: v for k, v in tensors.items() if k != "direction"}
            check_extras(op, extras, layer)
            try:
                out[layer] = op.params(tensors["direction"].float(), strength, extras)
            except VectorMismatchError as err:
                raise VectorMismatchError(f"{err} (layer {layer})") from None
        return out

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        return RowSteering((self,), uniform=True).hooks(adapter, tracker)


SteeringLike = Union[SteeringVector, Steering]


def direction_at(
    directions: Mapping[Any, torch.Tensor],
    layer: int,
    *,
    use: str,
    known: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The direction to use at ``layer``: the vector's own, or its only one at any layer.

    A vector with several layers is used only at those layers (``use`` names the operation in
    the error, ``known`` lists the vector's layers there).

    >>> import torch
    >>> direction_at({3: torch.ones(2)}, 5, use="applied").tolist()
    [1.0, 1.0]
    """
    if layer in directions:
        return directions[layer]
    if len(directions) == 1:
        return next(iter(directions.values()))
    have = "" if known is None else f" (it has {known})"
    raise VectorMismatchError(
        f"the vector has no direction for layer {layer}{have}; a multi-layer vector is {use} "
        f"only at its own layers"
    )


@dataclasses.dataclass(frozen=True)
class RowSteering(Intervention):
    """Per-row steering: row ``i`` of every batch gets ``rows[i]`` (or nothing when ``None``).

    All rows share one hook per layer, so a batch of different vectors, strengths, operators,
    positions or conditions costs one forward pass: the basis of batched sweeps and of serving
    many users at once. Rows are grouped by (operator, positions, condition); a row outside a
    group is left bit-identical by it. ``uniform=True`` (one entry, used by :class:`Steering`)
    applies that entry to every row of any batch.
    """

    rows: tuple[Steering | None, ...]
    uniform: bool = False

    def slice(self, start: int, stop: int) -> RowSteering:
        """The rows ``start:stop`` (for running a long prompt list in chunks)."""
        if self.uniform:
            return self
        return RowSteering(self.rows[start:stop])

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        n_rows = len(self.rows)
        # (op name, positions, condition identity, site) -> layer -> per-row constants
        Key = tuple[str, Positions, int, str, tuple[int, ...] | None]
        groups: dict[Key, dict[int, list[dict[str, torch.Tensor] | None]]] = {}
        meta: dict[Key, tuple[Operator, Positions, Any]] = {}
        for row, steering in enumerate(self.rows):
            if steering is None:
                continue
            positions = Positions.parse(steering.positions)
            op = steering.operator
            site = steering.resolved_site
            gate = tuple(steering.experts) if site == "mlp_out" and steering.experts else None
            key = (op.name, positions, id(steering.when), site, gate)
            meta[key] = (op, positions, steering.when)
            per_layer = groups.setdefault(key, {})
            for layer, params in steering.layer_params(adapter).items():
                per_layer.setdefault(layer, [None] * n_rows)[row] = params
        probes: dict[int, Any] = {}
        specs_first: list[HookSpec] = []
        terms_by_site: dict[tuple[int, int, str], list[_Term]] = {}
        routings: dict[int, _Routing] = {}
        for key, per_layer in groups.items():
            op, positions, when = meta[key]
            site, gate = key[3], key[4]
            if positions.needs_ids:
                if not positions.bound:
                    raise InvalidInputError(
                        f"positions {positions.describe()!r} name marker text; steerlab resolves "
                        f"it with the model's tokenizer (model.steer/generate/logits), or give "
                        f"token ids: Positions.after(ids=[...])"
                    )
                tracker.track_ids = True
            probe = None
            if when is not None:
                if id(when) not in probes:
                    probe_layer, probe_hook = when.probe(adapter, tracker)
                    probes[id(when)] = (probe_layer, probe_hook)
                    specs_first.append(HookSpec(adapter.block(probe_layer), "forward", probe_hook))
                probe_layer, probe = probes[id(when)]
                # inside block L (attention, MLP, heads) runs before block L's output is read
                below = [
                    layer
                    for layer in per_layer
                    if layer < probe_layer or (layer == probe_layer and site != "resid")
                ]
                if below:
                    where = "" if site == "resid" else f" (site {site!r}, inside the block)"
                    raise InvalidInputError(
                        f"a condition read at layer {probe_layer} cannot gate steering at layers "
                        f"{sorted(below)}{where} below it (the forward pass reaches them first); "
                        f"fit the condition with layers=[...] below the steering layers"
                    )
            width = adapter.d_model if site == "resid" else site_width(adapter, site)
            for layer, per_row in per_layer.items():
                stacked = stack_params(op, per_row, width)
                present = torch.tensor([p is not None for p in per_row], dtype=torch.bool)
                # residual steering first at a layer: hooks keep the order they were made in
                order = (layer, SITE_ORDER[site], site)
                some = None if bool(present.all()) else present
                term = _Term(op, positions, stacked, some, probe)
                if gate is not None:
                    term.experts = torch.tensor(check_experts(adapter, gate))
                    term.routing = routings.setdefault(layer, _Routing())
                terms_by_site.setdefault(order, []).append(term)
        specs = []
        for (layer, _, site), terms in sorted(terms_by_site.items()):
            module, kind = site_hook(adapter, site, layer)
            hook = _SteerHook(
                tracker,
                terms,
                self.uniform,
                pre=kind == "forward_pre",
                router=module if site == "router" else None,
            )
            specs.append(HookSpec(module, kind, hook))
        # after any router steering of the same layer, so they see the final routing
        specs += [
            HookSpec(adapter.router(layer), "forward", routing.capture)
            for layer, routing in routings.items()
        ]
        return specs_first + specs


@dataclasses.dataclass
class _Term:
    """One operator applied to some rows at some positions (optionally gated by a probe)."""

    op: Operator
    positions: Positions
    params: dict[str, torch.Tensor]  # [rows, k] float32
    rows: torch.Tensor | None  # [rows] bool, None = every row
    probe: Any = None
    experts: torch.Tensor | None = None  # only tokens routed to one of these experts
    routing: _Routing | None = None


class _Routing(threading.local):
    """The experts a layer's router picked for each token in this thread's forward pass."""

    indices: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: Any, output: Any) -> None:
        self.indices = output[2]


class _SteerHook:
    """Forward hook applying its terms (in order) at the selected tokens of a block's output."""

    def __init__(
        self,
        tracker: PositionTracker,
        terms: list[_Term],
        uniform: bool,
        *,
        pre: bool = False,
        router: nn.Module | None = None,
    ):
        self.tracker = tracker
        self.terms = terms
        self.uniform = uniform
        self.pre = pre  # a forward pre-hook: the activation is the module's first argument
        self.router = router  # steering router logits: the routing is recomputed from them
        self._placed: dict[tuple[int, torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    def _params(self, index: int, like: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        key = (index, like.device, dtype)
        placed = self._placed.get(key)
        if placed is None:
            # Moving once per (device, dtype) keeps model-parallel models correct and cheap.
            term = self.terms[index]
            placed = {
                k: v.to(device=like.device, dtype=dtype)[:, None, :] for k, v in term.params.items()
            }
            if term.rows is not None:
                placed["__rows__"] = term.rows.to(like.device)[:, None]
            self._placed[key] = placed
        return placed

    def __call__(self, module: nn.Module, args: Any, *rest: Any) -> Any:
        output = args if self.pre else rest[0]
        hidden = output_hidden(output)
        flat = hidden.shape
        if hidden.ndim == 2 and self.tracker.abs_index is not None:
            # OPT's MLP and the MoE blocks work on the batch's tokens flattened
            hidden = hidden.reshape(*self.tracker.abs_index.shape, flat[-1])
        batch = hidden.shape[0]
        for index, term in enumerate(self.terms):
            is_add = isinstance(term.op, Add) and type(term.op) is Add
            p = self._params(index, hidden, hidden.dtype if is_add else torch.float32)
            n_rows = next(iter(p.values())).shape[0] if p else 1
            if n_rows != batch and not (self.uniform and n_rows == 1):
                raise InvalidInputError(
                    f"per-row steering has {n_rows} entries but the batch has {batch} rows (one "
                    f"entry per prompt, None for an unsteered one)"
                )
            mask: torch.Tensor | None = None
            if not (term.positions.covers_everything and self.tracker.all_real):
                mask = self.tracker.mask(term.positions).to(hidden.device)
            if term.probe is not None:
                fired = term.probe.mask(hidden.shape[:2]).to(hidden.device)
                mask = fired if mask is None else mask & fired
            rows = p.get("__rows__")
            if rows is not None:
                mask = rows.expand(batch, hidden.shape[1]) if mask is None else mask & rows
            if term.routing is not None and term.experts is not None:
                picked = term.routing.indices
                if picked is None:
                    raise InvalidInputError("no routing was seen before the MoE output")
                picked = picked.reshape(*hidden.shape[:2], -1)
                routed = torch.isin(picked, term.experts.to(picked.device)).any(dim=-1)
                mask = routed if mask is None else mask & routed
            if is_add:
                # the historical exact path: h + delta in the model's dtype, zero elsewhere
                delta = p["delta"]
                if mask is None:
                    hidden = hidden + delta
                else:
                    hidden = hidden + mask[..., None].to(hidden.dtype) * delta
                continue
            values = {k: v for k, v in p.items() if k != "__rows__"}
            edited = term.op.apply(hidden.float(), values).to(hidden.dtype)
            hidden = edited if mask is None else torch.where(mask[..., None], edited, hidden)
        if self.router is not None:
            return reroute(self.router, output, hidden.reshape(flat))
        return replace_output_hidden(output, hidden.reshape(flat))


# Within a layer, sites in the order the forward pass reaches them.
SITE_ORDER = {"head": 0, "attn_out": 1, "router": 2, "mlp_out": 3, "resid": 4}


def steering_with(
    steering: Any,
    *,
    strength: float | Mapping[int, float] | None = None,
    positions: PositionSpec | None = None,
    layers: Sequence[int] | None = None,
    op: str | Operator | None = None,
    when: Any = None,
) -> Any:
    """The ``steering=`` value that ``steering`` plus loose keywords describe, keywords folded in.

    ``strength``/``positions``/``layers``/``op``/``when`` turn a bare
    :class:`~steerlab.vectors.SteeringVector` into a :class:`Steering`; ``positions``/``op``/
    ``when`` also fill in a :class:`Steering` that left them unset (an explicit ``"all"`` is
    kept). A list or tuple is per-row: each entry is folded the same way (``None`` stays
    ``None``). Keywords left at ``None`` change nothing; with none given, ``steering`` comes back
    as it is. This is what ``steer``'s shorthand builds, and what the deprecated keywords of the
    other calls still mean.

    >>> import torch
    >>> from steerlab.vectors import SteeringVector
    >>> vec = SteeringVector({0: torch.ones(2)})
    >>> s = steering_with(vec, strength=0.5, positions="last")
    >>> s.strength, s.positions
    (0.5, 'last')
    >>> steering_with(Steering(vec, positions="all"), positions="last").positions
    'all'
    """
    if strength is None and positions is None and layers is None and op is None and when is None:
        return steering
    if op is not None:
        get_operator(op)
    given: dict[str, Any] = {
        key: value
        for key, value in (("strength", strength), ("positions", positions), ("layers", layers))
        if value is not None
    }

    def one(item: Any) -> Any:
        if item is None:
            return None
        if isinstance(item, SteeringVector):
            return Steering(item, **given, op=op, when=when)
        if isinstance(item, Intervention):
            if strength is not None or layers is not None:
                raise InvalidInputError(
                    "strength=/layers= apply to bare SteeringVectors; a Steering or other "
                    "intervention carries its own (use Steering(vec, strength=..., layers=...))"
                )
            if isinstance(item, Steering):
                changes: dict[str, Any] = {}
                if positions is not None and isinstance(item.positions, _DefaultPositions):
                    changes["positions"] = positions
                if op is not None and item.op is None:
                    changes["op"] = op
                if when is not None and item.when is None:
                    changes["when"] = when
                return dataclasses.replace(item, **changes) if changes else item
            if when is not None or op is not None:
                raise InvalidInputError(
                    f"op=/when= apply to steering vectors, not to {type(item).__name__}"
                )
            return item
        return item  # anything else is refused by normalize_steering, with the reason

    if isinstance(steering, (list, tuple)):
        return [one(item) for item in steering]
    return one(steering)


def normalize_steering(
    steering: Any,
    *,
    strength: float | Mapping[int, float] | None = None,
    positions: PositionSpec | None = None,
    layers: Sequence[int] | None = None,
    n_rows: int | None = None,
    op: str | Operator | None = None,
    when: Any = None,
    tokenizer: Any = None,
) -> list[Intervention]:
    """Turn what users pass as ``steering=`` into a list of interventions.

    Accepts ``None``, a :class:`SteeringVector`, a :class:`Steering` or other
    :class:`Intervention`, or a list (or tuple) with one entry per row (``None`` for an unsteered
    row). The keywords are folded in first, as :func:`steering_with` does. ``tokenizer`` turns
    text markers of content-based positions (``"after:..."``) into token ids.

    >>> import torch
    >>> from steerlab.vectors import SteeringVector
    >>> [s] = normalize_steering(SteeringVector({0: torch.ones(2)}), op="cap", strength=0.5)
    >>> s.op, s.strength
    ('cap', 0.5)
    """
    if steering is None:
        return []
    if isinstance(steering, (list, tuple)) and n_rows is not None and len(steering) != n_rows:
        raise InvalidInputError(
            f"per-row steering has {len(steering)} entries but there are {n_rows} prompts"
        )
    steering = steering_with(
        steering, strength=strength, positions=positions, layers=layers, op=op, when=when
    )

    def bind(item: Steering) -> Steering:
        spec = Positions.parse(item.positions)
        if tokenizer is not None and not spec.bound:
            item = dataclasses.replace(item, positions=spec.bind(tokenizer))
        return item

    def one(item: Any) -> Intervention | None:
        if item is None:
            return None
        if isinstance(item, SteeringVector):
            return bind(Steering(item))
        if isinstance(item, Steering):
            return bind(item)
        if isinstance(item, Intervention):
            return item
        if isinstance(item, torch.Tensor):
            raise InvalidInputError(
                "steering= takes a SteeringVector, not a raw tensor; wrap it with "
                "sl.SteeringVector.from_tensor(tensor, layers=[...])"
            )
        raise InvalidInputError(f"cannot steer with {type(item).__name__}")

    if isinstance(steering, (list, tuple)):
        items = [one(item) for item in steering]
        if any(item is not None and not isinstance(item, Steering) for item in items):
            raise InvalidInputError("per-row steering entries must be vectors, Steering or None")
        return [RowSteering(tuple(item if isinstance(item, Steering) else None for item in items))]
    single = one(steering)
    return [] if single is None else [single]
