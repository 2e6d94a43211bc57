"""``site``/``heads``/``experts`` in the server's steering entries, over real HTTP (issue 22):
a head-site steering served equals the library's (tokens exact, logprobs to 1e-4), a site
override among the residual-space sites likewise, and every bad value is a 400 naming its field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import steerlab as sl  # noqa: E402
from steerlab.server.app import create_app, serve_in_thread  # noqa: E402
from steerlab.server.engine import TorchEngine  # noqa: E402
from steerlab.sites import site_width  # noqa: E402
from steerlab.testing import tiny_model  # noqa: E402

ARCH = "qwen3"  # grouped-query attention: 4 query heads share 2 KV heads
PROMPT = "the cat sat on the"


def _vectors(model: sl.SteeredModel) -> dict[str, sl.SteeringVector]:
    gen = torch.Generator().manual_seed(11)

    def at(site: str, layer: int) -> sl.SteeringVector:
        width = site_width(model.adapter, site)
        return sl.SteeringVector(
            {layer: 3 * torch.randn(width, generator=gen)}, metadata={"site": site}
        )

    return {"iti": at("head", 1), "resid": at("resid", 1), "mlp": at("mlp_out", 2)}


@pytest.fixture(scope="module")
def reference() -> sl.SteeredModel:
    return tiny_model(ARCH)  # same seed, same weights as the served one


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    model = tiny_model(ARCH)
    engine = TorchEngine(model, max_batch=8, model_id="tiny")
    for name, vector in _vectors(model).items():
        engine.vectors.register(name, vector)
    with serve_in_thread(create_app(engine, max_tokens_cap=40)) as address:
        yield address


def _complete(url: str, steering: list[dict[str, Any]], max_tokens: int = 8) -> dict[str, Any]:
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 1,
        "steering": steering,
    }
    reply = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def _library(
    model: sl.SteeredModel, steering: sl.Steering, n: int
) -> tuple[list[int], list[float]]:
    """Greedy ids from ``generate_ids`` and each one's log-probability from one steered forward
    pass over prompt + completion (no cache: an independent path to the same numbers)."""
    ids = [int(i) for i in model.generate_ids(PROMPT, steering=steering, max_new_tokens=n)[0]]
    prompt_ids = [int(i) for i in model.encode([PROMPT]).input_ids[0]]
    full = torch.tensor([prompt_ids + ids])
    with model.steer(steering), torch.no_grad():
        logits = model.hf_model(input_ids=full).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids) - 1
    return ids, [float(logprobs[start + i, t]) for i, t in enumerate(ids)]


def _served_ids(model: sl.SteeredModel, reply: dict[str, Any]) -> list[int]:
    tokens = reply["choices"][0]["logprobs"]["tokens"]
    return [int(t) for t in model.tokenizer.convert_tokens_to_ids(tokens)]


def _check_parity(
    url: str, reference: sl.SteeredModel, entry: dict[str, Any], steering: sl.Steering
) -> None:
    reply = _complete(url, [entry])
    want_ids, want_lp = _library(reference, steering, 8)
    got_lp = reply["choices"][0]["logprobs"]["token_logprobs"]
    eos = reference.tokenizer.eos_token_id
    got_ids = _served_ids(reference, reply)
    assert got_ids == want_ids[: len(got_ids)]
    assert len(got_ids) == len(want_ids) or want_ids[len(got_ids) - 1] == eos
    assert got_lp == pytest.approx(want_lp[: len(got_lp)], abs=1e-4)
    plain_ids, _ = _library(reference, sl.Steering(steering.vector, strength=0.0), 8)
    assert plain_ids != want_ids  # the steering changes the greedy continuation


def test_head_site_steering_equals_the_library(url: str, reference: sl.SteeredModel) -> None:
    vec = _vectors(reference)["iti"]
    for heads in ([1, 3], [-1], [2]):
        entry = {"vector": "iti", "strength": 4.0, "heads": heads}
        _check_parity(url, reference, entry, sl.Steering(vec, strength=4.0, heads=heads))
    # heads=[...] keeps only those slices: the same vector on all heads answers differently
    some = _complete(url, [{"vector": "iti", "strength": 4.0, "heads": [2]}])
    every = _complete(url, [{"vector": "iti", "strength": 4.0}])
    assert some["choices"][0]["logprobs"] != every["choices"][0]["logprobs"]


def test_site_override_within_the_residual_space_equals_the_library(
    url: str, reference: sl.SteeredModel
) -> None:
    vecs = _vectors(reference)
    entry = {"vector": "resid", "strength": 2.0, "site": "mlp_out"}
    _check_parity(url, reference, entry, sl.Steering(vecs["resid"], strength=2.0, site="mlp_out"))
    entry = {"vector": "mlp", "strength": -2.0, "site": "attn_out"}
    _check_parity(url, reference, entry, sl.Steering(vecs["mlp"], strength=-2.0, site="attn_out"))


@pytest.mark.parametrize(
    ("entry", "field", "says"),
    [
        ({"vector": "iti", "heads": [4]}, "steering[0].heads", "head 4 is out of range"),
        ({"vector": "iti", "heads": [-5]}, "steering[0].heads", "out of range"),
        ({"vector": "iti", "heads": []}, "steering[0].heads", "must not be empty"),
        ({"vector": "iti", "heads": ["1"]}, "steering[0].heads", ""),
        ({"vector": "iti", "heads": [True]}, "steering[0].heads", ""),
        ({"vector": "resid", "heads": [0]}, "steering[0].heads", "site 'resid'"),
        ({"vector": "iti", "site": "ffn"}, "steering[0].site", "unknown site='ffn'"),
        ({"vector": "iti", "site": 3}, "steering[0].site", ""),
        ({"vector": "iti", "site": "resid"}, "steering[0].site", "computed for site 'head'"),
        ({"vector": "resid", "site": "head"}, "steering[0].site", "computed for site 'resid'"),
        ({"vector": "resid", "site": "router"}, "steering[0].site", "computed for site"),
        ({"vector": "resid", "experts": [0]}, "steering[0].experts", "site 'resid'"),
        ({"vector": "mlp", "experts": [0]}, "steering[0].experts", "not a mixture-of-experts"),
        ({"vector": "iti", "heads": [0], "op": "clamp"}, "", "heads= selects slices"),
    ],
)
def test_bad_site_fields_are_400s_naming_the_field(
    url: str, entry: dict[str, Any], field: str, says: str
) -> None:
    steering = [{"vector": "resid", "strength": 1.0}, {"strength": 1.0, **entry}]
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2, "steering": steering}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert message.startswith(field.replace("[0]", "[1]")), message
    assert says in message, message
    ok = _complete(url, [{"vector": "iti", "strength": 1.0, "heads": 0}], max_tokens=2)
    assert ok["usage"]["completion_tokens"] >= 1
