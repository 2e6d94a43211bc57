"""Per-request fault isolation and chunked prefill in the torch engine.

A request whose own work fails inside a batched step (non-finite logits, an overflow in its
position arithmetic, an exception in its sampling or readout) ends alone with an error that
names the cause, and every other request's output is what it is when served alone. What can be
checked before admission is refused at ``submit`` with ``InvalidInputError`` naming the field.
Long prompts are read in pieces that give the same output as reading them whole.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.conditions import condition_score
from steerlab.errors import InvalidInputError
from steerlab.server.engine import (
    MIN_TEMPERATURE,
    ChatMessage,
    GenerationRequest,
    ReadoutEntry,
    RequestStream,
    SteeringEntry,
    TokenEvent,
    TorchEngine,
)
from steerlab.testing import tiny_model

# Batched rows and solo rows run the same float32 kernels on differently shaped inputs, so
# their logits agree to float32 rounding of sums over d_model (~1e-6 relative); measured
# differences of log-probabilities and readouts on the tiny models are below 1e-5. 1e-4 is
# ten times that and still far below any change a different token history or a leaked
# steering term would make (those move log-probabilities by > 1e-2).
TOL = 1e-4


def _vec(d_model: int, layer: int, seed: int) -> sl.SteeringVector:
    return sl.SteeringVector(
        {layer: torch.randn(d_model, generator=torch.Generator().manual_seed(seed))}
    )


@pytest.fixture
def engine() -> Iterator[TorchEngine]:
    model = tiny_model("llama")
    eng = TorchEngine(model, max_batch=8)
    eng.vectors.register("a", _vec(model.d_model, 1, 0))
    eng.vectors.register("b", _vec(model.d_model, 2, 1))
    eng.vectors.register("bomb", _vec(model.d_model, 1, 2))
    eng.start()
    try:
        yield eng
    finally:
        eng.shutdown()


GOOD = [
    GenerationRequest(
        prompt="the cat sat on the",
        max_tokens=10,
        temperature=0.0,
        logprobs=2,
        steering=(SteeringEntry("a", 6.0, "all"),),
        readout=(ReadoutEntry("b", 2),),
    ),
    GenerationRequest(prompt="a dog", max_tokens=12, temperature=0.0, logprobs=0),
    GenerationRequest(
        prompt="i think the movie was",
        max_tokens=9,
        temperature=0.0,
        logprobs=1,
        steering=(SteeringEntry("b", -5.0, "generated"), SteeringEntry("a", 3.0, "last")),
    ),
    GenerationRequest(
        prompt="hello world",
        max_tokens=11,
        temperature=0.7,
        seed=3,
        logprobs=0,
        chat=True,
        readout=(ReadoutEntry("a", 1),),
    ),
]


class _Bomb:
    """A readout direction that works on the prompt and raises on the first decoding step,
    so the fault happens inside a batched forward pass that other requests share."""

    def __init__(self, direction: torch.Tensor) -> None:
        self.direction = direction
        self.calls = 0

    def __rmatmul__(self, other: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("readout probe exploded")
        return other @ self.direction


# fault kind -> (bad request, whether it must bypass GenerationRequest.check, words the error
# must contain)
FAULTS: dict[str, tuple[GenerationRequest, bool, tuple[str, ...]]] = {
    # probabilities become inf/nan when sampling: the sampling step fails for this row
    "temperature": (
        GenerationRequest(prompt="the cat", max_tokens=8, temperature=1e-300, seed=1),
        True,
        ("temperature", "not finite"),
    ),
    # passes every check (each strength x direction is finite, the engine has no strength
    # cap): the three terms' sum overflows float32 at the first generated token, in the first
    # batched decoding step, and that row's logits become nan
    "strength": (
        GenerationRequest(
            prompt="the cat",
            max_tokens=8,
            temperature=0.0,
            steering=(SteeringEntry("a", 1e38, "generated"),) * 3,
        ),
        False,
        ("steering", "non-finite"),
    ),
    # an index beyond int64 reaching the position arithmetic of the steering hook
    "overflow": (
        GenerationRequest(
            prompt="the cat",
            max_tokens=8,
            temperature=0.0,
            steering=(SteeringEntry("a", 2.0, 99999999999999999999),),
        ),
        True,
        ("steering", "failed in the model"),
    ),
    # an exception inside the shared forward pass (a readout hook), at a batched step
    "readout": (
        GenerationRequest(
            prompt="the cat", max_tokens=8, temperature=0.0, readout=(ReadoutEntry("bomb", 1),)
        ),
        False,
        ("readout", "readout probe exploded"),
    ),
}


def _drain(stream: RequestStream) -> tuple[list[TokenEvent], BaseException | None]:
    events: list[TokenEvent] = []
    try:
        for event in stream:
            events.append(event)
    except Exception as err:
        return events, err
    return events, None


def _submit_together(
    engine: TorchEngine, requests: list[GenerationRequest]
) -> list[tuple[list[TokenEvent], BaseException | None]]:
    """Queue ``requests`` so the worker admits them in one iteration (it takes the queue
    under this lock), then read every stream from its own thread."""
    with engine._cond:
        streams = [engine.submit(r) for r in requests]
    with ThreadPoolExecutor(len(streams)) as pool:
        return list(pool.map(_drain, streams))


def _same(got: list[TokenEvent], solo: list[TokenEvent]) -> None:
    assert [e.token_id for e in got] == [e.token_id for e in solo]
    assert "".join(e.text for e in got) == "".join(e.text for e in solo)
    assert got[-1].finish_reason == solo[-1].finish_reason
    for a, b in zip(got, solo):
        if b.logprob is not None:
            assert a.logprob == pytest.approx(b.logprob, abs=TOL)
        assert [t.token_id for t in a.top_logprobs] == [t.token_id for t in b.top_logprobs]
        for x, y in zip(a.top_logprobs, b.top_logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=TOL)
        assert a.readout == pytest.approx(b.readout, abs=TOL)


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_a_faulty_request_fails_alone_and_the_others_are_unchanged(
    engine: TorchEngine, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    solo = [list(engine.submit(r)) for r in GOOD]
    bad, bypass, words = FAULTS[kind]
    if bypass:  # what submit refuses is sent past it, to test the worker's own defence
        original = GenerationRequest.check

        def check(self: GenerationRequest, **options: Any) -> None:
            if self is not bad:
                original(self, **options)

        monkeypatch.setattr(GenerationRequest, "check", check)
    if kind == "readout":
        make = engine.planner.probe

        def readout(entry: ReadoutEntry) -> Any:
            made = make(entry)
            if entry.vector == "bomb":
                return dataclasses.replace(made, direction=_Bomb(made.direction))
            return made

        monkeypatch.setattr(engine.planner, "probe", readout)
    # the bad request sits in the middle of the batch, two good ones on each side
    requests = [GOOD[0], GOOD[1], bad, GOOD[2], GOOD[3]]
    steps_before = engine.steps
    results = _submit_together(engine, requests)
    events, error = results[2]
    assert isinstance(error, InvalidInputError), (kind, error)
    for word in words:
        assert word in str(error), (kind, str(error))
    assert not any(e.finish_reason for e in events)
    for (got, err), alone in zip(results[:2] + results[3:], solo):
        assert err is None, (kind, err)
        _same(got, alone)
    assert engine.max_rows_seen >= 4 and engine.steps > steps_before
    # the engine keeps serving, the batch cache is consistent: a new request after the fault
    assert [e.token_id for e in engine.submit(GOOD[2])] == [e.token_id for e in solo[2]]


def test_a_fault_in_a_batched_step_is_found_by_running_the_rows_alone(
    engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The readout fault raises inside the shared forward pass: the step is rerun row by row
    from the cache as it was before it, so the good rows' tokens of that very step come from
    their solo reruns (and equal the solo outputs, checked above); here: the step counter
    shows the batched step ran and the bomb went off exactly in it (second call)."""
    make = engine.planner.probe
    bombs: list[_Bomb] = []

    def readout(entry: ReadoutEntry) -> Any:
        made = make(entry)
        if entry.vector == "bomb":
            bombs.append(_Bomb(made.direction))
            return dataclasses.replace(made, direction=bombs[-1])
        return made

    monkeypatch.setattr(engine.planner, "probe", readout)
    bad = FAULTS["readout"][0]
    results = _submit_together(engine, [GOOD[1], bad, GOOD[2]])
    assert isinstance(results[1][1], InvalidInputError)
    assert [len(e) for e, _ in results][1] == 1  # its first token (from the prompt) came out
    assert bombs[0].calls == 3  # prompt, the batched step (raised), its solo rerun (raised)
    assert results[0][1] is None and results[2][1] is None


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"temperature": 1e-300}, "temperature"),
        ({"temperature": MIN_TEMPERATURE / 2}, "temperature"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"prompt": "abc \ud800"}, "prompt"),
        ({"chat": True, "messages": (ChatMessage("user", "abc \ud800"),)}, "messages[0].content"),
        ({"chat": True, "messages": (ChatMessage("us\udfffer", "hi"),)}, "messages[0].role"),
        ({"stop": ("ok", "abc \ud800")}, "stop[1]"),
        ({"steering": (SteeringEntry("a", 1.0, "after:abc \ud800"),)}, "steering[0].positions"),
        ({"steering": (SteeringEntry("a", 1.0, 99999999999999999999),)}, "steering[0].positions"),
        ({"steering": (SteeringEntry("a", 1.0, [0, -(10**20)]),)}, "steering[0].positions"),
        (
            {"steering": (SteeringEntry("a", 1.0, "all"), SteeringEntry("a", 1.0, "first:9999"))},
            "steering[1].positions",
        ),
        ({"steering": (SteeringEntry("a", 1.0, slice(0, 10**20)),)}, "steering[0].positions"),
    ],
)
def test_submit_refuses_what_can_be_checked_before_admission(
    engine: TorchEngine, options: dict[str, Any], field: str
) -> None:
    context = engine._max_positions
    assert context is not None and context < 9999  # the tiny model's context is small
    request = GenerationRequest(**{"prompt": "the cat", "max_tokens": 4, **options})
    steps = engine.steps
    with pytest.raises(InvalidInputError, match=field.replace("[", r"\[").replace("]", r"\]")):
        engine.submit(request)
    assert engine.steps == steps and not engine._pending
    # the boundary itself is accepted: the last index of the context, and the minimum temperature
    ok = GenerationRequest(
        prompt="the cat",
        max_tokens=2,
        temperature=MIN_TEMPERATURE,
        seed=2**64 - 1,
        steering=(SteeringEntry("a", 1.0, [context - 1, -context]),),
    )
    assert len(list(engine.submit(ok))) == 2


