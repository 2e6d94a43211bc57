"""The 2025-26 families (issue 22): where their sites are, and what wrap says when lost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import steerlab as sl
from steerlab.errors import UnsupportedModelError
from steerlab.testing import MOE_ARCHITECTURES, TINY_ARCHITECTURES, tiny_hf_model, tiny_model

NEW = ("qwen3", "qwen3_moe", "mixtral", "olmo2", "olmoe", "granite", "smollm3", "gpt_oss", "gemma3")


def test_every_family_of_issue_22_this_transformers_has_is_in_the_matrix() -> None:
    import transformers

    classes = {"qwen3": "Qwen3Config", "olmo2": "Olmo2Config", "gpt_oss": "GptOssConfig"}
    for name in NEW:
        if hasattr(transformers, classes.get(name, "PretrainedConfig")):
            assert name in TINY_ARCHITECTURES, name
    assert set(MOE_ARCHITECTURES) <= {"qwen3_moe", "mixtral", "olmoe", "gpt_oss"}


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_moe_router_is_found_with_one_logit_per_expert(arch: str) -> None:
    model = tiny_model(arch)
    adapter = model.adapter
    assert adapter.n_experts == 4
    for layer in range(model.n_layers):
        weight = adapter.router(layer).weight
        assert tuple(weight.shape) == (4, model.d_model)


def test_dense_model_has_no_router_and_says_so() -> None:
    with pytest.raises(UnsupportedModelError, match="not a mixture-of-experts"):
        tiny_model("qwen3").adapter.router(0)


def test_gemma3_multimodal_steers_its_text_tower() -> None:
    model = tiny_model("gemma3")
    text = model.hf_model.model.language_model
    assert model.adapter.blocks is text.layers
    assert (model.n_layers, model.d_model) == (3, 32)
    vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    base = model.activations(["the cat sat"], layers=[1], positions="all")[1][0]
    steered = model.activations(["the cat sat"], layers=[1], positions="all", steering=vec)[1][0]
    torch.testing.assert_close(steered - base, torch.ones_like(base), atol=1e-5, rtol=0)


def test_wrap_of_an_unknown_moe_names_the_router_it_could_not_find() -> None:
    hf = tiny_hf_model("mixtral")
    hf.config.model_type = "mystery_moe"  # not registered: blocks are auto-detected
    for block in hf.model.layers:
        # a second (experts, d_model) candidate: the router is ambiguous
        moe = getattr(block, "mlp", None) or block.block_sparse_moe  # transformers 5 / 4
        moe.router = nn.Linear(hf.config.hidden_size, 4, bias=False)
    tokenizer = tiny_model("llama").tokenizer
    with pytest.warns(UserWarning, match=r"'mystery_moe' declares 4 experts .* no router") as seen:
        model = sl.wrap(hf, tokenizer)
    assert "register_architecture" in str(seen[0].message)
    with pytest.raises(UnsupportedModelError, match=r"looked for one submodule named 'gate'"):
        model.adapter.router(0)
    # everything but the router still works
    vec = sl.SteeringVector({0: torch.ones(model.d_model)})
    assert not torch.equal(model.logits(["the cat"], steering=vec), model.logits(["the cat"]))
