"""OpenAI's request/response schema as pydantic models, plus steerlab's ``steering``/``readout``.

Requests accept the fields OpenAI clients send; fields steerlab cannot honour (``n > 1``,
non-zero penalties, ``best_of``, ``echo``, ``logit_bias``, tools) are refused with a 400 rather
than silently ignored. Unknown extra fields are ignored, as OpenAI-compatible servers do.

Two additions:

* ``steering``: ``[{"vector": NAME, "strength": 4.0 | {"15": 4.0}, "positions": "all", "op":
  "add", "when": CONDITION}]``; entries compose in list order. ``positions`` is ``"all"``,
  ``"last"``, ``"prompt"``, ``"generated"``, an int, a list of ints, or a string the CLI
  accepts (``"3"``, ``"0,2"``, ``"2:"``, ``"-3:-1"``, ``"first:4"``, ``"after:TEXT"``,
  ``"between:<think>,</think>"``, ``"outside:<think>,</think>"``). ``when`` (optional) names a
  condition registered on the server.
* ``readout``: ``[{"vector": NAME, "layer": 15}]``; each choice (and each streamed chunk)
  then carries ``"readout": [{"vector", "layer", "values": [one float per generated token]}]``.

>>> req = CompletionRequest(model="default", prompt="the cat", max_tokens=4,
...                         steering=[{"vector": "happy", "strength": {"15": 4.0}}])
>>> req.steering[0].to_entry().strength
{15: 4.0}
>>> parse_positions("2:")
slice(2, None, None)
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from steerlab.errors import InvalidInputError
from steerlab.positions import Positions, PositionSpec
from steerlab.server.engine import (
    ChatMessage,
    GenerationRequest,
    ReadoutEntry,
    SteeringEntry,
)

__all__ = [
    "ChatCompletionRequest",
    "ChatMessageIn",
    "CompletionRequest",
    "ErrorBody",
    "ErrorResponse",
    "ReadoutSpec",
    "SteeringSpec",
    "VectorUpload",
    "error_body",
    "new_id",
    "parse_positions",
]

_MODES = ("all", "last", "prompt", "generated")
_CONTENT = ("first", "after", "between", "outside")


def parse_positions(spec: Any) -> PositionSpec:
    """A JSON ``positions`` value as a library position spec, or ``InvalidInputError``.

    >>> parse_positions("last"), parse_positions(3), parse_positions("0,2"), parse_positions("-3:")
    ('last', 3, [0, 2], slice(-3, None, None))
    >>> parse_positions("after: Yes"), parse_positions("between:<think>,</think>")
    ('after: Yes', 'between:<think>,</think>')
    """
    result: PositionSpec
    if isinstance(spec, str) and spec.partition(":")[0].strip() in _CONTENT:
        text = spec.lstrip()  # not rstrip: a marker's own spaces are part of it
        Positions.parse(text)
        return text
    if isinstance(spec, bool):
        raise InvalidInputError(f"positions must not be a boolean, got {spec!r}")
    if isinstance(spec, int):
        result = spec
    elif isinstance(spec, list):
        if not spec or any(isinstance(v, bool) or not isinstance(v, int) for v in spec):
            raise InvalidInputError(f"positions list must hold integers, got {spec!r}")
        result = list(spec)
    elif isinstance(spec, str):
        text = spec.strip()
        try:
            if text in _MODES:
                result = text  # type: ignore[assignment]
            elif ":" in text:
                parts = [int(p) if p.strip() else None for p in text.split(":")]
                if len(parts) > 3:
                    raise ValueError
                result = slice(*parts)
            elif "," in text:
                result = [int(p) for p in text.split(",")]
            else:
                result = int(text)
        except ValueError:
            raise InvalidInputError(
                f"unknown positions {spec!r}; use one of {', '.join(_MODES)}, an index, a list "
                f"of indices ('0,2'), a slice ('2:', '-3:-1'), first:K, after:TEXT, "
                f"between:A,B or outside:A,B"
            ) from None
    else:
        raise InvalidInputError(f"cannot interpret positions {spec!r}")
    Positions.parse(result)
    return result


class SteeringSpec(BaseModel):
    """One entry of the ``steering`` field."""

    model_config = ConfigDict(extra="forbid")

    vector: str
    strength: float | dict[str, float] = 1.0
    positions: str | int | list[int] = "all"
    op: str = "add"
    when: str | None = None

    def to_entry(self, *, max_strength: float | None = None) -> SteeringEntry:
        """The engine's :class:`SteeringEntry`, checking finiteness and the strength cap."""
        strength: float | dict[int, float]
        if isinstance(self.strength, dict):
            if not self.strength:
                raise InvalidInputError("a per-layer strength mapping must not be empty")
            strength = {}
            for key, value in self.strength.items():
                try:
                    layer = int(key)
                except ValueError:
                    raise InvalidInputError(
                        f"per-layer strength keys must be layer numbers, got {key!r}"
                    ) from None
                strength[layer] = _check_strength(value, max_strength)
        else:
            strength = _check_strength(self.strength, max_strength)
        return SteeringEntry(
            vector=self.vector,
            strength=strength,
            positions=parse_positions(self.positions),
            op=self.op,
            when=self.when,
        )


