"""The vLLM general plugin: per-request steering inside vLLM's workers.

vLLM loads every ``vllm.general_plugins`` entry point in each of its processes (API server,
engine core, workers); steerlab's entry point is :func:`register`. It wraps the V1 model runner's
``_model_forward`` (the one call per step that runs the model on the flattened batch). Before
each forward the wrapper reads, for every scheduled request, its steering from
``sampling_params.extra_args["steerlab"]`` (see :mod:`steerlab.vllm.spec`), its token range in
the flattened batch (``query_start_loc``) and its prompt length, and with the absolute
``positions`` vLLM feeds the model builds one ``[tokens, d_model]`` addition per steered layer.
Forward hooks on the decoder layers, installed once per runner, add it during that forward only.

Layer ``L`` means what it means in steerlab: the residual stream at the output of decoder block
``L``. vLLM's Llama-family layers return ``(hidden, residual)`` whose *sum* is that stream (the
next layer's fused add-norm, or the final norm, adds them); adding the delta to ``residual``
is therefore exactly adding it to the block output. Layers that return one tensor get it added
to that tensor. Under tensor parallelism both parts are whole and identical on every rank (the
row-parallel projections all-reduce before returning), and every rank builds the same delta
from the same batch metadata, so the ranks stay in lock-step; pipeline stages hook only the
layers they own.

Readout (probe scores) runs in the same hooks: after any steering at its layer, each probing
request's last token of the step (the one whose logits pick its next token) is dotted with the
probe's direction, and the worker keeps the value under the request's readout key and that
token's absolute position. vLLM returns only tokens to the API process, so the values travel
back by ``collective_rpc``: :class:`ReadoutExtension`, vLLM's ``worker_extension_cls``, adds the
method ``steerlab_take_readout`` to every worker, which hands over (and forgets) a request's
values. Without that extension (a plain ``vllm serve``) probes are ignored: nothing could fetch
them.

vLLM's prefix cache is keyed by token ids; the plugin adds a key of each steered block's
steering (:mod:`steerlab.vllm.cache`) in the engine process, so a cached block is reused only by
requests whose steering up to that block is identical, whichever front end sent them.

Steering runs in vLLM's compiled model as well as in eager mode: each decoder layer's hook calls
a custom op (``steerlab::steer_pair``/``steer_one``) that ``torch.compile`` records as an opaque
call, and the op reads the step's plan at run time (see :func:`steer_stream`). Requests without
steering cost one dictionary lookup each per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from steerlab.errors import SteerlabError
from steerlab.interventions import SequenceState
from steerlab.operators import get_operator
from steerlab.vllm.cache import EXTRA_KEY as CACHE_EXTRA_KEY
from steerlab.vllm.cache import request_block_key
from steerlab.vllm.conditions import Gate, GatedEdit
from steerlab.vllm.spec import (
    EXTRA_ARGS_KEY,
    Readout,
    ResolvedEntry,
    StepRequest,
    TokenEdit,
    needs_history,
    resolve,
    resolve_readout,
    selected_tokens,
    token_deltas,
    token_edits,
    update_history,
)

__all__ = [
    "READOUT_EXTENSION",
    "ReadoutExtension",
    "RunnerSteering",
    "StepPlan",
    "block_stream",
    "decoder_layers",
    "layer_hook",
    "register",
    "install",
    "steer_layer",
    "steer_stream",
]

READOUT_EXTENSION = "steerlab.vllm.plugin.ReadoutExtension"
"""vLLM's ``worker_extension_cls`` that lets the API process fetch readout values."""

# Readout values of at most this many requests wait for their fetch (finished requests whose
# values were never fetched are dropped oldest first, so nothing grows without bound).
MAX_READOUT_REQUESTS = 1024
# Prompt-level condition verdicts kept for requests that find their prompt in the prefix cache.
MAX_SHARED_VERDICTS = 4096

logger = logging.getLogger("steerlab.vllm")

_SLOTS = itertools.count()

_PATCHED = "_steerlab_original_model_forward"
_PATCHED_ADMIT = "_steerlab_original_preprocess_add_request"


