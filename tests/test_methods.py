"""Direction methods: exact algebra, references, planted directions, inputs and positions."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import steerlab as sl
from steerlab.analysis import residual_norms
from steerlab.data import ContrastDataset, ContrastPair, load_builtin
from steerlab.errors import InvalidInputError
from steerlab.interventions import output_hidden, replace_output_hidden
from steerlab.methods import (
    METHODS,
    compute_vector,
    extract_activations,
    register_method,
    resolve_inputs,
    run_method,
    split_classes,
)
from steerlab.testing import TINY_ARCHITECTURES, tiny_model

ALL_METHODS = ("mean_diff", "pca", "pca_center", "probe")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


# --- synthetic activations --------------------------------------------------------------------
def _synthetic(
    n: int = 300, d: int = 48, shift: float = 3.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paired activations: base + noise, positives shifted by ``shift * u``; a large common
    offset orthogonal to ``u`` makes "mean of the positives" a wrong answer."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    offset = torch.randn(d, generator=g)
    offset = 20.0 * (offset - (offset @ u) * u) / offset.norm()
    base = offset + torch.randn(n, d, generator=g)
    positive = base + shift * u + 0.3 * torch.randn(n, d, generator=g)
    negative = base + 0.3 * torch.randn(n, d, generator=g)
    return positive, negative, u


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("paired", [True, False])
def test_each_method_recovers_a_planted_direction(method: str, paired: bool) -> None:
    # many examples in few dimensions: the probe's sampling noise in its weights is small
    positive, negative, u = _synthetic(n=5000, d=16)
    direction = run_method(method, positive, negative, paired=paired).direction
    assert _cos(direction, u) > 0.99
    assert _cos(positive.mean(0), u) < 0.5  # the offset defeats a method that ignores contrast
    flipped = run_method(method, negative, positive, paired=paired).direction
    assert _cos(flipped, u) < -0.99


def test_mean_diff_is_the_difference_of_means_exactly() -> None:
    positive, negative, _ = _synthetic(n=7, d=5)
    direction = METHODS["mean_diff"](positive, negative)
    expected = positive.double().mean(0).float() - negative.double().mean(0).float()
    assert torch.equal(direction, expected)


def test_pca_paired_matches_an_eigendecomposition_and_mean_diff_scale() -> None:
    positive, negative, _ = _synthetic(n=40, d=12, shift=1.0)
    result = run_method("pca", positive, negative, paired=True)
    diffs = (positive - negative).double().numpy()
    values, vectors = np.linalg.eigh(diffs.T @ diffs)
    top = torch.from_numpy(vectors[:, -1])
    assert abs(_cos(result.direction, top)) > 1 - 1e-9
    mean_diff = (positive - negative).double().mean(0)
    unit = result.direction.double() / result.direction.double().norm()
    assert torch.allclose(result.direction.double(), unit * (unit @ mean_diff), atol=1e-6)
    assert float(unit @ mean_diff) > 0
    assert result.info["explained_variance"] == pytest.approx(values[-1] / values.sum(), rel=1e-6)


def test_pca_unpaired_equals_pca_of_every_cross_difference() -> None:
    positive, negative, _ = _synthetic(n=9, d=6, shift=1.0)
    negative = negative[:7]  # unequal class sizes
    closed_form = run_method("pca", positive, negative, paired=False, scale="unit").direction
    every = (positive[:, None, :] - negative[None, :, :]).reshape(-1, 6).double()
    _, _, vh = torch.linalg.svd(every, full_matrices=False)
    assert abs(_cos(closed_form, vh[0])) > 1 - 1e-9
    assert float(closed_form.norm()) == pytest.approx(1.0, abs=1e-6)


def test_pca_center_matches_sklearn_pca() -> None:
    from sklearn.decomposition import PCA

    positive, negative, _ = _synthetic(n=30, d=10, shift=4.0)
    direction = run_method("pca_center", positive, negative, paired=False).direction
    pooled = torch.cat([positive, negative]).double().numpy()
    reference = torch.from_numpy(PCA(n_components=1).fit(pooled).components_[0])
    assert abs(_cos(direction, reference)) > 1 - 1e-9


def test_probe_matches_sklearn_on_the_same_split() -> None:
    from sklearn.linear_model import LogisticRegression

    positive, negative, _ = _synthetic(n=40, d=8, shift=1.0)
    result = run_method("probe", positive, negative, paired=True, seed=3, test_fraction=0.25)
    (train, test), _ = split_classes(40, 40, paired=True, test_fraction=0.25, seed=3)
    x = torch.cat([positive[train], negative[train]]).double().numpy()
    y = [1] * len(train) + [0] * len(train)
    reference = LogisticRegression(max_iter=2000).fit(x, y)
    assert _cos(result.direction, torch.from_numpy(reference.coef_[0])) > 1 - 1e-6
    x_test = torch.cat([positive[test], negative[test]]).double().numpy()
    expected = reference.score(x_test, [1] * len(test) + [0] * len(test))
    assert result.info["heldout_accuracy"] == pytest.approx(expected)
    assert result.info["n_train"] == 60 and result.info["n_test"] == 20


def test_probe_exposes_its_split() -> None:
    positive, negative, _ = _synthetic(n=12, d=8, shift=1.0)
    result = run_method("probe", positive, negative, paired=False, seed=5, test_fraction=0.25)
    (pos_train, pos_test), (neg_train, neg_test) = split_classes(
        12, 12, paired=False, test_fraction=0.25, seed=5
    )
    assert result.info["split"] == {
        "positive_train": pos_train,
        "positive_test": pos_test,
        "negative_train": neg_train,
        "negative_test": neg_test,
    }
    assert len(pos_test) == 3 and pos_test != neg_test  # unpaired: each class split on its own


def test_probe_with_test_fraction_zero_fits_every_row_like_the_seed() -> None:
    from sklearn.linear_model import LogisticRegression

    positive, negative, _ = _synthetic(n=20, d=8, shift=1.0)
    result = run_method("probe", positive, negative, paired=True, test_fraction=0)
    x = torch.cat([positive, negative]).double().numpy()
    reference = LogisticRegression(max_iter=2000).fit(x, [1] * 20 + [0] * 20)
    assert _cos(result.direction, torch.from_numpy(reference.coef_[0])) > 1 - 1e-6
    assert result.info["heldout_accuracy"] is None and result.info["n_test"] == 0
    assert result.info["split"]["positive_train"] == list(range(20))
    assert result.info["train_accuracy"] == pytest.approx(reference.score(x, [1] * 20 + [0] * 20))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, True, "0.2"])
def test_probe_rejects_a_bad_test_fraction(bad: Any) -> None:
    positive, negative, _ = _synthetic(n=8, d=4)
    with pytest.raises(InvalidInputError, match="test_fraction"):
        run_method("probe", positive, negative, paired=True, test_fraction=bad)


def test_probe_split_lands_in_the_saved_vector(tmp_path: Any) -> None:
    model = tiny_model("gpt2")
    pos, neg = ["i love it", "so happy", "great day"], ["i hate it", "so sad", "awful day"]
    vec = compute_vector(model, pos, neg, layers=[1], method="probe", test_fraction=0)
    vec.save(tmp_path / "p.safetensors")
    info = sl.SteeringVector.load(tmp_path / "p.safetensors").metadata["layer_info"]["1"]
    assert info["split"]["negative_train"] == [0, 1, 2] and info["heldout_accuracy"] is None


def test_scale_unit_gives_unit_norm() -> None:
    positive, negative, _ = _synthetic(n=20, d=8)
    for method in ("pca", "pca_center", "probe"):
        direction = run_method(method, positive, negative, paired=True, scale="unit").direction
        assert float(direction.norm()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InvalidInputError):
        run_method("pca", positive, negative, paired=True, scale="big")


def test_paired_split_keeps_pairs_together_and_is_seeded() -> None:
    (pt, ps), (nt, ns) = split_classes(10, 10, paired=True, test_fraction=0.3, seed=1)
    assert pt == nt and ps == ns and len(ps) == 3 and sorted(pt + ps) == list(range(10))
    assert split_classes(10, 10, paired=True, test_fraction=0.3, seed=1)[0] == (pt, ps)
    assert split_classes(10, 10, paired=True, test_fraction=0.3, seed=2)[0] != (pt, ps)
    with pytest.raises(InvalidInputError):
        split_classes(1, 1, paired=True, test_fraction=0.5, seed=0)


def test_registered_custom_method_without_extra_keywords(llama: Any) -> None:
    @register_method("first_pair")
    def first_pair(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return positive[0] - negative[0]

    try:
        vec = compute_vector(
            llama,
            ["i love it", "so good"],
            ["i hate it", "so bad"],
            layers=[1],
            method="first_pair",
            progress=False,
        )
        acts = llama.activations(["i love it", "i hate it"], layers=[1], progress=False)
        assert torch.allclose(vec[1], acts[1][0] - acts[1][1], atol=1e-5)
    finally:
        del METHODS["first_pair"]


def test_bad_method_output_is_reported() -> None:
    METHODS["broken"] = lambda p, n, **_: torch.ones(3)
    try:
        with pytest.raises(InvalidInputError, match="Tensor\\[d_model\\]"):
            run_method("broken", torch.ones(2, 5), torch.zeros(2, 5), paired=True)
    finally:
        del METHODS["broken"]
    with pytest.raises(InvalidInputError, match="unknown method"):
        run_method("nope", torch.ones(2, 5), torch.zeros(2, 5), paired=True)


# --- a planted direction inside a real forward pass --------------------------------------------
_WORDS = "the a cat dog man woman movie book food song weather city house car tree sky".split()


def _base_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 6))) for _ in range(n)]


@pytest.fixture
def planted() -> Iterator[Any]:
    """A tiny model in which prompts starting with "yes" carry ``c * u`` at block 1's output.

    "yes" and "no" get the same embedding, so "yes <text>" and "no <text>" give identical
    activations except for the planted shift: the true direction is known exactly.
    """
    handles: list[Any] = []

    def make(
        arch: str, multiple: float, n: int = 48
    ) -> tuple[Any, torch.Tensor, list[str], list[str]]:
        model = tiny_model(arch)
        yes, no = model.tokenizer.convert_tokens_to_ids(["yes", "no"])
        embedding = model.adapter.embed.weight
        with torch.no_grad():
            embedding[yes] = embedding[no]
        base = _base_prompts(n)
        typical = residual_norms(model, base, layers=[1])[1]
        g = torch.Generator().manual_seed(11)
        u = torch.randn(model.d_model, generator=g)
        u /= u.norm()
        shift = multiple * typical * u
        marked: dict[str, torch.Tensor] = {}

        def on_embed(module: Any, args: Any, output: Any) -> None:
            marked["rows"] = (args[0] == yes).any(dim=1)

        def on_block(module: Any, args: Any, output: Any) -> Any:
            hidden = output_hidden(output)
            add = marked["rows"].to(hidden.dtype)[:, None, None] * shift.to(hidden.dtype)
            return replace_output_hidden(output, hidden + add)

        handles.append(model.adapter.embed.register_forward_hook(on_embed))
        handles.append(model.adapter.block(1).register_forward_hook(on_block))
        return model, u, ["yes " + b for b in base], ["no " + b for b in base]

    try:
        yield make
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_contrastive_methods_recover_a_planted_shift_exactly(planted: Any, arch: str) -> None:
    model, u, positive, negative = planted(arch, 1.0, n=16)
    mean = compute_vector(model, positive, negative, layers=[1], progress=False)
    pca = compute_vector(model, positive, negative, layers=[1], method="pca", progress=False)
    assert _cos(mean[1], u) > 0.9999 and _cos(pca[1], u) > 0.9999
    # the shift's size is recovered too: mean_diff is c * u, and pca's scale matches it
    size = float(mean[1].norm())
    assert torch.allclose(mean[1], size * u, atol=1e-4 * size)
    assert torch.allclose(pca[1], mean[1], atol=1e-4 * size)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_method_recovers_a_planted_shift(planted: Any, arch: str) -> None:
    model, u, positive, negative = planted(arch, 5.0)
    dataset = ContrastDataset.from_pairs(list(zip(positive, negative, strict=True)), name="planted")
    for method in ALL_METHODS:
        vec = compute_vector(model, dataset, layers=[1], method=method, progress=False)
        assert _cos(vec[1], u) > 0.99, method
        assert vec.metadata["method"] == method
    assert vec.metadata["layer_info"]["1"]["heldout_accuracy"] == 1.0  # the probe's


# --- inputs -------------------------------------------------------------------------------------
def test_input_forms_give_the_same_vector(llama: Any) -> None:
    pairs = [("i love it", "i hate it"), ("so good", "so bad"), ("great day", "awful day")]
    positive = [p for p, _ in pairs]
    negative = [n for _, n in pairs]
    dataset = ContrastDataset.from_pairs(pairs, name="toy", description="a toy set")
    lists = compute_vector(llama, positive, negative, layers=[2], progress=False)
    from_dataset = compute_vector(llama, dataset, layers=[2], progress=False)
    from_pairs = compute_vector(
        llama, [ContrastPair(p, n) for p, n in pairs], layers=[2], progress=False
    )
    assert torch.equal(lists[2], from_dataset[2]) and torch.equal(lists[2], from_pairs[2])
    assert from_dataset.metadata["dataset"] == {
        "name": "toy",
        "description": "a toy set",
        "source": "",
        "n_positive": 3,
        "n_negative": 3,
        "paired": True,
    }


def test_pairing_rules() -> None:
    assert resolve_inputs(["a", "b"], ["c", "d"]).paired
    assert not resolve_inputs(["a", "b"], ["c"]).paired
    assert not resolve_inputs(["a", "b"], ["c", "d"], paired=False).paired
    unpaired = ContrastDataset(name="u", positive=("a", "b"), negative=("c", "d"), paired=False)
    assert not resolve_inputs(unpaired).paired
    with pytest.raises(InvalidInputError, match="as many"):
        resolve_inputs(["a", "b"], ["c"], paired=True)
    for bad in (("one string", ["x"]), ([], ["x"]), (["x", 3], ["y", "z"])):
        with pytest.raises(InvalidInputError):
            resolve_inputs(*bad)
    with pytest.raises(InvalidInputError):
        resolve_inputs(["just positives"])
    with pytest.raises(InvalidInputError):
        resolve_inputs(42)


def test_unknown_method_and_bad_positions(llama: Any) -> None:
    with pytest.raises(InvalidInputError, match="unknown method"):
        compute_vector(llama, ["a"], ["b"], method="magic")
    with pytest.raises(InvalidInputError):
        compute_vector(llama, ["a"], ["b"], positions="first")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="outside prompt"):
        compute_vector(llama, ["the cat"], ["a dog"], positions=-5, progress=False)


def test_int_positions_read_that_token(llama: Any) -> None:
    prompts = ["the cat sat on the mat", "a dog", "she went to the city today", "one two three"]
    acts = extract_activations(llama, prompts, layers=[0, 2], positions=-2, batch_size=3)
    full = llama.activations(prompts, layers=[0, 2], positions="all", progress=False)
    for layer in (0, 2):
        expected = torch.stack([seq[-2] for seq in full[layer]])
        # batches of 3 pad differently from one batch of 4: equal up to float rounding
        assert torch.allclose(acts[layer], expected, atol=1e-5, rtol=1e-5)
    first = extract_activations(llama, prompts, layers=[1], positions=0, batch_size=len(prompts))
    full1 = llama.activations(prompts, layers=[1], positions="all", progress=False)[1]
    assert torch.equal(first[1], torch.stack([seq[0] for seq in full1]))


def test_mean_positions_and_layers(llama: Any) -> None:
    vec = compute_vector(
        llama,
        ["i love it", "so good"],
        ["i hate it", "so bad"],
        layers=[-1, 0],
        positions="mean",
        progress=False,
    )
    acts = llama.activations(
        ["i love it", "so good", "i hate it", "so bad"],
        layers=[0, 2],
        positions="mean",
        progress=False,
    )
    assert vec.layers == (0, 2)
    expected = acts[2][:2].double().mean(0).float() - acts[2][2:].double().mean(0).float()
    assert torch.equal(vec[2], expected)
    assert vec.metadata["positions"] == "mean"


def test_metadata_of_a_computed_vector_is_self_describing(llama: Any) -> None:
    vec = compute_vector(
        llama,
        ["i love it", "so good", "great", "nice"],
        ["i hate it", "so bad", "awful", "sad"],
        layers=[1],
        method="probe",
        progress=False,
    )
    meta = vec.metadata
    assert meta["model_name"] == "tiny-llama" and meta["d_model"] == 32 and meta["n_layers"] == 3
    assert meta["site"] == "resid" and meta["operation"] == "add"
    assert meta["layer_convention"] == "output of block L, 0-based"
    assert meta["method"] == "probe" and meta["positions"] == "last"
    assert meta["unembed_fingerprint"] == sl.vectors.model_fingerprint(llama)
    assert set(meta["layer_info"]["1"]) >= {"heldout_accuracy", "train_accuracy"}


def test_mean_diff_wrapper_matches_compute_vector(llama: Any) -> None:
    pos, neg = ["i love it", "so happy"], ["i hate it", "so sad"]
    a = sl.mean_diff(llama, pos, neg, layers=[1], progress=False)
    b = compute_vector(llama, pos, neg, layers=[1], method="mean_diff", progress=False)
    assert torch.equal(a[1], b[1])


# --- real model ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_pca_and_probe_agree_in_sign_with_mean_diff_on_real_data(default_model: Any) -> None:
    pairs = load_builtin("sentiment").pairs()[::2]  # half the set keeps the slow tier lean
    positive = [p.positive for p in pairs]
    negative = [p.negative for p in pairs]
    layers = [14, 18]  # the forward pass stops after block 18
    acts = extract_activations(default_model, positive + negative, layers=layers, batch_size=36)
    n = len(pairs)
    for layer in layers:
        pos, neg = acts[layer][:n], acts[layer][n:]
        reference = run_method("mean_diff", pos, neg, paired=True).direction
        pca = run_method("pca", pos, neg, paired=True).direction
        probe = run_method("probe", pos, neg, paired=True)
        assert _cos(pca, reference) > 0.8
        assert _cos(probe.direction, reference) > 0.4
        assert probe.info["heldout_accuracy"] >= 0.75


# --- cost: a mean_diff vector reads only up to its deepest layer -------------------------------
def _count_blocks(model: Any) -> tuple[list[int], list[Any]]:
    calls = [0] * model.n_layers

    def counter(layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            calls[layer] += 1

        return hook

    handles = [
        model.adapter.block(layer).register_forward_hook(counter(layer))
        for layer in range(model.n_layers)
    ]
    return calls, handles


@pytest.mark.parametrize("positions", ["last", -2])
def test_mean_diff_runs_blocks_only_up_to_its_layer_and_is_bit_identical(positions: Any) -> None:
    model = tiny_model("llama")  # 3 blocks
    pos = ["i love it so", "so happy today", "what a great day"]
    neg = ["i hate it so", "so sad today", "what a bad day"]
    calls, handles = _count_blocks(model)
    try:
        cheap = compute_vector(model, pos, neg, layers=[1], positions=positions, batch_size=2)
        assert calls == [3, 3, 0]  # three batches of the six prompts, block 2 never runs
        calls[:] = [0, 0, 0]
        full = compute_vector(
            model, pos, neg, layers=[1], positions=positions, batch_size=2, plane=True
        )
        assert calls == [3, 3, 3]
        calls[:] = [0, 0, 0]
        last = compute_vector(model, pos, neg, layers=[0, 2], positions=positions, batch_size=2)
        assert calls == [3, 3, 3]  # the last layer is read anyway: the plane comes for free
    finally:
        for handle in handles:
            handle.remove()
    # the direction and the affine reference are the same bits as the full pass's (the code
    # before this change read every layer for every mean_diff vector)
    assert torch.equal(cheap[1], full[1])
    assert torch.equal(cheap.extras["reference"][1], full.extras["reference"][1])
    assert "plane" not in cheap.extras and set(full.extras["plane"]) == {1}
    assert set(last.extras["plane"]) == {0}
    # ...and equal to the formula on activations read separately
    acts = extract_activations(model, pos + neg, layers=[1], positions=positions)[1]
    means = [half.double().mean(dim=0).float() for half in (acts[:3], acts[3:])]
    assert torch.equal(cheap[1], means[0] - means[1])
    assert torch.equal(cheap.extras["reference"][1], means[1])
    # rotate needs the plane: the error says how to get one
    with pytest.raises(sl.VectorMismatchError, match="plane=True"):
        model.logits(["the cat"], steering=cheap, strength=30.0, op="rotate")
    model.logits(["the cat"], steering=full, strength=30.0, op="rotate")
    no_plane = compute_vector(model, pos, neg, layers=[2], plane=False)
    assert "plane" not in no_plane.extras and "reference" in no_plane.extras
    with pytest.raises(InvalidInputError, match="plane"):
        compute_vector(model, pos, neg, layers=[1], plane="yes")  # type: ignore[arg-type]
