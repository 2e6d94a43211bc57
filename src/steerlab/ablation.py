"""Ablation: zero, mean and directional ablation, activation means, and ablation scans.

Ablating a component means replacing what it computes and asking how much the model's behaviour
depends on it. The *sites* ("components") of decoder block ``L`` are:

===========  ==================================================================================
component    the activation that is replaced
===========  ==================================================================================
``block``    the block's output: the residual stream at layer ``L``
``attn``     the attention module's output (what attention contributes; before a Gemma-style
             post-attention norm)
``mlp``      the MLP's output (OPT: ``fc2``)
``head``     one or more attention heads: head ``h`` is the slice ``[h*head_dim:(h+1)*head_dim]``
             of the *input* of the attention output projection (``o_proj``, GPT-2's
             ``c_proj``, ``dense``, ``out_proj``). That projection is linear,
             ``o_proj(x) = sum_h W_O[:, h] x_h (+ b)``, so zeroing ``x_h`` removes exactly head
             ``h``'s contribution. Its input is ``n_heads * head_dim`` wide whatever the number of
             key/value heads, so grouped-query models work the same way.
===========  ==================================================================================

* :class:`ZeroAblation` replaces the activation with zeros (the seed's head ablation).
* :class:`MeanAblation` replaces it with its mean over calibration prompts, per absolute token
  position (prompt start = 0) or averaged over positions: less disruptive than zeros because
  the model never sees an out-of-distribution activation. :func:`compute_means` streams the
  prompts batch by batch (memory holds sums, never activations) and caches the result on disk.
* :class:`ReplaceActivation` puts any stored activation there (activation patching; the seed's
  "replace the layer output with a stored activation" edit).
* :class:`DirectionalAblation` removes the component along a unit direction ``u``:
  ``h <- h - (h . u) u``, either from the residual stream at chosen layers or from the output of
  every module that writes to it (the "refusal direction" recipe; what
  :func:`steerlab.editing.bake` turns into orthogonalized weights).

All of them are :class:`~steerlab.interventions.Intervention` objects: pass them as
``steering=`` to ``logits``/``generate``/``activations``, install them with ``model.steer(...)``
or make them permanent with ``model.edit(...)``. ``rows`` (a boolean per batch row) restricts an
ablation to some rows of each forward batch, so many configurations share one forward pass.

:func:`ablation_scan` ablates every head of every layer (or chosen ones, or whole components)
and scores each by the change in a metric (target-token logit difference, or loss), batching
many ablations as rows of one forward pass and re-running only the blocks after the ablated one.

>>> import torch, steerlab as sl
>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> clean = model.logits(["the cat sat"])
>>> ablated = model.logits(["the cat sat"], steering=ZeroAblation(1, component="head", head=2))
>>> bool((clean[0, -1] != ablated[0, -1]).any())
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from steerlab.adapter import ModelAdapter
from steerlab.checks import check_prompts
from steerlab.errors import (
    FileWriteError,
    InvalidInputError,
    UnsupportedModelError,
    VectorFileError,
    VectorFileNotFoundError,
    VectorMismatchError,
)
from steerlab.interventions import (
    HookSpec,
    Intervention,
    PositionTracker,
    activate,
    count_hooks,
    direction_at,
    output_hidden,
    replace_output_hidden,
    scoped_hooks,
)
from steerlab.model import tile_rows
from steerlab.positions import Positions, PositionSpec
from steerlab.progress import progress_bar
from steerlab.vectors import (
    CHECKSUM_KEY,
    MAX_LAYER,
    SteeringVector,
    check_file_checksum,
    decode_json_metadata,
    file_checksum,
    write_atomically,
)

__all__ = [
    "COMPONENTS",
    "METRICS",
    "AblationScan",
    "ActivationMeans",
    "DirectionalAblation",
    "LogitDiff",
    "Loss",
    "MeanAblation",
    "Metric",
    "ReplaceActivation",
    "ZeroAblation",
    "ablation_scan",
    "compute_means",
    "residual_writers",
]

COMPONENTS: tuple[str, ...] = ("block", "attn", "mlp", "head")
"""The sites an ablation can target (see the module docstring)."""

RowsSpec = Union[Sequence[bool], torch.Tensor, None]


# --- sites ---------------------------------------------------------------------------------------
def _check_component(component: str) -> str:
    if component not in COMPONENTS:
        raise InvalidInputError(
            f"unknown component {component!r}; use one of {', '.join(COMPONENTS)}"
        )
    return component


def _site(adapter: ModelAdapter, component: str, layer: int) -> tuple[nn.Module, str]:
    """The module of a component and the hook kind that sees its activation."""
    if component == "block":
        return adapter.block(layer), "forward"
    if component == "attn":
        return adapter.attention(layer), "forward"
    if component == "mlp":
        return adapter.mlp(layer), "forward"
    return adapter.attn_out(layer), "forward_pre"


def _site_width(adapter: ModelAdapter, component: str) -> int:
    return adapter.n_heads * adapter.head_dim if component == "head" else adapter.d_model


def _check_heads(adapter: ModelAdapter, heads: int | Sequence[int] | None) -> tuple[int, ...]:
    if heads is None:
        raise InvalidInputError("component='head' needs head= (an int or a list of ints)")
    items = [heads] if isinstance(heads, int) else list(heads)
    if not items:
        raise InvalidInputError("the list of heads is empty")
    out: list[int] = []
    for head in items:
        if isinstance(head, bool) or not isinstance(head, int):
            raise InvalidInputError(f"a head index must be an int, got {head!r}")
        if not -adapter.n_heads <= head < adapter.n_heads:
            raise InvalidInputError(
                f"head {head} is out of range for a model with {adapter.n_heads} heads"
            )
        if head % adapter.n_heads not in out:
            out.append(head % adapter.n_heads)
    return tuple(out)


def _rows_tensor(rows: RowsSpec) -> torch.Tensor | None:
    if rows is None:
        return None
    tensor = torch.as_tensor(rows)
    if tensor.ndim != 1 or tensor.dtype != torch.bool:
        raise InvalidInputError(
            f"rows must be a 1-D sequence of booleans (one per batch row), got {rows!r}"
        )
    return tensor


def residual_writers(adapter: ModelAdapter, layer: int) -> list[nn.Module]:
    """The modules of block ``layer`` whose outputs are added to the residual stream.

    Attention and MLP for pre-norm and parallel blocks; for blocks that normalise a
    sub-layer's output before adding it (Gemma 2/3, OLMo 2: ``post_feedforward_layernorm``), the
    two post-norms.

    >>> from steerlab.testing import tiny_model
    >>> [type(m).__name__ for m in residual_writers(tiny_model("gemma2").adapter, 0)]
    ['Gemma2RMSNorm', 'Gemma2RMSNorm']
    """
    block = adapter.block(layer)
    post_ff = getattr(block, "post_feedforward_layernorm", None)
    post_attn = getattr(block, "post_attention_layernorm", None)
    if isinstance(post_ff, nn.Module) and isinstance(post_attn, nn.Module):
        return [post_attn, post_ff]
    return [adapter.attention(layer), adapter.mlp(layer)]


def _is_post_norm(adapter: ModelAdapter) -> bool:
    return isinstance(getattr(adapter.block(0), "post_feedforward_layernorm", None), nn.Module)


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
    _check_component(component)
    heads = _check_heads(adapter, head) if component == "head" else None
    if component != "head" and head is not None:
        raise InvalidInputError(f"head= only applies to component='head', not {component!r}")
    module, kind = _site(adapter, component, layer)
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
    _check_component(component)
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
        width = _site_width(adapter, self.component)
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
    ...                           positions="all")[-1][0]
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
        width = _site_width(adapter, self.component)
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
class _MaskedReplacement(Intervention):
    """Scan helper: replace ``component`` of ``layer`` in the rows (and heads) ``mask`` marks.

    ``mask`` is ``[rows]`` or, for heads, ``[rows, n_heads]``; ``value`` is ``None`` (zeros) or
    a tensor broadcastable to the activation (``[rows, seq, width]``). Needs no position tracker,
    so it also works when blocks are called one by one.
    """

    layer: int
    component: str
    mask: torch.Tensor
    value: torch.Tensor | None

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        module, kind = _site(adapter, self.component, self.layer)
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


# --- activation means ----------------------------------------------------------------------------
MEANS_FORMAT = "steerlab.means"
_MEANS_SCHEMA = 2  # 2 adds the checksum; version-1 files still load


def _site_key(component: str, layer: int) -> str:
    return f"{component}.{layer}"


@dataclasses.dataclass(frozen=True, eq=False)
class ActivationMeans:
    """Mean activations of components over calibration prompts.

    ``means[(component, layer)]`` is the mean over every real token (``[width]``);
    ``per_position[(component, layer)]`` (when computed) the mean at each absolute position
    ``[n_positions, width]``, with ``position_counts[i]`` tokens behind row ``i``. Width is
    ``d_model``, or ``n_heads * head_dim`` for ``"head"``.

    >>> from steerlab.testing import tiny_model
    >>> m = compute_means(tiny_model("gpt2"), ["the cat", "a dog ran"], layers=[0])
    >>> tuple(m.mean("block", 0).shape), m.position_counts.tolist()
    ((32,), [2, 2, 1])
    """

    means: Mapping[tuple[str, int], torch.Tensor]
    per_position: Mapping[tuple[str, int], torch.Tensor] = dataclasses.field(default_factory=dict)
    position_counts: torch.Tensor | None = None
    n_prompts: int = 0
    n_tokens: int = 0
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in (*self.means, *self.per_position):
            if (
                not isinstance(key, tuple)
                or len(key) != 2
                or key[0] not in COMPONENTS
                or not isinstance(key[1], int)
            ):
                raise InvalidInputError(f"keys must be (component, layer) pairs, got {key!r}")
        object.__setattr__(self, "means", dict(self.means))
        object.__setattr__(self, "per_position", dict(self.per_position))
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def sites(self) -> list[tuple[str, int]]:
        """The ``(component, layer)`` pairs held, sorted."""
        return sorted(self.means)

    def mean(self, component: str, layer: int) -> torch.Tensor:
        """The position-averaged mean of one site (``[width]``)."""
        key = (component, layer)
        if key not in self.means:
            raise InvalidInputError(
                f"no mean for component {component!r} at layer {layer}; these means hold "
                f"{self.sites} (compute them with compute_means(..., components=[...]))"
            )
        return self.means[key]

    def to_vector(self, component: str = "block") -> SteeringVector:
        """The position-averaged means of one component as a :class:`SteeringVector`
        (``d_model``-wide components only), e.g. to save in the vector file format."""
        if component == "head":
            raise InvalidInputError("head means are n_heads*head_dim wide, not a residual vector")
        directions = {layer: t for (c, layer), t in self.means.items() if c == component}
        if not directions:
            raise InvalidInputError(f"these means hold no {component!r} sites")
        meta = {**self.metadata, "method": "mean_activation", "component": component}
        meta.pop("components", None)
        return SteeringVector(directions, metadata=meta)

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the means to a safetensors file (atomically), in the style of vector files
        (with a SHA-256 :func:`~steerlab.vectors.file_checksum` in the header).

        >>> import tempfile, pathlib
        >>> from steerlab.testing import tiny_model
        >>> m = compute_means(tiny_model("gpt2"), ["the cat"], layers=[1], components=["mlp"])
        >>> d = tempfile.TemporaryDirectory()
        >>> back = ActivationMeans.load(m.save(pathlib.Path(d.name, "means.safetensors")))
        >>> bool(torch.equal(back.mean("mlp", 1), m.mean("mlp", 1)))
        True
        >>> d.cleanup()
        """
        from safetensors.torch import save as safetensors_save

        target = Path(path)
        header = {"format": MEANS_FORMAT, "schema_version": str(_MEANS_SCHEMA)}
        info = {
            **self.metadata,
            "n_prompts": self.n_prompts,
            "n_tokens": self.n_tokens,
        }
        for key, value in info.items():
            if key in header:
                raise VectorFileError(f"metadata key {key!r} is reserved")
            try:
                header[key] = json.dumps(value, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise VectorFileError(f"metadata {key!r} cannot be saved as JSON ({err})") from None
        tensors = {
            f"mean.{_site_key(*key)}": t.detach().cpu().contiguous()
            for key, t in self.means.items()
        }
        tensors.update(
            {
                f"per_position.{_site_key(*key)}": t.detach().cpu().contiguous()
                for key, t in self.per_position.items()
            }
        )
        if self.position_counts is not None:
            tensors["position_counts"] = self.position_counts.detach().cpu().contiguous()
        header[CHECKSUM_KEY] = file_checksum(tensors, header)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FileWriteError(f"cannot write {target}: {err.strerror or err}") from None
        write_atomically(target, safetensors_save(tensors, metadata=header))
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActivationMeans:
        """Read means written by :meth:`save`, verifying the checksum (files of schema version 1,
        without one, still load); raises :class:`~steerlab.errors.VectorFileError` naming the
        file on anything else, :class:`~steerlab.errors.VectorFileNotFoundError` when there is
        no file."""
        from safetensors import SafetensorError
        from safetensors.torch import load as safetensors_load

        file = Path(path)
        if file.is_dir():
            raise VectorFileNotFoundError(f"{file} is a directory, not a means file")
        if not file.is_file():
            raise VectorFileNotFoundError(f"no means file at {file}")
        try:
            data = file.read_bytes()
            tensors = safetensors_load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        except (SafetensorError, ValueError, RuntimeError, AttributeError) as err:
            raise VectorFileError(f"{file}: not a readable safetensors file ({err})") from None
        except OSError as err:
            raise VectorFileError(f"cannot read {file}: {err.strerror or err}") from None
        if not isinstance(header, dict) or header.get("format") != MEANS_FORMAT:
            raise VectorFileError(f"{file}: not a steerlab means file (format={MEANS_FORMAT!r})")
        version = header.get("schema_version")
        if version not in ("1", str(_MEANS_SCHEMA)):
            raise VectorFileError(f"{file}: unknown means schema version {version!r}")
        skip = ["format", "schema_version"]
        if version != "1":
            check_file_checksum(tensors, header, file)
            skip.append(CHECKSUM_KEY)
        meta = decode_json_metadata(header, file, skip=skip)
        means: dict[tuple[str, int], torch.Tensor] = {}
        per_position: dict[tuple[str, int], torch.Tensor] = {}
        counts = None
        for name, tensor in tensors.items():
            if name == "position_counts":
                counts = tensor
                continue
            kind, _, site = name.partition(".")
            component, _, layer = site.rpartition(".")
            if kind not in ("mean", "per_position") or component not in COMPONENTS:
                raise VectorFileError(f"{file}: unexpected tensor {name!r}")
            try:
                key = (component, int(layer))
            except ValueError:
                raise VectorFileError(f"{file}: unexpected tensor {name!r}") from None
            if not bool(torch.isfinite(tensor).all()):
                raise VectorFileError(f"{file}: tensor {name!r} contains NaN or inf")
            if tensor.numel() == 0:
                raise VectorFileError(f"{file}: tensor {name!r} is empty")
            if not 0 <= key[1] <= MAX_LAYER:
                raise VectorFileError(f"{file}: tensor {name!r} names an absurd layer number")
            (means if kind == "mean" else per_position)[key] = tensor
        counts_meta = [meta.pop("n_prompts", 0), meta.pop("n_tokens", 0)]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in counts_meta):
            raise VectorFileError(f"{file}: n_prompts/n_tokens are not counts: {counts_meta}")
        try:
            return cls(means, per_position, counts, counts_meta[0], counts_meta[1], meta)
        except InvalidInputError as err:
            raise VectorFileError(f"{file}: {err}") from None


