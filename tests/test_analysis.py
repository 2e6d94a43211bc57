"""Analysis: logit lens against hand computations, cosines, residual norms, layer scans, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from steerlab.analysis import (
    CosineMatrix,
    TokenScore,
    cosine_matrix,
    lens_direction,
    logit_lens,
    plot_norms,
    residual_norms,
    scan_layers,
)
from steerlab.errors import InvalidInputError, UnsupportedModelError, VectorMismatchError
from steerlab.methods import compute_vector, split_classes
from steerlab.testing import TINY_ARCHITECTURES, tiny_model
from steerlab.vectors import SteeringVector

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    from matplotlib.image import imread

    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and imread(path).shape[0] > 100


def _direction(d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


# --- logit lens -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_raw_logit_lens_equals_the_seed_computation(arch: str) -> None:
    model = tiny_model(arch)
    v = _direction()
    vec = SteeringVector({1: v})
    lens = logit_lens(model, vec, 1, k=5)
    logits = model.hf_model.get_output_embeddings().weight @ v  # the seed's analysis
    top, bottom = logits.topk(5), logits.topk(5, largest=False)
    assert [t.token_id for t in lens.boosted] == top.indices.tolist()
    assert [t.token_id for t in lens.suppressed] == bottom.indices.tolist()
    assert [t.value for t in lens.boosted] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert [t.value for t in lens.suppressed] == pytest.approx(bottom.values.tolist(), abs=1e-5)
    assert [t.text for t in lens.boosted] == [model.tokenizer.decode([i]) for i in top.indices]
    assert lens.layer == 1 and not lens.through_norm


def test_logit_lens_through_rmsnorm_by_hand() -> None:
    model = tiny_model("llama")
    norm = model.hf_model.model.norm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 32))  # a non-trivial gain
    v = _direction(seed=1)
    by_hand = v * torch.rsqrt(v.pow(2).mean() + norm.variance_epsilon) * norm.weight
    expected = model.hf_model.lm_head.weight @ by_hand
    got = lens_direction(model, v, through_norm=True)
    assert torch.allclose(got, expected, atol=1e-5)
    lens = logit_lens(model, SteeringVector({2: v}), -1, k=4, through_norm=True)
    assert [t.token_id for t in lens.boosted] == expected.topk(4).indices.tolist()
    # RMSNorm of v alone is scale-free: 10 v gives the same tokens
    ten = logit_lens(model, SteeringVector({2: 10 * v}), 2, k=4, through_norm=True)
    assert [t.token_id for t in ten.boosted] == [t.token_id for t in lens.boosted]
    raw = logit_lens(model, SteeringVector({2: v}), 2, k=4)
    assert [t.value for t in raw.boosted] != [t.value for t in lens.boosted]


def test_logit_lens_through_layernorm_drops_the_bias() -> None:
    model = tiny_model("gpt2")
    ln = model.hf_model.transformer.ln_f
    with torch.no_grad():
        ln.weight.copy_(torch.linspace(0.5, 2.0, 32))
        ln.bias.copy_(torch.linspace(-1.0, 1.0, 32))
    v = _direction(seed=2)
    centred = v - v.mean()
    by_hand = centred / torch.sqrt(centred.pow(2).mean() + ln.eps) * ln.weight  # no bias
    expected = model.hf_model.lm_head.weight @ by_hand
    assert torch.allclose(lens_direction(model, v, through_norm=True), expected, atol=1e-5)


def test_logit_lens_finds_a_planted_token() -> None:
    model = tiny_model("llama")
    cat = model.tokenizer.convert_tokens_to_ids("cat")
    v = model.hf_model.lm_head.weight[cat].detach() * 5
    lens = logit_lens(model, SteeringVector({0: -v}), k=3)
    assert lens.suppressed[0].token_id == cat and lens.suppressed[0].text == "cat"
    assert lens.suppressed[0].value == pytest.approx(-float(v @ v) / 5, rel=1e-5)


def test_logit_lens_errors() -> None:
    model = tiny_model("llama")
    vec = SteeringVector({0: _direction(), 1: _direction(seed=1)})
    with pytest.raises(InvalidInputError, match="say which"):
        logit_lens(model, vec)
    with pytest.raises(VectorMismatchError):
        logit_lens(model, vec, 2)
    with pytest.raises(InvalidInputError):
        logit_lens(model, vec, 0, k=0)
    with pytest.raises(VectorMismatchError):
        logit_lens(model, SteeringVector({0: torch.ones(16)}), 0)
    with pytest.raises(InvalidInputError):
        logit_lens(model, _direction(), 0)  # type: ignore[arg-type]


def test_logit_lens_without_a_final_norm_says_so() -> None:
    model = tiny_model("llama")
    model.adapter.spec = type(model.adapter.spec)(layers=model.adapter.spec.layers)
    with pytest.raises(UnsupportedModelError, match="final norm"):
        logit_lens(model, SteeringVector({0: _direction()}), 0, through_norm=True)


def test_tokens_display_readably_and_results_serialise(tmp_path: Path) -> None:
    assert TokenScore(5, " happy", 1.0).display == "' happy'"
    assert TokenScore(6, "\n", 1.0).display == "'\\n'"
    model = tiny_model("gpt2")
    lens = logit_lens(model, SteeringVector({1: _direction()}), 1, k=6)
    table = lens.table()
    assert "layer 1" in table and lens.boosted[0].display in table
    assert len(table.splitlines()) == 2 + 6
    json.dumps(lens.to_dict())
    assert _is_png(lens.plot(tmp_path / "lens.png"))


# --- cosines and norms --------------------------------------------------------------------------
def test_cosine_matrix_across_layers_and_vectors(tmp_path: Path) -> None:
    a = SteeringVector({0: _direction(seed=1), 4: _direction(seed=2), 5: _direction(seed=3)})
    m = cosine_matrix(a)
    assert m.labels == ("L0", "L4", "L5")
    for i, li in enumerate(a.layers):
        for j, lj in enumerate(a.layers):
            expected = torch.nn.functional.cosine_similarity(a[li].double(), a[lj].double(), dim=0)
            assert float(m.matrix[i, j]) == pytest.approx(float(expected), abs=1e-12)
    b = a.scaled(-3.0)
    across = cosine_matrix({"a": a, "b": b}, layer=4)
    assert across.labels == ("a", "b")
    expected_pm = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(across.matrix, expected_pm, atol=1e-12)
    every = cosine_matrix([a, b])
    assert len(every.labels) == 6 and every.labels[3] == "v1@L0"
    assert torch.allclose(every.matrix, every.matrix.T)
    zero = cosine_matrix(SteeringVector({0: torch.zeros(3), 1: torch.ones(3)}))
    assert math.isnan(float(zero.matrix[0, 1]))
    assert "L4" in m.table()
    assert _is_png(m.plot(tmp_path / "cos.png"))
    with pytest.raises(VectorMismatchError):
        cosine_matrix([a, SteeringVector({9: torch.ones(32)})], layer=4)
    with pytest.raises(InvalidInputError):
        cosine_matrix(a, layer=0)


def test_residual_norms_match_a_hand_computation() -> None:
    model = tiny_model("qwen2")
    prompts = ["the cat sat on the mat", "a dog", "one", "she went to the city today"]
    norms = residual_norms(model, prompts, layers=[0, -1], batch_size=3)
    full = model.activations(prompts, layers=[0, 2], positions="all", progress=False)
    for layer in (0, 2):
        rows = [seq[1:] if seq.shape[0] > 1 else seq for seq in full[layer]]
        expected = torch.cat(rows).double().norm(dim=-1).mean()
        assert norms[layer] == pytest.approx(float(expected), rel=1e-5)
    with_first = residual_norms(model, prompts, layers=[0], skip_first=False)
    everything = torch.cat(list(full[0])).double().norm(dim=-1).mean()
    assert with_first[0] == pytest.approx(float(everything), rel=1e-5)


def test_plot_norms(tmp_path: Path) -> None:
    vec = SteeringVector({0: torch.ones(4), 2: torch.ones(4) * 3})
    assert _is_png(plot_norms(vec, tmp_path / "n.png", residual={0: 10.0, 2: 20.0}))
    with pytest.raises(InvalidInputError):
        plot_norms(vec, tmp_path / "missing" / "n.png")


# --- layer scan ---------------------------------------------------------------------------------
_POS = [
    "i love it",
    "so happy today",
    "what a great day",
    "a wonderful film",
    "nice kind man",
    "the best song",
    "joy and fun",
    "amazing food",
]
_NEG = ["i hate it", "so sad today", "what a terrible day", "an awful film", "cruel bad man",
        "the worst song", "pain and anger", "horrible food"]  # fmt: skip


def test_scan_uses_one_extraction_pass_and_matches_compute_vector(
    llama: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    original = llama.activations

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("layers"))
        return original(*args, **kwargs)

    monkeypatch.setattr(llama, "activations", counting)
    scan = scan_layers(llama, _POS, _NEG, method="pca", test_fraction=0.25, seed=4, progress=False)
    assert len(calls) == 1 and calls[0] == [0, 1, 2]
    monkeypatch.undo()
    assert scan.layers == (0, 1, 2) and scan.n_train == 12 and scan.n_test == 4
    (train, test), _ = split_classes(8, 8, paired=True, test_fraction=0.25, seed=4)
    reference = compute_vector(
        llama,
        [_POS[i] for i in train],
        [_NEG[i] for i in train],
        method="pca",
        progress=False,
    )
    for layer in scan.layers:
        assert torch.allclose(scan.vector[layer], reference[layer], atol=1e-6)
    # held-out scores by hand at one layer
    acts = llama.activations(_POS + _NEG, layers=[2], progress=False)[2]
    unit = reference[2].double() / reference[2].double().norm()
    proj = acts.double() @ unit
    p_te, n_te = proj[:8][test], proj[8:][test]
    gap = float(p_te.mean() - n_te.mean())
    pooled = ((p_te - p_te.mean()).pow(2).sum() + (n_te - n_te.mean()).pow(2).sum()) / (
        2 * len(test) - 2
    )
    score = scan.scores[2]
    assert score.projection_gap == pytest.approx(gap, rel=1e-4, abs=1e-5)
    assert score.cohens_d == pytest.approx(gap / math.sqrt(float(pooled)), rel=1e-4, abs=1e-5)
    threshold = float(proj[:8][train].mean() + proj[8:][train].mean()) / 2
    correct = int((p_te > threshold).sum() + (n_te <= threshold).sum())
    assert score.projection_accuracy == pytest.approx(correct / (2 * len(test)))
    assert score.pair_accuracy == pytest.approx(float((p_te > n_te).double().mean()))
    assert score.probe_accuracy is not None and 0.0 <= score.probe_accuracy <= 1.0


def test_scan_finds_the_planted_layer_signal() -> None:
    from steerlab.interventions import output_hidden, replace_output_hidden

    model = tiny_model("gpt2")
    yes, no = model.tokenizer.convert_tokens_to_ids(["yes", "no"])
    with torch.no_grad():
        model.adapter.embed.weight[yes] = model.adapter.embed.weight[no]
    u = _direction(seed=9)
    u /= u.norm()
    marked: dict[str, torch.Tensor] = {}

    def on_embed(module: Any, args: Any, output: Any) -> None:
        marked["rows"] = (args[0] == yes).any(dim=1)

    def on_block(module: Any, args: Any, output: Any) -> Any:
        hidden = output_hidden(output)
        return replace_output_hidden(
            output, hidden + 20.0 * marked["rows"].to(hidden.dtype)[:, None, None] * u
        )

    handles = [
        model.adapter.embed.register_forward_hook(on_embed),
        model.adapter.block(1).register_forward_hook(on_block),
    ]
    try:
        base = [p for p in _POS + _NEG]
        scan = scan_layers(
            model, ["yes " + b for b in base], ["no " + b for b in base], progress=False
        )
    finally:
        for handle in handles:
            handle.remove()
    layer0, layer1 = scan.scores[0], scan.scores[1]
    assert layer0.projection_gap == pytest.approx(0.0, abs=1e-4)  # nothing planted yet
    assert layer1.projection_accuracy == 1.0 and layer1.pair_accuracy == 1.0
    assert layer1.cohens_d > 10
    assert scan.best_layer() in (1, 2) and scan.best_layer("projection_accuracy") >= 1
    assert float(torch.nn.functional.cosine_similarity(scan.vector[1], u, dim=0)) > 0.9999


def test_scan_result_outputs(llama: Any, tmp_path: Path) -> None:
    scan = scan_layers(
        llama, _POS, _NEG, layers=[0, -1], test_fraction=0.5, probe=False, progress=False
    )
    assert scan.layers == (0, 2)
    assert all(s.probe_accuracy is None for s in scan.scores)
    table = scan.table()
    assert "cohen_d" in table and len(table.splitlines()) == 4 and "*" in table
    data = json.loads(json.dumps(scan.to_dict(), allow_nan=False))
    assert [s["layer"] for s in data["scores"]] == [0, 2]
    assert _is_png(scan.plot(tmp_path / "scan.png"))
    loaded = SteeringVector.load(scan.vector.save(tmp_path / "scan.safetensors"))
    assert loaded.metadata["split"] == {"test_fraction": 0.5, "seed": 0, "part": "train"}
    assert set(loaded.metadata["layer_info"]["2"]) >= {"cohens_d", "projection_accuracy"}
    with pytest.raises(InvalidInputError):
        scan.best_layer("vibes")


def test_scan_input_errors(llama: Any) -> None:
    with pytest.raises(InvalidInputError, match="at least 2"):
        scan_layers(llama, ["a"], ["b"], progress=False)
    with pytest.raises(InvalidInputError, match="unknown method"):
        scan_layers(llama, _POS, _NEG, method="nope")
    with pytest.raises(InvalidInputError, match="test_fraction"):
        scan_layers(llama, _POS, _NEG, test_fraction=1.5)


def test_cosine_matrix_type_is_exported() -> None:
    assert isinstance(cosine_matrix(SteeringVector({0: torch.ones(2)})), CosineMatrix)


# --- real model ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sentiment_scan_and_lens_on_the_default_model(default_model: Any, tmp_path: Path) -> None:
    from steerlab.data import ContrastDataset, concept_words, load_builtin

    half = ContrastDataset.from_pairs(load_builtin("sentiment").pairs()[::2], name="half")
    scan = scan_layers(default_model, half, layers=list(range(0, 30, 4)), probe=False)
    scores = {s.layer: s for s in scan.scores}
    # the evidence for "middle-to-late layers": held-out separation grows with depth
    assert abs(scores[0].cohens_d) < 0.5
    assert scan.best_layer() >= 12 and scores[scan.best_layer()].cohens_d > 2.0
    assert max(s.projection_accuracy for s in scan.scores) >= 0.85
    assert _is_png(scan.plot(tmp_path / "scan.png"))
    # read through the unembedding, the sentiment direction favours positive words
    tok = default_model.tokenizer
    good, bad = concept_words("sentiment")
    good_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in good]
    bad_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in bad]
    for through_norm in (False, True):
        logits = lens_direction(default_model, scan.vector[24], through_norm=through_norm)
        assert float(logits[good_ids].mean()) > float(logits[bad_ids].mean()) + 5.0
    lens = logit_lens(default_model, scan.vector, 24, k=20)
    assert len(lens.boosted) == 20 and lens.boosted[0].value > lens.suppressed[0].value
