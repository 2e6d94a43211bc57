"""Conditional steering: CAST's grid search, exact row gating, token-level gates, files."""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.conditions import condition_score
from steerlab.testing import hook_count, tiny_model

PROMPTS = ["the cat sat on the mat", "a dog ran", "cat cat cat", "we go to the park now"]
POS = [
    "the cat sat on the mat",
    "a cat and a cat",
    "cat cat cat",
    "my cat is here",
    "the cat is old",
    "i love my cat",
    "a small cat sat",
    "cat and cat",
]
NEG = [
    "go go go now",
    "a dog ran far",
    "we go to the park",
    "now we go",
    "the sun is hot",
    "rain and snow today",
    "they went to paris",
    "i read a book",
]


def _vector(model: sl.SteeredModel, layer: int) -> sl.SteeringVector:
    gen = torch.Generator().manual_seed(5)
    return sl.SteeringVector({layer: torch.randn(model.d_model, generator=gen)})


def _split_condition(model: sl.SteeredModel, layer: int) -> sl.Condition:
    """A hand-made condition whose threshold separates PROMPTS into two firing, two not."""
    gen = torch.Generator().manual_seed(11)
    direction = torch.randn(model.d_model, generator=gen)
    probe = sl.Condition(direction, layer=layer, threshold=0.0)
    scores = probe.scores(model, PROMPTS).sort().values
    return sl.Condition(direction, layer=layer, threshold=float(scores[1] + scores[2]) / 2)


@pytest.mark.parametrize("steer_layer", [1, 2])
def test_only_rows_that_satisfy_the_condition_are_steered(
    arch_model: sl.SteeredModel, steer_layer: int
) -> None:
    cond = _split_condition(arch_model, layer=1)
    fires = cond.fires(arch_model, PROMPTS)
    assert fires.sum() == 2
    vec = _vector(arch_model, steer_layer)
    base = arch_model.logits(PROMPTS)
    steered = arch_model.logits(PROMPTS, steering=vec, strength=4.0)
    gated = arch_model.logits(PROMPTS, steering=vec, strength=4.0, when=cond)
    for row in range(len(PROMPTS)):
        want = steered[row] if fires[row] else base[row]
        if arch_model.adapter.n_experts:
            # gpt-oss groups tokens by expert, so a row's sums depend on which other rows route
            # where: 1 ulp apart between two batches that differ in another row.
            torch.testing.assert_close(gated[row], want, atol=1e-6, rtol=0)
        else:
            assert torch.equal(gated[row], want), row
    with arch_model.steer(vec, strength=4.0, when=cond):
        assert torch.equal(arch_model.logits(PROMPTS), gated)
    assert hook_count(arch_model.hf_model) == 0


def test_generation_gated_by_condition_cache_on_equals_off_and_solo() -> None:
    model = tiny_model("llama")
    cond = _split_condition(model, layer=1)
    fires = cond.fires(model, PROMPTS)
    vec = _vector(model, 2)
    plain = model.generate_ids(PROMPTS, max_new_tokens=6)
    steered = model.generate_ids(PROMPTS, max_new_tokens=6, steering=vec, strength=6.0)
    gated = model.generate_ids(PROMPTS, max_new_tokens=6, steering=vec, strength=6.0, when=cond)
    nocache = model.generate_ids(
        PROMPTS, max_new_tokens=6, steering=vec, strength=6.0, when=cond, use_cache=False
    )
    for row in range(len(PROMPTS)):
        want = steered[row] if fires[row] else plain[row]
        assert gated[row].tolist() == want.tolist()
        assert nocache[row].tolist() == gated[row].tolist()
        solo = model.generate_ids(
            [PROMPTS[row]], max_new_tokens=6, steering=vec, strength=6.0, when=cond
        )[0]
        assert solo.tolist() == gated[row].tolist()


