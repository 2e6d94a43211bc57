"""Persistent edits: edited models, baking into weights, llama.cpp control-vector export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers

import steerlab as sl
from steerlab.ablation import (
    DirectionalAblation,
    MeanAblation,
    ReplaceActivation,
    ZeroAblation,
    compute_means,
)
from steerlab.editing import EditedModel, bake, edit, export_gguf, read_gguf
from steerlab.errors import BakeError, EditRemovedError
from steerlab.testing import MOE_ARCHITECTURES, TINY_ARCHITECTURES, hook_count, tiny_model

PROMPTS = ["the cat sat on the mat", "a dog ran", "i love the big house"]
# Baked logits must equal hooked logits to this absolute tolerance (float32 models).
ATOL = 1e-4


def _state(model: sl.SteeredModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()}


def _assert_untouched(model: sl.SteeredModel, before: dict[str, torch.Tensor]) -> None:
    after = model.hf_model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert hook_count(model.hf_model) == 0


def _plain_logits(folder: Path, model: sl.SteeredModel, prompts: list[str]) -> torch.Tensor:
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    batch = model.encode(prompts)
    with torch.no_grad():
        return plain(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits


def _vector(model: sl.SteeredModel, layers: tuple[int, ...] = (1,), seed: int = 0) -> Any:
    generator = torch.Generator().manual_seed(seed)
    return sl.SteeringVector(
        {layer: torch.randn(model.d_model, generator=generator) for layer in layers}
    )


# --- edited models ---------------------------------------------------------------------------
def test_edited_model_stays_steered_and_leaves_the_original_alone(
    arch_model: sl.SteeredModel,
) -> None:
    model = arch_model
    before = _state(model)
    vec = _vector(model)
    edited = edit(model, vec, strength=3.0)
    assert isinstance(edited, EditedModel) and hook_count(model.hf_model) == 0
    expected = model.logits(PROMPTS, steering=vec, strength=3.0)
    assert torch.equal(edited.logits(PROMPTS), expected)
    assert torch.equal(edited.logits(PROMPTS), expected)  # again: still edited
    assert hook_count(model.hf_model) == 0  # hooks only live during a call
    assert edited.generate(PROMPTS, max_new_tokens=4) == model.generate(
        PROMPTS, max_new_tokens=4, steering=vec, strength=3.0
    )
    acts = edited.activations(PROMPTS, layers=[1])
    torch.testing.assert_close(
        acts[1], model.activations(PROMPTS, layers=[1])[1] + 3.0 * vec[1], atol=1e-5, rtol=1e-5
    )
    edited.remove()
    _assert_untouched(model, before)
    assert torch.equal(model.logits(PROMPTS), model.logits(PROMPTS, steering=None))


def test_edits_stack_and_compose_with_steer(llama: sl.SteeredModel) -> None:
    a, b = _vector(llama, seed=1), _vector(llama, (2,), seed=2)
    first = edit(llama, a)
    both = first.edit(b, strength=0.5)
    reference = llama.logits(PROMPTS, steering=sl.SteeringVector({1: a[1]}))
    assert torch.equal(first.logits(PROMPTS), reference)  # unchanged by stacking
    with llama.steer(a):
        stacked = llama.logits(PROMPTS, steering=b, strength=0.5)
    torch.testing.assert_close(both.logits(PROMPTS), stacked, atol=1e-6, rtol=1e-6)
    # steering on the edited model runs after the edits: replace, then add
    value = torch.randn(llama.d_model)
    replaced = edit(llama, ReplaceActivation(1, value))
    with replaced.steer(a):
        acts = replaced.activations(PROMPTS, layers=[1])
    torch.testing.assert_close(acts[1], (value + a[1]).expand(3, -1), atol=1e-6, rtol=0)
    assert hook_count(llama.hf_model) == 0
    assert len(both.edits) == 2 and both.original is llama


def test_seed_example_replace_last_layer(llama: sl.SteeredModel) -> None:
    source = llama.activations(["the capital of france is paris"], layers=[-1], positions="all")
    paris = source[-1][0]
    with edit(llama, ReplaceActivation(-1, paris)) as edited:
        germany = edited.logits(["the capital of germany is"])[0, -1]
        japan = edited.logits(["the capital of japan is"])[0, -1]
    reference = llama.logits(["the capital of france is paris"])[0, 4]
    torch.testing.assert_close(germany, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(japan, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(EditRemovedError):
        edited.logits(["a"])
    assert hook_count(llama.hf_model) == 0


def test_edited_forward_and_applied(llama: sl.SteeredModel) -> None:
    vec = _vector(llama)
    edited = edit(llama, vec, strength=2.0)
    batch = llama.encode(["the cat sat"])
    direct = edited(input_ids=batch.input_ids).logits
    torch.testing.assert_close(
        direct, llama.logits(["the cat sat"], steering=vec, strength=2.0), atol=1e-6, rtol=0
    )
    with edited.applied():
        assert hook_count(llama.hf_model) > 0
        via_hf = llama.hf_model(input_ids=batch.input_ids).logits
    assert hook_count(llama.hf_model) == 0
    assert torch.equal(via_hf, direct)


def test_edit_errors(llama: sl.SteeredModel) -> None:
    with pytest.raises(sl.InvalidInputError, match="per-row"):
        edit(llama, [None, _vector(llama)])
    with pytest.raises(sl.InvalidInputError):
        edit(llama, "not an intervention")
    edited = edit(llama, _vector(llama))
    edited.remove()
    with pytest.raises(EditRemovedError):
        edited.edit(_vector(llama))
    assert issubclass(EditRemovedError, sl.SteerlabError)


def test_model_edit_method_delegates(llama: sl.SteeredModel) -> None:
    """``SteeredModel.edit`` (wired in model.py) returns the same edited model."""
    vec = _vector(llama)
    edited = llama.edit(vec, strength=2.0)
    assert isinstance(edited, EditedModel)
    assert torch.equal(edited.logits(PROMPTS), edit(llama, vec, strength=2.0).logits(PROMPTS))


# --- baking ------------------------------------------------------------------------------------
BAKE_ADD = {"gpt2", "llama", "gpt_neox", "opt", "gptj", "granite", "smollm3"}
BAKE_DIRECTIONAL = {"gpt2", "llama", "mistral", "qwen2", "phi3", "gpt_neox", "opt", "gptj"}
BAKE_DIRECTIONAL |= {"qwen3", "granite", "smollm3"}
# The experts' stacked weights have no single output projection to fold a bias or a projection
# into, and bake says so.
REFUSAL = dict.fromkeys(MOE_ARCHITECTURES, "mixture-of-experts MLPs are not supported")


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_baked_additive_vector_matches_hooks(arch: str, tmp_path: Path) -> None:
    model = tiny_model(arch)
    before = _state(model)
    vec = _vector(model, (0, 2))
    out = tmp_path / "baked"
    if arch not in BAKE_ADD:
        with pytest.raises(BakeError, match=REFUSAL.get(arch, "cannot be baked")):
            bake(model, vec, out, strength=1.5)
        assert not out.exists() and not list(tmp_path.iterdir())
    else:
        bake(model, vec, out, strength=1.5)
        hooked = model.logits(PROMPTS, steering=vec, strength=1.5)
        plain = _plain_logits(out, model, PROMPTS)
        real = model.encode(PROMPTS).attention_mask.bool()
        torch.testing.assert_close(plain[real], hooked[real], atol=ATOL, rtol=0)
        assert not torch.allclose(hooked, model.logits(PROMPTS), atol=1e-2)
        assert (out / "steerlab_edit.json").is_file() and (out / "tokenizer.json").is_file()
    _assert_untouched(model, before)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_baked_directional_ablation_matches_hooks(arch: str, tmp_path: Path) -> None:
    model = tiny_model(arch)
    before = _state(model)
    direction = _vector(model, (0,), seed=3)[0]
    ablation = DirectionalAblation.everywhere(direction)
    out = tmp_path / "baked"
    if arch not in BAKE_DIRECTIONAL:
        with pytest.raises(BakeError, match=REFUSAL.get(arch, "post_feedforward_layernorm")):
            bake(model, ablation, out)
        assert not out.exists()
    else:
        bake(model, ablation, out)
        hooked = model.logits(PROMPTS, steering=ablation)
        plain = _plain_logits(out, model, PROMPTS)
        real = model.encode(PROMPTS).attention_mask.bool()
        torch.testing.assert_close(plain[real], hooked[real], atol=ATOL, rtol=0)
        # the saved weights write nothing along u into the residual stream
        saved = transformers.AutoModelForCausalLM.from_pretrained(out)
        unit = direction / direction.norm()
        embedding = saved.get_input_embeddings().weight.detach()
        assert float((embedding @ unit).abs().max()) < 1e-5
        wrapped = sl.wrap(saved, model.tokenizer)
        acts = wrapped.activations(PROMPTS, layers=None, positions="all")
        for layer in range(model.n_layers):
            states = torch.cat(acts[layer])
            assert float((states @ unit).abs().max()) < 1e-4 * float(states.norm(dim=-1).max())
    _assert_untouched(model, before)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "opt"])
def test_baked_ablations_match_hooks(arch: str, tmp_path: Path) -> None:
    model = tiny_model(arch)
    means = compute_means(
        model, ["the cat sat", "a dog ran to the house"], layers=[1], components=["head", "attn"]
    )
    edits = (
        ZeroAblation(0, component="head", head=[0, 2]),
        MeanAblation(1, means, component="head", head=1, per_position=False),
        ZeroAblation(2, component="mlp"),
    )
    out = bake(model, edits, tmp_path / "baked")
    edited = edit(model, edits)
    hooked = edited.logits(PROMPTS)
    plain = _plain_logits(out, model, PROMPTS)
    real = model.encode(PROMPTS).attention_mask.bool()
    torch.testing.assert_close(plain[real], hooked[real], atol=ATOL, rtol=0)
    with pytest.raises(BakeError, match="per-position"):
        bake(model, MeanAblation(1, means, component="attn"), tmp_path / "other")


def test_bake_edited_model_and_overwrite(llama: sl.SteeredModel, tmp_path: Path) -> None:
    vec = _vector(llama)
    edited = edit(llama, vec, strength=2.0)
    out = tmp_path / "baked"
    bake(edited, None, out)
    real = llama.encode(PROMPTS).attention_mask.bool()
    first = _plain_logits(out, llama, PROMPTS)
    torch.testing.assert_close(first[real], edited.logits(PROMPTS)[real], atol=ATOL, rtol=0)
    with pytest.raises(sl.InvalidInputError, match="exists"):
        bake(llama, vec, out)
    bake(llama, vec, out, strength=-2.0, overwrite=True)
    second = _plain_logits(out, llama, PROMPTS)[real]
    hooked = llama.logits(PROMPTS, steering=vec, strength=-2.0)[real]
    torch.testing.assert_close(second, hooked, atol=ATOL, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["baked"]  # no staging folders left


def test_bake_refusals(llama: sl.SteeredModel, tmp_path: Path) -> None:
    vec = _vector(llama)
    with pytest.raises(BakeError, match="every position"):
        bake(llama, sl.Steering(vec, positions="last"), tmp_path / "a")
    with pytest.raises(BakeError, match="writers=True"):
        bake(llama, DirectionalAblation(vec), tmp_path / "b")
    with pytest.raises(BakeError, match="cannot be baked"):
        bake(llama, ReplaceActivation(1, torch.zeros(32)), tmp_path / "c")
    with pytest.raises(BakeError, match="block"):
        bake(llama, ZeroAblation(1), tmp_path / "d")
    with pytest.raises(sl.InvalidInputError, match="nothing to bake"):
        bake(llama, None, tmp_path / "e")
    with llama.steer(vec), pytest.raises(BakeError, match="hooks installed"):
        bake(llama, vec, tmp_path / "f")
    assert not list(tmp_path.iterdir())
    assert hook_count(llama.hf_model) == 0


@pytest.mark.slow
def test_bake_default_model(default_model: Any, tmp_path: Path) -> None:
    model = default_model
    before = _state(model)
    vec = sl.mean_diff(
        model,
        ["I love this, it is wonderful", "What a great day"],
        ["I hate this", "awful"],
        layers=[10],
    )
    direction = _vector(model, (0,), seed=5)[0]
    edits = (sl.Steering(vec, strength=4.0), DirectionalAblation.everywhere(direction))
    out = bake(model, edits, tmp_path / "baked")
    prompts = ["The weather today is", "My favourite food is"]
    hooked = edit(model, edits).logits(prompts)
    plain = _plain_logits(out, model, prompts)
    real = model.encode(prompts).attention_mask.bool()
    torch.testing.assert_close(plain[real], hooked[real], atol=ATOL, rtol=0)
    assert not torch.allclose(hooked, model.logits(prompts), atol=1e-2)
    _assert_untouched(model, before)


# --- llama.cpp export ----------------------------------------------------------------------------
def test_export_gguf_layout(tmp_path: Path) -> None:
    vec = sl.SteeringVector(
        {1: torch.arange(8.0), 4: -torch.ones(8)}, metadata={"model_type": "llama"}
    )
    path = export_gguf(vec, tmp_path / "v.gguf", strength=1.5)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    # steerlab layer L (output of block L) is llama.cpp's direction.L: no offset
    assert sorted(tensors) == ["direction.1", "direction.4"]
    for layer in (1, 4):
        tensor = tensors[f"direction.{layer}"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [8]
        np.testing.assert_array_equal(tensor.data, (1.5 * vec[layer]).numpy())
    back = read_gguf(path)
    assert back.layers == (1, 4) and torch.equal(back[4], torch.full((8,), -1.5))
    assert [p.name for p in tmp_path.iterdir()] == ["v.gguf"]


def test_export_gguf_refusals(tmp_path: Path) -> None:
    with pytest.raises(sl.InvalidInputError, match="layer 0"):
        export_gguf(sl.SteeringVector({0: torch.ones(4)}), tmp_path / "v.gguf")
    with pytest.raises(sl.InvalidInputError, match="every token"):
        export_gguf(
            sl.Steering(sl.SteeringVector({2: torch.ones(4)}), positions="last"),
            tmp_path / "v.gguf",
        )
    scaled = export_gguf(
        sl.Steering(sl.SteeringVector({2: torch.ones(4)}), strength=2.0), tmp_path / "s.gguf"
    )
    assert torch.equal(read_gguf(scaled)[2], torch.full((4,), 2.0))
    assert not (tmp_path / "v.gguf").exists()
