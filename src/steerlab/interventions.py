"""Interventions: what is done at a site, installed as removable PyTorch hooks.

An :class:`Intervention` describes an edit (add a steering vector, ablate a head, ...) and lists
the hooks it needs; :func:`install` registers them and returns one :class:`HookHandle` that
removes exactly those hooks, nothing else. A failure half-way through installing removes what was
already added before the error propagates.

Every installation also registers a :class:`PositionTracker` on the model's backbone. It reads
the attention mask of each forward call and works out the *absolute* index of every token (prompt
start = 0, padding = -1), so position specs mean the same thing with or without a KV cache.

Order: hooks on one module run in installation order, so interventions compose in the order they
were installed: outer ``with model.steer(...)`` first, inner ones next, per-call ``steering=``
last, and within a list in list order. Reads (``model.activations``) see the result of all of them.

>>> import torch, transformers
>>> from steerlab.adapter import ModelAdapter
>>> from steerlab.vectors import SteeringVector
>>> hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2,
...     vocab_size=16))
>>> adapter = ModelAdapter(hf)
>>> handle = install(adapter, [Steering(SteeringVector({1: torch.ones(8)}), strength=2.0)])
>>> len(hf.transformer.h[1]._forward_hooks)
1
>>> handle.remove(); len(hf.transformer.h[1]._forward_hooks)
0
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from steerlab.adapter import ModelAdapter
from steerlab.errors import InvalidInputError, VectorMismatchError
from steerlab.operators import Add, Operator, _check_extras, get_operator, stack_params
from steerlab.positions import Positions, PositionSpec, marker_flags
from steerlab.vectors import SteeringVector

__all__ = [
    "HookHandle",
    "HookSpec",
    "Intervention",
    "PositionTracker",
    "RowSteering",
    "Steering",
    "SteeringLike",
    "active_trackers",
    "count_hooks",
    "direction_at",
    "install",
    "normalize_steering",
    "output_hidden",
    "replace_output_hidden",
]


# --- block outputs: tensor (transformers 5) or tuple (transformers 4) ------------------------
def output_hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output that may be a tensor or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the hidden state in a module output of type {type(output)}")


def replace_output_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced, keeping the container type."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (
        type(output)((hidden, *output[1:])) if isinstance(output, tuple) else [hidden, *output[1:]]
    )


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# transformers 5 leaves these on blocks for good after one output_hidden_states/output_attentions
# call; they only record outputs while one of its collectors is active, never change them.
_INERT_HOOK_PREFIX = "install_output_capuring_hook."


def count_hooks(module: nn.Module) -> int:
    """Hooks on ``module`` and its submodules that can change its computation.

    Counts every forward/backward (pre-)hook except transformers' own output-capturing hooks,
    which stay installed after any ``output_hidden_states=True`` call and change nothing.

    >>> count_hooks(nn.Linear(2, 2))
    0
    """
    total = 0
    for sub in module.modules():
        for name in _HOOK_DICTS:
            for hook in getattr(sub, name, {}).values():
                qualname = getattr(hook, "__qualname__", "")
                if not qualname.startswith(_INERT_HOOK_PREFIX):
                    total += 1
    return total


# --- position tracking --------------------------------------------------------------------------
class PositionTracker:
    """Knows, during each forward call, the absolute index of every token in the batch.

    ``prompt_lengths_override`` (set by steerlab's own ``generate``/``logits`` for the duration
    of a call) pins the prompt length ``P`` of each row; otherwise ``P`` is read off the first
    forward call of a sequence (one that starts with an empty cache).

    Token history: when an installed intervention selects tokens by content (``after:``,
    ``between:``, ``outside:``) it sets ``track_ids``; the tracker then keeps each row's token
    ids by absolute index (a new token is appended, a token that differs from the recorded one
    at its index truncates the row's history there: a new sequence), so a mask at token ``i``
    is computed from tokens ``0..i`` whether they arrive one per call (KV cache) or all at once.
    Scans are incremental: each row's marker state is carried from one call to the next.
    """

    def __init__(self) -> None:
        self.abs_index: torch.Tensor | None = None
        self.prompt_lengths: torch.Tensor | None = None
        self.all_real: bool = True
        self.prompt_lengths_override: torch.Tensor | None = None
        self.track_ids: bool = False
        self.history: list[list[int]] | None = None
        self._scans: dict[tuple[Positions, int], tuple[list[bool], bool]] = {}
        self._masks: dict[Positions, torch.Tensor] = {}

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
            abs_index = torch.arange(offset, offset + length, device=ids.device).expand(
                batch, length
            )
            inferred = torch.full((batch,), offset + length, dtype=torch.long, device=ids.device)
            self.all_real = True
        self.abs_index = abs_index
        self._masks = {}
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
            self.history = None  # embeddings only: content specs refuse in mask()
            return
        batch = ids.shape[0]
        if self.history is None or len(self.history) != batch:
            self.history = [[] for _ in range(batch)]
            self._scans = {}
        for row, (tokens, indices) in enumerate(zip(ids.tolist(), abs_index.tolist())):
            hist = self.history[row]
            for token, index in zip(tokens, indices):
                if index < 0:
                    continue
                if index < len(hist):
                    if hist[index] == token:
                        continue
                    del hist[index:]
                    for key in [k for k in self._scans if k[1] == row]:
                        del self._scans[key]
                if index != len(hist):
                    raise InvalidInputError(
                        f"token history of row {row} has {len(hist)} tokens but the call brings "
                        f"token {index}; content-based positions need every token of the sequence"
                    )
                hist.append(int(token))

    def mask(self, positions: Positions) -> torch.Tensor:
        """Boolean ``[batch, seq]`` mask of the tokens ``positions`` selects in this call."""
        if self.abs_index is None or self.prompt_lengths is None:
            raise RuntimeError("PositionTracker used outside a forward call")
        if not positions.needs_ids:
            return positions.mask(self.abs_index, self.prompt_lengths)
        cached = self._masks.get(positions)
        if cached is not None:
            return cached
        if self.history is None:
            raise InvalidInputError(
                f"positions {positions.describe()!r} need the token ids of the call (input_ids); "
                f"this forward call has none"
            )
        out = torch.zeros(self.abs_index.shape, dtype=torch.bool)
        index_rows = self.abs_index.cpu()
        for row, hist in enumerate(self.history):
            flags, state = self._scans.get((positions, row), ([], False))
            if len(flags) < len(hist):
                more, state = marker_flags(positions, hist, start=len(flags), state=state)
                flags = flags + more
                self._scans[(positions, row)] = (flags, state)
            if not flags:
                continue
            table = torch.tensor(flags, dtype=torch.bool)
            indices = index_rows[row]
            real = indices >= 0
            out[row] = real & table[indices.clamp(0, len(flags) - 1)]
        out = out.to(self.abs_index.device)
        self._masks[positions] = out
        return out


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
    """One hook an intervention needs: ``kind`` is ``"forward"`` or ``"forward_pre"``."""

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


# Trackers currently installed per backbone, so steerlab's own calls can pin prompt lengths on
# every one of them, whichever wrapper (steered, edited, ...) installed it.
_ACTIVE_TRACKERS: weakref.WeakKeyDictionary[nn.Module, list[PositionTracker]] = (
    weakref.WeakKeyDictionary()
)


def active_trackers(backbone: nn.Module) -> list[PositionTracker]:
    """The position trackers currently installed on ``backbone`` (installation order)."""
    return list(_ACTIVE_TRACKERS.get(backbone, []))


class HookHandle:
    """Removes exactly the hooks one installation added. Idempotent; usable as a context manager.

    >>> HookHandle([]).remove()
    """

    def __init__(
        self,
        handles: list[RemovableHandle],
        tracker: PositionTracker | None = None,
        backbone: nn.Module | None = None,
    ):
        self._handles = handles
        self.tracker = tracker
        self._backbone = backbone
        if tracker is not None and backbone is not None:
            _ACTIVE_TRACKERS.setdefault(backbone, []).append(tracker)

    @property
    def active(self) -> bool:
        """True until :meth:`remove` is called."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove this installation's hooks (in reverse order); later calls do nothing."""
        while self._handles:
            self._handles.pop().remove()
        if self._backbone is not None and self.tracker is not None:
            trackers = _ACTIVE_TRACKERS.get(self._backbone, [])
            if self.tracker in trackers:
                trackers.remove(self.tracker)
            self._backbone = None

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install(adapter: ModelAdapter, interventions: Sequence[Intervention]) -> HookHandle:
    """Register the hooks of ``interventions`` (in order) and return their handle.

    Nothing is registered until every intervention has produced its hook list, so validation
    errors leave the model untouched; a registration that fails half-way removes what it added.
    """
    tracker = PositionTracker()
    specs: list[HookSpec] = []
    for intervention in interventions:
        if not isinstance(intervention, Intervention):
            raise InvalidInputError(f"not an intervention: {intervention!r}")
        specs.extend(intervention.hooks(adapter, tracker))
    handles: list[RemovableHandle] = []
    try:
        handles.append(
            adapter.backbone.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True)
        )
        for spec in specs:
            if spec.kind == "forward":
                handles.append(spec.module.register_forward_hook(spec.fn))
            elif spec.kind == "forward_pre":
                handles.append(spec.module.register_forward_pre_hook(spec.fn))
            else:
                raise InvalidInputError(f"unknown hook kind {spec.kind!r}")
    except BaseException:
        for handle in reversed(handles):
            handle.remove()
        raise
    return HookHandle(handles, tracker, adapter.backbone)


