"""``/v1/completions`` and ``/v1/chat/completions``: admit a request to the engine, then answer
with the whole completion or stream it (SSE framing by FastAPI's ``format_sse_event``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.sse import format_sse_event
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive

from steerlab.errors import SteerlabError
from steerlab.server.deps import (
    HTTPError,
    ServerSettings,
    authorize,
    check_model,
    engine_of,
    settings_of,
)
from steerlab.server.engine import Engine
from steerlab.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ReadoutTrace,
    TopLogprob,
    Usage,
    error_body,
    new_id,
    now,
)
from steerlab.server.requests import EngineError, GenerationRequest, TokenEvent
from steerlab.server.stream import RequestStream

__all__ = ["router"]

router = APIRouter(dependencies=[Depends(authorize)])

EngineDep = Annotated[Engine, Depends(engine_of)]
SettingsDep = Annotated[ServerSettings, Depends(settings_of)]


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep
) -> Any:
    check_model(engine, body.model)
    _check_counts(body, settings)
    gen, events = await run_in_threadpool(
        _admit,
        engine,
        settings,
        lambda: body.to_generation(default_max_tokens=16),
    )
    return await _serve(
        request, engine, gen, events, chat=False, stream=body.streaming, usage_chunk=_usage(body)
    )


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep
) -> Any:
    check_model(engine, body.model)
    _check_counts(body, settings)
    chat_default = min(settings.default_max_tokens, settings.max_tokens_cap)
    gen, events = await run_in_threadpool(
        _admit,
        engine,
        settings,
        lambda: body.to_generation(default_max_tokens=chat_default),
    )
    return await _serve(
        request, engine, gen, events, chat=True, stream=body.streaming, usage_chunk=_usage(body)
    )


def _check_counts(
    body: CompletionRequest | ChatCompletionRequest, settings: ServerSettings
) -> None:
    for field, entries, cap, option in (
        ("steering", body.steering, settings.max_steering_entries, "--max-steering-entries"),
        ("readout", body.readout, settings.max_readout_entries, "--max-readout-entries"),
    ):
        if len(entries) > cap:
            raise HTTPError(
                400,
                f"{field} has {len(entries)} entries; this server allows at most {cap} per "
                f"request ({option})",
                kind="invalid_request_error",
                code="too_many_entries",
            )


def _admit(
    engine: Engine, settings: ServerSettings, build: Callable[[], GenerationRequest]
) -> tuple[GenerationRequest, RequestStream]:
    """Parse, then validate, tokenize and queue a request (``engine.submit`` validates, once,
    with this server's limits): run in a worker thread, since a long prompt or many steering
    entries take seconds that the event loop (every other request, and ``/health``) must not
    wait for."""
    gen = build()
    return gen, engine.submit(gen, limits=settings.request_limits())


async def _serve(
    request: Request,
    engine: Engine,
    gen: GenerationRequest,
    events: RequestStream,
    *,
    chat: bool,
    stream: bool,
    usage_chunk: bool,
) -> Any:
    rid = new_id("chatcmpl" if chat else "cmpl")
    created = now()
    if stream:
        return StreamingResponse(
            _sse(events, gen, rid, created, engine.model_id, chat, usage_chunk),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    collected = await _collect(events, request.receive)
    if collected is None:  # the client went away: nobody reads this
        return Response(status_code=499)
    return _final(collected, gen, rid, created, engine.model_id, chat)


def _usage(body: Any) -> bool:
    return bool(body.stream_options is not None and body.stream_options.include_usage)


async def _collect(events: RequestStream, receive: Receive) -> list[TokenEvent] | None:
    """Every event of ``events``, or ``None`` if the client disconnected first (the request is
    then cancelled in the engine). The body was read in full, so the next ASGI message is the
    disconnect (or, from some servers, the end of the response, when nothing is left to do)."""
    collected: list[TokenEvent] = []

    async def drain() -> None:
        async for event in events:
            collected.append(event)

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.1)  # a server that answers with empty body messages: poll

    reader = asyncio.ensure_future(drain())
    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((reader, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reader, watcher):
            task.cancel()
        await asyncio.gather(reader, watcher, return_exceptions=True)
        if not collected or collected[-1].finish_reason is None:
            events.cancel()
    if not reader.cancelled() and reader.exception() is None:
        return collected
    if not reader.cancelled():
        raise reader.exception()  # type: ignore[misc]
    return None


# --- building responses ------------------------------------------------------------------------
def _readout(gen: GenerationRequest, events: list[TokenEvent]) -> list[ReadoutTrace] | None:
    if not gen.readout:
        return None
    real = [e for e in events if e.finish_reason != "cancelled" or e.token_id >= 0]
    return [
        ReadoutTrace(
            vector=entry.vector, layer=entry.layer, values=[e.readout[k] for e in real if e.readout]
        )
        for k, entry in enumerate(gen.readout)
    ]


def _tokens(events: list[TokenEvent]) -> list[TokenEvent]:
    return [e for e in events if e.token_id >= 0]


def _completion_logprobs(gen: GenerationRequest, events: list[TokenEvent]) -> Any:
    if gen.logprobs is None:
        return None
    tokens = _tokens(events)
    offsets, at = [], 0
    for e in tokens:
        offsets.append(at)
        at += len(e.token)
    return CompletionLogprobs(
        tokens=[e.token for e in tokens],
        token_logprobs=[e.logprob for e in tokens],
        top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in tokens]
        if gen.logprobs > 0
        else None,
        text_offset=offsets,
    )


def _chat_logprobs(gen: GenerationRequest, events: list[TokenEvent]) -> Any:
    if gen.logprobs is None:
        return None
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=e.logprob if e.logprob is not None else 0.0,
                bytes=list(e.token.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()))
                    for t in e.top_logprobs
                ],
            )
            for e in _tokens(events)
        ]
    )


def _usage_of(events: list[TokenEvent]) -> Usage:
    last = events[-1] if events else None
    prompt = last.prompt_tokens if last else 0
    completion = last.completion_tokens if last else 0
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _final(
    events: list[TokenEvent],
    gen: GenerationRequest,
    rid: str,
    created: int,
    model: str,
    chat: bool,
) -> dict[str, Any]:
    text = "".join(e.text for e in events)
    finish = events[-1].finish_reason if events else None
    readout = _readout(gen, events)
    if chat:
        chat_response = ChatCompletionResponse(
            id=rid,
            created=created,
            model=model,
            choices=[
                ChatChoice(
                    message=ChatMessageOut(content=text),
                    logprobs=_chat_logprobs(gen, events),
                    finish_reason=finish,  # type: ignore[arg-type]
                    readout=readout,
                )
            ],
            usage=_usage_of(events),
        )
        return chat_response.model_dump(exclude_none=True)
    response = CompletionResponse(
        id=rid,
        created=created,
        model=model,
        choices=[
            CompletionChoice(
                text=text,
                logprobs=_completion_logprobs(gen, events),
                finish_reason=finish,  # type: ignore[arg-type]
                readout=readout,
            )
        ],
        usage=_usage_of(events),
    )
    return response.model_dump(exclude_none=True)


def _frame(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return format_sse_event(data_str=data)


async def _sse(
    events: Any,
    gen: GenerationRequest,
    rid: str,
    created: int,
    model: str,
    chat: bool,
    usage_chunk: bool,
) -> AsyncIterator[bytes]:
    """The SSE body: one chunk per generated token, then ``[DONE]``."""
    last: TokenEvent | None = None
    try:
        if chat:
            first = ChatCompletionChunk(
                id=rid,
                created=created,
                model=model,
                choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))],
            )
            yield _frame(first.model_dump(exclude_none=True))
        try:
            async for event in events:
                last = event
                batch = [event]
                readout = _readout(gen, batch) if event.token_id >= 0 else None
                if chat:
                    chunk: Any = ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=model,
                        choices=[
                            ChatChunkChoice(
                                delta=ChatDelta(content=event.text),
                                logprobs=_chat_logprobs(gen, batch),
                                finish_reason=event.finish_reason,  # type: ignore[arg-type]
                                readout=readout,
                            )
                        ],
                    )
                else:
                    chunk = CompletionResponse(
                        id=rid,
                        created=created,
                        model=model,
                        choices=[
                            CompletionChoice(
                                text=event.text,
                                logprobs=_completion_logprobs(gen, batch),
                                finish_reason=event.finish_reason,  # type: ignore[arg-type]
                                readout=readout,
                            )
                        ],
                    )
                yield _frame(chunk.model_dump(exclude_none=True))
        except EngineError as err:
            yield _frame(error_body(str(err), kind="server_error", code="engine_error"))
        except SteerlabError as err:  # this request's own input failed in the model
            yield _frame(error_body(str(err), kind="invalid_request_error"))
        if usage_chunk and last is not None:
            usage = _usage_of([last]).model_dump()
            kind = "chat.completion.chunk" if chat else "text_completion"
            yield _frame(
                {
                    "id": rid,
                    "object": kind,
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        yield _frame("[DONE]")
    finally:
        if last is None or last.finish_reason is None:
            events.cancel()
