"""The torch engine without HTTP: scheduling (joins and leaves at step boundaries), parity with
``model.generate`` per architecture, cancellation, sampling, validation, the vector registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.conditions import condition_score
from steerlab.errors import InvalidInputError, LayerIndexError, VectorFileError
from steerlab.server.engine import (
    EngineError,
    GenerationRequest,
    ReadoutEntry,
    SteeringEntry,
    StopMatcher,
    TokenEvent,
    TorchEngine,
    VectorRegistry,
)
from steerlab.testing import tiny_model


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
    eng.start()
    try:
        yield eng
    finally:
        eng.shutdown()


def _ids(events: list[TokenEvent], eos: int) -> list[int]:
    ids = [e.token_id for e in events]
    return ids[:-1] if ids and ids[-1] == eos else ids


def _reference(model: sl.SteeredModel, req: GenerationRequest, reg: VectorRegistry) -> list[int]:
    steering = [
        sl.Steering(reg.get(e.vector), strength=e.strength, positions=e.positions)
        for e in req.steering
    ]
    out = model.generate_ids(
        req.prompt,
        steering=steering[0] if steering else None,
        max_new_tokens=req.max_tokens,
        chat=req.chat,
    )
    return [int(i) for i in out[0]]


def test_requests_join_and_leave_at_step_boundaries(engine: TorchEngine) -> None:
    model = engine.model
    eos = model.tokenizer.eos_token_id
    long = GenerationRequest(
        prompt="the cat sat",
        max_tokens=30,
        temperature=0.0,
        steering=(SteeringEntry("a", 6.0, "generated"),),
    )
    short = GenerationRequest(
        prompt="a dog", max_tokens=4, temperature=0.0, steering=(SteeringEntry("b", -5.0, "last"),)
    )
    late = GenerationRequest(prompt="my house is", max_tokens=6, temperature=0.0)
    first = engine.submit(long)
    got_long: list[TokenEvent] = []
    iterator = iter(first)
    for _ in range(3):
        got_long.append(next(iterator))
    second = engine.submit(short)
    got_short = list(second)
    third = engine.submit(late)
    got_late = list(third)
    got_long.extend(iterator)
    # the long request was still generating while the others joined and left
    assert got_long[-1].finish_reason is not None
    assert engine.max_rows_seen >= 2
    assert _ids(got_long, eos) == _reference(model, long, engine.vectors)
    assert _ids(got_short, eos) == _reference(model, short, engine.vectors)
    assert _ids(got_late, eos) == _reference(model, late, engine.vectors)
    assert [e.completion_tokens for e in got_short] == list(range(1, len(got_short) + 1))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma2"])
def test_batched_rows_equal_library_per_architecture(arch: str) -> None:
    model = tiny_model(arch)
    eng = TorchEngine(model, max_batch=6)
    eng.vectors.register("a", _vec(model.d_model, 1, 3))
    eng.vectors.register("b", _vec(model.d_model, 0, 4))
    specs = [
        (),
        (SteeringEntry("a", 8.0, "all"),),
        (SteeringEntry("b", 5.0, "last"),),
        (SteeringEntry("a", {2: -6.0}, "generated"),),
        (SteeringEntry("b", 4.0, [1, -1]),),
    ]
    prompts = ["the cat sat on", "a", "i think the movie was very good", "hello world"]
    requests = [
        GenerationRequest(
            prompt=prompts[i % len(prompts)],
            max_tokens=4 + 2 * (i % 3),
            temperature=0.0,
            steering=specs[i % len(specs)],
            chat=i % 4 == 1,
        )
        for i in range(7)
    ]
    eng.start()
    try:
        streams = [eng.submit(r) for r in requests]
        results = [list(s) for s in streams]
    finally:
        eng.shutdown()
    eos = model.tokenizer.eos_token_id
    for req, events in zip(requests, results):
        assert _ids(events, eos) == _reference(model, req, eng.vectors), req
        text = model.tokenizer.decode(_reference(model, req, eng.vectors), skip_special_tokens=True)
        assert "".join(e.text for e in events) == text
    assert eng.max_rows_seen >= 3


def test_max_batch_bounds_the_rows(engine: TorchEngine) -> None:
    small = TorchEngine(engine.model, max_batch=2)
    small.vectors.register("a", engine.vectors.get("a"))
    engine.shutdown()  # one engine per model at a time
    small.start()
    try:
        reqs = [
            GenerationRequest(
                prompt=p,
                max_tokens=5,
                temperature=0.0,
                steering=(SteeringEntry("a", float(i), "all"),),
            )
            for i, p in enumerate(["the cat", "a dog", "my house", "the sky", "fish"])
        ]
        outs = [list(s) for s in [small.submit(r) for r in reqs]]
    finally:
        small.shutdown()
    assert small.max_rows_seen == 2
    eos = engine.model.tokenizer.eos_token_id
    for req, events in zip(reqs, outs):
        assert _ids(events, eos) == _reference(engine.model, req, small.vectors)


def test_cancel_ends_the_stream_and_frees_the_row(engine: TorchEngine) -> None:
    stream = engine.submit(GenerationRequest(prompt="the cat", max_tokens=40, temperature=0.0))
    seen = []
    for event in stream:
        seen.append(event)
        if len(seen) == 2:
            stream.cancel()
    assert seen[-1].finish_reason == "cancelled"
    assert len(seen) < 40
    after = list(engine.submit(GenerationRequest(prompt="a", max_tokens=2, temperature=0.0)))
    assert after[-1].finish_reason in ("length", "stop")


def test_sampling_seeded_and_independent_of_neighbours(engine: TorchEngine) -> None:
    req = GenerationRequest(prompt="the cat", max_tokens=12, temperature=1.3, seed=5)
    alone = [e.token_id for e in engine.submit(req)]
    noise = [
        engine.submit(GenerationRequest(prompt="a dog", max_tokens=12, temperature=2.0))
        for _ in range(3)
    ]
    together = [e.token_id for e in engine.submit(req)]
    for s in noise:
        list(s)
    assert alone == together
    other = [
        e.token_id
        for e in engine.submit(
            GenerationRequest(prompt="the cat", max_tokens=12, temperature=1.3, seed=6)
        )
    ]
    assert other != alone


def test_submit_validates_before_queueing(engine: TorchEngine) -> None:
    with pytest.raises(InvalidInputError, match="unknown vector 'zzz'"):
        engine.submit(GenerationRequest(prompt="a", steering=(SteeringEntry("zzz"),)))
    with pytest.raises(LayerIndexError):
        engine.submit(GenerationRequest(prompt="a", steering=(SteeringEntry("a", {9: 1.0}),)))
    with pytest.raises(InvalidInputError, match="positions"):
        engine.submit(GenerationRequest(prompt="a", steering=(SteeringEntry("a", 1.0, "x"),)))
    with pytest.raises(InvalidInputError, match="finite"):
        engine.submit(GenerationRequest(prompt="a", steering=(SteeringEntry("a", float("inf")),)))
    with pytest.raises(InvalidInputError, match="op"):
        engine.submit(GenerationRequest(prompt="a", steering=(SteeringEntry("a", 1.0, op="zap"),)))
    with pytest.raises(LayerIndexError):
        engine.submit(GenerationRequest(prompt="a", readout=(ReadoutEntry("a", 5),)))
    with pytest.raises(InvalidInputError, match="context"):
        engine.submit(GenerationRequest(prompt="a", max_tokens=500))
    with pytest.raises(InvalidInputError, match="top_p"):
        engine.submit(GenerationRequest(prompt="a", top_p=0.0))
    assert engine.max_rows_seen == 0  # nothing was queued


def test_shutdown_fails_open_streams_and_refuses_new_work() -> None:
    eng = TorchEngine(tiny_model("gpt2"), max_batch=2)
    with pytest.raises(EngineError, match="not running"):
        eng.submit(GenerationRequest(prompt="a"))
    eng.start()
    stream = eng.submit(GenerationRequest(prompt="the cat", max_tokens=120, temperature=0.0))
    first = next(iter(stream))
    eng.shutdown()
    assert first.token_id >= 0
    with pytest.raises(EngineError):
        for _ in stream:
            pass


def test_registry_checks_like_loading_a_file(tmp_path: Path) -> None:
    model = tiny_model("llama")
    reg = TorchEngine(model).vectors
    good = _vec(model.d_model, 1, 0).save(tmp_path / "good.safetensors")
    reg.register_bytes("ok", good.read_bytes())
    with pytest.raises(VectorFileError):
        reg.register_bytes("broken", good.read_bytes()[:-3])
    with pytest.raises(sl.VectorMismatchError, match="size"):
        reg.register("small", sl.SteeringVector({0: torch.ones(5)}))
    with pytest.raises(InvalidInputError, match="invalid vector name"):
        reg.register("../evil", _vec(model.d_model, 1, 0))
    (tmp_path / "sub").mkdir()
    _vec(model.d_model, 0, 2).save(tmp_path / "sub" / "calm.safetensors")
    assert reg.register_dir(tmp_path / "sub") == ["calm"]
    assert reg.names() == ["calm", "ok"]


def test_stop_matcher_holds_back_partial_matches() -> None:
    m = StopMatcher(("END",))
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("abc EN") == ("", False)
    assert m.feed("abc ENx") == ("ENx", False)
    assert m.feed("abc ENxEND more") == ("", True)
    assert m.emitted == "abc ENx"
    partial = StopMatcher()
    assert partial.feed("caf\ufffd") == ("caf", False)
    assert partial.feed("café") == ("é", False)


def test_operators_and_first_k_positions_equal_the_library(engine: TorchEngine) -> None:
    model = engine.model
    eos = model.tokenizer.eos_token_id
    for op, positions in (("clamp", "last"), ("add_norm", "first:2"), ("add", "first:3")):
        req = GenerationRequest(
            prompt="the cat sat",
            max_tokens=6,
            temperature=0.0,
            steering=(SteeringEntry("a", 3.0, positions, op=op),),
        )
        steering = sl.Steering(engine.vectors.get("a"), strength=3.0, positions=positions, op=op)
        expected = [
            int(i) for i in model.generate_ids(req.prompt, steering=steering, max_new_tokens=6)[0]
        ]
        assert _ids(list(engine.submit(req)), eos) == expected, (op, positions)


def _library(
    model: sl.SteeredModel, req: GenerationRequest, engine: TorchEngine, *, when: Any = None
) -> list[int]:
    """What ``model.generate`` gives for ``req`` (one steering entry at most)."""
    steering = None
    if req.steering:
        (entry,) = req.steering
        steering = sl.Steering(
            engine.vectors.get(entry.vector),
            strength=entry.strength,
            positions=entry.positions,
            op=None if entry.op == "add" else entry.op,
            when=when,
        )
    out = model.generate_ids(req.prompt, steering=steering, max_new_tokens=req.max_tokens)
    return [int(i) for i in out[0]]


def test_text_selected_positions_equal_the_library_as_rows_join_and_leave(
    engine: TorchEngine,
) -> None:
    model = engine.model
    eos = model.tokenizer.eos_token_id
    prompt = "the cat sat on the mat"
    plain = _library(model, GenerationRequest(prompt=prompt, max_tokens=24), engine)
    # markers taken from the unsteered continuation, so triggers fire while tokens stream
    trigger = f"after:@{plain[3]}"
    assert plain[3] not in plain[:3] and plain[3] not in model.encode([prompt]).input_ids[0]
    long = GenerationRequest(
        prompt=prompt,
        max_tokens=24,
        temperature=0.0,
        steering=(SteeringEntry("a", 8.0, trigger),),
    )
    joiners = [
        GenerationRequest(
            prompt=p,
            max_tokens=n,
            temperature=0.0,
            steering=(SteeringEntry(v, s, pos, op=op),) if v else (),
        )
        for p, n, v, s, pos, op in [
            ("a dog ran far", 10, "b", 6.0, f"between:@{plain[1]},@{plain[4]}", "add"),
            ("the cat sat on the mat", 8, "a", 5.0, f"outside:@{plain[0]},@{plain[2]}", "add"),
            ("my house is big", 12, "b", -6.0, "after:house", "add"),
            ("the sky", 6, "a", 1.0, "after: sky", "clamp"),
            ("i think the cat", 9, "a", 6.0, "first:3", "add"),
            ("hello world", 7, "", 0.0, "all", "add"),
        ]
    ]
    first = engine.submit(long)
    iterator = iter(first)
    got_long = [next(iterator) for _ in range(3)]
    streams = [engine.submit(r) for r in joiners]
    got = [list(s) for s in streams]
    got_long.extend(iterator)
    assert engine.max_rows_seen >= 4
    served = _ids(got_long, eos)
    assert served == _library(model, long, engine)
    # the trigger (generated token 3) switched steering on from there, not before
    assert served[:4] == plain[:4] and served != plain[: len(served)]
    for req, events in zip(joiners, got):
        assert _ids(events, eos) == _library(model, req, engine), req.steering
    steered = [_ids(e, eos) for r, e in zip(joiners, got) if r.steering]
    unsteered = [
        _library(model, GenerationRequest(prompt=r.prompt, max_tokens=r.max_tokens), engine)
        for r in joiners
        if r.steering
    ]
    assert sum(a != b for a, b in zip(steered, unsteered)) >= 3  # the specs selected something


def _gate(model: sl.SteeredModel, passing: list[str], failing: list[str]) -> sl.Condition:
    """A prompt-level condition at layer 1 that fires on ``passing`` and not on ``failing``."""
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(11))
    probe = sl.Condition(direction, layer=1, threshold=0.0)
    yes, no = probe.scores(model, passing), probe.scores(model, failing)
    if float(yes.min()) > float(no.max()):
        threshold, comparison = (float(yes.min()) + float(no.max())) / 2, "greater"
    else:
        assert float(yes.max()) < float(no.min()), "pick other prompts: the scores overlap"
        threshold, comparison = (float(yes.max()) + float(no.min())) / 2, "less"
    return sl.Condition(direction, layer=1, threshold=threshold, comparison=comparison)


def test_when_steers_exactly_the_rows_whose_prompt_satisfies_the_condition(
    engine: TorchEngine,
) -> None:
    model = engine.model
    eos = model.tokenizer.eos_token_id
    passing, failing = ["i think so", "we go to the park now"], ["the cat sat on the mat"]
    cond = _gate(model, passing, failing)
    assert cond.fires(model, passing + failing).tolist() == [True, True, False]
    engine.conditions.register("gate", cond)
    gated = SteeringEntry("a", 8.0, "all", when="gate")
    fail_alone = list(
        engine.submit(
            GenerationRequest(prompt=failing[0], max_tokens=12, temperature=0.0, logprobs=0)
        )
    )
    requests = [
        GenerationRequest(
            prompt=failing[0], max_tokens=12, temperature=0.0, logprobs=0, steering=(gated,)
        ),
        GenerationRequest(prompt=failing[0], max_tokens=12, temperature=0.0, logprobs=0),
        GenerationRequest(
            prompt=passing[0], max_tokens=14, temperature=0.0, logprobs=0, steering=(gated,)
        ),
        GenerationRequest(
            prompt=passing[1],
            max_tokens=9,
            temperature=0.0,
            logprobs=0,
            steering=(gated, SteeringEntry("b", -3.0, "after:park")),
        ),
        GenerationRequest(
            prompt="a dog ran",
            max_tokens=10,
            temperature=0.0,
            logprobs=0,
            steering=(SteeringEntry("b", 5.0, "last"),),
        ),
    ]

    def one_step(batch: list[GenerationRequest]) -> list[list[Any]]:
        with engine._cond:  # hold the worker back: all five are admitted at the same step
            streams = [engine.submit(r) for r in batch]
        return [list(s) for s in streams]

    out = one_step(requests)
    assert engine.max_rows_seen == 5
    # the failing row is computed exactly as if it had asked for no steering, in the same row
    # of the same batch (a multi-threaded matmul may round identical rows at other row indices
    # differently, so the control keeps the row where it was) ...
    control = one_step([dataclasses.replace(requests[0], steering=()), *requests[1:]])
    assert [(e.token_id, e.logprob) for e in out[0]] == [
        (e.token_id, e.logprob) for e in control[0]
    ]
    assert [e.token_id for e in out[0]] == [e.token_id for e in out[1]]
    # ... and as the request served alone (token for token; float32 sums over a batch
    # round like any batched request's do)
    assert [e.token_id for e in out[0]] == [e.token_id for e in fail_alone]
    for a, b in zip(out[0], fail_alone):
        assert a.logprob is not None and b.logprob is not None
        assert abs(a.logprob - b.logprob) < 1e-4
    # passing rows are steered as model.generate(..., when=cond) steers them
    lib = _library(model, requests[2], engine, when=cond)
    assert _ids(out[2], eos) == lib
    assert lib != _library(model, dataclasses.replace(requests[2], steering=()), engine)
    with model.steer(engine.vectors.get("a"), strength=8.0, when=cond):
        expected = model.generate_ids(
            passing[1],
            steering=sl.Steering(engine.vectors.get("b"), strength=-3.0, positions="after:park"),
            max_new_tokens=9,
        )
    assert _ids(out[3], eos) == [int(i) for i in expected[0]]
    assert _ids(out[4], eos) == _library(model, requests[4], engine)


def test_a_per_token_condition_gates_each_token_as_the_library_does(engine: TorchEngine) -> None:
    model = engine.model
    eos = model.tokenizer.eos_token_id
    prompt = "the cat sat on the mat"
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(11))
    acts = model.activations([prompt], layers=[1], positions="all")[1][0]
    scores = condition_score(acts, direction)
    cond = sl.Condition(direction, layer=1, threshold=float(scores.median())).per_token()
    engine.conditions.register("tokens", cond)
    req = GenerationRequest(
        prompt=prompt,
        max_tokens=12,
        temperature=0.0,
        steering=(SteeringEntry("b", 8.0, "all", when="tokens"),),
    )
    other = GenerationRequest(
        prompt="a dog", max_tokens=12, temperature=0.0, steering=(SteeringEntry("b", 8.0, "all"),)
    )
    streams = [engine.submit(req), engine.submit(other)]
    served, served_other = (_ids(list(s), eos) for s in streams)
    assert served == _library(model, req, engine, when=cond)
    assert served_other == _library(model, other, engine)
    ungated = _library(model, dataclasses.replace(req, steering=(SteeringEntry("b", 8.0),)), engine)
    unsteered = _library(model, dataclasses.replace(req, steering=()), engine)
    assert served != ungated and served != unsteered  # the gate let some tokens through


def test_conditions_are_validated_before_queueing(engine: TorchEngine, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="unknown condition 'nope'; registered: none"):
        engine.submit(GenerationRequest(prompt="a", steering=(SteeringEntry("a", when="nope"),)))
    high = sl.Condition(torch.ones(engine.model.d_model), layer=2, threshold=0.1)
    engine.conditions.register("high", high)
    with pytest.raises(InvalidInputError, match="below it"):  # vector "a" steers layer 1
        engine.submit(GenerationRequest(prompt="a", steering=(SteeringEntry("a", when="high"),)))
    with pytest.raises(sl.VectorMismatchError, match="size"):
        engine.conditions.register("small", sl.Condition(torch.ones(5), layer=0, threshold=0.0))
    file = high.save(tmp_path / "saved.safetensors")
    assert engine.conditions.register_dir(tmp_path) == ["saved"]
    with pytest.raises(VectorFileError, match=r"truncated \(tensor data needs"):
        engine.conditions.register_bytes("broken", file.read_bytes()[:-3])
    with pytest.raises(InvalidInputError, match="invalid condition name"):
        engine.conditions.register("../x", high)
    assert engine.conditions.names() == ["high", "saved"]
    assert engine.max_rows_seen == 0


def test_prompts_waiting_together_are_read_in_one_forward_pass() -> None:
    """Prompts queued at once are prefilled as one left-padded batch (one forward pass, as
    ``generate_ids`` reads its batch), and each still equals the library run alone."""
    model = tiny_model("llama")
    eng = TorchEngine(model, max_batch=8)
    eng.vectors.register("a", _vec(model.d_model, 1, 0))
    eng.vectors.register("b", _vec(model.d_model, 2, 1))
    prompts = ["the cat sat on", "a dog ran", "my house is very", "hello world", "i think so"]
    specs = [(), (SteeringEntry("a", 6.0, "all"),), (SteeringEntry("b", -5.0, "last"),)]
    requests = [
        GenerationRequest(
            prompt=p, max_tokens=5, temperature=0.0, steering=specs[i % 3], logprobs=0
        )
        for i, p in enumerate(prompts)
    ]
    eng.start()
    try:
        # the worker cannot take the queue while the test holds its lock (re-entrant here)
        with eng._cond:
            streams = [eng.submit(r) for r in requests]
        results = [list(s) for s in streams]
    finally:
        eng.shutdown()
    eos = model.tokenizer.eos_token_id
    for req, events in zip(requests, results):
        assert _ids(events, eos) == _reference(model, req, eng.vectors), req
    # one prefill pass for all five prompts, then one pass per decoding step
    assert eng.forwards == 1 + eng.steps
    assert eng.steps == max(len(events) for events in results) - 1
    assert eng.max_rows_seen == len(prompts)


def test_a_burst_of_short_prompts_joins_running_streams_in_one_pass(engine: TorchEngine) -> None:
    """While a stream decodes, prompts arriving together are still read whole and together:
    the burst costs one forward pass (not one per prompt, nor pieces cut to a decoding
    step's time), and every request equals the library."""
    model = engine.model
    eos = model.tokenizer.eos_token_id
    running = GenerationRequest(prompt="the cat sat", max_tokens=40, temperature=0.0)
    stream = iter(engine.submit(running))
    got_running = [next(stream) for _ in range(3)]
    burst = [
        GenerationRequest(prompt=p, max_tokens=3, temperature=0.0, steering=s)
        for p, s in (
            ("a dog ran to the house and sat", ()),
            ("my house is very good i think", (SteeringEntry("a", 6.0, "all"),)),
            ("hello world the cat sat on the", (SteeringEntry("b", -5.0, "last"),)),
            ("i think so the movie was good", ()),
        )
    ]
    with engine._cond:  # queued together: the worker admits them in one iteration
        streams = [engine.submit(r) for r in burst]
    results = [list(s) for s in streams]
    got_running.extend(stream)
    # every forward pass is a decoding step or a prompt read: two reads in all
    assert engine.forwards - engine.steps == 2
    for req, events in [(running, got_running), *zip(burst, results)]:
        assert _ids(events, eos) == _reference(model, req, engine.vectors), req