# --- additive steering ---------------------------------------------------------------------------
def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InvalidInputError(f"{what} must be a number, got {value!r}") from None
    number = float(value)
    if not math.isfinite(number):
        raise InvalidInputError(f"{what} must be finite, got {number}")
    return number


@dataclasses.dataclass(frozen=True)
class Steering(Intervention):
    """Steer the residual stream at the vector's layers with an operator (default: add).

    ``strength`` is one number or a ``{layer: strength}`` mapping (the seed's per-layer weights);
    with a mapping, or with ``layers``, a single-layer vector is applied at each of those layers.
    ``op`` names a registered operator (:mod:`steerlab.operators`: ``"add"``, ``"add_norm"``,
    ``"clamp"``, ``"cap"``, ``"ablate"``, ``"rotate"``, ``"affine"``); ``None`` means ``"add"``,
    or ``"ablate"`` for a vector whose metadata says ``operation="project_out"``. ``when`` is a
    :class:`~steerlab.conditions.Condition`: only rows whose prompt satisfies it (or, for a
    per-token condition, only tokens where it fires) are steered.

    >>> import torch
    >>> from steerlab.vectors import SteeringVector
    >>> s = Steering(SteeringVector({2: torch.ones(4)}), strength={6: 0.5, 8: 1.0}, op="clamp")
    >>> s.positions, s.resolved_op
    ('all', 'clamp')
    """

    vector: SteeringVector
    strength: float | Mapping[int, float] = 1.0
    positions: PositionSpec = "all"
    layers: Sequence[int] | None = None
    op: str | Operator | None = None
    when: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.vector, SteeringVector):
            raise InvalidInputError(
                f"Steering needs a SteeringVector, got {type(self.vector).__name__}; wrap a raw "
                f"tensor with sl.SteeringVector.from_tensor(t, layers=[...])"
            )
        Positions.parse(self.positions)
        if isinstance(self.strength, Mapping):
            for key, value in self.strength.items():
                _finite(value, f"strength for layer {key}")
        else:
            _finite(self.strength, "strength")
        if self.op is not None:
            get_operator(self.op)
        if self.when is not None and not callable(getattr(self.when, "probe", None)):
            raise InvalidInputError(
                f"when= takes a Condition (sl.fit_condition / sl.Condition.load), not "
                f"{type(self.when).__name__}"
            )

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

    def _targets(self, adapter: ModelAdapter) -> dict[int, tuple[float, dict[str, torch.Tensor]]]:
        vector = self.vector
        if vector.d_model != adapter.d_model:
            raise VectorMismatchError(
                f"steering vector has size {vector.d_model} but the model's hidden size is "
                f"{adapter.d_model}"
            )
        vec_layers = {layer: adapter.resolve_layer(layer) for layer in vector.layers}
        if isinstance(self.strength, Mapping):
            targets = {adapter.resolve_layer(k): float(v) for k, v in self.strength.items()}
        else:
            chosen = self.layers if self.layers is not None else list(vec_layers.values())
            targets = {layer: float(self.strength) for layer in adapter.resolve_layers(chosen)}
        by_resolved = {resolved: vector.directions[raw] for raw, resolved in vec_layers.items()}
        out: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}
        for layer, strength in targets.items():
            direction = direction_at(by_resolved, layer, use="applied", known=vector.layers)
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
            _check_extras(op, extras, layer)
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
        # (op name, positions, condition identity) -> layer -> per-row constants
        groups: dict[tuple[str, Positions, int], dict[int, list[dict[str, torch.Tensor] | None]]]
        groups = {}
        meta: dict[tuple[str, Positions, int], tuple[Operator, Positions, Any]] = {}
        for row, steering in enumerate(self.rows):
            if steering is None:
                continue
            positions = Positions.parse(steering.positions)
            op = steering.operator
            key = (op.name, positions, id(steering.when))
            meta[key] = (op, positions, steering.when)
            per_layer = groups.setdefault(key, {})
            for layer, params in steering.layer_params(adapter).items():
                per_layer.setdefault(layer, [None] * n_rows)[row] = params
        probes: dict[int, Any] = {}
        specs_first: list[HookSpec] = []
        terms_by_layer: dict[int, list[_Term]] = {}
        for key, per_layer in groups.items():
            op, positions, when = meta[key]
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
                below = [layer for layer in per_layer if layer < probe_layer]
                if below:
                    raise InvalidInputError(
                        f"a condition read at layer {probe_layer} cannot gate steering at layers "
                        f"{sorted(below)} below it (the forward pass reaches them first); fit the "
                        f"condition with layers=[...] at or below the steering layers"
                    )
            for layer, per_row in per_layer.items():
                stacked = stack_params(op, per_row, adapter.d_model)
                present = torch.tensor([p is not None for p in per_row], dtype=torch.bool)
                terms_by_layer.setdefault(layer, []).append(
                    _Term(op, positions, stacked, None if bool(present.all()) else present, probe)
                )
        return specs_first + [
            HookSpec(adapter.block(layer), "forward", _SteerHook(tracker, terms, self.uniform))
            for layer, terms in sorted(terms_by_layer.items())
        ]


