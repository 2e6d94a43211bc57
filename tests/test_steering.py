"""Exact algebra of steering on every supported architecture, and hook hygiene."""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.interventions import HookSpec, Intervention, PositionTracker
from steerlab.testing import hook_count

PROMPTS = ["the cat sat on the", "a dog", "i love the movie so much"]


def _vector(model: sl.SteeredModel, layer: int, seed: int = 1) -> sl.SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return sl.SteeringVector({layer: torch.randn(model.d_model, generator=gen)})


def _all_hidden(model: sl.SteeredModel, layer: int) -> list[torch.Tensor]:
    return model.activations(PROMPTS, layers=[layer], positions="all")[layer]


@pytest.mark.parametrize("positions", ["all", "last", "prompt", [0, -1], slice(1, 3)])
def test_steered_minus_unsteered_is_exactly_the_vector(
    arch_model: sl.SteeredModel, positions: object
) -> None:
    layer, strength = 1, 2.5
    vec = _vector(arch_model, layer)
    base = _all_hidden(arch_model, layer)
    with arch_model.steer(vec, strength=strength, positions=positions):  # type: ignore[arg-type]
        steered = _all_hidden(arch_model, layer)
    delta = (vec[layer] * strength).to(torch.float32)
    for row, (b, s) in enumerate(zip(base, steered)):
        length = b.shape[0]
        chosen = sl.Positions.parse(positions).mask(  # type: ignore[arg-type]
            torch.arange(length)[None], torch.tensor([length])
        )[0]
        assert chosen.any(), "test must select something"
        assert torch.equal(s[chosen], b[chosen] + delta), f"row {row}: not exactly b + s*v"
        assert torch.equal(s[~chosen], b[~chosen]), f"row {row}: changed unselected positions"


def test_other_layers_below_are_untouched_and_above_change(arch_model: sl.SteeredModel) -> None:
    vec = _vector(arch_model, 1)
    base = arch_model.activations(PROMPTS, layers=[0, 2])
    with arch_model.steer(vec, strength=3.0):
        steered = arch_model.activations(PROMPTS, layers=[0, 2])
    assert torch.equal(base[0], steered[0])
    assert not torch.allclose(base[2], steered[2])


def test_logits_bit_identical_after_exit_and_no_hooks_left(arch_model: sl.SteeredModel) -> None:
    before = arch_model.logits(PROMPTS)
    hooks_before = hook_count(arch_model.hf_model)
    with arch_model.steer(_vector(arch_model, 2), strength=4.0):
        assert hook_count(arch_model.hf_model) > hooks_before
        assert not torch.equal(arch_model.logits(PROMPTS), before)
    assert hook_count(arch_model.hf_model) == hooks_before
    assert torch.equal(arch_model.logits(PROMPTS), before)


def test_exception_inside_with_removes_hooks(arch_model: sl.SteeredModel) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with arch_model.steer(_vector(arch_model, 0), strength=1.0):
            raise RuntimeError("boom")
    assert hook_count(arch_model.hf_model) == 0


class _FailsHalfWay(Intervention):
    """Two valid hooks, then a module that refuses registration."""

    def hooks(self, adapter: sl.ModelAdapter, tracker: PositionTracker) -> list[HookSpec]:
        class Refuses(torch.nn.Module):
            def register_forward_hook(self, *a: object, **k: object) -> object:
                raise RuntimeError("cannot register here")

        noop = lambda *a: None  # noqa: E731
        return [
            HookSpec(adapter.block(0), "forward", noop),
            HookSpec(adapter.block(1), "forward", noop),
            HookSpec(Refuses(), "forward", noop),
        ]


def test_failed_installation_cleans_up(arch_model: sl.SteeredModel) -> None:
    with pytest.raises(RuntimeError, match="cannot register"):
        with arch_model.steer(_FailsHalfWay()):
            pass  # pragma: no cover
    assert hook_count(arch_model.hf_model) == 0


def test_removing_only_own_hooks(llama: sl.SteeredModel) -> None:
    calls: list[int] = []
    foreign = llama.adapter.block(1).register_forward_hook(lambda *a: calls.append(1))
    try:
        with llama.steer(_vector(llama, 1)):
            llama.logits(["the cat"])
        llama.logits(["the cat"])
        assert len(calls) == 2, "the user's own hook must survive steerlab's cleanup"
    finally:
        foreign.remove()


