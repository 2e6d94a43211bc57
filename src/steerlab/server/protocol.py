"""OpenAI's request/response schema as pydantic models, plus steerlab's ``steering``/``readout``.

Requests are parsed strictly: no coercion (``true`` is not a number or a position, ``"4"`` is
not an int, ``"yes"`` is not a boolean) and unknown fields are refused, as OpenAI's API does.
OpenAI fields steerlab does not implement (``n > 1``, penalties, ``best_of``, ``echo``,
``suffix``, ``logit_bias``, ``response_format``, ``tools``, ``tool_choice``, ``functions``,
``function_call``, ``parallel_tool_calls``, audio, ``prediction``, ``reasoning_effort``, ...) are
refused by name unless their value asks for nothing (``null``, ``n: 1``, ``tools: []``,
``response_format: {"type": "text"}``), never silently ignored. Chat roles are ``system``,
``developer`` (as ``system``), ``user`` and ``assistant``. Every refusal is a 400 whose message
starts with the field (``steering[0].positions: ...``); see :func:`validation_message`.

Two additions:

* ``steering``: ``[{"vector": NAME, "strength": 4.0 | {"15": 4.0}, "positions": "all", "op":
  "add", "when": CONDITION}]``; entries compose in list order. ``positions`` is ``"all"``,
  ``"last"``, ``"prompt"``, ``"generated"``, an int, a list of ints, or a string the CLI
  accepts (``"3"``, ``"0,2"``, ``"2:"``, ``"-3:-1"``, ``"first:4"``, ``"after:TEXT"``,
  ``"between:<think>,</think>"``, ``"outside:<think>,</think>"``): the library's parser,
  :meth:`steerlab.positions.Positions.parse`, reads it, and
  :func:`steerlab.grammar.parse_strength` reads ``strength``. ``when`` (optional) names a
  condition registered on the server. ``site`` (optional: the vector's own), ``heads`` and
  ``experts`` (optional: all) are :class:`~steerlab.interventions.Steering`'s (``docs/sites.md``).
* ``readout``: ``[{"vector": NAME, "layer": 15}]``; each choice (and each streamed chunk)
  then carries ``"readout": [{"vector", "layer", "values": [one float per generated token]}]``.

>>> req = CompletionRequest(model="default", prompt="the cat", max_tokens=4,
...                         steering=[{"vector": "happy", "strength": {"15": 4.0}}])
>>> req.steering[0].to_entry().strength
{15: 4.0}
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from steerlab.errors import InvalidInputError
from steerlab.grammar import parse_strength
from steerlab.positions import Positions
from steerlab.server.requests import (
    ChatMessage,
    GenerationRequest,
    ReadoutEntry,
    SteeringEntry,
)
from steerlab.sites import check_site

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
    "validation_message",
]

_STRICT = ConfigDict(strict=True, extra="forbid")
"""Requests are parsed without coercion (``true`` is not a number, ``"4"`` is not an int) and
unknown fields are refused, as OpenAI's API does."""


class SteeringSpec(BaseModel):
    """One entry of the ``steering`` field."""

    model_config = _STRICT

    vector: str
    strength: float | dict[str, float] = 1.0
    positions: str | int | list[int] | dict[str, Any] = "all"
    op: str = "add"
    when: str | None = None
    site: str | None = None
    heads: int | list[int] | None = None
    experts: int | list[int] | None = None

    def to_entry(self, *, field: str = "steering") -> SteeringEntry:
        """The engine's :class:`SteeringEntry`, its fields parsed by the library's grammars
        (errors name ``field``, e.g. ``steering[2]``); the engine checks the rest, with the
        server's limits, at submit."""
        # the library's parsers (one per grammar), the field named in front of their message
        strength = parse_strength(self.strength, what=f"{field}.strength")
        positions = Positions.parse(self.positions, what=f"{field}.positions")
        site = None
        if self.site is not None:
            try:
                site = check_site(self.site)
            except InvalidInputError as err:
                raise InvalidInputError(f"{field}.site: {err}") from None
        return SteeringEntry(
            vector=self.vector,
            strength=strength,
            positions=positions,
            op=self.op,
            when=self.when,
            site=site,
            heads=_indices(self.heads, f"{field}.heads"),
            experts=_indices(self.experts, f"{field}.experts"),
        )


def _indices(value: int | list[int] | None, field: str) -> tuple[int, ...] | None:
    """A ``heads``/``experts`` value as a tuple; the ranges depend on the model, and the
    engine checks them (naming ``field``)."""
    if value is None:
        return None
    items = (value,) if isinstance(value, int) else tuple(value)
    if not items:
        raise InvalidInputError(f"{field}: the list must not be empty (leave the field out)")
    return items


