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

import asyncio
import dataclasses
import math
import os
import queue
import re
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from steerlab.conditions import Condition
from steerlab.errors import InvalidInputError, SteerlabError
from steerlab.interventions import SequenceState
from steerlab.positions import Positions, PositionSpec
from steerlab.vectors import SteeringVector

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
    "RequestStream",
    "SteeringEntry",
    "StopMatcher",
    "TokenEvent",
    "TokenLogprob",
    "TorchEngine",
    "VectorRegistry",
]

FINISH_REASONS = ("stop", "length", "cancelled")
"""Values of :attr:`TokenEvent.finish_reason` on the last event of a stream."""

DEFAULT_PREFILL_CHUNK = 256
"""Prompt tokens :class:`TorchEngine` reads per forward pass by default (chunked prefill)."""
_MIN_CHUNK = 16  # a timed piece is never cut below this (progress, and a meaningful timing)

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


class EngineError(SteerlabError, RuntimeError):
    """The engine failed while serving a request (not the caller's fault), or is not running."""


# --- requests ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SteeringEntry:
    """One steering term of a request: the registered vector ``vector`` times ``strength``.

    ``strength`` is a number or ``{layer: strength}`` (the vector's only direction is then used
    at each of those layers, as in :class:`~steerlab.interventions.Steering`); ``positions`` is
    any :data:`~steerlab.positions.PositionSpec`; ``op`` is the operation (``"add"``; engines
    refuse ops they do not implement); ``when`` names a registered condition that gates this
    entry (``None``: always on). Entries of one request compose in list order.

    >>> SteeringEntry(vector="calm", strength={15: 4.0}).positions
    'all'
    """

    vector: str
    strength: float | Mapping[int, float] = 1.0
    positions: PositionSpec = "all"
    op: str = "add"
    when: str | None = None


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
        self, *, max_tokens_cap: int | None = None, context_length: int | None = None
    ) -> None:
        """Validate everything that does not need a model or registry; ``InvalidInputError``
        names the field. ``context_length`` (the model's, when the engine knows it) bounds
        position indices; without it they must still fit in 64-bit arithmetic.

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
        if max_tokens_cap is not None and self.max_tokens > max_tokens_cap:
            raise InvalidInputError(
                f"max_tokens {self.max_tokens} is over this server's cap of {max_tokens_cap}"
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


_END = object()


class RequestStream:
    """The events of one submitted request; iterate it (``async for`` or ``for``), or cancel it.

    Engines feed it from their worker thread with :meth:`put` / :meth:`fail`; consumers read it
    from an event loop or from a plain thread. :meth:`cancel` asks the engine to drop the
    request at the next step boundary; the stream then ends with a ``"cancelled"`` event.

    >>> stream = RequestStream("r1")
    >>> stream.put(TokenEvent(token_id=5, text="hi", finish_reason="length"))
    >>> [e.text for e in stream]
    ['hi']
    """

    def __init__(self, request_id: str, on_cancel: Callable[[], None] | None = None) -> None:
        self.request_id = request_id
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancelled = False
        self._closed = False

    # producer side (engine worker) ------------------------------------------------------------
    def put(self, event: TokenEvent) -> None:
        """Deliver one event (engine side). The event with ``finish_reason`` closes the stream."""
        self._push(event)
        if event.finish_reason is not None:
            self._push(_END)

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error``, raised to the consumer (engine side)."""
        self._push(error)

    def _push(self, item: Any) -> None:
        with self._lock:
            if self._closed:
                return
            if item is _END or isinstance(item, BaseException):
                self._closed = True
            self._queue.put(item)
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop is gone; nobody is waiting any more
                pass

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancelled

    # consumer side ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to stop generating for this request (idempotent)."""
        if self._cancelled:
            return
        self._cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    def _take(self, item: Any) -> TokenEvent:
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, TokenEvent)
        return item

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            try:
                yield self._take(self._queue.get())
            except StopIteration:
                return

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                wake = asyncio.Event()
                with self._lock:
                    if self._queue.empty():
                        self._waiters.append((loop, wake))
                    else:
                        wake.set()
                await wake.wait()
                continue
            try:
                yield self._take(item)
            except StopIteration:
                return


# --- the registries of named vectors and conditions -------------------------------------------
_T = TypeVar("_T")


