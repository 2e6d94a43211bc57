"""The wire format of per-request steering inside vLLM, and the per-token deltas it implies.

A request carries its steering in ``SamplingParams.extra_args["steerlab"]`` (offline) or the
OpenAI server's ``vllm_xargs`` (``vllm serve``), as plain JSON so it crosses process boundaries
without pickling anything a client could abuse:

.. code-block:: text

    {"steering": [
        {"vector": {"15": [0.1, ...]} | "NAME",   # directions per layer, or a registered name
         "strength": 4.0 | {"15": 4.0},
         "positions": "all" | "last" | "prompt" | "generated" | 3 | [0, -1] | "2:" | "0:8:2"
                      | {"mode": "after", "markers": ["Yes"], "ids": [[[...], ...]]},
         "layers": [15, 16] | null,
         "op": "add",                             # or any steerlab operator
         "extras": {"plane": {"15": [0.3, ...]}}}  # per-layer extras the operator needs
    ],
     "readout": {"key": "req-7",                          # optional probes
                 "probes": [{"layer": 15, "direction": [0.1, ...]}]}}

The same value may be sent as a JSON string (``vllm_xargs`` only carries flat values).
Positions are read by :meth:`Positions.parse` (the library's one parser); positions chosen by
text travel with their markers' token ids (:func:`check_bound`), which the worker matches
against each request's tokens as they stream (:class:`StepRequest`). A vector
given by ``NAME`` is read from ``$STEERLAB_VLLM_VECTORS/NAME.safetensors`` on the server, never
from a client-chosen path.

Inside the worker each entry becomes a :class:`ResolvedEntry`: its positions and a float32
``strength × direction`` per resolved layer, computed by :class:`steerlab.interventions.Steering`
itself, so layer/strength rules are the library's. :func:`token_deltas` then builds, for one step
of vLLM's flattened batch, the ``[tokens, d_model]`` addition for each steered layer.

A ``readout`` probe asks the worker for the residual stream after block ``layer`` (after any
steering there) dotted with ``direction`` (used as sent; steerlab's engine sends the unit
direction) at the last token of the request in every forward pass: the token whose logits give
the next token. The worker keeps the values under ``key`` (vLLM renames request ids inside the
engine, so the sender names its values itself). :func:`resolve_readout` checks probes against
the model.

>>> import torch
>>> wire = to_wire([Steering(SteeringVector({1: torch.ones(2)}), strength=2.0, positions="last")])
>>> entries = resolve(wire, n_layers=3, d_model=2)
>>> entries[0].positions.mode, entries[0].deltas[1].tolist()
('last', [2.0, 2.0])
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from steerlab.conditions import Condition
from steerlab.errors import InvalidInputError, LayerIndexError, VectorMismatchError
from steerlab.interventions import SequenceState, Steering
from steerlab.operators import OPERATORS, loreft_op_refusal
from steerlab.positions import Positions, PositionSpec
from steerlab.vectors import SteeringVector
from steerlab.vllm.conditions import check_gated_layers, condition_from_wire, condition_to_wire

__all__ = [
    "EXTRA_ARGS_KEY",
    "VECTORS_ENV",
    "check_bound",
    "needs_history",
    "update_history",
    "selected_tokens",
    "Readout",
    "ReadoutProbe",
    "ResolvedEntry",
    "StepRequest",
    "positions_to_wire",
    "readout_to_wire",
    "resolve",
    "resolve_readout",
    "to_wire",
    "TokenEdit",
    "token_deltas",
    "token_edits",
    "validate",
]

EXTRA_ARGS_KEY = "steerlab"
"""Key of ``SamplingParams.extra_args`` (and of ``vllm_xargs``) holding a request's steering."""

VECTORS_ENV = "STEERLAB_VLLM_VECTORS"
"""Environment variable naming the folder of vectors that requests may refer to by name."""

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


# --- positions ---------------------------------------------------------------------------------
def positions_to_wire(spec: PositionSpec) -> str | int | list[int] | dict[str, Any]:
    """The JSON form of a position spec (:meth:`Positions.to_json`; the worker reads it back
    with :meth:`Positions.parse`, the one parser of the grammar).

    >>> positions_to_wire(slice(2, None)), positions_to_wire([0, -1]), positions_to_wire("last")
    ('2:', [0, -1], 'last')
    """
    return Positions.parse(spec).to_json()