class ReadoutSpec(BaseModel):
    """One entry of the ``readout`` field."""

    model_config = _STRICT

    vector: str
    layer: int

    def to_entry(self) -> ReadoutEntry:
        """The engine's :class:`ReadoutEntry`."""
        return ReadoutEntry(vector=self.vector, layer=self.layer)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = _STRICT

    include_usage: bool | None = None


# OpenAI request fields this server does not implement, with the values that ask for nothing
# (accepted, so clients that send defaults keep working); any other value is refused by name.
_NO_OP: dict[str, tuple[Any, ...]] = {
    "audio": (None,),
    "best_of": (None, 1),
    "echo": (None, False),
    "frequency_penalty": (None, 0, 0.0),
    "function_call": (None, "none"),
    "functions": (None, []),
    "logit_bias": (None, {}),
    "modalities": (None, ["text"]),
    "moderation": (None,),
    "n": (None, 1),
    "parallel_tool_calls": (None,),
    "prediction": (None,),
    "presence_penalty": (None, 0, 0.0),
    "prompt_cache_options": (None,),
    "prompt_cache_retention": (None,),
    "reasoning_effort": (None,),
    "response_format": (None, {"type": "text"}),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "suffix": (None, ""),
    "tool_choice": (None, "none"),
    "tools": (None, []),
    "verbosity": (None,),
    "web_search_options": (None,),
}


class _Common(BaseModel):
    """Fields shared by completions and chat completions.

    ``user``, ``metadata``, ``safety_identifier`` and ``prompt_cache_key`` are accepted and
    change nothing (they label a request; they do not ask for different output).
    """

    model_config = _STRICT

    model: str = "default"
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    steering: list[SteeringSpec] = Field(default_factory=list)
    readout: list[ReadoutSpec] = Field(default_factory=list)
    # accepted, no effect on the output
    user: str | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # refused unless they ask for nothing (see _NO_OP)
    n: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    service_tier: Any = None
    store: Any = None

    def _refuse_unimplemented(self) -> None:
        for name in type(self).model_fields:
            if name in _NO_OP:
                value = getattr(self, name)
                if not any(
                    (value == ok and type(value) is type(ok)) or (ok == 0 and _zero(value))
                    for ok in _NO_OP[name]
                ):
                    raise InvalidInputError(
                        f"{name} is not supported by this server (got {_short(value)}); leave "
                        f"it out" + (" (only n=1 is served)" if name == "n" else "")
                    )

    def _stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise InvalidInputError(f"stop: at most 4 stop strings are allowed, got {len(stops)}")
        return tuple(stops)

    @property
    def streaming(self) -> bool:
        """Whether the answer is streamed (``stream: true``)."""
        return bool(self.stream)

    def _base(self, *, default_max_tokens: int) -> dict[str, Any]:
        self._refuse_unimplemented()
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return {
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "seed": self.seed,
            "stop": self._stops(),
            "steering": tuple(
                s.to_entry(field=f"steering[{k}]") for k, s in enumerate(self.steering)
            ),
            "readout": tuple(r.to_entry() for r in self.readout),
        }


