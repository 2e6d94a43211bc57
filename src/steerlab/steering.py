"""Steering semantics: what adding (or otherwise applying) a vector at a site means.

:class:`Steering` is the steering value (a vector, its strength per layer, the positions, the
operator, the condition, the site); :class:`RowSteering` gives each row of a batch its own;
:func:`normalize_steering` turns what users pass as ``steering=`` into interventions. Their hooks
run through :mod:`steerlab.dispatch`.

>>> import torch
>>> from steerlab.vectors import SteeringVector
>>> s = Steering(SteeringVector({1: torch.ones(4)}), strength=2.0)
>>> s.positions, s.resolved_op
('all', 'add')
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from steerlab.adapter import ModelAdapter
from steerlab.dispatch import HookSpec, Intervention
from steerlab.errors import InvalidInputError, VectorMismatchError
from steerlab.grammar import parse_layers, parse_strength
from steerlab.operators import Add, Operator, check_extras, get_operator, stack_params
from steerlab.positions import Positions, PositionSpec
from steerlab.sites import (
    check_experts,
    check_site,
    check_site_override,
    head_mask,
    output_hidden,
    replace_output_hidden,
    reroute,
    router_indices,
    router_logits,
    router_top_k,
    site_hook,
    site_width,
)
from steerlab.tracking import PositionTracker
from steerlab.vectors import SteeringVector

__all__ = [
    "SITE_ORDER",
    "RowSteering",
    "Steering",
    "SteeringLike",
    "direction_at",
    "normalize_steering",
    "steering_with",
]


# --- additive steering ---------------------------------------------------------------------------
class _DefaultPositions(str):
    """The default of :attr:`Steering.positions`: equal to ``"all"`` (and read as ``"all"``
    everywhere), but of its own type, so :func:`normalize_steering` can tell "not given" (a call's
    ``positions=`` fills it in) from an explicit ``"all"`` (kept). A type rather than an identity
    check, because copies, pickles and ``dataclasses.replace`` keep the type but not the object.
    """

    __slots__ = ()


_ALL_BY_DEFAULT: PositionSpec = _DefaultPositions("all")


@dataclasses.dataclass(frozen=True)
class Steering(Intervention):
    """Steer the residual stream at the vector's layers with an operator (default: add).

    ``strength`` is one number or a ``{layer: strength}`` mapping (the seed's per-layer weights);
    with a mapping, or with ``layers``, a single-layer vector is applied at each of those layers.
    Layers and strength keys must be integers; the mapping and ``layers`` are copied, so later
    changes to the caller's objects do not leak in.
    ``op`` names a registered operator (:mod:`steerlab.operators`: ``"add"``, ``"add_norm"``,
    ``"clamp"``, ``"cap"``, ``"ablate"``, ``"rotate"``, ``"affine"``, ``"loreft"``); ``None``
    means ``"add"``, or ``"ablate"`` for a vector whose metadata says
    ``operation="project_out"``. ``when`` is a
    :class:`~steerlab.conditions.Condition`: only rows whose prompt satisfies it (or, for a
    per-token condition, only tokens where it fires) are steered.
    ``site`` (:mod:`steerlab.sites`; ``None``: the vector's own, ``"resid"`` by default) is
    where the operator acts: the residual stream, a block's attention or MLP output, or the
    per-head outputs; ``heads=[...]`` with ``site="head"`` adds only those heads' slices of the
    direction (the rest of the vector is ignored). On a mixture of experts, ``site="router"``
    adds the vector (one entry per expert) to the router logits, ``experts=[...]`` keeping only
    those experts' entries; with ``site="mlp_out"``, ``experts=[...]`` adds the vector only at
    tokens routed to one of those experts.

    >>> import torch
    >>> from steerlab.vectors import SteeringVector
    >>> s = Steering(SteeringVector({2: torch.ones(4)}), strength={6: 0.5, 8: 1.0}, op="clamp")
    >>> s.positions, s.resolved_op
    ('all', 'clamp')
    """

    vector: SteeringVector
    strength: float | Mapping[int, float] = 1.0
    positions: PositionSpec = _ALL_BY_DEFAULT
    layers: Sequence[int] | None = None
    op: str | Operator | None = None
    when: Any = None
    site: str | None = None
    heads: Sequence[int] | None = None
    experts: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.vector, SteeringVector):
            raise InvalidInputError(
                f"Steering needs a SteeringVector, got {type(self.vector).__name__}; wrap a raw "
                f"tensor with sl.SteeringVector.from_tensor(t, layers=[...])"
            )
        Positions.parse(self.positions)
        # the one parser of each grammar (steerlab.grammar), so every front end agrees
        object.__setattr__(self, "strength", parse_strength(self.strength))
        layers = parse_layers(self.layers)
        if isinstance(layers, list):
            object.__setattr__(self, "layers", tuple(layers))
        if self.op is not None:
            get_operator(self.op)
        if self.when is not None and not callable(getattr(self.when, "probe", None)):
            raise InvalidInputError(
                f"when= takes a Condition (sl.fit_condition / sl.Condition.load), not "
                f"{type(self.when).__name__}"
            )
        if self.site is not None:
            object.__setattr__(self, "site", check_site(self.site))
            check_site_override(self.vector.metadata.get("site"), self.site)
        site = self.resolved_site
        if self.heads is not None:
            if site != "head":
                raise InvalidInputError(f"heads= only applies to site='head', not {site!r}")
            if isinstance(self.heads, int):
                object.__setattr__(self, "heads", (self.heads,))
            if isinstance(self.heads, (str, bytes)) or not isinstance(self.heads, Sequence):
                raise InvalidInputError(f"heads must be a list of integers, got {self.heads!r}")
            object.__setattr__(self, "heads", tuple(self.heads))
            if self.operator.name != "add":
                raise InvalidInputError(
                    f"heads= selects slices of an added direction; op {self.operator.name!r} "
                    f"acts on the whole head activation (leave heads= out)"
                )
        if self.experts is not None:
            if site not in ("router", "mlp_out"):
                raise InvalidInputError(
                    f"experts= applies to site='router' or 'mlp_out', not {site!r}"
                )
            if isinstance(self.experts, int):
                object.__setattr__(self, "experts", (self.experts,))
            if isinstance(self.experts, (str, bytes)) or not isinstance(self.experts, Sequence):
                raise InvalidInputError(f"experts must be a list of integers, not {self.experts!r}")
            object.__setattr__(self, "experts", tuple(self.experts))

    @property
    def resolved_site(self) -> str:
        """The site this steering acts at: ``site``, or the vector's own."""
        if self.site is not None:
            return self.site
        try:
            return self.vector.site
        except VectorMismatchError as err:
            raise InvalidInputError(str(err)) from None

    @property
    def operator(self) -> Operator:
        """The operator this steering applies (``op``, or the vector's default)."""
        if self.op is not None:
            return get_operator(self.op)
        if self.vector.metadata.get("operation") == "project_out":
            return get_operator("ablate")
        return get_operator("add")

    @property
    def resolved_op(self) -> str:
        """Name of :attr:`operator`."""
        return self.operator.name

    def width(self, adapter: ModelAdapter) -> int:
        """The size of the activation at :attr:`resolved_site` (``d_model`` for ``"resid"``)."""
        site = self.resolved_site
        return adapter.d_model if site == "resid" else site_width(adapter, site)

    def _targets(self, adapter: ModelAdapter) -> dict[int, tuple[float, dict[str, torch.Tensor]]]:
        vector = self.vector
        site = self.resolved_site
        width = self.width(adapter)
        if vector.d_model != width:
            where = "the model's hidden size" if site == "resid" else f"site {site!r}'s width"
            raise VectorMismatchError(
                f"steering vector has size {vector.d_model} but {where} is {width}"
            )
        keep = head_mask(adapter, self.heads) if self.heads is not None else None
        if self.experts is not None:
            experts = list(check_experts(adapter, self.experts))
            if site == "router":
                keep = torch.zeros(width, dtype=torch.bool)
                keep[experts] = True
        vec_layers = {layer: adapter.resolve_layer(layer) for layer in vector.layers}
        if isinstance(self.strength, Mapping):
            pairs = [(k, adapter.resolve_layer(k), float(v)) for k, v in self.strength.items()]
        else:
            chosen = self.layers if self.layers is not None else list(vec_layers.values())
            pairs = [(k, adapter.resolve_layer(k), float(self.strength)) for k in chosen]
        targets: dict[int, float] = {}
        given: dict[int, int] = {}
        for raw, layer, strength in pairs:
            if layer in targets:
                # {-1: a, 2: b} on a 3-layer model: one of them would be dropped silently
                raise InvalidInputError(
                    f"layer {layer} is given twice (as {given[layer]} and {raw}) after resolving "
                    f"negative indices; give each layer once"
                )
            targets[layer], given[layer] = strength, raw
        by_resolved = {resolved: vector.directions[raw] for raw, resolved in vec_layers.items()}
        out: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}
        for layer, strength in targets.items():
            direction = direction_at(by_resolved, layer, use="applied", known=vector.layers)
            if keep is not None:
                direction = torch.where(keep, direction, torch.zeros_like(direction))
            if not bool(torch.isfinite(direction.to(torch.float32) * strength).all()):
                raise InvalidInputError(
                    f"strength {strength:g} at layer {layer} overflows float32 (strength x "
                    f"direction is not finite); use a smaller strength"
                )
            extras: dict[str, torch.Tensor] = {}
            for name, per_layer in vector.extras.items():
                resolved_extra = {adapter.resolve_layer(k): t for k, t in per_layer.items()}
                if layer in resolved_extra or len(resolved_extra) == 1:
                    extras[name] = direction_at(resolved_extra, layer, use="applied")
            out[layer] = (strength, {"direction": direction, **extras})
        return out

    def layer_deltas(self, adapter: ModelAdapter) -> dict[int, torch.Tensor]:
        """``{resolved layer: strength × direction}`` in float32, validated against the model."""
        return {
            layer: tensors["direction"].to(torch.float32) * strength
            for layer, (strength, tensors) in self._targets(adapter).items()
        }

    def layer_params(self, adapter: ModelAdapter) -> dict[int, dict[str, torch.Tensor]]:
        """``{resolved layer: operator constants}`` (see :meth:`Operator.params`), validated."""
        op = self.operator
        out: dict[int, dict[str, torch.Tensor]] = {}
        for layer, (strength, tensors) in self._targets(adapter).items():
            extras = {k: v for k, v in tensors.items() if k != "direction"}
            check_extras(op, extras, layer)
            try:
                out[layer] = op.params(tensors["direction"].float(), strength, extras)
            except VectorMismatchError as err:
                raise VectorMismatchError(f"{err} (layer {layer})") from None
        return out

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        return RowSteering((self,), uniform=True).hooks(adapter, tracker)


SteeringLike = Union[SteeringVector, Steering]


def direction_at(
    directions: Mapping[Any, torch.Tensor],
    layer: int,
    *,
    use: str,
    known: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The direction to use at ``layer``: the vector's own, or its only one at any layer.

    A vector with several layers is used only at those layers (``use`` names the operation in
    the error, ``known`` lists the vector's layers there).

    >>> import torch
    >>> direction_at({3: torch.ones(2)}, 5, use="applied").tolist()
    [1.0, 1.0]
    """
    if layer in directions:
        return directions[layer]
    if len(directions) == 1:
        return next(iter(directions.values()))
    have = "" if known is None else f" (it has {known})"
    raise VectorMismatchError(
        f"the vector has no direction for layer {layer}{have}; a multi-layer vector is {use} "
        f"only at its own layers"
    )


@dataclasses.dataclass(frozen=True)
class RowSteering(Intervention):
    """Per-row steering: row ``i`` of every batch gets ``rows[i]`` (or nothing when ``None``).

    All rows share one hook per layer, so a batch of different vectors, strengths, operators,
    positions or conditions costs one forward pass: the basis of batched sweeps and of serving
    many users at once. Rows are grouped by (operator, positions, condition); a row outside a
    group is left bit-identical by it. ``uniform=True`` (one entry, used by :class:`Steering`)
    applies that entry to every row of any batch.
    """

    rows: tuple[Steering | None, ...]
    uniform: bool = False

    def slice(self, start: int, stop: int) -> RowSteering:
        """The rows ``start:stop`` (for running a long prompt list in chunks)."""
        if self.uniform:
            return self
        return RowSteering(self.rows[start:stop])

    def hooks(self, adapter: ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        n_rows = len(self.rows)
        # (op name, positions, condition identity, site) -> layer -> per-row constants
        Key = tuple[str, Positions, int, str, tuple[int, ...] | None]
        groups: dict[Key, dict[int, list[dict[str, torch.Tensor] | None]]] = {}
        meta: dict[Key, tuple[Operator, Positions, Any]] = {}
        for row, steering in enumerate(self.rows):
            if steering is None:
                continue
            positions = Positions.parse(steering.positions)
            op = steering.operator
            site = steering.resolved_site
            gate = tuple(steering.experts) if site == "mlp_out" and steering.experts else None
            key = (op.name, positions, id(steering.when), site, gate)
            meta[key] = (op, positions, steering.when)
            per_layer = groups.setdefault(key, {})
            for layer, params in steering.layer_params(adapter).items():
                per_layer.setdefault(layer, [None] * n_rows)[row] = params
        probes: dict[int, Any] = {}
        specs_first: list[HookSpec] = []
        terms_by_site: dict[tuple[int, int, str], list[_Term]] = {}
        routings: dict[int, _Routing] = {}
        for key, per_layer in groups.items():
            op, positions, when = meta[key]
            site, gate = key[3], key[4]
            if positions.needs_ids:
                if not positions.bound:
                    raise InvalidInputError(
                        f"positions {positions.describe()!r} name marker text; steerlab resolves "
                        f"it with the model's tokenizer (model.steer/generate/logits), or give "
                        f"token ids: Positions.after(ids=[...])"
                    )
                tracker.track_ids = True
            probe = None
            if when is not None:
                if id(when) not in probes:
                    probe_layer, probe_hook = when.probe(adapter, tracker)
                    probes[id(when)] = (probe_layer, probe_hook)
                    specs_first.append(HookSpec(adapter.block(probe_layer), "forward", probe_hook))
                probe_layer, probe = probes[id(when)]
                # inside block L (attention, MLP, heads) runs before block L's output is read
                below = [
                    layer
                    for layer in per_layer
                    if layer < probe_layer or (layer == probe_layer and site != "resid")
                ]
                if below:
                    where = "" if site == "resid" else f" (site {site!r}, inside the block)"
                    raise InvalidInputError(
                        f"a condition read at layer {probe_layer} cannot gate steering at layers "
                        f"{sorted(below)}{where} below it (the forward pass reaches them first); "
                        f"fit the condition with layers=[...] below the steering layers"
                    )
            width = adapter.d_model if site == "resid" else site_width(adapter, site)
            for layer, per_row in per_layer.items():
                stacked = stack_params(op, per_row, width)
                present = torch.tensor([p is not None for p in per_row], dtype=torch.bool)
                # residual steering first at a layer: hooks keep the order they were made in
                order = (layer, SITE_ORDER[site], site)
                some = None if bool(present.all()) else present
                term = _Term(op, positions, stacked, some, probe)
                if gate is not None:
                    term.experts = torch.tensor(check_experts(adapter, gate))
                    if layer not in routings:
                        routings[layer] = _Routing(router_top_k(adapter, layer))
                    term.routing = routings[layer]
                terms_by_site.setdefault(order, []).append(term)
        specs = []
        for (layer, _, site), terms in sorted(terms_by_site.items()):
            module, kind = site_hook(adapter, site, layer)
            hook = _SteerHook(
                tracker,
                terms,
                self.uniform,
                pre=kind == "forward_pre",
                router=module if site == "router" else None,
            )
            specs.append(HookSpec(module, kind, hook))
        # after any router steering of the same layer, so they see the final routing
        specs += [
            HookSpec(adapter.router(layer), "forward", routing.capture)
            for layer, routing in routings.items()
        ]
        return specs_first + specs


@dataclasses.dataclass
class _Term:
    """One operator applied to some rows at some positions (optionally gated by a probe)."""

    op: Operator
    positions: Positions
    params: dict[str, torch.Tensor]  # [rows, k] float32
    rows: torch.Tensor | None  # [rows] bool, None = every row
    probe: Any = None
    experts: torch.Tensor | None = None  # only tokens routed to one of these experts
    routing: _Routing | None = None


class _Routing(threading.local):
    """The experts a layer's router picked for each token in this thread's forward pass."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.indices: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: Any, output: Any) -> None:
        self.indices = router_indices(module, args, output, self.top_k)


class _SteerHook:
    """Forward hook applying its terms (in order) at the selected tokens of a block's output."""

    def __init__(
        self,
        tracker: PositionTracker,
        terms: list[_Term],
        uniform: bool,
        *,
        pre: bool = False,
        router: nn.Module | None = None,
    ):
        self.tracker = tracker
        self.terms = terms
        self.uniform = uniform
        self.pre = pre  # a forward pre-hook: the activation is the module's first argument
        self.router = router  # steering router logits: the routing is recomputed from them
        self._placed: dict[tuple[int, torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    def _params(self, index: int, like: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        key = (index, like.device, dtype)
        placed = self._placed.get(key)
        if placed is None:
            # Moving once per (device, dtype) keeps model-parallel models correct and cheap.
            term = self.terms[index]
            placed = {
                k: v.to(device=like.device, dtype=dtype)[:, None, :] for k, v in term.params.items()
            }
            if term.rows is not None:
                placed["__rows__"] = term.rows.to(like.device)[:, None]
            self._placed[key] = placed
        return placed

    def __call__(self, module: nn.Module, args: Any, *rest: Any) -> Any:
        output = args if self.pre else rest[0]
        if self.router is not None:
            hidden = router_logits(self.router, args, output)
        else:
            hidden = output_hidden(output)
        flat = hidden.shape
        if hidden.ndim == 2 and self.tracker.abs_index is not None:
            # OPT's MLP and the MoE blocks work on the batch's tokens flattened
            hidden = hidden.reshape(*self.tracker.abs_index.shape, flat[-1])
        batch = hidden.shape[0]
        for index, term in enumerate(self.terms):
            is_add = isinstance(term.op, Add) and type(term.op) is Add
            p = self._params(index, hidden, hidden.dtype if is_add else torch.float32)
            n_rows = next(iter(p.values())).shape[0] if p else 1
            if n_rows != batch and not (self.uniform and n_rows == 1):
                raise InvalidInputError(
                    f"per-row steering has {n_rows} entries but the batch has {batch} rows (one "
                    f"entry per prompt, None for an unsteered one)"
                )
            mask: torch.Tensor | None = None
            if not (term.positions.covers_everything and self.tracker.all_real):
                mask = self.tracker.mask(term.positions).to(hidden.device)
            if term.probe is not None:
                fired = term.probe.mask(hidden.shape[:2]).to(hidden.device)
                mask = fired if mask is None else mask & fired
            rows = p.get("__rows__")
            if rows is not None:
                mask = rows.expand(batch, hidden.shape[1]) if mask is None else mask & rows
            if term.routing is not None and term.experts is not None:
                picked = term.routing.indices
                if picked is None:
                    raise InvalidInputError("no routing was seen before the MoE output")
                picked = picked.reshape(*hidden.shape[:2], -1)
                routed = torch.isin(picked, term.experts.to(picked.device)).any(dim=-1)
                mask = routed if mask is None else mask & routed
            if is_add:
                # the historical exact path: h + delta in the model's dtype, zero elsewhere
                delta = p["delta"]
                if mask is None:
                    hidden = hidden + delta
                else:
                    hidden = hidden + mask[..., None].to(hidden.dtype) * delta
                continue
            values = {k: v for k, v in p.items() if k != "__rows__"}
            edited = term.op.apply(hidden.float(), values).to(hidden.dtype)
            hidden = edited if mask is None else torch.where(mask[..., None], edited, hidden)
        if self.router is not None:
            return reroute(self.router, output, hidden.reshape(flat))
        return replace_output_hidden(output, hidden.reshape(flat))


# Within a layer, sites in the order the forward pass reaches them.
SITE_ORDER = {"head": 0, "attn_out": 1, "router": 2, "mlp_out": 3, "resid": 4}


def steering_with(
    steering: Any,
    *,
    strength: float | Mapping[int, float] | None = None,
    positions: PositionSpec | None = None,
    layers: Sequence[int] | None = None,
    op: str | Operator | None = None,
    when: Any = None,
) -> Any:
    """The ``steering=`` value that ``steering`` plus loose keywords describe, keywords folded in.

    ``strength``/``positions``/``layers``/``op``/``when`` turn a bare
    :class:`~steerlab.vectors.SteeringVector` into a :class:`Steering`; ``positions``/``op``/
    ``when`` also fill in a :class:`Steering` that left them unset (an explicit ``"all"`` is
    kept). A list or tuple is per-row: each entry is folded the same way (``None`` stays
    ``None``). Keywords left at ``None`` change nothing; with none given, ``steering`` comes back
    as it is. This is what ``steer``'s shorthand builds, and what the deprecated keywords of the
    other calls still mean.

    >>> import torch
    >>> from steerlab.vectors import SteeringVector
    >>> vec = SteeringVector({0: torch.ones(2)})
    >>> s = steering_with(vec, strength=0.5, positions="last")
    >>> s.strength, s.positions
    (0.5, 'last')
    >>> steering_with(Steering(vec, positions="all"), positions="last").positions
    'all'
    """
    if strength is None and positions is None and layers is None and op is None and when is None:
        return steering
    if op is not None:
        get_operator(op)
    given: dict[str, Any] = {
        key: value
        for key, value in (("strength", strength), ("positions", positions), ("layers", layers))
        if value is not None
    }

    def one(item: Any) -> Any:
        if item is None:
            return None
        if isinstance(item, SteeringVector):
            return Steering(item, **given, op=op, when=when)
        if isinstance(item, Intervention):
            if strength is not None or layers is not None:
                raise InvalidInputError(
                    "strength=/layers= apply to bare SteeringVectors; a Steering or other "
                    "intervention carries its own (use Steering(vec, strength=..., layers=...))"
                )
            if isinstance(item, Steering):
                changes: dict[str, Any] = {}
                if positions is not None and isinstance(item.positions, _DefaultPositions):
                    changes["positions"] = positions
                if op is not None and item.op is None:
                    changes["op"] = op
                if when is not None and item.when is None:
                    changes["when"] = when
                return dataclasses.replace(item, **changes) if changes else item
            if when is not None or op is not None:
                raise InvalidInputError(
                    f"op=/when= apply to steering vectors, not to {type(item).__name__}"
                )
            return item
        return item  # anything else is refused by normalize_steering, with the reason

    if isinstance(steering, (list, tuple)):
        return [one(item) for item in steering]
    return one(steering)


def normalize_steering(
    steering: Any,
    *,
    strength: float | Mapping[int, float] | None = None,
    positions: PositionSpec | None = None,
    layers: Sequence[int] | None = None,
    n_rows: int | None = None,
    op: str | Operator | None = None,
    when: Any = None,
    tokenizer: Any = None,
) -> list[Intervention]:
    """Turn what users pass as ``steering=`` into a list of interventions.

    Accepts ``None``, a :class:`SteeringVector`, a :class:`Steering` or other
    :class:`Intervention`, or a list (or tuple) with one entry per row (``None`` for an unsteered
    row). The keywords are folded in first, as :func:`steering_with` does. ``tokenizer`` turns
    text markers of content-based positions (``"after:..."``) into token ids.

    >>> import torch
    >>> from steerlab.vectors import SteeringVector
    >>> [s] = normalize_steering(SteeringVector({0: torch.ones(2)}), op="cap", strength=0.5)
    >>> s.op, s.strength
    ('cap', 0.5)
    """
    if steering is None:
        return []
    if isinstance(steering, (list, tuple)) and n_rows is not None and len(steering) != n_rows:
        raise InvalidInputError(
            f"per-row steering has {len(steering)} entries but there are {n_rows} prompts"
        )
    steering = steering_with(
        steering, strength=strength, positions=positions, layers=layers, op=op, when=when
    )

    def bind(item: Steering) -> Steering:
        spec = Positions.parse(item.positions)
        if tokenizer is not None and not spec.bound:
            item = dataclasses.replace(item, positions=spec.bind(tokenizer))
        return item

    def one(item: Any) -> Intervention | None:
        if item is None:
            return None
        if isinstance(item, SteeringVector):
            return bind(Steering(item))
        if isinstance(item, Steering):
            return bind(item)
        if isinstance(item, Intervention):
            return item
        if isinstance(item, torch.Tensor):
            raise InvalidInputError(
                "steering= takes a SteeringVector, not a raw tensor; wrap it with "
                "sl.SteeringVector.from_tensor(tensor, layers=[...])"
            )
        raise InvalidInputError(f"cannot steer with {type(item).__name__}")

    if isinstance(steering, (list, tuple)):
        items = [one(item) for item in steering]
        if any(item is not None and not isinstance(item, Steering) for item in items):
            raise InvalidInputError("per-row steering entries must be vectors, Steering or None")
        return [RowSteering(tuple(item if isinstance(item, Steering) else None for item in items))]
    single = one(steering)
    return [] if single is None else [single]