class _Registry(Generic[_T]):
    """``name -> item``, thread-safe, each item checked on registration (see subclasses)."""

    kind = "item"

    def __init__(self, check: Callable[[_T], None] | None = None) -> None:
        self._check = check
        self._items: dict[str, _T] = {}
        self._lock = threading.Lock()

    @classmethod
    def check_name(cls, name: str) -> str:
        """``name`` if it is a valid name (letters, digits, ``_ . -``; 128 chars at most)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInputError(
                f"invalid {cls.kind} name {name!r}: use letters, digits, '_', '.', '-' "
                f"(at most 128 characters, not starting with '.' or '-')"
            )
        return name

    def _accepts(self, item: object) -> bool:
        raise NotImplementedError

    def _load(self, file: Path) -> _T:
        raise NotImplementedError

    def register(self, name: str, item: _T) -> None:
        """Add ``item`` under ``name`` after checking it fits the model; names are unique."""
        self.check_name(name)
        if not self._accepts(item):
            raise InvalidInputError(f"not a {self.kind}: {type(item).__name__}")
        if self._check is not None:
            self._check(item)
        with self._lock:
            if name in self._items:
                raise InvalidInputError(f"a {self.kind} named {name!r} is already registered")
            self._items[name] = item

    def register_file(self, path: str | os.PathLike[str], name: str | None = None) -> str:
        """Load a steerlab file and register it under ``name`` (default: the file stem)."""
        file = Path(path)
        chosen = file.stem if name is None else name
        self.check_name(chosen)
        self.register(chosen, self._load(file))
        return chosen

    def register_bytes(self, name: str, data: bytes) -> None:
        """Register the file whose content is ``data`` (as uploaded)."""
        self.check_name(name)
        with tempfile.TemporaryDirectory(prefix="steerlab-upload-") as folder:
            file = Path(folder, f"{name}.safetensors")
            file.write_bytes(data)
            item = self._load(file)
        self.register(name, item)

    def register_dir(self, folder: str | os.PathLike[str]) -> list[str]:
        """Register every ``folder/*.safetensors`` under its stem; returns the names (sorted)."""
        path = Path(folder)
        if not path.is_dir():
            raise InvalidInputError(f"{self.kind} folder {path} does not exist")
        return [self.register_file(file) for file in sorted(path.glob("*.safetensors"))]

    def get(self, name: str) -> _T:
        """The item registered as ``name``, or ``InvalidInputError`` naming the known ones."""
        with self._lock:
            item = self._items.get(name)
            known = sorted(self._items)
        if item is None:
            raise InvalidInputError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(known) or 'none'}"
            )
        return item

    def remove(self, name: str) -> _T | None:
        """Unregister ``name``; returns its item, or ``None`` if nothing had that name.
        Requests already submitted hold the item itself and are unaffected."""
        with self._lock:
            return self._items.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        with self._lock:
            return sorted(self._items)

    def items(self) -> list[tuple[str, _T]]:
        """``(name, item)`` pairs, sorted by name."""
        with self._lock:
            return sorted(self._items.items(), key=lambda pair: pair[0])

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class VectorRegistry(_Registry[SteeringVector]):
    """Named steering vectors a server can use: ``name -> SteeringVector``, thread-safe.

    ``check`` (given by the engine) refuses vectors that do not fit the served model; it runs on
    every registration. Files go through :meth:`SteeringVector.load`'s validation, bytes through
    the very same code (written to a temporary file first).

    >>> import torch
    >>> reg = VectorRegistry()
    >>> reg.register("calm", SteeringVector({1: torch.ones(4)}))
    >>> "calm" in reg, reg.names()
    (True, ['calm'])
    >>> reg.register("calm", SteeringVector({1: torch.ones(4)}))
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: a vector named 'calm' is already registered
    """

    kind = "vector"

    def _accepts(self, item: object) -> bool:
        return isinstance(item, SteeringVector)

    def _load(self, file: Path) -> SteeringVector:
        return SteeringVector.load(file)


class ConditionRegistry(_Registry[Condition]):
    """Named conditions (:class:`~steerlab.conditions.Condition`) that steering entries name in
    ``when``, thread-safe; files go through :meth:`Condition.load`'s validation (format,
    checksum), and ``check`` (given by the engine) refuses conditions the model cannot read.

    >>> import torch
    >>> reg = ConditionRegistry()
    >>> reg.register("cats", Condition(torch.ones(4), layer=1, threshold=0.5))
    >>> reg.get("dogs")
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: unknown condition 'dogs'; registered: cats
    """

    kind = "condition"

    def _accepts(self, item: object) -> bool:
        return isinstance(item, Condition)

    def _load(self, file: Path) -> Condition:
        return Condition.load(file)


# --- stop strings and incremental text ------------------------------------------------------------
class StopMatcher:
    """Turns the decoded text so far into safe-to-emit deltas, honouring stop strings.

    Feed it the full decoded completion after each token; it returns the new text that can be
    sent (holding back a trailing partial UTF-8 character and any tail that could still become a
    stop string) and whether a stop string matched (then the text ends right before it).

    >>> m = StopMatcher(("\\n\\n",))
    >>> m.feed("Hello"), m.feed("Hello\\n"), m.feed("Hello\\n\\nBye")
    (('Hello', False), ('', False), ('', True))
    >>> m.emitted
    'Hello'
    """

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self.stop = tuple(stop)
        self.emitted = ""
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def feed(self, text: str, *, final: bool = False) -> tuple[str, bool]:
        """``(delta, stopped)`` for the full decoded text ``text``; ``final`` flushes all."""
        cut: int | None = None
        for s in self.stop:
            # only search where a new match can start: the held-back tail plus the new text
            at = text.find(s, max(0, len(self.emitted) - len(s)))
            if at >= 0 and (cut is None or at < cut):
                cut = at
        if cut is not None:
            return self._advance(text[:cut]), True
        if final:
            return self._advance(text), False
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            safe = len(text.rstrip("\ufffd"))
        if self.stop:
            for k in range(min(self._hold, safe), 0, -1):
                tail = text[safe - k : safe]
                if any(s.startswith(tail) for s in self.stop):
                    safe -= k
                    break
        return self._advance(text[:safe]), False

    def _advance(self, upto: str) -> str:
        if len(upto) <= len(self.emitted) or not upto.startswith(self.emitted):
            # the decoded prefix changed (a tokenizer that merges across tokens): send nothing
            # more than what is consistent with what was already sent
            return ""
        delta = upto[len(self.emitted) :]
        self.emitted = upto
        return delta


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
    * :meth:`submit`: validate ``request`` (raising ``InvalidInputError``) and queue it; the
      returned :class:`RequestStream` yields its :class:`TokenEvent` objects.
    """

    model_id: str
    vectors: VectorRegistry
    conditions: ConditionRegistry

    @property
    def n_layers(self) -> int: ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def submit(self, request: GenerationRequest) -> RequestStream: ...


# --- the torch engine -----------------------------------------------------------------------------
@dataclasses.dataclass
class _Readout:
    layer: int
    direction: Any  # unit float32 tensor [d_model]


@dataclasses.dataclass
class _Job:
    """A request inside the torch engine (owned by the worker thread once queued)."""

    request: GenerationRequest
    stream: RequestStream
    prompt_ids: list[int]
    steerings: list[Any]  # one Steering per entry, in list order
    readouts: list[_Readout]
    generator: Any  # torch.Generator or None (greedy)
    matcher: StopMatcher
    generated: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0  # tokens of this request in the KV cache
    next_token: int = -1  # sampled, not yet fed to the model
    cancelled: bool = False
    whole_prefill: bool = False  # a prompt-level condition reads the prompt in one call
    prefill_cache: Any = None  # the prompt's own cache while it is prefilled in chunks
    # what position trackers and condition probes remember about this request (its token ids,
    # marker scans, condition verdicts): it outlives the per-step trackers as rows regroup
    state: SequenceState = dataclasses.field(default_factory=SequenceState)

    def synced_state(self) -> SequenceState:
        """:attr:`state` holding every token before the next forward call's (indices
        ``0 .. cached-1``), so a tracker that did not record some step finds none missing."""
        ids = self.state.ids
        n_prompt = len(self.prompt_ids)
        for index in range(len(ids), self.cached):
            ids.append(
                self.prompt_ids[index] if index < n_prompt else self.generated[index - n_prompt]
            )
        return self.state


class TorchEngine:
    """Serve a :class:`~steerlab.model.SteeredModel` with continuous batching and per-row steering.

    One worker thread owns the model: it is the only code that installs hooks or runs a forward
    pass, so nothing races on the model's modules. Each iteration it admits queued requests
    (each prompt is prefilled alone, exactly as ``model.generate`` would run it, producing the
    first token), then runs **one** decoding forward pass for every active request together:
    the KV caches of all requests live in one left-padded cache, with a 2-D attention mask and
    explicit ``position_ids`` per row, and each row gets its own steering through
    :class:`~steerlab.interventions.RowSteering` with pinned per-row prompt lengths (so
    ``"last"``, ``"prompt"``, ``"generated"``, indices and slices mean the same as in
    ``model.generate``). Each request keeps a :class:`~steerlab.interventions.SequenceState` of
    its own (token ids, marker scans, condition verdicts) that every step lends to the position
    trackers and condition probes, so text-selected positions and ``when`` conditions also mean
    what they mean in ``model.generate`` although the batch regroups between steps. Requests
    join and leave at step boundaries; the padded cache is rebuilt only when the set of rows
    changes.

    >>> from steerlab.testing import tiny_model
    >>> engine = TorchEngine(tiny_model("llama"), max_batch=4)
    >>> engine.start()
    >>> events = list(engine.submit(GenerationRequest(prompt="the cat", max_tokens=3,
    ...                                               temperature=0.0)))
    >>> engine.shutdown()
    >>> len(events), events[-1].finish_reason, events[-1].completion_tokens
    (3, 'length', 3)
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 32,
        model_id: str | None = None,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        from steerlab.model import SteeredModel

        if not isinstance(model, SteeredModel):
            raise InvalidInputError(f"TorchEngine serves a SteeredModel, got {type(model)}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidInputError(f"max_batch must be a positive integer, got {max_batch!r}")
        if prefill_chunk is not None and (
            isinstance(prefill_chunk, bool)
            or not isinstance(prefill_chunk, int)
            or prefill_chunk < 1
        ):
            raise InvalidInputError(
                f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}"
            )
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.model_id: str = model_id or model.name
        self.max_batch = max_batch
        self.vectors = VectorRegistry(check=lambda vector: vector.check_compatible(model))
        self.conditions = ConditionRegistry(check=lambda cond: cond.check_compatible(model))
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._tokenizer_lock = threading.Lock()
        self._max_chars: int | None = None  # see _check_length
        self._counter = 0
        # the batch (worker thread only)
        self._rows: list[_Job] = []
        self._prefilling: list[_Job] = []  # admitted, prompt not fully read yet (FIFO)
        self._step_time = 0.0  # recent decoding step, seconds (sizes prefill pieces)
        self._token_time = 0.0  # recent prefill cost per prompt token, seconds
        self._cache: Any = None
        self._mask: Any = None
        self._cache_kwarg = model.cache_keyword()
        config = getattr(model.hf_model, "config", None)
        self._max_positions = _max_positions(config)
        self.steps = 0  # decoding forward passes run (for tests and benchmarks)
        self.max_rows_seen = 0
        self.interleaved_steps = 0

    # --- interface --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Decoder blocks of the served model."""
        return int(self.model.n_layers)

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name="steerlab-torch-engine", daemon=True
            )
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the worker; every open stream ends with an :class:`EngineError`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            jobs, self._pending = self._pending, []
        for job in jobs + self._prefilling + self._rows:
            job.stream.fail(EngineError("the engine was shut down"))
        self._rows, self._prefilling = [], []
        self._cache = self._mask = None
        self._thread = None

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate ``request`` and queue it; see :class:`Engine`."""
        import torch

        if not isinstance(request, GenerationRequest):
            raise InvalidInputError(f"not a GenerationRequest: {type(request).__name__}")
        request.check(context_length=self._max_positions)
        steerings = [self._steering(entry) for entry in request.steering]
        readouts = [self._readout(entry) for entry in request.readout]
        self._check_length(request)
        prompt_ids = self._encode(request)
        if self._max_positions is not None:
            total = len(prompt_ids) + request.max_tokens
            if total > self._max_positions:
                raise InvalidInputError(
                    f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({request.max_tokens}) "
                    f"exceeds the model's context of {self._max_positions} tokens"
                )
        generator = None
        if request.temperature > 0:
            generator = torch.Generator()
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(request.seed))
        with self._cond:
            if self._thread is None or self._stopping:
                raise EngineError("the engine is not running (call start())")
            self._counter += 1
            request_id = f"req-{self._counter}"
        job_box: list[_Job] = []
        stream = RequestStream(request_id, on_cancel=lambda: self._cancel(job_box))
        job = _Job(
            request=request,
            stream=stream,
            prompt_ids=prompt_ids,
            steerings=steerings,
            readouts=readouts,
            generator=generator,
            matcher=StopMatcher(request.stop),
            whole_prefill=any(
                s.when is not None and getattr(s.when, "scope", None) == "prompt" for s in steerings
            ),
        )
        job_box.append(job)
        with self._cond:
            self._pending.append(job)
            self._cond.notify_all()
        return stream

    # --- validation helpers (caller's thread) ------------------------------------------------
    def _steering(self, entry: SteeringEntry) -> Any:
        from steerlab.interventions import PositionTracker, RowSteering, Steering

        if not isinstance(entry, SteeringEntry):
            raise InvalidInputError(f"not a SteeringEntry: {entry!r}")
        vector = self.vectors.get(entry.vector)
        when = None if entry.when is None else self.conditions.get(entry.when)
        strength: Any = entry.strength
        if isinstance(strength, Mapping):
            strength = {int(k): float(v) for k, v in strength.items()}
        positions = Positions.parse(entry.positions)
        if not positions.bound:
            # text markers become token ids as model.generate binds them: same tokenizer
            with self._tokenizer_lock:
                positions = positions.bind(self.model.tokenizer)
        options: dict[str, Any] = {"strength": strength, "positions": positions, "when": when}
        if entry.op != "add":
            options["op"] = entry.op
        steering = Steering(vector, **options)
        # validates layers and operator constants against the model, and a condition's layer
        # against the steering layers it gates, before anything is queued
        RowSteering((steering,)).hooks(self.model.adapter, PositionTracker())
        return steering

    def _readout(self, entry: ReadoutEntry) -> _Readout:
        import torch

        from steerlab.interventions import direction_at

        if not isinstance(entry, ReadoutEntry):
            raise InvalidInputError(f"not a ReadoutEntry: {entry!r}")
        vector = self.vectors.get(entry.vector)
        if vector.site != "resid":  # readouts project the residual stream at a block's output
            raise InvalidInputError(
                f"readout vector {entry.vector!r} is for site {vector.site!r}; a readout "
                f"projects the residual stream (site 'resid')"
            )
        layer = self.model.adapter.resolve_layer(entry.layer)
        direction = direction_at(vector.directions, layer, use="read", known=vector.layers)
        direction = direction.detach().to(torch.float32).cpu()
        norm = float(direction.norm())
        if not norm > 0:
            raise InvalidInputError(f"vector {entry.vector!r} has a zero direction at {layer}")
        return _Readout(layer=layer, direction=direction / norm)

    def _check_length(self, request: GenerationRequest) -> None:
        """Refuse text far too long for the context before tokenizing it: tokenizing holds
        the tokenizer lock that every running stream needs to detokenize its next token, so a
        4-million-character prompt would freeze them all for seconds. No token decodes to more
        characters than the longest vocabulary entry; the factor 4 covers normalizers that
        shrink text (composed accents), so only prompts that cannot fit are refused here."""
        if self._max_positions is None:
            return
        if self._max_chars is None:
            with self._tokenizer_lock:
                vocab = self.model.tokenizer.get_vocab()
            self._max_chars = 4 * self._max_positions * max(16, *(len(t) for t in vocab))
        field, chars = "prompt", len(request.prompt)
        if request.messages:
            field, chars = "messages", sum(len(m.content) for m in request.messages)
        if chars > self._max_chars:
            raise InvalidInputError(
                f"{field} has {chars} characters, more than a {self._max_positions}-token "
                f"context can hold (at most {self._max_chars} characters for this tokenizer)"
            )

    def _encode(self, request: GenerationRequest) -> list[int]:
        with self._tokenizer_lock:
            if request.chat and request.messages:
                tokenizer = self.model.tokenizer
                if not getattr(tokenizer, "chat_template", None):
                    raise InvalidInputError("this model's tokenizer has no chat template")
                text = tokenizer.apply_chat_template(
                    [{"role": m.role, "content": m.content} for m in request.messages],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                ids = list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
                if not ids:
                    raise InvalidInputError("the conversation has no tokens")
                return [int(i) for i in ids]
            batch = self.model.encode([request.prompt], chat=request.chat)
        return [int(i) for i in batch.input_ids[0].tolist()]

    def _cancel(self, box: list[_Job]) -> None:
        with self._cond:
            for job in box:
                job.cancelled = True
            self._cond.notify_all()

    # --- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    while (
                        not self._stopping
                        and not self._pending
                        and not self._rows
                        and not self._prefilling
                    ):
                        self._cond.wait()
                    if self._stopping:
                        return
                    room = self.max_batch - len(self._rows) - len(self._prefilling)
                    admitted, self._pending = self._pending[:room], self._pending[room:]
                try:
                    for job in admitted:
                        if job.cancelled:
                            self._finish_cancelled(job)
                        else:
                            self._prefilling.append(job)
                    self._prefill_some()
                    self._drop_cancelled()
                    if self._rows:
                        # counted for tests and benchmarks: decoding went on while a prompt
                        # was still being read
                        self.interleaved_steps += bool(self._prefilling)
                        self._decode_step()
                except Exception as err:  # a bug outside any one request: end these, keep serving
                    failed = [*self._rows, *self._prefilling]
                    self._rows, self._prefilling = [], []
                    self._cache = self._mask = None
                    for job in failed:
                        job.stream.fail(EngineError(f"generation failed: {err}"))

    # --- faults of one request -------------------------------------------------------------------
    def _fail(self, job: _Job, err: BaseException) -> None:
        """End ``job`` alone with the error that names what went wrong in its own work."""
        job.stream.fail(self._blame(job, err))

    @staticmethod
    def _blame(job: _Job, err: BaseException) -> SteerlabError:
        """The error to send for a fault found in ``job``'s own row (its forward pass run
        alone, or its token choice): steerlab's own errors as they are (their class says whose
        fault it is); anything else raised while this request's steering or readout hooks were
        active is charged to them (the same model serves every other request), and to the
        engine otherwise."""
        if isinstance(err, SteerlabError):
            return err
        fields = [
            name for name, used in (("steering", job.steerings), ("readout", job.readouts)) if used
        ]
        cause = f"{type(err).__name__}: {err}"
        if fields:
            return InvalidInputError(
                f"{' or '.join(fields)} of this request failed in the model ({cause}); "
                f"other requests were not affected"
            )
        return EngineError(f"this request failed in the engine ({cause})")

    def _scope(self, rows: list[_Job]) -> Any:
        """Install per-row steering for ``rows`` and pin their prompt lengths; a context."""
        import contextlib

        import torch

        from steerlab.interventions import RowSteering, activate, active_trackers

        @contextlib.contextmanager
        def scope() -> Iterator[None]:
            depth = max((len(job.steerings) for job in rows), default=0)
            interventions = [
                RowSteering(
                    tuple(job.steerings[k] if k < len(job.steerings) else None for job in rows)
                )
                for k in range(depth)
            ]
            adapter = self.model.adapter
            # activated in the worker thread only: a program that also calls the model from
            # other threads never sees the served requests' steering
            with activate(adapter, interventions) if interventions else contextlib.nullcontext():
                trackers = active_trackers(adapter.backbone)
                lengths = torch.tensor([len(job.prompt_ids) for job in rows])
                states = [job.synced_state() for job in rows]
                try:
                    for tracker in trackers:
                        tracker.prompt_lengths_override = lengths
                        tracker.sequences_override = states
                    yield
                finally:
                    for tracker in trackers:
                        tracker.prompt_lengths_override = None
                        tracker.sequences_override = None

        return scope()

    def _forward(
        self, rows: list[_Job], ids: Any, mask: Any, positions: Any, cache: Any, read: bool = True
    ) -> Any:
        """One forward pass under the rows' steering; returns (last logits, readout values).
        ``read=False`` (a prefill chunk before the last) skips the readout probes."""
        import torch

        from steerlab.interventions import HookSpec, output_hidden, scoped_hooks

        device = self.model.device
        wanted: dict[int, list[tuple[int, int, Any]]] = {}
        for row, job in enumerate(rows):
            for k, readout in enumerate(job.readouts if read else ()):
                wanted.setdefault(readout.layer, []).append((row, k, readout.direction))
        values: dict[tuple[int, int], float] = {}

        def make_hook(entries: list[tuple[int, int, Any]]) -> Any:
            def hook(module: Any, args: Any, output: Any) -> None:
                last = output_hidden(output)[:, -1].detach().to(torch.float32).cpu()
                for row, k, direction in entries:
                    values[(row, k)] = float(last[row] @ direction)

            return hook

        # activated after the steering (this thread only), so reads see the steered stream
        reads = [
            HookSpec(self.model.adapter.block(layer), "forward", make_hook(entries))
            for layer, entries in wanted.items()
        ]
        with self._scope(rows), scoped_hooks(reads):
            out = self.model.hf_model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: cache},
            )
        logits = out.logits[:, -1].to(torch.float32).cpu()
        readouts = [
            tuple(values[(row, k)] for k in range(len(job.readouts) if read else 0))
            for row, job in enumerate(rows)
        ]
        return logits, readouts

    def _new_cache(self, data: list[tuple[Any, Any]] | None = None) -> Any:
        from transformers import DynamicCache

        config = getattr(self.model.hf_model, "config", None)
        try:
            return DynamicCache(data, config=config) if data else DynamicCache(config=config)
        except TypeError:  # transformers 4: no config argument
            return DynamicCache(data) if data else DynamicCache()

    @staticmethod
    def _layers(cache: Any) -> list[tuple[Any, Any]]:
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        return list(zip(cache.key_cache, cache.value_cache))

    def _prefill_some(self) -> None:
        """Prefill queued prompts, at most one chunk's worth of tokens per worker iteration.

        A prompt is run through the model in pieces of at most ``prefill_chunk`` tokens (each
        piece attends to the cache of the ones before it, at its absolute positions, so the
        result is the unchunked prefill's), and one decoding step of the running requests
        follows each piece: a long prompt no longer freezes every stream while it is read.
        While requests are decoding, a piece is also cut to take about as long as one of their
        decoding steps (measured), so their inter-token gap stays near twice the usual.
        """
        import time

        chunked = self.prefill_chunk is not None
        budget = self.prefill_chunk or 0
        if chunked and self._rows:
            if self._token_time > 0 and self._step_time > 0:
                budget = min(budget, max(_MIN_CHUNK, int(self._step_time / self._token_time)))
            else:  # nothing timed yet: a small first piece, timed for the next ones
                budget = min(budget, _MIN_CHUNK)
        while self._prefilling:
            if chunked and budget <= 0:
                return
            job = self._prefilling[0]
            if job.cancelled:
                self._prefilling.pop(0)
                self._finish_cancelled(job)
                continue
            remaining = len(job.prompt_ids) - job.cached
            count = remaining if not chunked or job.whole_prefill else min(budget, remaining)
            started = time.perf_counter()
            try:
                finished = self._prefill_chunk(job, count)
            except Exception as err:  # this prompt alone was being read: fail it alone
                self._prefilling.pop(0)
                self._fail(job, err)
                continue
            if count >= _MIN_CHUNK:
                per_token = (time.perf_counter() - started) / count
                self._token_time = (
                    per_token if not self._token_time else 0.5 * (self._token_time + per_token)
                )
            budget -= count
            if finished:
                self._prefilling.pop(0)

    def _prefill_chunk(self, job: _Job, count: int) -> bool:
        """Run the next ``count`` prompt tokens of ``job`` (alone, on its own cache); after the
        last piece choose its first token and move it into the batch. True when it left the
        prefill queue (joined the batch or finished)."""
        import torch

        start = job.cached
        end = start + count
        last = end == len(job.prompt_ids)
        if job.prefill_cache is None:
            job.prefill_cache = self._new_cache()
        ids = torch.tensor([job.prompt_ids[start:end]], dtype=torch.long)
        mask = torch.ones((1, end), dtype=torch.long)
        positions = torch.arange(start, end)[None]
        logits, readouts = self._forward([job], ids, mask, positions, job.prefill_cache, last)
        job.cached = end
        if not last:
            return False
        cache, job.prefill_cache = job.prefill_cache, None
        if not self._emit(job, logits[0], readouts[0]):
            self._merge(job, cache)
        return True

    def _merge(self, job: _Job, cache: Any) -> None:
        """Add a prefilled request's cache to the batch cache (left padding to a common width)."""
        import torch

        new = self._layers(cache)
        if not self._rows:
            self._rows = [job]
            self._cache = cache
            self._mask = torch.ones((1, job.cached), dtype=torch.long)
            return
        old = self._layers(self._cache)
        width = max(self._mask.shape[1], job.cached)
        merged = [
            (
                torch.cat([_pad_left(ok, width), _pad_left(nk, width)], dim=0),
                torch.cat([_pad_left(ov, width), _pad_left(nv, width)], dim=0),
            )
            for (ok, ov), (nk, nv) in zip(old, new)
        ]
        mask_old = _pad_left(self._mask, width)
        mask_new = _pad_left(torch.ones((1, job.cached), dtype=torch.long), width)
        self._cache = self._new_cache(merged)
        self._mask = torch.cat([mask_old, mask_new], dim=0)
        self._rows = [*self._rows, job]
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))

    def _keep(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` of the batch, dropping padding columns no row needs."""
        import torch

        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep)
        mask = self._mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        first = int(used[0, 0]) if len(used) else 0
        mask = mask[:, first:]
        data = [
            (
                k.index_select(0, index.to(k.device))[:, :, first:].contiguous(),
                v.index_select(0, index.to(v.device))[:, :, first:].contiguous(),
            )
            for k, v in self._layers(self._cache)
        ]
        self._cache = self._new_cache(data)
        self._mask = mask
        self._rows = [self._rows[i] for i in keep]

    def _drop_cancelled(self) -> None:
        keep = [i for i, job in enumerate(self._rows) if not job.cancelled]
        for job in self._rows:
            if job.cancelled:
                self._finish_cancelled(job)
        self._keep(keep)

    def _decode_step(self) -> None:
        """One forward pass for every running request; a fault is kept to the request that
        caused it (see :meth:`_isolate`)."""
        import time

        import torch

        rows = self._rows
        ids = torch.tensor([[job.next_token] for job in rows], dtype=torch.long)
        mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        positions = torch.tensor([[job.cached] for job in rows], dtype=torch.long)
        before = self._layers(self._cache)  # the cache grows by new tensors: this stays valid
        started = time.perf_counter()
        try:
            logits, readouts = self._forward(rows, ids, mask, positions, self._cache)
        except Exception as err:
            self._cache = self._new_cache(before)
            if len(rows) == 1:
                self._rows, self._cache, self._mask = [], None, None
                self._fail(rows[0], err)
            else:
                self._isolate(before)
            self.steps += 1
            return
        elapsed = time.perf_counter() - started
        self._step_time = elapsed if not self._step_time else 0.5 * (self._step_time + elapsed)
        self._mask = mask
        self.steps += 1
        keep = []
        for row, job in enumerate(rows):
            job.cached += 1
            if not self._emit_or_fail(job, logits[row], readouts[row]):
                keep.append(row)
        self._keep(keep)

    def _isolate(self, before: list[tuple[Any, Any]]) -> None:
        """The batched step raised: run each row's step alone (on its own slice of the cache
        as it was before the step) so only the rows that fail alone fail; the others get their
        token from the solo run and are regrouped into a new batch cache."""
        import torch

        rows, width = self._rows, int(self._mask.shape[1])
        self._rows, self._cache, self._mask = [], None, None
        for row, job in enumerate(rows):
            start = width - job.cached  # a row's tokens are the rightmost ``cached`` columns
            own = self._new_cache(
                [(k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in before]
            )
            ids = torch.tensor([[job.next_token]], dtype=torch.long)
            mask = torch.ones((1, job.cached + 1), dtype=torch.long)
            positions = torch.tensor([[job.cached]], dtype=torch.long)
            try:
                logits, readouts = self._forward([job], ids, mask, positions, own)
            except Exception as err:
                self._fail(job, err)
                continue
            job.cached += 1
            if not self._emit_or_fail(job, logits[0], readouts[0]):
                self._merge(job, own)

    # --- tokens out ------------------------------------------------------------------------------
    def _emit_or_fail(self, job: _Job, logits: Any, readout: tuple[float, ...]) -> bool:
        """:meth:`_emit`, with a fault in this request's token ending this request alone."""
        try:
            return self._emit(job, logits, readout)
        except Exception as err:
            self._fail(job, err)
            return True

    def _emit(self, job: _Job, logits: Any, readout: tuple[float, ...]) -> bool:
        """Choose the next token of ``job`` from ``logits``, send its event; True when done."""
        import torch

        request = job.request
        if not bool(torch.isfinite(logits).all()):
            # a row's activations blew up (rows never mix, so it is this request's own doing)
            where = f"at completion token {len(job.generated) + 1}"
            if job.steerings:
                raise InvalidInputError(
                    f"steering: the model's logits became non-finite (inf/nan) {where}; "
                    f"the steering of this request is too strong for this model"
                )
            raise EngineError(f"the model's logits became non-finite (inf/nan) {where}")
        if job.generator is None:
            token = int(torch.argmax(logits))
        else:
            token = _sample(logits, request.temperature, request.top_p, job.generator)
        logprob: float | None = None
        top: tuple[TokenLogprob, ...] = ()
        tokenizer = self.model.tokenizer
        if request.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            logprob = float(logp[token])
            if request.logprobs > 0:
                values, indices = torch.topk(logp, request.logprobs)
                with self._tokenizer_lock:
                    top = tuple(
                        TokenLogprob(tokenizer.decode([int(i)]), float(v), int(i))
                        for v, i in zip(values, indices)
                    )
        job.generated.append(token)
        eos = getattr(tokenizer, "eos_token_id", None)
        is_eos = eos is not None and (token == eos or (isinstance(eos, list) and token in eos))
        finish: str | None = None
        with self._tokenizer_lock:
            text_ids = job.generated[:-1] if is_eos else job.generated
            text = tokenizer.decode(text_ids, skip_special_tokens=True)
            piece = "" if is_eos else tokenizer.decode([token], skip_special_tokens=True)
        done = is_eos or len(job.generated) >= request.max_tokens
        delta, stopped = job.matcher.feed(text, final=done)
        if stopped or is_eos:
            finish = "stop"
        elif done:
            finish = "length"
        job.next_token = token
        job.stream.put(
            TokenEvent(
                token_id=token,
                text=delta,
                token=piece,
                logprob=logprob,
                top_logprobs=top,
                readout=readout,
                finish_reason=finish,
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(job.generated),
            )
        )
        return finish is not None

    def _finish_cancelled(self, job: _Job) -> None:
        job.stream.put(
            TokenEvent(
                token_id=-1,
                text="",
                finish_reason="cancelled",
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(job.generated),
            )
        )


def _pad_left(tensor: Any, width: int) -> Any:
    """``tensor`` with zeros prepended along its sequence axis (dim 2 for caches, 1 for masks)."""
    import torch

    axis = 2 if tensor.ndim == 4 else 1
    missing = width - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def _sample(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    """Sample a token id from ``softmax(logits / temperature)`` within the ``top_p`` nucleus."""
    import torch

    probs = torch.softmax(logits.to(torch.float32) / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise InvalidInputError(
            f"temperature: softmax(logits / {temperature}) is not finite; use 0 (greedy) or a "
            f"temperature of at least {MIN_TEMPERATURE}"
        )
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _max_positions(config: Any) -> int | None:
    """Longest sequence the batch cache can hold: the model's context, and below a sliding
    window (the padded cache keeps one shared length per batch, so rows must never slide)."""
    limits = [
        value
        for name in ("max_position_embeddings", "n_positions", "sliding_window")
        if isinstance(value := getattr(config, name, None), int) and value > 0
    ]
    return min(limits) if limits else None
