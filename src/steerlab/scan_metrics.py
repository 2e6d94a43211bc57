"""Scan metrics: one number per batch row from a forward pass's logits.

What :func:`~steerlab.ablation.ablation_scan` scores each ablation by (higher = more of the
behaviour). They sit beside :mod:`steerlab.evaluation`, whose registry scores steering (next-token
logits, texts, continuations); these score whole left-padded forward batches whose rows may
come from different prompts (``prompt_index``), which is how a scan batches many ablations.

* :class:`LogitDiff`: ``logit[target] - logit[foil]`` at each prompt's last token.
* :class:`Loss`: mean next-token cross-entropy over each prompt's own tokens.

>>> import torch
>>> metric = Loss()
>>> ids = torch.tensor([[1, 2, 3]])
>>> logits = torch.zeros(1, 3, 5)          # uniform over a 5-token vocabulary
>>> value = metric(logits, ids, torch.ones(1, 3, dtype=torch.bool), torch.tensor([0]))
>>> round(float(value[0]), 4) == round(float(torch.log(torch.tensor(5.0))), 4)
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from steerlab.errors import InvalidInputError

__all__ = ["METRICS", "LogitDiff", "Loss", "Metric"]


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