class _StopForward(Exception):
    """Raised once the deepest site a computation needs has run."""


def _stop_hook(module: nn.Module, args: Any, output: Any) -> None:
    raise _StopForward


class _MeanAccumulator:
    """Running float64 sums of site activations over real tokens (and per absolute position)."""

    def __init__(self, *, per_position: bool, max_length: int | None) -> None:
        self.per_position = per_position
        self.max_length = max_length
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.pos_sums: dict[tuple[str, int], torch.Tensor] = {}
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.n_tokens = 0
        self._real = torch.zeros(0, 0, dtype=torch.bool)
        self._in_table = self._real
        self._abs = torch.zeros(0, 0, dtype=torch.long)

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        abs_index = _abs_positions(attention_mask)
        real = abs_index >= 0
        width = int(abs_index.max()) + 1
        if self.max_length is not None:
            width = min(width, self.max_length)
        in_table = real & (abs_index < width)
        if self.per_position:
            if self.counts.shape[0] < width:
                self.counts = _grow(self.counts, width)
            ones = torch.ones(int(in_table.sum()), dtype=torch.float64)
            self.counts = self.counts.index_add(0, abs_index[in_table], ones)
        self.n_tokens += int(real.sum())
        self._real, self._in_table, self._abs = real, in_table, abs_index

    def add(self, key: tuple[str, int], x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float64)
        if x.ndim == 2:  # OPT's flattened [batch * seq, width] MLP activations
            x = x.reshape(*self._real.shape, x.shape[-1])
        picked = x[self._real].sum(0)
        total = self.sums.get(key)
        self.sums[key] = picked if total is None else total + picked
        if self.per_position:
            table = self.pos_sums.get(key)
            if table is None:
                table = torch.zeros(self.counts.shape[0], x.shape[-1], dtype=torch.float64)
            elif table.shape[0] < self.counts.shape[0]:
                table = _grow(table, self.counts.shape[0])
            self.pos_sums[key] = table.index_add(0, self._abs[self._in_table], x[self._in_table])

    def hook(self, component: str, layer: int) -> Callable[..., None]:
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            self.add((component, layer), output_hidden(output))

        return fn

    def pre_hook(self, component: str, layer: int) -> Callable[..., None]:
        def fn(module: nn.Module, args: Any) -> None:
            self.add((component, layer), args[0])

        return fn

    def result(
        self,
    ) -> tuple[
        dict[tuple[str, int], torch.Tensor],
        dict[tuple[str, int], torch.Tensor],
        torch.Tensor | None,
    ]:
        means = {key: (t / self.n_tokens).to(torch.float32) for key, t in self.sums.items()}
        if not self.per_position:
            return means, {}, None
        denom = self.counts.clamp(min=1)[:, None]
        tables = {key: (t / denom).to(torch.float32) for key, t in self.pos_sums.items()}
        return means, tables, self.counts.to(torch.int64)


