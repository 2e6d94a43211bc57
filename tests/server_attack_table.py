"""The server attack table of issue 18: hostile HTTP requests against ``steerlab serve``.

Each :class:`ServerAttack` is one request (or a short scripted exchange) that a careless or
hostile client could send. The harness starts the real app (torch engine, tiny model, an API
key) on a free port and, for every row, first starts :data:`VICTIMS` (good streaming requests,
greedy and seeded, steered and not), waits until each has its first token (so they are in the
running batch), sends the attack, and then compares every victim's text with its solo output.
``tests/test_server_attacks.py`` runs every row as a parametrised test; run this file directly
to count how the server fares:

    PYTHONPATH=src python tests/server_attack_table.py [-v] [--json FILE] [-k WORDS ...]

Outcome of the attack itself:

* ``clean``: the expected status (4xx: an OpenAI error object whose message names the field;
  2xx: the row's own check of the answer passed);
* ``accepted``: a 2xx where a refusal was due (or a refusal where a valid request was due);
* ``unclear``: refused, but with another 4xx than the expected one, or without naming the field;
* ``5xx``: a server error for a client's mistake;
* ``crash``: no answer (connection dropped, timeout) or the server/engine no longer serves.

Separately, ``affected`` counts rows during which a victim's output differed from its solo
output or a victim failed (the target is 0 whatever the attack's own outcome).

Adding an attack is one row in :data:`ATTACKS`. ``pending`` names the helper whose work fixes
the row while that work is not on ``main`` (the test marks it ``xfail(strict=True)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import torch

import steerlab as sl

try:
    from steerlab.server.engine import MIN_TEMPERATURE
except ImportError:  # the table also runs on commits from before the minimum existed
    MIN_TEMPERATURE = 1e-3

KEY = "attack-table-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 8192  # the tiny model's context is raised so long-prompt rows fit
TIMEOUT = 30.0


# --- replies -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Reply:
    """What came back: ``status`` 0 when no HTTP answer came (then ``error`` says why)."""

    status: int = 0
    body: Any = None
    text: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    error: str = ""
    problem: str = ""  # set by a row's own check (a scripted exchange that went wrong)
    affected: str = ""  # set by a row that measures harm to other requests itself (a stall)

    @property
    def message(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            error = self.body["error"]
            return f"{error.get('message', '')} {error.get('param') or ''}"
        return self.text[:300]


def _reply(response: httpx.Response) -> Reply:
    try:
        body = response.json()
    except ValueError:
        body = None
    return Reply(
        status=response.status_code,
        body=body,
        text=response.text[:2000],
        headers={k.lower(): v for k, v in response.headers.items()},
    )


@dataclasses.dataclass
class Harness:
    """A running server (``url``) with its engine, and the solo outputs of the victims."""

    url: str
    engine: Any
    solo: list[str] = dataclasses.field(default_factory=list)
    streams: list[Any] = dataclasses.field(default_factory=list)  # every submitted stream
    # per stream (by id): its submission time, then the time of each event the engine put
    stamps: dict[int, list[float]] = dataclasses.field(default_factory=dict)

    def send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, Any] | None = None,
        auth: bool = True,
        timeout: float = TIMEOUT,
        **kwargs: Any,
    ) -> Reply:
        """One request; ``body`` is sent as ``json.dumps(body)`` (ASCII escapes, so lone
        surrogates and NaN reach the server as a client's JSON library would write them)."""
        sent: dict[str, Any] = dict(AUTH if auth else {})
        if body is not None:
            raw = json.dumps(body).encode()
            sent["content-type"] = "application/json"
        sent.update(headers or {})
        try:
            with httpx.Client(timeout=timeout) as client:
                response = client.request(
                    method, self.url + path, content=raw, headers=sent, **kwargs
                )
        except httpx.HTTPError as err:
            return Reply(error=f"{type(err).__name__}: {err}")
        return _reply(response)


# --- victims -------------------------------------------------------------------------------------
VICTIMS: list[tuple[str, dict[str, Any]]] = [
    (
        "/v1/completions",
        {
            "prompt": "the cat sat on the",
            "temperature": 0,
            "steering": [{"vector": "alpha", "strength": 8.0, "positions": "all"}],
        },
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}]}),
    (
        "/v1/completions",
        {
            "prompt": "a dog ran",
            "temperature": 0.8,
            "seed": 123,
            "steering": [{"vector": "beta", "strength": 4.0, "positions": "last"}],
        },
    ),
]
VICTIM_TOKENS = 12


def _victim(url: str, path: str, fields: dict[str, Any], started: threading.Event) -> str:
    """Stream one victim request; its text, or ``"FAILED: ..."``."""
    body = {"model": "default", "max_tokens": VICTIM_TOKENS, "temperature": 0, "stream": True}
    body.update(fields)
    parts: list[str] = []
    try:
        with httpx.Client(timeout=TIMEOUT) as client:
            with client.stream("POST", url + path, json=body, headers=AUTH) as response:
                if response.status_code != 200:
                    return f"FAILED: HTTP {response.status_code}"
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return f"FAILED: {chunk['error'].get('message')}"
                    for choice in chunk.get("choices", []):
                        piece = choice.get("text")
                        if piece is None:
                            piece = (choice.get("delta") or {}).get("content") or ""
                        parts.append(piece)
                        if piece:
                            started.set()
    except httpx.HTTPError as err:
        return f"FAILED: {type(err).__name__}"
    finally:
        started.set()
    return "".join(parts)


