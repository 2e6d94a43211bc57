"""The values that cross the engine boundary of ``steerlab serve``, and their checks.

A :class:`GenerationRequest` (with its :class:`SteeringEntry`, :class:`ReadoutEntry` and
:class:`ChatMessage` parts) is what the HTTP layer hands an engine; :meth:`GenerationRequest.check`
validates everything that needs no model or registry. A :class:`TokenEvent` (with its
:class:`TokenLogprob` alternatives) is what the engine streams back, one per generated token;
:class:`EngineError` is the engine's own failure, not the caller's.

>>> GenerationRequest(prompt="hi", steering=(SteeringEntry("calm", 2.0),)).steering[0].op
'add'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from steerlab.errors import InvalidInputError, SteerlabError
from steerlab.positions import Positions, PositionSpec

__all__ = [
    "ChatMessage",
    "EngineError",
    "FINISH_REASONS",
    "GenerationRequest",
    "MIN_TEMPERATURE",
    "ReadoutEntry",
    "RequestLimits",
    "SteeringEntry",
    "TokenEvent",
    "TokenLogprob",
]

FINISH_REASONS = ("stop", "length", "cancelled")
"""Values of :attr:`TokenEvent.finish_reason` on the last event of a stream."""


class EngineError(SteerlabError, RuntimeError):
    """The engine failed while serving a request (not the caller's fault), or is not running."""


# --- requests ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of a server (``None``: no bound): its ``max_tokens`` and the
    size of each steering strength. A server hands these to :meth:`Engine.submit
    <steerlab.server.engine.Engine.submit>`, which checks them with everything else, once.

    >>> GenerationRequest(prompt="hi", max_tokens=99).check(limits=RequestLimits(max_tokens=8))
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: max_tokens 99 is over this server's cap of 8
    """

    max_tokens: int | None = None
    max_strength: float | None = None


@dataclasses.dataclass(frozen=True)
class SteeringEntry:
    """One steering term of a request: the registered vector ``vector`` times ``strength``.

    ``strength`` is a number or ``{layer: strength}`` (the vector's only direction is then used
    at each of those layers, as in :class:`~steerlab.interventions.Steering`); ``positions`` is
    any :data:`~steerlab.positions.PositionSpec`; ``op`` is the operation (``"add"``; engines
    refuse ops they do not implement); ``when`` names a registered condition that gates this
    entry (``None``: always on). ``site``, ``heads`` and ``experts`` are
    :class:`~steerlab.interventions.Steering`'s (``None``: the vector's own site, every head,
    every expert); see ``docs/sites.md``. Entries of one request compose in list order.

    >>> SteeringEntry(vector="calm", strength={15: 4.0}).positions
    'all'
    """

    vector: str
    strength: float | Mapping[int, float] = 1.0
    positions: PositionSpec = "all"
    op: str = "add"
    when: str | None = None
    site: str | None = None
    heads: tuple[int, ...] | None = None
    experts: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ReadoutEntry:
    """A probe read on every generated token: the residual stream after block ``layer``
    projected on the unit direction of the registered vector ``vector`` at that layer (its
    only direction when it has one layer). See :attr:`TokenEvent.readout` for the exact
    definition.

    >>> ReadoutEntry(vector="calm", layer=15).layer
    15
    """

    vector: str
    layer: int


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation (``role`` is ``"system"``, ``"user"``, ``"assistant"``...).

    >>> ChatMessage("user", "hello").role
    'user'
    """

    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """Everything an engine needs to serve one completion.

    ``chat=False``: ``prompt`` is tokenized as plain text (with the tokenizer's special tokens,
    as ``model.generate(prompt)`` does). ``chat=True``: the conversation is ``messages`` or, when
    that is empty, a single user turn ``prompt``; it is rendered with the model's chat template
    (generation prompt added) and tokenized without extra special tokens, as
    ``model.generate(prompt, chat=True)`` does.

    ``temperature == 0`` is greedy decoding; otherwise tokens are sampled from
    ``softmax(logits / temperature)`` restricted to the ``top_p`` nucleus, with a generator of
    the request's own seeded by ``seed`` (``None``: a fresh random seed), so concurrent requests
    never disturb each other's randomness. ``stop`` strings end the completion (the text stops
    before the match). ``logprobs`` asks for that many top alternatives per token (``0``: only
    the chosen token's log-probability; ``None``: none).

    >>> GenerationRequest(prompt="hi").max_tokens
    16
    """

    prompt: str
    chat: bool = False
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    steering: tuple[SteeringEntry, ...] = ()
    readout: tuple[ReadoutEntry, ...] = ()
    logprobs: int | None = None
    messages: tuple[ChatMessage, ...] = ()

    def check(
        self, *, limits: RequestLimits | None = None, context_length: int | None = None
    ) -> None:
        """Validate everything that does not need a model or registry; ``InvalidInputError``
        names the field. ``limits`` are the server's (:class:`RequestLimits`);
        ``context_length`` (the model's, when the engine knows it) bounds position indices;
        without it they must still fit in 64-bit arithmetic.

        >>> GenerationRequest(prompt="hi", max_tokens=0).check()
        Traceback (most recent call last):
            ...
        steerlab.errors.InvalidInputError: max_tokens must be at least 1, got 0
        >>> bad = GenerationRequest(prompt="hi", steering=(SteeringEntry("v", 1.0, 9000),))
        >>> bad.check(context_length=8192)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        steerlab.errors.InvalidInputError: steering[0].positions: index 9000 is beyond ...
        """
        if not isinstance(self.prompt, str):
            raise InvalidInputError("prompt must be a string")
        _check_text(self.prompt, "prompt")
        if not self.chat and not self.prompt:
            raise InvalidInputError("the prompt is empty")
        if self.chat and not self.messages and not self.prompt:
            raise InvalidInputError("the conversation is empty")
        for i, message in enumerate(self.messages):
            _check_text(message.role, f"messages[{i}].role")
            _check_text(message.content, f"messages[{i}].content")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidInputError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be at least 1, got {self.max_tokens}")
        limits = limits if limits is not None else RequestLimits()
        if limits.max_tokens is not None and self.max_tokens > limits.max_tokens:
            raise InvalidInputError(
                f"max_tokens {self.max_tokens} is over this server's cap of {limits.max_tokens}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidInputError(
                f"temperature must be a finite number >= 0, got {self.temperature}"
            )
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise InvalidInputError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got "
                f"{self.temperature}"
            )
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not -(2**63) <= self.seed < 2**64
        ):
            raise InvalidInputError(
                f"seed must be an integer in [-2**63, 2**64) (64-bit), got {self.seed!r}"
            )
        for i, stop in enumerate(self.stop):
            if not isinstance(stop, str) or not stop:
                raise InvalidInputError("stop strings must be non-empty strings")
            _check_text(stop, f"stop[{i}]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidInputError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        limit = _MAX_INDEX if context_length is None else context_length
        for i, entry in enumerate(self.steering):
            _check_positions(entry.positions, f"steering[{i}].positions", limit, context_length)
            strengths = (
                entry.strength.values() if isinstance(entry.strength, Mapping) else [entry.strength]
            )
            for value in strengths:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InvalidInputError(f"strength must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise InvalidInputError(f"strength must be finite, got {value}")
                cap = limits.max_strength
                if cap is not None and abs(value) > cap:
                    raise InvalidInputError(
                        f"steering[{i}].strength {value:g} is over this server's cap of {cap:g}"
                    )


MIN_TEMPERATURE = 1e-3
"""Smallest non-zero ``temperature`` a request may ask for. Below it ``logits / temperature``
can overflow float32 (``1e-300`` makes every probability inf/nan), and sampling is greedy in
all but name anyway: ask for ``0``."""

_MAX_INDEX = 2**53  # without a known context: far below int64 overflow in position arithmetic


def _check_text(value: str, field: str) -> None:
    """Refuse text that has no UTF-8 form (a lone surrogate such as ``"\\ud800"``)."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{field} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidInputError(
            f"{field} cannot be encoded as UTF-8: a lone surrogate "
            f"{value[err.start]!r} at character {err.start}"
        ) from None


def _check_positions(spec: Any, field: str, limit: int, context: int | None) -> None:
    """Parse ``spec``, check its marker texts and keep every index within ``limit``."""
    parsed = Positions.parse(spec)
    for marker in parsed.markers:
        _check_text(marker, f"{field} marker")
    numbers = (
        (parsed.start, parsed.stop)
        if parsed.mode == "slice"
        else parsed.indices
        if parsed.mode in ("indices", "first")
        else ()
    )
    for number in numbers:
        if number is not None and not -limit <= number <= limit:
            where = (
                f"the model's context of {context} tokens"
                if context is not None
                else "any context length"
            )
            raise InvalidInputError(f"{field}: index {number} is beyond {where}")


# --- events ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token (as text) and its log-probability under the model's unscaled distribution."""

    token: str
    logprob: float
    token_id: int


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request.

    ``text`` is the text this token adds to the completion. It may be empty while characters
    are held back (a partial UTF-8 sequence, or the start of a possible stop string) and may
    carry several tokens' worth of text later; the concatenated ``text`` of all events is the
    completion, exactly. ``token`` is this token alone decoded (for logprobs), ``logprob`` its
    log-probability under ``log_softmax(logits)`` of the model (before temperature), and
    ``top_logprobs`` the most likely alternatives when the request asked for them.

    ``readout`` has one value per :class:`ReadoutEntry` of the request, in order: the residual
    stream after block ``layer`` (after any steering there), at the position whose forward pass
    produced this token (the last prompt token for the first generated token, then the previous
    generated token), dotted with the unit-norm direction of the vector (float32).

    ``prompt_tokens`` and ``completion_tokens`` are the usage so far (``completion_tokens``
    counts every token the model generated, including a final end-of-sequence token).
    ``finish_reason`` is set on the last event only.
    """

    token_id: int
    text: str
    token: str = ""
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()
    readout: tuple[float, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
