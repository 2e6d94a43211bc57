"""``VLLMEngine`` behind the server's engine interface: concurrent steered requests == library.

Runs from ``.venv-vllm`` (``make test-vllm``); skipped with the reason elsewhere.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.server.engine import (
    Engine,
    GenerationRequest,
    ReadoutEntry,
    SteeringEntry,
    TokenEvent,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["The weather today is", "My favourite food is", "Once upon a time", "I think that"]


@pytest.fixture(scope="module")
def served(
    vllm_eager: bool,
) -> Iterator[tuple[Any, sl.SteeredModel, dict[str, sl.SteeringVector]]]:
    from steerlab.vllm.engine import VLLMEngine

    engine = VLLMEngine(
        dtype="float32",
        max_model_len=512,
        seed=0,
        gpu_memory_utilization=0.5,
        block_size=32,
        enforce_eager=vllm_eager,
    )
    model = sl.load_model()
    gen = torch.Generator().manual_seed(5)
    vectors = {
        "one": sl.SteeringVector({15: torch.randn(model.d_model, generator=gen) / 2}),
        "four": sl.SteeringVector(
            {layer: torch.randn(model.d_model, generator=gen) / 2 for layer in (6, 10, 14, 18)}
        ),
    }
    for name, vec in vectors.items():
        engine.vectors.register(name, vec)
    engine.start()
    try:
        yield engine, model, vectors
    finally:
        engine.shutdown()


def _run(engine: Any, request: GenerationRequest) -> list[TokenEvent]:
    return list(engine.submit(request))


def test_concurrent_steered_requests_equal_the_library(
    served: tuple[Any, sl.SteeredModel, dict[str, sl.SteeringVector]],
) -> None:
    engine, model, vectors = served
    assert isinstance(engine, Engine)
    cases: list[tuple[str, tuple[SteeringEntry, ...], Any]] = [
        (PROMPTS[0], (), None),
        (PROMPTS[1], (SteeringEntry("one", 8.0, "last"),), ("one", 8.0, "last")),
        (PROMPTS[2], (SteeringEntry("four", 4.0, "all"),), ("four", 4.0, "all")),
        (
            PROMPTS[3],
            (SteeringEntry("one", {15: 8.0}, "generated"),),
            ("one", {15: 8.0}, "generated"),
        ),
        (
            PROMPTS[0],
            (SteeringEntry("four", 6.0, "all", op="clamp"),),
            ("four", 6.0, "all", "clamp"),
        ),
    ]
    requests = [
        GenerationRequest(prompt=p, max_tokens=12, temperature=0.0, steering=s, logprobs=0)
        for p, s, _ in cases
    ]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: _run(engine, r), requests))
    steers = [
        None
        if ref is None
        else sl.Steering(
            vectors[ref[0]],
            strength=ref[1],
            positions=ref[2],
            op=ref[3] if len(ref) > 3 else None,
        )
        for _, _, ref in cases
    ]
    wants = model.generate_ids([p for p, _, _ in cases], steering=steers, max_new_tokens=12)
    assert not torch.equal(wants[4], wants[0])  # the clamp row moved away from unsteered
    for (prompt, _, _), events, want in zip(cases, results, wants):
        got = [e.token_id for e in events if e.token_id >= 0]
        assert got == want.tolist(), prompt
        assert events[-1].finish_reason in ("length", "stop")
        assert "".join(e.text for e in events) == model.tokenizer.decode(
            want.tolist(), skip_special_tokens=True
        )
        assert events[0].logprob is not None and events[0].logprob <= 0


def test_stop_strings_and_errors(
    served: tuple[Any, sl.SteeredModel, dict[str, sl.SteeringVector]],
) -> None:
    engine, _, _ = served
    full = "".join(
        e.text
        for e in _run(engine, GenerationRequest(prompt=PROMPTS[2], max_tokens=12, temperature=0.0))
    )
    word = full.split()[1]
    events = _run(
        engine,
        GenerationRequest(prompt=PROMPTS[2], max_tokens=12, temperature=0.0, stop=(word,)),
    )
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == full[: full.index(word)]
    with pytest.raises(sl.InvalidInputError, match="unknown vector"):
        engine.submit(GenerationRequest(prompt="hi", steering=(SteeringEntry("nope"),)))
    with pytest.raises(sl.LayerIndexError):
        engine.submit(GenerationRequest(prompt="hi", steering=(SteeringEntry("one", {99: 1.0}),)))
    with pytest.raises(sl.LayerIndexError, match="readout layer 30"):
        engine.submit(GenerationRequest(prompt="hi", readout=(ReadoutEntry("one", 30),)))
    with pytest.raises(sl.VectorMismatchError, match="no direction for layer 3"):
        engine.submit(GenerationRequest(prompt="hi", readout=(ReadoutEntry("four", 3),)))
    with pytest.raises(sl.VectorMismatchError):
        engine.vectors.register("small", sl.SteeringVector({1: torch.ones(8)}))


def test_sites_other_than_resid_are_refused_naming_the_field(
    served: tuple[Any, sl.SteeredModel, dict[str, sl.SteeringVector]],
) -> None:
    engine, _, vectors = served
    direction = vectors["one"][15]
    engine.vectors.register(
        "attn", sl.SteeringVector({15: direction}, metadata={"site": "attn_out"})
    )
    engine.vectors.register("same", sl.SteeringVector({15: direction}))
    engine.vectors.register("iti", sl.SteeringVector({15: direction}, metadata={"site": "head"}))
    refused = [
        (SteeringEntry("attn", 4.0), "this vector is for site 'attn_out'"),
        (SteeringEntry("one", 4.0, site="mlp_out"), r"steering\[1\]\.site: the vLLM engine"),
        (SteeringEntry("one", 4.0, site="head"), r"steering\[1\]\.site: the vLLM .* not 'head'"),
        (SteeringEntry("iti", 4.0, site="resid"), r"steering\[1\]\.site: site='resid': the"),
        (SteeringEntry("one", 4.0, heads=(0,)), r"steering\[1\]\.heads: the vLLM engine"),
        (SteeringEntry("one", 4.0, experts=(0,)), r"steering\[1\]\.experts: the vLLM engine"),
    ]
    for entry, says in refused:
        with pytest.raises(sl.InvalidInputError, match=says):
            engine.submit(GenerationRequest(prompt="hi", steering=(SteeringEntry("one"), entry)))

    def ids(name: str | None, **site: Any) -> list[int]:
        steering = () if name is None else (SteeringEntry(name, 8.0, **site),)
        request = GenerationRequest(
            prompt=PROMPTS[0], max_tokens=8, temperature=0.0, steering=steering
        )
        return [e.token_id for e in _run(engine, request)]

    # an attn_out vector moved to the residual stream steers as the same resid vector does
    assert ids("attn", site="resid") == ids("same") != ids(None)


def test_readout_equals_the_torch_engine(
    served: tuple[Any, sl.SteeredModel, dict[str, sl.SteeringVector]],
) -> None:
    """Per-token probe scores from vLLM's workers == the torch engine's (fp32, within 1e-3),
    unsteered and steered (read after the steering at the same layer), in one mixed batch."""
    from steerlab.server.engine import TorchEngine

    engine, model, vectors = served
    probes = (ReadoutEntry("one", 15), ReadoutEntry("four", 10), ReadoutEntry("one", -1))
    requests = [
        GenerationRequest(prompt=PROMPTS[0], max_tokens=10, temperature=0.0, readout=probes),
        GenerationRequest(
            prompt=PROMPTS[1],
            max_tokens=10,
            temperature=0.0,
            steering=(SteeringEntry("one", 8.0, "all"),),
            readout=probes,
        ),
        GenerationRequest(
            prompt=PROMPTS[2],
            max_tokens=10,
            temperature=0.0,
            steering=(SteeringEntry("four", 4.0, "generated"),),
            readout=probes[1:2],
        ),
        GenerationRequest(prompt=PROMPTS[3], max_tokens=10, temperature=0.0),
    ]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(lambda r: _run(engine, r), requests))
    torch_engine = TorchEngine(model, max_batch=4)
    for name, vec in vectors.items():
        torch_engine.vectors.register(name, vec)
    torch_engine.start()
    try:
        want = [_run(torch_engine, r) for r in requests]
    finally:
        torch_engine.shutdown()
    worst = 0.0
    for request, events, reference in zip(requests, got, want):
        tokens = [e.token_id for e in events if e.token_id >= 0]
        assert tokens == [e.token_id for e in reference if e.token_id >= 0], request.prompt
        for event, ref in zip(events, reference):
            assert len(event.readout) == len(request.readout)
            for value, expected in zip(event.readout, ref.readout):
                worst = max(worst, abs(value - expected))
    print(f"readout, vLLM vs torch engine: max |difference| {worst:.2e}")
    assert worst < 1e-3, worst
    # the steering is visible in the probe: the steered request reads differently at layer 15
    steered_first = got[1][0].readout[0]
    alone = _run(engine, dataclasses.replace(requests[1], steering=()))[0].readout[0]
    assert abs(steered_first - alone) > 1.0


def test_cancel_ends_the_stream(
    served: tuple[Any, sl.SteeredModel, dict[str, sl.SteeringVector]],
) -> None:
    engine, _, _ = served
    stream = engine.submit(GenerationRequest(prompt=PROMPTS[0], max_tokens=400, temperature=0.0))
    events = []
    for event in stream:
        events.append(event)
        if len(events) == 2:
            stream.cancel()
    assert events[-1].finish_reason == "cancelled"
    assert len(events) < 400


def test_prefix_cache_hits_change_neither_text_nor_readout(
    served: tuple[Any, sl.SteeredModel, dict[str, sl.SteeringVector]],
) -> None:
    """Issue 18 through the server engine: a steered request after a plain one with the same
    long prompt equals the steered request run first, tokens and readout (a cache hit on a
    repeat changes nothing either)."""
    engine, _, _ = served
    prompt = " ".join(PROMPTS * 12)  # ~70 tokens: two full blocks of 32
    probes = (ReadoutEntry("one", 15), ReadoutEntry("four", 10))
    plain = GenerationRequest(prompt=prompt, max_tokens=8, temperature=0.0, readout=probes)
    steered = dataclasses.replace(plain, steering=(SteeringEntry("one", 8.0, "all"),))

    def tokens_and_readout(request: GenerationRequest) -> tuple[list[int], list[Any]]:
        events = _run(engine, request)
        return [e.token_id for e in events if e.token_id >= 0], [
            e.readout for e in events if e.token_id >= 0
        ]

    first_steered = tokens_and_readout(steered)
    first_plain = tokens_and_readout(plain)
    assert first_steered[0] != first_plain[0]
    for request, want in ((steered, first_steered), (plain, first_plain)) * 2:
        got = tokens_and_readout(request)
        assert got[0] == want[0]
        worst = max(abs(a - b) for g, w in zip(got[1], want[1]) for a, b in zip(g, w))
        assert worst < 1e-4, worst


def test_every_vllm_path_encodes_prompts_as_the_library() -> None:
    """The vLLM engine's planner and ``steerlab.vllm.generate_ids`` hand vLLM the ids
    ``SteeredModel.encode`` gives, for raw and chat prompts (vLLM is not started: the engine's
    planner needs only the tokenizer, and ``generate_ids`` runs on a recording stand-in)."""
    from types import SimpleNamespace

    import steerlab.vllm as slv
    from steerlab.vllm.engine import VLLMEngine

    engine = VLLMEngine(max_model_len=512)
    model = sl.load_model()
    seen: list[list[int]] = []

    def generate(requests: list[Any], params: list[Any], use_tqdm: bool) -> list[Any]:
        seen.extend(list(r["prompt_token_ids"]) for r in requests)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1, 2])]) for _ in requests]

    llm = SimpleNamespace(
        get_tokenizer=lambda: model.tokenizer,
        generate=generate,
        llm_engine=SimpleNamespace(
            model_config=SimpleNamespace(hf_text_config=model.hf_model.config)
        ),
    )
    for chat in (False, True):
        expected = [model.encode(p, chat=chat).input_ids[0].tolist() for p in PROMPTS]
        served = [engine.planner.encode(GenerationRequest(prompt=p, chat=chat)) for p in PROMPTS]
        seen.clear()
        slv.generate_ids(llm, PROMPTS, chat=chat, max_new_tokens=2)
        assert served == expected
        assert seen == expected
    assert expected[0] != model.encode(PROMPTS[0]).input_ids[0].tolist()  # the template's
