"""Steered generation: ``hf_model.generate`` under a model's per-call steering.

Built on a model's public ``call_scope`` (:class:`~steerlab.batch.BatchRunner`);
:meth:`~steerlab.model.SteeredModel.generate` and ``generate_ids`` delegate here.

>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> [ids.shape[0] <= 3 for ids in generate_ids(model, ["the cat", "a"], max_new_tokens=3)]
[True, True]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from steerlab.batch import BatchRunner, check_steering_rows
from steerlab.checks import as_finite_float, as_int, as_positive_int, check_prompts
from steerlab.errors import InvalidInputError

__all__ = ["check_sampling", "generate_ids", "strip_after_eos"]


@torch.no_grad()
def generate_ids(
    model: BatchRunner,
    prompts: Sequence[str] | str,
    *,
    max_new_tokens: int = 32,
    steering: Any = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    chat: bool = False,
    batch_size: int | None = None,
    use_cache: bool = True,
) -> list[torch.Tensor]:
    """Each row's new token ids (EOS and after removed); the options are those of
    :meth:`~steerlab.model.SteeredModel.generate`."""
    items = check_prompts(prompts)
    max_new_tokens = as_int(max_new_tokens, "max_new_tokens")
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size is not None:
        batch_size = as_positive_int(batch_size, "batch_size")
    check_sampling(do_sample, temperature, top_p, top_k, seed)
    check_steering_rows(steering, len(items))
    batch = model.encode(items, chat=chat, reserve=max_new_tokens)
    size = batch_size or len(items)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": model.pad_token_id,
        "use_cache": use_cache,
    }
    if eos is not None:
        options["eos_token_id"] = eos
    if do_sample:
        options["temperature"] = temperature
        options["top_p"] = 1.0 if top_p is None else top_p
        options["top_k"] = 0 if top_k is None else top_k
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    outputs: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(items), size):
            chunk = batch.rows(start, start + size).to(model.device)
            with model.call_scope(chunk, steering=steering, row_offset=start):
                out = model.hf_model.generate(  # type: ignore[operator]
                    input_ids=chunk.input_ids, attention_mask=chunk.attention_mask, **options
                )
            width = chunk.input_ids.shape[1]
            for row in out[:, width:].cpu():
                outputs.append(strip_after_eos(row, eos))
    return outputs


def check_sampling(
    do_sample: object, temperature: object, top_p: object, top_k: object, seed: object
) -> None:
    """Refuse sampling options transformers would reject late or obscurely (or ignore).

    >>> check_sampling(True, 0.7, 0.9, 40, 1)
    """
    if not isinstance(do_sample, bool):
        raise InvalidInputError(f"do_sample must be True or False, got {do_sample!r}")
    if do_sample:
        value = as_finite_float(temperature, "temperature")
        if value <= 0:
            raise InvalidInputError(
                f"temperature must be positive, got {value} (for greedy decoding use "
                f"do_sample=False)"
            )
        if top_p is not None and not 0 < as_finite_float(top_p, "top_p") <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and as_int(top_k, "top_k") < 0:
            raise InvalidInputError(f"top_k must be 0 (off) or positive, got {top_k}")
    if seed is not None and not 0 <= as_int(seed, "seed") < 2**63:
        raise InvalidInputError(f"seed must be an integer in [0, 2**63), got {seed}")


def strip_after_eos(ids: torch.Tensor, eos: int | list[int] | None) -> torch.Tensor:
    """``ids`` up to (not including) the first EOS id.

    >>> strip_after_eos(torch.tensor([5, 6, 2, 7]), 2).tolist()
    [5, 6]
    """
    if eos is None:
        return ids
    stops = torch.tensor([eos] if isinstance(eos, int) else list(eos))
    hits = torch.isin(ids, stops).nonzero()
    return ids[: int(hits[0, 0])] if len(hits) else ids
