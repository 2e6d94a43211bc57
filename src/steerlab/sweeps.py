"""Sweeps: find the layer and the strength, then prove the effect on held-out prompts.

The seed's best practices (middle-to-late layers, start small and increase the strength,
validate on diverse prompts) become one measured procedure, :func:`tune`:

1. split the contrastive dataset (and the evaluation prompts) into train and held-out parts,
   explicitly and reproducibly (``seed``);
2. compute the vector at every candidate layer from the *train* pairs (one extraction pass);
3. :func:`sweep` layer × strength on the train prompts, scoring a behaviour metric and a
   damage metric (``KL(unsteered || steered)`` on neutral text) at every point;
4. recommend the point with the highest behaviour whose mean KL stays within the budget
   (strength 0, the unsteered model, is always within it);
5. evaluate that point on the held-out prompts, and generate examples there, baseline and
   steered side by side. These numbers are reported separately from the train numbers.

A sweep is fast by construction. All strengths (and any set of vectors) of one layer run as rows
of one batch through per-row steering; in ``mode="prefix"`` (default) the unsteered prompts run
once, the inputs of every block from the lowest swept layer up are kept
(:meth:`~steerlab.model.SteeredModel.prefix_cache`), and each layer's batch re-runs only the
blocks from that layer on (:meth:`~steerlab.model.SteeredModel.run_from`). ``mode="batched"``
(per-row batches, full forward passes) and ``mode="naive"`` (one configuration per forward pass)
compute the same numbers more slowly; the tests hold all three equal. When every configuration
steers only the last prompt position (``positions="last"`` or ``-1``: the seed's ``[:, -1]``,
CAA's answer token), ``"prefix"`` becomes ``"last"``: the unsteered prompts run once with a
key/value cache (:meth:`~steerlab.model.SteeredModel.last_token_cache`) and each configuration
re-runs only the last token over it (:meth:`~steerlab.model.SteeredModel.run_last`), since
nothing before the steered position can change.

>>> import torch, steerlab as sl
>>> from steerlab.evaluation import concept_task
>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> vec = sl.mean_diff(model, ["i love it", "so happy"], ["i hate it", "so sad"], layers=[0, 1])
>>> task = concept_task(model, ["the movie was", "the day was"],
...                     target_words=[" good"], contrast_words=[" bad"])
>>> result = sweep(model, vec, behaviour=task, strengths=[1.0, 4.0], progress=False)
>>> result.layers, result.strengths
((0, 1), (0.0, 1.0, 4.0))
>>> result.recommend(max_damage=10.0).layer in (0, 1)
True
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from steerlab.deprecation import renamed_keyword
from steerlab.errors import DataError, InvalidInputError, VectorMismatchError
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
from steerlab.interventions import Steering
from steerlab.positions import Positions
from steerlab.progress import progress_bar
from steerlab.replay import LastTokenCache, PrefixCache
from steerlab.report import write_report
from steerlab.vectors import SteeringVector

__all__ = [
    "DEFAULT_MAX_KL",
    "DEFAULT_STRENGTHS",
    "MODES",
    "Example",
    "HeldOutResult",
    "SweepPoint",
    "SweepResult",
    "TuneResult",
    "compare",
    "compare_operators",
    "default_layers",
    "operator_table",
    "split_prompts",
    "steers_last_only",
    "sweep",
    "tune",
]

MODES = ("prefix", "last", "batched", "naive")
DEFAULT_STRENGTHS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
"""Multipliers of the raw (un-normalised) vector; 0 is the unsteered model."""
DEFAULT_MAX_KL = 0.5
"""Default damage budget: mean ``KL(unsteered || steered)`` in nats per next token."""


# --- results -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One (layer, strength) of a sweep: means over the prompts.

    ``shift`` is ``behaviour`` minus the unsteered behaviour on the same prompts;
    ``behaviour_sem`` the standard error of the mean of the per-prompt shifts (paired).
    """

    layer: int
    strength: float
    behaviour: float
    shift: float
    behaviour_sem: float
    damage: float
    damage_max: float

    def to_dict(self) -> dict[str, float | int]:
        """The point as a flat dict (JSON/CSV row)."""
        return dataclasses.asdict(self)


def _sem(values: torch.Tensor) -> float:
    n = values.numel()
    if n < 2:
        return 0.0
    return float(values.double().std(unbiased=True) / math.sqrt(n))


