"""Sparse autoencoders: SAELens and Gemma Scope files, encode/decode against the formulas (and
against what sae-lens itself computed), hook mapping, feature steering and clamp."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import steerlab as sl
from steerlab.sae import SAE, hook_layer
from steerlab.testing import tiny_model

FIXTURES = Path(__file__).parent / "data" / "saelens"
PROMPTS = ["the cat sat on the mat", "a dog", "we went to the market today"]
D_IN, D_SAE = 32, 12  # the tiny models' hidden size


def _weights(seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3,
        "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3,
        "b_enc": torch.randn(d_sae, generator=g) * 0.2,
        "b_dec": torch.randn(d_in, generator=g) * 0.2,
        "threshold": torch.rand(d_sae, generator=g) * 0.3,
    }


def _saelens_folder(root: Path, weights: dict[str, torch.Tensor], **cfg: Any) -> Path:
    """A folder laid out as SAELens writes it (the issue's contract, plus an unknown key)."""
    config = {
        "architecture": "standard",
        "d_in": weights["W_enc"].shape[0],
        "d_sae": weights["W_enc"].shape[1],
        "dtype": "float32",
        "hook_name": "blocks.1.hook_resid_post",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "some_future_key": {"ignored": True},
        **cfg,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "cfg.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in weights.items() if k != "threshold"}
    if config["architecture"] == "jumprelu":
        tensors["threshold"] = weights["threshold"]
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(root / "sae_weights.safetensors")
    )
    return root


def _gemma_scope_file(root: Path, weights: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    file = root / "params.npz"
    np.savez(file, **{k: v.numpy() for k, v in weights.items()})
    return file


# --- formats and formulas ------------------------------------------------------------------------
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard_contract(tmp_path: Path, apply_b_dec: bool) -> None:
    w = _weights()
    sae = sl.load_sae(_saelens_folder(tmp_path / "sae", w, apply_b_dec_to_input=apply_b_dec))
    x = torch.randn(4, 7, D_IN, generator=torch.Generator().manual_seed(1))
    shift = w["b_dec"] if apply_b_dec else torch.zeros(D_IN)
    want = torch.relu((x.double() - shift.double()) @ w["W_enc"].double() + w["b_enc"].double())
    got = sae.encode(x)
    assert got.shape == (4, 7, D_SAE)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert 0 < int((got > 0).sum()) < got.numel()  # the ReLU really cuts some
    recon = want @ w["W_dec"].double() + w["b_dec"].double()
    assert torch.allclose(sae.decode(got).double(), recon, atol=1e-5)
    assert (sae.layer, sae.architecture, sae.d_in, sae.d_sae) == (1, "standard", D_IN, D_SAE)
    feature = sae.feature(5)
    assert feature.layers == (1,)
    assert torch.equal(feature[1], w["W_dec"][5])
    assert feature.metadata["sae_feature"] == 5


@pytest.mark.parametrize(
    "name", ["standard", "standard_no_b_dec", "jumprelu", "topk", "topk_rescaled"]
)
def test_files_written_by_sae_lens_encode_identically(name: str) -> None:
    # tests/data/saelens was written by sae-lens 6.54 (make_fixtures.py there); reference.json
    # holds sae-lens's own encodings and reconstructions of the same inputs
    ref = json.loads((FIXTURES / "reference.json").read_text())
    x = torch.tensor(ref["x"])
    sae = sl.load_sae(FIXTURES / name)
    assert sae.layer == 2
    got = sae.encode(x)
    want = torch.tensor(ref["saes"][name]["encode"])
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(sae.decode(got), torch.tensor(ref["saes"][name]["decode"]), atol=1e-5)


def test_a_fresh_sae_lens_file_encodes_identically(tmp_path: Path) -> None:
    lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed here (heavy deps)")
    from sae_lens.saes.sae import SAEMetadata

    cfg = lens.JumpReLUSAEConfig(
        d_in=16, d_sae=20, metadata=SAEMetadata(hook_name="blocks.3.hook_resid_post")
    )
    theirs = lens.JumpReLUSAE(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
        theirs.threshold.copy_(torch.rand(20))
    theirs.save_model(tmp_path / "j")
    x = torch.randn(6, 16)
    ours = sl.load_sae(tmp_path / "j")
    assert ours.layer == 3
    with torch.no_grad():
        assert torch.allclose(ours.encode(x), theirs.encode(x), atol=1e-6)


def test_jumprelu_and_topk_semantics(tmp_path: Path) -> None:
    w = _weights(2)
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(3))
    z = (x.double() - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()
    jump = sl.load_sae(_saelens_folder(tmp_path / "j", w, architecture="jumprelu"))
    want = torch.relu(z) * (z > w["threshold"].double())
    assert torch.allclose(jump.encode(x).double(), want, atol=1e-5)
    assert int(((z > 0) & (z <= w["threshold"].double())).sum()) > 0  # the threshold matters
    topk = sl.load_sae(_saelens_folder(tmp_path / "t", w, architecture="topk", k=3))
    got = topk.encode(x)
    assert ((got > 0).sum(-1) <= 3).all()
    for row in range(9):
        best = torch.topk(z[row], 3).indices
        expect = torch.zeros(D_SAE, dtype=torch.float64)
        expect[best] = torch.relu(z[row][best])
        assert torch.allclose(got[row].double(), expect, atol=1e-5)
    # pre-6 SAELens: a standard architecture whose activation_fn is topk with kwargs {k}
    old = _saelens_folder(tmp_path / "old", w, activation_fn="topk", activation_fn_kwargs={"k": 3})
    assert torch.equal(sl.load_sae(old).encode(x), got)


def test_gemma_scope_params_npz(tmp_path: Path) -> None:
    w = _weights(4)
    file = _gemma_scope_file(tmp_path / "gemma-scope-2b-pt-res" / "layer_2" / "width_12", w)
    sae = sl.load_sae(file)
    assert (sae.layer, sae.architecture, sae.hook_name) == (
        2,
        "jumprelu",
        "blocks.2.hook_resid_post",
    )
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(5))
    # Gemma Scope does not subtract b_dec before the encoder
    z = x.double() @ w["W_enc"].double() + w["b_enc"].double()
    want = torch.relu(z) * (z > w["threshold"].double())
    assert torch.allclose(sae.encode(x).double(), want, atol=1e-5)
    assert torch.allclose(
        sae.decode(sae.encode(x)).double(),
        want @ w["W_dec"].double() + w["b_dec"].double(),
        atol=1e-5,
    )
    assert sl.load_sae(file.parent).layer == 2  # the folder holding params.npz
    assert sl.load_sae(file, layer=0).layer == 0
    bare = _gemma_scope_file(tmp_path / "plain", w)
    with pytest.raises(sl.InvalidInputError, match="layer="):
        sl.load_sae(bare)
    mlp = _gemma_scope_file(tmp_path / "gemma-scope-2b-pt-mlp" / "layer_2", w)
    with pytest.raises(sl.VectorFileError, match="residual"):
        sl.load_sae(mlp)


def test_hook_names_map_to_steerlab_layers(tmp_path: Path) -> None:
    assert hook_layer("blocks.7.hook_resid_post") == 7
    assert hook_layer("blocks.7.hook_resid_pre") == 6
    for bad in (
        "blocks.0.hook_resid_pre",
        "blocks.3.hook_resid_mid",
        "blocks.3.attn.hook_z",
        "blocks.3.hook_mlp_out",
        "hook_embed",
    ):
        with pytest.raises(sl.VectorFileError, match=bad.replace(".", r"\.")):
            hook_layer(bad)
    w = _weights()
    pre = sl.load_sae(_saelens_folder(tmp_path / "pre", w, hook_name="blocks.2.hook_resid_pre"))
    assert pre.layer == 1 and pre.feature(0).layers == (1,)
    # SAELens 6 keeps hook_name under "metadata"
    folder = _saelens_folder(tmp_path / "v6", w, metadata={"hook_name": "blocks.0.hook_resid_post"})
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["hook_name"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert sl.load_sae(folder).layer == 0
    mid = _saelens_folder(tmp_path / "mid", w, hook_name="blocks.2.hook_resid_mid")
    with pytest.raises(sl.VectorFileError, match="hook_resid_mid"):
        sl.load_sae(mid)


def test_bad_files_raise_clear_errors(tmp_path: Path) -> None:
    w = _weights()
    with pytest.raises(sl.VectorFileNotFoundError):
        sl.load_sae(tmp_path / "nothing")
    folder = _saelens_folder(tmp_path / "a", w)
    (folder / "sae_weights.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(sl.VectorFileError, match="sae_weights"):
        sl.load_sae(folder)
    folder = _saelens_folder(tmp_path / "b", w)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(sl.VectorFileNotFoundError, match="sae_weights"):
        sl.load_sae(folder)
    folder = _saelens_folder(tmp_path / "c", w)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(sl.VectorFileError, match=r"cfg\.json"):
        sl.load_sae(folder)
    cases = {
        "architecture": ({"architecture": "gated"}, "gated"),
        "normalize": ({"normalize_activations": "layer_norm"}, "normalize_activations"),
        "d_sae": ({"d_sae": 99}, "d_sae=99"),
        "jumprelu": ({"architecture": "jumprelu"}, None),
    }
    for name, (cfg, match) in cases.items():
        folder = _saelens_folder(tmp_path / name, w, **cfg)
        if match is None:  # a jumprelu file without its threshold tensor
            save_file(
                {k: w[k].contiguous() for k in ("W_enc", "W_dec", "b_enc", "b_dec")},
                str(folder / "sae_weights.safetensors"),
            )
            match = "threshold"
        with pytest.raises(sl.VectorFileError, match=match):
            sl.load_sae(folder)
    bad = dict(w, W_dec=torch.randn(D_SAE, D_IN + 1))
    with pytest.raises(sl.VectorFileError, match="W_dec"):
        sl.load_sae(_saelens_folder(tmp_path / "shape", bad))
    broken = tmp_path / "layer_1" / "params.npz"
    broken.parent.mkdir()
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(sl.VectorFileError, match=r"params\.npz"):
        sl.load_sae(broken)
    sae = sl.load_sae(_saelens_folder(tmp_path / "ok", w))
    with pytest.raises(sl.InvalidInputError, match="feature"):
        sae.feature(D_SAE)
    with pytest.raises(sl.InvalidInputError, match="x must be"):
        sae.encode(torch.zeros(3, D_IN + 1))


# --- steering by feature -------------------------------------------------------------------------
def _feature_clamp(sae: SAE, h: torch.Tensor, i: int, c: float) -> torch.Tensor:
    """The issue's formula, from the SAE's own encoder: h + (c − f_i(h))·W_dec[i]."""
    f = sae.encode(h.double().float()).double()[..., i : i + 1]
    return h.double() + (c - f) * sae.W_dec[i].double()


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_clamp_sets_the_feature_activation_exactly(
    tmp_path: Path, llama: sl.SteeredModel, architecture: str
) -> None:
    w = _weights(6)
    sae = sl.load_sae(_saelens_folder(tmp_path / "s", w, architecture=architecture))
    plain = llama.activations(PROMPTS, layers=[1], positions="all")[1]
    h = torch.cat(plain)
    i = int(sae.encode(h).gt(0).float().mean(0).argmax())  # a feature that fires often
    assert 0 < float(sae.encode(h)[:, i].gt(0).float().mean()) < 1  # on some tokens, not all
    vec = sae.feature(i)
    for c in (0.0, 2.5):
        steered = llama.activations(
            PROMPTS, layers=[1], positions="all", steering=vec, strength=c, op="clamp"
        )[1]
        for row in range(len(PROMPTS)):
            want = _feature_clamp(sae, plain[row], i, c)
            assert torch.allclose(steered[row].double(), want, atol=2e-5)
    # the same vector through a file (extras saved with it) and in a batch beside a plain clamp
    vec.save(tmp_path / "feature.safetensors")
    loaded = sl.SteeringVector.load(tmp_path / "feature.safetensors")
    other = sl.SteeringVector({1: torch.ones(D_IN)})
    rows = [
        sl.Steering(loaded, strength=1.5, op="clamp"),
        sl.Steering(other, strength=0.5, op="clamp"),
        None,
    ]
    mixed = llama.activations(PROMPTS, layers=[1], positions="all", steering=rows)[1]
    assert torch.allclose(mixed[0].double(), _feature_clamp(sae, plain[0], i, 1.5), atol=2e-5)
    u = torch.ones(D_IN, dtype=torch.float64) / D_IN**0.5
    h1 = plain[1].double()
    want1 = h1 + (0.5 * D_IN**0.5 - (h1 @ u))[:, None] * u
    assert torch.allclose(mixed[1].double(), want1, atol=2e-5)
    assert torch.equal(mixed[2], plain[2])


def test_add_moves_activations_by_the_decoder_row_and_topk_refuses_clamp(
    tmp_path: Path, llama: sl.SteeredModel
) -> None:
    w = _weights(7)
    sae = sl.load_sae(_saelens_folder(tmp_path / "t", w, architecture="topk", k=2))
    plain = llama.activations(PROMPTS, layers=[1], positions="all")[1]
    added = llama.activations(
        PROMPTS, layers=[1], positions="all", steering=sae.feature(3), strength=2.0
    )[1]
    assert torch.allclose(added[0], plain[0] + 2.0 * w["W_dec"][3], atol=1e-5)
    with pytest.raises(sl.VectorMismatchError, match="TopK"):
        llama.logits(PROMPTS, steering=sae.feature(3), strength=1.0, op="clamp")


def test_top_features_match_a_direct_encoding(tmp_path: Path, llama: sl.SteeredModel) -> None:
    sae = sl.load_sae(_saelens_folder(tmp_path / "s", _weights(8)))
    top = sae.top_features(llama, PROMPTS, k=3)
    acts = llama.activations(PROMPTS, layers=[1], positions="all")[1]
    ids = llama.tokenizer(PROMPTS)["input_ids"]
    n_hits = 0
    for p in range(len(PROMPTS)):
        assert len(top.tokens[p]) == len(ids[p]) == acts[p].shape[0]
        feats = sae.encode(acts[p])
        for t in range(acts[p].shape[0]):
            want = [(int(j), float(feats[t, j])) for j in feats[t].argsort(descending=True)[:3]]
            want = [(j, v) for j, v in want if v > 0]
            got = [(h.feature, h.activation) for h in top.hits[p][t]]
            assert [g[0] for g in got] == [x[0] for x in want]
            assert [g[1] for g in got] == pytest.approx([x[1] for x in want], abs=1e-6)
            n_hits += len(got)
    assert n_hits > 0
    assert sum(top.counts().values()) == n_hits
    assert f"{len(PROMPTS)} prompts" in repr(top)
    assert len(top.table().splitlines()) == sum(len(i) for i in ids)
    with pytest.raises(sl.VectorMismatchError, match="width"):
        sl.load_sae(_saelens_folder(tmp_path / "w", _weights(d_in=16))).top_features(llama, PROMPTS)


def test_a_feature_clamp_is_served_like_the_library(tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from steerlab.server.app import create_app, serve_in_thread
    from steerlab.server.engine import TorchEngine

    served, reference = tiny_model("llama"), tiny_model("llama")  # same seed, same weights
    sae = sl.load_sae(_saelens_folder(tmp_path / "s", _weights(6)))
    h = torch.cat(reference.activations(PROMPTS, layers=[1], positions="all")[1])
    i = int(sae.encode(h).gt(0).float().mean(0).argmax())
    vec = sae.feature(i)
    vec.save(tmp_path / "feat.safetensors")
    engine = TorchEngine(served, max_batch=4, model_id="tiny")
    engine.vectors.register("feat", sl.SteeringVector.load(tmp_path / "feat.safetensors"))
    with serve_in_thread(create_app(engine, max_strength=100.0)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for strength in (0.0, 40.0):
            steering = [{"vector": "feat", "strength": strength, "op": "clamp"}]
            reply = client.completions.create(
                model="tiny",
                prompt=PROMPTS[0],
                max_tokens=6,
                temperature=0,
                extra_body={"steering": steering},
            )
            want = reference.generate(
                PROMPTS[0], steering=vec, strength=strength, op="clamp", max_new_tokens=6
            )
            assert reply.choices[0].text == want
        assert want != reference.generate(PROMPTS[0], max_new_tokens=6)