@dataclasses.dataclass
class _Term:
    """One operator applied to some rows at some positions (optionally gated by a probe)."""

    op: Operator
    positions: Positions
    params: dict[str, torch.Tensor]  # [rows, k] float32
    rows: torch.Tensor | None  # [rows] bool, None = every row
    probe: Any = None


class _SteerHook:
    """Forward hook applying its terms (in order) at the selected tokens of a block's output."""

    def __init__(self, tracker: PositionTracker, terms: list[_Term], uniform: bool):
        self.tracker = tracker
        self.terms = terms
        self.uniform = uniform
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

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output_hidden(output)
        batch = hidden.shape[0]
        for index, term in enumerate(self.terms):
            is_add = isinstance(term.op, Add) and type(term.op) is Add
            p = self._params(index, hidden, hidden.dtype if is_add else torch.float32)
            n_rows = next(iter(p.values())).shape[0] if p else 1
            if n_rows != batch and not (self.uniform and n_rows == 1):
                raise InvalidInputError(
                    f"per-row steering was built for {n_rows} rows but the batch has {batch}"
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
        return replace_output_hidden(output, hidden)


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
    :class:`Intervention`, or a list with one entry per row (``None`` for an unsteered row).
    ``strength``/``positions``/``layers``/``op`` fill in for bare vectors; ``when`` (a
    condition) and ``positions``/``op`` also fill in for :class:`Steering` objects that left
    them at their defaults. ``tokenizer`` turns text markers of content-based positions
    (``"after:..."``) into token ids.

    >>> import torch
    >>> from steerlab.vectors import SteeringVector
    >>> [s] = normalize_steering(SteeringVector({0: torch.ones(2)}), op="cap", strength=0.5)
    >>> s.op, s.strength
    ('cap', 0.5)
    """
    if steering is None:
        return []
    if op is not None:
        get_operator(op)

    def bind(item: Steering) -> Steering:
        spec = Positions.parse(item.positions)
        if tokenizer is not None and not spec.bound:
            item = dataclasses.replace(item, positions=spec.bind(tokenizer))
        return item

    def one(item: Any) -> Intervention | None:
        if item is None:
            return None
        if isinstance(item, SteeringVector):
            return bind(
                Steering(
                    item,
                    strength=1.0 if strength is None else strength,
                    positions="all" if positions is None else positions,
                    layers=layers,
                    op=op,
                    when=when,
                )
            )
        if isinstance(item, Intervention):
            if strength is not None or layers is not None:
                raise InvalidInputError(
                    "strength=/layers= apply to bare SteeringVectors; a Steering or other "
                    "intervention carries its own (use Steering(vec, strength=..., layers=...))"
                )
            if isinstance(item, Steering):
                changes: dict[str, Any] = {}
                if positions is not None and item.positions == "all":
                    changes["positions"] = positions
                if op is not None and item.op is None:
                    changes["op"] = op
                if when is not None and item.when is None:
                    changes["when"] = when
                return bind(dataclasses.replace(item, **changes) if changes else item)
            if when is not None or op is not None:
                raise InvalidInputError(
                    f"op=/when= apply to steering vectors, not to {type(item).__name__}"
                )
            return item
        if isinstance(item, torch.Tensor):
            raise InvalidInputError(
                "steering= takes a SteeringVector, not a raw tensor; wrap it with "
                "sl.SteeringVector.from_tensor(tensor, layers=[...])"
            )
        raise InvalidInputError(f"cannot steer with {type(item).__name__}")

    if isinstance(steering, (list, tuple)):
        if n_rows is not None and len(steering) != n_rows:
            raise InvalidInputError(
                f"per-row steering has {len(steering)} entries but there are {n_rows} prompts"
            )
        items = [one(item) for item in steering]
        if any(item is not None and not isinstance(item, Steering) for item in items):
            raise InvalidInputError("per-row steering entries must be vectors, Steering or None")
        return [RowSteering(tuple(item if isinstance(item, Steering) else None for item in items))]
    single = one(steering)
    return [] if single is None else [single]