def test_token_level_gate_steers_exactly_the_tokens_where_the_probe_fires(
    arch_model: sl.SteeredModel,
) -> None:
    read_layer, steer_layer = 0, 2
    gen = torch.Generator().manual_seed(2)
    direction = torch.randn(arch_model.d_model, generator=gen)
    hidden_a = arch_model.activations(PROMPTS, layers=[read_layer], positions="all")[read_layer]
    scores = torch.cat([condition_score(h, direction) for h in hidden_a]).sort().values
    threshold = float(scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    cond = sl.Condition(direction, layer=read_layer, threshold=threshold).per_token()
    vec = _vector(arch_model, steer_layer)
    base = arch_model.activations(PROMPTS, layers=[steer_layer], positions="all")[steer_layer]
    gated = arch_model.activations(
        PROMPTS, layers=[steer_layer], positions="all", steering=vec, strength=2.0, when=cond
    )[steer_layer]
    delta = vec[steer_layer] * 2.0
    n_fired = 0
    for row, h in enumerate(hidden_a):
        fired = condition_score(h, direction) > threshold
        n_fired += int(fired.sum())
        assert torch.equal(gated[row][~fired], base[row][~fired])
        assert torch.allclose(gated[row][fired], base[row][fired] + delta, atol=1e-5)
    assert 0 < n_fired < sum(len(h) for h in hidden_a)


def test_same_layer_gate_reads_before_its_own_edit(llama: sl.SteeredModel) -> None:
    cond = _split_condition(llama, layer=1)
    vec = _vector(llama, 1)
    fires = cond.fires(llama, PROMPTS)
    gated = llama.logits(PROMPTS, steering=vec, strength=4.0, when=cond)
    base = llama.logits(PROMPTS)
    assert all(torch.equal(gated[r], base[r]) != bool(fires[r]) for r in range(len(PROMPTS)))


def test_steering_below_the_condition_layer_is_refused(llama: sl.SteeredModel) -> None:
    cond = _split_condition(llama, layer=2)
    with pytest.raises(sl.InvalidInputError, match="below it"):
        llama.logits(PROMPTS, steering=_vector(llama, 1), when=cond)
    assert hook_count(llama.hf_model) == 0


def test_fit_condition_grid_search_and_reported_heldout_accuracy(llama: sl.SteeredModel) -> None:
    cond = sl.fit_condition(llama, POS, NEG, layers=[0, 1, 2], seed=3)
    meta = cond.metadata
    assert cond.layer in (0, 1, 2) and cond.comparison in ("greater", "less")
    assert meta["n_train"] + meta["n_test"] == len(POS) + len(NEG)
    # the reported held-out accuracy is the one the condition has on the held-out prompts
    from steerlab.methods import split_classes

    (_, pos_test), (_, neg_test) = split_classes(
        len(POS), len(NEG), paired=False, test_fraction=0.25, seed=3
    )
    held_pos = [POS[i] for i in pos_test]
    held_neg = [NEG[i] for i in neg_test]
    fired = cond.fires(llama, held_pos + held_neg)
    truth = torch.tensor([True] * len(held_pos) + [False] * len(held_neg))
    assert meta["heldout_accuracy"] == pytest.approx(float((fired == truth).float().mean()))
    # no other grid point beats the chosen one on the train split
    assert meta["train_f1"] >= 0.5
    token = sl.fit_condition(llama, POS, NEG, layers=[1], scope="token")
    assert token.scope == "token" and token.layer == 1


def test_condition_files_round_trip_and_refuse_tampering(llama: sl.SteeredModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cond = sl.fit_condition(llama, POS, NEG, layers=[1])
    path = cond.save(tmp_path / "cond.safetensors")
    back = sl.Condition.load(path)
    assert torch.equal(back.direction, cond.direction)
    assert (back.layer, back.threshold, back.comparison, back.scope) == (
        cond.layer,
        cond.threshold,
        cond.comparison,
        cond.scope,
    )
    assert back.metadata == cond.metadata
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of the tensor
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(sl.VectorFileError, match="checksum"):
        sl.Condition.load(tmp_path / "bad.safetensors")
    text = path.read_bytes().replace(b'"threshold":"', b'"threshold":"1')
    (tmp_path / "bad2.safetensors").write_bytes(text)
    with pytest.raises(sl.VectorFileError):
        sl.Condition.load(tmp_path / "bad2.safetensors")
    with pytest.raises(sl.VectorFileNotFoundError):
        sl.Condition.load(tmp_path / "missing.safetensors")


def test_bad_conditions_are_clear_errors(llama: sl.SteeredModel) -> None:
    with pytest.raises(sl.InvalidInputError, match="comparison"):
        sl.Condition(torch.ones(4), layer=0, threshold=0.1, comparison="bigger")
    with pytest.raises(sl.VectorMismatchError, match="zero"):
        sl.Condition(torch.zeros(4), layer=0, threshold=0.1)
    with pytest.raises(sl.InvalidInputError, match="Condition"):
        llama.logits(PROMPTS, steering=_vector(llama, 1), when="cats")
    with pytest.raises(sl.VectorMismatchError, match="size"):
        llama.logits(
            PROMPTS,
            steering=_vector(llama, 1),
            when=sl.Condition(torch.ones(7), layer=0, threshold=0.1),
        )
    assert hook_count(llama.hf_model) == 0
