"""AxBench-style concept evaluation: steer open generations, score them, compare with prompting.

AxBench (Wu et al. 2025) asks of a steering method what a user would: given an instruction, does
the steered continuation show the concept, stay fluent, and still answer the instruction? Its
headline is that plain prompting ("mention food in your answer") beats every representation-
steering method. This module runs that protocol offline:

1. a :class:`Concept` is contrastive prompts (the vector's data), a concept scorer (a word list,
   VADER sentiment, or embedding similarity through ``steerlab[embeddings]``) and a prompt hint
   for the prompting baseline;
2. for every candidate (a method: ``mean_diff``, ``pca``, ``probe``; times an operator:
   ``add``, ``clamp``, ``add_norm``) and every strength (a fraction of the mean residual norm at
   the layer, see :func:`evaluate_concept`; steering every token but the first), greedy
   continuations of the *train* instructions are scored with
   :mod:`steerlab.scorers`: concept presence, fluency and instruction relevance, each in
   ``[0, 1]``, combined per continuation by their harmonic mean (AxBench's rule);
3. the strength with the best mean combined score on the train instructions is kept and the
   candidate is reported on the *held-out* instructions, beside the unsteered model and the
   prompting baseline (the instruction plus the hint, unsteered), all scored the same way
   against the original instruction;
4. every row also carries the damage on the neutral corpus (KL and perplexity with the steering
   left on at the same positions; 0 and the unsteered perplexity for prompting);
5. and how reliable it is, item by item: ``wrong_way``, the share of held-out instructions on
   which the candidate's concept score is *below* the unsteered one's (Tan et al. 2024 found
   steering moves many items the wrong way), beside ``consistency``, the steerability
   predictor of Braun et al. 2025: the mean cosine of the per-pair training differences to their
   mean (near 1: one shared direction; near 0: the pairs disagree and steering is unreliable).

With ``judge=`` (a :class:`~steerlab.judge.Judge`: any OpenAI-compatible endpoint) the three
scores are AxBench's LLM judgements instead (0-2 each, reported divided by 2); replies without a
readable rating are counted per row (``unparsed``) and left out of the means.

>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> concept = Concept(name="toy", positive=("i love the food",), negative=("i hate the road",),
...                   scorer="words", words=("food",), hint="talk about food")
>>> result = evaluate_concept(model, concept, layer=1, methods=("mean_diff",), strengths=(4.0,),
...     instructions=["the cat", "a dog", "the city", "my day"], max_new_tokens=3,
...     damage=False, progress=False)
>>> [row.name for row in result.rows]   # the clamp/add_norm operators compared beside add
['unsteered', 'prompting', 'mean_diff', 'mean_diff+clamp', 'mean_diff+add_norm']
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import torch

from steerlab.analysis import residual_norms
from steerlab.data import ContrastDataset, load_builtin
from steerlab.errors import DataError, InvalidInputError
from steerlab.judge import Judge
from steerlab.methods import extract_activations, run_method
from steerlab.operators import operator_names
from steerlab.progress import progress_bar
from steerlab.scorers import (
    embedding_score,
    fluency_scores,
    harmonic_mean,
    neutral_corpus,
    neutral_damage,
    relevance_scores,
    sentiment_score,
    words_score,
)
from steerlab.steering import Steering
from steerlab.vectors import SteeringVector, vector_metadata

__all__ = [
    "OPERATORS",
    "SCORERS",
    "Concept",
    "ConceptResult",
    "ConceptRow",
    "available_operators",
    "builtin_concepts",
    "concept_instructions",
    "pair_consistency",
    "evaluate_concept",
    "score_texts",
]

SCORERS = ("words", "vader", "embedding")
OPERATORS = ("add", "clamp", "add_norm")
"""Operators compared by default (:mod:`steerlab.operators`)."""


@dataclasses.dataclass(frozen=True)
class Concept:
    """A concept: contrastive prompts (``positive`` shows it), how to score it, how to ask for it.

    ``scorer``: ``"words"`` (``words`` found in the text), ``"vader"`` (sentiment toward
    ``sign``) or ``"embedding"`` (similarity to ``positive`` vs ``negative``). ``hint`` is added
    to the instruction for the prompting baseline; ``description`` is what an LLM judge is told
    the concept is (default: the name).
    """

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    scorer: str
    words: tuple[str, ...] = ()
    hint: str = ""
    sign: int = 1
    description: str = ""

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise InvalidInputError(f"scorer must be one of {SCORERS}, not {self.scorer!r}")
        if self.scorer == "words" and not self.words:
            raise InvalidInputError(f"concept {self.name!r}: the words scorer needs words")
        if len(self.positive) != len(self.negative) or not self.positive:
            raise InvalidInputError(
                f"concept {self.name!r} needs paired prompts ({len(self.positive)} positive, "
                f"{len(self.negative)} negative)"
            )
        object.__setattr__(self, "positive", tuple(self.positive))
        object.__setattr__(self, "negative", tuple(self.negative))
        object.__setattr__(self, "words", tuple(self.words))

    @property
    def dataset(self) -> ContrastDataset:
        """The contrastive pairs as a paired dataset."""
        return ContrastDataset(
            name=self.name, positive=self.positive, negative=self.negative, paired=True
        )


def _read_json(name: str) -> Any:
    path = resources.files("steerlab.datasets").joinpath(f"concepts/{name}.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"built-in concept data {name!r} cannot be read: {err}") from None


@functools.cache
def builtin_concepts() -> dict[str, Concept]:
    """The concepts shipped with steerlab: ``sentiment`` (VADER), ``formality``, ``food``,
    ``music`` and ``animals`` (word lists; formality's is
    ``datasets/concepts/formality_words.json``), 24 or more contrastive pairs each.

    >>> sorted(builtin_concepts())
    ['animals', 'food', 'formality', 'music', 'sentiment']
    """
    sentiment = load_builtin("sentiment")
    formality = load_builtin("formality")
    # the 20 words of formality.json are for next-token probability mass; in a text they find a
    # formal marker in 22% of that set's own formal sentences: the scorer uses a longer list
    formal_words = _read_json("formality_words")["words"]
    topics = {name: _topic(_read_json(name)) for name in ("food", "music", "animals")}
    return {
        "sentiment": Concept(
            name="sentiment",
            positive=sentiment.positive,
            negative=sentiment.negative,
            scorer="vader",
            hint="Answer in a very happy, positive and enthusiastic tone.",
            description="positive sentiment: a happy, enthusiastic, approving tone",
        ),
        "formality": Concept(
            name="formality",
            positive=formality.positive,
            negative=formality.negative,
            scorer="words",
            words=tuple(w.strip() for w in formal_words),
            hint="Answer in a very formal, polite and official register.",
            description="a formal register: polite, official, elaborate wording",
        ),
        **topics,
    }


def _topic(data: Mapping[str, Any]) -> Concept:
    name = str(data["name"])
    return Concept(
        name=name,
        positive=tuple(p["positive"] for p in data["pairs"]),
        negative=tuple(p["negative"] for p in data["pairs"]),
        scorer="words",
        words=tuple(w.strip() for w in data["positive_words"]),
        hint=str(data.get("hint", f"Talk about {name} in your answer.")),
        description=str(data.get("judge_description", name)),
    )


def concept_instructions() -> list[str]:
    """The 40 shipped instructions (first half: strength selection; the other 20: report).

    >>> len(concept_instructions())
    40
    """
    return list(_read_json("instructions")["instructions"])


def score_texts(concept: Concept, texts: Sequence[str]) -> torch.Tensor:
    """Concept presence of each text in ``[0, 1]`` with the concept's scorer.

    >>> food = builtin_concepts()["food"]
    >>> score_texts(food, ["We ate bread and soup.", "The train left."]).tolist()
    [1.0, 0.0]
    """
    if concept.scorer == "words":
        return words_score(texts, words=concept.words)
    if concept.scorer == "vader":
        return sentiment_score(texts, sign=concept.sign)
    return embedding_score(texts, positive=concept.positive, negative=concept.negative)


def available_operators() -> tuple[str, ...]:
    """The operators compared by default: those of :data:`OPERATORS` that are registered.

    >>> available_operators()
    ('add', 'clamp', 'add_norm')
    """
    registered = set(operator_names())
    return tuple(op for op in OPERATORS if op in registered)


# --- results -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConceptRow:
    """One candidate on the held-out instructions (means over them).

    ``concept``, ``fluency``, ``relevance`` and ``combined`` (their harmonic mean per text, then
    averaged) are in ``[0, 1]``; ``perplexity`` is the mean perplexity of the continuations under
    the unsteered model; ``train_combined`` the score that chose ``strength``. ``wrong_way``:
    the share of held-out instructions whose concept score is below the unsteered one's (``None``
    for the unsteered row); ``consistency``: the steerability predictor of the vector's training
    pairs (:func:`pair_consistency`; ``None`` for the baselines); ``unparsed``: judge replies
    without a rating; ``concept_items`` the concept score of each held-out instruction (NaN where
    a judge gave no rating), in order.
    """

    name: str
    strength: float
    concept: float
    fluency: float
    relevance: float
    combined: float
    combined_sem: float
    perplexity: float
    repetition: float
    compression: float
    train_combined: float
    kl_neutral: float | None = None
    perplexity_neutral: float | None = None
    example: str = ""
    wrong_way: float | None = None
    consistency: float | None = None
    unparsed: int = 0
    concept_items: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The row as a flat dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ConceptResult:
    """Every candidate of one concept, with the train curves behind the chosen strengths."""

    concept: str
    layer: int
    model: str
    rows: tuple[ConceptRow, ...]
    train_curves: Mapping[str, tuple[tuple[float, float], ...]]
    settings: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``concept``, ``layer``, ``model``, ``rows``, ``train_curves``,
        ``settings``."""
        return {
            "concept": self.concept,
            "layer": self.layer,
            "model": self.model,
            "rows": [r.to_dict() for r in self.rows],
            "train_curves": {k: [list(p) for p in v] for k, v in self.train_curves.items()},
            "settings": dict(self.settings),
        }

    def best(self) -> ConceptRow:
        """The row with the highest held-out combined score."""
        return max(self.rows, key=lambda r: r.combined)