# --- client side ------------------------------------------------------------------------------
def _strength_to_wire(strength: float | Mapping[int, float]) -> float | dict[str, float]:
    if isinstance(strength, Mapping):
        return {str(int(layer)): float(value) for layer, value in strength.items()}
    return float(strength)


def to_wire(steering: Sequence[Steering]) -> dict[str, Any]:
    """Serialise steering terms (applied in list order) to the JSON value of ``extra_args``.

    >>> import torch
    >>> to_wire([Steering(SteeringVector({0: torch.tensor([1.0, 0.5])}))])["steering"][0]["vector"]
    {'0': [1.0, 0.5]}
    """
    entries: list[dict[str, Any]] = []
    for term in steering:
        if not isinstance(term, Steering):
            raise InvalidInputError(
                f"vLLM steering takes Steering terms or SteeringVectors, got {type(term).__name__}"
            )
        check_bound(Positions.parse(term.positions))
        refuse_site(term.resolved_site)
        refuse_loreft_add(term)
        vector = {
            str(layer): term.vector.directions[layer].to(torch.float32).tolist()
            for layer in term.vector.layers
        }
        entries.append(
            {
                "vector": vector,
                "strength": _strength_to_wire(term.strength),
                "positions": positions_to_wire(term.positions),
                "layers": None if term.layers is None else [int(x) for x in term.layers],
                "op": term.resolved_op,
                **({} if term.when is None else {"when": condition_to_wire(term.when)}),
                **(
                    {
                        "extras": {
                            name: {
                                str(layer): t.to(torch.float32).tolist()
                                for layer, t in per_layer.items()
                            }
                            for name, per_layer in term.vector.extras.items()
                        }
                    }
                    if term.vector.extras
                    else {}
                ),
            }
        )
    return {"steering": entries}


def check_bound(positions: Positions) -> Positions:
    """Refuse text markers without token ids: vLLM's workers have no tokenizer, so positions
    chosen by text (``after:``, ``between:``, ``outside:``) travel with their token ids,
    which the sender computes (:meth:`Positions.bind`; steerlab's front ends do it).

    >>> check_bound(Positions.parse("after:Yes"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: positions 'after:Yes' select tokens by text; ...
    """
    if not positions.bound:
        raise InvalidInputError(
            f"positions {positions.describe()!r} select tokens by text; on the vLLM wire they "
            f"travel with their token ids, which vLLM's workers cannot compute (no tokenizer): "
            f"send {{'mode', 'markers', 'ids'}} (Positions.bind(tokenizer).to_json()), or use "
            f"steerlab.vllm.generate / extra_args(..., tokenizer=) / steerlab serve, which do it"
        )
    return positions


def refuse_loreft_add(term: Steering) -> None:
    """Refuse any operator but ``loreft`` on a LoReFT intervention
    (:func:`~steerlab.operators.loreft_op_refusal`): ``op`` is ``'add'`` by default on the wire
    and in the engine's requests, and every other operator would act on the vector's direction
    ``Rᵀb``, which is not its trained edit.

    >>> refuse_loreft_add(Steering(SteeringVector({0: torch.ones(2)})))
    """
    refusal = loreft_op_refusal(term.vector, term.resolved_op)
    if refusal is not None:
        raise InvalidInputError(refusal)


def refuse_site(site: str) -> None:
    """Refuse a site other than the residual stream, naming it: vLLM's decoder layers fuse
    attention, MLP and the residual add into kernels the plugin cannot hook inside.

    >>> refuse_site("resid")
    >>> refuse_site("head")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: the vLLM engine steers the residual stream only ...
    """
    if site != "resid":
        raise InvalidInputError(
            f"the vLLM engine steers the residual stream only (site 'resid'); this vector is "
            f"for site {site!r}, which vLLM's fused attention and MLP kernels leave no place to "
            f"hook; serve it with the torch engine (steerlab serve --engine torch)"
        )