def test_the_app_answers_400_naming_the_field() -> None:
    import httpx

    from steerlab.server.app import create_app, serve_in_thread

    model = tiny_model("gpt2")
    eng = TorchEngine(model)
    bodies = [
        ({"prompt": "abc \ud800"}, "prompt"),
        ({"prompt": "hi", "seed": 2**64}, "seed"),
        ({"prompt": "hi", "temperature": 1e-300}, "temperature"),
        ({"prompt": "hi", "stop": ["abc \ud800"]}, "stop"),
    ]
    with serve_in_thread(create_app(eng)) as url:
        for body, field in bodies:
            # json.dumps escapes the lone surrogate as \\ud800, as a client in any language may
            raw = json.dumps({"max_tokens": 2, **body})
            reply = httpx.post(
                url + "/v1/completions",
                content=raw,
                headers={"content-type": "application/json"},
            )
            assert reply.status_code == 400, (body, reply.text)
            assert field in reply.json()["error"]["message"], (body, reply.text)
        ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
    # a fault found only while generating: 400 when not streaming, an invalid_request_error
    # event on the stream otherwise (the status line was sent before the fault)
    vector = _vec(model.d_model, 1, 0)
    eng = TorchEngine(model)
    eng.vectors.register("a", vector)
    body = {
        "prompt": "the cat",
        "max_tokens": 4,
        "temperature": 0,
        "steering": [{"vector": "a", "strength": 1e38, "positions": "generated"}] * 3,
    }
    with serve_in_thread(create_app(eng, max_strength=1e39)) as url:
        reply = httpx.post(url + "/v1/completions", json=body)
        assert reply.status_code == 400 and "non-finite" in reply.json()["error"]["message"]
        streamed = httpx.post(url + "/v1/completions", json={**body, "stream": True})
        frames = [
            json.loads(line[len("data: ") :])
            for line in streamed.text.splitlines()
            if line.startswith("data: {")
        ]
        assert frames[-1]["error"]["type"] == "invalid_request_error"
        assert "steering" in frames[-1]["error"]["message"]
        assert frames[0]["choices"][0]["text"] is not None  # the first token came out first