def run_victims(h: Harness, during: Callable[[], Reply]) -> tuple[Reply, list[str]]:
    """Start every victim, wait for their first tokens, run ``during``, collect the victims."""
    results: list[str] = [""] * len(VICTIMS)
    events = [threading.Event() for _ in VICTIMS]

    def work(i: int) -> None:
        results[i] = _victim(h.url, VICTIMS[i][0], VICTIMS[i][1], events[i])

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(VICTIMS))]
    for thread in threads:
        thread.start()
    for event in events:
        event.wait(TIMEOUT)
    reply = during()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    return reply, results


# --- the rows ------------------------------------------------------------------------------------
Send = Callable[[Harness], Reply]


@dataclasses.dataclass(frozen=True)
class ServerAttack:
    """One attack: ``send(h)`` must answer ``status`` (one of them, if a tuple) with every word
    of ``words`` in the error message (case-insensitive); for a 2xx, ``send`` itself checks the
    answer and sets ``Reply.problem`` when it is wrong."""

    category: str
    name: str
    send: Send
    status: int | tuple[int, ...] = 400
    words: tuple[str, ...] = ()
    pending: str | None = None  # whose unlanded work fixes this row

    @property
    def id(self) -> str:
        return f"{self.category}: {self.name}"


def _post(path: str, body: Any, **kwargs: Any) -> Send:
    return lambda h: h.send("POST", path, body=body, **kwargs)


def _raw(path: str, data: bytes, content_type: str = "application/json") -> Send:
    return lambda h: h.send("POST", path, raw=data, headers={"content-type": content_type})


def _completion(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "default", "prompt": "the cat", "max_tokens": 4}
    body.update(fields)
    return body


def _chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    body.update(fields)
    return body


def _c(**fields: Any) -> Send:
    return _post("/v1/completions", _completion(**fields))


def _ch(**fields: Any) -> Send:
    return _post("/v1/chat/completions", _chat(**fields))


def _steer(**entry: Any) -> Send:
    return _c(steering=[{"vector": "alpha", "strength": 2.0, **entry}])


def _served(send: Send, *, tokens: int | None = None) -> Send:
    """A valid request: it must be served (2xx with a completion)."""

    def run(h: Harness) -> Reply:
        reply = send(h)
        if reply.status == 200:
            usage = (reply.body or {}).get("usage") or {}
            if not usage.get("completion_tokens"):
                reply.problem = f"no completion tokens in {reply.text[:200]}"
            elif tokens is not None and usage["completion_tokens"] > tokens:
                reply.problem = f"{usage['completion_tokens']} tokens, asked for {tokens}"
        return reply

    return run


def _openai_chat(h: Harness) -> Reply:
    """The real openai client's ordinary chat call (system + user, stream with usage)."""
    import openai

    client = openai.OpenAI(base_url=h.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    try:
        done = client.chat.completions.create(
            model="default",
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "the cat"},
            ],
            max_tokens=3,
            temperature=0.7,
            top_p=0.9,
            seed=5,
            stop=["zzz"],
            user="someone",
        )
        chunks = list(
            client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": "the cat"}],
                max_tokens=3,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        legacy = client.completions.create(model="default", prompt="the cat", max_tokens=2)
    except openai.APIError as err:
        status = getattr(err, "status_code", 0) or 0
        return Reply(status=status, body=getattr(err, "body", None), text=str(err))
    reply = Reply(status=200, text=str(done.choices[0].message.content))
    if not done.usage or done.usage.completion_tokens < 1:
        reply.problem = "no usage"
    elif not chunks or chunks[-1].usage is None:
        reply.problem = "no usage chunk"
    elif not legacy.usage or legacy.usage.completion_tokens < 1:
        reply.problem = "legacy completion empty"
    return reply


# --- scripted exchanges --------------------------------------------------------------------------
def _partial_body(path: str, *, auth: bool, declared: int, sent: int = 1 << 20) -> Send:
    """Declare a ``declared``-byte body, send ``sent`` bytes and wait: a server that reads
    bodies in full before refusing never answers (reported as ``accepted``: the body was
    taken on)."""

    def run(h: Harness) -> Reply:
        host, port = h.url.removeprefix("http://").split(":")
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n"
        )
        if auth:
            head += f"Authorization: Bearer {KEY}\r\n"
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head.encode() + b"\r\n")
            try:
                sock.sendall(b'{"prompt": "' + b"a" * (sent - 12))
            except OSError:
                pass  # the server may refuse and close while we send: that is the point
            try:
                data = _read_response(sock, timeout=5.0)
            except (TimeoutError, OSError):
                return Reply(status=200, problem="no answer after 5 s: the body is being read")
        return _parse_raw(data)

    return run


def _parse_raw(data: bytes) -> Reply:
    if not data:
        return Reply(error="connection closed without an answer")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        body = json.loads(rest.decode("utf-8", "replace"))
    except ValueError:
        body = None
    return Reply(status=status, body=body, text=rest.decode("utf-8", "replace"), headers=headers)


def _keep_alive_after(path: str, data: bytes) -> Send:
    """Send a request that fails, then a good one on the same connection: the connection must
    either be closed with ``Connection: close`` announced, or keep serving."""

    def run(h: Harness) -> Reply:
        host, port = h.url.removeprefix("http://").split(":")
        first = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode() + data
        second = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(first)
            reply = _parse_raw(_read_response(sock))
            if reply.error:
                return reply
            announced = reply.headers.get("connection", "").lower() == "close"
            try:
                sock.sendall(second)
                again = _read_response(sock)
            except OSError:
                again = b""
        if not again and not announced:
            reply.problem = "connection dropped after the error without 'Connection: close'"
            reply.status = 200 if reply.status < 500 else reply.status
        return reply

    return run


