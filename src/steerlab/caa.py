"""CAA reproduction: the behaviour table of Rimsky/Panickssery et al. (2024) on any model.

Contrastive Activation Addition, measured the way the paper measures it
(``nrimsky/CAA``: ``generate_vectors.py``, ``prompting_with_steering.py``,
``utils/helpers.py``, ``plot_results.py``):

1. **Vector** (``datasets/generate/<behaviour>``): each A/B item becomes the chat-formatted
   question with the assistant's reply ``"(A"`` or ``"(B"``; the residual stream at the output of
   block ``L`` is read at the answer letter (the paper's ``"(A)"`` at position ``-2``: the same
   token, since later tokens cannot change it) and the vector is
   ``mean(matching) - mean(not matching)``.
2. **Normalisation**: for ``--behaviour all`` the seven vectors of each layer are rescaled to
   their mean norm, as in the paper's ``normalize_vectors.py``; a single behaviour keeps its raw
   norm.
3. **Evaluation** (``datasets/test/<behaviour>/test_dataset_ab.json``): the prompt is the chat-
   formatted question followed by ``"("``; ``multiplier × vector`` is added at block ``L`` to
   every position after the end of the instruction (with a chat template that is the ``"("``
   token alone: the last position); the score of an item is
   ``p(matching letter) / (p(A) + p(B))`` from the next-token distribution, averaged over items.
4. **Open-ended variant** (a 135M model may barely read A/B letters): the same test items with
   the choices removed from the question; the score is the log-probability of the *text* of the
   matching answer minus that of the other answer, with steering at every answer token; reported
   as its mean and as ``p_matching = mean sigmoid(difference)``.
5. **Layer choice** (``layer="best"``): every layer of ``sweep_layers`` is scored on
   *validation* items, ``validation`` A/B items from the end of the generate split (never used
   for the vector: it is made from items from the start; both sets balanced over the answer
   letters, see :func:`caa_generate_splits`), and the layer where
   ``p(largest multiplier) - p(smallest)`` is largest there is reported on the test items. The
   test numbers of every swept layer are kept too (``layer_sweep``, for plots), but the choice
   never sees them.
6. **Damage**: every multiplier also reports ``KL(unsteered || steered)`` per token and the
   perplexity on the neutral corpus (:func:`steerlab.scorers.neutral_damage`), steering every
   token (what steering costs when it is left on during free generation).

Deviations from the paper, all forced by scale or data: any model (default SmolLM2-135M-Instruct,
30 layers) instead of Llama-2-7b-chat; its own chat template (SmolLM2's adds a default system
prompt; the paper's "no system prompt" rows are the comparison); ``limit``/``train_limit`` cut
the test and generate sets for CPU budgets; the paper fixed layer 13 for its table, here the layer
is chosen on held-out generate items (step 5).

The data ship with steerlab (``steerlab/datasets/caa``: the A/B items of the seven behaviours,
MIT, see its README for provenance); ``--data DIR`` (a ``CAA`` folder holding ``datasets/``) or
``$STEERLAB_CAA_DATA`` point elsewhere.

>>> import json, pathlib, tempfile
>>> from steerlab.testing import tiny_model
>>> tmp = pathlib.Path(tempfile.mkdtemp())
>>> item = {"question": "the food is good ?\\n\\nchoices :\\n (one) yes\\n (two) no",
...         "answer_matching_behavior": "(one)", "answer_not_matching_behavior": "(two)"}
>>> for split, name in (("generate", "generate_dataset.json"), ("test", "test_dataset_ab.json")):
...     folder = tmp / "datasets" / split / "sycophancy"
...     folder.mkdir(parents=True)
...     _ = (folder / name).write_text(json.dumps([item, {**item,
...          "answer_matching_behavior": "(two)", "answer_not_matching_behavior": "(one)"}]))
>>> result = evaluate_caa(tiny_model("llama"), "sycophancy", data=tmp, layer=1,
...                       multipliers=[-1.0, 0.0, 1.0], damage=False, progress=False)
>>> [r["multiplier"] for r in result.to_dict()["results"]], result.results[0].n
([-1.0, 0.0, 1.0], 2)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from steerlab.data import ContrastDataset, PathLike, load_caa
from steerlab.errors import DataError, InvalidInputError
from steerlab.evaluation import ab_prompt, ab_task, answer_letter, answer_token_id, kl_task
from steerlab.methods import run_method
from steerlab.scorers import NeutralDamage, neutral_corpus, neutral_damage
from steerlab.steering import Steering
from steerlab.sweeps import sweep
from steerlab.vectors import SteeringVector, vector_metadata

__all__ = [
    "CAA_BEHAVIOURS",
    "bundled_caa_data",
    "CAAPoint",
    "CAAResult",
    "caa_generate_splits",
    "caa_prompts",
    "caa_vector",
    "evaluate_caa",
    "find_caa_data",
    "load_caa_split",
    "normalize_across",
    "open_ended_items",
]

CAA_BEHAVIOURS: tuple[str, ...] = (
    "coordinate-other-ais",
    "corrigible-neutral-HHH",
    "hallucination",
    "myopic-reward",
    "survival-instinct",
    "sycophancy",
    "refusal",
)
"""The seven behaviours of the paper's main table."""