def _grow(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    extra = tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, extra])


def _abs_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    real = attention_mask.bool()
    index = real.long().cumsum(dim=1) - 1
    return torch.where(real, index, torch.full_like(index, -1))


def _prompts_digest(prompts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def compute_means(
    model: Any,
    prompts: Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    components: Sequence[str] = ("block",),
    per_position: bool = True,
    max_length: int | None = None,
    batch_size: int = 16,
    chat: bool = False,
    cache: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> ActivationMeans:
    """Mean activations of ``components`` at ``layers`` over calibration ``prompts``, streamed.

    Memory holds running sums (float64) only, so any number of prompts fits; each batch's forward
    pass stops after the deepest layer needed. ``per_position`` also keeps the mean at every
    absolute position below ``max_length`` (default: the longest prompt); tokens beyond count
    towards the position-averaged mean only. With ``cache`` (a file path) the means are loaded
    from there when it holds the same model, prompts and settings, and written there otherwise.

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> m = compute_means(model, ["the cat sat", "a dog"], layers=[0, 1],
    ...                   components=["attn", "head"])
    >>> m.sites, tuple(m.per_position[("head", 1)].shape)
    ([('attn', 0), ('attn', 1), ('head', 0), ('head', 1)], (3, 32))
    """
    from steerlab.vectors import model_identity

    items = check_prompts(prompts)
    comps = [_check_component(c) for c in dict.fromkeys(components)]
    if not comps:
        raise InvalidInputError("components is empty")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    if max_length is not None and max_length < 1:
        raise InvalidInputError(f"max_length must be positive, got {max_length}")
    adapter: ModelAdapter = model.adapter
    wanted = adapter.resolve_layers(layers)
    settings = {
        "prompts_sha256": _prompts_digest(items),
        "n_prompts_given": len(items),
        "layers": wanted,
        "components": comps,
        "per_position": per_position,
        "max_length": max_length,
        "chat": chat,
    }
    identity = model_identity(model)
    if cache is not None and Path(cache).is_file():
        try:
            cached = ActivationMeans.load(cache)
        except VectorFileError:
            cached = None
        if cached is not None and all(
            cached.metadata.get(k) == v for k, v in {**settings, **identity}.items()
        ):
            return cached

    acc = _MeanAccumulator(per_position=per_position, max_length=max_length)
    deepest = max(wanted)
    bar = progress_bar(len(items), "means", progress)
    try:
        for start in range(0, len(items), batch_size):
            batch = model.encode(items[start : start + batch_size], chat=chat)
            acc.begin_batch(batch.attention_mask)
            reads: list[HookSpec] = []
            for layer in wanted:
                for component in comps:
                    module, kind = _site(adapter, component, layer)
                    if kind == "forward_pre":
                        reads.append(HookSpec(module, kind, acc.pre_hook(component, layer)))
                    else:
                        reads.append(HookSpec(module, "forward", acc.hook(component, layer)))
            reads.append(HookSpec(adapter.block(deepest), "forward", _stop_hook))
            with model.call_scope(batch):
                with scoped_hooks(reads), torch.no_grad(), contextlib.suppress(_StopForward):
                    model.forward_batch(batch)
            bar.update(batch.input_ids.shape[0])
    finally:
        bar.close()
    if acc.n_tokens == 0:
        raise InvalidInputError("the calibration prompts have no tokens")
    means, tables, counts = acc.result()
    result = ActivationMeans(
        means,
        tables,
        counts,
        n_prompts=len(items),
        n_tokens=acc.n_tokens,
        metadata={**identity, **settings},
    )
    if cache is not None:
        result.save(cache)
    return result


# --- metrics -------------------------------------------------------------------------------------
class Metric:
    """How a scan scores one forward pass: a number per batch row (higher = more of the
    behaviour). Subclasses set ``name`` and ``last_only`` (whether logits of the last position
    suffice) and implement :meth:`prepare` and :meth:`__call__`."""

    name: str = "metric"
    last_only: bool = True

    def prepare(self, model: Any, prompts: Sequence[str]) -> None:
        """Resolve tokens against the model's tokenizer (called once per scan)."""

    def __call__(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        prompt_index: torch.Tensor,
    ) -> torch.Tensor:
        """``[rows]`` scores from ``logits`` (``[rows, 1 or seq, vocab]``, left-padded rows);
        ``prompt_index[r]`` is the prompt row ``r`` comes from."""
        raise NotImplementedError


def _single_token(model: Any, token: str | int) -> int:
    if isinstance(token, int) and not isinstance(token, bool):
        vocab = int(model.adapter.unembed.weight.shape[0])
        if not 0 <= token < vocab:
            raise InvalidInputError(f"token id {token} is outside the vocabulary ({vocab})")
        return token
    if not isinstance(token, str) or not token:
        raise InvalidInputError(
            f"a target token must be a non-empty string or an id, got {token!r}"
        )
    ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise InvalidInputError(
            f"target {token!r} is {len(ids)} tokens {pieces}, not one; pass a single token "
            f"(often with a leading space, e.g. ' Paris') or its id"
        )
    return int(ids[0])


@dataclasses.dataclass
class LogitDiff(Metric):
    """``logit[target] - logit[foil]`` at each prompt's last token (just ``logit[target]``
    without a foil). ``target``/``foil`` are single tokens (strings or ids) or one per prompt.

    >>> LogitDiff(" paris", " berlin").name
    'logit_diff'
    """

    target: str | int | Sequence[str | int]
    foil: str | int | Sequence[str | int] | None = None
    name: str = "logit_diff"
    last_only: bool = True

    def __post_init__(self) -> None:
        self._target: torch.Tensor | None = None
        self._foil: torch.Tensor | None = None

    def _resolve(self, model: Any, tokens: Any, n: int, what: str) -> torch.Tensor:
        if isinstance(tokens, (str, int)):
            return torch.full((n,), _single_token(model, tokens), dtype=torch.long)
        items = list(tokens)
        if len(items) != n:
            raise InvalidInputError(f"{what} has {len(items)} entries but there are {n} prompts")
        return torch.tensor([_single_token(model, t) for t in items], dtype=torch.long)

    def prepare(self, model: Any, prompts: Sequence[str]) -> None:
        self._target = self._resolve(model, self.target, len(prompts), "target")
        self._foil = (
            None if self.foil is None else self._resolve(model, self.foil, len(prompts), "foil")
        )

    def __call__(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        prompt_index: torch.Tensor,
    ) -> torch.Tensor:
        if self._target is None:
            raise RuntimeError("LogitDiff.prepare() was not called")
        last = logits[:, -1].float()
        rows = torch.arange(last.shape[0])
        score = last[rows, self._target[prompt_index]]
        if self._foil is not None:
            score = score - last[rows, self._foil[prompt_index]]
        return score


@dataclasses.dataclass
class Loss(Metric):
    """Mean next-token cross-entropy over each prompt's own tokens (the prompts are the text).

    >>> Loss().last_only
    False
    """

    name: str = "loss"
    last_only: bool = False

    def __call__(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        prompt_index: torch.Tensor,
    ) -> torch.Tensor:
        if logits.shape[1] != input_ids.shape[1]:
            raise RuntimeError("the loss metric needs logits at every position")
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = input_ids[:, 1:]
        nll = -logp.gather(-1, target[..., None])[..., 0]
        pairs = mask[:, :-1] & mask[:, 1:]
        n = pairs.sum(dim=1)
        if bool((n == 0).any()):
            raise InvalidInputError("the loss metric needs prompts of at least two tokens")
        # where(), not multiply: padded positions may hold NaN
        return torch.where(pairs, nll, torch.zeros_like(nll)).sum(dim=1) / n


METRICS: dict[str, type[Metric]] = {"logit_diff": LogitDiff, "loss": Loss}
"""Scan metrics by name: ``"logit_diff"`` (needs ``target``, optional ``foil``) and ``"loss"``."""


# --- scans ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class AblationScan:
    """Result of :func:`ablation_scan`.

    ``scores[i, j]`` is the mean over prompts of (metric with unit ``units[j]`` of layer
    ``layers[i]`` ablated) minus (clean metric); ``ablated[i, j, p]`` the metric itself per
    prompt and ``baseline[p]`` the clean metric. Units are heads, or ``(0,)`` for whole
    components.
    """

    scores: torch.Tensor
    ablated: torch.Tensor
    baseline: torch.Tensor
    layers: tuple[int, ...]
    units: tuple[int, ...]
    component: str
    metric: str
    ablation: str
    model_name: str = ""
    path: str = "full"

    @property
    def unit_name(self) -> str:
        """``"head"`` for head scans, else the component name."""
        return "head" if self.component == "head" else self.component

    def rows(self) -> list[dict[str, Any]]:
        """One dict per ablated unit: layer, unit, score (mean change), per-prompt spread."""
        out = []
        for i, layer in enumerate(self.layers):
            for j, unit in enumerate(self.units):
                change = self.ablated[i, j] - self.baseline
                out.append(
                    {
                        "layer": layer,
                        self.unit_name: unit,
                        "score": float(self.scores[i, j]),
                        "std": float(change.std()) if change.numel() > 1 else 0.0,
                        "ablated": float(self.ablated[i, j].mean()),
                    }
                )
        return out

    def top(self, k: int = 10, *, by: str = "abs") -> list[dict[str, Any]]:
        """The ``k`` units with the largest ``|score|`` (``by="abs"``), most negative
        (``"neg"``) or most positive (``"pos"``) score."""
        keys: dict[str, Callable[[dict[str, Any]], float]] = {
            "abs": lambda r: -abs(r["score"]),
            "neg": lambda r: r["score"],
            "pos": lambda r: -r["score"],
        }
        if by not in keys:
            raise InvalidInputError(f"by must be one of {sorted(keys)}, not {by!r}")
        return sorted(self.rows(), key=keys[by])[:k]

    def format(self, top: int | None = 20) -> str:
        """A plain-text table (the ``top`` units by ``|score|``; all with ``None``)."""
        rows = self.rows() if top is None else self.top(top)
        unit = self.unit_name
        lines = [
            f"{self.ablation} ablation of {self.component} units, metric {self.metric} "
            f"(clean mean {float(self.baseline.mean()):.4f})",
            f"{'layer':>5} {unit:>5} {'change':>10} {'std':>9}",
        ]
        for row in rows:
            lines.append(
                f"{row['layer']:>5} {row[unit]:>5} {row['score']:>10.4f} {row['std']:>9.4f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write every unit's row as CSV."""
        import csv

        target = Path(path)
        rows = self.rows()
        with target.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return target

    def heatmap(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """Save a layer x unit heatmap of the scores as PNG (diverging colours, 0 = white).

        >>> import tempfile, pathlib
        >>> from steerlab.testing import tiny_model
        >>> scan = ablation_scan(tiny_model("llama"), ["the cat sat"], metric="logit_diff",
        ...                      target="on")
        >>> d = tempfile.TemporaryDirectory()
        >>> scan.heatmap(pathlib.Path(d.name, "h.png")).stat().st_size > 0
        True
        >>> d.cleanup()
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        data = self.scores.numpy()
        limit = float(abs(data).max()) or 1.0
        fig, ax = plt.subplots(
            figsize=(
                max(3.5, 0.45 * len(self.units) + 2.5),
                max(3.0, 0.28 * len(self.layers) + 1.5),
            )
        )
        try:
            image = ax.imshow(data, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_xticks(range(len(self.units)), [str(u) for u in self.units])
            ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
            ax.set_xlabel(self.unit_name)
            ax.set_ylabel("layer")
            ax.set_title(
                title
                or f"{self.model_name}: {self.ablation} ablation, change in {self.metric}".strip(
                    ": "
                )
            )
            fig.colorbar(image, ax=ax, label=f"change in {self.metric}")
            fig.tight_layout()
            target = Path(path)
            fig.savefig(target, format="png", dpi=120)
        finally:
            plt.close(fig)
        return target


class _Tail:
    """Re-runs the blocks after a given layer from captured inputs (the scan's fast path).

    A clean forward records each block's call arguments; an ablation at layer ``L`` cannot change
    blocks before ``L``, so only blocks ``L..n-1`` run again, then the final norm and the
    unembedding. The result is checked against the clean forward before it is trusted.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.adapter: ModelAdapter = model.adapter
        self.inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.final_hidden: torch.Tensor | None = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        self.inputs = [((), {})] * self.adapter.n_layers

        def make(layer: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                self.inputs[layer] = (args, dict(kwargs))

            return hook

        def last(module: nn.Module, args: Any, output: Any) -> None:
            self.final_hidden = output_hidden(output)

        specs = [
            HookSpec(self.adapter.block(layer), "forward_pre_kwargs", make(layer))
            for layer in range(self.adapter.n_layers)
        ]
        specs.append(HookSpec(self.adapter.block(-1), "forward", last))
        with scoped_hooks(specs):
            yield

    def head(self, hidden: torch.Tensor, last_only: bool) -> torch.Tensor:
        return self.adapter.logits_from_final_hidden(hidden[:, -1:] if last_only else hidden)

    def run(self, layer: int, copies: int, batch: int, last_only: bool) -> torch.Tensor:
        args, kwargs = self.inputs[layer]
        first = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        hidden = tile_rows(first, copies, batch)
        for index in range(layer, self.adapter.n_layers):
            block_args, block_kwargs = self.inputs[index]
            rest = tile_rows(block_kwargs, copies, batch)
            if "hidden_states" in rest:
                rest["hidden_states"] = hidden
                out = self.adapter.block(index)(*tile_rows(block_args, copies, batch), **rest)
            else:
                out = self.adapter.block(index)(
                    hidden, *tile_rows(block_args[1:], copies, batch), **rest
                )
            hidden = output_hidden(out)
        return self.head(hidden, last_only)


def _resolve_metric(metric: str | Metric, target: Any, foil: Any) -> Metric:
    if isinstance(metric, Metric):
        if target is not None or foil is not None:
            raise InvalidInputError("target/foil belong to the metric object; pass them there")
        return metric
    if metric == "logit_diff":
        if target is None:
            raise InvalidInputError("metric='logit_diff' needs target= (and optionally foil=)")
        return LogitDiff(target, foil)
    if metric == "loss":
        if target is not None or foil is not None:
            raise InvalidInputError("metric='loss' scores the prompts themselves; drop target/foil")
        return Loss()
    raise InvalidInputError(f"unknown metric {metric!r}; use one of {sorted(METRICS)} or a Metric")


def ablation_scan(
    model: Any,
    prompts: Sequence[str],
    *,
    metric: str | Metric = "logit_diff",
    target: Any = None,
    foil: Any = None,
    component: str = "head",
    layers: int | Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    means: ActivationMeans | None = None,
    batch_size: int = 128,
    chat: bool = False,
    fast: bool = True,
    progress: bool | None = None,
) -> AblationScan:
    """Ablate every head (or ``component``) of every layer, one at a time, and score each.

    ``metric`` is ``"logit_diff"`` (``target`` token minus ``foil`` token at each prompt's last
    position), ``"loss"`` (mean next-token loss on the prompts) or a :class:`Metric`. Zero
    ablation by default; pass ``means`` (from :func:`compute_means` with the same component) for
    mean ablation. ``layers``/``heads`` restrict the scan.

    Several ablations run as rows of one batch (up to ``batch_size`` rows: heads x prompts). With
    ``fast`` (default) a clean forward records every block's inputs and each ablation re-runs
    only the blocks from the ablated layer on; this path is verified against the clean forward
    first and falls back to full forward passes when the check fails or other hooks are
    installed. ``scan.path`` says which path ran.

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> scan = ablation_scan(model, ["the cat sat on the", "a dog ran to the"],
    ...                      target="house", foil="road")
    >>> tuple(scan.scores.shape), scan.path
    ((3, 4), 'fast')
    """

    items = check_prompts(prompts)
    _check_component(component)
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    scorer = _resolve_metric(metric, target, foil)
    scorer.prepare(model, items)
    adapter: ModelAdapter = model.adapter
    scan_layers = adapter.resolve_layers(layers)
    if component == "head":
        units: tuple[int, ...] = (
            tuple(range(adapter.n_heads)) if heads is None else _check_heads(adapter, list(heads))
        )
    else:
        if heads is not None:
            raise InvalidInputError("heads= only applies to component='head'")
        units = (0,)
    if means is not None:
        for layer in scan_layers:
            means.mean(component, layer)  # fail early on a missing site
    n_units = len(units)
    n_prompts = len(items)
    ablated = torch.zeros(len(scan_layers), n_units, n_prompts)
    baseline = torch.zeros(n_prompts)
    use_fast = fast and count_hooks(model.hf_model) == 0 and not getattr(model, "edits", ())
    path_used = "fast" if use_fast else "full"
    chunk = max(1, min(batch_size, n_prompts))
    total = len(scan_layers) * n_units * n_prompts
    bar = progress_bar(total, "ablation scan", progress)
    try:
        for start in range(0, n_prompts, chunk):
            batch = model.encode(items[start : start + chunk], chat=chat)
            rows = batch.input_ids.shape[0]
            prompt_index = torch.arange(start, start + rows)
            per_forward = max(1, batch_size // rows)
            # equal groups: 9 heads in two forwards of 5 and 4 rather than 8 and 1
            per_forward = -(-n_units // -(-n_units // per_forward))
            abs_index = _abs_positions(batch.attention_mask)
            mask = batch.attention_mask.bool()
            tail = _Tail(model) if use_fast else None
            with torch.no_grad():
                clean = _full_logits(model, batch, [], scorer.last_only, tail)
            baseline[start : start + rows] = scorer(clean, batch.input_ids, mask, prompt_index)
            if tail is not None and not _tail_agrees(tail, clean, mask, min(scan_layers), scorer):
                tail = None
                path_used = "full"
            for li, layer in enumerate(scan_layers):
                mean_values = None
                if means is not None:
                    mean_values = _mean_table(means, component, layer, abs_index)
                for u0 in range(0, n_units, per_forward):
                    group = list(range(u0, min(n_units, u0 + per_forward)))
                    copies = len(group)
                    intervention = _scan_intervention(
                        adapter, component, layer, [units[j] for j in group], rows, mean_values
                    )
                    with torch.no_grad():
                        if tail is not None:
                            with activate(adapter, [intervention]):
                                logits = tail.run(layer, copies, rows, scorer.last_only)
                        else:
                            logits = _full_logits(
                                model,
                                _tile_batch(batch, copies),
                                [intervention],
                                scorer.last_only,
                                None,
                            )
                    scores = scorer(
                        logits.float().cpu(),
                        batch.input_ids.repeat(copies, 1),
                        mask.repeat(copies, 1),
                        prompt_index.repeat(copies),
                    )
                    ablated[li, group[0] : group[-1] + 1, start : start + rows] = scores.reshape(
                        copies, rows
                    )
                    bar.update(copies * rows)
    finally:
        bar.close()
    return AblationScan(
        scores=(ablated - baseline).mean(dim=-1),
        ablated=ablated,
        baseline=baseline,
        layers=tuple(scan_layers),
        units=units,
        component=component,
        metric=scorer.name,
        ablation="zero" if means is None else "mean",
        model_name=str(getattr(model, "name", "")),
        path=path_used,
    )


def _tile_batch(batch: Any, copies: int) -> Any:
    if copies == 1:
        return batch
    return dataclasses.replace(
        batch,
        input_ids=batch.input_ids.repeat(copies, 1),
        attention_mask=batch.attention_mask.repeat(copies, 1),
        position_ids=batch.position_ids.repeat(copies, 1),
        prompt_lengths=batch.prompt_lengths.repeat(copies),
    )


def _mean_table(
    means: ActivationMeans, component: str, layer: int, abs_index: torch.Tensor
) -> torch.Tensor:
    """``[rows, seq, width]`` mean values at each token's absolute position."""
    overall = means.mean(component, layer)
    table = means.per_position.get((component, layer))
    out = overall.expand(*abs_index.shape, overall.shape[0])
    if table is None:
        return out
    n = table.shape[0]
    inside = (abs_index >= 0) & (abs_index < n)
    return torch.where(inside[..., None], table[abs_index.clamp(0, n - 1)], out)


def _scan_intervention(
    adapter: ModelAdapter,
    component: str,
    layer: int,
    units: list[int],
    rows: int,
    mean_values: torch.Tensor | None,
) -> Intervention:
    copies = len(units)
    value = None if mean_values is None else mean_values.repeat(copies, 1, 1)
    if component == "head":
        mask = torch.zeros(copies * rows, adapter.n_heads, dtype=torch.bool)
        for k, head in enumerate(units):
            mask[k * rows : (k + 1) * rows, head] = True
    else:
        mask = torch.ones(copies * rows, dtype=torch.bool)
    return _MaskedReplacement(layer, component, mask, value)


def _full_logits(
    model: Any,
    batch: Any,
    interventions: list[Intervention],
    last_only: bool,
    tail: _Tail | None,
) -> torch.Tensor:
    extra: dict[str, Any] = {"logits_to_keep": 1} if last_only else {}
    with model.call_scope(batch):
        with activate(model.adapter, interventions) if interventions else contextlib.nullcontext():
            with tail.capture() if tail is not None else contextlib.nullcontext():
                try:
                    out = model.forward_batch(batch, **extra)
                except TypeError:
                    if not extra:
                        raise
                    out = model.forward_batch(batch)
    logits = out.logits
    if last_only:
        logits = logits[:, -1:]
    return logits.float().cpu()


def _tail_agrees(
    tail: _Tail, clean: torch.Tensor, mask: torch.Tensor, layer: int, scorer: Metric
) -> bool:
    """Whether re-running blocks ``layer..`` (batch tiled twice) reproduces the clean logits."""
    rows = clean.shape[0]
    try:
        with torch.no_grad():
            again = tail.run(layer, 2, rows, scorer.last_only).float().cpu()
    except Exception:  # any architecture the generic tail does not fit -> full forwards
        return False
    if again.shape[0] != 2 * rows or again.shape[1:] != clean.shape[1:]:
        return False
    real = mask[:, -clean.shape[1] :]
    reference = clean[real]
    tolerance = 1e-4 * (1.0 + float(reference.abs().max()))
    return all(
        bool((copy[real] - reference).abs().max() <= tolerance)
        for copy in (again[:rows], again[rows:])
    )
