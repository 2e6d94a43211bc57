"""``steerlab serve`` over real HTTP: the openai client, plain httpx, greedy parity with the
library, 16 concurrent differently-steered clients, streaming, readout, errors, auth, limits."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

import steerlab as sl  # noqa: E402
from steerlab.interventions import direction_at  # noqa: E402
from steerlab.positions import Positions  # noqa: E402
from steerlab.server.app import create_app, serve_in_thread  # noqa: E402
from steerlab.server.engine import TorchEngine  # noqa: E402
from steerlab.testing import tiny_model  # noqa: E402

ARCH = "llama"


def _vectors(d_model: int) -> dict[str, sl.SteeringVector]:
    gen = torch.Generator().manual_seed(7)
    return {
        "alpha": sl.SteeringVector({1: torch.randn(d_model, generator=gen)}),
        "beta": sl.SteeringVector(
            {0: torch.randn(d_model, generator=gen), 2: torch.randn(d_model, generator=gen)}
        ),
    }


@pytest.fixture(scope="module")
def reference() -> sl.SteeredModel:
    """A second instance of the same tiny model (same seed, same weights) for library calls,
    so references never touch the served model's modules while the engine runs."""
    return tiny_model(ARCH)


@pytest.fixture(scope="module")
def gate(reference: sl.SteeredModel) -> tuple[sl.Condition, list[str], list[str]]:
    """A prompt-level condition at layer 1 that half of :data:`PROMPTS` satisfy: the condition,
    the prompts that satisfy it and those that do not."""
    direction = torch.randn(reference.d_model, generator=torch.Generator().manual_seed(3))
    scores = sl.Condition(direction, layer=1, threshold=0.0).scores(reference, PROMPTS)
    order = scores.argsort().tolist()
    low, high = order[: len(order) // 2], order[len(order) // 2 :]
    threshold = (float(scores[low].max()) + float(scores[high].min())) / 2
    cond = sl.Condition(direction, layer=1, threshold=threshold)
    return cond, [PROMPTS[i] for i in high], [PROMPTS[i] for i in low]


@pytest.fixture(scope="module")
def server(gate: tuple[sl.Condition, list[str], list[str]]) -> Iterator[tuple[str, TorchEngine]]:
    model = tiny_model(ARCH)
    engine = TorchEngine(model, max_batch=16, model_id="tiny-llama")
    for name, vector in _vectors(model.d_model).items():
        engine.vectors.register(name, vector)
    engine.conditions.register("gate", gate[0])
    app = create_app(engine, max_tokens_cap=40, max_strength=50.0)
    with serve_in_thread(app) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server: tuple[str, TorchEngine]) -> Any:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _library(
    model: sl.SteeredModel,
    prompt: str,
    steering: list[dict[str, Any]],
    max_tokens: int,
    *,
    chat: bool = False,
    when: sl.Condition | None = None,
) -> list[int]:
    """``model.generate`` for a request's steering (``when``: the condition named in it)."""
    vecs = _vectors(model.d_model)
    built = [
        sl.Steering(
            vecs[s["vector"]],
            strength=(
                {int(k): v for k, v in s["strength"].items()}
                if isinstance(s["strength"], dict)
                else s["strength"]
            ),
            positions=Positions.parse(s.get("positions", "all")),
            when=when if "when" in s else None,
        )
        for s in steering
    ]
    if len(built) == 2:
        with model.steer(built[0]):
            ids = model.generate_ids(
                prompt, steering=built[1], max_new_tokens=max_tokens, chat=chat
            )
    else:
        ids = model.generate_ids(
            prompt, steering=built[0] if built else None, max_new_tokens=max_tokens, chat=chat
        )
    return [int(i) for i in ids[0]]


def _text(model: sl.SteeredModel, ids: list[int]) -> str:
    return str(model.tokenizer.decode(ids, skip_special_tokens=True))


CONFIGS: list[list[dict[str, Any]]] = [
    [],
    [{"vector": "alpha", "strength": 8.0, "positions": "all"}],
    [{"vector": "alpha", "strength": -8.0, "positions": "last"}],
    [{"vector": "beta", "strength": 4.0, "positions": "generated"}],
    [{"vector": "alpha", "strength": {"2": 6.0, "0": -3.0}, "positions": "prompt"}],
    [{"vector": "beta", "strength": 5.0, "positions": [0, -1]}],
    [{"vector": "alpha", "strength": 6.0, "positions": "1:"}],
    [
        {"vector": "beta", "strength": -4.0, "positions": "all"},
        {"vector": "alpha", "strength": 6.0, "positions": "last"},
    ],
]
PROMPTS = [
    "the cat sat on the",
    "i think the movie was",
    "a dog ran",
    "the weather today is very",
    "my house is big and",
    "the capital of france is",
]