def _check_strength(value: float, cap: float | None) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise InvalidInputError(f"strength must be finite, got {value}")
    if cap is not None and abs(number) > cap:
        raise InvalidInputError(f"strength {number:g} is over this server's cap of {cap:g}")
    return number


class ReadoutSpec(BaseModel):
    """One entry of the ``readout`` field."""

    model_config = ConfigDict(extra="forbid")

    vector: str
    layer: int

    def to_entry(self) -> ReadoutEntry:
        """The engine's :class:`ReadoutEntry`."""
        return ReadoutEntry(vector=self.vector, layer=self.layer)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = "default"
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    steering: list[SteeringSpec] = Field(default_factory=list)
    readout: list[ReadoutSpec] = Field(default_factory=list)

    def _check_common(self) -> None:
        if self.n != 1:
            raise InvalidInputError("only n=1 is supported")
        if self.presence_penalty or self.frequency_penalty:
            raise InvalidInputError("presence and frequency penalties are not supported")
        if self.logit_bias:
            raise InvalidInputError("logit_bias is not supported")

    def _stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise InvalidInputError("at most 4 stop strings are allowed")
        return tuple(stops)

    def _base(self, *, default_max_tokens: int, max_strength: float | None) -> dict[str, Any]:
        self._check_common()
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self._stops(),
            "steering": tuple(s.to_entry(max_strength=max_strength) for s in self.steering),
            "readout": tuple(r.to_entry() for r in self.readout),
        }


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def to_generation(
        self, *, default_max_tokens: int = 16, max_strength: float | None = None
    ) -> GenerationRequest:
        """The engine request (raises ``InvalidInputError`` for what cannot be served)."""
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidInputError("send one prompt per request (a list of exactly one)")
            prompt = prompt[0]
        if self.echo:
            raise InvalidInputError("echo is not supported")
        if self.best_of not in (None, 1):
            raise InvalidInputError("best_of is not supported")
        if self.suffix:
            raise InvalidInputError("suffix is not supported")
        base = self._base(default_max_tokens=default_max_tokens, max_strength=max_strength)
        return GenerationRequest(prompt=prompt, chat=False, logprobs=self.logprobs, **base)


class ChatMessageIn(BaseModel):
    """A chat message; ``content`` may be a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidInputError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None

    def to_generation(
        self, *, default_max_tokens: int = 16, max_strength: float | None = None
    ) -> GenerationRequest:
        """The engine request: a single user turn is ``prompt`` (as ``generate(chat=True)``),
        any other conversation goes in ``messages``."""
        if not self.messages:
            raise InvalidInputError("messages must not be empty")
        if self.tools:
            raise InvalidInputError("tools are not supported")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        base = self._base(default_max_tokens=default_max_tokens, max_strength=max_strength)
        logprobs = None
        if self.logprobs:
            logprobs = self.top_logprobs or 0
        elif self.top_logprobs:
            raise InvalidInputError("top_logprobs needs logprobs: true")
        turns = tuple(ChatMessage(m.role, m.text()) for m in self.messages)
        if len(turns) == 1 and turns[0].role == "user":
            return GenerationRequest(prompt=turns[0].content, chat=True, logprobs=logprobs, **base)
        return GenerationRequest(prompt="", chat=True, messages=turns, logprobs=logprobs, **base)


class VectorUpload(BaseModel):
    """``POST /v1/vectors`` as JSON: the vector file's bytes, base64-encoded."""

    model_config = ConfigDict(extra="forbid")

    name: str
    data: str = Field(description="base64 of the .safetensors file")


# --- responses -----------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``."""

    error: ErrorBody


def error_body(
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """An OpenAI-format error payload.

    >>> error_body("no such model", code="model_not_found")["error"]["code"]
    'model_not_found'
    """
    return ErrorResponse(
        error=ErrorBody(message=message, type=kind, param=param, code=code)
    ).model_dump()


def new_id(prefix: str) -> str:
    """A fresh response id like OpenAI's (``cmpl-...``, ``chatcmpl-...``)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix time in seconds (the ``created`` field)."""
    return int(time.time())


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ReadoutTrace(BaseModel):
    """Per-token probe scores of one readout entry."""

    vector: str
    layer: int
    values: list[float]


class CompletionLogprobs(BaseModel):
    """Legacy completions' ``logprobs`` object."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One choice of a completion (or a streamed completion chunk)."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None = None
    readout: list[ReadoutTrace] | None = None


class CompletionResponse(BaseModel):
    """``text_completion`` object (also each streamed chunk, then without usage)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    """One alternative token of chat logprobs."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    """One generated token of chat logprobs."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """Chat ``logprobs`` object."""

    content: list[ChatTokenLogprob] | None


class ChatMessageOut(BaseModel):
    """The assistant's message."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None = None
    readout: list[ReadoutTrace] | None = None


class ChatCompletionResponse(BaseModel):
    """``chat.completion`` object."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """The ``delta`` of a streamed chat chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a streamed chat chunk."""

    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None = None
    readout: list[ReadoutTrace] | None = None


class ChatCompletionChunk(BaseModel):
    """``chat.completion.chunk`` object."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
