"""One model, many threads: every call gets exactly its single-threaded result.

Per-call ``steering=`` and ``with model.steer(...)`` are scoped to the calling thread (a
``ContextVar`` read by dispatcher hooks installed once per site), so concurrent calls with
different steering, positions and batch sizes never see each other. ``add_steering`` is the one
documented exception: it steers every thread.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.testing import hook_count, tiny_model

PROMPTS = ["the cat sat on the", "a dog", "i love the movie so much", "the weather today is"]
POSITIONS: list[Any] = ["all", "last", "prompt", "generated", [0, -1], slice(1, 3)]


def _vector(model: sl.SteeredModel, layers: list[int], seed: int) -> sl.SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return sl.SteeringVector({layer: torch.randn(model.d_model, generator=gen) for layer in layers})


def _make_calls(model: sl.SteeredModel, seed: int, n: int) -> list[Callable[[], Any]]:
    """``n`` calls with mixed kinds, steering, positions and batch sizes (deterministic)."""
    rng = random.Random(seed)
    calls: list[Callable[[], Any]] = []
    for i in range(n):
        prompts = rng.sample(PROMPTS, rng.randint(1, 3))
        choice = rng.randrange(4)
        steering: Any = None
        if choice == 1:
            steering = _vector(model, [rng.randrange(model.n_layers)], seed * 100 + i)
        elif choice == 2:
            steering = _vector(model, [0, model.n_layers - 1], seed * 100 + i).scaled(2.0)
        elif choice == 3:  # one vector (or none) per row, in one batch
            steering = [
                None if rng.random() < 0.3 else _vector(model, [1], seed * 1000 + i * 10 + j)
                for j in range(len(prompts))
            ]
        positions = rng.choice(POSITIONS)
        strength = rng.choice([0.5, 2.0, -3.0]) if choice in (1, 2) else None
        kind = rng.randrange(4)
        if kind == 0:
            calls.append(
                lambda p=prompts, s=steering, q=positions, k=strength: model.generate(
                    p, steering=s, positions=q, strength=k, max_new_tokens=4
                )
            )
        elif kind == 1:
            calls.append(
                lambda p=prompts, s=steering, q=positions, k=strength: model.logits(
                    p, steering=s, positions=q, strength=k
                )
            )
        elif kind == 2:
            calls.append(
                lambda p=prompts, s=steering, q=positions, k=strength: model.next_token_logits(
                    p, steering=s, positions=q, strength=k
                )
            )
        else:
            calls.append(
                lambda p=prompts, s=steering, k=strength: model.activations(
                    p, layers=[0, -1], positions="mean", steering=s, strength=k
                )
            )
    return calls


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _run_threads(workers: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(len(workers))

    def wrap(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                start.wait()
                work()
            except BaseException as error:  # surfaced in the main thread below
                errors.append(error)

        return run

    threads = [threading.Thread(target=wrap(w)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_four_threads_mixed_steering_equal_their_solo_results(arch: str) -> None:
    model = tiny_model(arch)
    per_thread = [_make_calls(model, seed, 20) for seed in range(4)]
    solo = [[call() for call in calls] for calls in per_thread]
    got: list[list[Any]] = [[] for _ in per_thread]

    def worker(index: int) -> Callable[[], None]:
        def work() -> None:
            for call in per_thread[index]:
                got[index].append(call())

        return work

    _run_threads([worker(i) for i in range(4)])
    for index, (expected, actual) in enumerate(zip(solo, got)):
        assert len(actual) == len(expected)
        for call_no, (e, a) in enumerate(zip(expected, actual)):
            assert _same(e, a), f"thread {index} call {call_no} differs from its solo result"
    assert hook_count(model.hf_model) == 0


def test_steer_block_is_scoped_to_its_thread() -> None:
    model = tiny_model("llama")
    vec = _vector(model, [1], 7)
    plain = model.logits(PROMPTS)
    with model.steer(vec, strength=3.0):
        steered = model.logits(PROMPTS)
    assert not torch.equal(plain, steered)

    inside = threading.Event()
    done = threading.Event()
    seen: dict[str, Any] = {}

    def steering_thread() -> None:
        with model.steer(vec, strength=3.0):
            inside.set()
            done.wait(timeout=60)  # stay inside while the other thread runs
            seen["steered"] = model.logits(PROMPTS)

    def plain_thread() -> None:
        inside.wait(timeout=60)
        seen["plain"] = [model.logits(PROMPTS) for _ in range(3)]
        seen["hooks_seen_here"] = hook_count(model.hf_model)
        done.set()

    _run_threads([steering_thread, plain_thread])
    assert all(torch.equal(x, plain) for x in seen["plain"])
    assert torch.equal(seen["steered"], steered)
    assert seen["hooks_seen_here"] == 0  # the other thread's steering is not visible here


def test_add_steering_is_seen_by_every_thread() -> None:
    model = tiny_model("llama")
    vec = _vector(model, [1], 3)
    with model.steer(vec, strength=2.0):
        expected = model.logits(PROMPTS)
    handle = model.add_steering(vec, strength=2.0)
    try:
        seen: list[torch.Tensor] = []
        _run_threads([lambda: seen.append(model.logits(PROMPTS))])
    finally:
        handle.remove()
    assert torch.equal(seen[0], expected)
    assert hook_count(model.hf_model) == 0


def test_edited_model_steer_is_scoped_to_its_thread() -> None:
    model = tiny_model("gpt2")
    edited = model.edit(_vector(model, [0], 5), strength=1.5)
    vec = _vector(model, [1], 6)
    edited_only = edited.logits(PROMPTS)
    with edited.steer(vec, strength=2.0):
        both = edited.logits(PROMPTS)
    assert not torch.equal(edited_only, both)
    seen: dict[str, torch.Tensor] = {}
    inside = threading.Event()
    done = threading.Event()

    def steering_thread() -> None:
        with edited.steer(vec, strength=2.0):
            inside.set()
            done.wait(timeout=60)
            seen["both"] = edited.logits(PROMPTS)

    def plain_thread() -> None:
        inside.wait(timeout=60)
        seen["edited_only"] = edited.logits(PROMPTS)
        done.set()

    _run_threads([steering_thread, plain_thread])
    assert torch.equal(seen["edited_only"], edited_only)
    assert torch.equal(seen["both"], both)
