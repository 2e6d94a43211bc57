"""Sweeps: score every layer × strength of a vector (behaviour and damage) as fast as exactness
allows.

:func:`sweep` runs the layer × strength grid on a behaviour task and a damage task
(``KL(unsteered || steered)`` on neutral text); :func:`compare` scores several configurations
(vectors, methods, layers) side by side, :func:`compare_operators` one grid per operator.
Choosing and validating a point on held-out data is :func:`steerlab.tuning.tune`.

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
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from steerlab.errors import InvalidInputError, VectorMismatchError
from steerlab.evaluation import (
    NextTokenTask,
    kl_task,
)
from steerlab.positions import Positions
from steerlab.progress import progress_bar
from steerlab.replay import LastTokenCache, PrefixCache
from steerlab.steering import Steering
from steerlab.vectors import SteeringVector

__all__ = [
    "DEFAULT_MAX_KL",
    "DEFAULT_STRENGTHS",
    "MODES",
    "SweepPoint",
    "SweepResult",
    "compare",
    "compare_operators",
    "operator_table",
    "steers_last_only",
    "sweep",
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


def __getattr__(name: str) -> Any:
    """``steerlab.sweeps.tune`` / ``TuneResult`` (0.1 spellings) forward to :mod:`steerlab.tuning`.

    Resolved lazily because :mod:`steerlab.tuning` imports this module; an import at the top
    would be a cycle.
    """
    if name in ("tune", "TuneResult"):
        from steerlab import tuning
        from steerlab.deprecation import warn_deprecated

        warn_deprecated(f"steerlab.sweeps.{name}", f"steerlab.tuning.{name} (or sl.{name})")
        return getattr(tuning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
