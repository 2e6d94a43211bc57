"""An encoded batch and what code that runs one needs from a model.

:class:`Batch` is what :meth:`~steerlab.model.SteeredModel.encode` builds: padded token ids with
explicit ``position_ids``. :class:`BatchRunner` names the part of a
:class:`~steerlab.model.SteeredModel` that the cache replays (:mod:`steerlab.replay`) and
generation (:mod:`steerlab.generation`) are built on (its public ``call_scope`` and
``forward_batch``), so those modules sit below the model and the model delegates to them.

>>> from steerlab.testing import tiny_model
>>> batch = tiny_model("llama").encode(["the cat", "a"])
>>> batch.rows(1, 2).prompt_lengths.tolist()
[1]
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from steerlab.adapter import ModelAdapter
from steerlab.checks import as_int, as_positive_int, check_prompts
from steerlab.errors import InvalidInputError
from steerlab.prompts import encode_prompts
from steerlab.tracking import PositionTracker

__all__ = [
    "Batch",
    "BatchRunner",
    "check_steering_rows",
    "context_length",
    "encode_batch",
    "last_token_logits",
    "pad_token_id",
    "position_kwargs",
    "run_chunks",
    "tile_rows",
]


@dataclasses.dataclass(frozen=True)
class Batch:
    """A padded batch built by steerlab: ``prompt_lengths[i]`` real tokens in row ``i``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    padding_side: str

    def rows(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` (same padded length)."""
        return Batch(
            self.input_ids[start:stop],
            self.attention_mask[start:stop],
            self.position_ids[start:stop],
            self.prompt_lengths[start:stop],
            self.padding_side,
        )

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.prompt_lengths,
            self.padding_side,
        )


def encode_batch(
    tokenizer: Any,
    prompts: Sequence[str] | str,
    *,
    padding_side: str = "left",
    chat: bool = False,
    reserve: int = 0,
    context_length: int | None = None,
    pad_token_id: int,
) -> Batch:
    """``prompts`` tokenized and padded with ``pad_token_id``, with explicit ``position_ids``
    (:meth:`~steerlab.model.SteeredModel.encode`, which passes the model's context length and
    pad id); a prompt longer than ``context_length`` less ``reserve`` is refused.

    >>> from steerlab.testing import tiny_tokenizer
    >>> encode_batch(tiny_tokenizer(), ["a", "the cat"], pad_token_id=0).position_ids.tolist()
    [[0, 0], [0, 1]]
    """
    items = check_prompts(prompts)
    if padding_side not in ("left", "right"):
        raise InvalidInputError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    reserve = as_int(reserve, "reserve")
    encoded = encode_prompts(tokenizer, items, chat=chat)
    lengths = [len(ids) for ids in encoded]
    width = max(lengths)
    context = context_length
    if context is not None and width + reserve > context:
        longest = lengths.index(width)
        extra = f" plus {reserve} new tokens" if reserve else ""
        raise InvalidInputError(
            f"prompt {longest} has {width} tokens{extra}, longer than the model's context "
            f"of {context} positions; shorten it"
        )
    pad = pad_token_id
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        span = (
            slice(width - len(tokens), width) if padding_side == "left" else slice(0, len(tokens))
        )
        ids[row, span] = torch.tensor(tokens, dtype=torch.long)
        mask[row, span] = 1
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return Batch(ids, mask, position_ids, torch.tensor(lengths), padding_side)


class BatchRunner(Protocol):
    """What the replays and generation use of a :class:`~steerlab.model.SteeredModel`."""

    hf_model: nn.Module
    tokenizer: Any
    adapter: ModelAdapter

    @property
    def n_layers(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def pad_token_id(self) -> int: ...

    def encode(
        self,
        prompts: Sequence[str] | str,
        *,
        padding_side: str = "left",
        chat: bool = False,
        reserve: int = 0,
    ) -> Batch: ...

    def call_scope(
        self,
        batch: Batch,
        *,
        steering: Any = None,
        row_offset: int = 0,
    ) -> contextlib.AbstractContextManager[list[PositionTracker]]: ...

    def forward_batch(self, batch: Batch, **kwargs: Any) -> Any: ...


def tile_rows(value: Any, copies: int, batch: int) -> Any:
    """Repeat every batch-aligned tensor (``[batch, ...]``, 2-D or more, also inside tuples,
    lists and dicts) ``copies`` times along dim 0; 1-D tensors such as cache positions and
    anything else pass through.

    >>> tile_rows((torch.zeros(2, 3), torch.arange(4)), 2, 2)[0].shape
    torch.Size([4, 3])
    """
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim >= 2 and value.shape[0] == batch:
            return value.repeat(copies, *([1] * (value.ndim - 1)))
        return value
    if isinstance(value, tuple):
        return tuple(tile_rows(v, copies, batch) for v in value)
    if isinstance(value, list):
        return [tile_rows(v, copies, batch) for v in value]
    if isinstance(value, dict):
        return {k: tile_rows(v, copies, batch) for k, v in value.items()}
    return value


def position_kwargs(hf_model: nn.Module, position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"position_ids": position_ids}`` when ``hf_model.forward`` takes them, else ``{}``.

    OPT before transformers 4.46 has no ``position_ids`` argument; it derives positions from
    the attention mask, which gives the real tokens the same numbers.

    >>> from steerlab.testing import tiny_hf_model
    >>> sorted(position_kwargs(tiny_hf_model("llama"), torch.zeros(1, 2)))
    ['position_ids']
    """
    try:
        params = inspect.signature(hf_model.forward).parameters
    except (TypeError, ValueError):
        return {"position_ids": position_ids}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"position_ids": position_ids} if takes_any or "position_ids" in params else {}


def check_steering_rows(steering: Any, n_rows: int) -> None:
    """Refuse per-row ``steering`` (a list or tuple) whose length is not ``n_rows``.

    >>> check_steering_rows([None, None], 2)
    """
    if isinstance(steering, (list, tuple)) and len(steering) != n_rows:
        raise InvalidInputError(
            f"per-row steering has {len(steering)} entries but there are {n_rows} prompts"
        )


def last_token_logits(model: BatchRunner, batch: Batch) -> torch.Tensor:
    """``model``'s next-token logits after each row of ``batch``, ``[rows, vocab]`` (float32,
    CPU), unembedding only the last position where the model allows it.

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> last_token_logits(model, model.encode(["the cat"])).shape[0]
    1
    """
    try:
        out = model.forward_batch(batch, logits_to_keep=1)
    except TypeError:  # older or custom models without logits_to_keep
        out = model.forward_batch(batch)
    return out.logits[:, -1].float().cpu()


def run_chunks(
    model: BatchRunner,
    prompts: Sequence[str] | str,
    run: Any,
    *,
    steering: Any,
    batch_size: int | None,
    padding_side: str = "left",
    chat: bool = False,
) -> torch.Tensor:
    """Encode once, then ``run(chunk)`` per ``batch_size`` rows under per-call steering; the
    results concatenated (:meth:`~steerlab.model.SteeredModel.logits`).

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> run_chunks(model, ["a", "b c", "d"], lambda chunk: last_token_logits(model, chunk),
    ...            steering=None, batch_size=2).shape[0]
    3
    """
    items = check_prompts(prompts)
    if batch_size is not None:
        batch_size = as_positive_int(batch_size, "batch_size")
    check_steering_rows(steering, len(items))
    batch = model.encode(items, padding_side=padding_side, chat=chat)
    size = batch_size or len(items)
    outputs = []
    for start in range(0, len(items), size):
        chunk = batch.rows(start, start + size)
        with model.call_scope(chunk, steering=steering, row_offset=start):
            outputs.append(run(chunk))
    return torch.cat(outputs, dim=0)


def context_length(hf_model: nn.Module) -> int | None:
    """Most positions ``hf_model`` was built for (``max_position_embeddings``), if known
    (:attr:`~steerlab.model.SteeredModel.context_length`).

    >>> from steerlab.testing import tiny_model
    >>> context_length(tiny_model("gpt2").hf_model)
    128
    """
    config = getattr(hf_model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def pad_token_id(tokenizer: Any) -> int:
    """The pad id steerlab uses: ``tokenizer``'s pad token, else its EOS token.

    >>> from steerlab.testing import tiny_tokenizer
    >>> isinstance(pad_token_id(tiny_tokenizer()), int)
    True
    """
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    raise InvalidInputError(
        "the tokenizer has neither a pad token nor an EOS token, so batches cannot be padded; "
        "give it one (e.g. tokenizer.pad_token = tokenizer.unk_token) before wrapping"
    )
