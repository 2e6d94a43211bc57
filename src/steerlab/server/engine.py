"""The engine boundary of ``steerlab serve``: typed requests in, a stream of token events out.

The HTTP layer never touches a model. It builds a :class:`GenerationRequest` (vectors are named,
not sent), calls :meth:`Engine.submit`, and iterates the returned :class:`RequestStream` of
:class:`TokenEvent` objects, one per generated token. Any engine that implements :class:`Engine`
can sit behind the server: :class:`TorchEngine` here (continuous batching over a
:class:`~steerlab.model.SteeredModel`) and a vLLM engine.

What every engine must guarantee:

* ``submit`` validates the request before returning (unknown vector or condition, bad
  positions, a vector that does not fit the model, an unsupported ``op`` or ``when``) and raises
  :class:`~steerlab.errors.InvalidInputError` for the caller's mistakes; nothing is queued then.
* Steering means what it means in the library: for ``temperature == 0`` the token ids equal
  ``model.generate_ids(prompt, steering=..., positions=..., when=..., max_new_tokens=max_tokens)``
  (``chat=True`` with a single user turn), whatever else is being served at the same time.
* Positions are absolute token indices over prompt + generated tokens of *that* request
  (``"last"``, ``"prompt"``, ``"generated"``, ints, lists, slices, ``"first:K"``), or chosen by
  that request's own tokens (``"after:TEXT"``, ``"between:A,B"``, ``"outside:A,B"``, decided as
  they stream): see :mod:`steerlab.positions`.
* ``when`` names a registered :class:`~steerlab.conditions.Condition`: a prompt-level one is
  decided once on the request's prompt and holds for its whole generation (a request that does
  not satisfy it gets nothing from that entry); a per-token one gates each token.
* The last event of a stream has ``finish_reason`` set (``"stop"``: end of sequence or a stop
  string; ``"length"``: ``max_tokens`` reached; ``"cancelled"``) and nothing follows it.

>>> req = GenerationRequest(prompt="the cat", max_tokens=4, temperature=0.0,
...     steering=(SteeringEntry(vector="happy", strength=4.0, positions="last"),))
>>> req.steering[0].op, req.chat
('add', False)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from steerlab.server.registry import ConditionRegistry, VectorRegistry
from steerlab.server.requests import (
    FINISH_REASONS,
    MIN_TEMPERATURE,
    ChatMessage,
    EngineError,
    GenerationRequest,
    ReadoutEntry,
    RequestLimits,
    SteeringEntry,
    TokenEvent,
    TokenLogprob,
)
from steerlab.server.stream import RequestStream, StopMatcher
from steerlab.server.torch_engine import DEFAULT_PREFILL_CHUNK, TorchEngine

__all__ = [
    "ChatMessage",
    "ConditionRegistry",
    "DEFAULT_PREFILL_CHUNK",
    "Engine",
    "EngineError",
    "FINISH_REASONS",
    "GenerationRequest",
    "MIN_TEMPERATURE",
    "ReadoutEntry",
    "RequestLimits",
    "RequestStream",
    "SteeringEntry",
    "StopMatcher",
    "TokenEvent",
    "TokenLogprob",
    "TorchEngine",
    "VectorRegistry",
]


# --- the interface ------------------------------------------------------------------------------
@runtime_checkable
class Engine(Protocol):
    """What the HTTP layer needs from an engine.

    * ``model_id``: the served model's id (answers ``GET /v1/models``).
    * ``vectors``: the :class:`VectorRegistry` of this engine (checks vectors against its model).
    * ``conditions``: the :class:`ConditionRegistry` of this engine (``when`` names); an engine
      that cannot apply conditions refuses every registration and every ``when``.
    * ``n_layers``: decoder blocks of the model (to validate readout layers and strengths).
    * :meth:`start` / :meth:`shutdown`: start the worker(s); stop them, ending every open stream.
    * :meth:`submit`: validate ``request`` within the server's :class:`RequestLimits` (raising
      ``InvalidInputError`` naming the field; this is the only place a request is validated)
      and queue it; the returned :class:`RequestStream` yields its :class:`TokenEvent` objects.
    """

    model_id: str
    vectors: VectorRegistry
    conditions: ConditionRegistry

    @property
    def n_layers(self) -> int: ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def submit(
        self, request: GenerationRequest, *, limits: RequestLimits | None = None
    ) -> RequestStream: ...