def decoder_layers(model: nn.Module, n_layers: int) -> list[tuple[int, nn.Module]]:
    """``(index, layer)`` for the decoder layers of a vLLM model present on this rank.

    Finds the ``nn.ModuleList`` of length ``n_layers`` (``model.model.layers`` in the Llama
    family); pipeline stages hold placeholder modules for layers they do not own, skipped here.

    >>> net = nn.Module(); net.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    >>> [i for i, _ in decoder_layers(net, 3)]
    [0, 1, 2]
    """
    for _name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return [
                (index, layer)
                for index, layer in enumerate(module)
                if type(layer).__name__ != "PPMissingLayer"
            ]
    raise SteerlabError(
        f"steerlab cannot find the {n_layers} decoder layers of {type(model).__name__}"
    )


def add_to_block_output(output: Any, delta: torch.Tensor) -> Any:
    """``output`` of a vLLM decoder layer with ``delta`` added to the residual stream it carries.

    >>> import torch
    >>> h, r = torch.ones(2, 3), torch.zeros(2, 3)
    >>> out = add_to_block_output((h, r), torch.full((2, 3), 0.5))
    >>> (out[0] + out[1]).tolist() == (h + r + 0.5).tolist()
    True
    """
    if isinstance(output, torch.Tensor):
        return output + delta[: output.shape[0]].to(output.dtype)
    if isinstance(output, tuple) and len(output) >= 2 and isinstance(output[1], torch.Tensor):
        residual = output[1]
        return (output[0], residual + delta[: residual.shape[0]].to(residual.dtype), *output[2:])
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        hidden = output[0]
        return (hidden + delta[: hidden.shape[0]].to(hidden.dtype), *output[1:])
    raise SteerlabError(f"cannot steer a decoder layer output of type {type(output).__name__}")