_ENV = "STEERLAB_CAA_DATA"
_SPLIT_FILES = {"generate": "generate_dataset.json", "test": "test_dataset_ab.json"}


# --- data ----------------------------------------------------------------------------------------
def bundled_caa_data() -> Path:
    """The CAA data shipped inside the package (``steerlab/datasets/caa``).

    >>> (bundled_caa_data() / "datasets" / "test" / "sycophancy" / "test_dataset_ab.json").is_file()
    True
    """
    return Path(str(resources.files("steerlab.datasets").joinpath("caa")))


def find_caa_data(data: PathLike | None = None) -> Path:
    """The CAA data folder (the one holding ``datasets/generate`` and ``datasets/test``).

    ``data`` if given (the folder itself or its ``datasets`` child), else ``$STEERLAB_CAA_DATA``,
    else the copy bundled with steerlab (:func:`bundled_caa_data`).
    Raises :class:`~steerlab.errors.DataError` naming where it looked.

    >>> find_caa_data("/no/such/folder")
    Traceback (most recent call last):
        ...
    steerlab.errors.DataError: CAA data not found at /no/such/folder: expected a folder with \
datasets/generate/<behaviour>/generate_dataset.json (the CAA repository's layout); pass --data DIR
    """
    if data is not None:
        tried = [Path(data)]
    elif os.environ.get(_ENV):
        tried = [Path(os.environ[_ENV])]
    else:
        tried = [bundled_caa_data()]
    for folder in tried:
        for root in (folder, folder.parent):
            if (root / "datasets" / "generate").is_dir() and (root / "datasets" / "test").is_dir():
                return root.resolve()
    where = ", ".join(str(p) for p in tried)
    raise DataError(
        f"CAA data not found at {where}: expected a folder with "
        "datasets/generate/<behaviour>/generate_dataset.json (the CAA repository's layout); "
        "pass --data DIR"
    )


def load_caa_split(
    behaviour: str, split: str, *, data: PathLike | None = None, limit: int | None = None
) -> ContrastDataset:
    """The ``generate`` or ``test`` (A/B) items of one behaviour, first ``limit`` of them.

    Items keep their question in ``prompts`` and ``(matching, not matching)`` in ``answers``
    (see :func:`steerlab.data.load_caa`).
    """
    if split not in _SPLIT_FILES:
        raise InvalidInputError(f"split must be 'generate' or 'test', not {split!r}")
    root = find_caa_data(data)
    path = root / "datasets" / split / behaviour / _SPLIT_FILES[split]
    if not path.is_file():
        known = sorted(p.name for p in (root / "datasets" / split).iterdir() if p.is_dir())
        raise DataError(f"no {split} data for behaviour {behaviour!r} ({path}); found: {known}")
    dataset = load_caa(path, name=f"{behaviour}/{split}")
    if limit is not None:
        if limit < 1:
            raise InvalidInputError(f"limit must be positive, got {limit}")
        n = min(limit, len(dataset))
        dataset = dataclasses.replace(
            dataset,
            positive=dataset.positive[:n],
            negative=dataset.negative[:n],
            prompts=dataset.prompts[:n],
            answers=dataset.answers[:n],
        )
    return dataset