def _zero(value: Any) -> bool:
    return type(value) in (int, float) and value == 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    logprobs: int | None = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    def to_generation(self, *, default_max_tokens: int = 16) -> GenerationRequest:
        """The engine request (raises ``InvalidInputError`` for what cannot be served)."""
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidInputError(
                    f"prompt: send one prompt per request (a list of exactly one), got "
                    f"{len(prompt)}"
                )
            prompt = prompt[0]
        base = self._base(default_max_tokens=default_max_tokens)
        return GenerationRequest(prompt=prompt, chat=False, logprobs=self.logprobs, **base)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Chat roles served (``developer`` is OpenAI's newer name for ``system``)."""


class ChatMessageIn(BaseModel):
    """A chat message; ``content`` may be a string or a list of text parts.

    Roles are ``system``, ``developer`` (rendered as ``system``), ``user`` and ``assistant``;
    tool and function turns, ``name``, ``tool_calls`` and ``function_call`` are refused.
    """

    model_config = _STRICT

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None
    refusal: Any = None

    def turn(self, field: str) -> ChatMessage:
        """This message as the engine's :class:`ChatMessage` (errors name ``field``)."""
        if self.role not in _ROLES:
            raise InvalidInputError(
                f"{field}.role {_short(self.role)} is not supported; use system, developer, user "
                f"or assistant"
            )
        for name in ("name", "tool_calls", "function_call", "audio", "refusal"):
            if getattr(self, name) is not None:
                raise InvalidInputError(f"{field}.{name} is not supported by this server")
        if self.content is None and self.role != "assistant":
            raise InvalidInputError(f"{field}.content is missing")
        text = self.text(field)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            # checked here too: a lone user turn travels as the engine's ``prompt``
            raise InvalidInputError(
                f"{field}.content cannot be encoded as UTF-8: a lone surrogate "
                f"{text[err.start]!r} at character {err.start}"
            ) from None
        return ChatMessage(_ROLES[self.role], text)

    def text(self, field: str = "message") -> str:
        """The message's text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for k, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidInputError(
                    f"{field}.content[{k}]: only text parts are supported, got type "
                    f"{_short(part.get('type'))}"
                )
            if set(part) - {"type", "text"}:
                raise InvalidInputError(
                    f"{field}.content[{k}]: unknown keys {sorted(set(part) - {'type', 'text'})}"
                )
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    modalities: Any = None
    moderation: Any = None
    parallel_tool_calls: Any = None
    prediction: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    response_format: Any = None
    tool_choice: Any = None
    tools: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    def to_generation(self, *, default_max_tokens: int = 16) -> GenerationRequest:
        """The engine request: a single user turn is ``prompt`` (as ``generate(chat=True)``),
        any other conversation goes in ``messages``."""
        if not self.messages:
            raise InvalidInputError("messages must not be empty")
        turns = tuple(m.turn(f"messages[{k}]") for k, m in enumerate(self.messages))
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise InvalidInputError(
                    "max_tokens and max_completion_tokens differ; send one of them"
                )
        base = self._base(default_max_tokens=default_max_tokens)
        if self.max_tokens is None and self.max_completion_tokens is not None:
            base["max_tokens"] = self.max_completion_tokens
        logprobs = None
        if self.logprobs:
            logprobs = self.top_logprobs or 0
        elif self.top_logprobs:
            raise InvalidInputError("top_logprobs needs logprobs: true")
        if len(turns) == 1 and turns[0].role == "user":
            return GenerationRequest(prompt=turns[0].content, chat=True, logprobs=logprobs, **base)
        return GenerationRequest(prompt="", chat=True, messages=turns, logprobs=logprobs, **base)


class VectorUpload(BaseModel):
    """``POST /v1/vectors`` as JSON: the vector file's bytes, base64-encoded."""

    model_config = ConfigDict(extra="forbid")

    name: str
    data: str = Field(description="base64 of the .safetensors file")


def validation_message(problems: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """A pydantic error list as ``(message, param)``: each problem as ``field: what is wrong``
    with the field written as in the request (``steering[0].positions``), the alternatives of
    a union folded into one line; ``param`` is the first field.

    >>> problems = [{"loc": ("body", "steering", 0, "strength", "float"), "msg": "Input should be a"
    ...              " valid number", "input": True, "type": "float_type"},
    ...             {"loc": ("body", "steering", 0, "strength", "dict[str,float]"), "msg": "Input "
    ...              "should be a valid dictionary", "input": True, "type": "dict_type"}]
    >>> validation_message(problems)
    ('steering[0].strength: true is not a number or a mapping of them', 'steering[0].strength')
    """
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for problem in problems:
        path = ""
        for part in problem.get("loc", ()):
            if part == "body" and not path:
                continue
            if isinstance(part, int):
                path += f"[{part}]"
            elif isinstance(part, str) and _TYPE_TAG.fullmatch(part):
                continue  # which member of a union was tried, not a field
            else:
                path += f".{part}" if path else str(part)
        grouped.setdefault(path, []).append(problem)
    lines = []
    for path, found in list(grouped.items())[:5]:
        first = found[0]
        shown = _json_repr(first.get("input"))
        kind = str(first.get("type", ""))
        if kind == "extra_forbidden":
            what = "unknown field (this server does not implement it)"
        elif kind == "missing":
            what = "required"
        elif len(found) > 1 or kind.endswith("_type") or kind.startswith("int_"):
            expected = _expected(found)
            what = f"{shown} is not {expected}" if expected else str(first.get("msg"))
        else:
            what = f"{first.get('msg', 'invalid')} (got {shown})"
        lines.append(f"{path or 'body'}: {what}")
    params = [p for p in grouped if p]
    return "; ".join(lines), (params[0] if params else None)


_TYPE_TAG = re.compile(r"(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\])")
_TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "a boolean",
    "list_type": "a list",
    "dict_type": "a mapping of them",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "none_required": "null",
}


def _expected(found: Sequence[Mapping[str, Any]]) -> str:
    words = list(dict.fromkeys(_TYPE_WORDS.get(str(p.get("type")), "") for p in found))
    words = [w for w in words if w]
    if not words:
        return ""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _json_repr(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
