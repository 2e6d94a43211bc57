"""The last-position fast path: re-running only the last token over the clean key/value cache
gives the full recomputation's numbers on every tiny architecture."""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.errors import InvalidInputError
from steerlab.evaluation import concept_task, kl_task
from steerlab.sweeps import compare, steers_last_only, sweep
from steerlab.testing import TINY_ARCHITECTURES, hook_count, tiny_model

PROMPTS = ["the movie was", "i think the food is very", "a dog", "my house was so"]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_run_last_equals_full_recomputation(arch: str) -> None:
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(1)
    cache = model.last_token_cache(PROMPTS)
    assert cache.exact
    torch.testing.assert_close(cache.logits, model.next_token_logits(PROMPTS), atol=1e-5, rtol=0)
    vec = sl.SteeringVector({1: torch.randn(model.d_model, generator=gen)})
    strengths = [3.0, -2.0, 0.5]
    rows = [sl.Steering(vec, s, "last") for s in strengths for _ in PROMPTS]
    fast = model.run_last(cache, repeat=len(strengths), steering=rows)
    full = model.next_token_logits(PROMPTS * len(strengths), steering=rows)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)
    assert (fast[: len(PROMPTS)] - cache.logits).abs().max() > 1e-3  # steering did act
    # the cache is not consumed: a second call gives the same numbers
    torch.testing.assert_close(
        model.run_last(cache, repeat=len(strengths), steering=rows), fast, atol=0, rtol=0
    )
    assert hook_count(model.hf_model) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_sweep_last_mode_equals_naive(arch: str) -> None:
    model = tiny_model(arch)
    vector = sl.mean_diff(model, ["i love it", "so happy today"], ["i hate it", "so sad"])
    behaviour = concept_task(
        model, PROMPTS[:3], target_words=[" good", " great"], contrast_words=[" bad"]
    )
    damage = kl_task(["the weather today is", "a dog"])
    results = {
        mode: sweep(
            model,
            vector,
            behaviour=behaviour,
            damage=damage,
            layers=[0, 2, 1],
            strengths=[-4.0, 2.0, 8.0],
            positions="last",
            mode=mode,
            max_rows=10,
            progress=False,
        )
        for mode in ("naive", "prefix")
    }
    fast = results["prefix"]
    assert fast.mode == "last"  # prefix upgrades itself for last-position configurations
    torch.testing.assert_close(
        fast.behaviour_scores, results["naive"].behaviour_scores, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        fast.damage_scores, results["naive"].damage_scores, atol=1e-5, rtol=0
    )
    assert fast.damage_scores[:, fast.strengths.index(8.0)].min() > 0


def test_index_minus_one_is_last_and_compare_uses_the_fast_path() -> None:
    model = tiny_model("llama")
    vec = sl.SteeringVector({1: torch.randn(model.d_model, generator=torch.Generator())})
    assert steers_last_only(sl.Steering(vec, 1.0, [-1]))
    assert not steers_last_only(sl.Steering(vec, 1.0, [-2]))
    assert not steers_last_only(sl.Steering(vec, 1.0, "prompt"))
    behaviour = kl_task(PROMPTS)
    fast = compare(model, {"a": vec, "none": None}, behaviour=behaviour, positions=-1, strength=4)
    slow = compare(
        model, {"a": vec, "none": None}, behaviour=behaviour, positions=-1, strength=4,
        mode="naive",
    )  # fmt: skip
    assert fast["a"].behaviour == pytest.approx(slow["a"].behaviour, abs=1e-6)
    assert fast["none"].behaviour == 0.0


def test_last_mode_refuses_other_positions() -> None:
    model = tiny_model("llama")
    vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    with pytest.raises(InvalidInputError, match="positions='last'"):
        sweep(model, vec, behaviour=kl_task(PROMPTS), positions="all", mode="last")


def test_capture_and_last_ids_match_ordinary_calls() -> None:
    model = tiny_model("qwen2")
    prompts = ["the food is good ( one", "my day was ( one"]
    swapped = ["the food is good ( two", "my day was ( two"]
    cache = model.last_token_cache(prompts)
    two = model.tokenizer.convert_tokens_to_ids("two")
    logits, acts = model.run_last_with_activations(cache, layers=[0, 2], last_ids=[two, two])
    torch.testing.assert_close(logits, model.next_token_logits(swapped), atol=1e-5, rtol=0)
    reference = model.activations(swapped, layers=[0, 2], positions="last")
    for layer in (0, 2):
        torch.testing.assert_close(acts[layer], reference[layer].float(), atol=1e-5, rtol=0)
    with pytest.raises(InvalidInputError, match="last_ids"):
        model.run_last(cache, last_ids=[two])


def test_one_token_prompts_fall_back() -> None:
    model = tiny_model("llama")
    cache = model.last_token_cache(["cat", "the dog ran"])
    assert not cache.exact  # a one-token prompt has no prefix to cache
    vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    with pytest.warns(UserWarning, match="key/value cache"):
        result = sweep(
            model, vec, behaviour=kl_task(["cat", "the dog ran"]), strengths=[2.0],
            positions="last", progress=False,
        )  # fmt: skip
    naive = sweep(
        model, vec, behaviour=kl_task(["cat", "the dog ran"]), strengths=[2.0],
        positions="last", mode="naive", progress=False,
    )  # fmt: skip
    torch.testing.assert_close(result.behaviour_scores, naive.behaviour_scores, atol=1e-6, rtol=0)
