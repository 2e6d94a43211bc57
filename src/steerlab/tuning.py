"""Tuning: find the layer and the strength, then prove the effect on held-out prompts.

The seed's best practices (middle-to-late layers, start small and increase the strength,
validate on diverse prompts) become one measured procedure, :func:`tune`:

1. split the contrastive dataset (and the evaluation prompts) into train and held-out parts,
   explicitly and reproducibly (``seed``);
2. compute the vector at every candidate layer from the *train* pairs (one extraction pass);
3. :func:`~steerlab.sweeps.sweep` layer × strength on the train prompts, scoring a behaviour
   metric and a damage metric (``KL(unsteered || steered)`` on neutral text) at every point;
4. recommend the point with the highest behaviour whose mean KL stays within the budget
   (strength 0, the unsteered model, is always within it);
5. evaluate that point on the held-out prompts, and generate examples there, baseline and
   steered side by side. These numbers are reported separately from the train numbers.

>>> split_prompts(["a", "b", "c", "d"], test_fraction=0.5, seed=0)
(['a', 'c'], ['b', 'd'])
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from steerlab.deprecation import renamed_keyword
from steerlab.errors import DataError, InvalidInputError
from steerlab.evaluation import (
    METRICS,
    NextTokenTask,
    ab_task,
    concept_similarity,
    concept_task,
    embeddings_available,
    keyword_rate,
    kl_task,
    perplexity,
)
from steerlab.report import write_report
from steerlab.steering import Steering
from steerlab.sweeps import (
    DEFAULT_MAX_KL,
    DEFAULT_STRENGTHS,
    SweepPoint,
    SweepResult,
    operator_table,
    sweep,
)
from steerlab.vectors import SteeringVector

__all__ = [
    "Example",
    "HeldOutResult",
    "TuneResult",
    "default_layers",
    "split_prompts",
    "tune",
]


# --- tuning ------------------------------------------------------------------------------------
def split_prompts(
    prompts: Sequence[str], *, test_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split prompts into ``(train, test)`` at random, reproducibly; both keep their order.

    The test part gets ``round(n * test_fraction)`` prompts, at least one and at most ``n - 1``.

    >>> split_prompts(["a", "b", "c", "d"], test_fraction=0.5, seed=0)
    (['a', 'c'], ['b', 'd'])
    """
    items = list(prompts)
    if len(items) < 2:
        raise InvalidInputError(f"need at least 2 prompts to split, got {len(items)}")
    if not 0 < test_fraction < 1:
        raise InvalidInputError(f"test_fraction must be strictly between 0 and 1: {test_fraction}")
    n_test = min(len(items) - 1, max(1, round(len(items) * test_fraction)))
    test = set(random.Random(seed).sample(range(len(items)), n_test))
    return (
        [p for i, p in enumerate(items) if i not in test],
        [p for i, p in enumerate(items) if i in test],
    )


def default_layers(n_layers: int) -> list[int]:
    """Candidate layers when none are given: all of a small model, else 8 spread over the middle.

    >>> default_layers(3), default_layers(30)
    ([0, 1, 2], [4, 7, 10, 13, 17, 20, 23, 26])
    """
    if n_layers <= 8:
        return list(range(n_layers))
    low, high = round(0.15 * n_layers), round(0.85 * n_layers)
    return sorted({round(low + k * (high - low) / 7) for k in range(8)})


@dataclasses.dataclass(frozen=True)
class Example:
    """One held-out prompt with its unsteered and steered continuations."""

    prompt: str
    baseline: str
    steered: str


