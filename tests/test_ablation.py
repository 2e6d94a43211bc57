"""Ablations: zero/mean/directional interventions, streamed means, batched scans."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.ablation import (
    AblationScan,
    ActivationMeans,
    DirectionalAblation,
    LogitDiff,
    Loss,
    MeanAblation,
    ReplaceActivation,
    ZeroAblation,
    ablation_scan,
    compute_means,
    residual_writers,
)
from steerlab.testing import hook_count, tiny_model

PROMPTS = ["the cat sat on the", "a dog ran to the big", "i love the"]


def _capture_input(module: torch.nn.Module, store: list[torch.Tensor]) -> Any:
    return module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))


# --- zero ablation of heads ------------------------------------------------------------------
def test_zero_head_changes_exactly_that_slice(arch_model: sl.SteeredModel) -> None:
    model = arch_model
    adapter = model.adapter
    layer, head = 1, 2
    site = adapter.attn_out(layer)
    clean: list[torch.Tensor] = []
    handle = _capture_input(site, clean)
    try:
        model.logits(PROMPTS)
    finally:
        handle.remove()
    ablated: list[torch.Tensor] = []
    # the ablation is installed first, so the recording pre-hook sees its result
    with model.steer(ZeroAblation(layer, component="head", head=head)):
        handle = _capture_input(site, ablated)
        try:
            model.logits(PROMPTS)
        finally:
            handle.remove()
    before, after = clean[0], ablated[0]
    assert before.shape[-1] == adapter.n_heads * adapter.head_dim
    cols = slice(head * adapter.head_dim, (head + 1) * adapter.head_dim)
    real = model.encode(PROMPTS).attention_mask.bool()
    assert bool((after[real][:, cols] == 0).all())  # padding is left as it is
    assert bool(before[..., cols].abs().sum() > 0)
    keep = torch.ones(before.shape[-1], dtype=torch.bool)
    keep[cols] = False
    assert torch.equal(after[..., keep], before[..., keep])
    assert hook_count(model.hf_model) == 0


def test_zero_head_removes_its_term_of_the_output_projection(llama: sl.SteeredModel) -> None:
    """o_proj(x with head h zeroed) = o_proj(x) - W_O[:, h] x_h, for a GQA model."""
    adapter = llama.adapter
    assert adapter.n_kv_heads < adapter.n_heads
    proj = adapter.attn_out(0)
    outputs: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    h1 = proj.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    h2 = _capture_input(proj, inputs)
    try:
        llama.logits(["the cat sat"])
        llama.logits(["the cat sat"], steering=ZeroAblation(0, component="head", head=[1, 3]))
    finally:
        h1.remove()
        h2.remove()
    x = inputs[0]
    weight = proj.weight.detach()
    expected = outputs[0].clone()
    for head in (1, 3):
        cols = slice(head * adapter.head_dim, (head + 1) * adapter.head_dim)
        expected -= x[..., cols] @ weight[:, cols].T
    torch.testing.assert_close(outputs[1], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("component", ["block", "attn", "mlp"])
def test_zero_ablation_of_components_zeroes_the_site(component: str) -> None:
    model = tiny_model("gpt2")
    module = {
        "block": model.adapter.block(1),
        "attn": model.adapter.attention(1),
        "mlp": model.adapter.mlp(1),
    }[component]
    seen: list[torch.Tensor] = []
    with model.steer(ZeroAblation(1, component=component)):
        handle = module.register_forward_hook(
            lambda m, a, out: seen.append(sl.interventions.output_hidden(out).clone())
        )
        try:
            steered = model.logits(["the cat sat"])
        finally:
            handle.remove()
    assert bool((seen[0] == 0).all())
    assert not torch.equal(steered, model.logits(["the cat sat"]))


def test_rows_mask_ablates_only_those_rows(llama: sl.SteeredModel) -> None:
    clean = llama.logits(PROMPTS[:2])
    ablated = llama.logits(
        PROMPTS[:2], steering=ZeroAblation(0, component="head", head=0, rows=[False, True])
    )
    assert torch.equal(ablated[0], clean[0])
    assert not torch.equal(ablated[1], clean[1])
    with pytest.raises(sl.InvalidInputError, match="rows"):
        llama.logits(PROMPTS, steering=ZeroAblation(0, rows=[True, False]))


def test_position_restricted_ablation_leaves_other_positions(llama: sl.SteeredModel) -> None:
    clean = llama.activations(["the cat sat on"], layers=[1], positions="all")[1][0]
    only_last = llama.activations(
        ["the cat sat on"],
        layers=[1],
        positions="all",
        steering=ZeroAblation(1, positions="last"),
    )[1][0]
    assert torch.equal(only_last[:-1], clean[:-1])
    assert bool((only_last[-1] == 0).all())


def test_ablation_validation() -> None:
    model = tiny_model("llama")
    with pytest.raises(sl.InvalidInputError, match="head="):
        model.logits(["a"], steering=ZeroAblation(0, component="head"))
    with pytest.raises(sl.InvalidInputError, match="out of range"):
        model.logits(["a"], steering=ZeroAblation(0, component="head", head=9))
    with pytest.raises(sl.InvalidInputError, match="unknown component"):
        ZeroAblation(0, component="residual")
    with pytest.raises(sl.LayerIndexError):
        model.logits(["a"], steering=ZeroAblation(7))
    with pytest.raises(sl.VectorMismatchError, match="width"):
        model.logits(["a"], steering=MeanAblation(0, torch.zeros(5)))
    assert hook_count(model.hf_model) == 0


# --- mean ablation -----------------------------------------------------------------------------
@pytest.mark.parametrize("component", ["block", "attn", "mlp", "head"])
def test_mean_of_the_same_single_prompt_leaves_it_unchanged(
    arch_model: sl.SteeredModel, component: str
) -> None:
    model = arch_model
    prompt = ["the cat sat on the mat"]
    means = compute_means(model, prompt, layers=[1], components=[component])
    head = [0, 3] if component == "head" else None
    clean = model.logits(prompt)
    same = model.logits(prompt, steering=MeanAblation(1, means, component=component, head=head))
    assert torch.equal(same, clean)
    # the position-averaged mean is not the activation itself: this test can fail
    averaged = model.logits(
        prompt,
        steering=MeanAblation(1, means, component=component, head=head, per_position=False),
    )
    assert not torch.allclose(averaged, clean, atol=1e-4)


def test_compute_means_matches_direct_average(llama: sl.SteeredModel) -> None:
    prompts = ["the cat sat", "a dog ran to the big house", "i love it", "no"]
    acts = llama.activations(prompts, layers=[0, 2], positions="all")
    means = compute_means(llama, prompts, layers=[0, 2], batch_size=3)
    one_by_one = compute_means(llama, prompts, layers=[0, 2], batch_size=1)
    for layer in (0, 2):
        tokens = torch.cat(acts[layer])
        torch.testing.assert_close(means.mean("block", layer), tokens.mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            means.mean("block", layer), one_by_one.mean("block", layer), atol=1e-5, rtol=0
        )  # padding changes float rounding, not values
        table = means.per_position[("block", layer)]
        for position in range(table.shape[0]):
            rows = [a[position] for a in acts[layer] if a.shape[0] > position]
            torch.testing.assert_close(
                table[position], torch.stack(rows).mean(0), atol=1e-6, rtol=0
            )
    assert means.position_counts is not None
    assert means.position_counts.tolist() == [4, 3, 3, 1, 1, 1, 1]
    assert means.n_tokens == sum(a.shape[0] for a in acts[0])


def test_means_max_length_and_head_width(llama: sl.SteeredModel) -> None:
    means = compute_means(
        llama, ["the cat sat on the mat"], layers=[1], components=["head"], max_length=2
    )
    assert tuple(means.per_position[("head", 1)].shape) == (2, 32)
    assert means.n_tokens == 6
    flat = compute_means(llama, ["the cat"], layers=[1], per_position=False)
    assert flat.per_position == {} and flat.position_counts is None


def test_mean_ablation_is_batch_invariant(llama: sl.SteeredModel) -> None:
    means = compute_means(llama, ["the big cat sat", "a dog"], layers=[1], components=["head"])
    ablation = MeanAblation(1, means, component="head", head=2)
    batched = llama.logits(PROMPTS, steering=ablation)
    for row, prompt in enumerate(PROMPTS):
        alone = llama.logits([prompt], steering=ablation)[0]
        width = alone.shape[0]
        torch.testing.assert_close(batched[row, -width:], alone, atol=1e-5, rtol=1e-5)


def test_means_cache_round_trip(llama: sl.SteeredModel, tmp_path: Path, monkeypatch: Any) -> None:
    cache = tmp_path / "means.safetensors"
    first = compute_means(llama, PROMPTS, layers=[1], components=["mlp", "head"], cache=cache)
    assert cache.is_file()

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(llama, "forward_batch", boom)
        again = compute_means(llama, PROMPTS, layers=[1], components=["mlp", "head"], cache=cache)
    for key in first.means:
        assert torch.equal(again.means[key], first.means[key])
        assert torch.equal(again.per_position[key], first.per_position[key])
    assert again.n_tokens == first.n_tokens
    other = compute_means(llama, PROMPTS[:1], layers=[1], components=["mlp"], cache=cache)
    assert other.n_prompts == 1
    assert ActivationMeans.load(cache).n_prompts == 1
    vector = first.to_vector("mlp")
    assert vector.layers == (1,) and torch.equal(vector[1], first.mean("mlp", 1))


def test_means_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(sl.VectorFileError):
        ActivationMeans.load(bad)
    vec = sl.SteeringVector({0: torch.ones(4)})
    vec.save(tmp_path / "vec.safetensors")
    with pytest.raises(sl.VectorFileError, match="means"):
        ActivationMeans.load(tmp_path / "vec.safetensors")


# --- activation patching -------------------------------------------------------------------------
def test_replace_activation_puts_stored_states_in_place(llama: sl.SteeredModel) -> None:
    source = "the capital of france is paris"
    paris = llama.activations([source], layers=[1], positions="all")[1][0]
    target = ["the capital of germany is"]
    patched = llama.activations(
        target, layers=[1], positions="all", steering=ReplaceActivation(1, paris)
    )[1][0]
    assert torch.equal(patched, paris[: patched.shape[0]])
    # a longer prompt keeps its own activation beyond the stored positions
    longer = ["the capital of germany is berlin and it is big"]
    n = paris.shape[0]
    own = llama.activations(longer, layers=[1, 2], positions="all")
    mixed = llama.activations(
        longer, layers=[1, 2], positions="all", steering=ReplaceActivation(1, paris)
    )
    assert torch.equal(mixed[1][0][:n], paris)
    assert torch.equal(mixed[1][0][n:], own[1][0][n:])
    assert not torch.allclose(mixed[2][0][n:], own[2][0][n:], atol=1e-4)  # later layers see it
    # one vector everywhere
    last = paris[-1]
    everywhere = llama.activations(
        target, layers=[1], positions="all", steering=ReplaceActivation(1, last)
    )[1][0]
    assert torch.equal(everywhere, last.expand_as(everywhere))


# --- directional ablation ------------------------------------------------------------------------
def test_directional_ablation_zero_projection_and_idempotent(
    arch_model: sl.SteeredModel,
) -> None:
    model = arch_model
    torch.manual_seed(0)
    direction = torch.randn(model.d_model)
    unit = direction / direction.norm()
    ablation = DirectionalAblation(direction, layers=[0, 2])
    acts = model.activations(PROMPTS, layers=[0, 1, 2], positions="all", steering=ablation)
    for layer in (0, 2):
        states = torch.cat(acts[layer])
        assert float((states @ unit).abs().max()) < 1e-5 * float(states.norm(dim=-1).max())
    assert float((torch.cat(acts[1]) @ unit).abs().max()) > 1e-3  # layer 1 untouched
    once = model.logits(PROMPTS, steering=ablation)
    with model.steer(ablation):
        twice = model.logits(PROMPTS, steering=ablation)
    torch.testing.assert_close(twice, once, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(once, model.logits(PROMPTS), atol=1e-3)
    assert hook_count(model.hf_model) == 0


def test_directional_ablation_everywhere_keeps_the_stream_clean(
    arch_model: sl.SteeredModel,
) -> None:
    model = arch_model
    torch.manual_seed(1)
    direction = torch.randn(model.d_model)
    unit = direction / direction.norm()
    acts = model.activations(
        PROMPTS, layers=None, positions="all", steering=DirectionalAblation.everywhere(direction)
    )
    for layer in range(model.n_layers):
        states = torch.cat(acts[layer])
        assert float((states @ unit).abs().max()) < 1e-5 * float(states.norm(dim=-1).max())


def test_directional_ablation_per_layer_vector_and_errors(llama: sl.SteeredModel) -> None:
    torch.manual_seed(2)
    vec = sl.SteeringVector({0: torch.randn(32), 2: torch.randn(32)})
    acts = llama.activations(
        PROMPTS, layers=[0, 2], positions="all", steering=DirectionalAblation(vec)
    )
    for layer in (0, 2):
        unit = vec[layer] / vec[layer].norm()
        assert float((torch.cat(acts[layer]) @ unit).abs().max()) < 1e-4
    with pytest.raises(sl.VectorMismatchError, match="no direction for layer 1"):
        llama.logits(["a"], steering=DirectionalAblation(vec, layers=[1]))
    with pytest.raises(sl.VectorMismatchError, match="single direction"):
        llama.logits(["a"], steering=DirectionalAblation(vec, writers=True, embeddings=True))
    with pytest.raises(sl.VectorMismatchError, match="zero direction"):
        DirectionalAblation(torch.zeros(32))
    with pytest.raises(sl.InvalidInputError, match="writers=True"):
        DirectionalAblation(torch.ones(32), embeddings=True)


def test_residual_writers_follow_post_norms() -> None:
    gemma = tiny_model("gemma2").adapter
    block = gemma.block(1)
    assert residual_writers(gemma, 1) == [
        block.post_attention_layernorm,
        block.post_feedforward_layernorm,
    ]
    gpt2 = tiny_model("gpt2").adapter
    assert residual_writers(gpt2, 0) == [gpt2.attention(0), gpt2.mlp(0)]


# --- scans -------------------------------------------------------------------------------------
def _reference_scores(
    model: sl.SteeredModel, prompts: list[str], ablation: Any, metric: Any
) -> torch.Tensor:
    metric.prepare(model, prompts)
    batch = model.encode(prompts)
    logits = model.logits(prompts, steering=ablation)
    return metric(logits, batch.input_ids, batch.attention_mask.bool(), torch.arange(len(prompts)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma2"])
def test_head_scan_matches_one_ablation_at_a_time(arch: str) -> None:
    model = tiny_model(arch)
    scan = ablation_scan(model, PROMPTS, target="house", foil="road", batch_size=7)
    full = ablation_scan(model, PROMPTS, target="house", foil="road", fast=False)
    assert scan.path == "fast" and full.path == "full"
    assert scan.scores.shape == (model.n_layers, model.adapter.n_heads)
    torch.testing.assert_close(scan.ablated, full.ablated, atol=1e-5, rtol=1e-5)
    baseline = _reference_scores(model, PROMPTS, None, LogitDiff("house", "road"))
    torch.testing.assert_close(scan.baseline, baseline, atol=1e-5, rtol=1e-5)
    for layer, head in ((0, 0), (1, 3), (2, 1)):
        reference = _reference_scores(
            model,
            PROMPTS,
            ZeroAblation(layer, component="head", head=head),
            LogitDiff("house", "road"),
        )
        torch.testing.assert_close(scan.ablated[layer, head], reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            scan.scores[layer, head], (reference - baseline).mean(), atol=1e-5, rtol=1e-5
        )
    assert float(scan.scores.abs().max()) > 1e-3


def test_component_scan_with_means_and_loss(llama: sl.SteeredModel) -> None:
    means = compute_means(llama, ["the big cat sat down", "a dog ran"], components=["mlp"])
    scan = ablation_scan(llama, PROMPTS, metric="loss", component="mlp", means=means)
    assert scan.units == (0,) and scan.ablation == "mean" and scan.metric == "loss"
    for layer in range(llama.n_layers):
        reference = _reference_scores(
            llama, PROMPTS, MeanAblation(layer, means, component="mlp"), Loss()
        )
        torch.testing.assert_close(scan.ablated[layer, 0], reference, atol=1e-5, rtol=1e-5)
    baseline = _reference_scores(llama, PROMPTS, None, Loss())
    torch.testing.assert_close(scan.baseline, baseline, atol=1e-5, rtol=1e-5)
    # the loss by hand for the first prompt
    logits = llama.logits(PROMPTS[:1])[0]
    ids = llama.encode(PROMPTS[:1]).input_ids[0]
    by_hand = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    torch.testing.assert_close(baseline[0], by_hand, atol=1e-5, rtol=1e-5)


def test_scan_per_prompt_targets_and_subsets(llama: sl.SteeredModel) -> None:
    targets = ["house", "road", "cat"]
    scan = ablation_scan(llama, PROMPTS, target=targets, layers=[2, 0], heads=[3, 1])
    assert scan.layers == (2, 0) and scan.units == (3, 1)
    reference = _reference_scores(
        llama, PROMPTS, ZeroAblation(0, component="head", head=1), LogitDiff(targets)
    )
    torch.testing.assert_close(scan.ablated[1, 1], reference, atol=1e-5, rtol=1e-5)


def test_scan_under_active_steering_uses_full_passes(llama: sl.SteeredModel) -> None:
    vec = sl.SteeringVector({0: torch.ones(32)})
    with llama.steer(vec):
        scan = ablation_scan(llama, PROMPTS, target="house", layers=[1])
        reference = _reference_scores(
            llama, PROMPTS, ZeroAblation(1, component="head", head=2), LogitDiff("house")
        )
    assert scan.path == "full"
    torch.testing.assert_close(scan.ablated[0, 2], reference, atol=1e-5, rtol=1e-5)


def test_scan_result_outputs(llama: sl.SteeredModel, tmp_path: Path) -> None:
    scan = ablation_scan(llama, PROMPTS, target="house", foil="road")
    assert isinstance(scan, AblationScan)
    rows = scan.rows()
    assert len(rows) == llama.n_layers * llama.adapter.n_heads
    top = scan.top(3)
    assert abs(top[0]["score"]) == float(scan.scores.abs().max())
    assert scan.top(1, by="neg")[0]["score"] == float(scan.scores.min())
    text = scan.format(5)
    assert "layer" in text and len(text.splitlines()) == 7
    csv = scan.to_csv(tmp_path / "scan.csv").read_text().splitlines()
    assert csv[0] == "layer,head,score,std,ablated" and len(csv) == len(rows) + 1
    png = scan.heatmap(tmp_path / "heat.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_scan_errors(llama: sl.SteeredModel) -> None:
    with pytest.raises(sl.InvalidInputError, match="target"):
        ablation_scan(llama, PROMPTS)
    with pytest.raises(sl.InvalidInputError, match="unknown metric"):
        ablation_scan(llama, PROMPTS, metric="accuracy")
    with pytest.raises(sl.InvalidInputError, match="not one"):
        ablation_scan(llama, PROMPTS, target="house road")
    with pytest.raises(sl.InvalidInputError, match="3 prompts"):
        ablation_scan(llama, PROMPTS, target=["house", "road"])
    with pytest.raises(sl.InvalidInputError, match="no mean"):
        ablation_scan(
            llama,
            PROMPTS,
            target="house",
            means=compute_means(llama, PROMPTS, components=["mlp"]),
        )


@pytest.mark.slow
def test_head_scan_on_default_model(default_model: Any) -> None:
    prompts = [
        "When Mary and John went to the store, John gave a drink to",
        "When Tom and Anna went to the park, Anna gave a ball to",
    ]
    scan = ablation_scan(
        default_model,
        prompts,
        target=[" Mary", " Tom"],
        foil=[" John", " Anna"],
        layers=[0, 14, 29],
        progress=False,
    )
    assert scan.path == "fast"
    assert float(scan.baseline.min()) > 0  # the model prefers the indirect object
    reference = _reference_scores(
        default_model,
        prompts,
        ZeroAblation(14, component="head", head=4),
        LogitDiff([" Mary", " Tom"], [" John", " Anna"]),
    )
    torch.testing.assert_close(scan.ablated[1, 4], reference, atol=1e-4, rtol=1e-4)


def test_transformers_output_capturing_hooks_do_not_count_as_foreign(tmp_path: Path) -> None:
    """transformers 5 leaves inert capture hooks on every block after one
    ``output_hidden_states=True`` call; the scan's fast path and ``bake`` must not mistake them
    for someone else's interventions."""
    model = tiny_model("llama")
    ids = model.encode(["the cat sat"])
    model.hf_model(input_ids=ids.input_ids, output_hidden_states=True)
    leftovers = sum(len(m._forward_hooks) for m in model.hf_model.modules())
    if leftovers == 0:
        pytest.skip("this transformers version installs no output-capturing hooks")
    assert hook_count(model.hf_model) == 0
    scan = ablation_scan(model, PROMPTS, target="house", foil="road")
    assert scan.path == "fast"
    vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    sl.bake(model, sl.Steering(vec, strength=2.0), tmp_path / "baked")
    assert (tmp_path / "baked" / "config.json").is_file()
