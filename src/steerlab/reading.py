"""Reading activations: what a model's blocks (or another site of them) compute for some prompts.

Built on a model's public ``call_scope``/``forward_batch`` (:class:`~steerlab.batch.BatchRunner`);
:meth:`~steerlab.model.SteeredModel.activations` delegates here.

>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> tuple(activations(model, ["the cat", "a dog ran"], layers=[-1])[2].shape)
(2, 32)
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from steerlab.batch import BatchRunner, check_steering_rows
from steerlab.checks import as_positive_int, check_prompts
from steerlab.dispatch import HookSpec, scoped_hooks
from steerlab.errors import InvalidInputError
from steerlab.progress import progress_bar
from steerlab.sites import check_site, output_hidden, router_logits, site_hook, site_width

__all__ = ["READ_AT", "LayerActivations", "activations", "reduce_positions"]

READ_AT = ("last", "mean", "all")
"""The named ``read_at`` reductions (an int token index is the fourth form)."""


class LayerActivations(dict[int, Any]):
    """``{layer: activations}`` that also accepts negative layer keys (``acts[-1]``)."""

    def __init__(self, data: Mapping[int, Any], n_layers: int) -> None:
        super().__init__(data)
        self.n_layers = n_layers

    def __getitem__(self, layer: int) -> Any:
        if isinstance(layer, int) and layer < 0:
            layer += self.n_layers
        return super().__getitem__(layer)

    def __contains__(self, layer: object) -> bool:
        if isinstance(layer, int) and layer < 0:
            layer += self.n_layers
        return super().__contains__(layer)


class _StopForward(Exception):
    """Raised by a capture hook once the deepest requested layer has run."""


@torch.no_grad()
def activations(
    model: BatchRunner,
    prompts: Sequence[str] | str,
    *,
    layers: int | Sequence[int] | None = None,
    read_at: str | int = "last",
    batch_size: int = 16,
    steering: Any = None,
    padding_side: str = "left",
    chat: bool = False,
    progress: bool | None = None,
    site: str = "resid",
) -> LayerActivations:
    """Activations of ``layers`` at ``site`` for ``prompts``, read at ``read_at``; the options
    are those of :meth:`~steerlab.model.SteeredModel.activations` (``steering`` already folded).
    """
    positions = read_at
    items = check_prompts(prompts)
    site = check_site(site)
    width = site_width(model.adapter, site)
    if isinstance(positions, bool) or not (positions in READ_AT or isinstance(positions, int)):
        raise InvalidInputError(
            f"read_at for activations must be one of {READ_AT} or an int token index, "
            f"not {positions!r}"
        )
    batch_size = as_positive_int(batch_size, "batch_size")
    check_steering_rows(steering, len(items))
    wanted = model.adapter.resolve_layers(layers)
    hooks_at = {layer: site_hook(model.adapter, site, layer) for layer in wanted}
    deepest = max(wanted)
    results: dict[int, list[Any]] = {layer: [] for layer in wanted}
    reduced: dict[int, torch.Tensor] = {}
    if positions != "all":
        reduced = {layer: torch.empty(len(items), width, dtype=torch.float32) for layer in wanted}
    bar = progress_bar(len(items), "activations", progress)
    try:
        for start in range(0, len(items), batch_size):
            chunk_prompts = items[start : start + batch_size]
            batch = model.encode(chunk_prompts, padding_side=padding_side, chat=chat)
            mask = batch.attention_mask.to(model.device).bool()
            captured: dict[int, torch.Tensor] = {}

            def make_hook(
                layer: int,
                mask: torch.Tensor = mask,
                captured: dict[int, torch.Tensor] = captured,
            ) -> Any:
                def hook(module: nn.Module, args: Any, *output: Any) -> None:
                    # a pre-hook (heads) reads the argument, the others the output; a
                    # router's logits come flattened over the batch's tokens
                    if site == "router":
                        seen = router_logits(module, args, output[0])
                    else:
                        seen = output_hidden(output[0] if output else args)
                    seen = seen.reshape(*mask.shape, seen.shape[-1])
                    captured[layer] = reduce_positions(seen, mask, positions)
                    if layer == deepest:
                        raise _StopForward

                return hook

            with model.call_scope(batch, steering=steering, row_offset=start):
                reads = [HookSpec(*hooks_at[layer], make_hook(layer)) for layer in wanted]
                with scoped_hooks(reads), contextlib.suppress(_StopForward):
                    model.forward_batch(batch)
            for layer in wanted:
                value = captured[layer]
                if positions == "all":
                    results[layer].extend(
                        value[row][mask[row]].float().cpu() for row in range(value.shape[0])
                    )
                else:
                    # filled in place: peak memory is the answer plus one batch, never a
                    # list of chunks and their concatenation side by side
                    reduced[layer][start : start + len(chunk_prompts)] = value.float().cpu()
            bar.update(len(chunk_prompts))
    finally:
        bar.close()
    final: dict[int, Any] = dict(results) if positions == "all" else dict(reduced)
    return LayerActivations(final, model.n_layers)


def reduce_positions(
    hidden: torch.Tensor, mask: torch.Tensor, positions: str | int
) -> torch.Tensor:
    """``hidden`` ``[batch, seq, d]`` read at ``positions`` (a ``read_at`` value) over the real
    tokens of ``mask``: ``[batch, d]``, or ``hidden`` itself for ``"all"``.

    >>> hidden, mask = torch.arange(6.0).reshape(1, 3, 2), torch.tensor([[False, True, True]])
    >>> reduce_positions(hidden, mask, "mean")
    tensor([[3., 4.]])
    """
    if isinstance(positions, int):
        lengths = mask.sum(dim=1)
        if bool((positions >= lengths).any()) or bool((-positions > lengths).any()):
            raise InvalidInputError(
                f"token index {positions} is outside a prompt of {int(lengths.min())} tokens"
            )
        index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        first = torch.where(mask, index, torch.full_like(index, mask.shape[1])).min(dim=1).values
        target = first + positions if positions >= 0 else first + lengths + positions
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), target]
    if positions == "all":
        return hidden.detach()
    if positions == "mean":
        # where(), not multiply: padded positions may hold NaN from fully masked attention rows
        kept = torch.where(mask[..., None], hidden, torch.zeros_like(hidden))
        return kept.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(hidden.dtype)
    # last real token of each row, for either padding side
    index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, index, torch.full_like(index, -1)).max(dim=1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
