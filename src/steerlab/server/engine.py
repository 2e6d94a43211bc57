"""The engine boundary of ``steerlab serve``: typed requests in, a stream of token events out.

The HTTP layer never touches a model. It builds a :class:`GenerationRequest` (vectors are named,
not sent), calls :meth:`Engine.submit`, and iterates the returned :class:`RequestStream` of
:class:`TokenEvent` objects, one per generated token. Any engine that implements :class:`Engine`
can sit behind the server: :class:`TorchEngine` here (continuous batching over a
:class:`~steerlab.model.SteeredModel`) and a vLLM engine.

What every engine must guarantee:

* ``submit`` validates the request before returning (unknown vector, bad positions, a vector
  that does not fit the model, an unsupported ``op``) and raises
  :class:`~steerlab.errors.InvalidInputError` for the caller's mistakes; nothing is queued then.
* Steering means what it means in the library: for ``temperature == 0`` the token ids equal
  ``model.generate_ids(prompt, steering=..., positions=..., max_new_tokens=max_tokens)``
  (``chat=True`` with a single user turn), whatever else is being served at the same time.
* Positions are absolute token indices over prompt + generated tokens of *that* request
  (``"last"``, ``"prompt"``, ``"generated"``, ints, lists, slices: see
  :mod:`steerlab.positions`).
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
from typing import Any, Protocol, runtime_checkable

from steerlab.errors import InvalidInputError, SteerlabError
from steerlab.positions import Positions, PositionSpec
from steerlab.vectors import SteeringVector

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineError",
    "FINISH_REASONS",
    "GenerationRequest",
    "ReadoutEntry",
    "RequestStream",
    "SteeringEntry",
    "StopMatcher",
    "TokenEvent",
    "TokenLogprob",
    "VectorRegistry",
]

FINISH_REASONS = ("stop", "length", "cancelled")
"""Values of :attr:`TokenEvent.finish_reason` on the last event of a stream."""

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
    refuse ops they do not implement). Entries of one request compose in list order.

    >>> SteeringEntry(vector="calm", strength={15: 4.0}).positions
    'all'
    """

    vector: str
    strength: float | Mapping[int, float] = 1.0
    positions: PositionSpec = "all"
    op: str = "add"


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

    def check(self, *, max_tokens_cap: int | None = None) -> None:
        """Validate the plain fields (everything that does not need a model or registry).

        >>> GenerationRequest(prompt="hi", max_tokens=0).check()
        Traceback (most recent call last):
            ...
        steerlab.errors.InvalidInputError: max_tokens must be at least 1, got 0
        """
        if not isinstance(self.prompt, str):
            raise InvalidInputError("prompt must be a string")
        if not self.chat and not self.prompt:
            raise InvalidInputError("the prompt is empty")
        if self.chat and not self.messages and not self.prompt:
            raise InvalidInputError("the conversation is empty")
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
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidInputError("stop strings must be non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidInputError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        for entry in self.steering:
            Positions.parse(entry.positions)
            strengths = (
                entry.strength.values() if isinstance(entry.strength, Mapping) else [entry.strength]
            )
            for value in strengths:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InvalidInputError(f"strength must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise InvalidInputError(f"strength must be finite, got {value}")


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


# --- the vector registry -------------------------------------------------------------------------
class VectorRegistry:
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

    def __init__(self, check: Callable[[SteeringVector], None] | None = None) -> None:
        self._check = check
        self._vectors: dict[str, SteeringVector] = {}
        self._lock = threading.Lock()

    @staticmethod
    def check_name(name: str) -> str:
        """``name`` if it is a valid vector name (letters, digits, ``_ . -``; 128 chars at most)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInputError(
                f"invalid vector name {name!r}: use letters, digits, '_', '.', '-' "
                f"(at most 128 characters, not starting with '.' or '-')"
            )
        return name

    def register(self, name: str, vector: SteeringVector) -> None:
        """Add ``vector`` under ``name`` after checking it fits the model; names are unique."""
        self.check_name(name)
        if not isinstance(vector, SteeringVector):
            raise InvalidInputError(f"not a SteeringVector: {type(vector).__name__}")
        if self._check is not None:
            self._check(vector)
        with self._lock:
            if name in self._vectors:
                raise InvalidInputError(f"a vector named {name!r} is already registered")
            self._vectors[name] = vector

    def register_file(self, path: str | os.PathLike[str], name: str | None = None) -> str:
        """Load a steerlab vector file and register it under ``name`` (default: the file stem)."""
        file = Path(path)
        chosen = file.stem if name is None else name
        self.check_name(chosen)
        self.register(chosen, SteeringVector.load(file))
        return chosen

    def register_bytes(self, name: str, data: bytes) -> None:
        """Register the vector file whose content is ``data`` (as uploaded)."""
        self.check_name(name)
        with tempfile.TemporaryDirectory(prefix="steerlab-upload-") as folder:
            file = Path(folder, f"{name}.safetensors")
            file.write_bytes(data)
            vector = SteeringVector.load(file)
        self.register(name, vector)

    def register_dir(self, folder: str | os.PathLike[str]) -> list[str]:
        """Register every ``folder/*.safetensors`` under its stem; returns the names (sorted)."""
        path = Path(folder)
        if not path.is_dir():
            raise InvalidInputError(f"vector folder {path} does not exist")
        return [self.register_file(file) for file in sorted(path.glob("*.safetensors"))]

    def get(self, name: str) -> SteeringVector:
        """The vector registered as ``name``, or ``InvalidInputError`` naming the known ones."""
        with self._lock:
            vector = self._vectors.get(name)
            known = sorted(self._vectors)
        if vector is None:
            raise InvalidInputError(
                f"unknown vector {name!r}; registered: {', '.join(known) or 'none'}"
            )
        return vector

    def names(self) -> list[str]:
        """Registered names, sorted."""
        with self._lock:
            return sorted(self._vectors)

    def items(self) -> list[tuple[str, SteeringVector]]:
        """``(name, vector)`` pairs, sorted by name."""
        with self._lock:
            return sorted(self._vectors.items())

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._vectors

    def __len__(self) -> int:
        with self._lock:
            return len(self._vectors)


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
    * ``n_layers``: decoder blocks of the model (to validate readout layers and strengths).
    * :meth:`start` / :meth:`shutdown`: start the worker(s); stop them, ending every open stream.
    * :meth:`submit`: validate ``request`` (raising ``InvalidInputError``) and queue it; the
      returned :class:`RequestStream` yields its :class:`TokenEvent` objects.
    """

    model_id: str
    vectors: VectorRegistry

    @property
    def n_layers(self) -> int: ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def submit(self, request: GenerationRequest) -> RequestStream: ...
