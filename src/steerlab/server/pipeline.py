"""The serving pipeline both engines of ``steerlab serve`` share.

A request goes through the same stages whichever engine serves it::

    GenerationRequest -> encode -> plan (steering, readout probes, context) -> engine steps -> emit

:class:`Planner` does everything before the first step, once per request, in the caller's
thread: it checks the request, turns its prompt into token ids with
:func:`steerlab.prompts.encode_prompts` (the library's own encoding), builds one
:class:`~steerlab.interventions.Steering` per entry and one :class:`Probe` per readout entry,
and checks that the prompt plus ``max_tokens`` fits the engine's context. The result is a
:class:`Plan`, which the engine keeps for the request's whole life (no step rebuilds it).
:class:`Emitter` turns each chosen token into the request's :class:`TokenEvent`: decoded text,
stop strings, end of sequence, logprobs, readout values. The torch engine
(:mod:`steerlab.server.torch_engine`) and the vLLM engine (:mod:`steerlab.vllm.engine`) differ
only in how they run a step and what they refuse.

>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> planner = Planner(model.tokenizer, n_layers=model.n_layers, d_model=model.d_model)
>>> plan = planner.plan(GenerationRequest(prompt="the cat", max_tokens=2, temperature=0.0))
>>> list(plan.prompt_ids) == model.encode("the cat").input_ids[0].tolist()
True
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from steerlab.errors import InvalidInputError, LayerIndexError
from steerlab.interventions import Steering, direction_at
from steerlab.positions import Positions
from steerlab.prompts import encode_prompts
from steerlab.server.registry import ConditionRegistry, VectorRegistry
from steerlab.server.requests import (
    GenerationRequest,
    ReadoutEntry,
    RequestLimits,
    SteeringEntry,
    TokenEvent,
    TokenLogprob,
)
from steerlab.server.stream import StopMatcher

__all__ = ["Emitter", "Plan", "Planner", "Probe", "RequestState"]


@dataclasses.dataclass(frozen=True)
class Probe:
    """One readout of a request: the residual stream after block ``layer`` dotted with the
    unit float32 ``direction`` (see :attr:`TokenEvent.readout`)."""

    layer: int
    direction: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Plan:
    """What an engine needs to serve one request, built once by :meth:`Planner.plan`."""

    request: GenerationRequest
    prompt_ids: tuple[int, ...]
    steerings: tuple[Steering, ...]
    probes: tuple[Probe, ...]


@dataclasses.dataclass
class RequestState:
    """The emitted side of one request: its generated ids and its stop-string matcher."""

    plan: Plan
    generated: list[int] = dataclasses.field(default_factory=list)
    matcher: StopMatcher = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.plan.request.stop)


class Planner:
    """Build each request's :class:`Plan` (see the module doc) for one engine's model.

    ``context_length`` bounds prompt + ``max_tokens`` (``context_name`` says whose limit it is
    in the error). The engine's own refusals: ``check_entry`` sees each steering entry first
    (a ``when`` it cannot apply), ``site_options`` turns an entry's ``site``/``heads``/
    ``experts`` into :class:`~steerlab.interventions.Steering` options for its model,
    ``check_steering`` each built
    :class:`~steerlab.interventions.Steering` (layers, sites, operators it can run),
    ``check_readout_vector`` each readout vector; ``bind_positions`` turns text markers of
    ``"after:..."``-style positions into token ids, as ``model.generate`` does. ``lock`` guards
    the tokenizer (shared with the engine's :class:`Emitter`).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        n_layers: int,
        d_model: int,
        vectors: VectorRegistry | None = None,
        conditions: ConditionRegistry | None = None,
        context_length: int | None = None,
        context_name: str = "the model's context",
        check_entry: Callable[[SteeringEntry, str], None] | None = None,
        site_options: Callable[[SteeringEntry, Any, str], dict[str, Any]] | None = None,
        check_steering: Callable[[Steering, str], None] | None = None,
        check_readout_vector: Callable[[Any], None] | None = None,
        bind_positions: bool = True,
        lock: threading.Lock | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.n_layers = n_layers
        self.d_model = d_model
        self.vectors = vectors if vectors is not None else VectorRegistry()
        self.conditions = conditions if conditions is not None else ConditionRegistry()
        self.context_length = context_length
        self.context_name = context_name
        self.check_entry = check_entry
        self.site_options = site_options
        self.check_steering = check_steering
        self.check_readout_vector = check_readout_vector
        self.bind_positions = bind_positions
        self.lock = lock if lock is not None else threading.Lock()
        self._max_chars: int | None = None  # see check_length

    def plan(self, request: GenerationRequest, *, limits: RequestLimits | None = None) -> Plan:
        """Check ``request`` (against the server's ``limits`` too) and build its plan;
        ``InvalidInputError`` names the field. This is the one place a request is validated:
        both engines' ``submit`` call it, and the HTTP layer only parses."""
        if not isinstance(request, GenerationRequest):
            raise InvalidInputError(f"not a GenerationRequest: {type(request).__name__}")
        request.check(limits=limits, context_length=self.context_length)
        steerings = tuple(
            self.steering(entry, f"steering[{i}]") for i, entry in enumerate(request.steering)
        )
        probes = tuple(self.probe(entry) for entry in request.readout)
        self.check_length(request)
        prompt_ids = self.encode(request)
        if self.context_length is not None:
            if len(prompt_ids) + request.max_tokens > self.context_length:
                raise InvalidInputError(
                    f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({request.max_tokens}) "
                    f"exceeds {self.context_name} of {self.context_length} tokens"
                )
        return Plan(request, tuple(prompt_ids), steerings, probes)

    def check_length(self, request: GenerationRequest) -> None:
        """Refuse text far too long for the context before tokenizing it: tokenizing holds
        the tokenizer lock that every running stream needs to detokenize its next token, so a
        4-million-character prompt would freeze them all for seconds. No token decodes to more
        characters than the longest vocabulary entry; the factor 4 covers normalizers that
        shrink text (composed accents), so only prompts that cannot fit are refused here."""
        if self.context_length is None:
            return
        if self._max_chars is None:
            with self.lock:
                vocab = self.tokenizer.get_vocab()
            self._max_chars = 4 * self.context_length * max(16, *(len(t) for t in vocab))
        field, chars = "prompt", len(request.prompt)
        if request.messages:
            field, chars = "messages", sum(len(m.content) for m in request.messages)
        if chars > self._max_chars:
            raise InvalidInputError(
                f"{field} has {chars} characters, more than a {self.context_length}-token "
                f"context can hold (at most {self._max_chars} characters for this tokenizer)"
            )

    def encode(self, request: GenerationRequest) -> list[int]:
        """The request's prompt ids: :func:`~steerlab.prompts.encode_prompts` of its text, or
        with ``chat=True`` of its conversation (``messages``, else one user turn ``prompt``)."""
        prompt: Any = request.prompt
        if request.chat and request.messages:
            prompt = [{"role": m.role, "content": m.content} for m in request.messages]
        with self.lock:
            [ids] = encode_prompts(self.tokenizer, [prompt], chat=request.chat)
        return ids

    def steering(self, entry: SteeringEntry, field: str = "steering") -> Steering:
        """The :class:`~steerlab.interventions.Steering` of one request entry (``field``
        names it in errors, e.g. ``steering[0]``)."""
        if not isinstance(entry, SteeringEntry):
            raise InvalidInputError(f"not a SteeringEntry: {entry!r}")
        if self.check_entry is not None:
            self.check_entry(entry, field)
        vector = self.vectors.get(entry.vector)
        when = None if entry.when is None else self.conditions.get(entry.when)
        strength: Any = entry.strength
        if isinstance(strength, Mapping):
            strength = {int(k): float(v) for k, v in strength.items()}
        positions: Any = entry.positions
        if self.bind_positions:
            parsed = Positions.parse(positions)
            if not parsed.bound:
                with self.lock:  # text markers become ids as model.generate binds them
                    parsed = parsed.bind(self.tokenizer)
            positions = parsed
        options: dict[str, Any] = {"strength": strength, "positions": positions, "when": when}
        if entry.op != "add":
            options["op"] = entry.op
        if self.site_options is not None:
            options |= self.site_options(entry, vector, field)
        steering = Steering(vector, **options)
        if self.check_steering is not None:
            self.check_steering(steering, field)
        return steering

    def probe(self, entry: ReadoutEntry) -> Probe:
        """The unit direction and layer one readout entry reads."""
        if not isinstance(entry, ReadoutEntry):
            raise InvalidInputError(f"not a ReadoutEntry: {entry!r}")
        vector = self.vectors.get(entry.vector)
        if self.check_readout_vector is not None:
            self.check_readout_vector(vector)
        if vector.site != "resid":  # readouts project the residual stream at a block's output
            raise InvalidInputError(
                f"readout vector {entry.vector!r} is for site {vector.site!r}; a readout "
                f"projects the residual stream (site 'resid')"
            )
        layer = entry.layer
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise InvalidInputError(f"readout layer must be an int, got {layer!r}")
        if not -self.n_layers <= layer < self.n_layers:
            raise LayerIndexError(
                f"readout layer {layer} is out of range for a model with {self.n_layers} layers "
                f"(valid: {-self.n_layers}..{self.n_layers - 1})"
            )
        layer %= self.n_layers
        direction = direction_at(vector.directions, layer, use="read", known=vector.layers)
        direction = direction.detach().to(torch.float32).cpu()
        norm = float(direction.norm())
        if not norm > 0:
            raise InvalidInputError(f"vector {entry.vector!r} has a zero direction at {layer}")
        return Probe(layer, direction / norm)


class Emitter:
    """Turn a request's chosen tokens into its :class:`TokenEvent` objects (text, stop
    strings, end of sequence, logprobs, readout), the same for every engine."""

    def __init__(self, tokenizer: Any, *, lock: threading.Lock | None = None) -> None:
        self.tokenizer = tokenizer
        self.lock = lock if lock is not None else threading.Lock()
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos: frozenset[int] = frozenset(
            [eos] if isinstance(eos, int) else [int(e) for e in (eos or [])]
        )

    def emit(
        self,
        state: RequestState,
        token: int,
        *,
        logprob: float | None = None,
        top: Iterable[tuple[int, float]] = (),
        readout: tuple[float, ...] = (),
    ) -> TokenEvent:
        """Record ``token`` (chosen with ``logprob``; ``top``: the alternatives the request
        asked for, best first) and return its event; the last event has ``finish_reason``."""
        request = state.plan.request
        state.generated.append(token)
        is_eos = token in self.eos
        tokenizer = self.tokenizer
        with self.lock:
            text_ids = state.generated[:-1] if is_eos else state.generated
            text = tokenizer.decode(text_ids, skip_special_tokens=True)
            piece = "" if is_eos else tokenizer.decode([token], skip_special_tokens=True)
            alternatives = tuple(
                TokenLogprob(tokenizer.decode([int(i)]), float(v), int(i)) for i, v in top
            )
        done = is_eos or len(state.generated) >= request.max_tokens
        delta, stopped = state.matcher.feed(text, final=done)
        finish = "stop" if stopped or is_eos else "length" if done else None
        return TokenEvent(
            token_id=token,
            text=delta,
            token=piece,
            logprob=logprob,
            top_logprobs=alternatives,
            readout=readout,
            finish_reason=finish,
            prompt_tokens=len(state.plan.prompt_ids),
            completion_tokens=len(state.generated),
        )

    def closing(self, state: RequestState, reason: str) -> TokenEvent:
        """The last event when the stream ends without a token of its own (``"cancelled"``,
        or an engine that stopped the request itself): the text held back, then nothing."""
        delta = ""
        if reason != "cancelled":
            with self.lock:
                text = self.tokenizer.decode(state.generated, skip_special_tokens=True)
            delta, _ = state.matcher.feed(text, final=True)
        return TokenEvent(
            token_id=-1,
            text=delta,
            finish_reason=reason,
            prompt_tokens=len(state.plan.prompt_ids),
            completion_tokens=len(state.generated),
        )
