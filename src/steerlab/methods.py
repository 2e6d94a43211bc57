"""Methods: how a steering direction is computed from contrasting examples.

Each method is a small function registered in :data:`METHODS` under a name. They share one
signature: ``fn(positive_acts, negative_acts, **options) -> Tensor[d_model]`` on activations of
one layer, so :func:`compute_vector` extracts activations once for every layer and applies the
method per layer.

``mean_diff`` (contrastive activation addition) is the reference every other method is tested
against: ``mean(positive) - mean(negative)``.

>>> import torch
>>> METHODS["mean_diff"](torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])).tolist()
[2.0, -1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from steerlab.errors import InvalidInputError
from steerlab.vectors import SteeringVector

__all__ = ["METHODS", "compute_vector", "mean_diff", "register_method"]

MethodFn = Callable[..., torch.Tensor]
METHODS: dict[str, MethodFn] = {}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a direction method to :data:`METHODS`."""

    def add(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn

    return add


@register_method("mean_diff")
def _mean_diff_direction(positive: torch.Tensor, negative: torch.Tensor, **_: Any) -> torch.Tensor:
    """Difference of class means (CAA); exact, no randomness."""
    return positive.double().mean(dim=0).float() - negative.double().mean(dim=0).float()


def _check_sets(positive: Sequence[str], negative: Sequence[str]) -> tuple[list[str], list[str]]:
    for name, items in (("positive", positive), ("negative", negative)):
        if isinstance(items, str):
            raise InvalidInputError(f"{name} prompts must be a list of strings, not one string")
        if len(items) == 0:
            raise InvalidInputError(f"the {name} prompt list is empty")
    return list(positive), list(negative)


def compute_vector(
    model: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    method: str = "mean_diff",
    positions: str = "last",
    batch_size: int = 16,
    progress: bool | None = None,
    **options: Any,
) -> SteeringVector:
    """Compute a steering vector with a registered method at every requested layer.

    >>> import steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> vec = sl.compute_vector(model, ["i love it"], ["i hate it"], layers=[1])
    >>> vec.layers, vec.metadata["method"]
    ((1,), 'mean_diff')
    """
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    pos, neg = _check_sets(positive, negative)
    resolved = model.adapter.resolve_layers(layers)
    acts = model.activations(
        pos + neg, layers=resolved, positions=positions, batch_size=batch_size, progress=progress
    )
    directions = {
        layer: METHODS[method](acts[layer][: len(pos)], acts[layer][len(pos) :], **options)
        for layer in resolved
    }
    metadata = {
        "method": method,
        "model_name": model.name,
        "d_model": model.d_model,
        "n_layers": model.n_layers,
        "positions": positions,
        "site": "block_output",
        "operation": "add",
        "n_positive": len(pos),
        "n_negative": len(neg),
    }
    return SteeringVector(directions, metadata=metadata)


def mean_diff(
    model: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    positions: str = "last",
    batch_size: int = 16,
    progress: bool | None = None,
) -> SteeringVector:
    """Contrastive mean-difference vector: ``mean(acts(positive)) - mean(acts(negative))``.

    >>> import steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> vec = sl.mean_diff(model, ["i love it", "so happy"], ["i hate it", "so sad"], layers=[-1])
    >>> vec.layers
    (2,)
    """
    return compute_vector(
        model,
        positive,
        negative,
        layers=layers,
        method="mean_diff",
        positions=positions,
        batch_size=batch_size,
        progress=progress,
    )