def test_completion_greedy_equals_library(client: Any, reference: sl.SteeredModel) -> None:
    steering = CONFIGS[1]
    reply = client.completions.create(
        model="default",
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        extra_body={"steering": steering},
    )
    ids = _library(reference, PROMPTS[0], steering, 12)
    assert reply.choices[0].text == _text(reference, ids)
    unsteered = _library(reference, PROMPTS[0], [], 12)
    assert ids != unsteered  # the steering does something, so equality above means something
    prompt_tokens = len(reference.encode(PROMPTS[0]).input_ids[0])
    eos = reference.tokenizer.eos_token_id
    assert reply.usage.prompt_tokens == prompt_tokens
    finished_on_eos = reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(ids) + int(finished_on_eos)
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == ("stop" if finished_on_eos else "length")
    assert eos not in ids


def test_chat_greedy_equals_library(client: Any, reference: sl.SteeredModel) -> None:
    steering = CONFIGS[3]
    reply = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=10,
        temperature=0,
        extra_body={"steering": steering},
    )
    ids = _library(reference, PROMPTS[1], steering, 10, chat=True)
    assert reply.choices[0].message.content == _text(reference, ids)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(reference.encode(PROMPTS[1], chat=True).input_ids[0])


def test_chat_multi_turn_uses_the_template(client: Any, reference: sl.SteeredModel) -> None:
    messages = [
        {"role": "system", "content": "you are kind"},
        {"role": "user", "content": "the cat"},
    ]
    reply = client.chat.completions.create(
        model="default", messages=messages, max_tokens=6, temperature=0
    )
    text = reference.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert reply.usage.prompt_tokens == len(
        reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    )


def test_sixteen_concurrent_clients_equal_solo(
    server: tuple[str, TorchEngine], client: Any, reference: sl.SteeredModel
) -> None:
    _, engine = server
    jobs = [
        (PROMPTS[i % len(PROMPTS)], CONFIGS[(i * 3) % len(CONFIGS)], 6 + (i % 5) * 3, i % 4 == 0)
        for i in range(16)
    ]
    expected = [_text(reference, _library(reference, p, s, n, chat=c)) for p, s, n, c in jobs]
    assert len({json.dumps(s) for _, s, _, _ in jobs}) == len(CONFIGS)

    def call(job: tuple[str, list[dict[str, Any]], int, bool]) -> str:
        prompt, steering, n, chat = job
        if chat:
            reply = client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=n,
                temperature=0,
                extra_body={"steering": steering},
            )
            return str(reply.choices[0].message.content)
        done = client.completions.create(
            model="default",
            prompt=prompt,
            max_tokens=n,
            temperature=0,
            extra_body={"steering": steering},
        )
        return str(done.choices[0].text)

    before_rows = engine.max_rows_seen
    engine.max_rows_seen = 0
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, jobs))
    assert got == expected
    assert engine.max_rows_seen >= 4, "requests were not batched together"
    engine.max_rows_seen = max(before_rows, engine.max_rows_seen)


def test_when_and_text_positions_through_the_openai_client(
    server: tuple[str, TorchEngine],
    client: Any,
    reference: sl.SteeredModel,
    gate: tuple[sl.Condition, list[str], list[str]],
) -> None:
    url, engine = server
    cond, passing, failing = gate
    assert cond.fires(reference, passing).all() and not cond.fires(reference, failing).any()
    gated = {"vector": "alpha", "strength": 8.0, "positions": "all", "when": "gate"}
    jobs: list[tuple[str, list[dict[str, Any]], int]] = [
        (passing[0], [gated], 10),
        (failing[0], [gated], 12),
        (passing[1], [{**gated, "positions": "after:movie"}], 9),
        (failing[1], [{**gated, "strength": -6.0}], 8),
        (PROMPTS[0], [{"vector": "beta", "strength": 5.0, "positions": "between:the,is"}], 11),
        (PROMPTS[3], [{"vector": "alpha", "strength": 6.0, "positions": "outside:the,today"}], 7),
        (PROMPTS[5], [{"vector": "alpha", "strength": 6.0, "positions": "first:2"}], 6),
    ]
    expected = [_text(reference, _library(reference, p, s, n, when=cond)) for p, s, n in jobs]
    unsteered = [_text(reference, _library(reference, p, [], n)) for p, _, n in jobs]
    # a prompt that fails the condition gets nothing; one that passes is steered
    assert expected[1] == unsteered[1] and expected[3] == unsteered[3]
    assert expected[0] != unsteered[0] and expected[2] != unsteered[2]

    def call(job: tuple[str, list[dict[str, Any]], int]) -> str:
        prompt, steering, n = job
        done = client.completions.create(
            model="default",
            prompt=prompt,
            max_tokens=n,
            temperature=0,
            extra_body={"steering": steering},
        )
        return str(done.choices[0].text)

    before_rows = engine.max_rows_seen
    engine.max_rows_seen = 0
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(call, jobs))
    assert got == expected
    assert engine.max_rows_seen >= 2, "requests were not batched together"
    engine.max_rows_seen = max(before_rows, engine.max_rows_seen)
    listed = httpx.get(url + "/v1/conditions").json()["data"]
    assert [(c["id"], c["layer"], c["scope"]) for c in listed] == [("gate", 1, "prompt")]
    assert listed[0]["threshold"] == pytest.approx(cond.threshold)
    with pytest.raises(openai.BadRequestError, match="unknown condition 'nope'"):
        client.completions.create(
            model="default",
            prompt="a",
            max_tokens=2,
            extra_body={"steering": [{**gated, "when": "nope"}]},
        )