# --- worker side --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ResolvedEntry:
    """One steering term ready for the worker: positions and ``{layer: float32 delta}`` (op
    ``"add"``), or the operator's name and ``{layer: constants}`` (:meth:`Operator.params`)."""

    positions: Positions
    deltas: Mapping[int, torch.Tensor]
    op: str = "add"
    params: Mapping[int, Mapping[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    when: Condition | None = None


class _Dims:
    """What :meth:`Steering.layer_deltas` needs of a model: its sizes and layer resolution."""

    def __init__(self, n_layers: int, d_model: int) -> None:
        self.n_layers = n_layers
        self.d_model = d_model

    def resolve_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise LayerIndexError(f"layer must be an int, got {layer!r}")
        if not -self.n_layers <= layer < self.n_layers:
            raise LayerIndexError(
                f"layer {layer} is out of range for a model with {self.n_layers} layers "
                f"(valid: {-self.n_layers}..{self.n_layers - 1})"
            )
        return layer % self.n_layers

    def resolve_layers(self, layers: Sequence[int]) -> list[int]:
        out: list[int] = []
        for layer in layers:
            resolved = self.resolve_layer(layer)
            if resolved not in out:
                out.append(resolved)
        if not out:
            raise LayerIndexError("the list of layers is empty")
        return out


def _int_key(key: Any, what: str) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} keys must be layer numbers, got {key!r}") from None


def _load_named(name: str) -> SteeringVector:
    folder = os.environ.get(VECTORS_ENV)
    if not _NAME.match(name):
        raise InvalidInputError(f"invalid vector name {name!r}")
    if not folder:
        raise InvalidInputError(
            f"vector {name!r} is given by name but the server has no vector folder; start it "
            f"with {VECTORS_ENV}=DIR (files DIR/NAME.safetensors) or send the directions"
        )
    file = Path(folder) / f"{name}.safetensors"
    if not file.is_file():
        raise InvalidInputError(f"unknown vector {name!r} (no {file})")
    return SteeringVector.load(file)


def _vector(raw: Any) -> SteeringVector:
    if isinstance(raw, SteeringVector):
        return raw
    if isinstance(raw, str):
        return _load_named(raw)
    if not isinstance(raw, Mapping) or not raw:
        raise InvalidInputError(
            "a steering entry's 'vector' must be a registered name or {layer: [floats]}"
        )
    try:
        directions = {
            _int_key(layer, "vector"): torch.tensor(values, dtype=torch.float32)
            for layer, values in raw.items()
        }
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"a steering vector must hold lists of numbers: {error}") from None
    return SteeringVector(directions)


def _entry(raw: Any) -> Steering:
    if not isinstance(raw, Mapping):
        raise InvalidInputError(f"a steering entry must be an object, got {raw!r}")
    unknown = set(raw) - {"vector", "strength", "positions", "layers", "op", "extras", "when"}
    if unknown:
        raise InvalidInputError(f"unknown steering entry fields: {sorted(unknown)}")
    op = raw.get("op", "add")
    if not isinstance(op, str) or op not in OPERATORS:
        raise InvalidInputError(f"unknown steering op {op!r}; available: {', '.join(OPERATORS)}")
    vector = _vector(raw.get("vector"))
    extras = raw.get("extras")
    if extras is not None:
        vector = vector.with_extras(**_extras(extras))
    term = Steering(
        vector,
        op=op,
        strength=raw.get("strength", 1.0),
        positions=check_bound(Positions.parse(raw.get("positions", "all"))),
        layers=raw.get("layers"),
        when=None if raw.get("when") is None else condition_from_wire(raw["when"]),
    )
    refuse_loreft_add(term)  # a LoReFT file named on the wire, or extras sent without its op
    return term


def _extras(raw: Any) -> dict[str, dict[int, torch.Tensor]]:
    if not isinstance(raw, Mapping) or not all(
        isinstance(name, str) and isinstance(per_layer, Mapping) for name, per_layer in raw.items()
    ):
        raise InvalidInputError("a steering entry's 'extras' must be {name: {layer: [floats]}}")
    try:
        return {
            name: {
                _int_key(layer, "extras"): torch.tensor(values, dtype=torch.float32)
                for layer, values in per_layer.items()
            }
            for name, per_layer in raw.items()
        }
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"steering extras must hold lists of numbers: {error}") from None