def test_multi_layer_strengths_match_sum_of_single_layers(llama: sl.SteeredModel) -> None:
    direction = torch.randn(llama.d_model, generator=torch.Generator().manual_seed(3))
    vec = sl.SteeringVector.from_tensor(direction, layers=[0])
    weights = {0: 0.5, 1: 1.0, 2: 1.5}
    base = llama.activations(PROMPTS, layers=[0, 1, 2], positions="all")
    with llama.steer(vec, strength=weights):
        hooked = llama.activations(PROMPTS, layers=[0], positions="all")
    for b, s in zip(base[0], hooked[0]):
        assert torch.equal(s, b + direction * 0.5)
    # the per-layer form with an explicit multi-layer vector gives the same logits
    multi = sl.SteeringVector({k: direction * v for k, v in weights.items()})
    a = llama.logits(PROMPTS, steering=sl.Steering(vec, strength=weights))
    b = llama.logits(PROMPTS, steering=multi)
    assert torch.allclose(a, b, atol=1e-6)


def test_per_row_steering_equals_one_at_a_time(arch_model: sl.SteeredModel) -> None:
    vec = _vector(arch_model, 1)
    rows = [vec.scaled(0.5), None, vec.scaled(2.0)]
    batched = arch_model.logits(PROMPTS, steering=rows)
    for i, (prompt, row) in enumerate(zip(PROMPTS, rows)):
        alone = arch_model.logits([prompt], steering=row)[0, -1]
        assert torch.allclose(batched[i, -1], alone, atol=1e-5)


def test_compose_in_installation_order(llama: sl.SteeredModel) -> None:
    a, b = _vector(llama, 1, seed=1), _vector(llama, 1, seed=2)
    base = llama.activations(PROMPTS, layers=[1], positions="last")[1]
    with llama.steer(a, strength=1.0), llama.steer(b, strength=2.0):
        both = llama.activations(PROMPTS, layers=[1], positions="last")[1]
    expected = (base + a[1]) + 2.0 * b[1]
    assert torch.equal(both, expected)


def test_caller_objects_not_mutated(llama: sl.SteeredModel) -> None:
    vec = _vector(llama, 1)
    saved = vec[1].clone()
    state = {k: v.clone() for k, v in llama.hf_model.state_dict().items()}
    padding_side = llama.tokenizer.padding_side
    with llama.steer(vec, strength=5.0):
        llama.generate(PROMPTS, max_new_tokens=3)
    assert torch.equal(vec[1], saved)
    assert llama.tokenizer.padding_side == padding_side
    for key, value in llama.hf_model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_add_steering_handle_is_idempotent(llama: sl.SteeredModel) -> None:
    handle = llama.add_steering(_vector(llama, 0))
    assert handle.active
    handle.remove()
    handle.remove()
    assert not handle.active and hook_count(llama.hf_model) == 0


def test_interventions_follow_block_dtype(llama: sl.SteeredModel) -> None:
    """The placement logic a model split across devices relies on: each block's delta is moved
    to the device and dtype of the hidden state it is added to (here block 2 runs in bfloat16,
    as if it lived on another device with another dtype)."""
    import copy

    mixed = copy.deepcopy(llama.hf_model)
    block = mixed.model.layers[2]
    block.to(torch.bfloat16)

    def cast(value: object) -> object:
        if torch.is_tensor(value) and value.is_floating_point():
            return value.to(torch.bfloat16)
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value

    def to_bf16(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    handles = [block.register_forward_pre_hook(to_bf16, with_kwargs=True)]
    model = sl.wrap(mixed, llama.tokenizer)
    vec = sl.SteeringVector({1: torch.ones(llama.d_model), 2: torch.ones(llama.d_model)})
    seen: list[torch.dtype] = []
    try:
        with model.steer(vec, strength=1.0):
            # registered after the steering hook, so it sees the steered output
            handles.append(block.register_forward_hook(lambda m, a, o: seen.append(o.dtype)))
            handles.append(block.register_forward_hook(lambda m, a, o: o.float()))
            logits = model.logits(["the cat"])
        assert seen == [torch.bfloat16], "a float32 delta would have promoted the output"
        assert torch.isfinite(logits).all()
    finally:
        for handle in handles:
            handle.remove()