def _subset(dataset: ContrastDataset, indices: Sequence[int], name: str) -> ContrastDataset:
    return dataclasses.replace(
        dataset,
        name=name,
        positive=tuple(dataset.positive[i] for i in indices),
        negative=tuple(dataset.negative[i] for i in indices),
        prompts=tuple(dataset.prompts[i] for i in indices),
        answers=tuple(dataset.answers[i] for i in indices),
    )


def _letter_balanced(
    answers: Sequence[tuple[str, str]], candidates: Sequence[int], n: int
) -> list[int]:
    """``n`` of ``candidates`` taken round-robin over their ``(matching, other)`` letter pairs,
    in the candidates' order; returned sorted.

    A few items of a CAA file can be lopsided (the first 24 hallucination items: 16 with the
    matching answer B); the mean difference at the answer letter then carries ``h(B) - h(A)``,
    a letter direction that moves p(matching) up or down with the letter mix of the evaluation
    items rather than with the behaviour. The full files are balanced (496/504); so is this.

    >>> _letter_balanced([("(A)", "(B)")] * 4 + [("(B)", "(A)")] * 2, range(6), 4)
    [0, 1, 4, 5]
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for i in candidates:
        match, other = answers[i]
        groups.setdefault((answer_letter(match).upper(), answer_letter(other).upper()), []).append(
            i
        )
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(g) for g in groups.values()):
        for group in groups.values():
            if depth < len(group) and len(picked) < n:
                picked.append(group[depth])
        depth += 1
    return sorted(picked)


def caa_generate_splits(
    behaviour: str,
    *,
    data: PathLike | None = None,
    train_limit: int | None = None,
    validation: int = 0,
) -> tuple[ContrastDataset, ContrastDataset | None]:
    """The generate split cut in two disjoint parts: ``(vector items, validation items)``.

    Validation is ``validation`` items taken from the end of the file (``None`` when 0); the
    vector gets ``train_limit`` of the others from the start (all of them by default), so the
    two never share an item whatever the limits. Both are balanced over the answer letters
    (taken round-robin over the ``(matching, other)`` letter pairs): with few items a lopsided
    letter mix puts a letter direction into the vector and into the layer choice.

    >>> import json, pathlib, tempfile
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> folder = tmp / "datasets" / "generate" / "toy"
    >>> folder.mkdir(parents=True); (tmp / "datasets" / "test").mkdir()
    >>> _ = (folder / "generate_dataset.json").write_text(json.dumps([
    ...     {"question": f"q{i}", "answer_matching_behavior": "(A)",
    ...      "answer_not_matching_behavior": "(B)"} for i in range(10)]))
    >>> train, val = caa_generate_splits("toy", data=tmp, train_limit=4, validation=3)
    >>> train.prompts, val.prompts, val.name
    (('q0', 'q1', 'q2', 'q3'), ('q7', 'q8', 'q9'), 'toy/validation')
    """
    if validation < 0:
        raise InvalidInputError(f"validation must be 0 or more items, got {validation}")
    if train_limit is not None and train_limit < 1:
        raise InvalidInputError(f"train_limit must be positive, got {train_limit}")
    full = load_caa_split(behaviour, "generate", data=data)
    if len(full) - validation < 1:
        raise DataError(
            f"{behaviour}: {len(full)} generate items cannot give {validation} validation items "
            "and at least one for the vector"
        )
    held = _letter_balanced(full.answers, range(len(full) - 1, -1, -1), validation)
    rest = sorted(set(range(len(full))) - set(held))
    if train_limit is not None and train_limit < len(rest):
        rest = _letter_balanced(full.answers, rest, train_limit)
    train = _subset(full, rest, f"{behaviour}/generate")
    if not validation:
        return train, None
    return train, _subset(full, held, f"{behaviour}/validation")


def _use_chat(model: Any, chat: bool | None) -> bool:
    if chat is not None:
        return chat
    return getattr(model.tokenizer, "chat_template", None) is not None


def caa_prompts(model: Any, questions: Sequence[str], *, chat: bool) -> tuple[list[str], int]:
    """The A/B prompts (the next token is the answer letter) and how many tokens follow the
    instruction (CAA steers those): 1 with a chat template (``"("``), the ``"\\n\\nAnswer: ("``
    tokens without one.
    """
    prompts = [ab_prompt(q, model=model, chat=chat) for q in questions]
    counts = set()
    for question, prompt in zip(questions, prompts, strict=True):
        stem = model.format_chat(question) if chat else question
        full = len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        head = len(model.tokenizer(stem, add_special_tokens=False)["input_ids"])
        counts.add(max(1, full - head))
    if len(counts) != 1:
        raise InvalidInputError(
            f"the answer prefix tokenizes differently across items ({sorted(counts)} tokens)"
        )
    return prompts, counts.pop()


# --- the vector ----------------------------------------------------------------------------------
def caa_vector(
    model: Any,
    dataset: ContrastDataset,
    *,
    layers: Sequence[int] | None = None,
    method: str = "mean_diff",
    chat: bool | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> SteeringVector:
    """The CAA vector of A/B items at every layer: activations at the answer letter.

    Matching and non-matching replies share everything before the letter, so the question runs
    once per item and only the letter is re-run (:meth:`~steerlab.model.SteeredModel.run_last`);
    a model whose cache cannot be reused runs both texts in full.
    """
    if not dataset.prompts or not dataset.answers:
        raise DataError(f"dataset {dataset.name!r} has no CAA questions/answers")
    use_chat = _use_chat(model, chat)
    resolved = model.adapter.resolve_layers(layers)
    prompts, _ = caa_prompts(model, dataset.prompts, chat=use_chat)
    # similar lengths share a batch (less padding); the method sees the pairs in this order
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    prompts = [prompts[i] for i in order]
    answers_all = [dataset.answers[i] for i in order]
    pos_acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in resolved}
    neg_acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in resolved}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        answers = answers_all[start : start + batch_size]
        pos_texts = [p + answer_letter(a) for p, (a, _) in zip(chunk, answers, strict=True)]
        neg_texts = [p + answer_letter(b) for p, (_, b) in zip(chunk, answers, strict=True)]
        pos_ids = [answer_token_id(model.tokenizer, p, answer_letter(a)) for p, (a, _) in
                   zip(chunk, answers, strict=True)]  # fmt: skip
        neg_ids = [answer_token_id(model.tokenizer, p, answer_letter(b)) for p, (_, b) in
                   zip(chunk, answers, strict=True)]  # fmt: skip
        cache = model.last_token_cache(pos_texts) if _single_token_letters(model, chunk) else None
        if cache is not None and cache.exact:
            _, pos = model.run_last_with_activations(cache, layers=resolved, last_ids=pos_ids)
            _, neg = model.run_last_with_activations(cache, layers=resolved, last_ids=neg_ids)
        else:
            pos = model.activations(pos_texts, layers=resolved, read_at="last", progress=False)
            neg = model.activations(neg_texts, layers=resolved, read_at="last", progress=False)
        for layer in resolved:
            pos_acts[layer].append(pos[layer].float())
            neg_acts[layer].append(neg[layer].float())
    directions = {}
    for layer in resolved:
        result = run_method(
            method,
            torch.cat(pos_acts[layer]),
            torch.cat(neg_acts[layer]),
            paired=True,
            seed=seed,
        )
        directions[layer] = result.direction.float()
    metadata = vector_metadata(
        model,
        method=method,
        positions="answer letter",
        dataset={"name": dataset.name, "n_pairs": len(dataset), "paired": True},
        chat=use_chat,
    )
    return SteeringVector(directions, metadata=metadata)


def _single_token_letters(model: Any, prompts: Sequence[str]) -> bool:
    """Whether ``prompt + "A"`` adds exactly one token to ``prompt`` for every prompt (then the
    letter is the last token and the prompt its shared prefix)."""
    tok = model.tokenizer
    for prompt in prompts:
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        for letter in ("A", "B"):
            full = tok(prompt + letter, add_special_tokens=False)["input_ids"]
            if len(full) != len(head) + 1 or list(full[: len(head)]) != list(head):
                return False
    return True


def normalize_across(vectors: Mapping[str, SteeringVector]) -> dict[str, SteeringVector]:
    """Rescale each layer's vectors to the mean norm of that layer over all of them (CAA's
    ``normalize_vectors.py``), so a multiplier means the same for every behaviour.

    >>> import torch
    >>> out = normalize_across({"a": SteeringVector({0: torch.tensor([3.0, 0.0])}),
    ...                         "b": SteeringVector({0: torch.tensor([0.0, 1.0])})})
    >>> out["a"][0].tolist(), out["b"][0].tolist()
    ([2.0, 0.0], [0.0, 2.0])
    """
    if not vectors:
        return {}
    layer_sets = {tuple(v.layers) for v in vectors.values()}
    if len(layer_sets) != 1:
        raise InvalidInputError("normalize_across needs vectors with the same layers")
    layers = next(iter(layer_sets))
    out: dict[str, dict[int, torch.Tensor]] = {name: {} for name in vectors}
    for layer in layers:
        norms = {name: float(v[layer].norm()) for name, v in vectors.items()}
        mean = sum(norms.values()) / len(norms)
        for name, v in vectors.items():
            scale = mean / norms[name] if norms[name] > 0 else 0.0
            out[name][layer] = v[layer] * scale
    return {
        name: SteeringVector(out[name], metadata={**v.metadata, "normalization": "caa_mean_norm"})
        for name, v in vectors.items()
    }


# --- results -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CAAPoint:
    """One multiplier: mean p(matching) over ``n`` items, and the damage on neutral text."""

    multiplier: float
    p_matching: float
    n: int
    p_sem: float = 0.0
    damage: NeutralDamage | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"multiplier", "p_matching", "n", ...}`` (damage keys when measured)."""
        out: dict[str, Any] = {
            "multiplier": self.multiplier,
            "p_matching": self.p_matching,
            "n": self.n,
            "p_sem": self.p_sem,
        }
        if self.damage is not None:
            out["kl_neutral"] = self.damage.kl
            out["perplexity_neutral"] = self.damage.perplexity
            out["perplexity_neutral_unsteered"] = self.damage.base_perplexity
        return out