def _wire_dict(wire: Any) -> Mapping[str, Any]:
    if isinstance(wire, str):
        try:
            wire = json.loads(wire)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"steering is not valid JSON: {error}") from None
    if isinstance(wire, list):
        wire = {"steering": wire}
    if not isinstance(wire, Mapping) or not isinstance(wire.get("steering", []), list):
        raise InvalidInputError("steering must be {'steering': [entries]} or a list of entries")
    unknown = set(wire) - {"steering", "readout"}
    if unknown:
        raise InvalidInputError(f"unknown steerlab fields: {sorted(unknown)}")
    readout = wire.get("readout")
    if readout is not None and (
        not isinstance(readout, Mapping)
        or set(readout) != {"key", "probes"}
        or not isinstance(readout["key"], str)
        or not 0 < len(readout["key"]) <= 200
        or not isinstance(readout["probes"], list)
    ):
        raise InvalidInputError(
            "'readout' must be {'key': a name of 1 to 200 characters, 'probes': [{'layer', "
            "'direction'}, ...]}"
        )
    return wire


def _entries(wire: Any) -> list[Any]:
    return list(_wire_dict(wire).get("steering", []))


def _probe(raw: Any) -> tuple[int, torch.Tensor]:
    """A probe's ``(layer, float32 direction)``, checked for everything but the model's sizes."""
    if not isinstance(raw, Mapping) or set(raw) != {"layer", "direction"}:
        raise InvalidInputError(f"a readout probe must be {{'layer', 'direction'}}, got {raw!r}")
    layer = raw["layer"]
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise InvalidInputError(f"a readout probe's layer must be an int, got {layer!r}")
    try:
        direction = torch.tensor(raw["direction"], dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"a readout direction must be a list of numbers: {error}") from None
    if direction.ndim != 1 or not bool(torch.isfinite(direction).all()):
        raise InvalidInputError("a readout direction must be a flat list of finite numbers")
    return layer, direction


def validate(wire: Any) -> None:
    """Check a request's steering without knowing the model (what an API server can check).

    Everything but the model's layer count and hidden size: JSON, fields, op, numbers,
    positions, registered names. The worker checks the rest (see :func:`resolve`).

    >>> validate({"steering": [{"vector": {"0": [1.0]}, "positions": "sometimes"}]})
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: positions: unknown spec 'sometimes'; use one of all, ...
    """
    if wire is None:
        return
    for raw in _entries(wire):
        _entry(raw)
    readout = _wire_dict(wire).get("readout")
    for raw in [] if readout is None else readout["probes"]:
        _probe(raw)


def resolve(wire: Any, *, n_layers: int, d_model: int) -> list[ResolvedEntry]:
    """Validate a request's steering value and compute its per-layer deltas (float32).

    ``wire`` is the dict of :func:`to_wire`, its JSON text, or ``None`` (no steering).

    >>> resolve(None, n_layers=2, d_model=4)
    []
    >>> resolve({"steering": [{"vector": {"0": [1.0]}}]}, n_layers=2, d_model=4)
    Traceback (most recent call last):
        ...
    steerlab.errors.VectorMismatchError: steering vector has size 1 but the model's hidden size is 4
    """
    if wire is None:
        return []
    dims = _Dims(n_layers, d_model)
    out: list[ResolvedEntry] = []
    for raw in _entries(wire):
        term = _entry(raw)
        positions = Positions.parse(term.positions)
        if term.when is not None:
            # gated per token at run time (steerlab.vllm.gates): the operator's constants
            params = _params(term, dims)
            check_gated_layers(term.when, params, n_layers=n_layers, d_model=d_model)
            out.append(
                ResolvedEntry(positions, {}, op=term.resolved_op, params=params, when=term.when)
            )
        elif term.resolved_op == "add":
            out.append(ResolvedEntry(positions, term.layer_deltas(cast(Any, dims))))
        else:
            out.append(
                ResolvedEntry(positions, {}, op=term.resolved_op, params=_params(term, dims))
            )
    return out


