"""The FastAPI application of ``steerlab serve``: a thin shell over an :class:`Engine`.

Handlers parse and validate with pydantic (:mod:`steerlab.server.protocol`), hand a typed
:class:`~steerlab.server.requests.GenerationRequest` to the engine, and stream what comes back
(SSE framing by FastAPI's ``format_sse_event``). Every error is an OpenAI error object.

>>> from fastapi.testclient import TestClient
>>> from steerlab.testing import tiny_model
>>> from steerlab.server.engine import TorchEngine
>>> with TestClient(create_app(TorchEngine(tiny_model("llama")))) as client:
...     reply = client.post("/v1/completions", json={"model": "default", "prompt": "the cat",
...                                                  "max_tokens": 3, "temperature": 0})
>>> reply.status_code, reply.json()["usage"]["completion_tokens"]
(200, 3)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive

from steerlab.errors import InvalidInputError, SteerlabError
from steerlab.server.engine import Engine
from steerlab.server.guard import BodyTooLarge, RequestGuard
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
    VectorUpload,
    error_body,
    new_id,
    now,
    validation_message,
)
from steerlab.server.requests import EngineError, GenerationRequest, TokenEvent
from steerlab.server.stream import RequestStream

__all__ = [
    "STATIC_DIR",
    "create_app",
    "describe_condition",
    "describe_vector",
    "free_port",
    "serve_in_thread",
]

STATIC_DIR = Path(__file__).with_name("static")
"""The playground's files (shipped as package data)."""

_MIB = 1024 * 1024


class _HTTPError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, kind: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.code = code


def describe_vector(name: str, vector: Any) -> dict[str, Any]:
    """The ``/v1/vectors`` entry of a registered vector.

    >>> import torch, steerlab as sl
    >>> describe_vector("calm", sl.SteeringVector({3: torch.ones(4)}))["layers"]
    [3]
    """
    meta = dict(vector.metadata)
    scalars = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
    return {
        "id": name,
        "object": "vector",
        "layers": list(vector.layers),
        "d_model": vector.d_model,
        "method": meta.get("method"),
        "model": meta.get("model_name"),
        "norms": {str(k): round(v, 6) for k, v in vector.norms().items()},
        "recommended_strength": meta.get("recommended_strength"),
        "metadata": scalars,
    }