# --- evaluation ----------------------------------------------------------------------------------
def _score_block(
    model: Any,
    concept: Concept,
    instructions: Sequence[str],
    texts: Sequence[str],
    judge: Judge | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    fluency = fluency_scores(model, instructions, texts, chat=_chat(model))
    if judge is not None:
        scores = judge.score(
            concept.description or concept.name, instructions, texts, progress=progress
        )
        # AxBench's 0-2 ratings, halved to share the [0, 1] scale of the built-in scorers
        rated = {k: (v / 2.0).float() for k, v in scores.ratings.items()}
        unparsed = torch.stack([torch.isnan(v) for v in scores.ratings.values()]).sum(dim=0)
        return {
            **fluency,
            "fluency": rated["fluency"],
            "relevance": rated["relevance"],
            "concept": rated["concept"],
            "combined": harmonic_mean(rated["concept"], rated["fluency"], rated["relevance"]),
            "unparsed": unparsed.float(),
        }
    relevance = relevance_scores(model, instructions, texts, chat=_chat(model))
    presence = score_texts(concept, texts)
    return {
        **fluency,
        "relevance": relevance,
        "concept": presence,
        "combined": harmonic_mean(presence, fluency["fluency"], relevance),
        "unparsed": torch.zeros(len(texts)),
    }


def _chat(model: Any) -> bool:
    return getattr(model.tokenizer, "chat_template", None) is not None


def _generate(
    model: Any,
    prompts: Sequence[str],
    steering: Sequence[Steering | None],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: bool | None = None,
) -> list[str]:
    out: list[str] = []
    bar = progress_bar(len(prompts), "generate", progress)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(steering[start : start + batch_size])
            ids = model.generate_ids(
                list(prompts[start : start + batch_size]),
                steering=chunk if any(s is not None for s in chunk) else None,
                max_new_tokens=max_new_tokens,
                chat=_chat(model),
                batch_size=batch_size,
            )
            out.extend(str(model.tokenizer.decode(row, skip_special_tokens=True)) for row in ids)
            bar.update(len(chunk))
    finally:
        bar.close()
    return out


STEERED_POSITIONS = slice(1, None)
"""Every token but the first, prompt and generated. The first token is the attention sink: its
residual is tens of times larger than the rest (along the formality direction of the default
model at layer 12: 6279 against 1-56 elsewhere), so an operator that sets an absolute component
(``clamp``) rewrites it and reverses its effect, and ``add_norm`` renormalises to its outlier
norm."""

SCALES = ("residual", "raw")


def _steering(vector: SteeringVector, strength: float, op: str) -> Steering:
    return Steering(vector, strength, STEERED_POSITIONS, op=op)


def _mean(values: torch.Tensor) -> float:
    finite = values.double()[torch.isfinite(values.double())]
    return float(finite.mean()) if finite.numel() else math.nan


def _sem(values: torch.Tensor) -> float:
    v = values.double()
    return float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0


def pair_consistency(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The steerability predictor of Braun et al. 2025: the mean cosine between each pair's
    activation difference and the mean difference (``[n, d]`` each, paired by row).

    >>> import torch
    >>> pair_consistency(torch.tensor([[2.0, 0.0], [3.0, 0.0]]), torch.zeros(2, 2))
    1.0
    >>> round(pair_consistency(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), torch.zeros(2, 2)), 4)
    0.7071
    """
    diffs = positive.double() - negative.double()
    mean = diffs.mean(dim=0)
    cos = torch.nn.functional.cosine_similarity(diffs, mean.expand_as(diffs), dim=-1)
    return float(cos.mean())


def _vectors(
    model: Any,
    dataset: ContrastDataset,
    layer: int,
    methods: Sequence[str],
    *,
    progress: bool | None,
) -> tuple[dict[str, SteeringVector], float]:
    """One activation pass, every method on it (as :func:`~steerlab.methods.compute_vector`),
    and the pairs' consistency (:func:`pair_consistency`)."""
    acts = extract_activations(
        model, list(dataset.positive + dataset.negative), layers=[layer], progress=progress
    )
    n = len(dataset.positive)
    consistency = pair_consistency(acts[layer][:n], acts[layer][n:])
    out = {}
    for method in methods:
        result = run_method(method, acts[layer][:n], acts[layer][n:], paired=True, seed=0)
        metadata = vector_metadata(
            model,
            method=method,
            dataset={"name": dataset.name, "n_pairs": n, "paired": True},
        )
        out[method] = SteeringVector({layer: result.direction.float()}, metadata=metadata)
    return out, consistency


def _choose(
    points: Sequence[tuple[float, float]],
    kls: Sequence[tuple[float, float]] | None,
    max_kl: float | None,
) -> tuple[float, float]:
    """The (strength, train score) with the best score, among the strengths whose neutral KL
    is within ``max_kl`` when it is given (none within it: the least damaging strength).

    >>> _choose([(1.0, 0.2), (2.0, 0.5)], None, None)
    (2.0, 0.5)
    >>> _choose([(1.0, 0.2), (2.0, 0.5)], [(1.0, 0.1), (2.0, 0.9)], 0.5)
    (1.0, 0.2)
    >>> _choose([(1.0, 0.2), (2.0, 0.5)], [(1.0, 0.7), (2.0, 0.9)], 0.5)
    (1.0, 0.2)
    """
    allowed = list(points)
    if kls is not None and max_kl is not None:
        kl = dict(kls)
        allowed = [p for p in points if kl[p[0]] <= max_kl]
        if not allowed:
            return min(points, key=lambda p: kl[p[0]])
    # the first of equal scores wins (the grid's order)
    return max(allowed, key=lambda p: p[1])


def _checked_extras(
    extra: Mapping[str, tuple[Any, ...]] | None,
    extra_strengths: Sequence[float],
    methods: Sequence[str],
) -> tuple[dict[str, tuple[SteeringVector, str]], dict[str, list[float]]]:
    """``evaluate_concept``'s ``extra`` candidates checked: ``{name: (vector, op)}`` and each
    one's strength grid (its own third element, or ``extra_strengths``)."""
    extras: dict[str, tuple[SteeringVector, str]] = {}
    extra_grids: dict[str, list[float]] = {}
    for name, entry in dict(extra or {}).items():
        if (
            not isinstance(entry, tuple)
            or len(entry) not in (2, 3)
            or not isinstance(entry[0], SteeringVector)
        ):
            raise InvalidInputError(
                f"extra[{name!r}] must be a (SteeringVector, op) or (SteeringVector, op, "
                "strengths) tuple"
            )
        if name in ("unsteered", "prompting") or name in methods:
            raise InvalidInputError(f"extra[{name!r}] clashes with a built-in candidate's name")
        where = "extra_strengths" if len(entry) == 2 else f"extra[{name!r}] strengths"
        grid = [float(s) for s in (extra_strengths if len(entry) == 2 else entry[2])]
        if not grid or any(not math.isfinite(s) or s == 0 for s in grid):
            raise InvalidInputError(f"{where} must be non-zero finite numbers")
        extras[name] = (entry[0], str(entry[1]))
        extra_grids[name] = grid
    return extras, extra_grids


def _first_pairs(dataset: ContrastDataset, max_pairs: int | None) -> ContrastDataset:
    """The first ``max_pairs`` pairs of ``dataset`` (all of them for ``None``)."""
    if max_pairs is None:
        return dataset
    if max_pairs < 2:
        raise InvalidInputError(f"max_pairs must be at least 2, got {max_pairs}")
    return ContrastDataset(
        name=dataset.name,
        positive=dataset.positive[:max_pairs],
        negative=dataset.negative[:max_pairs],
        paired=True,
    )


def _held_out_rows(
    report: Sequence[tuple[str, float, list[str], list[Steering | None], float]],
    judged: Mapping[str, torch.Tensor],
    outputs: Sequence[str],
    damages: Mapping[str, tuple[float, float]],
    final: Mapping[str, Steering],
    consistency: float,
) -> list[ConceptRow]:
    """One :class:`ConceptRow` per ``report`` entry, from its block of ``judged`` scores and
    ``outputs`` (the unsteered entry first: ``wrong_way`` is measured against it)."""
    result_rows = []
    n = len(report[0][2])
    base = judged["concept"][:n].double()  # the unsteered row comes first
    for k, (name, s, _, _, train_score) in enumerate(report):
        part = {key: value[k * n : (k + 1) * n] for key, value in judged.items()}
        kl, ppl = damages.get(name, (None, None))
        wrong: float | None = None
        if k > 0:
            here = part["concept"].double()
            both = torch.isfinite(here) & torch.isfinite(base)
            wrong = float((here[both] < base[both]).double().mean()) if both.any() else math.nan
        result_rows.append(
            ConceptRow(
                name=name,
                strength=s,
                concept=_mean(part["concept"]),
                fluency=_mean(part["fluency"]),
                relevance=_mean(part["relevance"]),
                combined=_mean(part["combined"]),
                combined_sem=_sem(part["combined"]),
                perplexity=_mean(part["perplexity"]),
                repetition=_mean(part["repetition"]),
                compression=_mean(part["compression"]),
                train_combined=train_score,
                kl_neutral=kl,
                perplexity_neutral=ppl,
                example=outputs[k * n].strip(),
                wrong_way=wrong,
                consistency=consistency if name in final else None,
                unparsed=int(part["unparsed"].sum()),
                concept_items=tuple(float(v) for v in part["concept"]),
            )
        )
    return result_rows


def _train_curves(
    model: Any,
    concept: Concept,
    train: Sequence[str],
    candidates: Sequence[tuple[str, SteeringVector, str]],
    grids: Mapping[str, Sequence[float]],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: bool | None,
    judge: Judge | None,
    max_kl: float | None,
    damage_passages: int | None,
) -> tuple[
    dict[str, list[tuple[float, float]]],
    dict[str, list[tuple[float, float]]],
    dict[str, tuple[float, float]],
    int,
]:
    """``evaluate_concept``'s strength choice on the train instructions: each candidate's
    ``(strength, combined)`` curve, its ``(strength, KL)`` on neutral text (only with
    ``max_kl``), the chosen ``(strength, train score)`` per candidate, and how many judge
    replies could not be parsed."""
    # every (candidate, strength) on the train instructions: rows of one batched generation
    configs = [
        (name, s, _steering(vec, s, op)) for name, vec, op in candidates for s in grids[name]
    ]
    prompts = [p for _ in configs for p in train]
    rows = [c[2] for c in configs for _ in train]
    texts = _generate(
        model,
        prompts,
        rows,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    train_block = _score_block(model, concept, prompts, texts, judge, progress)
    scored = train_block["combined"]
    train_unparsed = int(train_block["unparsed"].sum())
    curves: dict[str, list[tuple[float, float]]] = {}
    for k, (name, s, _) in enumerate(configs):
        mean = _mean(scored[k * len(train) : (k + 1) * len(train)])
        curves.setdefault(name, []).append((s, mean))
    train_kl: dict[str, list[tuple[float, float]]] = {}
    if max_kl is not None:
        measured_kl = neutral_damage(
            model, [c[2] for c in configs], passages=neutral_corpus(damage_passages)
        )
        for (name, s, _), d in zip(configs, measured_kl, strict=True):
            train_kl.setdefault(name, []).append((s, d.kl))
    chosen = {name: _choose(points, train_kl.get(name), max_kl) for name, points in curves.items()}
    return curves, train_kl, chosen, train_unparsed


def _report_entries(
    concept: Concept,
    test: Sequence[str],
    candidates: Sequence[tuple[str, SteeringVector, str]],
    chosen: Mapping[str, tuple[float, float]],
    *,
    prompting: bool,
) -> tuple[list[tuple[str, float, list[str], list[Steering | None], float]], dict[str, Steering]]:
    """The held-out report's entries ``(name, strength, prompts, per-row steering, train
    score)``: unsteered first, prompting (the hint appended), then every candidate at its chosen
    strength; and each candidate's final steering."""
    report: list[tuple[str, float, list[str], list[Steering | None], float]] = [
        ("unsteered", 0.0, list(test), [None] * len(test), math.nan)
    ]
    if prompting:
        hinted = [f"{t} {concept.hint}".strip() for t in test]
        report.append(("prompting", 0.0, hinted, [None] * len(test), math.nan))
    final: dict[str, Steering] = {}
    for name, vec, op in candidates:
        s, train_score = chosen[name]
        final[name] = _steering(vec, s, op)
        report.append((name, s, list(test), [final[name]] * len(test), train_score))
    return report, final


def _split_instructions(
    instructions: Sequence[str] | None, n_train: int | None
) -> tuple[list[str], list[str]]:
    """The instructions that choose the strength and the held-out ones (default: halves of
    :func:`concept_instructions`)."""
    items = concept_instructions() if instructions is None else list(instructions)
    if len(items) < 2:
        raise InvalidInputError("the concept evaluation needs at least 2 instructions")
    cut = len(items) // 2 if n_train is None else n_train
    if not 1 <= cut < len(items):
        raise InvalidInputError(f"n_train must be between 1 and {len(items) - 1}, got {cut}")
    train, test = items[:cut], items[cut:]
    return train, test


def evaluate_concept(
    model: Any,
    concept: Concept | str,
    *,
    layer: int,
    methods: Sequence[str] = ("mean_diff", "pca", "probe"),
    operators: Sequence[str] | None = None,
    strengths: Sequence[float] = (0.1, 0.2, 0.4, 0.8),
    scale: str = "residual",
    instructions: Sequence[str] | None = None,
    n_train: int | None = None,
    max_new_tokens: int = 24,
    prompting: bool = True,
    damage: bool = True,
    damage_passages: int | None = 8,
    batch_size: int = 32,
    max_pairs: int | None = None,
    model_name: str | None = None,
    progress: bool | None = None,
    judge: Judge | None = None,
    extra: Mapping[str, tuple[Any, ...]] | None = None,
    extra_strengths: Sequence[float] = (0.5, 1.0, 2.0),
    max_kl: float | None = None,
) -> ConceptResult:
    """Run the AxBench-style protocol for one concept (see the module docstring).

    ``scale="residual"`` (default) rescales every method's direction to the mean residual norm
    at ``layer`` (measured on the train instructions, first token left out, see
    :func:`~steerlab.analysis.residual_norms`), so a strength is a fraction of a typical
    activation's length, the same for every method; ``"raw"`` keeps each method's own norm (a
    strength is then a multiple of the mean difference, whose length varies by concept).
    ``instructions`` default to :func:`concept_instructions`; the first ``n_train`` (default
    half) choose each candidate's strength, the rest are the report. ``max_pairs`` uses the
    first pairs of the concept only (CPU budgets). ``operators`` default to
    :func:`available_operators`. Rows: ``unsteered``, ``prompting`` (if asked), then one per
    method × operator (``"pca"``, ``"pca+clamp"``...). ``judge`` scores with an LLM judge
    (:class:`~steerlab.judge.Judge`) instead of the built-in scorers, train and held-out alike.
    ``progress``: bars on a terminal by default (``None``), forced on or off with True/False.
    ``extra`` adds candidates made elsewhere, ``{name: (vector, op)}`` (e.g. a vector from
    :func:`~steerlab.training.train_vector`, or LoReFT matrices with ``op="loreft"``): they
    are used at their own scale (a trained vector's norm is its dose), with the strength chosen
    from ``extra_strengths`` (multiples) on the train instructions like every other candidate;
    an entry ``(vector, op, strengths)`` brings its own grid (e.g. a head-site ITI vector,
    whose natural unit differs from a trained vector's).

    ``max_kl`` (nats per token) makes the strength choice respect a damage budget: every
    (candidate, strength) is also measured on the neutral corpus (KL with the steering on,
    as the rows' damage), and only strengths within the budget compete; a candidate with none
    within it keeps its least damaging strength. The neutral corpus is not the held-out
    instructions, so the choice still sees none of the report's items.
    """
    if isinstance(concept, str):
        known = builtin_concepts()
        if concept not in known:
            raise InvalidInputError(f"unknown concept {concept!r}; built-in: {sorted(known)}")
        concept = known[concept]
    train, test = _split_instructions(instructions, n_train)
    values = [float(s) for s in strengths]
    if not values or any(not math.isfinite(s) or s == 0 for s in values):
        raise InvalidInputError("strengths must be non-zero finite numbers")
    ops = tuple(available_operators() if operators is None else operators)
    extras, extra_grids = _checked_extras(extra, extra_strengths, methods)
    if max_kl is not None and (not math.isfinite(max_kl) or max_kl <= 0 or not damage):
        raise InvalidInputError(f"max_kl must be a positive number with damage on, got {max_kl!r}")
    if scale not in SCALES:
        raise InvalidInputError(f"scale must be one of {SCALES}, not {scale!r}")
    layer = model.adapter.resolve_layer(layer)
    dataset = _first_pairs(concept.dataset, max_pairs)
    vectors, consistency = _vectors(model, dataset, layer, methods, progress=progress)
    raw_norms = {method: float(vec[layer].norm()) for method, vec in vectors.items()}
    residual: float | None = None
    if scale == "residual":
        norms = residual_norms(model, train, layers=[layer], chat=_chat(model))
        residual = norms[layer]
        vectors = {m: vec.scaled_to_residual(norms) for m, vec in vectors.items()}
    candidates = [
        (method if op == "add" else f"{method}+{op}", vectors[method], op)
        for method in methods
        for op in ops
    ]
    grids = {name: values for name, _, _ in candidates}
    for name, (vec, op) in extras.items():
        candidates.append((name, vec, op))
        grids[name] = extra_grids[name]
    curves, train_kl, chosen, train_unparsed = _train_curves(
        model,
        concept,
        train,
        candidates,
        grids,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        judge=judge,
        max_kl=max_kl,
        damage_passages=damage_passages,
    )
    report, final = _report_entries(concept, test, candidates, chosen, prompting=prompting)
    all_prompts = [p for entry in report for p in entry[2]]
    all_rows = [r for entry in report for r in entry[3]]
    outputs = _generate(
        model,
        all_prompts,
        all_rows,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    # every continuation is judged against the original instruction, prompting included
    judged = _score_block(model, concept, list(test) * len(report), outputs, judge, progress)
    damages: dict[str, tuple[float, float]] = {}
    if damage:
        names = [entry[0] for entry in report]
        configs_damage = [final.get(n) for n in names]
        measured = neutral_damage(model, configs_damage, passages=neutral_corpus(damage_passages))
        damages = {n: (d.kl, d.perplexity) for n, d in zip(names, measured, strict=True)}
    result_rows = _held_out_rows(report, judged, outputs, damages, final, consistency)
    return ConceptResult(
        concept=concept.name,
        layer=layer,
        model=model_name or str(getattr(model, "name", "model")),
        rows=tuple(result_rows),
        train_curves={k: tuple(v) for k, v in curves.items()},
        settings={
            "methods": list(methods),
            "operators": list(ops),
            "strengths": values,
            "extra": {
                name: {"op": op, "strengths": extra_grids[name]} for name, (_, op) in extras.items()
            },
            "max_kl": max_kl,
            "train_kl": {k: [list(p) for p in v] for k, v in train_kl.items()},
            "scale": scale,
            "residual_norm": residual,
            "raw_vector_norms": raw_norms,
            "n_train_instructions": len(train),
            "n_test_instructions": len(test),
            "max_new_tokens": max_new_tokens,
            "scorer": concept.scorer,
            "hint": concept.hint,
            "positions": "every token but the first (the attention sink)",
            "pair_consistency": consistency,
            "judge": None if judge is None else {"url": judge.url, "model": judge.model},
            "judge_unparsed_train": train_unparsed,
        },
    )
