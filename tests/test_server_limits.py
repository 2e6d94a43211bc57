"""Bounded work in ``steerlab serve``: body limits enforced as the body streams in (before the
key check needs it), caps on entries and registered vectors, ``DELETE /v1/vectors/{name}``,
validation and tokenization off the event loop, client disconnects cancelling non-streaming
work, and keep-alive connections after errors (raw HTTP/1.1 sockets, so nothing is hidden by a
client library reconnecting)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
import httpx
from fastapi.testclient import TestClient

import steerlab as sl
from steerlab.server.app import create_app, serve_in_thread
from steerlab.server.engine import (
    ConditionRegistry,
    GenerationRequest,
    RequestLimits,
    RequestStream,
    SteeringEntry,
    TorchEngine,
    VectorRegistry,
)
from steerlab.testing import tiny_model

KEY = {"Authorization": "Bearer s3cret"}


def _vector(d_model: int, seed: int, layer: int = 1) -> sl.SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return sl.SteeringVector({layer: torch.randn(d_model, generator=gen) * 4})


class StubEngine:
    """An :class:`~steerlab.server.engine.Engine` without a model: ``submit`` records the call
    and then does what the test asks (hold the request open, or fail like a bug would)."""

    model_id = "stub"
    n_layers = 4

    def __init__(self, behaviour: str = "hold") -> None:
        self.behaviour = behaviour
        self.vectors = VectorRegistry()
        self.conditions = ConditionRegistry()
        self.submitted = threading.Event()
        self.submits = 0
        self.cancels = 0
        self.streams: list[RequestStream] = []

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def submit(
        self, request: GenerationRequest, *, limits: RequestLimits | None = None
    ) -> RequestStream:
        request.check(limits=limits)  # an engine validates at submit; this one has no model
        self.submits += 1
        if self.behaviour == "bug":
            raise RuntimeError("a bug in the engine")
        stream = RequestStream(f"stub-{self.submits}", on_cancel=self._cancelled)
        self.streams.append(stream)
        self.submitted.set()
        return stream

    def _cancelled(self) -> None:
        self.cancels += 1


# --- raw HTTP/1.1 -----------------------------------------------------------------------------
def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    return sock


def _request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    sent = {"Content-Type": "application/json", **(headers or {})}
    if body or method == "POST":
        sent.setdefault("Content-Length", str(len(body)))
    lines += [f"{k}: {v}" for k, v in sent.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Reply:
    """One HTTP response read off a socket (``Content-Length`` framed, as all of ours are)."""

    def __init__(self, sock: socket.socket, pending: bytearray) -> None:
        while b"\r\n\r\n" not in pending:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a full response: {bytes(pending)!r}")
            pending += chunk
        head, _, rest = bytes(pending).partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        size = int(self.headers.get("content-length", "0"))
        body = bytearray(rest)
        while len(body) < size:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside a response body")
            body += chunk
        self.body = bytes(body[:size])
        pending[:] = body[size:]

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"

    def json(self) -> Any:
        return json.loads(self.body)


def _exchange(sock: socket.socket, raw: bytes) -> Reply:
    sock.sendall(raw)
    return Reply(sock, bytearray())


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed its end (a read returns EOF or a reset)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


@pytest.fixture(scope="module")
def reference() -> sl.SteeredModel:
    """The tiny model the servers below load (same seed, same weights), for library calls."""
    return tiny_model("llama")


def _engine() -> TorchEngine:
    return TorchEngine(tiny_model("llama"), max_batch=8, model_id="tiny")


def _completion(prompt: str = "the cat sat", **extra: Any) -> dict[str, Any]:
    return {"model": "default", "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}


def _chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# --- body limits ------------------------------------------------------------------------------
def test_a_declared_body_over_the_limit_is_refused_before_it_is_read() -> None:
    with serve_in_thread(create_app(_engine(), max_body_bytes=1000)) as url:
        sock = _connect(url)
        # 100 MB announced, none sent: the answer cannot have waited for the body
        reply = _exchange(
            sock, _request("POST", "/v1/completions", headers={"Content-Length": "100000000"})
        )
        assert reply.status == 413 and reply.closes
        error = reply.json()["error"]
        assert error["code"] == "too_large" and error["type"] == "invalid_request_error"
        assert "1000 bytes" in error["message"] and "--max-body-bytes" in error["message"]
        assert _closed_by_server(sock)
        sock.close()
        # exactly at the limit is served, one byte over is not
        body = json.dumps(_completion()).encode()
        at_limit = body[:-1] + b" " * (1000 - len(body)) + b"}"
        assert len(at_limit) == 1000
        headers = {"content-type": "application/json"}
        served = httpx.post(url + "/v1/completions", content=at_limit, headers=headers)
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 4
        over = httpx.post(url + "/v1/completions", content=at_limit + b" ", headers=headers)
        assert over.status_code == 413 and over.json()["error"]["code"] == "too_large"


def test_chunked_bodies_are_counted_as_they_stream_in() -> None:
    limit = 64 * 1024
    with serve_in_thread(create_app(_engine(), max_body_bytes=limit)) as url:
        body = json.dumps(_completion()).encode()
        plain = httpx.post(
            url + "/v1/completions", content=body, headers={"content-type": "application/json"}
        )

        def pieces() -> Iterator[bytes]:
            for start in range(0, len(body), 7):
                yield body[start : start + 7]

        chunked = httpx.post(
            url + "/v1/completions", content=pieces(), headers={"content-type": "application/json"}
        )
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        assert chunked.status_code == plain.status_code == 200
        assert chunked.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]

        # 8 MiB of junk, chunked: without the count FastAPI would read it all and answer 400
        # (not JSON); with it the read that crosses 64 KiB ends the request with a 413
        sock = _connect(url)
        sock.sendall(_request("POST", "/v1/completions", headers={"Transfer-Encoding": "chunked"}))
        sent = {"bytes": 0}

        def send_junk() -> None:
            piece = _chunked([b"x" * 16384])[: -len(b"0\r\n\r\n")]
            try:
                for _ in range(512):
                    sock.sendall(piece)
                    sent["bytes"] += 16384
            except OSError:  # the server closed the connection: exactly what should happen
                pass

        sender = threading.Thread(target=send_junk)
        sender.start()
        reply = Reply(sock, bytearray())
        sender.join(60)
        assert reply.status == 413 and reply.closes
        assert "65536 bytes" in reply.json()["error"]["message"]
        sock.close()
        assert httpx.get(url + "/health").status_code == 200


def test_an_unauthenticated_huge_body_is_refused_before_it_is_read() -> None:
    engine = StubEngine()
    with serve_in_thread(create_app(engine, api_key="s3cret")) as url:
        for framing in ({"Content-Length": "100000000"}, {"Transfer-Encoding": "chunked"}):
            sock = _connect(url)
            reply = _exchange(sock, _request("POST", "/v1/completions", headers=framing))
            assert reply.status == 401 and reply.closes, framing
            assert reply.json()["error"]["code"] == "invalid_api_key"
            assert _closed_by_server(sock)
            sock.close()
        # without a body in flight the connection stays usable after the 401
        sock = _connect(url)
        first = _exchange(sock, _request("GET", "/v1/models"))
        assert first.status == 401 and not first.closes
        again = _exchange(sock, _request("GET", "/v1/models", headers=KEY))
        assert again.status == 200 and again.json()["data"][0]["id"] == "stub"
        sock.close()
    assert engine.submits == 0


def test_uploads_have_their_own_limit(tmp_path: Any) -> None:
    engine = _engine()
    app = create_app(engine, max_body_bytes=512, max_upload_bytes=64 * 1024)
    vector = sl.SteeringVector(
        {layer: torch.full((engine.model.d_model,), 0.5) for layer in range(3)}
    )
    file = vector.save(tmp_path / "wide.safetensors").read_bytes()
    assert 512 < len(file) < 64 * 1024
    with TestClient(app) as client:
        up = client.post("/v1/vectors", files={"file": ("wide.safetensors", file)})
        assert up.status_code == 200 and up.json()["layers"] == [0, 1, 2]
        big = client.post("/v1/vectors", files={"file": ("big.safetensors", b"\0" * 70_000)})
        assert big.status_code == 413 and "--max-upload-bytes" in big.json()["error"]["message"]
        assert "big" not in engine.vectors
        long = client.post("/v1/completions", json=_completion("the cat " * 80))
        assert long.status_code == 413 and "--max-body-bytes" in long.json()["error"]["message"]
        limits = client.get("/health").json()["limits"]
        assert limits["max_body_bytes"] == 512 and limits["max_upload_bytes"] == 65536


# --- caps and DELETE --------------------------------------------------------------------------
def test_steering_and_readout_entries_are_capped(reference: sl.SteeredModel) -> None:
    engine = _engine()
    vector = _vector(reference.d_model, 1)
    engine.vectors.register("v", vector)
    app = create_app(engine, max_steering_entries=2, max_readout_entries=1)
    entry = {"vector": "v", "strength": 2.0, "positions": "all"}
    with TestClient(app) as client:
        three = client.post("/v1/completions", json=_completion(steering=[entry] * 3))
        assert three.status_code == 400
        error = three.json()["error"]
        assert error["code"] == "too_many_entries"
        assert "steering has 3 entries" in error["message"] and "at most 2" in error["message"]
        assert "--max-steering-entries" in error["message"]
        two = client.post("/v1/completions", json=_completion(steering=[entry] * 2))
        assert two.status_code == 200
        # two entries of strength 2 at all positions: the library's strength 4
        expected = reference.generate(
            "the cat sat", steering=vector, strength=4.0, max_new_tokens=4
        )
        assert two.json()["choices"][0]["text"] == expected
        probe = {"vector": "v", "layer": 1}
        many = client.post("/v1/completions", json=_completion(readout=[probe] * 2))
        assert (
            many.status_code == 400 and "readout has 2 entries" in many.json()["error"]["message"]
        )
        one = client.post("/v1/completions", json=_completion(readout=[probe]))
        assert one.status_code == 200
        assert len(one.json()["choices"][0]["readout"][0]["values"]) == 4
        chat = client.post(
            "/v1/chat/completions",
            json={
                "model": "default",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
                "steering": [entry] * 3,
            },
        )
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "too_many_entries"


def test_registered_vectors_are_capped_and_can_be_deleted(tmp_path: Any) -> None:
    engine = _engine()
    d_model = engine.model.d_model
    engine.vectors.register("keep", _vector(d_model, 0))
    files = [_vector(d_model, 10 + i).save(tmp_path / f"u{i}.safetensors") for i in range(8)]
    app = create_app(engine, api_key="s3cret", max_vectors=3)
    with serve_in_thread(app) as url:

        def upload(i: int) -> httpx.Response:
            return httpx.post(
                url + "/v1/vectors",
                files={"file": (f"u{i}.safetensors", files[i].read_bytes())},
                headers=KEY,
                timeout=60,
            )

        # eight at once for two free places: exactly two get in, whatever the interleaving
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(upload, range(8)))
        codes = sorted(r.status_code for r in replies)
        assert codes == [200, 200] + [409] * 6
        refused = next(r for r in replies if r.status_code == 409).json()["error"]
        assert refused["code"] == "too_many_vectors" and "--max-vectors" in refused["message"]
        assert len(engine.vectors) == 3
        admitted = [f"u{i}" for i, r in enumerate(replies) if r.status_code == 200]

        assert httpx.delete(url + "/v1/vectors/keep").status_code == 401
        assert "keep" in engine.vectors
        missing = httpx.delete(url + "/v1/vectors/nope", headers=KEY)
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        gone = httpx.delete(url + f"/v1/vectors/{admitted[0]}", headers=KEY)
        assert gone.status_code == 200
        assert gone.json() == {"id": admitted[0], "object": "vector", "deleted": True}
        listed = httpx.get(url + "/v1/vectors", headers=KEY).json()["data"]
        assert sorted(v["id"] for v in listed) == sorted(["keep", admitted[1]])
        unused = next(i for i, r in enumerate(replies) if r.status_code == 409)
        assert upload(unused).status_code == 200
        assert upload(int(admitted[0][1:])).status_code == 409  # full again
        assert len(engine.vectors) == 3


def test_a_vector_deleted_mid_stream_keeps_serving_the_request(
    reference: sl.SteeredModel,
) -> None:
    engine = _engine()
    vector = _vector(reference.d_model, 5)
    engine.vectors.register("v", vector)
    body = _completion(
        "a dog ran",
        max_tokens=24,
        stream=True,
        steering=[{"vector": "v", "strength": 6.0, "positions": "all"}],
    )
    with serve_in_thread(create_app(engine)) as url:
        texts: list[str] = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    texts.append(json.loads(line[6:])["choices"][0]["text"])
                    break
            assert httpx.delete(url + "/v1/vectors/v").status_code == 200
            for line in lines:
                if line.startswith("data: {"):
                    texts.append(json.loads(line[6:])["choices"][0]["text"])
        later = httpx.post(url + "/v1/completions", json={**body, "stream": False})
        assert later.status_code == 400 and "unknown vector 'v'" in later.json()["error"]["message"]
    expected = reference.generate("a dog ran", steering=vector, strength=6.0, max_new_tokens=24)
    assert "".join(texts) == expected
    assert len(texts) > 1


# --- the event loop stays free ----------------------------------------------------------------
def test_validation_runs_off_the_event_loop() -> None:
    engine = _engine()
    engine.vectors.register("v", _vector(engine.model.d_model, 2))
    entered, release = threading.Event(), threading.Event()
    threads: list[str] = []
    submit = engine.submit

    def held_submit(request: GenerationRequest, **options: Any) -> RequestStream:
        threads.append(threading.current_thread().name)
        entered.set()
        assert release.wait(60)
        return submit(request, **options)

    engine.submit = held_submit  # type: ignore[method-assign]
    app = create_app(engine, max_steering_entries=1000)
    entries = [{"vector": "v", "strength": 0.001, "positions": "all"}] * 1000
    with serve_in_thread(app) as url, ThreadPoolExecutor(1) as pool:
        heavy = pool.submit(
            httpx.post, url + "/v1/completions", json=_completion(steering=entries), timeout=120
        )
        assert entered.wait(60)
        # the heavy request sits in validation: /health must still answer
        health = httpx.get(url + "/health", timeout=30)
        assert health.status_code == 200 and not heavy.done()
        release.set()
        assert heavy.result().status_code == 200
    assert threads and "uvicorn" not in threads[0]


def test_health_answers_while_a_thousand_steering_entries_are_validated() -> None:
    engine = _engine()
    engine.vectors.register("v", _vector(engine.model.d_model, 2))
    entered, finished = threading.Event(), threading.Event()
    submit = engine.submit

    def watched_submit(request: GenerationRequest, **options: Any) -> RequestStream:
        entered.set()
        try:
            return submit(request, **options)
        finally:
            finished.set()

    engine.submit = watched_submit  # type: ignore[method-assign]
    app = create_app(engine, max_steering_entries=1000)
    # each marker is tokenized when the entry is bound: 2 million characters, seconds of work
    entry = {"vector": "v", "strength": 0.001, "positions": "after:" + "word " * 400}
    body = _completion(max_tokens=1, steering=[entry] * 1000)
    with serve_in_thread(app) as url, ThreadPoolExecutor(1) as pool:
        heavy = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=600)
        assert entered.wait(120)
        # answered while the engine is still validating the entries (on the event loop,
        # /health would only be served after that finished)
        assert httpx.get(url + "/health", timeout=600).status_code == 200
        assert not finished.is_set()
        reply = heavy.result()
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 1


# --- validation happens once, in the engine ----------------------------------------------------
def test_a_request_is_validated_once_with_the_servers_limits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = _engine()
    engine.vectors.register("v", _vector(engine.model.d_model, 2))
    seen: list[RequestLimits | None] = []
    check = GenerationRequest.check

    def counted(self: GenerationRequest, **options: Any) -> None:
        seen.append(options.get("limits"))
        check(self, **options)

    monkeypatch.setattr(GenerationRequest, "check", counted)
    steering = [{"vector": "v", "strength": 3.0}]
    with serve_in_thread(create_app(engine, max_tokens_cap=6, max_strength=4.0)) as url:
        ok = httpx.post(url + "/v1/completions", json=_completion(steering=steering), timeout=60)
        assert ok.status_code == 200, ok.text
        assert seen == [RequestLimits(max_tokens=6, max_strength=4.0)]
        over = httpx.post(url + "/v1/completions", json=_completion(max_tokens=7), timeout=60)
        strong = [{"vector": "v", "strength": -4.5}]
        too_strong = httpx.post(
            url + "/v1/completions", json=_completion(steering=strong), timeout=60
        )
        readout = [{"vector": "v", "layer": 9}]
        far = httpx.post(url + "/v1/completions", json=_completion(readout=readout), timeout=60)
    assert over.status_code == 400
    assert over.json()["error"]["message"] == "max_tokens 7 is over this server's cap of 6"
    assert too_strong.status_code == 400
    assert too_strong.json()["error"]["message"] == (
        "steering[0].strength -4.5 is over this server's cap of 4"
    )
    assert far.status_code == 400
    assert far.json()["error"]["message"] == (
        "readout layer 9 is out of range for a model with 3 layers (valid: -3..2)"
    )
    assert len(seen) == 4


def test_the_engine_applies_limits_without_the_http_layer() -> None:
    engine = _engine()
    engine.vectors.register("v", _vector(engine.model.d_model, 2))
    request = GenerationRequest(prompt="hi", max_tokens=3, steering=(SteeringEntry("v", 9.0),))
    with pytest.raises(sl.InvalidInputError, match=r"steering\[0\]\.strength 9 is over"):
        engine.submit(request, limits=RequestLimits(max_strength=8.0))
    with pytest.raises(sl.InvalidInputError, match="max_tokens 3 is over this server's cap of 2"):
        engine.submit(request, limits=RequestLimits(max_tokens=2))


# --- client disconnects -----------------------------------------------------------------------
def test_a_disconnect_cancels_a_non_streaming_request() -> None:
    engine = StubEngine()
    with serve_in_thread(create_app(engine)) as url:
        sock = _connect(url)
        sock.sendall(_request("POST", "/v1/completions", json.dumps(_completion()).encode()))
        assert engine.submitted.wait(60)
        assert engine.cancels == 0
        sock.close()
        deadline = time.monotonic() + 30
        while engine.cancels == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.cancels == 1 and engine.streams[0].cancelled


def test_a_disconnect_cancels_the_torch_engine_job() -> None:
    engine = _engine()
    streams: list[RequestStream] = []
    submit = engine.submit

    def recording_submit(request: GenerationRequest, **options: Any) -> RequestStream:
        streams.append(submit(request, **options))
        return streams[-1]

    engine.submit = recording_submit  # type: ignore[method-assign]
    # the engine blocks inside its fourth forward pass until released, so the disconnect is
    # seen while the job is certainly running
    calls, blocked, release = [0], threading.Event(), threading.Event()

    def hold(*_: Any) -> None:
        calls[0] += 1
        if calls[0] == 4:
            blocked.set()
            assert release.wait(60)

    handle = engine.model.adapter.block(0).register_forward_hook(hold)
    try:
        with serve_in_thread(create_app(engine)) as url:
            sock = _connect(url)
            body = json.dumps(_completion(max_tokens=60)).encode()
            sock.sendall(_request("POST", "/v1/completions", body))
            assert blocked.wait(60)
            sock.close()
            deadline = time.monotonic() + 30
            while not (streams and streams[0].cancelled) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert streams[0].cancelled  # asked while the engine was still blocked
            release.set()
            rest = list(streams[0])
            assert rest[-1].finish_reason == "cancelled"
            assert rest[-1].completion_tokens < 60
            handle.remove()
            after = httpx.post(url + "/v1/completions", json=_completion(), timeout=60)
            assert after.status_code == 200
    finally:
        release.set()
        handle.remove()


# --- keep-alive after errors ------------------------------------------------------------------
def test_client_errors_keep_the_connection_usable() -> None:
    with serve_in_thread(create_app(_engine())) as url:
        sock = _connect(url)
        good = json.dumps(_completion()).encode()
        for bad in (
            _request("POST", "/v1/completions", b'{"model": "default", "prompt": '),
            _request("POST", "/v1/completions", json.dumps(_completion(model="gpt-4")).encode()),
            _request("POST", "/v1/completions", b'{"model": "default"}'),
            _request("GET", "/v1/nowhere"),
        ):
            error = _exchange(sock, bad)
            assert 400 <= error.status < 500 and not error.closes, error.body
            after = _exchange(sock, _request("POST", "/v1/completions", good))
            assert after.status == 200 and after.json()["usage"]["completion_tokens"] == 4
        sock.close()


@pytest.mark.parametrize("failure", ["engine stopped", "bug"])
def test_a_server_error_announces_the_close(failure: str) -> None:
    if failure == "bug":
        app, status = create_app(StubEngine("bug")), 500
    else:  # an engine that is not running answers 503
        app, status = create_app(_engine(), manage_engine=False), 503
    with serve_in_thread(app) as url:
        sock = _connect(url)
        reply = _exchange(
            sock, _request("POST", "/v1/completions", json.dumps(_completion()).encode())
        )
        assert reply.status == status and reply.closes
        assert reply.json()["error"]["type"] == "server_error"
        assert _closed_by_server(sock)
        sock.close()
        # a fresh connection is served as usual
        assert httpx.get(url + "/health").status_code == 200