def describe_condition(name: str, condition: Any) -> dict[str, Any]:
    """The ``/v1/conditions`` entry of a registered condition.

    >>> import torch, steerlab as sl
    >>> describe_condition("cats", sl.Condition(torch.ones(4), layer=2, threshold=0.5))["scope"]
    'prompt'
    """
    meta = dict(condition.metadata)
    return {
        "id": name,
        "object": "condition",
        "layer": condition.layer,
        "threshold": condition.threshold,
        "comparison": condition.comparison,
        "scope": condition.scope,
        "d_model": int(condition.direction.shape[0]),
        "metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))},
    }


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_tokens_cap: int = 1024,
    max_strength: float = 64.0,
    default_max_tokens: int = 256,
    max_body_bytes: int = 4 * _MIB,
    max_upload_bytes: int = 64 * _MIB,
    max_steering_entries: int = 32,
    max_readout_entries: int = 16,
    max_vectors: int = 256,
    manage_engine: bool = True,
) -> FastAPI:
    """The OpenAI-compatible app serving ``engine``.

    ``api_key``: when set, every ``/v1`` route needs ``Authorization: Bearer <api_key>``; a
    request without it is refused (401) before its body is read.
    ``max_tokens_cap`` and ``max_strength`` bound what one request may ask for (400 beyond).
    ``default_max_tokens``: chat completions without ``max_tokens`` (completions default to 16,
    as OpenAI's do), at most ``max_tokens_cap``.
    ``max_body_bytes``: the largest request body (413 beyond, refused as it streams in, before
    it is read in full); ``max_upload_bytes``: the same for ``POST /v1/vectors`` (vector files).
    ``max_steering_entries`` / ``max_readout_entries``: entries of ``steering`` / ``readout``
    in one request (400 beyond). ``max_vectors``: vectors the registry may hold; an upload
    beyond it is refused with 409 (``DELETE /v1/vectors/{name}`` makes room).
    ``manage_engine``: start the engine when the app starts and shut it down when it stops.
    """
    if max_tokens_cap < 1:
        raise InvalidInputError(f"max_tokens_cap must be positive, got {max_tokens_cap}")
    if not max_strength > 0:
        raise InvalidInputError(f"max_strength must be positive, got {max_strength}")
    for option, value in (
        ("max_body_bytes", max_body_bytes),
        ("max_upload_bytes", max_upload_bytes),
        ("max_steering_entries", max_steering_entries),
        ("max_readout_entries", max_readout_entries),
        ("max_vectors", max_vectors),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{option} must be a positive integer, got {value!r}")
    limits = {
        "max_tokens_cap": max_tokens_cap,
        "max_strength": max_strength,
        "max_body_bytes": max_body_bytes,
        "max_upload_bytes": max_upload_bytes,
        "max_steering_entries": max_steering_entries,
        "max_readout_entries": max_readout_entries,
        "max_vectors": max_vectors,
    }

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.shutdown()

    def key_ok(headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return api_key is None or (
            scheme.lower() == "bearer"
            and secrets.compare_digest(token.strip().encode(), api_key.encode())
        )

    app = FastAPI(title="steerlab", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    # outermost of the app's own layers: the key and the body size are checked before any
    # route (or FastAPI's body parsing) reads the body
    app.add_middleware(
        RequestGuard,
        max_body_bytes=max_body_bytes,
        max_upload_bytes=max_upload_bytes,
        uploads=("/v1/vectors",),
        authorized=None if api_key is None else key_ok,
    )

    # --- errors ------------------------------------------------------------------------------
    def error_response(status: int, message: str, kind: str, code: str | None = None) -> Any:
        return JSONResponse(error_body(message, kind=kind, code=code), status_code=status)

    @app.exception_handler(_HTTPError)
    async def on_http_error(_: Request, err: _HTTPError) -> Any:
        return error_response(err.status, str(err), err.kind, err.code)

    @app.exception_handler(SteerlabError)
    async def on_steerlab_error(_: Request, err: SteerlabError) -> Any:
        if isinstance(err, EngineError):
            return error_response(503, str(err), "server_error", "engine_error")
        return error_response(400, str(err), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, err: RequestValidationError) -> Any:
        problems = err.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            message = "the request body is not valid JSON"
            return error_response(400, message, "invalid_request_error")
        message, param = validation_message(problems)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette_error(_: Request, err: StarletteHTTPException) -> Any:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        code = "too_large" if isinstance(err, BodyTooLarge) else None
        return error_response(err.status_code, str(err.detail), kind, code)

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, err: Exception) -> Any:
        # sent outside the guard, after which uvicorn drops the connection: say so
        return JSONResponse(
            error_body(f"internal error: {type(err).__name__}", kind="server_error"),
            status_code=500,
            headers={"Connection": "close"},
        )

    # --- auth and model ------------------------------------------------------------------------
    async def authorize(request: Request) -> None:
        # the guard refused these already; kept so that no route depends on the middleware
        if not key_ok(request.headers):
            raise _HTTPError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer <key>')",
                kind="authentication_error",
                code="invalid_api_key",
            )

    def check_model(name: str) -> None:
        if name not in (engine.model_id, "default"):
            raise _HTTPError(
                404,
                f"the model {name!r} does not exist; this server serves {engine.model_id!r} "
                f"(also reachable as 'default')",
                kind="invalid_request_error",
                code="model_not_found",
            )

    def model_card() -> dict[str, Any]:
        return {
            "id": engine.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "steerlab",
            "n_layers": engine.n_layers,
        }

    # --- routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": engine.model_id,
            "limits": limits,
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.get("/v1/vectors", dependencies=[Depends(authorize)])
    async def vectors() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [describe_vector(name, vec) for name, vec in engine.vectors.items()],
        }

    @app.get("/v1/conditions", dependencies=[Depends(authorize)])
    async def conditions() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [describe_condition(name, c) for name, c in engine.conditions.items()],
        }

    # uploads one at a time, so that the count checked against max_vectors is the count
    # the registration adds to
    upload_lock = asyncio.Lock()

    @app.post("/v1/vectors", dependencies=[Depends(authorize)])
    async def upload_vector(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidInputError("multipart upload needs a 'file' field with the vector")
            data = await upload.read(max_upload_bytes + 1)
            name_field = form.get("name")
            if isinstance(name_field, str) and name_field:
                name = name_field
            else:
                name = Path(upload.filename or "").stem
        else:
            raw = await request.body()
            try:
                body = await run_in_threadpool(VectorUpload.model_validate_json, raw)
            except ValidationError as err:
                raise InvalidInputError(
                    f"send multipart form data (file, name) or JSON {{'name', 'data': base64}}: "
                    f"{validation_message(err.errors())[0]}"
                ) from None
            try:
                data = await run_in_threadpool(base64.b64decode, body.data, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInputError("'data' is not valid base64") from None
            name = body.name
        if len(data) > max_upload_bytes:
            raise InvalidInputError(
                f"vector files are limited to {max_upload_bytes} bytes (--max-upload-bytes)"
            )
        async with upload_lock:
            if len(engine.vectors) >= max_vectors:
                raise _HTTPError(
                    409,
                    f"this server holds {len(engine.vectors)} vectors, its cap of {max_vectors} "
                    f"(--max-vectors); delete one (DELETE /v1/vectors/NAME) to make room",
                    kind="invalid_request_error",
                    code="too_many_vectors",
                )
            # loading checks the file (format, checksum, fit to the model): off the event loop
            await run_in_threadpool(engine.vectors.register_bytes, name, data)
        return describe_vector(name, engine.vectors.get(name))

    @app.delete("/v1/vectors/{name}", dependencies=[Depends(authorize)])
    async def delete_vector(name: str) -> dict[str, Any]:
        # requests already admitted hold the vector itself, not its name: they are unaffected
        if engine.vectors.remove(name) is None:
            raise _HTTPError(
                404,
                f"no vector named {name!r} is registered",
                kind="not_found_error",
                code="vector_not_found",
            )
        return {"id": name, "object": "vector", "deleted": True}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        check_counts(body)
        gen, events = await run_in_threadpool(
            admit, lambda: body.to_generation(default_max_tokens=16, max_strength=max_strength)
        )
        return await serve(
            request, gen, events, chat=False, stream=body.streaming, usage_chunk=_usage(body)
        )

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        check_counts(body)
        chat_default = min(default_max_tokens, max_tokens_cap)
        gen, events = await run_in_threadpool(
            admit,
            lambda: body.to_generation(default_max_tokens=chat_default, max_strength=max_strength),
        )
        return await serve(
            request, gen, events, chat=True, stream=body.streaming, usage_chunk=_usage(body)
        )

    def check_counts(body: CompletionRequest | ChatCompletionRequest) -> None:
        for field, entries, cap, option in (
            ("steering", body.steering, max_steering_entries, "--max-steering-entries"),
            ("readout", body.readout, max_readout_entries, "--max-readout-entries"),
        ):
            if len(entries) > cap:
                raise _HTTPError(
                    400,
                    f"{field} has {len(entries)} entries; this server allows at most {cap} per "
                    f"request ({option})",
                    kind="invalid_request_error",
                    code="too_many_entries",
                )

    def admit(
        build: Callable[[], GenerationRequest],
    ) -> tuple[GenerationRequest, RequestStream]:
        """Validate, tokenize and queue a request: run in a worker thread, since a long prompt
        or many steering entries take seconds that the event loop (every other request, and
        ``/health``) must not wait for."""
        gen = build()
        gen.check(max_tokens_cap=max_tokens_cap)
        for entry in gen.readout:
            if not -engine.n_layers <= entry.layer < engine.n_layers:
                raise InvalidInputError(
                    f"readout layer {entry.layer} is outside the model's {engine.n_layers} layers"
                )
        return gen, engine.submit(gen)

    async def serve(
        request: Request,
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

    # --- playground ------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> Any:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


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


# --- running in-process ---------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, *, host: str = "127.0.0.1", port: int | None = None, timeout: float = 60.0
) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yields its base URL.

    Waits (at most ``timeout`` seconds) until the server accepts connections, and stops it on
    exit with the same bounded wait (for notebooks, tests and benchmarks).

    >>> import httpx
    >>> from steerlab.testing import tiny_model
    >>> from steerlab.server.engine import TorchEngine
    >>> with serve_in_thread(create_app(TorchEngine(tiny_model("gpt2")))) as url:
    ...     httpx.get(url + "/health").json()["status"]
    'ok'
    """
    import uvicorn

    chosen = free_port(host) if port is None else port
    config = uvicorn.Config(app, host=host, port=chosen, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="steerlab-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{chosen}")
            time.sleep(0.02)
        yield f"http://{host}:{chosen}"
    finally:
        server.should_exit = True
        thread.join(timeout)