def test_streamed_equals_non_streamed(client: Any) -> None:
    steering = CONFIGS[7]
    kwargs: dict[str, Any] = dict(
        model="default", max_tokens=14, temperature=0, extra_body={"steering": steering}
    )
    whole = client.completions.create(prompt=PROMPTS[2], **kwargs).choices[0].text
    chunks = list(client.completions.create(prompt=PROMPTS[2], stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    messages = [{"role": "user", "content": PROMPTS[3]}]
    whole_chat = client.chat.completions.create(messages=messages, **kwargs)
    stream = client.chat.completions.create(
        messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
    assert "".join(parts) == whole_chat.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole_chat.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server: tuple[str, TorchEngine]) -> None:
    url, _ = server
    body = {"model": "default", "prompt": "a dog", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert len(payloads) == 3  # one chunk per generated token


def test_readout_is_the_documented_projection(
    server: tuple[str, TorchEngine], reference: sl.SteeredModel
) -> None:
    url, _ = server
    layer, steering = 1, [{"vector": "beta", "strength": 3.0, "positions": "all"}]
    body = {
        "model": "default",
        "prompt": PROMPTS[4],
        "max_tokens": 5,
        "temperature": 0,
        "steering": steering,
        "readout": [{"vector": "alpha", "layer": layer}],
    }
    reply = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    trace = reply["choices"][0]["readout"][0]
    assert (trace["vector"], trace["layer"]) == ("alpha", layer)
    values = trace["values"]
    assert len(values) == reply["usage"]["completion_tokens"]
    # recompute: residual after block `layer`, at the position that produced each token
    ids = _library(reference, PROMPTS[4], steering, 5)
    prompt_ids = reference.encode(PROMPTS[4]).input_ids[0].tolist()
    full = torch.tensor([prompt_ids + ids])
    vec = _vectors(reference.d_model)
    unit = direction_at(vec["alpha"].directions, layer, use="read")
    unit = unit / unit.norm()
    seen: dict[str, torch.Tensor] = {}
    hook = reference.adapter.block(layer).register_forward_hook(
        lambda m, a, out: seen.__setitem__("h", (out[0] if isinstance(out, tuple) else out))
    )
    try:
        with reference.steer(vec["beta"], strength=3.0, positions="all"):
            reference.hf_model(input_ids=full)
    finally:
        hook.remove()
    hidden = seen["h"][0].detach().float()
    start = len(prompt_ids) - 1
    expected = [float(hidden[start + i] @ unit) for i in range(len(values))]
    assert values == pytest.approx(expected, abs=1e-4)
    streamed = httpx.post(url + "/v1/completions", json={**body, "stream": True}, timeout=60)
    chunks = [
        json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")
    ]
    per_chunk = [c["choices"][0]["readout"][0]["values"] for c in chunks]
    assert [v for part in per_chunk for v in part] == pytest.approx(values, abs=1e-6)


def test_logprobs_and_stop(client: Any, reference: sl.SteeredModel) -> None:
    reply = client.completions.create(
        model="default", prompt=PROMPTS[5], max_tokens=8, temperature=0, logprobs=3
    )
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == reply.usage.completion_tokens
    logits = reference.next_token_logits(PROMPTS[5])[0]
    first = torch.log_softmax(logits, dim=-1)
    top = torch.topk(first, 3)
    assert lp.token_logprobs[0] == pytest.approx(float(top.values[0]), abs=1e-4)
    assert sorted(lp.top_logprobs[0].values(), reverse=True) == pytest.approx(
        top.values.tolist(), abs=1e-4
    )
    text = reply.choices[0].text
    words = text.split()
    assert len(words) >= 3
    stop = " " + words[2]
    stopped = client.completions.create(
        model="default", prompt=PROMPTS[5], max_tokens=8, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_sampling_is_seeded_per_request(client: Any) -> None:
    kwargs: dict[str, Any] = dict(model="default", prompt="the cat", max_tokens=10, top_p=0.9)
    a = client.completions.create(temperature=1.5, seed=11, **kwargs).choices[0].text
    b = client.completions.create(temperature=1.5, seed=11, **kwargs).choices[0].text
    others = {
        client.completions.create(temperature=1.5, seed=s, **kwargs).choices[0].text
        for s in range(12, 16)
    }
    assert a == b
    assert len(others | {a}) > 1


def test_errors_are_openai_shaped_and_the_server_keeps_serving(
    server: tuple[str, TorchEngine], client: Any
) -> None:
    url, _ = server
    bad_steering = [
        [{"vector": "nope", "strength": 1.0}],
        [{"vector": "alpha", "strength": 1e6}],
        [{"vector": "alpha", "strength": 1.0, "positions": "sideways"}],
        [{"vector": "alpha", "strength": {"99": 1.0}}],
        [{"vector": "alpha", "strength": 1.0, "op": "explode"}],
        [{"vector": "alpha", "strength": 1.0, "when": "nope"}],
        [{"vector": "alpha", "strength": 1.0, "positions": "between:only-one"}],
        [{"vector": "beta", "strength": 1.0, "when": "gate"}],  # beta steers layer 0 < 1
    ]
    for steering in bad_steering:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(
                model="default", prompt="a", max_tokens=2, extra_body={"steering": steering}
            )
        error = caught.value.body
        assert set(error) >= {"message", "type", "param", "code"}, error
    with pytest.raises(openai.BadRequestError, match="cap"):
        client.completions.create(model="default", prompt="a", max_tokens=41)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.completions.create(model="default", prompt="a", max_tokens=2, n=2)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="a", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model="default",
            prompt="a",
            max_tokens=2,
            extra_body={"readout": [{"vector": "alpha", "layer": 7}]},
        )
    raw = httpx.post(
        url + "/v1/completions",
        content=b'{"model": "default", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    nan = httpx.post(
        url + "/v1/completions",
        content=b'{"model": "default", "prompt": "a", "steering": '
        b'[{"vector": "alpha", "strength": NaN}]}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 400 and "strength" in nan.json()["error"]["message"]
    schema = httpx.post(url + "/v1/completions", json={"model": "default"})
    assert schema.status_code == 400 and schema.json()["error"]["param"] == "prompt"
    ok = client.completions.create(model="default", prompt="a", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_models_vectors_and_upload(
    server: tuple[str, TorchEngine], client: Any, tmp_path: Any
) -> None:
    url, engine = server
    assert [m.id for m in client.models.list()] == ["tiny-llama"]
    listed = httpx.get(url + "/v1/vectors").json()
    assert listed["object"] == "list"
    alpha = next(v for v in listed["data"] if v["id"] == "alpha")
    assert alpha["layers"] == [1]
    vec = sl.SteeringVector({2: torch.ones(engine.model.d_model)}, metadata={"method": "manual"})
    file = vec.save(tmp_path / "gamma.safetensors")
    up = httpx.post(url + "/v1/vectors", files={"file": ("gamma.safetensors", file.read_bytes())})
    assert up.status_code == 200 and up.json()["id"] == "gamma"
    assert up.json()["method"] == "manual"
    as_json = httpx.post(
        url + "/v1/vectors",
        json={"name": "delta", "data": base64.b64encode(file.read_bytes()).decode()},
    )
    assert as_json.status_code == 200
    assert {"gamma", "delta"} <= {v["id"] for v in httpx.get(url + "/v1/vectors").json()["data"]}
    duplicate = httpx.post(
        url + "/v1/vectors", files={"file": ("gamma.safetensors", file.read_bytes())}
    )
    assert duplicate.status_code == 400
    corrupt = httpx.post(
        url + "/v1/vectors", files={"file": ("broken.safetensors", file.read_bytes()[:-5])}
    )
    assert corrupt.status_code == 400 and "broken" not in engine.vectors
    wrong_size = sl.SteeringVector({0: torch.ones(7)}).save(tmp_path / "w.safetensors")
    refused = httpx.post(
        url + "/v1/vectors", files={"file": ("w.safetensors", wrong_size.read_bytes())}
    )
    assert refused.status_code == 400 and "size" in refused.json()["error"]["message"]
    used = client.completions.create(
        model="default",
        prompt="a",
        max_tokens=3,
        extra_body={"steering": [{"vector": "gamma", "strength": 2.0}]},
    )
    assert used.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(url + "/health").json()["status"] == "ok"
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "steerlab" in page.text


def test_api_key() -> None:
    engine = TorchEngine(tiny_model("gpt2"), max_batch=2)
    with serve_in_thread(create_app(engine, api_key="s3cret")) as url:
        assert httpx.get(url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = httpx.get(url + "/v1/models", headers=headers)
            assert reply.status_code == 401
            assert reply.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        done = good.completions.create(model="default", prompt="the cat", max_tokens=2)
        assert done.usage.completion_tokens >= 1