@dataclasses.dataclass(frozen=True, eq=False)
class SweepResult:
    """Every point of a layer × strength sweep, with the per-prompt scores behind them.

    ``behaviour_scores[i, j]`` holds the behaviour metric of every behaviour prompt at
    ``(layers[i], strengths[j])``; ``damage_scores`` likewise for the damage prompts.
    ``strengths`` always contains 0.0 (the unsteered model).
    """

    layers: tuple[int, ...]
    strengths: tuple[float, ...]
    behaviour_scores: torch.Tensor
    damage_scores: torch.Tensor
    behaviour_metric: str
    damage_metric: str
    mode: str
    seconds: float
    op: str = "add"

    @property
    def baseline(self) -> float:
        """Mean unsteered behaviour (strength 0)."""
        return float(self.behaviour_scores[0, self.strengths.index(0.0)].double().mean())

    @functools.cached_property
    def points(self) -> tuple[SweepPoint, ...]:
        """All points, layer-major, strengths ascending."""
        zero = self.strengths.index(0.0)
        points = []
        for i, layer in enumerate(self.layers):
            for j, strength in enumerate(self.strengths):
                beh = self.behaviour_scores[i, j].double()
                shifts = beh - self.behaviour_scores[i, zero].double()
                dmg = self.damage_scores[i, j].double()
                points.append(
                    SweepPoint(
                        layer=layer,
                        strength=strength,
                        behaviour=float(beh.mean()),
                        shift=float(shifts.mean()),
                        behaviour_sem=_sem(shifts),
                        damage=float(dmg.mean()),
                        damage_max=float(dmg.max()),
                    )
                )
        return tuple(points)

    def point(self, layer: int, strength: float) -> SweepPoint:
        """The point at ``(layer, strength)``."""
        if layer in self.layers and float(strength) in self.strengths:
            index = self.layers.index(layer) * len(self.strengths)
            return self.points[index + self.strengths.index(float(strength))]
        raise InvalidInputError(f"no point at layer {layer}, strength {strength} in this sweep")

    def grid(self, field: str = "shift") -> torch.Tensor:
        """``Tensor[len(layers), len(strengths)]`` of one :class:`SweepPoint` field."""
        names = {f.name for f in dataclasses.fields(SweepPoint)} - {"layer", "strength"}
        if field not in names:
            raise InvalidInputError(f"field must be one of {sorted(names)}, not {field!r}")
        values = [getattr(p, field) for p in self.points]
        return torch.tensor(values, dtype=torch.float64).reshape(
            len(self.layers), len(self.strengths)
        )

    def recommend(self, *, max_damage: float) -> SweepPoint:
        """The point with the highest mean behaviour whose mean damage is within ``max_damage``.

        Ties go to the smaller ``|strength|``, then the lower layer. Strength 0 (the unsteered
        model, damage 0) is always within budget, so there is always an answer.
        """
        if not math.isfinite(max_damage) or max_damage < 0:
            raise InvalidInputError(f"max_damage must be a non-negative number, got {max_damage}")
        feasible = [p for p in self.points if p.damage <= max_damage]
        if not feasible:  # only if a damage metric is non-zero unsteered
            raise InvalidInputError(f"no point of the sweep has damage <= {max_damage}")
        return max(feasible, key=lambda p: (p.behaviour, -abs(p.strength), -p.layer))

    def table(
        self, *, max_damage: float | None = None, recommended: SweepPoint | None = None
    ) -> str:
        """A text table: one row per layer, ``shift/damage`` per strength.

        ``!`` marks points over the damage budget, ``*`` the recommended point.
        """
        if recommended is None and max_damage is not None:
            recommended = self.recommend(max_damage=max_damage)
        cells = [[""] + [f"s={s:g}" for s in self.strengths]]
        for layer in self.layers:
            row = [f"layer {layer}"]
            for strength in self.strengths:
                p = self.point(layer, strength)
                mark = " "
                if recommended is not None and (p.layer, p.strength) == (
                    recommended.layer,
                    recommended.strength,
                ):
                    mark = "*"
                elif max_damage is not None and p.damage > max_damage:
                    mark = "!"
                row.append(f"{p.shift:+.3f}/{p.damage:.3f}{mark}")
            cells.append(row)
        widths = [max(len(r[k]) for r in cells) for k in range(len(cells[0]))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
        legend = f"cells: behaviour shift ({self.behaviour_metric}) / damage ({self.damage_metric})"
        if max_damage is not None:
            legend += f"; ! over the budget {max_damage:g}; * recommended"
        return "\n".join([legend, *lines])

    def to_records(self) -> list[dict[str, float | int]]:
        """Every point as a dict."""
        return [p.to_dict() for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        """Settings, every point and the per-prompt scores, JSON-ready."""
        return {
            "layers": list(self.layers),
            "strengths": list(self.strengths),
            "behaviour_metric": self.behaviour_metric,
            "damage_metric": self.damage_metric,
            "mode": self.mode,
            "op": self.op,
            "seconds": self.seconds,
            "baseline": self.baseline,
            "points": self.to_records(),
            "behaviour_scores": self.behaviour_scores.tolist(),
            "damage_scores": self.damage_scores.tolist(),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON; returns the path."""
        target = Path(path)
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return target

    def to_csv(self, path: str | Path) -> Path:
        """Write one CSV row per point; returns the path."""
        target = Path(path)
        fields = [f.name for f in dataclasses.fields(SweepPoint)]
        with target.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.to_records())
        return target


# --- the sweep ---------------------------------------------------------------------------------
def _layer_direction(vector: SteeringVector, layer: int) -> SteeringVector:
    if layer in vector.layers:
        return vector.select([layer])
    if len(vector.layers) == 1:
        return SteeringVector(
            {layer: vector[vector.layers[0]]}, metadata=vector.metadata, extras=vector.extras
        )
    raise VectorMismatchError(
        f"the vector has no direction for layer {layer} (it has {vector.layers}); a sweep uses "
        f"each layer's own direction, or one single-layer vector at every layer"
    )


def _check_strengths(strengths: Sequence[float]) -> tuple[float, ...]:
    if isinstance(strengths, (str, bytes)) or not isinstance(strengths, Sequence):
        raise InvalidInputError("strengths must be a list of numbers")
    values = set()
    for s in strengths:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise InvalidInputError(f"every strength must be a finite number, got {s!r}")
        values.add(float(s) + 0.0)  # + 0.0 turns -0.0 into 0.0
    values.add(0.0)
    return tuple(sorted(values))


def _merge_prompts(
    first: Sequence[str], second: Sequence[str]
) -> tuple[list[str], list[int], list[int]]:
    prompts = list(dict.fromkeys([*first, *second]))
    where = {p: i for i, p in enumerate(prompts)}
    return prompts, [where[p] for p in first], [where[p] for p in second]


def _cache_at(cache: PrefixCache, layer: int) -> PrefixCache:
    """The prefix cache of a lower layer re-rooted at ``layer`` (inputs of every block kept)."""
    if layer == cache.layer:
        return cache
    args, kwargs = cache.block_inputs[layer]
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return dataclasses.replace(cache, layer=layer, hidden=hidden)


def sweep(
    model: Any,
    vector: SteeringVector,
    *,
    behaviour: NextTokenTask,
    damage: NextTokenTask | None = None,
    layers: Sequence[int] | None = None,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    positions: Any = "all",
    mode: str = "prefix",
    max_rows: int = 128,
    chat: bool = False,
    progress: bool | None = None,
    op: str | None = None,
) -> SweepResult:
    """Score ``behaviour`` and ``damage`` at every (layer, strength).

    At layer ``L`` the model is steered with ``strength × vector[L]`` added to the output of
    block ``L`` at ``positions`` (a single-layer vector is used at every layer), or with the
    operator ``op`` (:mod:`steerlab.operators`; strength 0 is always the unsteered model, for
    every operator). ``damage``
    defaults to ``KL(unsteered || steered)`` on the behaviour prompts. Strength 0 is always
    included. ``mode`` is ``"prefix"`` (batched rows + prefix reuse, default), ``"batched"``
    (per-row batches, full forward passes) or ``"naive"`` (one configuration per pass); all
    three give the same numbers. With ``positions="last"`` (or ``-1``) ``"prefix"`` runs as
    ``"last"``: only the last token is re-run per configuration, over a key/value cache. At
    most ``max_rows`` prompt rows go in one batch.

    >>> import torch, steerlab as sl
    >>> from steerlab.evaluation import kl_task
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    >>> r = sweep(model, vec, behaviour=kl_task(["the cat"]), strengths=[2.0], progress=False)
    >>> r.point(1, 0.0).behaviour, r.point(1, 2.0).behaviour > 0
    (0.0, True)
    """
    start_time = time.perf_counter()
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {MODES}, not {mode!r}")
    if not isinstance(vector, SteeringVector):
        raise InvalidInputError(f"vector must be a SteeringVector, got {type(vector).__name__}")
    if not isinstance(behaviour, NextTokenTask):
        raise InvalidInputError("behaviour must be a NextTokenTask (see steerlab.evaluation)")
    if max_rows < 1:
        raise InvalidInputError(f"max_rows must be positive, got {max_rows}")
    damage = damage if damage is not None else kl_task(behaviour.prompts)
    resolved = model.adapter.resolve_layers(list(vector.layers) if layers is None else layers)
    resolved = sorted(dict.fromkeys(resolved))
    directions = {layer: _layer_direction(vector, layer) for layer in resolved}
    values = _check_strengths(strengths)
    configs = [
        Steering(directions[layer], s, positions, op=op) if s != 0.0 else None
        for layer in resolved
        for s in values
    ]
    op_name = (
        "add"
        if not configs or all(c is None for c in configs)
        else next(c.resolved_op for c in configs if c is not None)
    )
    beh, dmg, used = _score_configs(
        model,
        configs,
        behaviour=behaviour,
        damage=damage,
        mode=mode,
        max_rows=max_rows,
        chat=chat,
        progress=progress,
        desc="sweep",
    )
    shape = (len(resolved), len(values))
    return SweepResult(
        layers=tuple(resolved),
        strengths=values,
        behaviour_scores=beh.reshape(*shape, -1),
        damage_scores=dmg.reshape(*shape, -1),
        behaviour_metric=behaviour.label,
        damage_metric=damage.label,
        mode=used,
        seconds=time.perf_counter() - start_time,
        op=op_name,
    )


def compare_operators(
    model: Any,
    vector: SteeringVector,
    *,
    ops: Sequence[str] = ("add", "add_norm", "clamp"),
    behaviour: NextTokenTask,
    damage: NextTokenTask | None = None,
    layers: Sequence[int] | None = None,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    positions: Any = "all",
    mode: str = "prefix",
    chat: bool = False,
    progress: bool | None = None,
) -> dict[str, SweepResult]:
    """One :func:`sweep` per operator on the same vector, prompts and grid: ``{op: result}``.

    Read the results side by side with :func:`operator_table`.

    >>> import torch, steerlab as sl
    >>> from steerlab.evaluation import kl_task
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    >>> results = compare_operators(model, vec, ops=["add", "clamp"], strengths=[1.0],
    ...                             behaviour=kl_task(["the cat"]), progress=False)
    >>> sorted(results), results["clamp"].op
    (['add', 'clamp'], 'clamp')
    """
    from steerlab.operators import get_operator

    names = [get_operator(op).name for op in ops]
    if not names or len(set(names)) != len(names):
        raise InvalidInputError(f"ops must be distinct operator names, got {list(ops)}")
    return {
        name: sweep(
            model,
            vector,
            behaviour=behaviour,
            damage=damage,
            layers=layers,
            strengths=strengths,
            positions=positions,
            mode=mode,
            chat=chat,
            progress=progress,
            op=name,
        )
        for name in names
    }


def operator_table(results: Mapping[str, SweepResult], *, max_damage: float) -> str:
    """One line per operator: its recommended (layer, strength), behaviour shift and damage.

    >>> import torch, steerlab as sl
    >>> from steerlab.evaluation import kl_task
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    >>> results = compare_operators(model, vec, ops=["add", "cap"], strengths=[1.0],
    ...                             behaviour=kl_task(["the cat"]), progress=False)
    >>> operator_table(results, max_damage=100.0).splitlines()[0].split()[:3]
    ['op', 'layer', 'strength']
    """
    rows = [("op", "layer", "strength", "behaviour", "shift", "damage")]
    for name, result in results.items():
        best = result.recommend(max_damage=max_damage)
        rows.append(
            (
                name,
                str(best.layer),
                f"{best.strength:g}",
                f"{best.behaviour:.4f}",
                f"{best.shift:+.4f}",
                f"{best.damage:.4f}",
            )
        )
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _score_configs(
    model: Any,
    configs: Sequence[Steering | None],
    *,
    behaviour: NextTokenTask,
    damage: NextTokenTask,
    mode: str,
    max_rows: int,
    chat: bool,
    progress: bool | None,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Per-prompt behaviour ``[C, n]`` and damage ``[C, m]`` of every configuration.

    ``None`` is the unsteered model (free: its logits are the baseline). In ``"prefix"`` mode
    the prompts run once up to the lowest steered layer; configurations are grouped by their
    lowest steered layer and each group re-runs only the blocks from there, ``max_rows``
    prompt rows per batch. Returns the mode actually used.
    """
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {MODES}, not {mode!r}")
    if max_rows < 1:
        raise InvalidInputError(f"max_rows must be positive, got {max_rows}")
    # layer_deltas validates every vector against the model before any forward pass
    lowest = [None if c is None else min(c.layer_deltas(model.adapter)) for c in configs]
    prompts, beh_rows, dmg_rows = _merge_prompts(behaviour.prompts, damage.prompts)
    n = len(prompts)
    steered_layers = sorted({layer for layer in lowest if layer is not None})
    last_only = all(c is None or steers_last_only(c) for c in configs)
    if mode == "last" and not last_only:
        raise InvalidInputError(
            "mode='last' re-runs only the last prompt token, so every configuration must steer "
            "positions='last' (or -1) alone; use mode='prefix' for other positions"
        )
    if mode == "prefix" and last_only and steered_layers:
        mode = "last"
    if mode == "last" and steered_layers:
        last = model.last_token_cache(prompts, chat=chat)
        if last.exact:
            return _score_last(model, configs, last, behaviour, damage, max_rows, progress, desc)
        warnings.warn(
            "re-running the last token over the key/value cache does not reproduce this "
            "model's forward pass; using prefix replay instead (mode='prefix')",
            stacklevel=3,
        )
        mode = "prefix"
    if mode == "last":  # nothing steered at all
        mode = "prefix"
    cache: PrefixCache | None = None
    if mode == "prefix" and steered_layers:
        cache = model.prefix_cache(prompts, layer=steered_layers[0], chat=chat)
        if not cache.exact:
            warnings.warn(
                "prefix replay does not reproduce this model's forward pass; using full "
                "forward passes instead (mode='batched')",
                stacklevel=3,
            )
            cache, mode = None, "batched"
    base = cache.logits if cache is not None else model.next_token_logits(prompts, chat=chat)
    beh = torch.empty(len(configs), len(beh_rows))
    dmg = torch.empty(len(configs), len(dmg_rows))

    def record(index: int, logits: torch.Tensor) -> None:
        beh[index] = behaviour.score(logits[beh_rows], base[beh_rows])
        dmg[index] = damage.score(logits[dmg_rows], base[dmg_rows])

    for index, config in enumerate(configs):
        if config is None:
            record(index, base)
    # prefix mode needs one group per starting block; the others can mix layers in a batch
    groups = (
        [[i for i, low in enumerate(lowest) if low == layer] for layer in steered_layers]
        if cache is not None
        else [[i for i, low in enumerate(lowest) if low is not None]]
    )
    per_batch = 1 if mode == "naive" else max(1, max_rows // n)
    bar = progress_bar(sum(len(g) for g in groups), desc, progress)
    try:
        for group in groups:
            for k in range(0, len(group), per_batch):
                chunk = group[k : k + per_batch]
                if mode == "naive":
                    out = model.next_token_logits(prompts, steering=configs[chunk[0]], chat=chat)
                else:
                    rows = [configs[i] for i in chunk for _ in prompts]
                    if cache is not None:
                        start = _cache_at(cache, lowest[chunk[0]])  # type: ignore[arg-type]
                        out = model.run_from(start, repeat=len(chunk), steering=rows)
                    else:
                        out = model.next_token_logits(
                            prompts * len(chunk), steering=rows, chat=chat
                        )
                for c, index in enumerate(chunk):
                    record(index, out[c * n : (c + 1) * n])
                bar.update(len(chunk))
    finally:
        bar.close()
    return beh, dmg, mode


def steers_last_only(config: Steering) -> bool:
    """Whether a configuration touches the last prompt position and nothing else.

    >>> import torch, steerlab as sl
    >>> vec = sl.SteeringVector({0: torch.ones(4)})
    >>> steers_last_only(Steering(vec, 1.0, "last")), steers_last_only(Steering(vec, 1.0, -1))
    (True, True)
    >>> steers_last_only(Steering(vec, 1.0, "all"))
    False
    """
    where = Positions.parse(config.positions)
    return where.mode == "last" or (where.mode == "indices" and where.indices == (-1,))


def _score_last(
    model: Any,
    configs: Sequence[Steering | None],
    cache: LastTokenCache,
    behaviour: NextTokenTask,
    damage: NextTokenTask,
    max_rows: int,
    progress: bool | None,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """:func:`_score_configs` for last-position configurations: one token per row re-run."""
    prompts, beh_rows, dmg_rows = _merge_prompts(behaviour.prompts, damage.prompts)
    n = len(prompts)
    base = cache.logits
    beh = torch.empty(len(configs), len(beh_rows))
    dmg = torch.empty(len(configs), len(dmg_rows))

    def record(index: int, logits: torch.Tensor) -> None:
        beh[index] = behaviour.score(logits[beh_rows], base[beh_rows])
        dmg[index] = damage.score(logits[dmg_rows], base[dmg_rows])

    steered = [i for i, c in enumerate(configs) if c is not None]
    for i, config in enumerate(configs):
        if config is None:
            record(i, base)
    per_batch = max(1, max_rows // n)
    bar = progress_bar(len(steered), desc, progress)
    try:
        for k in range(0, len(steered), per_batch):
            chunk = steered[k : k + per_batch]
            rows = [configs[i] for i in chunk for _ in prompts]
            out = model.run_last(cache, repeat=len(chunk), steering=rows)
            for c, index in enumerate(chunk):
                record(index, out[c * n : (c + 1) * n])
            bar.update(len(chunk))
    finally:
        bar.close()
    return beh, dmg, "last"


def compare(
    model: Any,
    candidates: Mapping[str, Any],
    *,
    behaviour: NextTokenTask,
    damage: NextTokenTask | None = None,
    strength: float = 1.0,
    positions: Any = "all",
    mode: str = "prefix",
    max_rows: int = 128,
    chat: bool = False,
    progress: bool | None = None,
) -> dict[str, SweepPoint]:
    """Score several steering configurations (vectors, methods, layers) as rows of one batch.

    ``candidates`` maps a name to a :class:`~steerlab.vectors.SteeringVector` (applied at its
    own layers with ``strength`` at ``positions``), a :class:`~steerlab.interventions.Steering`
    (used as it is) or ``None`` (unsteered). Returns a :class:`SweepPoint` per name, with
    ``layer`` the lowest steered layer (-1 for none) and ``strength`` the one applied (0 for
    none); the per-prompt work is shared exactly as in :func:`sweep`.

    >>> import torch, steerlab as sl
    >>> from steerlab.evaluation import kl_task
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> ones = torch.ones(model.d_model)
    >>> points = compare(model, {"early": sl.SteeringVector({0: ones}),
    ...                          "late": sl.SteeringVector({2: ones}), "none": None},
    ...                  behaviour=kl_task(["the cat sat"]), progress=False)
    >>> points["none"].behaviour, points["late"].behaviour > 0
    (0.0, True)
    """
    damage = damage if damage is not None else kl_task(behaviour.prompts)
    names = list(candidates)
    configs: list[Steering | None] = []
    for name in names:
        item = candidates[name]
        if item is None or isinstance(item, Steering):
            configs.append(item)
        elif isinstance(item, SteeringVector):
            configs.append(Steering(item, strength, positions))
        else:
            raise InvalidInputError(
                f"candidate {name!r} must be a SteeringVector, a Steering or None, not "
                f"{type(item).__name__}"
            )
    beh, dmg, _ = _score_configs(
        model,
        configs,
        behaviour=behaviour,
        damage=damage,
        mode=mode,
        max_rows=max_rows,
        chat=chat,
        progress=progress,
        desc="compare",
    )
    if None in configs:
        base = beh[configs.index(None)].double()
    else:  # the shift needs the unsteered scores
        logits = model.next_token_logits(list(behaviour.prompts), chat=chat)
        base = behaviour.score(logits, logits).double()
    points = {}
    for i, (name, config) in enumerate(zip(names, configs, strict=True)):
        values = beh[i].double()
        shifts = values - base
        applied = 0.0 if config is None else _single_strength(config)
        points[name] = SweepPoint(
            layer=-1 if config is None else min(config.layer_deltas(model.adapter)),
            strength=applied,
            behaviour=float(values.mean()),
            shift=float(shifts.mean()),
            behaviour_sem=_sem(shifts),
            damage=float(dmg[i].double().mean()),
            damage_max=float(dmg[i].double().max()),
        )
    return points


def _single_strength(config: Steering) -> float:
    if isinstance(config.strength, Mapping):
        return float("nan")  # per-layer strengths have no single value
    return float(config.strength)


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
    vector_positions = renamed_keyword(
        "tune",
        old="vector_positions",
        new="read_at",
        old_value=vector_positions,
        new_value=read_at,
        default="last",
    )
    if not math.isfinite(max_kl) or max_kl < 0:
        raise InvalidInputError(f"max_kl must be a non-negative number, got {max_kl}")
    if n_examples < 0:
        raise InvalidInputError(f"n_examples must be >= 0, got {n_examples}")
    data = _load(dataset)
    if not data.paired:
        raise InvalidInputError(
            f"dataset {data.name!r} is unpaired; tune needs a paired dataset to split by pair"
        )
    train, test = data.split(test_fraction=test_fraction, seed=seed)
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
    from steerlab.operators import get_operator

    op_names = [get_operator(o).name for o in ([op] if isinstance(op, str) else list(op))]
    if not op_names or len(set(op_names)) != len(op_names):
        raise InvalidInputError(f"op must be an operator name or a list of distinct ones: {op!r}")
    from steerlab.methods import compute_vector

    vector = compute_vector(
        model,
        list(train.positive),
        list(train.negative),
        layers=candidate_layers,
        method=method,
        read_at=vector_positions,
        progress=progress,
        # a full forward pass only when an operator reads the rotation plane
        plane=any("plane" in get_operator(name).needs for name in op_names) or None,
    ).with_metadata(dataset=data.name, split_seed=seed, test_fraction=test_fraction)

    # A/B prompts already carry the chat template when asked for; never apply it twice
    text_chat = chat and not data.answers
    common = {"positions": positions, "mode": mode, "chat": text_chat}
    op_sweeps = {
        name: sweep(
            model,
            vector,
            behaviour=plan.train,
            damage=plan.train_damage,
            layers=candidate_layers,
            strengths=strengths,
            progress=progress,
            op=name,
            **common,
        )
        for name in op_names
    }
    bests = {name: r.recommend(max_damage=max_kl) for name, r in op_sweeps.items()}
    best_op = max(
        op_names,
        key=lambda n: (bests[n].behaviour, -abs(bests[n].strength), -bests[n].layer),
    )
    train_sweep = op_sweeps[best_op]
    best = bests[best_op]
    layer, strength = best.layer, best.strength
    held = sweep(
        model,
        vector.select([layer]),
        behaviour=plan.test,
        damage=plan.test_damage,
        strengths=[strength],
        progress=False,
        op=best_op,
        **common,
    )
    held_point = held.point(layer, strength)
    steering = Steering(vector.select([layer]), strength, positions, op=best_op)
    examples, generation = _generate_examples(
        model,
        list(plan.test.prompts[:n_examples]),
        steering,
        plan.scorers,
        max_new_tokens=max_new_tokens,
        chat=text_chat,
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
    settings = {
        "layers": list(train_sweep.layers),
        "strengths": list(train_sweep.strengths),
        "method": method,
        "ops": op_names,
        "vector_positions": vector_positions,
        "positions": str(positions),
        "test_fraction": test_fraction,
        "seed": seed,
        "mode": train_sweep.mode,
        "chat": chat,
        "n_train_pairs": len(train),
        "n_test_pairs": len(test),
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
    return TuneResult(
        model_name=model.name,
        dataset_name=data.name,
        vector=vector,
        sweep=train_sweep,
        recommended=(layer, strength),
        max_kl=max_kl,
        heldout=heldout,
        examples=examples,
        settings=settings,
        seconds=time.perf_counter() - start_time,
        op=best_op,
        op_sweeps=op_sweeps,
    )


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
