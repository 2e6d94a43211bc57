"""Scorers: concept presence, fluency, instruction relevance, and damage on neutral text.

What an AxBench-style evaluation (:mod:`steerlab.concepts`) needs to turn a generated text into
numbers, plus the damage metrics every evaluation reports.

Each per-text score lies in ``[0, 1]`` so that three of them can be combined by a harmonic mean
(AxBench's rule: a continuation only scores well if it shows the concept, stays fluent *and*
answers the instruction; any one near zero sinks it):

====================  =========================================================================
score                 definition
====================  =========================================================================
concept (words)       ``min(1, k / 2)`` for ``k`` concept words in the text (0, 1/2, 1): two
                      mentions count as fully present
concept (vader)       ``(compound + 1) / 2`` toward the target sign (``1 - that`` for a negative
                      target): VADER's sentiment in ``[-1, 1]`` mapped to ``[0, 1]``
concept (embedding)   ``(1 + cos(text, positive) - cos(text, negative)) / 2`` through the
                      optional ``steerlab[embeddings]`` extra
fluency               ``f_ppl × (1 - repetition)`` with ``f_ppl = clip(1 - ln(ppl) / ln(1000))``:
                      perplexity under the *unsteered* model (1 → 1, 1000+ → 0), times the share
                      of word 3-grams that are not repeats (repetition makes text *likely*, so
                      perplexity alone rewards loops)
relevance             ``sigmoid(2 × PMI)``, ``PMI`` the mean per-token log-likelihood of the
                      continuation after the instruction minus after a generic prompt, under the
                      unsteered model: does the text depend on what was asked (0.5 = not at all)
====================  =========================================================================

``compression_ratio`` (zlib bytes / text bytes, low for loops) is reported beside them.

Damage on neutral text (:func:`neutral_damage`): steering applied at every position of the
passages of a small neutral corpus shipped in the package (``steerlab/datasets/neutral``, written
for steerlab, MIT); reported as the mean per-token ``KL(unsteered || steered)`` and the corpus
perplexity with and without steering.

>>> words_score(["The soup and the bread were warm.", "The report is due."],
...             words=["soup", "bread"]).tolist()
[1.0, 0.0]
>>> round(repetition_rate("a b c a b c a b c"), 3)
0.571
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch

from steerlab.checks import check_texts
from steerlab.errors import InvalidInputError
from steerlab.evaluation import concept_similarity, vader_sentiment
from steerlab.steering import steering_with

__all__ = [
    "GENERIC_PROMPT",
    "NeutralDamage",
    "compression_ratio",
    "continuation_logprobs",
    "embedding_score",
    "fluency_scores",
    "harmonic_mean",
    "neutral_corpus",
    "neutral_damage",
    "relevance_scores",
    "repetition_rate",
    "sentiment_score",
    "words_score",
]

GENERIC_PROMPT = "Write something."
"""The instruction-free prompt the relevance score compares against."""

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
_PPL_CEILING = 1000.0


# --- concept presence ----------------------------------------------------------------------------
def words_score(texts: Sequence[str], *, words: Sequence[str]) -> torch.Tensor:
    """``min(1, k / 2)`` per text, ``k`` the number of its words found in ``words``.

    Words are matched case-insensitively as whole words (leading spaces in ``words`` ignored).

    >>> words_score(["Pizza, pasta and more pizza", "pasta", "nothing"],
    ...             words=[" pizza", "pasta"]).tolist()
    [1.0, 0.5, 0.0]
    """
    if isinstance(words, str):
        raise InvalidInputError("words must be a list of strings, not one string")
    vocabulary = {w.strip().lower() for w in words if w.strip()}
    if not vocabulary:
        raise InvalidInputError("words_score needs at least one non-empty word")
    scores = []
    for text in check_texts(texts):
        found = sum(w in vocabulary for w in _WORD.findall(text.lower()))
        scores.append(min(1.0, found / 2))
    return torch.tensor(scores, dtype=torch.float32)


def sentiment_score(texts: Sequence[str], *, sign: int = 1) -> torch.Tensor:
    """VADER compound sentiment mapped to ``[0, 1]`` toward ``sign`` (+1 positive, -1 negative).

    >>> s = sentiment_score(["What a wonderful, happy day!", "This is awful."])
    >>> bool(s[0] > 0.8), bool(s[1] < 0.3)
    (True, True)
    """
    if sign not in (1, -1):
        raise InvalidInputError(f"sign must be 1 or -1, got {sign!r}")
    compound = vader_sentiment(check_texts(texts))
    return ((sign * compound + 1.0) / 2.0).float()


def embedding_score(
    texts: Sequence[str], *, positive: Sequence[str], negative: Sequence[str]
) -> torch.Tensor:
    """``(1 + cos(text, positive) - cos(text, negative)) / 2``, clipped to ``[0, 1]``.

    Needs the optional ``steerlab[embeddings]`` extra (see
    :func:`steerlab.evaluation.concept_similarity`).

    >>> embedding_score(["I love it"], positive=["joy"], negative=["grief"])  # doctest: +SKIP
    tensor([0.5...])
    """
    diff = concept_similarity(check_texts(texts), positive=positive, negative=negative)
    return ((1.0 + diff) / 2.0).clamp(0.0, 1.0).float()


# --- fluency -------------------------------------------------------------------------------------
def repetition_rate(text: str, *, n: int = 3) -> float:
    """Share of a text's word ``n``-grams that repeat an earlier one (0 for short texts).

    >>> repetition_rate("the cat sat on the mat"), round(repetition_rate("go go go go go"), 4)
    (0.0, 0.6667)
    """
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def compression_ratio(text: str) -> float:
    """zlib-compressed size over raw size, in bytes (low for repetitive text; 1.0 if empty).

    >>> compression_ratio("abc " * 50) < 0.2 < compression_ratio("The quick brown fox jumps.")
    True
    """
    raw = text.encode("utf-8")
    if not raw:
        return 1.0
    return len(zlib.compress(raw, 9)) / len(raw)


@torch.no_grad()
def continuation_logprobs(
    model: Any, prompts: Sequence[str], continuations: Sequence[str], *, chat: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of each continuation after its prompt, and its token count.

    The unsteered model scores ``continuations[i]`` (tokenized alone, without special tokens)
    after ``prompts[i]`` (encoded as :meth:`~steerlab.model.SteeredModel.encode` does). Returns
    ``(Tensor[n] float64, Tensor[n] long)``; an empty continuation scores 0 with 0 tokens.

    >>> from steerlab.testing import tiny_model
    >>> lp, n = continuation_logprobs(tiny_model("gpt2"), ["the cat"], [" sat down"])
    >>> bool(lp[0] < 0), int(n[0]) > 0
    (True, True)
    """
    from steerlab.evaluation import perplexity

    items = check_texts(prompts)
    conts = check_texts(continuations)
    if len(items) != len(conts):
        raise InvalidInputError(f"{len(items)} prompts but {len(conts)} continuations")
    ids = [
        torch.tensor(model.tokenizer(c, add_special_tokens=False)["input_ids"], dtype=torch.long)
        for c in conts
    ]
    counts = torch.tensor([len(i) for i in ids], dtype=torch.long)
    keep = [i for i, c in enumerate(ids) if len(c)]
    totals = torch.zeros(len(items), dtype=torch.float64)
    if keep:
        ppl = perplexity(model, [items[i] for i in keep], [ids[i] for i in keep], chat=chat)
        for j, i in enumerate(keep):
            totals[i] = -math.log(float(ppl[j])) * int(counts[i])
    return totals, counts


