"""What every route of the HTTP app shares: its settings, its dependencies and its errors.

The app keeps its :class:`Engine` and :class:`ServerSettings` on ``app.state``; routes reach them
through the FastAPI dependencies :func:`engine_of` and :func:`settings_of` (and
:func:`authorize`), so that a router needs nothing from the function that built the app.
Every error leaves as an OpenAI error object (:func:`install_error_handlers`).

>>> settings = ServerSettings(max_tokens_cap=8)
>>> settings.limits()["max_tokens_cap"], key_ok(Headers({}), api_key=None)
(8, True)
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerlab.errors import SteerlabError
from steerlab.server.engine import Engine
from steerlab.server.guard import BodyTooLarge
from steerlab.server.protocol import error_body, validation_message
from steerlab.server.requests import EngineError, RequestLimits

__all__ = [
    "HTTPError",
    "ServerSettings",
    "authorize",
    "check_model",
    "engine_of",
    "install_error_handlers",
    "key_ok",
    "settings_of",
]

_MIB = 1024 * 1024


class HTTPError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, kind: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.code = code


@dataclass(frozen=True)
class ServerSettings:
    """The options of one app (see :func:`steerlab.server.app.create_app`, which checks them).

    ``upload_lock`` serializes vector uploads, so that the count checked against
    ``max_vectors`` is the count the registration adds to.
    """

    api_key: str | None = field(default=None, repr=False)
    max_tokens_cap: int = 1024
    max_strength: float = 64.0
    default_max_tokens: int = 256
    max_body_bytes: int = 4 * _MIB
    max_upload_bytes: int = 64 * _MIB
    max_steering_entries: int = 32
    max_readout_entries: int = 16
    max_vectors: int = 256
    upload_lock: asyncio.Lock = field(default_factory=asyncio.Lock, compare=False, repr=False)

    def request_limits(self) -> RequestLimits:
        """What each request may ask for, as :meth:`Engine.submit
        <steerlab.server.engine.Engine.submit>` checks it.

        >>> ServerSettings(max_tokens_cap=8).request_limits().max_tokens
        8
        """
        return RequestLimits(max_tokens=self.max_tokens_cap, max_strength=self.max_strength)

    def limits(self) -> dict[str, Any]:
        """The limits ``/health`` reports.

        >>> list(ServerSettings().limits())[:2]
        ['max_tokens_cap', 'max_strength']
        """
        return {
            "max_tokens_cap": self.max_tokens_cap,
            "max_strength": self.max_strength,
            "max_body_bytes": self.max_body_bytes,
            "max_upload_bytes": self.max_upload_bytes,
            "max_steering_entries": self.max_steering_entries,
            "max_readout_entries": self.max_readout_entries,
            "max_vectors": self.max_vectors,
        }


def key_ok(headers: Headers, *, api_key: str | None) -> bool:
    """Whether ``headers`` carry ``Authorization: Bearer <api_key>`` (always, without a key).

    >>> key_ok(Headers({"authorization": "Bearer s3"}), api_key="s3")
    True
    """
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return api_key is None or (
        scheme.lower() == "bearer"
        and secrets.compare_digest(token.strip().encode(), api_key.encode())
    )


def engine_of(request: Request) -> Engine:
    """The app's engine (a FastAPI dependency)."""
    engine: Engine = request.app.state.engine
    return engine


def settings_of(request: Request) -> ServerSettings:
    """The app's settings (a FastAPI dependency)."""
    settings: ServerSettings = request.app.state.settings
    return settings


async def authorize(request: Request) -> None:
    """Refuse (401) a request without the app's API key (a FastAPI dependency)."""
    # the guard refused these already; kept so that no route depends on the middleware
    if not key_ok(request.headers, api_key=settings_of(request).api_key):
        raise HTTPError(
            401,
            "missing or wrong API key (send 'Authorization: Bearer <key>')",
            kind="authentication_error",
            code="invalid_api_key",
        )


def check_model(engine: Engine, name: str) -> None:
    """Refuse (404) a model name that is neither the engine's nor ``default``."""
    if name not in (engine.model_id, "default"):
        raise HTTPError(
            404,
            f"the model {name!r} does not exist; this server serves {engine.model_id!r} "
            f"(also reachable as 'default')",
            kind="invalid_request_error",
            code="model_not_found",
        )


def _error_response(status: int, message: str, kind: str, code: str | None = None) -> Any:
    return JSONResponse(error_body(message, kind=kind, code=code), status_code=status)


async def _on_http_error(_: Request, err: Exception) -> Any:
    assert isinstance(err, HTTPError)
    return _error_response(err.status, str(err), err.kind, err.code)


async def _on_steerlab_error(_: Request, err: Exception) -> Any:
    if isinstance(err, EngineError):
        return _error_response(503, str(err), "server_error", "engine_error")
    return _error_response(400, str(err), "invalid_request_error")


async def _on_validation_error(_: Request, err: Exception) -> Any:
    assert isinstance(err, RequestValidationError)
    problems = err.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        message = "the request body is not valid JSON"
        return _error_response(400, message, "invalid_request_error")
    message, param = validation_message(problems)
    return JSONResponse(error_body(message, param=param), status_code=400)


async def _on_starlette_error(_: Request, err: Exception) -> Any:
    assert isinstance(err, StarletteHTTPException)
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    code = "too_large" if isinstance(err, BodyTooLarge) else None
    return _error_response(err.status_code, str(err.detail), kind, code)


async def _on_unexpected(_: Request, err: Exception) -> Any:
    # sent outside the guard, after which uvicorn drops the connection: say so
    return JSONResponse(
        error_body(f"internal error: {type(err).__name__}", kind="server_error"),
        status_code=500,
        headers={"Connection": "close"},
    )


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` an OpenAI error object with its status: ``HTTPError`` as
    raised, a ``SteerlabError`` 400 (503 for an engine failure), a validation error 400 naming
    the field, Starlette's own (404, 405, 413) with their status, anything else 500."""
    app.add_exception_handler(HTTPError, _on_http_error)
    app.add_exception_handler(SteerlabError, _on_steerlab_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_starlette_error)
    app.add_exception_handler(Exception, _on_unexpected)