def _read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    data = b""
    sock.settimeout(timeout)
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def _spied(h: Harness, action: Callable[[], Any]) -> list[Any]:
    """Run ``action`` and return the engine streams submitted meanwhile."""
    before = len(h.streams)
    action()
    return h.streams[before:]


def _disconnect(*, stream: bool) -> Send:
    """A client that gives up after the first tokens: its work must be cancelled."""

    def run(h: Harness) -> Reply:
        body = _completion(prompt="the cat sat", max_tokens=1500, temperature=0, stream=stream)

        def act() -> None:
            with contextlib.suppress(httpx.HTTPError):
                with httpx.Client(timeout=0.5) as client:
                    with client.stream(
                        "POST", h.url + "/v1/completions", json=body, headers=AUTH
                    ) as response:
                        for _ in response.iter_bytes():
                            break

        submitted = _spied(h, act)
        if len(submitted) != 1:
            return Reply(status=200, problem=f"{len(submitted)} streams were submitted")
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not submitted[0].cancelled:
            time.sleep(0.05)
        if not submitted[0].cancelled:
            submitted[0].cancel()  # free the engine for the next rows
            return Reply(status=200, problem="still generating 5 s after the client left")
        return Reply(status=499)

    return run


def _cancel_then_same(h: Harness) -> Reply:
    """Drop a stream after its first token, then the same request in full: it must equal the
    same request run alone before (nothing of the cancelled one is left behind)."""
    body = _completion(
        prompt="i think the movie was",
        max_tokens=10,
        temperature=0,
        steering=[{"vector": "alpha", "strength": 6.0, "positions": "after:movie"}],
    )
    alone = h.send("POST", "/v1/completions", body=body)
    with httpx.Client(timeout=TIMEOUT) as client:
        with client.stream(
            "POST", h.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH
        ) as response:
            for _ in response.iter_lines():
                break
    again = h.send("POST", "/v1/completions", body=body)
    if alone.status != 200 or again.status != 200:
        return again if again.status != 200 else alone
    if alone.body["choices"][0]["text"] != again.body["choices"][0]["text"]:
        again.problem = "a cancelled stream changed the next identical request"
    return again


def _many_cancelled(h: Harness) -> Reply:
    """Twenty streams dropped right after their headers; the engine must end idle."""
    body = _completion(prompt="a dog ran", max_tokens=30, stream=True)

    def act() -> None:
        for _ in range(20):
            with httpx.Client(timeout=TIMEOUT) as client:
                with client.stream("POST", h.url + "/v1/completions", json=body, headers=AUTH):
                    pass

    submitted = _spied(h, act)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and not all(s.cancelled for s in submitted):
        time.sleep(0.05)
    reply = h.send("GET", "/health")
    left = sum(not s.cancelled for s in submitted)
    if left:
        reply.problem = f"{left} of {len(submitted)} dropped streams were not cancelled"
    return reply


def _health_during(send: Send, *, limit: float = 1.0) -> Send:
    """Run ``send`` while polling ``/health``: the event loop must keep answering (a ``/health``
    slower than ``limit`` seconds while the attack is being validated marks the row)."""

    def run(h: Harness) -> Reply:
        box: list[Reply] = []
        thread = threading.Thread(target=lambda: box.append(send(h)), daemon=True)
        thread.start()
        worst = 0.0
        time.sleep(0.3)
        while thread.is_alive():
            start = time.monotonic()
            h.send("GET", "/health", auth=False, timeout=60)
            worst = max(worst, time.monotonic() - start)
            time.sleep(0.05)
        thread.join()
        reply = box[0]
        if worst > limit:
            reply.affected = f"/health took {worst:.1f} s while the attack was handled"
        return reply

    return run


