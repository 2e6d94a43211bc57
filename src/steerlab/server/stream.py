"""The stream of one submitted request, and the stop-string matcher engines emit text through.

An engine feeds a :class:`RequestStream` from its worker thread; the HTTP layer (or any
consumer) iterates it from an event loop or a plain thread. :class:`StopMatcher` turns the
decoded text so far into safe-to-send deltas, honouring stop strings; both engines use it, so a
completion ends at the same place whichever engine serves it.

>>> StopMatcher(("!",)).feed("Hi! there")
('Hi', True)
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from steerlab.server.requests import TokenEvent

__all__ = ["RequestStream", "StopMatcher"]


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
