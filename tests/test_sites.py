"""Steering and reading at sites other than the residual stream (issue 22): attention and MLP
outputs and attention heads, on every tiny architecture."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.errors import InvalidInputError, VectorMismatchError
from steerlab.sites import head_mask, site_hook, site_width
from steerlab.testing import TINY_ARCHITECTURES, tiny_model

PROMPTS = ["the cat sat on the mat", "a dog ran", "i love the big house"]
SITES = ("attn_out", "mlp_out", "head")


def _vector(model: sl.SteeringVector, site: str, layer: int = 1, seed: int = 0) -> Any:
    width = site_width(model.adapter, site)
    direction = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return sl.SteeringVector({layer: direction}, metadata={"site": site})


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_steered_minus_unsteered_at_the_site_is_the_vector(arch: str, site: str) -> None:
    model = tiny_model(arch)
    vec = _vector(model, site)
    assert vec.site == site
    base = model.activations(PROMPTS, layers=[1], positions="all", site=site)[1]
    steered = model.activations(PROMPTS, layers=[1], positions="all", site=site, steering=vec)[1]
    for b, s in zip(base, steered):
        assert b.shape[-1] == site_width(model.adapter, site)
        # the hook computes h + v in the model's dtype: bit for bit the same sum
        assert torch.equal(s, b + vec[1])
    # and it is not the residual stream that was steered: block 0's output is untouched
    resid = model.activations(PROMPTS, layers=[0], positions="all")[0]
    resid_steered = model.activations(PROMPTS, layers=[0], positions="all", steering=vec)[0]
    assert all(torch.equal(a, b) for a, b in zip(resid, resid_steered))


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_head_steering_equals_adding_to_the_output_projection_input(arch: str) -> None:
    model = tiny_model(arch)
    adapter = model.adapter
    vec = _vector(model, "head", layer=1, seed=4)
    heads = [adapter.n_heads - 1, 0]
    keep = head_mask(adapter, heads)
    assert int(keep.sum()) == 2 * adapter.head_dim  # query heads, also under GQA
    steered = model.logits(PROMPTS, steering=sl.Steering(vec, heads=heads, strength=2.0))
    module, kind = site_hook(adapter, "head", 1)
    assert kind == "forward_pre"
    added = torch.where(keep, vec[1], torch.zeros(())) * 2.0
    mask = model.encode(PROMPTS).attention_mask.bool()

    def direct(mod: Any, args: Any) -> Any:
        x = args[0]
        rows = mask.reshape(*x.shape[:-1], 1) if x.ndim == 3 else mask.reshape(-1, 1)
        return (x + rows.to(x.dtype) * added.to(x.dtype), *args[1:])

    handle = module.register_forward_pre_hook(direct)
    try:
        want = model.logits(PROMPTS)
    finally:
        handle.remove()
    real = mask
    torch.testing.assert_close(steered[real], want[real], atol=1e-5, rtol=0)
    assert not torch.allclose(steered[real], model.logits(PROMPTS)[real], atol=1e-3)
    # the other heads' slices of the vector are ignored
    only = sl.SteeringVector({1: torch.where(keep, vec[1], torch.zeros(()))}, metadata=vec.metadata)
    assert torch.equal(model.logits(PROMPTS, steering=only, strength=2.0), steered)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3_moe", "opt"])
def test_per_row_batches_mix_sites(arch: str) -> None:
    model = tiny_model(arch)
    entries = [
        sl.Steering(_vector(model, "head", seed=1), heads=[1], strength=3.0),
        None,
        sl.Steering(_vector(model, "mlp_out", seed=2), strength=2.0),
    ]
    batched = model.logits(PROMPTS, steering=entries)
    base = model.logits(PROMPTS)
    for row, entry in enumerate(entries):
        alone = base if entry is None else model.logits(PROMPTS, steering=entry)
        if model.adapter.n_experts:  # experts group tokens across rows: 1 ulp apart
            torch.testing.assert_close(batched[row], alone[row], atol=1e-6, rtol=0)
        else:
            assert torch.equal(batched[row], alone[row]), row


def test_site_is_stored_in_the_file_and_old_files_mean_resid(llama: Any, tmp_path: Path) -> None:
    vec = _vector(llama, "head").with_metadata(heads={"1": [0, 2]})
    loaded = sl.SteeringVector.load(vec.save(tmp_path / "h.safetensors"))
    assert loaded.site == "head" and loaded.metadata["heads"] == {"1": [0, 2]}
    assert torch.equal(llama.logits(PROMPTS, steering=loaded), llama.logits(PROMPTS, steering=vec))
    bare = sl.SteeringVector({1: torch.ones(llama.d_model)})
    old = sl.SteeringVector.load(bare.save(tmp_path / "old.safetensors"))
    assert old.site == "resid" and "site" not in old.metadata
    assert bare.with_metadata(site="block_output").site == "resid"  # files before sites


def test_methods_compute_at_the_site(llama: Any) -> None:
    pos, neg = ["i love it", "so happy"], ["i hate it", "so sad"]
    for site in SITES:
        vec = sl.mean_diff(llama, pos, neg, layers=[1], site=site)
        assert vec.site == site and vec.metadata["site"] == site
        acts = llama.activations(pos + neg, layers=[1], site=site)[1]
        want = acts[:2].mean(0) - acts[2:].mean(0)
        torch.testing.assert_close(vec[1], want, atol=1e-6, rtol=0)
    pca = sl.compute_vector(llama, pos, neg, layers=[1], method="pca", site="attn_out")
    assert pca.site == "attn_out" and pca.d_model == llama.d_model


def test_bad_site_arguments_name_what_is_wrong(llama: Any) -> None:
    vec = _vector(llama, "head")
    with pytest.raises(InvalidInputError, match="unknown site='heads'"):
        sl.Steering(vec, site="heads")
    with pytest.raises(InvalidInputError, match="heads= only applies to site='head'"):
        sl.Steering(sl.SteeringVector({1: torch.ones(32)}), heads=[0])
    with pytest.raises(InvalidInputError, match="heads: head 7 is out of range"):
        llama.logits(PROMPTS, steering=sl.Steering(vec, heads=[7]))
    with pytest.raises(InvalidInputError, match="op 'clamp'"):
        sl.Steering(vec, heads=[0], op="clamp")
    with pytest.raises(InvalidInputError, match="unknown site='ffn'"):
        llama.activations(PROMPTS, site="ffn")
    with pytest.raises(InvalidInputError, match="unknown site"):
        sl.mean_diff(llama, ["a"], ["b"], site="ffn")
    moe_only = sl.SteeringVector({1: torch.ones(4)}, metadata={"site": "router"})
    with pytest.raises(VectorMismatchError, match="not a mixture-of-experts"):
        moe_only.check_compatible(llama)
    # a condition read at block L's output comes after block L's attention and MLP
    cond = sl.Condition(torch.ones(llama.d_model), layer=1, threshold=0.0)
    with pytest.raises(InvalidInputError, match=r"site 'mlp_out', inside the block"):
        llama.logits(PROMPTS, steering=_vector(llama, "mlp_out"), when=cond)
    assert sl.testing.hook_count(llama.hf_model) == 0


# Where steering at a sub-site bakes exactly: the architectures whose config can give the
# projection a bias (the rest are refused naming the projection; MoE MLPs have none).
BAKES = {
    "attn_out": {"gpt2", "llama", "gemma2", "gemma3_text", "gpt_neox", "opt", "qwen3"}
    | {"qwen3_moe", "olmo2", "olmoe", "granite", "smollm3", "gpt_oss"},
    "mlp_out": {"gpt2", "llama", "gpt_neox", "opt", "gptj", "granite", "smollm3"},
}
BAKES["head"] = BAKES["attn_out"]  # a bias of W_o v on the same output projection


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_bake_at_a_site_matches_hooks_or_says_why_not(arch: str, site: str, tmp_path: Path) -> None:
    import transformers

    from steerlab.errors import BakeError

    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    steering = sl.Steering(
        _vector(model, site), strength=1.5, heads=[1] if site == "head" else None
    )
    out = tmp_path / "baked"
    if arch not in BAKES[site]:
        with pytest.raises(BakeError, match=r"no bias on|mixture-of-experts MLPs"):
            sl.bake(model, steering, out)
        assert not out.exists()
    else:
        sl.bake(model, steering, out)
        plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        batch = model.encode(PROMPTS)
        with torch.no_grad():
            logits = plain(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).logits
        real = batch.attention_mask.bool()
        hooked = model.logits(PROMPTS, steering=steering)
        torch.testing.assert_close(logits[real], hooked[real], atol=1e-5, rtol=0)
        assert not torch.allclose(hooked[real], model.logits(PROMPTS)[real], atol=1e-3)
    after = model.hf_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_edit_and_gguf_read_the_site(llama: Any, tmp_path: Path) -> None:
    vec = _vector(llama, "mlp_out")
    edited = llama.edit(vec, strength=2.0)
    assert torch.equal(edited.logits(PROMPTS), llama.logits(PROMPTS, steering=vec, strength=2.0))
    with pytest.raises(InvalidInputError, match="no place for a vector at site 'mlp_out'"):
        sl.export_gguf(vec, tmp_path / "v.gguf")
    with pytest.raises(InvalidInputError, match="site 'head'"):
        sl.export_gguf(sl.Steering(_vector(llama, "head"), heads=[0]), tmp_path / "v.gguf")
    assert not list(tmp_path.iterdir())


def test_torch_engine_serves_a_site_vector_as_the_library_steers(tmp_path: Path) -> None:
    from steerlab.server.engine import GenerationRequest, ReadoutEntry, SteeringEntry, TorchEngine

    model = tiny_model("qwen3")
    engine = TorchEngine(model, max_batch=4)
    vec = _vector(model, "head", seed=5)
    engine.vectors.register_file(vec.save(tmp_path / "iti.safetensors"))  # site read from file
    engine.start()
    try:
        req = GenerationRequest(
            prompt="the cat sat",
            max_tokens=6,
            temperature=0.0,
            steering=(SteeringEntry("iti", 4.0, "all"),),
        )
        got = [e.token_id for e in engine.submit(req)]
        want = model.generate_ids("the cat sat", steering=vec, strength=4.0, max_new_tokens=6)
        eos = model.tokenizer.eos_token_id
        assert (got[:-1] if got[-1] == eos else got) == [int(i) for i in want[0]]
        plain = model.generate_ids("the cat sat", max_new_tokens=6)
        assert want[0].tolist() != plain[0].tolist()
        with pytest.raises(InvalidInputError, match="site 'head'; a readout projects"):
            engine.submit(dataclasses.replace(req, readout=(ReadoutEntry("iti", 1),)))
    finally:
        engine.shutdown()


def test_vllm_refuses_other_sites_naming_them() -> None:
    from steerlab.vllm.spec import to_wire

    vec = sl.SteeringVector({1: torch.ones(32)}, metadata={"site": "attn_out"})
    with pytest.raises(InvalidInputError, match="this vector is for site 'attn_out'"):
        to_wire([sl.Steering(vec)])
    assert to_wire([sl.Steering(vec, site="resid")])["steering"][0]["op"] == "add"
