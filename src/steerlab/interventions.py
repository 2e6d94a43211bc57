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
from steerlab.positions import Positions, PositionSpec
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
    "positions_without_2d_mask",
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
    """

    def __init__(self) -> None:
        self.abs_index: torch.Tensor | None = None
        self.prompt_lengths: torch.Tensor | None = None
        self.all_real: bool = True
        self.prompt_lengths_override: torch.Tensor | None = None

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
        override = self.prompt_lengths_override
        if override is not None and override.shape[0] == batch:
            self.prompt_lengths = override.to(ids.device)
        elif offset == 0 or self.prompt_lengths is None or self.prompt_lengths.shape[0] != batch:
            self.prompt_lengths = inferred if offset == 0 else torch.full_like(inferred, offset)

    def mask(self, positions: Positions) -> torch.Tensor:
        """Boolean ``[batch, seq]`` mask of the tokens ``positions`` selects in this call."""
        if self.abs_index is None or self.prompt_lengths is None:
            raise RuntimeError("PositionTracker used outside a forward call")
        return positions.mask(self.abs_index, self.prompt_lengths)


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
    """Add ``strength × vector`` to the residual stream at the vector's layers.

    ``strength`` is one number or a ``{layer: strength}`` mapping (the seed's per-layer weights);
    with a mapping, or with ``layers``, a single-layer vector is applied at each of those layers.

    >>> import torch
    >>> from steerlab.vectors import SteeringVector
    >>> s = Steering(SteeringVector({2: torch.ones(4)}), strength={6: 0.5, 8: 1.0})
    >>> s.positions
    'all'
    """

    vector: SteeringVector
    strength: float | Mapping[int, float] = 1.0
    positions: PositionSpec = "all"
    layers: Sequence[int] | None = None

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

    def layer_deltas(self, adapter: ModelAdapter) -> dict[int, torch.Tensor]:
        """``{resolved layer: strength × direction}`` in float32, validated against the model."""
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
        deltas: dict[int, torch.Tensor] = {}
        by_resolved = {resolved: vector.directions[raw] for raw, resolved in vec_layers.items()}
        for layer, strength in targets.items():
            direction = direction_at(by_resolved, layer, use="applied", known=vector.layers)
            deltas[layer] = direction.to(torch.float32) * strength
        return deltas

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        positions = Positions.parse(self.positions)
        return [
            HookSpec(adapter.block(layer), "forward", _AddHook(tracker, [(positions, delta[None])]))
            for layer, delta in self.layer_deltas(adapter).items()
        ]


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

    All rows share one hook per layer, so a batch of different vectors or strengths costs one
    forward pass: the basis of batched sweeps and of serving many users at once.
    """

    rows: tuple[Steering | None, ...]

    def slice(self, start: int, stop: int) -> RowSteering:
        """The rows ``start:stop`` (for running a long prompt list in chunks)."""
        return RowSteering(self.rows[start:stop])

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        n_rows = len(self.rows)
        per_layer: dict[int, dict[Positions, torch.Tensor]] = {}
        for row, steering in enumerate(self.rows):
            if steering is None:
                continue
            positions = Positions.parse(steering.positions)
            for layer, delta in steering.layer_deltas(adapter).items():
                terms = per_layer.setdefault(layer, {})
                if positions not in terms:
                    terms[positions] = torch.zeros(n_rows, adapter.d_model, dtype=torch.float32)
                terms[positions][row] += delta
        return [
            HookSpec(adapter.block(layer), "forward", _AddHook(tracker, list(terms.items())))
            for layer, terms in sorted(per_layer.items())
        ]


class _AddHook:
    """Forward hook adding ``delta[row]`` at the selected positions of a block's output."""

    def __init__(self, tracker: PositionTracker, terms: list[tuple[Positions, torch.Tensor]]):
        self.tracker = tracker
        self.terms = terms
        self._placed: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def _delta(self, index: int, like: torch.Tensor) -> torch.Tensor:
        key = (index, like.device, like.dtype)
        placed = self._placed.get(key)
        if placed is None:
            # Moving once per (device, dtype) keeps model-parallel models correct and cheap.
            placed = self.terms[index][1].to(device=like.device, dtype=like.dtype)
            self._placed[key] = placed
        return placed

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output_hidden(output)
        batch = hidden.shape[0]
        for index, (positions, _) in enumerate(self.terms):
            delta = self._delta(index, hidden)
            if delta.shape[0] not in (1, batch):
                raise InvalidInputError(
                    f"per-row steering was built for {delta.shape[0]} rows but the batch has "
                    f"{batch}"
                )
            if positions.covers_everything and self.tracker.all_real:
                hidden = hidden + delta[:, None, :]
            else:
                mask = self.tracker.mask(positions).to(hidden.device)
                hidden = hidden + mask[..., None].to(hidden.dtype) * delta[:, None, :]
        return replace_output_hidden(output, hidden)


def normalize_steering(
    steering: Any,
    *,
    strength: float | Mapping[int, float] | None = None,
    positions: PositionSpec | None = None,
    layers: Sequence[int] | None = None,
    n_rows: int | None = None,
) -> list[Intervention]:
    """Turn what users pass as ``steering=`` into a list of interventions.

    Accepts ``None``, a :class:`SteeringVector`, a :class:`Steering` or other
    :class:`Intervention`, or a list with one entry per row (``None`` for an unsteered row).
    ``strength``/``positions``/``layers`` fill in for bare vectors.
    """
    if steering is None:
        return []

    def one(item: Any) -> Intervention | None:
        if item is None:
            return None
        if isinstance(item, SteeringVector):
            return Steering(
                item,
                strength=1.0 if strength is None else strength,
                positions="all" if positions is None else positions,
                layers=layers,
            )
        if isinstance(item, Intervention):
            if strength is not None or layers is not None:
                raise InvalidInputError(
                    "strength=/layers= apply to bare SteeringVectors; a Steering or other "
                    "intervention carries its own (use Steering(vec, strength=..., layers=...))"
                )
            if isinstance(item, Steering) and positions is not None and item.positions == "all":
                return dataclasses.replace(item, positions=positions)
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
