"""The ablation interventions: zero, mean, stored (patching) and directional ablation.

* :class:`ZeroAblation` replaces a component's activation with zeros (the seed's head ablation).
* :class:`MeanAblation` replaces it with its mean over calibration prompts
  (:class:`~steerlab.ablation.means.ActivationMeans`), per absolute token position or averaged.
* :class:`ReplaceActivation` puts any stored activation there (activation patching).
* :class:`DirectionalAblation` removes the component along a unit direction.
* :class:`MaskedReplacement` replaces a component in the rows (and heads) a mask marks.

Each is an :class:`~steerlab.interventions.Intervention`: pass it as ``steering=``, install it
with ``model.steer(...)`` or make it permanent with ``model.edit(...)``. Components are the sites
of :mod:`steerlab.ablation.sites`.

>>> import torch
>>> from steerlab.testing import tiny_model
>>> model = tiny_model("gpt2")
>>> clean = model.logits(["the cat sat"])
>>> ablated = model.logits(["the cat sat"], steering=ZeroAblation(1, component="mlp"))
>>> bool(torch.equal(clean, ablated))
False
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import nn

from steerlab.ablation.means import ActivationMeans
from steerlab.ablation.sites import (
    check_component,
    check_heads,
    component_site,
    component_width,
    residual_writers,
)
from steerlab.adapter import ModelAdapter
from steerlab.dispatch import HookSpec, Intervention
from steerlab.errors import InvalidInputError, UnsupportedModelError, VectorMismatchError
from steerlab.positions import Positions, PositionSpec
from steerlab.sites import output_hidden, replace_output_hidden
from steerlab.steering import direction_at
from steerlab.tracking import PositionTracker
from steerlab.vectors import SteeringVector

__all__ = [
    "DirectionalAblation",
    "MaskedReplacement",
    "MeanAblation",
    "ReplaceActivation",
    "RowsSpec",
    "ZeroAblation",
]

RowsSpec = Union[Sequence[bool], torch.Tensor, None]
"""Which rows of each forward batch an ablation acts on: a boolean per row, or ``None`` (all)."""


def _rows_tensor(rows: RowsSpec) -> torch.Tensor | None:
    if rows is None:
        return None
    tensor = torch.as_tensor(rows)
    if tensor.ndim != 1 or tensor.dtype != torch.bool:
        raise InvalidInputError(
            f"rows must be a 1-D sequence of booleans (one per batch row), got {rows!r}"
        )
    return tensor


# --- the replacement hook ------------------------------------------------------------------------
ValueFn = Callable[[PositionTracker | None, torch.Tensor], torch.Tensor | None]


class _ReplaceHook:
    """Replace (part of) a site's activation by ``value`` at the selected rows and positions.

    ``value(tracker, like)`` returns a tensor broadcastable to the activation ``[batch, seq,
    width]`` (``None`` = zeros). With ``heads`` only those heads' slices change. Never in place.
    """

    def __init__(
        self,
        tracker: PositionTracker | None,
        value: ValueFn,
        *,
        positions: Positions | None,
        rows: torch.Tensor | None,
        heads: tuple[int, ...] | None,
        head_mask: torch.Tensor | None = None,
        n_heads: int = 1,
        head_dim: int = 1,
        pre: bool = False,
    ) -> None:
        self.tracker = tracker
        self.value = value
        self.positions = positions
        self.rows = rows
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.pre = pre
        if head_mask is None and heads is not None:
            head_mask = torch.zeros(n_heads, dtype=torch.bool)
            head_mask[list(heads)] = True
        self.head_mask = head_mask  # [H] or [rows, H]

    def _select(self, x: torch.Tensor) -> torch.Tensor | None:
        """Boolean ``[batch, seq]`` of replaced tokens, or ``None`` for every token."""
        batch, seq = x.shape[0], x.shape[1]
        selected: torch.Tensor | None = None
        if self.positions is not None and not (
            self.positions.covers_everything and (self.tracker is None or self.tracker.all_real)
        ):
            if self.tracker is None:
                raise RuntimeError("a position-restricted ablation needs a position tracker")
            selected = self.tracker.mask(self.positions).to(x.device)
        if self.rows is not None:
            if self.rows.shape[0] != batch:
                raise InvalidInputError(
                    f"the ablation's rows mask has {self.rows.shape[0]} entries but the forward "
                    f"batch has {batch} rows (rows= refers to the rows of each forward call; "
                    f"run without batch_size chunking)"
                )
            row_sel = self.rows.to(x.device)[:, None].expand(batch, seq)
            selected = row_sel if selected is None else selected & row_sel
        return selected

    def _batch_hint(self) -> int:
        if self.tracker is not None and self.tracker.abs_index is not None:
            return int(self.tracker.abs_index.shape[0])
        if self.rows is not None:
            return int(self.rows.shape[0])
        if self.head_mask is not None and self.head_mask.ndim == 2:
            return int(self.head_mask.shape[0])
        return 1

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            # OPT runs its MLP on flattened tokens: [batch * seq, width]
            batch = self._batch_hint()
            if x.shape[0] % batch:
                raise UnsupportedModelError(
                    f"cannot split a flattened activation of {x.shape[0]} tokens into {batch} rows"
                )
            return self._apply(x.reshape(batch, x.shape[0] // batch, x.shape[1])).reshape(x.shape)
        return self._apply(x)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        value = self.value(self.tracker, x)
        if value is None:
            value = x.new_zeros(())
        value = value.to(device=x.device, dtype=x.dtype)
        selected = self._select(x)
        if self.head_mask is None:
            mask = torch.ones((), dtype=torch.bool, device=x.device)
            if selected is not None:
                mask = selected[..., None]
            return torch.where(mask, value, x)
        batch, seq, width = x.shape
        if width != self.n_heads * self.head_dim:
            raise UnsupportedModelError(
                f"the attention output projection's input has {width} features, not n_heads "
                f"({self.n_heads}) x head_dim ({self.head_dim}); cannot split it into heads"
            )
        xh = x.reshape(batch, seq, self.n_heads, self.head_dim)
        if value.ndim > 0:
            value = value.reshape(*value.shape[:-1], self.n_heads, self.head_dim)
        head_mask = self.head_mask.to(x.device)
        if head_mask.ndim == 1:
            mask = head_mask[None, None, :, None]
        else:
            if head_mask.shape[0] != batch:
                raise InvalidInputError(
                    f"per-row head mask has {head_mask.shape[0]} rows, the batch has {batch}"
                )
            mask = head_mask[:, None, :, None]
        if selected is not None:
            mask = mask & selected[:, :, None, None]
        return torch.where(mask, value, xh).reshape(batch, seq, width)

    def __call__(self, module: nn.Module, args: Any, output: Any = None) -> Any:
        if self.pre:
            return (self.apply(args[0]), *args[1:])
        return replace_output_hidden(output, self.apply(output_hidden(output)))


def _placed(cache: dict[Any, torch.Tensor], tensor: torch.Tensor, like: torch.Tensor) -> Any:
    key = (like.device, like.dtype)
    placed = cache.get(key)
    if placed is None:
        placed = tensor.to(device=like.device, dtype=like.dtype)
        cache[key] = placed
    return placed


def _per_position_value(
    per_position: torch.Tensor, fallback: torch.Tensor | None
) -> Callable[[PositionTracker | None, torch.Tensor], torch.Tensor]:
    """Look up ``per_position[i]`` at absolute position ``i``; ``fallback`` beyond (or error)."""
    cache: dict[Any, torch.Tensor] = {}
    fallback_cache: dict[Any, torch.Tensor] = {}

    def value(tracker: PositionTracker | None, like: torch.Tensor) -> torch.Tensor:
        if tracker is None or tracker.abs_index is None:
            raise RuntimeError("a per-position value needs the position tracker")
        table = _placed(cache, per_position, like)
        abs_index = tracker.abs_index.to(like.device)
        n = table.shape[0]
        inside = (abs_index >= 0) & (abs_index < n)
        gathered = table[abs_index.clamp(0, n - 1)]
        if fallback is not None:
            other = _placed(fallback_cache, fallback, like)
        else:
            other = like  # keep the model's own activation where no stored value exists
        return torch.where(inside[..., None], gathered, other)

    return value


def _constant_value(tensor: torch.Tensor) -> ValueFn:
    cache: dict[Any, torch.Tensor] = {}

    def value(_tracker: PositionTracker | None, like: torch.Tensor) -> torch.Tensor:
        return _placed(cache, tensor, like)

    return value


def _zero_value(_tracker: PositionTracker | None, _like: torch.Tensor) -> None:
    return None


# --- the ablation interventions ------------------------------------------------------------------
def _component_hooks(
    adapter: ModelAdapter,
    tracker: PositionTracker,
    *,
    layer: int,
    component: str,
    head: int | Sequence[int] | None,
    positions: PositionSpec,
    rows: RowsSpec,
    value: ValueFn,
) -> list[HookSpec]:
    check_component(component)
    heads = check_heads(adapter, head) if component == "head" else None
    if component != "head" and head is not None:
        raise InvalidInputError(f"head= only applies to component='head', not {component!r}")
    module, kind = component_site(adapter, component, layer)
    hook = _ReplaceHook(
        tracker,
        value,
        positions=Positions.parse(positions),
        rows=_rows_tensor(rows),
        heads=heads,
        n_heads=adapter.n_heads,
        head_dim=adapter.head_dim,
        pre=kind == "forward_pre",
    )
    return [HookSpec(module, kind, hook)]


def _validate_common(component: str, positions: PositionSpec, rows: RowsSpec) -> None:
    check_component(component)
    Positions.parse(positions)
    _rows_tensor(rows)


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroAblation(Intervention):
    """Replace a component's activation with zeros.

    ``component`` is ``"block"``, ``"attn"``, ``"mlp"`` or ``"head"`` (then ``head`` is an int or
    a list of heads). ``positions`` restricts the tokens (default all), ``rows`` the batch rows.

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> out = model.logits(["the cat"], steering=ZeroAblation(0, component="mlp"))
    >>> tuple(out.shape[:2])
    (1, 2)
    """

    layer: int
    _: dataclasses.KW_ONLY
    component: str = "block"
    head: int | Sequence[int] | None = None
    positions: PositionSpec = "all"
    rows: RowsSpec = None

    def __post_init__(self) -> None:
        _validate_common(self.component, self.positions, self.rows)

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        return _component_hooks(
            adapter,
            tracker,
            layer=self.layer,
            component=self.component,
            head=self.head,
            positions=self.positions,
            rows=self.rows,
            value=_zero_value,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class MeanAblation(Intervention):
    """Replace a component's activation with its mean over calibration prompts.

    ``means`` is an :class:`ActivationMeans` (from :func:`compute_means`; per-position means are
    used when it has them, the position-averaged mean beyond their range and at padding) or a
    tensor: ``[width]`` (one mean for every position) or ``[n_positions, width]`` (row ``i`` at
    absolute position ``i``; beyond ``n_positions`` the model keeps its own activation).
    ``width`` is ``d_model``, or ``n_heads * head_dim`` for heads (the full input of the
    attention output projection; only the chosen heads' slices are used).
    ``per_position=False`` uses the position-averaged mean of an :class:`ActivationMeans`.

    >>> from steerlab.ablation import compute_means
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> means = compute_means(model, ["the cat sat", "a dog ran home"], layers=[1],
    ...                       components=["head"])
    >>> ablation = MeanAblation(1, means, component="head", head=0)
    >>> model.logits(["the cat"], steering=ablation).shape[0]
    1
    """

    layer: int
    means: ActivationMeans | torch.Tensor
    _: dataclasses.KW_ONLY
    component: str = "block"
    head: int | Sequence[int] | None = None
    positions: PositionSpec = "all"
    rows: RowsSpec = None
    per_position: bool = True

    def __post_init__(self) -> None:
        _validate_common(self.component, self.positions, self.rows)
        if isinstance(self.means, torch.Tensor):
            if self.means.ndim not in (1, 2) or not torch.is_floating_point(self.means):
                raise VectorMismatchError(
                    "a mean tensor must be floating point, [width] or [n_positions, width]; got "
                    f"shape {tuple(self.means.shape)}"
                )
            if not bool(torch.isfinite(self.means).all()):
                raise VectorMismatchError("the mean tensor contains NaN or inf")
            object.__setattr__(self, "means", self.means.detach().clone())
        elif not isinstance(self.means, ActivationMeans):
            raise InvalidInputError(
                f"means must be ActivationMeans or a tensor, got {type(self.means).__name__}"
            )

    def _value(self, adapter: ModelAdapter) -> ValueFn:
        layer = adapter.resolve_layer(self.layer)
        width = component_width(adapter, self.component)
        overall: torch.Tensor | None
        table: torch.Tensor | None
        if isinstance(self.means, ActivationMeans):
            overall = self.means.mean(self.component, layer)
            table = self.means.per_position.get((self.component, layer))
            if not self.per_position:
                table = None
        else:
            overall, table = (self.means, None) if self.means.ndim == 1 else (None, self.means)
        for tensor in (overall, table):
            if tensor is not None and tensor.shape[-1] != width:
                raise VectorMismatchError(
                    f"the mean has width {tensor.shape[-1]} but component {self.component!r} of "
                    f"this model is {width} wide"
                )
        if table is not None:
            return _per_position_value(table, overall)
        assert overall is not None
        return _constant_value(overall)

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        return _component_hooks(
            adapter,
            tracker,
            layer=self.layer,
            component=self.component,
            head=self.head,
            positions=self.positions,
            rows=self.rows,
            value=self._value(adapter),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class ReplaceActivation(Intervention):
    """Put a stored activation in place of a component's own (activation patching).

    ``value`` is ``[width]`` (the same activation at every selected position) or
    ``[n_positions, width]`` / ``[1, n_positions, width]`` (row ``i`` replaces absolute position
    ``i``; positions at or beyond ``n_positions`` keep the model's own activation). This is the
    seed's persistent edit "replace the last layer's output with the hidden states of *The
    capital of France is Paris*".

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> paris = model.activations(["the capital of france is paris"], layers=[-1],
    ...                           read_at="all")[-1][0]
    >>> patched = model.logits(["the capital of germany is"],
    ...                        steering=ReplaceActivation(-1, paris))
    >>> reference = model.logits(["the capital of france is paris"])
    >>> bool(torch.allclose(patched[0, -1], reference[0, 4], atol=1e-5))
    True
    """

    layer: int
    value: torch.Tensor
    _: dataclasses.KW_ONLY
    component: str = "block"
    head: int | Sequence[int] | None = None
    positions: PositionSpec = "all"
    rows: RowsSpec = None

    def __post_init__(self) -> None:
        _validate_common(self.component, self.positions, self.rows)
        value = self.value
        if not isinstance(value, torch.Tensor) or not torch.is_floating_point(value):
            raise InvalidInputError("ReplaceActivation needs a floating-point tensor value")
        if value.ndim == 3 and value.shape[0] == 1:
            value = value[0]
        if value.ndim not in (1, 2):
            raise VectorMismatchError(
                f"value must be [width], [n_positions, width] or [1, n_positions, width]; got "
                f"shape {tuple(self.value.shape)}"
            )
        if not bool(torch.isfinite(value).all()):
            raise VectorMismatchError("the replacement value contains NaN or inf")
        object.__setattr__(self, "value", value.detach().clone())

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        width = component_width(adapter, self.component)
        if self.value.shape[-1] != width:
            raise VectorMismatchError(
                f"the value has width {self.value.shape[-1]} but component {self.component!r} of "
                f"this model is {width} wide"
            )
        value = (
            _constant_value(self.value)
            if self.value.ndim == 1
            else _per_position_value(self.value, None)
        )
        return _component_hooks(
            adapter,
            tracker,
            layer=self.layer,
            component=self.component,
            head=self.head,
            positions=self.positions,
            rows=self.rows,
            value=value,
        )


# --- directional ablation ------------------------------------------------------------------------
class _ProjectHook:
    """``h - (h . u) u`` on a module output (or on the first input, ``pre``), never in place."""

    def __init__(self, unit: torch.Tensor, rows: torch.Tensor | None, *, pre: bool) -> None:
        self.unit = unit
        self.rows = rows
        self.pre = pre

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        # float32 arithmetic keeps the projection exact-ish for half-precision models
        u = self.unit.to(device=x.device, dtype=torch.float32)
        x32 = x.float()
        projected = (x32 - (x32 @ u)[..., None] * u).to(x.dtype)
        if self.rows is None:
            return projected
        if self.rows.shape[0] != x.shape[0] and (x.ndim != 2 or x.shape[0] % self.rows.shape[0]):
            raise InvalidInputError(
                f"the ablation's rows mask has {self.rows.shape[0]} entries but the forward "
                f"batch has {x.shape[0]} rows"
            )
        rows = self.rows.to(x.device)
        if x.ndim == 2:  # OPT's flattened [batch * seq, width] MLP activations
            rows = rows.repeat_interleave(x.shape[0] // rows.shape[0])
        keep = rows.reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(keep, projected, x)

    def __call__(self, module: nn.Module, args: Any, output: Any = None) -> Any:
        if self.pre:
            if not args or not isinstance(args[0], torch.Tensor):
                raise UnsupportedModelError(
                    "this model passes the embeddings to its first block by keyword, so "
                    "embeddings=True cannot reach them"
                )
            return (self.apply(args[0]), *args[1:])
        return replace_output_hidden(output, self.apply(output_hidden(output)))


@dataclasses.dataclass(frozen=True, eq=False)
class DirectionalAblation(Intervention):
    """Remove the component along a direction: ``h <- h - (h . u) u`` with ``u`` of unit norm.

    ``direction`` is a :class:`~steerlab.vectors.SteeringVector` (each layer uses its own
    direction; a single-layer vector serves every layer) or a ``[d_model]`` tensor.
    ``layers``: where (default: the vector's layers; every layer for a tensor; ``"all"``).

    * ``writers=False`` (default): project the residual stream at the output of each layer.
    * ``writers=True``: project the output of every module of those blocks that writes into the
      residual stream (attention and MLP, or Gemma 2/3's post-norms); with ``embeddings=True``
      also the embedding output entering block 0. Over all layers this keeps ``u`` out of the
      residual stream everywhere (the refusal-direction ablation, :meth:`everywhere`) and is
      exactly what :func:`steerlab.editing.bake` writes into orthogonalized weights.

    >>> import torch
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> u = torch.randn(model.d_model)
    >>> acts = model.activations(["the cat sat"], layers=[1],
    ...                          steering=DirectionalAblation(u, layers=[1]))
    >>> abs(float(acts[1][0] @ u)) < 1e-4
    True
    """

    direction: SteeringVector | torch.Tensor
    _: dataclasses.KW_ONLY
    layers: Sequence[int] | str | None = None
    writers: bool = False
    embeddings: bool = False
    rows: RowsSpec = None

    def __post_init__(self) -> None:
        direction = self.direction
        if isinstance(direction, torch.Tensor):
            if direction.ndim != 1 or not torch.is_floating_point(direction):
                raise VectorMismatchError(
                    f"a direction tensor must be 1-D floating point, got shape "
                    f"{tuple(direction.shape)}"
                )
            if not bool(torch.isfinite(direction).all()):
                raise VectorMismatchError("the direction contains NaN or inf")
            object.__setattr__(self, "direction", direction.detach().clone())
        elif not isinstance(direction, SteeringVector):
            raise InvalidInputError(
                f"direction must be a SteeringVector or a tensor, got {type(direction).__name__}"
            )
        if isinstance(self.layers, str) and self.layers != "all":
            raise InvalidInputError(f"layers must be a list of ints or 'all', not {self.layers!r}")
        if self.embeddings and not self.writers:
            raise InvalidInputError(
                "embeddings=True projects the embedding output as one of the residual writers; "
                "use it with writers=True"
            )
        _rows_tensor(self.rows)
        for layer, unit in self._raw_directions().items():
            if float(unit.norm()) == 0.0:
                raise VectorMismatchError(f"cannot ablate the zero direction (layer {layer})")

    @classmethod
    def everywhere(cls, direction: SteeringVector | torch.Tensor) -> DirectionalAblation:
        """Keep ``direction`` out of the residual stream entirely: every writer, every layer,
        and the embeddings (the refusal-direction ablation of Arditi et al., 2024).

        >>> import torch
        >>> DirectionalAblation.everywhere(torch.ones(4)).writers
        True
        """
        return cls(direction, layers="all", writers=True, embeddings=True)

    def _raw_directions(self) -> dict[int | None, torch.Tensor]:
        if isinstance(self.direction, torch.Tensor):
            return {None: self.direction}
        return {layer: t for layer, t in self.direction.directions.items()}

    def unit_directions(self, adapter: ModelAdapter) -> dict[int, torch.Tensor]:
        """``{resolved layer: unit direction}`` (float32) at every layer this ablation acts on."""
        raw = self._raw_directions()
        if isinstance(self.direction, SteeringVector) and self.direction.d_model != adapter.d_model:
            raise VectorMismatchError(
                f"the direction has size {self.direction.d_model} but the model's hidden size is "
                f"{adapter.d_model}"
            )
        if isinstance(self.direction, torch.Tensor) and self.direction.shape[0] != adapter.d_model:
            raise VectorMismatchError(
                f"the direction has size {self.direction.shape[0]} but the model's hidden size "
                f"is {adapter.d_model}"
            )
        by_layer = {
            (None if key is None else adapter.resolve_layer(key)): value
            for key, value in raw.items()
        }
        if self.layers == "all" or (self.layers is None and None in by_layer):
            layers = list(range(adapter.n_layers))
        elif self.layers is None:
            layers = sorted(k for k in by_layer if k is not None)
        else:
            assert not isinstance(self.layers, str)
            layers = adapter.resolve_layers(self.layers)
        out: dict[int, torch.Tensor] = {}
        for layer in layers:
            vec = direction_at(by_layer, layer, use="ablated").to(torch.float32)
            out[layer] = vec / vec.norm()
        return out

    def embedding_direction(self, adapter: ModelAdapter) -> torch.Tensor:
        """The unit direction projected out of the embeddings (needs a single direction)."""
        raw = self._raw_directions()
        if len(raw) != 1:
            raise VectorMismatchError(
                "embeddings=True needs a single direction (a tensor or a one-layer vector); this "
                f"vector has {len(raw)} layers"
            )
        vec = next(iter(raw.values())).to(torch.float32)
        if vec.shape[0] != adapter.d_model:
            raise VectorMismatchError(
                f"the direction has size {vec.shape[0]} but the model's hidden size is "
                f"{adapter.d_model}"
            )
        return vec / vec.norm()

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        rows = _rows_tensor(self.rows)
        specs: list[HookSpec] = []
        if self.embeddings:
            unit = self.embedding_direction(adapter)
            specs.append(
                HookSpec(adapter.block(0), "forward_pre", _ProjectHook(unit, rows, pre=True))
            )
        for layer, unit in self.unit_directions(adapter).items():
            modules = residual_writers(adapter, layer) if self.writers else [adapter.block(layer)]
            for module in modules:
                specs.append(HookSpec(module, "forward", _ProjectHook(unit, rows, pre=False)))
        return specs


# --- per-row ablation used by scans --------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class MaskedReplacement(Intervention):
    """Replace ``component`` of ``layer`` in the rows (and heads) ``mask`` marks: how
    :func:`~steerlab.ablation.ablation_scan` ablates a different head in each row of one batch.

    ``mask`` is ``[rows]`` or, for heads, ``[rows, n_heads]``; ``value`` is ``None`` (zeros) or
    a tensor broadcastable to the activation (``[rows, seq, width]``). Needs no position tracker,
    so it also works when blocks are called one by one.

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> clean = model.logits(["the cat", "the cat"])
    >>> out = model.logits(["the cat", "the cat"],
    ...                    steering=MaskedReplacement(1, "mlp", torch.tensor([True, False]), None))
    >>> bool(torch.allclose(out[1], clean[1])), bool(torch.allclose(out[0], clean[0]))
    (True, False)
    """

    layer: int
    component: str
    mask: torch.Tensor
    value: torch.Tensor | None

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        module, kind = component_site(adapter, self.component, self.layer)
        value = self.value
        fn: ValueFn = _zero_value if value is None else _constant_value(value)
        if self.component == "head":
            hook = _ReplaceHook(
                None,
                fn,
                positions=None,
                rows=None,
                heads=None,
                head_mask=self.mask,
                n_heads=adapter.n_heads,
                head_dim=adapter.head_dim,
                pre=True,
            )
        else:
            hook = _ReplaceHook(None, fn, positions=None, rows=self.mask, heads=None, pre=False)
        return [HookSpec(module, kind, hook)]