def fluency_scores(
    model: Any, prompts: Sequence[str], texts: Sequence[str], *, chat: bool = False
) -> dict[str, torch.Tensor]:
    """Per-text fluency: ``perplexity`` (unsteered model), ``repetition``, ``compression`` and
    the combined ``fluency`` score in ``[0, 1]`` (see the module docstring).

    >>> from steerlab.testing import tiny_model
    >>> out = fluency_scores(tiny_model("gpt2"), ["the cat"], [" sat on the mat"])
    >>> sorted(out), 0.0 <= float(out["fluency"][0]) <= 1.0
    (['compression', 'fluency', 'perplexity', 'repetition'], True)
    """
    items = check_texts(texts)
    logp, counts = continuation_logprobs(model, prompts, items, chat=chat)
    ppl = torch.where(counts > 0, torch.exp(-logp / counts.clamp(min=1)), torch.tensor(math.inf))
    rep = torch.tensor([repetition_rate(t) for t in items], dtype=torch.float64)
    comp = torch.tensor([compression_ratio(t) for t in items], dtype=torch.float64)
    f_ppl = (1.0 - torch.log(ppl) / math.log(_PPL_CEILING)).clamp(0.0, 1.0)
    f_ppl = torch.where(counts > 0, f_ppl, torch.zeros_like(f_ppl))
    return {
        "perplexity": ppl.float(),
        "repetition": rep.float(),
        "compression": comp.float(),
        "fluency": (f_ppl * (1.0 - rep)).float(),
    }


def relevance_scores(
    model: Any,
    instructions: Sequence[str],
    texts: Sequence[str],
    *,
    chat: bool = True,
    generic: str = GENERIC_PROMPT,
) -> torch.Tensor:
    """``sigmoid(2 × PMI)`` per text: how much more likely the unsteered model finds the text
    after its instruction than after ``generic`` (mean per token; 0.5 when it does not care).

    >>> from steerlab.testing import tiny_model
    >>> r = relevance_scores(tiny_model("gpt2"), ["name a colour"], [" red"], chat=False)
    >>> 0.0 < float(r[0]) < 1.0
    True
    """
    items = check_texts(texts)
    asked, counts = continuation_logprobs(model, instructions, items, chat=chat)
    plain, _ = continuation_logprobs(model, [generic] * len(items), items, chat=chat)
    pmi = (asked - plain) / counts.clamp(min=1)
    score = torch.sigmoid(2.0 * pmi)
    return torch.where(counts > 0, score, torch.zeros_like(score)).float()