@dataclasses.dataclass(frozen=True)
class HeldOutResult:
    """The recommended point evaluated on prompts the vector and the tuning never saw.

    ``generation`` maps a generation metric to ``(baseline mean, steered mean)`` over the
    example generations; ``perplexity`` is of those generations under the unsteered model.
    """

    layer: int
    strength: float
    n_prompts: int
    n_damage_prompts: int
    baseline: float
    steered: float
    shift: float
    shift_sem: float
    damage: float
    generation: Mapping[str, tuple[float, float]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["generation"] = {k: list(v) for k, v in self.generation.items()}
        return data


@dataclasses.dataclass(frozen=True, eq=False)
class TuneResult:
    """What :func:`tune` found: the train sweep, the recommendation and its held-out proof."""

    model_name: str
    dataset_name: str
    vector: SteeringVector
    sweep: SweepResult
    recommended: tuple[int, float]
    max_kl: float
    heldout: HeldOutResult
    examples: tuple[Example, ...]
    settings: Mapping[str, Any]
    seconds: float
    op: str = "add"
    op_sweeps: Mapping[str, SweepResult] = dataclasses.field(default_factory=dict)
    """The train sweep of every operator compared (``tune(op=[...])``); ``sweep`` is ``op``'s."""

    @property
    def recommended_point(self) -> SweepPoint:
        """The train-sweep point at the recommendation."""
        return self.sweep.point(*self.recommended)

    @property
    def recommended_vector(self) -> SteeringVector:
        """The vector at the recommended layer only (use it with the recommended strength)."""
        layer, strength = self.recommended
        return self.vector.select([layer]).with_metadata(
            recommended_layer=layer, recommended_strength=strength, recommended_op=self.op
        )

    def table(self) -> str:
        """The train sweep as a text table (see :meth:`SweepResult.table`)."""
        return self.sweep.table(max_damage=self.max_kl, recommended=self.recommended_point)

    def summary(self) -> str:
        """Human-readable summary: splits, table, recommendation, held-out numbers."""
        s = self.settings
        layer, strength = self.recommended
        point = self.recommended_point
        held = self.heldout
        lines = [
            f"steerlab sweep: {self.dataset_name} on {self.model_name}",
            f"splits (seed {s['seed']}, test fraction {s['test_fraction']:g}): vector from "
            f"{s['n_train_pairs']} train pairs ({s['n_test_pairs']} held out); tuned on "
            f"{s['n_train_prompts']} prompts, validated on {s['n_test_prompts']} held-out prompts",
            f"behaviour: {self.sweep.behaviour_metric}; damage: {self.sweep.damage_metric} "
            f"(KL(unsteered || steered), nats), budget {self.max_kl:g}; sweep mode "
            f"{self.sweep.mode}, {self.sweep.seconds:.1f} s",
            "",
            self.table(),
            "",
            f"recommended: layer {layer}, strength {strength:g}, op {self.op} (train: behaviour "
            f"{self.sweep.baseline:.3f} -> {point.behaviour:.3f}, shift {point.shift:+.3f}, "
            f"KL {point.damage:.3f})",
            f"held-out ({held.n_prompts} prompts): behaviour {held.baseline:.3f} -> "
            f"{held.steered:.3f}, shift {held.shift:+.3f} ± {held.shift_sem:.3f} (s.e.m.), "
            f"KL {held.damage:.3f} on {held.n_damage_prompts} prompts",
        ]
        if len(self.op_sweeps) > 1:
            lines[6:6] = [
                "operators compared (best point of each within the budget):",
                operator_table(self.op_sweeps, max_damage=self.max_kl),
                "",
            ]
        if strength == 0.0:
            lines.append(
                "no steered point beat the unsteered model within the KL budget: try other "
                "layers, smaller strengths, or a larger --max-kl"
            )
        if held.generation:
            parts = [f"{k} {a:.3f} -> {b:.3f}" for k, (a, b) in held.generation.items()]
            lines.append(
                f"held-out generations ({len(self.examples)} prompts, baseline -> steered): "
                + ", ".join(parts)
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything (settings, every sweep point, held-out numbers, examples), JSON-ready."""
        return {
            "model": self.model_name,
            "dataset": self.dataset_name,
            "settings": dict(self.settings),
            "max_kl": self.max_kl,
            "recommended": {
                "layer": self.recommended[0],
                "strength": self.recommended[1],
                "op": self.op,
            },
            "sweep": self.sweep.to_dict(),
            "op_sweeps": {name: r.to_dict() for name, r in self.op_sweeps.items()},
            "heldout": self.heldout.to_dict(),
            "examples": [dataclasses.asdict(e) for e in self.examples],
            "seconds": self.seconds,
        }

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write JSON, CSV, PNG plots, the vector and the HTML report into ``directory``.

        Returns ``{"json", "csv", "curves", "heatmap", "vector", "html"}`` → paths.
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": folder / "sweep.json",
            "csv": folder / "sweep.csv",
            "vector": folder / "vector.safetensors",
        }
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.sweep.to_csv(paths["csv"])
        self.vector.with_metadata(
            recommended_layer=self.recommended[0],
            recommended_strength=self.recommended[1],
            recommended_op=self.op,
        ).save(paths["vector"])
        paths.update(write_report(self, folder))
        return paths


def _load(dataset: Any) -> Any:
    from steerlab.data import ContrastDataset, load_dataset

    if isinstance(dataset, ContrastDataset):
        return dataset
    return load_dataset(dataset)


def _builtin_extras(dataset: Any) -> tuple[list[str] | None, tuple[list[str], list[str]] | None]:
    """Neutral prompts and concept words when ``dataset`` is exactly a built-in set."""
    from steerlab.data import builtin_names, concept_words, load_builtin, neutral_prompts

    if dataset.name not in builtin_names() or dataset != load_builtin(dataset.name):
        return None, None
    try:
        words: tuple[list[str], list[str]] | None = concept_words(dataset.name)
    except DataError:
        words = None
    return neutral_prompts(dataset.name), words


def tune(
    model: Any,
    dataset: Any = "sentiment",
    *,
    layers: Sequence[int] | None = None,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    max_kl: float = DEFAULT_MAX_KL,
    test_fraction: float = 0.25,
    seed: int = 0,
    method: str = "mean_diff",
    read_at: str | int | None = None,
    positions: Any = "all",
    eval_prompts: Sequence[str] | None = None,
    target_words: Sequence[str] | None = None,
    contrast_words: Sequence[str] | None = None,
    damage_prompts: Sequence[str] | None = None,
    generation_metrics: Sequence[str] | None = None,
    n_examples: int = 4,
    max_new_tokens: int = 32,
    mode: str = "prefix",
    chat: bool = False,
    progress: bool | None = None,
    op: str | Sequence[str] = "add",
    vector_positions: str | int | None = None,
) -> TuneResult:
    """Pick the layer and strength for a contrastive dataset and validate them on held-out data.

    ``dataset`` is a :class:`~steerlab.data.ContrastDataset`, a built-in name or a file
    (:func:`steerlab.data.load_dataset`). Its pairs are split by ``seed``/``test_fraction``;
    the vector (``method`` at every candidate layer, read at ``read_at``: ``"last"`` by
    default) comes from the train pairs only; ``positions`` is where it then steers.
    ``vector_positions=`` is the deprecated name of ``read_at=``.

    What is measured:

    * A/B datasets (:func:`steerlab.data.load_caa`, with ``answers``): ``ab_probability`` of
      the matching letter on the train questions, validated on the held-out questions.
    * Otherwise ``logprob_diff`` of ``target_words`` vs ``contrast_words`` (default: the
      built-in set's concept words) on ``eval_prompts`` (default: the built-in set's neutral
      prompts, else the texts of the split's pairs), themselves split train/held-out.

    Damage is ``KL(unsteered || steered)`` of the next token on ``damage_prompts`` (default:
    the neutral prompts, split the same way, else the evaluation prompts); the recommendation is
    the best train behaviour with mean KL ``<= max_kl``. Then ``n_examples`` held-out prompts
    are generated greedily (``max_new_tokens``) without and with steering, and scored with
    ``generation_metrics`` (default: ``vader`` for sentiment plus ``keyword_rate`` for concept
    words; ``concept_similarity`` on request) and ``perplexity`` under the unsteered model.

    ``op`` is an operator name (:mod:`steerlab.operators`) or a list of them: with a list the
    train sweep runs once per operator on the same vector and prompts, the best point of all
    operators within the budget is recommended (and validated), and :meth:`TuneResult.summary`
    shows the operators side by side (``result.op_sweeps``).

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> result = tune(model, "sentiment", layers=[0, 1], strengths=[1.0, 2.0], n_examples=1,
    ...               max_new_tokens=4, progress=False)
    >>> result.recommended[0] in (0, 1), result.heldout.n_prompts > 0
    (True, True)
    >>> "held-out" in result.summary()
    True
    """
    start_time = time.perf_counter()
    read_at = renamed_keyword(
        "tune",
        old="vector_positions",
        new="read_at",
        old_value=vector_positions,
        new_value=read_at,
        default="last",
    )
    _check_budget(max_kl=max_kl, n_examples=n_examples)
    data, train, test = _split_dataset(dataset, test_fraction=test_fraction, seed=seed)
    plan = _plan(
        model,
        data,
        train,
        test,
        test_fraction=test_fraction,
        seed=seed,
        eval_prompts=eval_prompts,
        target_words=target_words,
        contrast_words=contrast_words,
        damage_prompts=damage_prompts,
        generation_metrics=generation_metrics,
        chat=chat,
    )
    candidate_layers = model.adapter.resolve_layers(
        default_layers(model.n_layers) if layers is None else layers
    )
    op_names = _operator_names(op)
    vector = _train_vector(
        model,
        data,
        train,
        layers=candidate_layers,
        method=method,
        read_at=read_at,
        op_names=op_names,
        seed=seed,
        test_fraction=test_fraction,
        progress=progress,
    )
    # A/B prompts already carry the chat template when asked for; never apply it twice
    text_chat = chat and not data.answers
    common = {"positions": positions, "mode": mode, "chat": text_chat}
    op_sweeps = _train_sweeps(
        model, vector, plan, candidate_layers, strengths, op_names, common, progress=progress
    )
    best_op, best = _best_point(op_sweeps, max_kl=max_kl)
    heldout, examples = _validate(
        model,
        vector,
        plan,
        best,
        op=best_op,
        common=common,
        n_examples=n_examples,
        max_new_tokens=max_new_tokens,
    )
    train_sweep = op_sweeps[best_op]
    settings = {
        "layers": list(train_sweep.layers),
        "strengths": list(train_sweep.strengths),
        "method": method,
        "ops": op_names,
        "vector_positions": read_at,
        "positions": str(positions),
        "test_fraction": test_fraction,
        "seed": seed,
        "mode": train_sweep.mode,
        "chat": chat,
        "n_train_pairs": len(train),
        "n_test_pairs": len(test),
        **_plan_settings(plan, max_new_tokens=max_new_tokens),
    }
    return TuneResult(
        model_name=model.name,
        dataset_name=data.name,
        vector=vector,
        sweep=train_sweep,
        recommended=(best.layer, best.strength),
        max_kl=max_kl,
        heldout=heldout,
        examples=examples,
        settings=settings,
        seconds=time.perf_counter() - start_time,
        op=best_op,
        op_sweeps=op_sweeps,
    )


# --- the steps of tune ---------------------------------------------------------------------------
def _check_budget(*, max_kl: float, n_examples: int) -> None:
    """Refuse a damage budget that is not a non-negative number, or a negative example count."""
    if not math.isfinite(max_kl) or max_kl < 0:
        raise InvalidInputError(f"max_kl must be a non-negative number, got {max_kl}")
    if n_examples < 0:
        raise InvalidInputError(f"n_examples must be >= 0, got {n_examples}")


def _split_dataset(dataset: Any, *, test_fraction: float, seed: int) -> tuple[Any, Any, Any]:
    """``(dataset, train pairs, held-out pairs)``; an unpaired dataset is refused."""
    data = _load(dataset)
    if not data.paired:
        raise InvalidInputError(
            f"dataset {data.name!r} is unpaired; tune needs a paired dataset to split by pair"
        )
    train, test = data.split(test_fraction=test_fraction, seed=seed)
    return data, train, test


def _operator_names(op: str | Sequence[str]) -> list[str]:
    """The canonical names of the operator(s) to compare; refused unless distinct."""
    from steerlab.operators import get_operator

    op_names = [get_operator(o).name for o in ([op] if isinstance(op, str) else list(op))]
    if not op_names or len(set(op_names)) != len(op_names):
        raise InvalidInputError(f"op must be an operator name or a list of distinct ones: {op!r}")
    return op_names


def _train_vector(
    model: Any,
    data: Any,
    train: Any,
    *,
    layers: Sequence[int],
    method: str,
    read_at: Any,
    op_names: Sequence[str],
    seed: int,
    test_fraction: float,
    progress: bool | None,
) -> SteeringVector:
    """The vector at every candidate layer, from the train pairs only."""
    from steerlab.methods import compute_vector
    from steerlab.operators import get_operator

    return compute_vector(
        model,
        list(train.positive),
        list(train.negative),
        layers=layers,
        method=method,
        read_at=read_at,
        progress=progress,
        # a full forward pass only when an operator reads the rotation plane
        plane=any("plane" in get_operator(name).needs for name in op_names) or None,
    ).with_metadata(dataset=data.name, split_seed=seed, test_fraction=test_fraction)


def _train_sweeps(
    model: Any,
    vector: SteeringVector,
    plan: _Plan,
    layers: Sequence[int],
    strengths: Sequence[float],
    op_names: Sequence[str],
    common: Mapping[str, Any],
    *,
    progress: bool | None,
) -> dict[str, SweepResult]:
    """The train sweep of every operator on the same vector, prompts and grid."""
    return {
        name: sweep(
            model,
            vector,
            behaviour=plan.train,
            damage=plan.train_damage,
            layers=layers,
            strengths=strengths,
            progress=progress,
            op=name,
            **common,
        )
        for name in op_names
    }


def _best_point(op_sweeps: Mapping[str, SweepResult], *, max_kl: float) -> tuple[str, SweepPoint]:
    """The operator and point with the best train behaviour within the budget (ties: the
    smaller strength, then the lower layer)."""
    bests = {name: r.recommend(max_damage=max_kl) for name, r in op_sweeps.items()}
    best_op = max(
        op_sweeps,
        key=lambda n: (bests[n].behaviour, -abs(bests[n].strength), -bests[n].layer),
    )
    return best_op, bests[best_op]


def _validate(
    model: Any,
    vector: SteeringVector,
    plan: _Plan,
    best: SweepPoint,
    *,
    op: str,
    common: Mapping[str, Any],
    n_examples: int,
    max_new_tokens: int,
) -> tuple[HeldOutResult, tuple[Example, ...]]:
    """The recommended point on the held-out prompts, and example generations there."""
    layer, strength = best.layer, best.strength
    held = sweep(
        model,
        vector.select([layer]),
        behaviour=plan.test,
        damage=plan.test_damage,
        strengths=[strength],
        progress=False,
        op=op,
        **common,
    )
    held_point = held.point(layer, strength)
    steering = Steering(vector.select([layer]), strength, common["positions"], op=op)
    examples, generation = _generate_examples(
        model,
        list(plan.test.prompts[:n_examples]),
        steering,
        plan.scorers,
        max_new_tokens=max_new_tokens,
        chat=common["chat"],
    )
    heldout = HeldOutResult(
        layer=layer,
        strength=strength,
        n_prompts=len(plan.test.prompts),
        n_damage_prompts=len(plan.test_damage.prompts),
        baseline=held.baseline,
        steered=held_point.behaviour,
        shift=held_point.shift,
        shift_sem=held_point.behaviour_sem,
        damage=held_point.damage,
        generation=generation,
    )
    return heldout, examples


def _plan_settings(plan: _Plan, *, max_new_tokens: int) -> dict[str, Any]:
    """The prompts of every split, ``max_new_tokens`` and the behaviour options, for
    ``TuneResult.settings``."""
    return {
        "n_train_prompts": len(plan.train.prompts),
        "n_test_prompts": len(plan.test.prompts),
        "n_train_damage_prompts": len(plan.train_damage.prompts),
        "train_prompts": list(plan.train.prompts),
        "test_prompts": list(plan.test.prompts),
        "train_damage_prompts": list(plan.train_damage.prompts),
        "test_damage_prompts": list(plan.test_damage.prompts),
        "max_new_tokens": max_new_tokens,
        "behaviour_options": {
            k: list(v) if isinstance(v, (tuple, list)) else v for k, v in plan.train.options.items()
        },
    }


Scorer = Callable[[Sequence[str]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The train and held-out tasks of a tuning run and the generation scorers."""

    train: NextTokenTask
    test: NextTokenTask
    train_damage: NextTokenTask
    test_damage: NextTokenTask
    scorers: tuple[tuple[str, Scorer], ...]


def _plan(
    model: Any,
    data: Any,
    train: Any,
    test: Any,
    *,
    test_fraction: float,
    seed: int,
    eval_prompts: Sequence[str] | None,
    target_words: Sequence[str] | None,
    contrast_words: Sequence[str] | None,
    damage_prompts: Sequence[str] | None,
    generation_metrics: Sequence[str] | None,
    chat: bool,
) -> _Plan:
    """Decide what is measured on which prompts, before any expensive work."""
    neutral, words = _builtin_extras(data)

    def split(prompts: Sequence[str]) -> tuple[list[str], list[str]]:
        return split_prompts(prompts, test_fraction=test_fraction, seed=seed)

    targets: tuple[list[str], list[str]] | None = None
    behaviour: tuple[NextTokenTask, NextTokenTask]
    default_damage: list[str] | None
    if data.answers:
        if target_words is not None or contrast_words is not None or eval_prompts is not None:
            raise InvalidInputError(
                "an A/B dataset is scored on its own questions: drop target_words, "
                "contrast_words and eval_prompts"
            )
        behaviour = (
            ab_task(model, train.prompts, train.answers, chat=chat),
            ab_task(model, test.prompts, test.answers, chat=chat),
        )
        default_damage = neutral if neutral is not None else _generic_neutral()
    else:
        if target_words is not None or contrast_words is not None:
            if target_words is None or contrast_words is None:
                raise InvalidInputError("give both target_words and contrast_words, or neither")
            targets = (list(target_words), list(contrast_words))
        elif words is not None:
            targets = words
        else:
            raise InvalidInputError(
                f"dataset {data.name!r} has no concept words: pass target_words and "
                "contrast_words (e.g. [' happy', ' great'] and [' sad', ' awful'])"
            )
        if eval_prompts is not None:
            prompts = split(list(eval_prompts))
        elif neutral is not None:
            prompts = split(neutral)
        else:
            prompts = (
                list(train.positive) + list(train.negative),
                list(test.positive) + list(test.negative),
            )
        pos, neg = targets
        behaviour = (
            concept_task(model, prompts[0], target_words=pos, contrast_words=neg),
            concept_task(model, prompts[1], target_words=pos, contrast_words=neg),
        )
        default_damage = neutral
    if damage_prompts is not None:
        damage = split(list(damage_prompts))
    elif default_damage is not None:
        damage = split(default_damage)
    else:
        damage = (list(behaviour[0].prompts), list(behaviour[1].prompts))
    if generation_metrics is None:
        names = (["vader"] if neutral is not None and data.name == "sentiment" else []) + (
            ["keyword_rate"] if targets is not None else []
        )
    else:
        names = list(generation_metrics)
    scorers = tuple(item for name in names for item in _scorers(name, targets, train))
    return _Plan(behaviour[0], behaviour[1], kl_task(damage[0]), kl_task(damage[1]), scorers)


def _generate_examples(
    model: Any,
    prompts: list[str],
    steering: Steering,
    scorers: Sequence[tuple[str, Scorer]],
    *,
    max_new_tokens: int,
    chat: bool,
) -> tuple[tuple[Example, ...], dict[str, tuple[float, float]]]:
    """Unsteered and steered continuations in one batch (per-row steering), and their scores."""
    if not prompts:
        return (), {}
    k = len(prompts)
    ids = model.generate_ids(
        prompts * 2, steering=[None] * k + [steering] * k, max_new_tokens=max_new_tokens, chat=chat
    )
    texts = [model.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    base, steered = texts[:k], texts[k:]
    scores: dict[str, tuple[float, float]] = {}
    for label, fn in scorers:
        scores[label] = (float(fn(base).double().mean()), float(fn(steered).double().mean()))
    ppl = perplexity(model, prompts * 2, ids, chat=chat)
    scores["perplexity"] = (float(ppl[:k].double().nanmean()), float(ppl[k:].double().nanmean()))
    examples = tuple(Example(p, b, s) for p, b, s in zip(prompts, base, steered, strict=True))
    return examples, scores


def _generic_neutral() -> list[str]:
    from steerlab.data import neutral_prompts

    return neutral_prompts("sentiment")


def _scorers(
    name: str, targets: tuple[list[str], list[str]] | None, train: Any
) -> list[tuple[str, Scorer]]:
    """The generation scorers behind a text metric name, bound to this run's words and texts."""
    if name not in METRICS or METRICS[name].kind != "text":
        text_metrics = sorted(n for n, m in METRICS.items() if m.kind == "text")
        raise InvalidInputError(f"unknown generation metric {name!r}; available: {text_metrics}")
    if name == "keyword_rate":
        if targets is None:
            raise InvalidInputError("keyword_rate needs target and contrast words")
        pos, neg = targets
        return [
            ("keyword_rate[target]", functools.partial(keyword_rate, words=pos)),
            ("keyword_rate[contrast]", functools.partial(keyword_rate, words=neg)),
        ]
    if name == "concept_similarity":
        if not embeddings_available():
            raise InvalidInputError(
                "concept_similarity needs the optional extra: pip install 'steerlab[embeddings]'"
            )
        return [
            (
                "concept_similarity",
                functools.partial(
                    concept_similarity, positive=list(train.positive), negative=list(train.negative)
                ),
            )
        ]
    return [(name, METRICS[name].fn)]