def _params(term: Steering, dims: _Dims) -> dict[int, dict[str, torch.Tensor]]:
    return {
        layer: {k: v.float().reshape(-1) for k, v in constants.items()}
        for layer, constants in term.layer_params(cast(Any, dims)).items()
    }


@dataclasses.dataclass(frozen=True)
class ReadoutProbe:
    """A readout probe ready for the worker: a resolved layer and a float32 direction."""

    layer: int
    direction: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Readout:
    """A request's probes and the ``key`` the worker keeps their values under."""

    key: str
    probes: Sequence[ReadoutProbe]


def readout_to_wire(key: str, probes: Sequence[tuple[int, torch.Tensor]]) -> dict[str, Any]:
    """The JSON form of ``(layer, direction)`` probes (the ``"readout"`` field of the wire).

    Float32 directions survive the round trip exactly (a float32 is a JSON double).

    >>> import torch
    >>> readout_to_wire("r1", [(3, torch.tensor([0.6, 0.8]))])
    {'key': 'r1', 'probes': [{'layer': 3, 'direction': [0.6000000238418579, 0.800000011920929]}]}
    """
    return {
        "key": key,
        "probes": [
            {"layer": int(layer), "direction": direction.to(torch.float32).tolist()}
            for layer, direction in probes
        ],
    }


def resolve_readout(wire: Any, *, n_layers: int, d_model: int) -> Readout | None:
    """The readout of a request's steerlab value, checked against the model (``None``: none).

    >>> wire = {"readout": {"key": "r1", "probes": [{"layer": -1, "direction": [1.0, 0.0]}]}}
    >>> resolve_readout(wire, n_layers=4, d_model=2).probes[0].layer
    3
    >>> resolve_readout({"steering": []}, n_layers=4, d_model=2) is None
    True
    """
    if wire is None:
        return None
    raw = _wire_dict(wire).get("readout")
    if raw is None:
        return None
    dims = _Dims(n_layers, d_model)
    probes: list[ReadoutProbe] = []
    for item in raw["probes"]:
        layer, direction = _probe(item)
        if direction.shape[0] != d_model:
            raise VectorMismatchError(
                f"readout direction has size {direction.shape[0]} but the model's hidden size "
                f"is {d_model}"
            )
        probes.append(ReadoutProbe(layer=dims.resolve_layer(layer), direction=direction))
    return Readout(key=raw["key"], probes=probes) if probes else None


@dataclasses.dataclass(frozen=True)
class StepRequest:
    """One request's share of a step: its tokens ``start:stop`` of the flattened batch.

    ``history`` holds the request's token ids up to this step's last token (the worker keeps
    one per request, :func:`needs_history`): positions chosen by text are decided on it as the
    library decides them, token ``i`` from tokens ``0..i`` with the scan carried across steps.
    """

    start: int
    stop: int
    prompt_len: int
    entries: Sequence[ResolvedEntry]
    history: SequenceState | None = None


def needs_history(entries: Sequence[ResolvedEntry]) -> bool:
    """Whether some entry selects tokens by their text (the worker then keeps token ids).

    >>> needs_history([ResolvedEntry(Positions.after(ids=[5]), {})])
    True
    """
    return any(entry.positions.needs_ids for entry in entries)


def update_history(
    history: SequenceState,
    known: Sequence[int],
    indices: Sequence[int],
    step_ids: Sequence[int] | None,
) -> None:
    """Bring a request's token ``history`` up to the end of this step.

    ``indices`` are the absolute positions of the request's tokens in the step and
    ``step_ids`` their ids (what the model runs; ``None``: take them from ``known``). Tokens
    before the step come from ``known``, the request's prompt and output ids as the runner
    keeps them (its newest output id may still be a placeholder, never one before the step).
    A token that differs from the history at its index starts the history anew there (a
    preempted request recomputed), as in the library's tracker.

    >>> h = SequenceState()
    >>> update_history(h, [4, 5, 6], [2], [6]); h.ids
    [4, 5, 6]
    """
    first = indices[0] if len(indices) else len(known)
    have = len(history.ids)
    if have < first:
        history.record(list(known[have:first]), list(range(have, first)))
    if step_ids is None:
        step_ids = [known[i] for i in indices]
    history.record(list(step_ids), list(indices))