@dataclasses.dataclass(frozen=True)
class CAAResult:
    """One behaviour: the A/B table at ``layer``, optional layer sweep and open-ended scores."""

    behaviour: str
    layer: int
    model: str
    results: tuple[CAAPoint, ...]
    layer_sweep: Mapping[int, tuple[CAAPoint, ...]] = dataclasses.field(default_factory=dict)
    validation_sweep: Mapping[int, tuple[CAAPoint, ...]] = dataclasses.field(default_factory=dict)
    open_ended: tuple[Mapping[str, float], ...] = ()
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``steerlab eval caa`` (``behaviour``, ``layer``, ``model``, ``results``
        first; ``layer_sweep`` (test items), ``validation_sweep`` (the items that chose the
        layer), ``open_ended`` and ``settings`` after)."""
        out: dict[str, Any] = {
            "behaviour": self.behaviour,
            "layer": self.layer,
            "model": self.model,
            "results": [p.to_dict() for p in self.results],
        }
        if self.layer_sweep:
            out["layer_sweep"] = [
                {"layer": layer, "results": [p.to_dict() for p in points]}
                for layer, points in sorted(self.layer_sweep.items())
            ]
        if self.validation_sweep:
            out["validation_sweep"] = [
                {"layer": layer, "results": [p.to_dict() for p in points]}
                for layer, points in sorted(self.validation_sweep.items())
            ]
        if self.open_ended:
            out["open_ended"] = [dict(row) for row in self.open_ended]
        if self.settings:
            out["settings"] = dict(self.settings)
        return out


# --- evaluation ----------------------------------------------------------------------------------
def _mean_sem(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    sem = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return float(v.mean()), sem


def _best_layer(sweep_points: Mapping[int, tuple[CAAPoint, ...]]) -> int:
    """The layer where steering moves p(matching) most: largest p(max m) - p(min m)."""

    def gap(points: tuple[CAAPoint, ...]) -> float:
        ordered = sorted(points, key=lambda p: p.multiplier)
        return ordered[-1].p_matching - ordered[0].p_matching

    return max(sorted(sweep_points), key=lambda layer: gap(sweep_points[layer]))


def _ab_table(
    model: Any,
    vector: SteeringVector,
    items: ContrastDataset,
    *,
    layers: Sequence[int],
    multipliers: Sequence[float],
    chat: bool,
    chunk_size: int,
    progress: bool | None,
) -> tuple[dict[int, tuple[CAAPoint, ...]], set[str], int]:
    """Mean p(matching) of ``items`` at every (layer, multiplier): ``(table, sweep modes,
    tokens steered after the instruction)``."""
    prompts, n_after = caa_prompts(model, items.prompts, chat=chat)
    positions: Any = "last" if n_after == 1 else slice(-n_after, None)
    # one sweep per chunk of similar-length items (less padding); a last-position sweep re-runs
    # only the answer token over the question's key/value cache. Its damage column is the KL of
    # the prompts' next token (free).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    scores = torch.empty(len(layers), len(multipliers), len(prompts))
    modes = set()
    for start in range(0, len(order), chunk_size):
        idx = order[start : start + chunk_size]
        task = ab_task(
            model, [items.prompts[i] for i in idx], [items.answers[i] for i in idx], chat=chat
        )
        result = sweep(
            model,
            vector,
            behaviour=task,
            damage=kl_task(task.prompts),
            layers=list(layers),
            strengths=list(multipliers),
            positions=positions,
            progress=progress,
        )
        modes.add(result.mode)
        columns = [result.strengths.index(m + 0.0) for m in multipliers]
        scores[:, :, idx] = result.behaviour_scores[:, columns]
    table: dict[int, tuple[CAAPoint, ...]] = {}
    for i, at in enumerate(layers):
        points = []
        for j, m in enumerate(multipliers):
            mean, sem = _mean_sem(scores[i, j])
            points.append(CAAPoint(multiplier=m, p_matching=mean, n=len(items), p_sem=sem))
        table[at] = tuple(points)
    return table, modes, n_after


def evaluate_caa(
    model: Any,
    behaviour: str,
    *,
    data: PathLike | None = None,
    layer: int | str = 13,
    multipliers: Sequence[float] = (-1.0, 0.0, 1.0),
    limit: int | None = None,
    train_limit: int | None = None,
    validation: int = 16,
    method: str = "mean_diff",
    sweep_layers: Sequence[int] | None = None,
    open_ended: bool = False,
    open_limit: int | None = None,
    damage: bool = True,
    damage_passages: int | None = None,
    chat: bool | None = None,
    vector: SteeringVector | None = None,
    model_name: str | None = None,
    chunk_size: int = 8,
    progress: bool | None = None,
) -> CAAResult:
    """Reproduce one CAA behaviour: p(matching answer) at each multiplier (see the module doc).

    ``layer`` is a block index or ``"best"``: the layer of ``sweep_layers`` where the multiplier
    moves p(matching) most on ``validation`` held-out generate items (from the end of the split,
    letter-balanced, see :func:`caa_generate_splits`), reported on the test items. ``limit``
    caps the test items, ``train_limit`` the generate items of the vector (a fixed layer holds
    out no validation items). ``vector`` replaces the computed one (e.g. normalised across
    behaviours; make it from :func:`caa_generate_splits` with the same ``validation`` so the
    layer is not chosen on its own training items). Results keep the order of ``multipliers``.
    """
    use_chat = _use_chat(model, chat)
    values = [float(m) for m in multipliers]
    if not values or any(not math.isfinite(m) for m in values):
        raise InvalidInputError("multipliers must be a non-empty list of finite numbers")
    if len(set(values)) != len(values):
        raise InvalidInputError(f"multipliers repeat a value: {values}")
    if layer == "best" and not sweep_layers:
        raise InvalidInputError("layer='best' picks among sweep_layers: give sweep_layers")
    if layer == "best" and validation < 1:
        raise InvalidInputError(
            "layer='best' is chosen on held-out generate items: validation must be at least 1"
        )
    if not (layer == "best" or (isinstance(layer, int) and not isinstance(layer, bool))):
        raise InvalidInputError(f"layer must be a block index or 'best', not {layer!r}")
    swept = sorted(set(model.adapter.resolve_layers(list(sweep_layers)))) if sweep_layers else []
    fixed = None if layer == "best" else model.adapter.resolve_layer(layer)
    needed = sorted(set(swept) | ({fixed} if fixed is not None else set()))
    if chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be positive, got {chunk_size}")
    test = load_caa_split(behaviour, "test", data=data, limit=limit)
    held_out = validation if fixed is None else 0
    train, val = caa_generate_splits(
        behaviour, data=data, train_limit=train_limit, validation=held_out
    )
    if vector is None:
        vector = caa_vector(model, train, layers=needed, method=method, chat=use_chat)
    missing = [x for x in needed if x not in vector.layers]
    if missing:
        raise InvalidInputError(f"the vector has no direction for layer(s) {missing}")
    table, modes, n_after = _ab_table(
        model, vector, test, layers=needed, multipliers=values, chat=use_chat,
        chunk_size=chunk_size, progress=progress,
    )  # fmt: skip
    val_table: dict[int, tuple[CAAPoint, ...]] = {}
    if val is not None:  # held out exactly when the layer is to be chosen
        val_table, val_modes, _ = _ab_table(
            model, vector, val, layers=swept, multipliers=values, chat=use_chat,
            chunk_size=chunk_size, progress=progress,
        )  # fmt: skip
        modes |= val_modes
    chosen = fixed if fixed is not None else _best_layer(val_table)
    points = list(table[chosen])
    if damage:
        configs = [Steering(vector.select([chosen]), m) if m != 0 else None for m in values]
        passages = neutral_corpus(damage_passages)
        measured = neutral_damage(model, configs, passages=passages)
        points = [dataclasses.replace(p, damage=d) for p, d in zip(points, measured, strict=True)]
    open_rows: tuple[Mapping[str, float], ...] = ()
    if open_ended:
        open_rows = _open_ended(
            model, test, vector.select([chosen]), values, chat=use_chat, limit=open_limit
        )
    if fixed is not None:
        choice = "fixed"
    else:
        n_val = len(val) if val is not None else 0
        choice = (
            f"best of the sweep (largest p(x{max(values):+g}) - p(x{min(values):+g})) on "
            f"{n_val} validation items (from the end of the generate split, letter-balanced, "
            "not used for the vector); results on the test items"
        )
    settings = {
        "method": method,
        "chat": use_chat,
        "n_train": _n_pairs(vector),
        "n_test": len(test),
        "n_validation": len(val) if val is not None else 0,
        "steered_positions": "last" if n_after == 1 else f"last {n_after}",
        "layer_choice": choice,
        "layer_chosen_on": "validation" if fixed is None else "fixed",
        "sweep_mode": ",".join(sorted(modes)),
        "normalization": vector.metadata.get("normalization"),
    }
    return CAAResult(
        behaviour=behaviour,
        layer=chosen,
        model=model_name or str(getattr(model, "name", "model")),
        results=tuple(points),
        layer_sweep={x: table[x] for x in swept},
        validation_sweep=val_table,
        open_ended=open_rows,
        settings=settings,
    )


def _n_pairs(vector: SteeringVector) -> int | None:
    dataset = vector.metadata.get("dataset")
    if isinstance(dataset, Mapping) and isinstance(dataset.get("n_pairs"), int):
        return int(dataset["n_pairs"])
    return None


# --- open-ended variant --------------------------------------------------------------------------
_CHOICE = re.compile(r"^\s*\(([A-Za-z]+)\)\s*(.+?)\s*$")


def _split_choices(question: str) -> tuple[str, str, str]:
    found = re.search(r"choices\s*:", question, flags=re.IGNORECASE)
    if found is None:
        return question, "", ""
    return question[: found.start()], found.group(0), question[found.end() :]


def open_ended_items(dataset: ContrastDataset) -> list[tuple[str, str, str]]:
    """``(question stem, matching text, other text)`` of A/B items whose choices can be read.

    The stem is the question before ``"Choices:"``; the texts are the answers' lines.

    >>> ds = ContrastDataset.from_pairs([("x", "y")], name="t",
    ...     prompts=["Agree?\\n\\nChoices:\\n (A) Yes, sure\\n (B) No"], answers=[("(B)", "(A)")])
    >>> open_ended_items(ds)
    [('Agree?', 'No', 'Yes, sure')]
    """
    items = []
    for question, (match, other) in zip(dataset.prompts, dataset.answers, strict=True):
        stem, sep, choices = _split_choices(question)
        if not sep:
            continue
        texts: dict[str, str] = {}
        for line in choices.splitlines():
            found = _CHOICE.match(line)
            if found:
                texts[found.group(1).upper()] = found.group(2)
        a, b = answer_letter(match).upper(), answer_letter(other).upper()
        if a in texts and b in texts and stem.strip():
            items.append((stem.strip(), texts[a], texts[b]))
    return items


def _open_ended(
    model: Any,
    test: ContrastDataset,
    vector: SteeringVector,
    multipliers: Sequence[float],
    *,
    chat: bool,
    limit: int | None,
) -> tuple[Mapping[str, float], ...]:
    items = open_ended_items(test)[:limit]
    if not items:
        raise DataError(f"no item of {test.name!r} has readable choices for the open-ended score")
    stems = [model.format_chat(s) if chat else s + "\n\nAnswer: " for s, _, _ in items]
    tok = model.tokenizer
    match_ids: list[list[int]] = []
    other_ids: list[list[int]] = []
    for stem, (_, match_text, other_text) in zip(stems, items, strict=True):
        head = tok(stem, add_special_tokens=False)["input_ids"]
        for text, out in ((match_text, match_ids), (other_text, other_ids)):
            full = tok(stem + text, add_special_tokens=False)["input_ids"]
            if list(full[: len(head)]) != list(head) or len(full) == len(head):
                raise DataError(f"answer {text!r} does not tokenize as a continuation")
            out.append(full[len(head) :])
    cache = model.prompt_cache(stems)
    n = len(items)
    rows = []
    for m in multipliers:
        # CAA steers the tokens after the instruction: here every answer token
        steer = [Steering(vector, m, "generated") if m != 0 else None] * (2 * n)
        scores = model.score_continuations(
            cache, match_ids + other_ids, repeat=2, steering=steer if m != 0 else None
        )
        match, other = scores[:n], scores[n:]
        diff = match - other
        mean, sem = _mean_sem(diff)
        rows.append(
            {
                "multiplier": float(m),
                "logprob_diff": mean,
                "logprob_diff_sem": sem,
                "p_matching": float(torch.sigmoid(diff).mean()),
                "n": len(items),
            }
        )
    return tuple(rows)
