"""Steering vectors: per-layer directions in the residual stream, as immutable values.

A :class:`SteeringVector` maps layer indices (0-based, "output of block L") to one direction of
size ``d_model`` each, plus string-able metadata describing where it came from. Every transform
returns a new vector; the original and the caller's tensors are never modified.

>>> import torch
>>> v = SteeringVector.from_tensor(torch.tensor([3.0, 4.0]), layers=[1, 2])
>>> v.layers
(1, 2)
>>> v.scaled(2.0)[1].tolist(), v[1].tolist()
([6.0, 8.0], [3.0, 4.0])
>>> (v - v.scaled(0.5)).normalized()[2].tolist()
[0.6000000238418579, 0.800000011920929]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from steerlab.errors import VectorMismatchError

__all__ = ["SteeringVector"]


def _check_direction(layer: int, tensor: torch.Tensor, d_model: int | None) -> None:
    if tensor.ndim != 1:
        raise VectorMismatchError(
            f"direction for layer {layer} must be 1-D [d_model], got shape {tuple(tensor.shape)}"
        )
    if d_model is not None and tensor.shape[0] != d_model:
        raise VectorMismatchError(
            f"direction for layer {layer} has size {tensor.shape[0]}, others have {d_model}"
        )
    if not torch.is_floating_point(tensor):
        raise VectorMismatchError(f"direction for layer {layer} must be floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise VectorMismatchError(f"direction for layer {layer} contains NaN or inf")


@dataclasses.dataclass(frozen=True, eq=False)
class SteeringVector:
    """Per-layer steering directions plus provenance metadata.

    ``directions`` maps a non-negative layer index to a 1-D tensor of size ``d_model``. The
    constructor copies the tensors (detached), so later changes to the caller's tensors do not
    leak in, and validates shapes and finiteness.

    >>> import torch
    >>> v = SteeringVector({3: torch.ones(4)}, metadata={"method": "manual"})
    >>> v.d_model, v.layers, v.metadata["method"]
    (4, (3,), 'manual')
    """

    directions: Mapping[int, torch.Tensor]
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.directions, Mapping) or not self.directions:
            raise VectorMismatchError("a SteeringVector needs at least one layer direction")
        copied: dict[int, torch.Tensor] = {}
        d_model: int | None = None
        for layer, tensor in sorted(self.directions.items()):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise VectorMismatchError(
                    f"layer keys must be non-negative ints (resolve negative indices against a "
                    f"model first), got {layer!r}"
                )
            if not isinstance(tensor, torch.Tensor):
                raise VectorMismatchError(f"direction for layer {layer} is not a torch.Tensor")
            _check_direction(layer, tensor, d_model)
            d_model = tensor.shape[0]
            copied[layer] = tensor.detach().clone()
        object.__setattr__(self, "directions", copied)
        object.__setattr__(self, "metadata", dict(self.metadata))

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_tensor(
        cls,
        tensor: torch.Tensor,
        *,
        layers: Iterable[int],
        metadata: Mapping[str, Any] | None = None,
    ) -> SteeringVector:
        """The same direction at every layer in ``layers`` (the seed's multi-layer steering).

        >>> import torch
        >>> SteeringVector.from_tensor(torch.zeros(8), layers=[6, 8]).layers
        (6, 8)
        """
        return cls({int(layer): tensor for layer in layers}, metadata=metadata or {})

    # --- access ------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        """Layer indices this vector has a direction for, ascending."""
        return tuple(self.directions)

    @property
    def d_model(self) -> int:
        """Hidden size of the directions."""
        return next(iter(self.directions.values())).shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored directions."""
        return next(iter(self.directions.values())).dtype

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.directions:
            raise KeyError(f"this vector has no direction for layer {layer}; it has {self.layers}")
        return self.directions[layer].clone()

    def __contains__(self, layer: object) -> bool:
        return layer in self.directions

    def __len__(self) -> int:
        return len(self.directions)

    def __repr__(self) -> str:
        norms = ", ".join(f"{k}: {v.norm():.3g}" for k, v in self.directions.items())
        method = self.metadata.get("method", "?")
        return f"SteeringVector(d_model={self.d_model}, method={method!r}, norms={{{norms}}})"

    def norms(self) -> dict[int, float]:
        """Euclidean norm of each layer's direction."""
        return {k: float(v.norm()) for k, v in self.directions.items()}

    # --- transforms ---------------------------------------------------------------------------
    def _map(self, fn: Any, **meta: Any) -> SteeringVector:
        return SteeringVector(
            {k: fn(k, v) for k, v in self.directions.items()}, metadata={**self.metadata, **meta}
        )

    def scaled(self, factor: float | Mapping[int, float]) -> SteeringVector:
        """A new vector multiplied by ``factor`` (a number, or one per layer).

        >>> import torch
        >>> SteeringVector({0: torch.ones(2)}).scaled({0: 3.0})[0].tolist()
        [3.0, 3.0]
        """
        if isinstance(factor, Mapping):
            missing = set(self.layers) - set(factor)
            if missing:
                raise VectorMismatchError(f"no scale given for layers {sorted(missing)}")
            return self._map(lambda k, v: v * float(factor[k]))
        value = _finite_number(factor, "scale factor")
        return self._map(lambda _k, v: v * value)

    def normalized(self) -> SteeringVector:
        """Each layer's direction scaled to unit norm (zero directions raise)."""

        def unit(layer: int, v: torch.Tensor) -> torch.Tensor:
            norm = v.norm()
            if float(norm) == 0.0:
                raise VectorMismatchError(f"cannot normalize the zero direction at layer {layer}")
            return v / norm

        return self._map(unit, normalization="unit")

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SteeringVector:
        """A copy on another device and/or dtype; the original is untouched."""
        return self._map(lambda _k, v: v.to(device=device, dtype=dtype))

    def select(self, layers: Iterable[int]) -> SteeringVector:
        """Only the given layers.

        >>> import torch
        >>> SteeringVector({0: torch.ones(2), 1: torch.ones(2)}).select([1]).layers
        (1,)
        """
        chosen = list(layers)
        missing = [layer for layer in chosen if layer not in self.directions]
        if missing:
            raise KeyError(f"this vector has no direction for layers {missing}")
        return SteeringVector({k: self.directions[k] for k in chosen}, metadata=self.metadata)

    def with_metadata(self, **metadata: Any) -> SteeringVector:
        """A copy with metadata keys added or replaced."""
        return SteeringVector(self.directions, metadata={**self.metadata, **metadata})

    # --- arithmetic -----------------------------------------------------------------------------
    def _combine(self, other: object, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.d_model != self.d_model:
            raise VectorMismatchError(
                f"cannot combine vectors of sizes {self.d_model} and {other.d_model}"
            )
        out: dict[int, torch.Tensor] = {}
        for layer in sorted(set(self.layers) | set(other.layers)):
            a = self.directions.get(layer)
            b = other.directions.get(layer)
            if a is None:
                assert b is not None
                out[layer] = sign * b
            elif b is None:
                out[layer] = a.clone()
            else:
                out[layer] = a + sign * b.to(a.dtype)
        return SteeringVector(out, metadata={**self.metadata, "method": "arithmetic"})

    def __add__(self, other: object) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: object) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, factor: object) -> SteeringVector:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        return self.scaled(float(factor))

    __rmul__ = __mul__

    def __truediv__(self, factor: object) -> SteeringVector:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        if factor == 0:
            raise ZeroDivisionError("cannot divide a steering vector by zero")
        return self.scaled(1.0 / float(factor))

    def __neg__(self) -> SteeringVector:
        return self.scaled(-1.0)


def _finite_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise VectorMismatchError(f"{what} must be a number, got {value!r}") from None
    number = float(value)
    if not math.isfinite(number):
        raise VectorMismatchError(f"{what} must be finite, got {number}")
    return number
