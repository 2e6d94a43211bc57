"""Batched equals unbatched (left and right padding); KV-cache generation equals recomputation."""

from __future__ import annotations

import pytest
import torch

import steerlab as sl

PROMPTS = ["the cat sat on the", "a dog", "i love the movie so much , it was"]


@pytest.mark.parametrize("reduction", ["last", "mean", "all"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_activations_batched_equal_one_at_a_time(
    arch_model: sl.SteeredModel, reduction: str, padding_side: str
) -> None:
    batched = arch_model.activations(
        PROMPTS, layers=[0, -1], positions=reduction, padding_side=padding_side
    )
    for i, prompt in enumerate(PROMPTS):
        alone = arch_model.activations([prompt], layers=[0, -1], positions=reduction)
        for layer in (0, -1):
            got = batched[layer][i]
            want = alone[layer][0]
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-5), (layer, i, (got - want).abs().max())


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_batched_equal_one_at_a_time(arch_model: sl.SteeredModel, padding_side: str) -> None:
    batched = arch_model.logits(PROMPTS, padding_side=padding_side)
    for i, prompt in enumerate(PROMPTS):
        alone = arch_model.logits([prompt])[0]
        real = batched[i][
            arch_model.encode(PROMPTS, padding_side=padding_side).attention_mask[i].bool()
        ]
        assert torch.allclose(real, alone, atol=1e-5)


def test_left_padded_last_column_is_last_token(llama: sl.SteeredModel) -> None:
    batched = llama.logits(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert torch.allclose(batched[i, -1], llama.logits([prompt])[0, -1], atol=1e-5)


def test_greedy_generation_batched_equals_unbatched(arch_model: sl.SteeredModel) -> None:
    vec = sl.SteeringVector(
        {1: torch.randn(arch_model.d_model, generator=torch.Generator().manual_seed(0))}
    )
    batched = arch_model.generate_ids(PROMPTS, max_new_tokens=8, steering=vec, positions="last")
    for i, prompt in enumerate(PROMPTS):
        alone = arch_model.generate_ids([prompt], max_new_tokens=8, steering=vec, positions="last")[
            0
        ]
        assert torch.equal(batched[i], alone), (i, batched[i], alone)


@pytest.mark.parametrize(
    "positions", ["all", "last", "prompt", "generated", [1, 6], slice(2, None, 2), -2]
)
def test_kv_cache_generation_equals_full_recomputation(
    arch_model: sl.SteeredModel, positions: object
) -> None:
    """The proof that positions are defined over the absolute sequence, not per forward call."""
    gen = torch.Generator().manual_seed(5)
    vec = sl.SteeringVector({1: 3.0 * torch.randn(arch_model.d_model, generator=gen)})
    kwargs = dict(max_new_tokens=8, steering=vec, positions=positions)
    cached = arch_model.generate_ids(PROMPTS, use_cache=True, **kwargs)  # type: ignore[arg-type]
    recomputed = arch_model.generate_ids(PROMPTS, use_cache=False, **kwargs)  # type: ignore[arg-type]
    assert [c.tolist() for c in cached] == [r.tolist() for r in recomputed]


def test_manual_recompute_loop_matches_position_semantics(llama: sl.SteeredModel) -> None:
    """Independent reference: an explicit greedy loop, whole sequence each step, hook adding the
    vector where the docs' table says, must equal steered generation with the KV cache."""
    vec_t = 4.0 * torch.randn(llama.d_model, generator=torch.Generator().manual_seed(7))
    vec = sl.SteeringVector({1: vec_t})
    prompt = "i love the movie so"
    ids = llama.encode([prompt]).input_ids
    prompt_len = ids.shape[1]
    block = llama.adapter.block(1)

    def add_generated_only(module: torch.nn.Module, args: tuple, output: torch.Tensor):
        out = output.clone()
        out[:, prompt_len:] += vec_t
        return out

    handle = block.register_forward_hook(add_generated_only)
    try:
        for _ in range(6):
            logits = llama.hf_model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        handle.remove()
    ours = llama.generate_ids([prompt], max_new_tokens=6, steering=vec, positions="generated")
    eos = llama.tokenizer.eos_token_id
    reference = ids[0, prompt_len:]
    stop = (reference == eos).nonzero()
    reference = reference[: int(stop[0, 0])] if len(stop) else reference
    assert ours[0].tolist() == reference.tolist()


def test_sampling_is_seeded_and_leaves_global_rng_alone(llama: sl.SteeredModel) -> None:
    state = torch.random.get_rng_state()
    a = llama.generate(PROMPTS, max_new_tokens=6, do_sample=True, temperature=1.5, seed=11)
    b = llama.generate(PROMPTS, max_new_tokens=6, do_sample=True, temperature=1.5, seed=11)
    assert a == b
    assert torch.equal(torch.random.get_rng_state(), state)


def test_chat_template_is_applied(llama: sl.SteeredModel) -> None:
    text = llama.format_chat("the cat")
    assert text == "<s> user : the cat </s> <s> answer : "
    batch = llama.encode(["the cat"], chat=True)
    assert (
        batch.input_ids[0].tolist() == llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    )