LONG = (
    "the cat sat on the mat and looked at the dog while the sun went down over the hills "
    "and the birds sang in the trees near the old house by the river"
)


def _chunk_requests() -> list[GenerationRequest]:
    def req(*entries: SteeringEntry, **options: Any) -> GenerationRequest:
        base: dict[str, Any] = {"prompt": LONG, "max_tokens": 8, "temperature": 0.0}
        return GenerationRequest(**{**base, "steering": entries, **options})

    return [
        req(SteeringEntry("a", 6.0, "all"), logprobs=2, readout=(ReadoutEntry("b", 2),)),
        req(SteeringEntry("b", -6.0, "last")),
        req(SteeringEntry("a", 5.0, "prompt"), SteeringEntry("b", 4.0, "generated")),
        req(SteeringEntry("a", 8.0, [3, 17, -1])),
        req(SteeringEntry("b", 7.0, slice(2, 30, 3))),
        req(SteeringEntry("a", 8.0, "first:2")),
        # text-selected positions: markers inside the prompt, found across piece boundaries
        req(SteeringEntry("a", 8.0, "after:dog")),
        req(SteeringEntry("b", 8.0, "between:sun,birds")),
        req(SteeringEntry("a", 8.0, "outside:hills,river")),
        req(SteeringEntry("b", 8.0, "all", when="tokens")),
        req(SteeringEntry("a", 8.0, "all", when="prompt")),
        req(prompt="hello", max_tokens=6, chat=True, logprobs=0),
    ]