def selected_tokens(
    entry: ResolvedEntry, request: StepRequest, abs_index: torch.Tensor
) -> torch.Tensor:
    """``[tokens]`` mask of the request's tokens in this step that ``entry`` steers."""
    positions = entry.positions
    if not positions.needs_ids:
        return positions.mask(abs_index, torch.tensor([request.prompt_len]))[0]
    if request.history is None:
        raise InvalidInputError(
            f"positions {positions.describe()!r} need the request's token ids (a history)"
        )
    flags = request.history.flags(positions)
    return torch.tensor(
        [0 <= i < len(flags) and flags[i] for i in abs_index[0].tolist()], dtype=torch.bool
    )


def token_deltas(
    requests: Sequence[StepRequest],
    positions: torch.Tensor,
    *,
    d_model: int,
) -> dict[int, torch.Tensor]:
    """``{layer: delta[tokens, d_model]}`` to add to the residual stream in one step.

    ``positions`` holds the absolute index (prompt start = 0) of every token of the flattened
    batch, as vLLM's model runner feeds it to the model; each request's entries apply to its own
    tokens only, at the positions its specs select (``prompt_len`` is that request's prompt
    length). Layers no entry touches are absent; tokens of unsteered requests get exact zeros.

    >>> import torch
    >>> e = ResolvedEntry(Positions.parse("generated"), {0: torch.ones(2)})
    >>> d = token_deltas([StepRequest(0, 3, 2, [e])], torch.tensor([0, 1, 2]), d_model=2)
    >>> d[0].tolist()
    [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    """
    total = int(positions.shape[-1])
    out: dict[int, torch.Tensor] = {}
    flat = positions.reshape(-1)[:total].to("cpu", torch.long)
    for request in requests:
        if not request.entries or request.stop <= request.start:
            continue
        abs_index = flat[request.start : request.stop].unsqueeze(0)
        for entry in request.entries:
            if entry.op != "add" or entry.when is not None:
                continue
            mask = selected_tokens(entry, request, abs_index)
            if not bool(mask.any()):
                continue
            weight = mask.to(torch.float32)[:, None]
            for layer, delta in entry.deltas.items():
                target = out.get(layer)
                if target is None:
                    target = out[layer] = torch.zeros(total, d_model, dtype=torch.float32)
                target[request.start : request.stop] += weight * delta[None, :]
    return out


@dataclasses.dataclass(frozen=True)
class TokenEdit:
    """A non-additive operator applied at one layer to rows ``rows`` of the flattened batch."""

    rows: torch.Tensor  # [n] long, on the CPU
    op: str
    params: Mapping[str, torch.Tensor]


def token_edits(
    requests: Sequence[StepRequest], positions: torch.Tensor
) -> dict[int, list[TokenEdit]]:
    """``{layer: [edits]}`` of the non-additive entries in one step (each request's entries in
    their order, after that layer's additions from :func:`token_deltas`).

    >>> import torch
    >>> u = {0: {"u": torch.ones(2)}}
    >>> e = ResolvedEntry(Positions.parse("last"), {}, op="ablate", params=u)
    >>> edits = token_edits([StepRequest(0, 3, 2, [e])], torch.tensor([0, 1, 2]))
    >>> edits[0][0].rows.tolist(), edits[0][0].op
    ([1, 2], 'ablate')
    """
    total = int(positions.shape[-1])
    flat = positions.reshape(-1)[:total].to("cpu", torch.long)
    out: dict[int, list[TokenEdit]] = {}
    for request in requests:
        if request.stop <= request.start:
            continue
        abs_index = flat[request.start : request.stop].unsqueeze(0)
        for entry in request.entries:
            if entry.op == "add" or entry.when is not None:  # gated entries: plugin's gates
                continue
            mask = selected_tokens(entry, request, abs_index)
            rows = torch.nonzero(mask).reshape(-1) + request.start
            if rows.numel() == 0:
                continue
            for layer, params in entry.params.items():
                out.setdefault(layer, []).append(TokenEdit(rows, entry.op, params))
    return out