def _long_prompt_interleaved(h: Harness) -> Reply:
    """A ~4,000-token prompt arrives while a stream runs: with chunked prefill the running
    stream keeps getting tokens while the long prompt is prefilled. Counted on the engine's
    side (no timing): tokens the running stream receives between the long request's
    submission and its first token. Prefilled in one piece, that is at most the one decode
    step under way when it was submitted."""
    victim: list[Any] = []
    started = threading.Event()

    def run_victim() -> None:
        # long enough to outlast the long request on a quiet machine too (the tiny model decodes
        # 60 tokens in about 0.1 s, before the long request is even sent); cancelled below
        body = _completion(prompt="the cat sat", max_tokens=1500, temperature=0, stream=True)
        with httpx.Client(timeout=TIMEOUT * 4) as client:
            with client.stream(
                "POST", h.url + "/v1/completions", json=body, headers=AUTH
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        started.set()

    thread = threading.Thread(target=run_victim, daemon=True)
    before = len(h.streams)
    thread.start()
    started.wait(TIMEOUT)
    victim.extend(h.streams[before:])
    time.sleep(0.2)
    body = _completion(prompt="the cat " * 2000, max_tokens=2, temperature=0)
    box: list[Reply] = []
    submitted = _spied(
        h, lambda: box.append(h.send("POST", "/v1/completions", body=body, timeout=TIMEOUT * 10))
    )
    for stream in victim:
        stream.cancel()
    thread.join(TIMEOUT * 4)
    reply = box[0]
    if reply.status != 200:
        return reply
    if len(submitted) != 1 or len(victim) != 1 or len(h.stamps[id(submitted[0])]) < 2:
        reply.problem = "the long request or the running stream was not seen by the engine"
        return reply
    sent, first = h.stamps[id(submitted[0])][:2]
    during = sum(sent < t < first for t in h.stamps[id(victim[0])][1:])
    if during < 2:
        reply.affected = f"{during} token(s) of a running stream during the long prefill"
    return reply


def _boom(h: Harness) -> Reply:
    return _keep_alive_after("/_attack/boom", b"{}")(h)


def _delete_vector(h: Harness) -> Reply:
    """Upload a vector, DELETE it, then use it: the use must be refused (unknown vector)."""
    vec = sl.SteeringVector({1: torch.ones(h.engine.model.d_model)})
    data = _vector_bytes(vec)
    up = h.send("POST", "/v1/vectors", files={"file": ("doomed.safetensors", data)})
    if up.status != 200:
        return up
    gone = h.send("DELETE", "/v1/vectors/doomed")
    if gone.status != 200:
        gone.status = 200
        gone.problem = "DELETE /v1/vectors/{name} is not served"
        return gone
    return h.send(
        "POST", "/v1/completions", body=_completion(steering=[{"vector": "doomed", "strength": 1}])
    )


def _vector_bytes(vec: Any) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return vec.save(Path(tmp) / "v.safetensors").read_bytes()


def _vector_cap(h: Harness) -> Reply:
    """Upload vectors until the server's cap (``/health`` limits) is passed: the one beyond it
    must be refused (409), then the fillers are deleted again."""
    cap = (h.send("GET", "/health").body or {}).get("limits", {}).get("max_vectors", 300)
    held = len((h.send("GET", "/v1/vectors").body or {}).get("data", []))
    data = _good_vector(h)
    names: list[str] = []
    reply = Reply()
    for i in range(cap + 1 - held):
        reply = h.send("POST", "/v1/vectors", files={"file": (f"filler{i}.safetensors", data)})
        if reply.status != 200:
            break
        names.append(f"filler{i}")
    for name in names:
        h.send("DELETE", f"/v1/vectors/{name}")
    return reply


def _upload(name: str, data: Callable[[Harness], bytes]) -> Send:
    return lambda h: h.send("POST", "/v1/vectors", files={"file": (name, data(h))})


def _good_vector(h: Harness) -> bytes:
    return _vector_bytes(sl.SteeringVector({2: torch.ones(h.engine.model.d_model)}))


def _concurrent_bad(h: Harness) -> Reply:
    """Sixteen mixed bad requests at once (all must be 4xx) beside the victims."""
    bad = [
        _completion(temperature=1e-300),
        _completion(steering=[{"vector": "alpha", "positions": 99999999999999999999}]),
        _completion(prompt="abc \ud800"),
        _completion(seed=2**64),
        _completion(steering=[{"vector": "alpha", "positions": "after:abc \ud800"}]),
        _completion(temperature=1e-40),
        _completion(steering=[{"vector": "alpha", "positions": [0, 10**6]}]),
        _completion(stop=["\ud800"]),
    ] * 2
    replies: list[Reply] = [Reply()] * len(bad)

    def one(i: int) -> None:
        replies[i] = h.send("POST", "/v1/completions", body=bad[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bad))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    for reply in replies:
        if not 400 <= reply.status < 500:
            return reply
    return Reply(status=400, body={"error": {"message": "all 16 refused", "type": "x"}})


def _same_name_uploads(h: Harness) -> Reply:
    """Two uploads of one name at once: exactly one is registered, the other refused."""
    data = _good_vector(h)
    replies: list[Reply] = []

    def one() -> None:
        replies.append(h.send("POST", "/v1/vectors", files={"file": ("twin.safetensors", data)}))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    statuses = sorted(r.status for r in replies)
    reply = Reply(status=200)
    if statuses != [200, 400]:
        reply.problem = f"statuses {statuses}"
    return reply


OVERFLOW = 99999999999999999999
SURROGATE = "abc \ud800"

ATTACKS: list[ServerAttack] = [
    # --- malformed JSON ---
    ServerAttack("json", "truncated body", _raw("/v1/completions", b'{"prompt": '), 400, ("json",)),
    ServerAttack("json", "empty body", _raw("/v1/completions", b""), 400),
    ServerAttack("json", "array body", _raw("/v1/completions", b"[1, 2]"), 400),
    ServerAttack("json", "string body", _raw("/v1/completions", b'"the cat"'), 400),
    ServerAttack("json", "invalid UTF-8", _raw("/v1/completions", b'{"prompt": "\xff\xfe"}'), 400),
    ServerAttack(
        "json",
        "NaN temperature literal",
        _raw("/v1/completions", b'{"prompt": "a", "temperature": NaN}'),
        400,
        ("temperature",),
    ),
    ServerAttack(
        "json",
        "Infinity strength literal",
        _raw(
            "/v1/completions", b'{"prompt":"a","steering":[{"vector":"alpha","strength":Infinity}]}'
        ),
        400,
        ("strength",),
    ),
    ServerAttack(
        "json",
        "1e999 max_tokens",
        _raw("/v1/completions", b'{"prompt": "a", "max_tokens": 1e999}'),
        400,
        ("max_tokens",),
    ),
    ServerAttack(
        "json",
        "100,000 nested arrays",
        _raw("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        400,
    ),
    ServerAttack(
        "json",
        "form-encoded body",
        _raw("/v1/completions", b"prompt=a", "application/x-www-form-urlencoded"),
        400,
    ),
    # --- steering fields ---
    ServerAttack("steering", "unknown vector", _c(steering=[{"vector": "nope"}]), 400, ("nope",)),
    ServerAttack("steering", "strength true", _steer(strength=True), 400, ("strength",)),
    ServerAttack("steering", 'strength "4"', _steer(strength="4"), 400, ("strength",)),
    ServerAttack("steering", "strength over the cap", _steer(strength=1e6), 400, ("strength",)),
    ServerAttack(
        "steering", "strength layer key 'x'", _steer(strength={"x": 1.0}), 400, ("strength",)
    ),
    ServerAttack("steering", "strength layer 99", _steer(strength={"99": 1.0}), 400, ("99",)),
    ServerAttack("steering", "strength {}", _steer(strength={}), 400, ("strength",)),
    ServerAttack(
        "steering", "strength {'1': true}", _steer(strength={"1": True}), 400, ("strength",)
    ),
    ServerAttack("steering", "op explode", _steer(op="explode"), 400, ("explode",)),
    ServerAttack("steering", "unknown condition", _steer(when="nope"), 400, ("nope",)),
    ServerAttack("steering", "extra key 'scale'", _steer(scale=2), 400, ("scale",)),
    ServerAttack(
        "steering", "steering is an object", _c(steering={"vector": "alpha"}), 400, ("steering",)
    ),
    ServerAttack(
        "steering", "entry without vector", _c(steering=[{"strength": 1}]), 400, ("vector",)
    ),
    ServerAttack(
        "steering", "vector name is a lone surrogate", _c(steering=[{"vector": "\ud800"}]), 400
    ),
    ServerAttack(
        "steering",
        "1,000 steering entries (event loop kept free)",
        _health_during(_c(steering=[{"vector": "alpha", "strength": 0.001}] * 1000)),
        400,
        ("steering",),
    ),
    ServerAttack(
        "steering",
        "1,000 readout entries",
        _c(readout=[{"vector": "alpha", "layer": 1}] * 1000),
        400,
        ("readout",),
    ),
    ServerAttack(
        "steering", "readout layer 99", _c(readout=[{"vector": "alpha", "layer": 99}]), 400, ("99",)
    ),
    ServerAttack(
        "steering",
        "readout layer true",
        _c(readout=[{"vector": "alpha", "layer": True}]),
        400,
        ("layer",),
    ),
    ServerAttack(
        "steering",
        "valid steering and readout are served",
        _served(
            _c(
                steering=[{"vector": "beta", "strength": {"0": 2.0, "2": -1.0}, "positions": "1:"}],
                readout=[{"vector": "alpha", "layer": 1}],
            )
        ),
        200,
    ),
    # --- positions ---
    ServerAttack(
        "positions", "99999999999999999999", _steer(positions=OVERFLOW), 400, ("positions",)
    ),
    ServerAttack("positions", "10**6", _steer(positions=10**6), 400, ("positions",)),
    ServerAttack("positions", "-10**6", _steer(positions=-(10**6)), 400, ("positions",)),
    ServerAttack("positions", "[0, 10**20]", _steer(positions=[0, 10**20]), 400, ("positions",)),
    ServerAttack(
        "positions",
        "'5:99999999999999999999'",
        _steer(positions=f"5:{OVERFLOW}"),
        400,
        ("positions",),
    ),
    ServerAttack(
        "positions",
        "'first:99999999999999999999'",
        _steer(positions=f"first:{OVERFLOW}"),
        400,
        ("positions",),
    ),
    ServerAttack("positions", "true", _steer(positions=True), 400, ("positions",)),
    ServerAttack("positions", "[true]", _steer(positions=[True]), 400, ("positions",)),
    ServerAttack("positions", "1.5", _steer(positions=1.5), 400, ("positions",)),
    ServerAttack("positions", "'sideways'", _steer(positions="sideways"), 400, ("sideways",)),
    ServerAttack(
        "positions",
        "after: lone surrogate",
        _steer(positions="after:" + SURROGATE),
        400,
        ("positions",),
    ),
    ServerAttack(
        "positions",
        "between: lone surrogate",
        _steer(positions="between:<a>,\ud800"),
        400,
        ("positions",),
    ),
    ServerAttack("positions", "'after:'", _steer(positions="after:"), 400, ("marker",)),
    ServerAttack(
        "positions", "'between:only-one'", _steer(positions="between:only-one"), 400, ("between",)
    ),
    ServerAttack(
        "positions",
        "valid 'after: the' and [0, -1] are served",
        _served(
            _c(
                steering=[
                    {"vector": "alpha", "strength": 3.0, "positions": "after: the"},
                    {"vector": "beta", "strength": 3.0, "positions": [0, -1]},
                ]
            )
        ),
        200,
    ),
    # --- prompts ---
    ServerAttack("prompts", "lone surrogate", _c(prompt=SURROGATE), 400, ("prompt",)),
    ServerAttack("prompts", "empty", _c(prompt=""), 400, ("prompt",)),
    ServerAttack("prompts", "an int", _c(prompt=5), 400, ("prompt",)),
    ServerAttack("prompts", "null", _c(prompt=None), 400, ("prompt",)),
    ServerAttack("prompts", "two prompts", _c(prompt=["a", "b"]), 400, ("prompt",)),
    ServerAttack("prompts", "token ids", _c(prompt=[1, 2, 3]), 400, ("prompt",)),
    ServerAttack("prompts", "over the context", _c(prompt="the cat " * 5000), 400, ("context",)),
    ServerAttack(
        "prompts",
        "4M characters (event loop kept free)",
        _health_during(_c(prompt="the cat " * 500_000)),
        (400, 413),
    ),
    ServerAttack(
        "prompts",
        "4,000-token prompt beside a running stream (chunked prefill)",
        _long_prompt_interleaved,
        200,
    ),
    # --- sampling parameters ---
    ServerAttack("sampling", "temperature 1e-300", _c(temperature=1e-300), 400, ("temperature",)),
    ServerAttack("sampling", "temperature 1e-40", _c(temperature=1e-40), 400, ("temperature",)),
    ServerAttack("sampling", "temperature -1", _c(temperature=-1), 400, ("temperature",)),
    ServerAttack("sampling", 'temperature "0.5"', _c(temperature="0.5"), 400, ("temperature",)),
    ServerAttack("sampling", "temperature true", _c(temperature=True), 400, ("temperature",)),
    ServerAttack("sampling", "top_p 0", _c(top_p=0), 400, ("top_p",)),
    ServerAttack("sampling", "top_p 2", _c(top_p=2), 400, ("top_p",)),
    ServerAttack("sampling", 'top_p "1"', _c(top_p="1"), 400, ("top_p",)),
    ServerAttack("sampling", "seed 2**64", _c(temperature=1, seed=2**64), 400, ("seed",)),
    ServerAttack("sampling", "seed -2**63-1", _c(temperature=1, seed=-(2**63) - 1), 400, ("seed",)),
    ServerAttack("sampling", 'seed "4"', _c(seed="4"), 400, ("seed",)),
    ServerAttack("sampling", "seed 1.5", _c(seed=1.5), 400, ("seed",)),
    ServerAttack("sampling", 'max_tokens "4"', _c(max_tokens="4"), 400, ("max_tokens",)),
    ServerAttack("sampling", "max_tokens true", _c(max_tokens=True), 400, ("max_tokens",)),
    ServerAttack("sampling", "max_tokens 0", _c(max_tokens=0), 400, ("max_tokens",)),
    ServerAttack("sampling", "max_tokens 10**30", _c(max_tokens=10**30), 400, ("max_tokens",)),
    ServerAttack("sampling", "n 2", _c(n=2), 400, ("n",)),
    ServerAttack("sampling", "logprobs 21", _c(logprobs=21), 400, ("logprobs",)),
    ServerAttack("sampling", "logprobs true (completions)", _c(logprobs=True), 400, ("logprobs",)),
    ServerAttack(
        "sampling", "presence_penalty 0.5", _c(presence_penalty=0.5), 400, ("presence_penalty",)
    ),
    ServerAttack("sampling", "logit_bias", _c(logit_bias={"5": 10}), 400, ("logit_bias",)),
    ServerAttack("sampling", "stop lone surrogate", _c(stop=["\ud800"]), 400, ("stop",)),
    ServerAttack("sampling", "stop ''", _c(stop=""), 400, ("stop",)),
    ServerAttack("sampling", "five stop strings", _c(stop=list("abcde")), 400, ("stop",)),
    ServerAttack("sampling", "stop 5", _c(stop=5), 400, ("stop",)),
    ServerAttack("sampling", 'stream "yes"', _c(stream="yes"), 400, ("stream",)),
    ServerAttack("sampling", "stream 1", _c(stream=1), 400, ("stream",)),
    ServerAttack(
        "sampling",
        'include_usage "yes"',
        _c(stream=True, stream_options={"include_usage": "yes"}),
        400,
        ("include_usage",),
    ),
    ServerAttack("sampling", "echo true", _c(echo=True), 400, ("echo",)),
    ServerAttack("sampling", "best_of 2", _c(best_of=2), 400, ("best_of",)),
    ServerAttack("sampling", "suffix", _c(suffix="end"), 400, ("suffix",)),
    ServerAttack("sampling", "unknown field top_k", _c(top_k=1), 400, ("top_k",)),
    ServerAttack(
        "sampling",
        "seeded sampling at the smallest temperature is served",
        _served(_c(temperature=MIN_TEMPERATURE, seed=2**64 - 1)),
        200,
    ),
    # --- chat ---
    ServerAttack(
        "chat", "unknown role", _ch(messages=[{"role": "wizard", "content": "hi"}]), 400, ("role",)
    ),
    ServerAttack(
        "chat", "role tool", _ch(messages=[{"role": "tool", "content": "hi"}]), 400, ("role",)
    ),
    ServerAttack(
        "chat",
        "lone surrogate in content",
        _ch(messages=[{"role": "user", "content": SURROGATE}]),
        400,
        ("messages",),
    ),
    ServerAttack(
        "chat",
        "lone surrogate in a text part",
        _ch(messages=[{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]),
        400,
        ("messages",),
    ),
    ServerAttack(
        "chat",
        "lone surrogate in a system turn",
        _ch(messages=[{"role": "system", "content": SURROGATE}, {"role": "user", "content": "a"}]),
        400,
        ("messages",),
    ),
    ServerAttack(
        "chat",
        "image part",
        _ch(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        400,
        ("content",),
    ),
    ServerAttack("chat", "no messages", _ch(messages=[]), 400, ("messages",)),
    ServerAttack(
        "chat", "content 5", _ch(messages=[{"role": "user", "content": 5}]), 400, ("content",)
    ),
    ServerAttack("chat", "no role", _ch(messages=[{"content": "hi"}]), 400, ("role",)),
    ServerAttack(
        "chat",
        "message name",
        _ch(messages=[{"role": "user", "content": "hi", "name": "bob"}]),
        400,
        ("name",),
    ),
    ServerAttack(
        "chat",
        "assistant tool_calls",
        _ch(
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
            ]
        ),
        400,
        ("tool_calls",),
    ),
    ServerAttack(
        "chat",
        "response_format json_object",
        _ch(response_format={"type": "json_object"}),
        400,
        ("response_format",),
    ),
    ServerAttack(
        "chat",
        "tools",
        _ch(tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        ("tools",),
    ),
    ServerAttack("chat", "functions", _ch(functions=[{"name": "f"}]), 400, ("functions",)),
    ServerAttack("chat", "function_call", _ch(function_call="auto"), 400, ("function_call",)),
    ServerAttack("chat", "tool_choice", _ch(tool_choice="auto"), 400, ("tool_choice",)),
    ServerAttack(
        "chat", "parallel_tool_calls", _ch(parallel_tool_calls=True), 400, ("parallel_tool_calls",)
    ),
    ServerAttack("chat", "audio output", _ch(modalities=["text", "audio"]), 400, ("modalities",)),
    ServerAttack(
        "chat", "reasoning_effort", _ch(reasoning_effort="high"), 400, ("reasoning_effort",)
    ),
    ServerAttack("chat", "logprobs 'yes'", _ch(logprobs="yes"), 400, ("logprobs",)),
    ServerAttack(
        "chat", "top_logprobs without logprobs", _ch(top_logprobs=2), 400, ("top_logprobs",)
    ),
    ServerAttack(
        "chat",
        'max_completion_tokens "4"',
        _ch(max_completion_tokens="4"),
        400,
        ("max_completion_tokens",),
    ),
    ServerAttack("chat", "the openai client's ordinary calls are served", _openai_chat, 200),
    # --- uploads ---
    ServerAttack(
        "uploads",
        "corrupt file",
        _upload("broken.safetensors", lambda h: _good_vector(h)[:-5]),
        400,
        ("broken",),
    ),
    ServerAttack(
        "uploads",
        "wrong size",
        _upload("w.safetensors", lambda h: _vector_bytes(sl.SteeringVector({0: torch.ones(7)}))),
        400,
        ("size",),
    ),
    ServerAttack(
        "uploads",
        "invalid base64",
        _post("/v1/vectors", {"name": "x", "data": "!!"}),
        400,
        ("data",),
    ),
    ServerAttack(
        "uploads", "data is an int", _post("/v1/vectors", {"name": "x", "data": 5}), 400, ("data",)
    ),
    ServerAttack(
        "uploads",
        "file name '../evil.safetensors' (registered as its stem)",
        _upload("../evil.safetensors", _good_vector),
        200,
    ),
    ServerAttack(
        "uploads",
        "JSON name '../evil'",
        lambda h: h.send(
            "POST", "/v1/vectors", body={"name": "../evil", "data": _b64(_good_vector(h))}
        ),
        400,
        ("name",),
    ),
    ServerAttack(
        "uploads",
        "no file field",
        lambda h: h.send("POST", "/v1/vectors", files={"x": ("a", b"1")}),
        400,
        ("file",),
    ),
    ServerAttack(
        "uploads", "duplicate name", _upload("alpha.safetensors", _good_vector), 400, ("alpha",)
    ),
    ServerAttack(
        "uploads",
        "100 MB upload (body limit)",
        _partial_body("/v1/vectors", auth=True, declared=100 << 20),
        413,
    ),
    ServerAttack(
        "uploads",
        "DELETE /v1/vectors/{name}",
        _delete_vector,
        400,
        ("doomed",),
    ),
    ServerAttack("uploads", "two uploads of one name at once", _same_name_uploads, 200),
    ServerAttack("uploads", "one vector beyond the cap", _vector_cap, 409, ("cap",)),
    # --- auth ---
    ServerAttack(
        "auth", "no key", lambda h: h.send("GET", "/v1/models", auth=False), 401, ("key",)
    ),
    ServerAttack(
        "auth",
        "wrong key",
        lambda h: h.send("GET", "/v1/models", auth=False, headers={"Authorization": "Bearer x"}),
        401,
        ("key",),
    ),
    ServerAttack(
        "auth",
        "key without Bearer",
        lambda h: h.send("GET", "/v1/models", auth=False, headers={"Authorization": KEY}),
        401,
        ("key",),
    ),
    ServerAttack(
        "auth",
        "non-ASCII key",
        lambda h: h.send(
            "POST",
            "/v1/completions",
            body=_completion(),
            auth=False,
            headers={"Authorization": b"Bearer \xff\xfe"},
        ),
        401,
        ("key",),
    ),
    ServerAttack(
        "auth",
        "unauthenticated 100 MB body",
        _partial_body("/v1/completions", auth=False, declared=100 << 20),
        (401, 413),
    ),
    ServerAttack(
        "auth",
        "authenticated 300 MB body",
        _partial_body("/v1/completions", auth=True, declared=300 << 20),
        413,
    ),
    # --- disconnects ---
    ServerAttack(
        "disconnects",
        "non-streaming client leaves",
        _disconnect(stream=False),
        499,
    ),
    ServerAttack("disconnects", "streaming client leaves", _disconnect(stream=True), 499),
    ServerAttack(
        "disconnects",
        "keep-alive after a 400",
        _keep_alive_after("/v1/completions", b'{"prompt": '),
        400,
    ),
    ServerAttack(
        "disconnects",
        "keep-alive after a 500",
        _boom,
        500,
    ),
    # --- cancellations ---
    ServerAttack("cancellations", "cancelled stream leaves nothing behind", _cancel_then_same, 200),
    ServerAttack("cancellations", "twenty dropped streams", _many_cancelled, 200),
    # --- concurrency ---
    ServerAttack("concurrency", "sixteen bad requests at once", _concurrent_bad, 400),
]


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


# --- running -------------------------------------------------------------------------------------
def _words_ok(attack: ServerAttack, reply: Reply) -> bool:
    text = reply.message.lower()
    return all(word.lower() in text for word in attack.words)


def judge(attack: ServerAttack, reply: Reply) -> tuple[str, str]:
    """``(kind, detail)`` of the attack's own outcome (see the module docstring)."""
    expected = attack.status if isinstance(attack.status, tuple) else (attack.status,)
    detail = f"{reply.status} {reply.problem or reply.error or reply.message}"[:300]
    if reply.status == 0:
        return "crash", detail
    if reply.status >= 500 and reply.status not in expected:
        return "5xx", detail
    if reply.problem:
        return "accepted", detail
    if reply.status in expected:
        if reply.status >= 400 and not (_is_error(reply) and _words_ok(attack, reply)):
            return "unclear", detail
        return "clean", detail
    if reply.status < 400 or min(expected) < 400:
        return "accepted", detail
    return "unclear", detail


def _is_error(reply: Reply) -> bool:
    if reply.status == 499:  # the harness's own marker for a cancelled request
        return True
    error = (reply.body or {}).get("error") if isinstance(reply.body, dict) else None
    return isinstance(error, dict) and {"message", "type"} <= set(error)


def vectors(d_model: int) -> dict[str, sl.SteeringVector]:
    gen = torch.Generator().manual_seed(7)
    return {
        "alpha": sl.SteeringVector({1: torch.randn(d_model, generator=gen)}),
        "beta": sl.SteeringVector(
            {0: torch.randn(d_model, generator=gen), 2: torch.randn(d_model, generator=gen)}
        ),
    }


@contextlib.contextmanager
def running_server() -> Iterator[Harness]:
    """The app under attack on a free port, with the victims' solo outputs measured."""
    from fastapi import FastAPI

    from steerlab.server.app import create_app, serve_in_thread
    from steerlab.server.engine import TorchEngine
    from steerlab.testing import tiny_model

    model = tiny_model("llama")
    model.hf_model.config.max_position_embeddings = CONTEXT
    engine = TorchEngine(model, max_batch=16, model_id="tiny-llama")
    for name, vector in vectors(model.d_model).items():
        engine.vectors.register(name, vector)
    app: FastAPI = create_app(engine, api_key=KEY, max_tokens_cap=2000, max_strength=50.0)

    async def boom() -> None:
        raise RuntimeError("an injected server fault")

    app.add_api_route("/_attack/boom", boom, methods=["POST"])
    harness = Harness(url="", engine=engine)
    submit = engine.submit

    def spy(request: Any, **options: Any) -> Any:
        stamps = [time.monotonic()]
        stream = submit(request, **options)
        put = stream.put

        def stamped(event: Any) -> None:
            stamps.append(time.monotonic())
            put(event)

        stream.put = stamped  # type: ignore[method-assign]
        harness.stamps[id(stream)] = stamps
        harness.streams.append(stream)
        return stream

    engine.submit = spy  # type: ignore[method-assign]
    with serve_in_thread(app) as url:
        harness.url = url
        harness.solo = [_victim(url, path, fields, threading.Event()) for path, fields in VICTIMS]
        yield harness


def alive(h: Harness) -> str:
    """Empty when the server still serves a good request; else why not."""
    thread = getattr(h.engine, "_thread", None)
    if thread is not None and not thread.is_alive():
        return "the engine thread died"
    reply = h.send("POST", "/v1/completions", body=_completion(max_tokens=2, temperature=0))
    if reply.status != 200:
        return f"a good request then got {reply.status}: {reply.message[:100]}"
    return ""


def attempt(h: Harness, attack: ServerAttack) -> tuple[str, bool, str]:
    """Run one row beside the victims: ``(kind, affected, detail)``."""
    reply, victims = run_victims(h, lambda: attack.send(h))
    kind, detail = judge(attack, reply)
    differing = [i for i, (got, solo) in enumerate(zip(victims, h.solo)) if got != solo]
    affected = bool(differing or reply.affected)
    if differing:
        detail += f" | victims {differing} differ: {[victims[i][:60] for i in differing]}"
    if reply.affected:
        detail += f" | {reply.affected}"
    dead = alive(h)
    if dead:
        kind, detail = "crash", f"{detail} | {dead}"
    return kind, affected, detail


KINDS = ("clean", "accepted", "unclear", "5xx", "crash")


def main() -> int:
    """Count the outcomes per category and overall."""
    verbose = "-v" in sys.argv
    out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    counts: dict[str, dict[str, int]] = {}
    rows: list[dict[str, Any]] = []
    chosen = [sys.argv[i + 1] for i, arg in enumerate(sys.argv) if arg == "-k"]
    with running_server() as h:
        for attack in ATTACKS:
            if chosen and not any(word in attack.id for word in chosen):
                continue
            kind, affected, detail = attempt(h, attack)
            c = counts.setdefault(
                attack.category, {"attempts": 0, **dict.fromkeys(KINDS, 0), "affected": 0}
            )
            c["attempts"] += 1
            c[kind] += 1
            c["affected"] += affected
            rows.append({"row": attack.id, "kind": kind, "affected": affected, "detail": detail})
            if verbose or kind != "clean" or affected:
                print(f"{kind:8} {'AFFECTED ' if affected else ''}{attack.id}: {detail}")
    total = {k: sum(c[k] for c in counts.values()) for k in ("attempts", *KINDS, "affected")}
    print(f"{'category':14} " + " ".join(f"{k:>8}" for k in total))
    for category, c in {**counts, "total": total}.items():
        print(f"{category:14} " + " ".join(f"{c[k]:>8}" for k in total))
    if out:
        with open(out, "w") as f:
            json.dump({"counts": counts, "total": total, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
