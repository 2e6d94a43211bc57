"""Parity with the seed: nnsight running the seed's own recipes on the same tiny GPT-2.

nnsight replaces every submodule's ``forward`` when it wraps a model, so it gets its own deep
copy; steerlab runs on the untouched original. The recipes (adapted to nnsight 0.8.1 /
transformers 5, see ``tests/_nnsight_recipes.py``) use the seed's prompts and layer choices.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.testing import tiny_hf_model, tiny_tokenizer

recipes = pytest.importorskip("_nnsight_recipes")

# The seed's contrastive prompts, restricted to the tiny vocabulary (same shape and sentiment).
POSITIVE = ["i love this ! it ' s fantastic", "this is wonderful and amazing", "i ' m so happy"]
NEGATIVE = ["i hate this ! it ' s terrible", "this is awful and horrible", "i ' m so sad"]
LAYER = 1


@pytest.fixture(scope="module")
def pair() -> tuple[sl.SteeredModel, Any]:
    hf = tiny_hf_model("gpt2")
    tokenizer = tiny_tokenizer()
    ours = sl.wrap(hf, tokenizer)
    theirs = recipes.wrap(copy.deepcopy(hf).eval(), copy.deepcopy(tokenizer))
    return ours, theirs


def _vector(d_model: int) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(0))


def test_basic_intervention(pair: tuple[sl.SteeredModel, Any]) -> None:
    ours, theirs = pair
    v = _vector(ours.d_model)
    expected = recipes.basic_intervention(theirs, "i think the movie was", LAYER, v)
    got = ours.logits(
        ["i think the movie was"], steering=sl.SteeringVector({LAYER: v}), positions="last"
    )
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, ours.logits(["i think the movie was"]), atol=1e-3)


def test_contrastive_mean_difference(pair: tuple[sl.SteeredModel, Any]) -> None:
    ours, theirs = pair
    expected = recipes.mean_diff_vector(theirs, POSITIVE, NEGATIVE, LAYER)
    got = sl.mean_diff(ours, POSITIVE, NEGATIVE, layers=[LAYER])[LAYER]
    assert torch.allclose(got, expected, atol=1e-5)


def test_apply_vector_in_one_pass(pair: tuple[sl.SteeredModel, Any]) -> None:
    ours, theirs = pair
    vec = sl.mean_diff(ours, POSITIVE, NEGATIVE, layers=[LAYER])
    expected = recipes.apply_all_positions(theirs, "the weather today is", LAYER, vec[LAYER], 1.5)
    with ours.steer(vec, strength=1.5, positions="all"):
        got = ours.logits(["the weather today is"])
    assert torch.allclose(got, expected, atol=1e-5)


def test_multi_layer_generation_at_every_step(pair: tuple[sl.SteeredModel, Any]) -> None:
    ours, theirs = pair
    v = 2.0 * _vector(ours.d_model)
    weights = {0: 0.5, 1: 1.0, 2: 1.5}  # the seed's {6: .5, 8: 1, 10: 1.5, 12: 1} on 3 layers
    expected = recipes.generate_steered_last(theirs, "the weather today is", weights, v, 8)
    vec = sl.SteeringVector.from_tensor(v, layers=[0])
    prompt_len = ours.encode(["the weather today is"]).input_ids.shape[1]
    got = ours.generate_ids(
        ["the weather today is"],
        max_new_tokens=8,
        steering=sl.Steering(vec, strength=weights, positions="last"),
    )[0]
    theirs_new = expected[0, prompt_len:].tolist()
    assert got.tolist() == theirs_new[: len(got)]
    if len(got) < 8:  # steerlab stops at EOS; nnsight's ids then hold the EOS itself
        assert theirs_new[len(got)] == ours.tokenizer.eos_token_id