def block_stream(output: Any) -> torch.Tensor:
    """The residual stream a vLLM decoder layer's ``output`` carries (``hidden + residual``).

    >>> import torch
    >>> block_stream((torch.ones(2, 3), torch.full((2, 3), 2.0))).tolist()
    [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and len(output) >= 2 and isinstance(output[1], torch.Tensor):
        return output[0] + output[1]
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SteerlabError(f"cannot read a decoder layer output of type {type(output).__name__}")


@dataclasses.dataclass
class _Reads:
    """The probes read at one layer in one step: rows of the flattened batch and directions."""

    rows: torch.Tensor  # [n] token rows
    directions: torch.Tensor  # [n, d_model] float32
    keys: list[tuple[str, int, int]]  # (readout key, probe index, absolute position) per row
    n_probes: dict[str, int]  # probes per readout key
    values: torch.Tensor | None = None


@dataclasses.dataclass
class StepPlan:
    """What the hooks do in one forward: ``{layer: delta}`` to add, ``{layer: edits}`` of other
    operators to apply after it, ``{layer: reads}`` to take."""

    deltas: dict[int, torch.Tensor]
    reads: dict[int, _Reads]
    edits: dict[int, list[TokenEdit]] = dataclasses.field(default_factory=dict)
    # when= conditions: gates read at their layer, edits they gate, verdicts to keep
    gates: dict[int, list[Gate]] = dataclasses.field(default_factory=dict)
    gated: dict[int, list[GatedEdit]] = dataclasses.field(default_factory=dict)
    verdicts: list[tuple[tuple[str, int], bytes | None, Gate]] = dataclasses.field(
        default_factory=list
    )


def apply_edits(output: Any, edits: Sequence[TokenEdit]) -> Any:
    """``output`` of a decoder layer with each edit's operator applied to its rows of the
    residual stream, in order (float32, as the library's hooks compute them).

    >>> import torch
    >>> from steerlab.vllm.spec import TokenEdit
    >>> h, r = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.ones(2, 2)
    >>> edit = TokenEdit(torch.tensor([1]), "ablate", {"u": torch.tensor([0.0, 1.0])})
    >>> out = apply_edits((h, r), [edit])
    >>> (out[0] + out[1]).tolist()
    [[2.0, 3.0], [4.0, 0.0]]
    """
    for edit in edits:
        stream = block_stream(output)
        rows = edit.rows.to(stream.device)
        before = stream.index_select(0, rows).to(torch.float32)
        params = {k: v.to(stream.device) for k, v in edit.params.items()}
        after = get_operator(edit.op).apply(before, params)
        change = torch.zeros_like(stream)
        change.index_copy_(0, rows, (after - before).to(stream.dtype))
        output = add_to_block_output(output, change)
    return output


def steer_layer(state: RunnerSteering, layer: int, output: Any) -> Any:
    """What steering does to decoder layer ``layer``'s ``output`` in the current step: this
    step's delta, then the other operators' edits, then probe reads (the body of the custom op
    :func:`steer_stream`; eager Python, called once per steered layer per forward)."""
    plan = state.active
    if plan is None:
        return output
    for gate in plan.gates.get(layer, ()):
        gate.evaluate(block_stream(output))  # before any steering at this layer
    delta = plan.deltas.get(layer)
    if delta is not None:
        output = add_to_block_output(output, delta)
    edits = plan.edits.get(layer)
    if edits:
        output = apply_edits(output, edits)
    gated = plan.gated.get(layer)
    if gated:
        device = block_stream(output).device
        fired = [
            TokenEdit(rows, edit.op, edit.params)
            for edit in gated
            if (rows := edit.fired_rows(device)).numel()
        ]
        output = apply_edits(output, fired)
    reads = plan.reads.get(layer)
    if reads is not None:
        stream = block_stream(output)
        rows = stream.index_select(0, reads.rows.to(stream.device)).to(torch.float32)
        reads.values = (rows * reads.directions.to(rows.device)).sum(dim=-1)
    return output


# Steering states by slot, for the custom op (a graph records the slot number, a constant).
_STATES: weakref.WeakValueDictionary[int, RunnerSteering] = weakref.WeakValueDictionary()


def _steer_pair(
    hidden: torch.Tensor, residual: torch.Tensor, slot: int, layer: int
) -> torch.Tensor:
    state = _STATES.get(slot)
    if state is None or state.active is None:
        return residual.clone()
    out = steer_layer(state, layer, (hidden, residual))
    # a new tensor, never an alias of an input (the op is functional for the compiler)
    return out[1] if out[1] is not residual else residual.clone()


def _steer_one(stream: torch.Tensor, slot: int, layer: int) -> torch.Tensor:
    state = _STATES.get(slot)
    if state is None or state.active is None:
        return stream.clone()
    out = steer_layer(state, layer, stream)
    return out if out is not stream else stream.clone()


def _register_ops() -> None:
    """Define ``steerlab::steer_pair`` and ``steerlab::steer_one`` (once per process).

    They are opaque to ``torch.compile``: Dynamo records a call with the layer's tensors and two
    constants (state slot, layer), Inductor emits that call, and at run time the Python body
    reads whatever plan the runner set for this step. Nothing about a request is baked into
    the compiled graph, so one compilation serves every mix of steered and unsteered rows.
    """
    if hasattr(torch.ops.steerlab, "steer_pair"):
        return
    lib = torch.library.Library("steerlab", "FRAGMENT")
    lib.define("steer_pair(Tensor hidden, Tensor residual, int slot, int layer) -> Tensor")
    lib.define("steer_one(Tensor stream, int slot, int layer) -> Tensor")
    lib.impl("steer_pair", _steer_pair, "CompositeExplicitAutograd")
    lib.impl("steer_one", _steer_one, "CompositeExplicitAutograd")
    torch.library.register_fake(
        "steerlab::steer_pair", lambda h, r, slot, layer: torch.empty_like(r)
    )
    torch.library.register_fake("steerlab::steer_one", lambda x, slot, layer: torch.empty_like(x))
    _LIBRARIES.append(lib)  # the ops live as long as their library object


_LIBRARIES: list[Any] = []
_register_ops()

STEER_OPS = ("steerlab::steer_pair", "steerlab::steer_one")
"""The ops a compiled vLLM graph calls at every decoder layer (splitting ops on CUDA)."""


def steer_stream(output: Any, slot: int, layer: int) -> Any:
    """``output`` of decoder layer ``layer`` through steerlab's custom op (state ``slot``).

    >>> import torch
    >>> steer_stream((torch.ones(1, 2), torch.zeros(1, 2)), -1, 0)[1].tolist()  # no state
    [[0.0, 0.0]]
    """
    if isinstance(output, torch.Tensor):
        return torch.ops.steerlab.steer_one(output, slot, layer)
    if isinstance(output, tuple) and len(output) >= 2 and isinstance(output[1], torch.Tensor):
        hidden, residual = output[0], output[1]
        return (hidden, torch.ops.steerlab.steer_pair(hidden, residual, slot, layer), *output[2:])
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (torch.ops.steerlab.steer_one(output[0], slot, layer), *output[1:])
    raise SteerlabError(f"cannot steer a decoder layer output of type {type(output).__name__}")


def layer_hook(state: RunnerSteering, layer: int) -> Callable[[nn.Module, Any, Any], Any]:
    """The forward hook of decoder layer ``layer``: routes the layer's output through the
    custom op. Eager, a step without a plan costs one attribute read; under ``torch.compile``
    the hook is traced once, so it calls the op unconditionally and the op decides per step."""
    slot = state.slot

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        # is_compiling() first: Dynamo then never reads (nor guards on) the Python state
        if not torch.compiler.is_compiling() and state.active is None:
            return None
        return steer_stream(output, slot, layer)

    return hook


@dataclasses.dataclass(frozen=True)
class _Parsed:
    steering: list[ResolvedEntry]
    readout: Readout | None


class RunnerSteering:
    """Steering state of one model runner: hooks, parsed specs per request, this step's plan,
    and the readout values waiting for the API process."""

    def __init__(
        self, model: nn.Module, *, n_layers: int, d_model: int, readout: bool = True
    ) -> None:
        self.n_layers = n_layers
        self.d_model = d_model
        self.readout = readout
        self.active: StepPlan | None = None
        self._specs: dict[str, tuple[int, _Parsed]] = {}
        # token ids of requests steered at positions chosen by text, per request
        self._histories: dict[str, SequenceState] = {}
        # readout key -> {absolute position: one value per probe}, least recently written first
        self._values: OrderedDict[str, dict[int, list[float]]] = OrderedDict()
        # prompt-level condition verdicts: per (request, entry), and per (condition, prompt)
        # for requests whose prompt blocks come from the prefix cache
        self._verdicts: dict[tuple[str, int], bool] = {}
        self._shared_verdicts: OrderedDict[bytes, bool] = OrderedDict()
        self.slot = next(_SLOTS)
        _STATES[self.slot] = self
        self._handles = [
            layer.register_forward_hook(layer_hook(self, index))
            for index, layer in decoder_layers(model, n_layers)
        ]

    def remove(self) -> None:
        """Remove the hooks this state installed."""
        while self._handles:
            self._handles.pop().remove()
        _STATES.pop(self.slot, None)

    def entries(self, req_id: str, raw: Any) -> list[ResolvedEntry]:
        """The resolved steering of request ``req_id`` (parsed once per request)."""
        return self._parsed(req_id, raw).steering

    def _parsed(self, req_id: str, raw: Any) -> _Parsed:
        key = id(raw)
        cached = self._specs.get(req_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            parsed = _Parsed(
                resolve(raw, n_layers=self.n_layers, d_model=self.d_model),
                resolve_readout(raw, n_layers=self.n_layers, d_model=self.d_model)
                if self.readout
                else None,
            )
        except SteerlabError as error:
            # Raising here would take the whole engine down with every other request; the
            # front ends (steerlab's engine, generate, the logits-processor validator) refuse
            # such requests before they get here.
            logger.error("request %s: steering ignored: %s", req_id, error)
            parsed = _Parsed([], None)
        self._specs[req_id] = (key, parsed)
        return parsed

    def plan(
        self,
        requests: Sequence[tuple[Any, ...]],
        positions: torch.Tensor,
        *,
        device: torch.device,
        dtype: torch.dtype,
        input_ids: torch.Tensor | None = None,
        prompt_ids: Callable[[str], Sequence[int] | None] | None = None,
    ) -> StepPlan | None:
        """This step's plan for ``(req_id, raw, start, stop, prompt_len[, request state])``
        rows (``None``: no request is steered or probed). ``input_ids`` (the step's token ids)
        and the runner's request state give the token ids that positions chosen by text need;
        ``prompt_ids`` gives a request's prompt token ids (to share prompt-level condition
        verdicts between requests with the same prompt and steering)."""
        steps: list[StepRequest] = []
        live: set[str] = set()
        probing: list[tuple[int, Readout]] = []
        gated: list[tuple[str, StepRequest, Any]] = []
        step_ids: list[int] | None = None
        flat = positions.reshape(-1)
        for req_id, raw, start, stop, prompt_len, *rest in requests:
            live.add(req_id)
            if raw is None:
                continue
            parsed = self._parsed(req_id, raw)
            entries = parsed.steering
            history = None
            if entries and needs_history(entries) and stop > start:
                if step_ids is None and input_ids is not None:
                    step_ids = input_ids.reshape(-1).tolist()
                history = self._history(
                    req_id,
                    rest[0] if rest else None,
                    flat[start:stop].tolist(),
                    None if step_ids is None else step_ids[start:stop],
                )
                if history is None:  # logged: steer what does not need the ids
                    entries = [e for e in entries if not e.positions.needs_ids]
            if entries:
                steps.append(StepRequest(start, stop, prompt_len, entries, history))
                if any(entry.when is not None for entry in entries):
                    gated.append((req_id, steps[-1], raw))
            if parsed.readout is not None and stop > start:
                probing.append((stop - 1, parsed.readout))
        if len(self._specs) > 2 * len(live) + 16:
            self._specs = {k: v for k, v in self._specs.items() if k in live}
            self._histories = {k: v for k, v in self._histories.items() if k in live}
            self._verdicts = {k: v for k, v in self._verdicts.items() if k[0] in live}
        if not steps and not probing:
            return None
        deltas = token_deltas(steps, positions, d_model=self.d_model) if steps else {}
        plan = StepPlan(
            deltas={layer: d.to(device=device, dtype=dtype) for layer, d in deltas.items()},
            reads=_reads(probing, positions, device=device),
            edits=token_edits(steps, positions) if steps else {},
        )
        for req_id, step, raw in gated:
            self._gate(plan, req_id, step, raw, positions, prompt_ids)
        return plan

    def _gate(
        self,
        plan: StepPlan,
        req_id: str,
        step: StepRequest,
        raw: Any,
        positions: torch.Tensor,
        prompt_ids: Callable[[str], Sequence[int] | None] | None,
    ) -> None:
        """Add the gates and gated edits of request ``req_id``'s conditioned entries."""
        if step.stop <= step.start:
            return
        flat = positions.reshape(-1).to("cpu", torch.long)
        abs_index = flat[step.start : step.stop].unsqueeze(0)
        for index, entry in enumerate(step.entries):
            if entry.when is None:
                continue
            gate = Gate(entry.when, step.start, step.stop)
            if entry.when.scope == "prompt":
                key = (req_id, index)
                gate.verdict = self._verdicts.get(key)
                shared = None
                ids = prompt_ids(req_id) if prompt_ids is not None else None
                if ids is not None:
                    # the verdict depends on the prompt and on all of the request's steering
                    # below the condition's layer: the same prompt and steering, the same verdict
                    text = raw if isinstance(raw, str) else json.dumps(raw, sort_keys=True)
                    hasher = hashlib.sha256(text.encode("utf-8", "replace"))
                    hasher.update(index.to_bytes(4, "little"))
                    hasher.update(torch.tensor(list(ids), dtype=torch.long).numpy().tobytes())
                    shared = hasher.digest()
                if gate.verdict is None and shared is not None:
                    gate.verdict = self._shared_verdicts.get(shared)
                if gate.verdict is None:
                    if int(flat[step.start]) == 0 and step.stop - step.start >= step.prompt_len:
                        gate.whole_prompt = step.prompt_len
                    else:
                        logger.error(
                            "request %s: a prompt-level condition needs the whole prompt in one "
                            "forward pass (this one has part of it: chunked prefill?); its "
                            "steering is not applied (use Condition.per_token())",
                            req_id,
                        )
                plan.verdicts.append((key, shared, gate))
            plan.gates.setdefault(entry.when.layer, []).append(gate)
            rows = torch.nonzero(selected_tokens(entry, step, abs_index)).reshape(-1)
            if rows.numel() == 0:
                continue
            for layer, params in entry.params.items():
                plan.gated.setdefault(layer, []).append(
                    GatedEdit(rows + step.start, entry.op, params, gate)
                )

    def _history(
        self, req_id: str, request: Any, indices: list[int], ids: list[int] | None
    ) -> SequenceState | None:
        """Request ``req_id``'s token history through this step (``None``: unavailable)."""
        history = self._histories.setdefault(req_id, SequenceState())
        prompt = list(getattr(request, "prompt_token_ids", None) or [])
        output = list(getattr(request, "output_token_ids", None) or [])
        try:
            update_history(history, prompt + output, indices, ids)
        except (SteerlabError, IndexError) as error:
            logger.error("request %s: positions chosen by text ignored: %s", req_id, error)
            self._histories.pop(req_id, None)
            return None
        return history

    def record(self, plan: StepPlan) -> None:
        """Keep the values the hooks read during ``plan``'s forward (call after it), and the
        prompt-level verdicts decided in it."""
        for entry_key, shared, gate in plan.verdicts:
            if gate.verdict is None:
                continue
            self._verdicts[entry_key] = gate.verdict
            if shared is not None and gate.decided:
                self._shared_verdicts[shared] = gate.verdict
                while len(self._shared_verdicts) > MAX_SHARED_VERDICTS:
                    self._shared_verdicts.popitem(last=False)
        for reads in plan.reads.values():
            if reads.values is None:  # a pipeline stage without this layer
                continue
            for (key, probe, position), value in zip(reads.keys, reads.values.tolist()):
                per_request = self._values.get(key)
                if per_request is None:
                    per_request = self._values[key] = {}
                    while len(self._values) > MAX_READOUT_REQUESTS:
                        self._values.popitem(last=False)
                self._values.move_to_end(key)
                slot = per_request.get(position)
                if slot is None:
                    slot = per_request[position] = [float("nan")] * reads.n_probes[key]
                slot[probe] = float(value)

    def take(self, keys: Sequence[str]) -> dict[str, list[tuple[int, list[float]]]]:
        """Hand over (and forget) the readout values kept under ``keys``: ``(position,
        values)`` pairs sorted by position (NaN for a probe this rank does not hold), per key
        that has any."""
        out: dict[str, list[tuple[int, list[float]]]] = {}
        for key in keys:
            values = self._values.pop(key, None)
            if values:
                out[key] = sorted(values.items())
        return out


def _reads(
    probing: Sequence[tuple[int, Readout]],
    positions: torch.Tensor,
    *,
    device: torch.device,
) -> dict[int, _Reads]:
    """Per layer, the rows and directions of the probes read in this step (``row``: the
    request's last token in the flattened batch)."""
    if not probing:
        return {}
    flat = positions.reshape(-1).to("cpu", torch.long)
    by_layer: dict[int, tuple[list[int], list[torch.Tensor], list[tuple[str, int, int]]]] = {}
    counts = {readout.key: len(readout.probes) for _, readout in probing}
    for row, readout in probing:
        position = int(flat[row])
        for index, probe in enumerate(readout.probes):
            rows, directions, keys = by_layer.setdefault(probe.layer, ([], [], []))
            rows.append(row)
            directions.append(probe.direction)
            keys.append((readout.key, index, position))
    return {
        layer: _Reads(
            rows=torch.tensor(rows, dtype=torch.long, device=device),
            directions=torch.stack(directions).to(device=device, dtype=torch.float32),
            keys=keys,
            n_probes=counts,
        )
        for layer, (rows, directions, keys) in by_layer.items()
    }


class ReadoutExtension:
    """vLLM worker extension (``worker_extension_cls``): readout values to the API process.

    vLLM mixes it into each worker class, so ``collective_rpc("steerlab_take_readout",
    args=([key, ...],))`` returns, per rank, what :meth:`RunnerSteering.take` returns (ranks
    that hold no probed layer, or no steered model runner, return ``{}``).
    """

    def steerlab_take_readout(self, keys: list[str]) -> dict[str, list[tuple[int, list[float]]]]:
        """Hand over (and forget) this worker's readout values kept under ``keys``."""
        runner = getattr(self, "model_runner", None)
        state = getattr(runner, "_steerlab_state", None)
        if not isinstance(state, RunnerSteering):
            return {}
        return state.take([str(k) for k in keys])


def _step_requests(runner: Any) -> list[tuple[str, Any, int, int, int, Any]]:
    """``(req_id, steering, start, stop, prompt_len, request state)`` per request of the
    current step."""
    batch = runner.input_batch
    num_reqs = int(batch.num_reqs)
    if num_reqs == 0:
        return []
    bounds = runner.query_start_loc.np[: num_reqs + 1].tolist()
    out: list[tuple[str, Any, int, int, int, Any]] = []
    for index, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        raw = extra.get(EXTRA_ARGS_KEY)
        prompt_len = int(getattr(state, "num_prompt_tokens", 0) or 0)
        out.append((req_id, raw, int(bounds[index]), int(bounds[index + 1]), prompt_len, state))
    return out


def install(runner: Any) -> RunnerSteering:
    """Install steerlab's hooks on ``runner``'s freshly loaded model (idempotent).

    Called right after vLLM loads the model and before its first forward, which is where vLLM
    compiles it: the hooks (calls into the custom op) must be in place when Dynamo traces.
    """
    state = getattr(runner, "_steerlab_state", None)
    if isinstance(state, RunnerSteering):
        return state
    hf = runner.model_config.hf_text_config
    parallel = getattr(getattr(runner, "vllm_config", None), "parallel_config", None)
    runner._steerlab_state = RunnerSteering(
        runner.get_model(),
        n_layers=int(hf.num_hidden_layers),
        d_model=int(hf.hidden_size),
        readout=getattr(parallel, "worker_extension_cls", "") == READOUT_EXTENSION,
    )
    return runner._steerlab_state


def _runner_state(runner: Any) -> RunnerSteering | None:
    state = getattr(runner, "_steerlab_state", None)
    return state if isinstance(state, RunnerSteering) else None


def _steered_model_forward(
    self: Any,
    input_ids: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    intermediate_tensors: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    **model_kwargs: Any,
) -> Any:
    original = getattr(type(self), _PATCHED)
    requests = _step_requests(self)
    state = None
    if positions is not None and positions.ndim == 1 and any(r[1] is not None for r in requests):
        state = _runner_state(self)
    if state is None:
        return original(
            self,
            input_ids=input_ids,
            positions=positions,
            intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds,
            **model_kwargs,
        )
    assert positions is not None
    plan = state.plan(
        requests,
        positions,
        device=positions.device,
        dtype=self.model_config.dtype,
        input_ids=input_ids,
        prompt_ids=lambda req_id: getattr(self.requests.get(req_id), "prompt_token_ids", None),
    )
    state.active = plan
    try:
        output = original(
            self,
            input_ids=input_ids,
            positions=positions,
            intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds,
            **model_kwargs,
        )
    finally:
        state.active = None
    if plan is not None and (plan.reads or plan.verdicts):
        state.record(plan)
    return output


# The served model's (n_layers, d_model) in this engine process, for the prefix-cache keys
# (set when the engine core admits its first request; the hasher has no config of its own).
_ENGINE_DIMS: list[tuple[int, int]] = []


def _with_steering_key(original: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's ``generate_block_hash_extra_keys`` plus steerlab's key of a steered block
    (:mod:`steerlab.vllm.cache`)."""

    def extra_keys(request: Any, start: int, stop: int, mm_index: int) -> Any:
        keys, next_index = original(request, start, stop, mm_index)
        key = request_block_key(
            request, start, stop, dims=_ENGINE_DIMS[0] if _ENGINE_DIMS else None
        )
        if key is None:
            return keys, next_index
        return (*(keys or ()), (CACHE_EXTRA_KEY, key)), next_index

    extra_keys._steerlab_original = original  # type: ignore[attr-defined]
    return extra_keys


def _patch_prefix_cache() -> None:
    """Key steered blocks of vLLM's prefix cache by their steering (every module that
    imported vLLM's extra-key function by name), and record the model's sizes at admission."""
    import importlib

    from vllm.v1.engine.core import EngineCore

    for name in ("vllm.v1.core.kv_cache_utils", "vllm.v1.core.block_pool"):
        module = importlib.import_module(name)
        current = getattr(module, "generate_block_hash_extra_keys", None)
        if current is not None and not hasattr(current, "_steerlab_original"):
            module.generate_block_hash_extra_keys = _with_steering_key(current)  # type: ignore[attr-defined]
    if getattr(EngineCore, _PATCHED_ADMIT, None) is not None:
        return
    original = EngineCore.preprocess_add_request
    setattr(EngineCore, _PATCHED_ADMIT, original)

    def preprocess_add_request(self: Any, request: Any) -> Any:
        if not _ENGINE_DIMS:
            hf = self.vllm_config.model_config.hf_text_config
            _ENGINE_DIMS.append((int(hf.num_hidden_layers), int(hf.hidden_size)))
        return original(self, request)

    EngineCore.preprocess_add_request = preprocess_add_request  # type: ignore[method-assign]


def _patch_compilation() -> None:
    """Make steerlab's ops splitting ops of vLLM's piecewise compilation (CUDA and the like).

    A CUDA graph replays the kernels its capture recorded, so a captured call of the op would
    replay the capture step's steering forever. As splitting ops, vLLM runs them eagerly
    between the captured pieces; full-graph modes, which capture across splitting ops, become
    ``PIECEWISE``. The CPU backend (one Dynamo graph, no CUDA graphs) is left as it is.
    """
    from vllm.config.compilation import CompilationConfig, CompilationMode, CUDAGraphMode

    original = CompilationConfig.set_splitting_ops_for_v1
    if hasattr(original, "_steerlab_original"):
        return

    def set_splitting_ops_for_v1(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.mode != CompilationMode.VLLM_COMPILE:
            return
        ops = list(self.splitting_ops or [])
        self.splitting_ops = ops + [op for op in STEER_OPS if op not in ops]
        if self.cudagraph_mode.has_full_cudagraphs():
            logger.info("steerlab: cudagraph_mode %s -> PIECEWISE", self.cudagraph_mode.name)
            self.cudagraph_mode = CUDAGraphMode.PIECEWISE

    set_splitting_ops_for_v1._steerlab_original = original  # type: ignore[attr-defined]
    CompilationConfig.set_splitting_ops_for_v1 = set_splitting_ops_for_v1  # type: ignore[method-assign]


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group: wrap the model runner and key the
    prefix cache by steering (idempotent).

    Also selects vLLM's V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0`` unless set), the runner
    whose per-step metadata the wrapper reads.
    """
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _patch_prefix_cache()
    _patch_compilation()
    if getattr(GPUModelRunner, _PATCHED, None) is not None:
        return
    setattr(GPUModelRunner, _PATCHED, GPUModelRunner._model_forward)
    GPUModelRunner._model_forward = _steered_model_forward  # type: ignore[method-assign]
    runners: list[type] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:  # a build without the CPU runner
        pass
    for cls in runners:
        if "load_model" in vars(cls):  # the CPU runner loads without calling the GPU one
            cls.load_model = _installing(vars(cls)["load_model"])  # type: ignore[attr-defined]


def _installing(load_model: Callable[..., Any]) -> Callable[..., Any]:
    """``load_model`` followed by :func:`install` (hooks in place before vLLM compiles)."""

    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load_model(self, *args, **kwargs)
        install(self)
        return result

    wrapped.__wrapped__ = load_model  # type: ignore[attr-defined]
    return wrapped