def harmonic_mean(*scores: torch.Tensor) -> torch.Tensor:
    """Element-wise harmonic mean of score tensors in ``[0, 1]`` (0 where any score is 0).

    >>> harmonic_mean(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 1.0])).tolist()
    [1.0, 0.6666666865348816, 0.0]
    """
    if not scores:
        raise InvalidInputError("harmonic_mean needs at least one score")
    stacked = torch.stack([s.double().clamp(min=0.0) for s in scores])
    positive = (stacked > 0).all(dim=0)
    inv = (1.0 / stacked.clamp(min=1e-12)).sum(dim=0)
    return torch.where(positive, len(scores) / inv, torch.zeros_like(inv)).float()


# --- damage on neutral text ----------------------------------------------------------------------
def neutral_corpus(limit: int | None = None) -> list[str]:
    """The neutral passages shipped with steerlab (first ``limit`` of them), one per line.

    >>> passages = neutral_corpus()
    >>> len(passages) >= 12, passages[0].startswith("The library opens")
    (True, True)
    """
    text = (
        resources.files("steerlab.datasets")
        .joinpath("neutral/neutral_corpus.txt")
        .read_text(encoding="utf-8")
    )
    passages = [line.strip() for line in text.splitlines() if line.strip()]
    if limit is not None:
        if limit < 1:
            raise InvalidInputError(f"limit must be positive, got {limit}")
        passages = passages[:limit]
    return passages


@dataclasses.dataclass(frozen=True)
class NeutralDamage:
    """Damage of one steering configuration on the neutral corpus.

    ``kl``: mean per-token ``KL(unsteered || steered)`` (nats) over every predicted position;
    ``perplexity`` / ``base_perplexity``: corpus perplexity with and without the steering;
    ``n_tokens``: predicted positions averaged over.
    """

    kl: float
    perplexity: float
    base_perplexity: float
    n_tokens: int

    def to_dict(self) -> dict[str, float | int]:
        """The numbers as a flat dict."""
        return dataclasses.asdict(self)


def _corpus_stats(
    logits: torch.Tensor, base: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[float, float]:
    """(mean per-token KL, mean NLL) over positions whose next token is real."""
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    log_q = logits[:, :-1].double().log_softmax(dim=-1)
    log_p = base[:, :-1].double().log_softmax(dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp(min=0.0)
    nll = -log_q.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(kl[valid].mean()), float(nll[valid].mean())


@torch.no_grad()
def neutral_damage(
    model: Any,
    configs: Sequence[Any],
    *,
    passages: Sequence[str] | None = None,
    positions: Any = "all",
    batch_size: int = 8,
) -> list[NeutralDamage]:
    """:class:`NeutralDamage` of each configuration (a ``Steering``, a vector, or ``None``).

    Bare vectors are applied with strength 1 at ``positions`` (default every token: damage is
    what steering costs when it is left on). ``passages`` default to :func:`neutral_corpus`;
    the unsteered pass runs once for all configurations.

    >>> import torch, steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    >>> none, strong = neutral_damage(model, [None, sl.Steering(vec, 8.0)],
    ...                               passages=neutral_corpus(2))
    >>> none.kl, strong.kl > 0, none.perplexity == none.base_perplexity
    (0.0, True, True)
    """
    texts = neutral_corpus() if passages is None else check_texts(passages)
    if not texts:
        raise InvalidInputError("neutral_damage needs at least one passage")
    batch = model.encode(texts)
    ids, mask = batch.input_ids, batch.attention_mask
    base_chunks = []
    for start in range(0, len(texts), batch_size):
        base_chunks.append(model.logits(texts[start : start + batch_size]))
    # model.logits pads each chunk to its own width: pad every chunk back to the full width
    width = ids.shape[1]

    def widen(chunks: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for chunk in chunks:
            pad = width - chunk.shape[1]
            out.append(torch.nn.functional.pad(chunk, (0, 0, pad, 0)) if pad else chunk)
        return torch.cat(out)

    base = widen(base_chunks)
    _, base_nll = _corpus_stats(base, base, ids, mask)
    n_tokens = int((mask[:, :-1] * mask[:, 1:]).sum())
    results = []
    for config in configs:
        if config is None:
            results.append(NeutralDamage(0.0, math.exp(base_nll), math.exp(base_nll), n_tokens))
            continue
        steering = steering_with(config, positions=positions)
        chunks = [
            model.logits(texts[start : start + batch_size], steering=steering)
            for start in range(0, len(texts), batch_size)
        ]
        kl, nll = _corpus_stats(widen(chunks), base, ids, mask)
        results.append(NeutralDamage(kl, math.exp(nll), math.exp(base_nll), n_tokens))
    return results