def _serve_all(
    model: sl.SteeredModel, chunk: int | None, conditions: dict[str, sl.Condition]
) -> tuple[list[list[TokenEvent]], TorchEngine]:
    eng = TorchEngine(model, max_batch=16, prefill_chunk=chunk)
    eng.vectors.register("a", _vec(model.d_model, 1, 0))
    eng.vectors.register("b", _vec(model.d_model, 2, 1))
    for name, cond in conditions.items():
        eng.conditions.register(name, cond)
    eng.start()
    try:
        # a running stream first, so pieces of the prompts interleave with its decoding steps
        background = eng.submit(GenerationRequest(prompt="a dog", max_tokens=40, temperature=0))
        first = next(iter(background))
        streams = [eng.submit(r) for r in _chunk_requests()]
        with ThreadPoolExecutor(len(streams)) as pool:
            got = list(pool.map(list, streams))
        got.append([first, *background])
    finally:
        eng.shutdown()
    return got, eng


def test_chunked_prefill_equals_unchunked_for_steered_requests() -> None:
    model = tiny_model("llama")
    n_prompt = len(model.encode([LONG]).input_ids[0])
    assert n_prompt > 3 * 7 and n_prompt % 7  # several pieces of 7, the last one partial
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(11))
    score = float(sl.Condition(direction, layer=1, threshold=0.0).scores(model, [LONG])[0])
    acts = model.activations([LONG], layers=[1], positions="all")[1][0]
    conditions = {
        # fires on this prompt (the verdict is read on the whole prompt: never split)
        "prompt": sl.Condition(direction, layer=1, threshold=score - 1.0),
        "tokens": sl.Condition(
            direction, layer=1, threshold=float(condition_score(acts, direction).median())
        ).per_token(),
    }
    whole, _ = _serve_all(model, None, conditions)
    pieces, eng = _serve_all(model, 7, conditions)
    assert eng.interleaved_steps > 0  # decoding ran between pieces of a prompt
    for got, ref in zip(pieces, whole):
        _same(got, ref)
    # the steering did act: every steered request differs from the plain continuation
    plain = [e.token_id for e in whole[0]]
    unsteered = model.generate_ids(LONG, max_new_tokens=8)[0].tolist()
    assert plain != unsteered


def test_serve_passes_prefill_chunk_to_the_torch_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from steerlab.cli import _serve, app

    seen: list[dict[str, Any]] = []

    def factory(model: str | None, max_batch: int, **options: Any) -> Any:
        seen.append(options)
        raise InvalidInputError("stopped here")

    monkeypatch.setitem(_serve.ENGINES, "torch", factory)
    runner = CliRunner()
    for given, expected in (("64", {"prefill_chunk": 64}), ("0", {"prefill_chunk": None})):
        result = runner.invoke(app, ["serve", "--prefill-chunk", given])
        assert result.exit_code == 1 and "stopped here" in result.output
        assert seen.pop() == expected
    assert runner.invoke(app, ["serve"]).exit_code == 1 and seen.pop() == {}
    for argv, message in (
        (["serve", "--prefill-chunk", "-1"], "must be 0 or positive"),
        (["serve", "--engine", "vllm", "--prefill-chunk", "8"], "--engine torch only"),
    ):
        result = runner.invoke(app, argv)
        assert result.exit_code == 1 and message in result.output and not seen
        assert "Traceback" not in result.output
    with pytest.raises(InvalidInputError, match="prefill_chunk"):
        TorchEngine(tiny_model("gpt2"), prefill_chunk=0)
