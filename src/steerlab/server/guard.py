"""The ASGI guard in front of ``steerlab serve``: key and body size checked as the request arrives.

:class:`RequestGuard` is plain ASGI (no ``BaseHTTPMiddleware``, which would buffer streamed
responses). For every HTTP request it

* refuses a ``/v1`` request without the API key with 401 before a byte of its body is read;
* refuses a body whose ``Content-Length`` is over the limit with 413 at once, and counts the
  bytes of every other body (chunked or not) as the app reads them: the read that crosses the
  limit raises :class:`BodyTooLarge` (an HTTP 413), so nothing over the limit is ever buffered;
* announces ``Connection: close`` on every response sent while the request's body is still
  unread (the server would otherwise have to read and drop it to reuse the connection) and on
  every 5xx (the state of a request that hit a bug is unknown): a keep-alive client then knows
  to open a new connection instead of finding the old one dropped.

>>> from starlette.applications import Starlette
>>> from starlette.responses import PlainTextResponse
>>> from starlette.routing import Route
>>> from starlette.testclient import TestClient
>>> async def echo(request):
...     return PlainTextResponse(str(len(await request.body())))
>>> inner = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
>>> client = TestClient(RequestGuard(inner, max_body_bytes=10))
>>> client.post("/echo", content=b"12345").text, client.post("/echo", content=b"x" * 11).status_code
('5', 413)
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steerlab.server.protocol import error_body

__all__ = ["BodyTooLarge", "RequestGuard", "protected"]

_CLOSE = (b"connection", b"close")


class BodyTooLarge(HTTPException):
    """The request body is over the server's limit (HTTP 413).

    A Starlette ``HTTPException`` so that FastAPI's body reading lets it through to the app's
    error handler (it wraps other exceptions raised while reading into a 400).
    """

    def __init__(self, limit: int, option: str) -> None:
        super().__init__(
            413,
            detail=f"the request body is over this server's limit of {limit} bytes "
            f"(steerlab serve {option})",
        )


def protected(path: str) -> bool:
    """Whether ``path`` is an API route that needs the key (``/v1`` and below).

    >>> protected("/v1/completions"), protected("/health"), protected("/v1x")
    (True, False, False)
    """
    return path == "/v1" or path.startswith("/v1/")


def _error(message: str, kind: str, code: str) -> bytes:
    return json.dumps(error_body(message, kind=kind, code=code)).encode()


class RequestGuard:
    """ASGI middleware: API key and body limit before the body is read (see the module doc).

    ``max_body_bytes``: the largest body of any request but uploads; ``uploads``: the paths
    (POST) whose bodies may reach ``max_upload_bytes`` instead (vector files). ``authorized``:
    given the request headers, whether a ``/v1`` request may proceed (``None``: no key needed).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_upload_bytes: int | None = None,
        uploads: tuple[str, ...] = (),
        authorized: Callable[[Headers], bool] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_body_bytes if max_upload_bytes is None else max_upload_bytes
        self.uploads = uploads
        self.authorized = authorized

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        upload = scope["method"] == "POST" and scope["path"] in self.uploads
        limit = self.max_upload_bytes if upload else self.max_body_bytes
        option = "--max-upload-bytes" if upload else "--max-body-bytes"
        declared = _content_length(headers)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        # whether body bytes may still be on the wire: what a response must not leave behind
        pending = chunked or (declared is not None and declared > 0)

        if self.authorized is not None and protected(scope["path"]):
            if not self.authorized(headers):
                message = "missing or wrong API key (send 'Authorization: Bearer <key>')"
                body = _error(message, "authentication_error", "invalid_api_key")
                await _respond(send, 401, body, close=pending)
                return
        if declared is not None and declared > limit:
            message = str(BodyTooLarge(limit, option).detail)
            await _respond(send, 413, _error(message, "invalid_request_error", "too_large"))
            return

        state = {"pending": pending, "read": 0}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    state["pending"] = False
                if state["read"] > limit:
                    raise BodyTooLarge(limit, option)
            return message

        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if state["pending"] or message["status"] >= 500:
                    raw = [(k, v) for k, v in message.get("headers", []) if k.lower() != _CLOSE[0]]
                    message = {**message, "headers": [*raw, _CLOSE]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge as err:
            if started:
                raise
            body = _error(str(err.detail), "invalid_request_error", "too_large")
            await _respond(send, 413, body)


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


async def _respond(send: Send, status: int, body: bytes, *, close: bool = True) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append(_CLOSE)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
