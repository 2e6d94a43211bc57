"""The FastAPI application of ``steerlab serve``: a thin shell over an :class:`Engine`.

The routes live in routers by area (:mod:`steerlab.server.routes`); they parse and validate
with pydantic (:mod:`steerlab.server.protocol`), hand a typed
:class:`~steerlab.server.requests.GenerationRequest` to the engine, and stream what comes back.
They reach the engine and the options through dependencies (:mod:`steerlab.server.deps`).
Every error is an OpenAI error object.

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

import contextlib
import functools
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from steerlab.errors import InvalidInputError
from steerlab.server.deps import ServerSettings, install_error_handlers, key_ok
from steerlab.server.engine import Engine
from steerlab.server.guard import RequestGuard
from steerlab.server.routes import completions, models, playground, vectors
from steerlab.server.routes.playground import STATIC_DIR
from steerlab.server.routes.vectors import describe_condition, describe_vector

__all__ = [
    "STATIC_DIR",
    "create_app",
    "describe_condition",
    "describe_vector",
    "free_port",
    "serve_in_thread",
]

_MIB = 1024 * 1024


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
    settings = ServerSettings(
        api_key=api_key,
        max_tokens_cap=max_tokens_cap,
        max_strength=max_strength,
        default_max_tokens=default_max_tokens,
        max_body_bytes=max_body_bytes,
        max_upload_bytes=max_upload_bytes,
        max_steering_entries=max_steering_entries,
        max_readout_entries=max_readout_entries,
        max_vectors=max_vectors,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.shutdown()

    app = FastAPI(title="steerlab", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.settings = settings
    # outermost of the app's own layers: the key and the body size are checked before any
    # route (or FastAPI's body parsing) reads the body
    app.add_middleware(
        RequestGuard,
        max_body_bytes=max_body_bytes,
        max_upload_bytes=max_upload_bytes,
        uploads=("/v1/vectors",),
        authorized=None if api_key is None else functools.partial(key_ok, api_key=api_key),
    )
    install_error_handlers(app)
    for router in (models.router, vectors.router, completions.router, playground.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


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
