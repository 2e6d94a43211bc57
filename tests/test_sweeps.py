"""Sweeps and tuning: a planted effect is found, all evaluation modes agree, splits are honest."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.data import ContrastDataset, concept_words, load_builtin, load_caa, neutral_prompts
from steerlab.errors import InvalidInputError, VectorMismatchError
from steerlab.evaluation import concept_task, evaluate, kl_divergence, kl_task
from steerlab.interventions import Steering
from steerlab.report import render_html
from steerlab.sweeps import SweepResult, compare, sweep
from steerlab.testing import hook_count, tiny_model
from steerlab.tuning import Example, default_layers, split_prompts, tune

# --- a planted effect -------------------------------------------------------------------------
# Three reserved residual dimensions of a tiny Llama: F carries a huge constant (M) on every
# token, so every RMSNorm divides by ~M/sqrt(d) whatever else happens and reads of the other
# planted dimensions become linear in them; E is the steering direction; T feeds the unembedding.
# No original weight reads or writes E, T or F. Block K's MLP gets one unit that computes
# -x_E into E (an eraser: a direction added below layer K is removed), block K+1's MLP one unit
# that copies x_E into T (a detector), and the unembedding reads T as +1/2 logit per unit on the
# target token and -1/2 on the contrast token. So adding s*E at the output of block K moves
# logit(target) - logit(contrast) by s; at a lower layer the eraser removes it, at a higher one
# nothing reads it. The only deviations are the tiny changes of the RMS denominators, O(s^2/M^2).
F_DIM, E_DIM, T_DIM = 31, 30, 29
PLANTED_LAYER = 1
M = 1000.0


def planted_model() -> tuple[sl.SteeredModel, int, int]:
    model = tiny_model("llama")
    hf = model.hf_model
    d = model.d_model
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    dims = [E_DIM, T_DIM, F_DIM]
    gate_gain = 5.0  # silu(5 * sqrt(32)) = 28.3 * (1 - 1e-12): the gate is linear there
    unit_scale = M / (gate_gain * d)  # undoes gate * 1/rms^2 = gate_gain * d / M^2 * M
    with torch.no_grad():
        embed = hf.model.embed_tokens.weight
        embed[:, dims] = 0.0
        embed[:, F_DIM] = M
        for block in hf.model.layers:
            attn, mlp = block.self_attn, block.mlp
            for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                reader.weight[:, dims] = 0.0
            attn.o_proj.weight[dims, :] = 0.0
            mlp.down_proj.weight[dims, :] = 0.0

        def linear_unit(mlp: Any, read: int, write: int, gain: float) -> None:
            mlp.gate_proj.weight[0] = 0.0
            mlp.gate_proj.weight[0, F_DIM] = gate_gain
            mlp.up_proj.weight[0] = 0.0
            mlp.up_proj.weight[0, read] = 1.0
            mlp.down_proj.weight[:, 0] = 0.0
            mlp.down_proj.weight[write, 0] = gain * unit_scale

        linear_unit(hf.model.layers[PLANTED_LAYER].mlp, E_DIM, E_DIM, -1.0)
        linear_unit(hf.model.layers[PLANTED_LAYER + 1].mlp, E_DIM, T_DIM, 1.0)
        target, contrast = model.tokenizer.convert_tokens_to_ids(["good", "bad"])
        half_logit = M / (2 * math.sqrt(d))  # x_T / rms = x_T * sqrt(d) / M
        hf.lm_head.weight[:, dims] = 0.0
        hf.lm_head.weight[target, T_DIM] = half_logit
        hf.lm_head.weight[contrast, T_DIM] = -half_logit
    return model, target, contrast


PLANTED_PROMPTS = ["the movie was", "i think the food is", "a dog", "yesterday we went to the city"]
PLANTED_STRENGTHS = [1.0, 2.0, 4.0, 8.0, 16.0]


@pytest.fixture(scope="module")
def planted() -> tuple[sl.SteeredModel, int, int]:
    return planted_model()


def _planted_sweep(model: sl.SteeredModel, mode: str) -> SweepResult:
    direction = torch.zeros(model.d_model)
    direction[E_DIM] = 1.0
    vector = sl.SteeringVector.from_tensor(direction, layers=[0, 1, 2])
    task = concept_task(model, PLANTED_PROMPTS, target_words=[" good"], contrast_words=[" bad"])
    return sweep(
        model, vector, behaviour=task, strengths=PLANTED_STRENGTHS, mode=mode, progress=False
    )


def _expected_kl(model: sl.SteeredModel, target: int, contrast: int, s: float) -> float:
    base = model.next_token_logits(PLANTED_PROMPTS)
    moved = base.clone()
    moved[:, target] += s / 2
    moved[:, contrast] -= s / 2
    return float(kl_divergence(moved, base).double().mean())


@pytest.mark.parametrize("mode", ["prefix", "batched", "naive"])
def test_sweep_finds_the_planted_layer(planted: Any, mode: str) -> None:
    model, target, contrast = planted
    result = _planted_sweep(model, mode)
    assert result.layers == (0, 1, 2)
    assert result.strengths == (0.0, *PLANTED_STRENGTHS)
    for s in PLANTED_STRENGTHS:
        # the planted layer moves the logit difference by exactly s (up to O(s^2/M^2))
        assert result.point(PLANTED_LAYER, s).shift == pytest.approx(s, rel=2e-3)
        assert result.point(PLANTED_LAYER, s).damage == pytest.approx(
            _expected_kl(model, target, contrast, s), rel=5e-3
        )
        for other in (0, 2):  # erased below, unread above
            assert abs(result.point(other, s).shift) < 1e-2
            assert result.point(other, s).damage < 1e-4
    kl4, kl8 = (_expected_kl(model, target, contrast, s) for s in (4.0, 8.0))
    best = result.recommend(max_damage=(kl4 + kl8) / 2)
    assert (best.layer, best.strength) == (PLANTED_LAYER, 4.0)
    best = result.recommend(max_damage=100.0)
    assert (best.layer, best.strength) == (PLANTED_LAYER, 16.0)
    assert hook_count(model.hf_model) == 0


# --- all modes agree ------------------------------------------------------------------------
def test_batched_and_prefix_sweeps_equal_one_at_a_time(arch_model: sl.SteeredModel) -> None:
    """Per-row batched rows (and prefix reuse) give the one-configuration-per-pass numbers.

    They are bit-identical on every tiny architecture here; the tolerance (1e-6 absolute) only
    leaves room for BLAS kernels that block differently by batch size.
    """
    model = arch_model
    vector = sl.mean_diff(
        model, ["i love it", "so happy today"], ["i hate it", "so sad"], layers=[0, 1, 2]
    )
    behaviour = concept_task(
        model,
        ["the movie was", "i think the food is", "a dog"],
        target_words=[" good", " great"],
        contrast_words=[" bad"],
    )
    damage = kl_task(["the weather today is", "a dog", "my house was so"])  # overlaps one prompt
    results = {
        mode: sweep(
            model,
            vector,
            behaviour=behaviour,
            damage=damage,
            layers=[2, 0, 1],
            strengths=[-2.0, 1.0, 4.0, 0.5],
            positions="all",
            mode=mode,
            max_rows=10,  # forces several batches per layer
            progress=False,
        )
        for mode in ("naive", "batched", "prefix")
    }
    naive = results["naive"]
    for mode in ("batched", "prefix"):
        assert results[mode].mode == mode
        assert results[mode].layers == naive.layers == (0, 1, 2)
        torch.testing.assert_close(
            results[mode].behaviour_scores, naive.behaviour_scores, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            results[mode].damage_scores, naive.damage_scores, atol=1e-6, rtol=0
        )
    # and the naive numbers are the metric applied to ordinary steered calls
    steered = model.next_token_logits(
        list(behaviour.prompts), steering=Steering(vector.select([1]), 4.0)
    )
    base = model.next_token_logits(list(behaviour.prompts))
    expected = behaviour.score(steered, base)
    got = naive.behaviour_scores[1, naive.strengths.index(4.0)]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert naive.damage_scores[:, naive.strengths.index(0.0)].abs().max() == 0
    assert hook_count(model.hf_model) == 0


@pytest.mark.parametrize("mode", ["prefix", "batched", "naive"])
def test_compare_scores_many_vectors_as_rows_like_single_calls(
    llama: sl.SteeredModel, mode: str
) -> None:
    gen = torch.Generator().manual_seed(5)
    d = llama.d_model
    candidates: dict[str, Any] = {
        "early": sl.SteeringVector({0: torch.randn(d, generator=gen)}),
        "late": sl.SteeringVector({2: torch.randn(d, generator=gen)}),
        "two-layer": sl.SteeringVector(
            {1: torch.randn(d, generator=gen), 2: torch.randn(d, generator=gen)}
        ),
        "last-only": Steering(sl.SteeringVector({1: torch.randn(d, generator=gen)}), 3.0, "last"),
    }
    behaviour = concept_task(
        llama, ["the movie was", "a dog ran"], target_words=[" good"], contrast_words=[" bad"]
    )
    damage = kl_task(["the weather today is", "a dog ran"])
    points = compare(
        llama,
        candidates,
        behaviour=behaviour,
        damage=damage,
        strength=2.0,
        mode=mode,
        max_rows=5,
        progress=False,
    )
    base = evaluate(llama, behaviour).double()
    for name, item in candidates.items():
        steering = item if isinstance(item, Steering) else Steering(item, 2.0)
        beh = evaluate(llama, behaviour, steering=steering).double()
        dmg = evaluate(llama, damage, steering=steering).double()
        assert points[name].behaviour == pytest.approx(beh.mean().item(), abs=1e-6)
        assert points[name].shift == pytest.approx((beh - base).mean().item(), abs=1e-6)
        assert points[name].damage == pytest.approx(dmg.mean().item(), abs=1e-7)
    assert points["two-layer"].layer == 1 and points["last-only"].strength == 3.0
    assert hook_count(llama.hf_model) == 0
    with pytest.raises(InvalidInputError, match="candidate 'x'"):
        compare(llama, {"x": torch.ones(d)}, behaviour=behaviour, progress=False)


def test_sweep_positions_last_only_changes_the_last_token(llama: sl.SteeredModel) -> None:
    vector = sl.mean_diff(llama, ["i love it"], ["i hate it"], layers=[1])
    task = kl_task(["the cat sat", "a dog"])
    last = sweep(llama, vector, behaviour=task, strengths=[3.0], positions="last", progress=False)
    expected = evaluate(llama, task, steering=vector, strength=3.0, positions="last")
    torch.testing.assert_close(last.behaviour_scores[0, 1], expected, atol=1e-6, rtol=0)


def test_single_layer_vector_is_used_at_every_layer(llama: sl.SteeredModel) -> None:
    vector = sl.SteeringVector({0: torch.ones(llama.d_model)})
    task = kl_task(["the cat sat"])
    result = sweep(llama, vector, behaviour=task, layers=[0, -1], strengths=[1.0], progress=False)
    assert result.layers == (0, 2)
    moved = sl.SteeringVector({2: torch.ones(llama.d_model)})
    expected = evaluate(llama, task, steering=moved, strength=1.0)
    torch.testing.assert_close(result.behaviour_scores[1, 1], expected, atol=1e-6, rtol=0)


def test_sweep_rejects_bad_input(llama: sl.SteeredModel) -> None:
    task = kl_task(["the cat"])
    two = sl.SteeringVector({0: torch.ones(llama.d_model), 1: torch.ones(llama.d_model)})
    with pytest.raises(VectorMismatchError, match="no direction for layer 2"):
        sweep(llama, two, behaviour=task, layers=[2], progress=False)
    with pytest.raises(VectorMismatchError):
        sweep(llama, sl.SteeringVector({0: torch.ones(7)}), behaviour=task, progress=False)
    with pytest.raises(InvalidInputError, match="mode"):
        sweep(llama, two, behaviour=task, mode="fast", progress=False)
    with pytest.raises(InvalidInputError, match="finite"):
        sweep(llama, two, behaviour=task, strengths=[math.nan], progress=False)
    with pytest.raises(InvalidInputError, match="NextTokenTask"):
        sweep(llama, two, behaviour="kl", progress=False)  # type: ignore[arg-type]
    assert hook_count(llama.hf_model) == 0


def test_strength_zero_is_added_once_and_dedupes(llama: sl.SteeredModel) -> None:
    vector = sl.SteeringVector({1: torch.ones(llama.d_model)})
    result = sweep(
        llama,
        vector,
        behaviour=kl_task(["the cat"]),
        strengths=[2, -0.0, 2.0, 1],
        progress=False,
    )
    assert result.strengths == (0.0, 1.0, 2.0)


# --- results --------------------------------------------------------------------------------
def _synthetic() -> SweepResult:
    # layer 3: shifts 0, 1, 3; layer 5: 0, 2, 5 (prompt means); damage grows with strength
    behaviour = torch.tensor(
        [[[1.0, 1.0], [2.0, 2.0], [3.0, 5.0]], [[1.0, 1.0], [3.0, 3.0], [6.0, 6.0]]]
    )
    damage = torch.tensor([[[0.0], [0.1], [0.3]], [[0.0], [0.2], [0.9]]])
    return SweepResult(
        layers=(3, 5),
        strengths=(0.0, 1.0, 2.0),
        behaviour_scores=behaviour,
        damage_scores=damage,
        behaviour_metric="logprob_diff",
        damage_metric="kl",
        mode="prefix",
        seconds=0.0,
    )


def test_recommend_maximises_behaviour_within_budget() -> None:
    result = _synthetic()
    assert result.baseline == 1.0

    def best(budget: float) -> tuple[int, float]:
        point = result.recommend(max_damage=budget)
        return point.layer, point.strength

    assert best(0.25) == (5, 1.0)  # behaviour 3.0 beats layer 3's 2.0 at strength 1
    assert best(0.35) == (3, 2.0)  # now layer 3 at strength 2 (4.0) is allowed
    assert best(1.0) == (5, 2.0)
    assert best(0.05) == (3, 0.0)  # only the unsteered points: the tie goes to the lower layer
    with pytest.raises(InvalidInputError):
        result.recommend(max_damage=-1.0)


def test_points_grid_and_sem() -> None:
    result = _synthetic()
    p = result.point(3, 2.0)
    assert (p.behaviour, p.shift, p.damage, p.damage_max) == pytest.approx((4.0, 3.0, 0.3, 0.3))
    assert p.behaviour_sem == pytest.approx(torch.tensor([2.0, 4.0]).std().item() / math.sqrt(2))
    assert result.grid("shift").tolist() == [[0.0, 1.0, 3.0], [0.0, 2.0, 5.0]]
    with pytest.raises(InvalidInputError):
        result.grid("layer")
    with pytest.raises(InvalidInputError):
        result.point(4, 1.0)
    table = result.table(max_damage=0.25)
    assert "+2.000/0.200*" in table and "+5.000/0.900!" in table


def test_json_and_csv_hold_every_point(tmp_path: Path) -> None:
    result = _synthetic()
    data = json.loads(result.to_json(tmp_path / "s.json").read_text())
    assert len(data["points"]) == 6 and data["behaviour_scores"][0][2] == [3.0, 5.0]
    result.to_csv(tmp_path / "s.csv")
    with (tmp_path / "s.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    assert float(rows[5]["shift"]) == 5.0 and int(rows[5]["layer"]) == 5


# --- splits ---------------------------------------------------------------------------------
def test_split_prompts_is_seeded_disjoint_and_complete() -> None:
    prompts = [f"prompt {i}" for i in range(20)]
    train, test = split_prompts(prompts, test_fraction=0.25, seed=3)
    assert len(test) == 5 and sorted(train + test) == sorted(prompts)
    assert not set(train) & set(test)
    assert train == sorted(train, key=prompts.index)  # original order kept
    assert split_prompts(prompts, test_fraction=0.25, seed=3) == (train, test)
    assert split_prompts(prompts, test_fraction=0.25, seed=4) != (train, test)
    with pytest.raises(InvalidInputError):
        split_prompts(["one"], test_fraction=0.5, seed=0)
    with pytest.raises(InvalidInputError):
        split_prompts(prompts, test_fraction=1.0, seed=0)


def test_default_layers() -> None:
    assert default_layers(2) == [0, 1]
    layers = default_layers(30)
    assert len(layers) == 8 and layers[0] >= 3 and layers[-1] <= 26
    assert layers == sorted(set(layers))


# --- tune -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned() -> tuple[Any, Any]:
    model = tiny_model("llama")
    result = tune(
        model,
        "sentiment",
        layers=[0, 1, 2],
        strengths=[-16.0, -4.0, 4.0, 16.0],  # this random model's vector points the wrong way
        max_kl=0.05,
        seed=7,
        n_examples=2,
        max_new_tokens=4,
        progress=False,
    )
    return model, result


def test_tune_uses_explicit_seeded_splits(tuned: Any) -> None:
    model, result = tuned
    data = load_builtin("sentiment")
    train, test = data.split(test_fraction=0.25, seed=7)
    expected = sl.compute_vector(
        model, list(train.positive), list(train.negative), layers=[0, 1, 2]
    )
    for layer in (0, 1, 2):
        assert torch.equal(result.vector[layer], expected[layer])  # from the train pairs only
    s = result.settings
    train_prompts, test_prompts = split_prompts(
        neutral_prompts("sentiment"), test_fraction=0.25, seed=7
    )
    assert (s["train_prompts"], s["test_prompts"]) == (train_prompts, test_prompts)
    assert not set(s["train_prompts"]) & set(s["test_prompts"])
    assert (s["n_train_pairs"], s["n_test_pairs"]) == (len(train), len(test))


def test_tune_recommendation_and_heldout_numbers_are_independent_measurements(tuned: Any) -> None:
    model, result = tuned
    best = result.recommended_point
    assert best.strength != 0.0 and best.shift > 0  # a real recommendation, not the fallback
    assert best.damage <= result.max_kl
    feasible = [p for p in result.sweep.points if p.damage <= result.max_kl]
    assert best.behaviour == max(p.behaviour for p in feasible)
    layer, strength = result.recommended
    pos, neg = concept_words("sentiment")
    task = concept_task(
        model, result.settings["test_prompts"], target_words=pos, contrast_words=neg
    )
    steering = Steering(result.vector.select([layer]), strength)
    steered = evaluate(model, task, steering=steering).double().mean().item()
    unsteered = evaluate(model, task).double().mean().item()
    assert result.heldout.steered == pytest.approx(steered, abs=1e-6)
    assert result.heldout.baseline == pytest.approx(unsteered, abs=1e-6)
    assert result.heldout.shift == pytest.approx(steered - unsteered, abs=1e-6)
    assert result.heldout.n_prompts == len(result.settings["test_prompts"]) == 12
    assert set(result.heldout.generation) == {
        "vader",
        "keyword_rate[target]",
        "keyword_rate[contrast]",
        "perplexity",
    }
    assert [e.prompt for e in result.examples] == result.settings["test_prompts"][:2]
    assert result.recommended_vector.layers == (layer,)
    summary = result.summary()
    assert "held-out (12 prompts)" in summary and f"layer {layer}" in summary


def test_tune_examples_are_real_generations(tuned: Any) -> None:
    model, result = tuned
    layer, strength = result.recommended
    steering = Steering(result.vector.select([layer]), strength)
    prompts = [e.prompt for e in result.examples]
    assert [e.baseline for e in result.examples] == model.generate(prompts, max_new_tokens=4)
    assert [e.steered for e in result.examples] == model.generate(
        prompts, max_new_tokens=4, steering=steering
    )


def test_save_writes_every_output_and_a_self_contained_report(tuned: Any, tmp_path: Path) -> None:
    _, result = tuned
    paths = result.save(tmp_path / "out")
    assert set(paths) == {"json", "csv", "vector", "curves", "heatmap", "html"}
    data = json.loads(paths["json"].read_text())
    assert len(data["sweep"]["points"]) == 3 * 5
    assert data["recommended"] == {
        "layer": result.recommended[0],
        "strength": result.recommended[1],
        "op": "add",
    }
    with paths["csv"].open() as handle:
        assert len(list(csv.DictReader(handle))) == 15
    for key in ("curves", "heatmap"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert "http://" not in page and "https://" not in page and "<script" not in page
    vector = sl.SteeringVector.load(paths["vector"])
    assert vector.metadata["recommended_layer"] == result.recommended[0]
    assert torch.equal(vector[0], result.vector[0])


def test_report_escapes_model_text(tuned: Any) -> None:
    _, result = tuned
    odd = dataclasses.replace(result, examples=(Example("<b>hi</b>", "a < b & c", "</td>"),))
    page = render_html(odd, images={"curves": b"x", "heatmap": b"y"})
    assert "&lt;b&gt;hi&lt;/b&gt;" in page and "a &lt; b &amp; c" in page
    assert "<b>hi</b>" not in page and "</td></td>" not in page


def test_tune_on_caa_ab_items(tmp_path: Path) -> None:
    items = [
        {
            "question": f"question {i}\n\nChoices:\n (one) yes\n (two) no",
            "answer_matching_behavior": "(one)" if i % 2 else "(two)",
            "answer_not_matching_behavior": "(two)" if i % 2 else "(one)",
        }
        for i in range(8)
    ]
    path = tmp_path / "ab.json"
    path.write_text(json.dumps(items))
    model = tiny_model("gpt2")
    result = tune(
        model,
        load_caa(path),
        layers=[1],
        strengths=[2.0],
        max_kl=10.0,
        n_examples=1,
        max_new_tokens=2,
        progress=False,
    )
    assert result.sweep.behaviour_metric == "ab_probability"
    assert result.heldout.n_prompts == 2
    assert 0.0 <= result.heldout.baseline <= 1.0 and 0.0 <= result.heldout.steered <= 1.0
    assert result.settings["test_prompts"][0].endswith("\n\nAnswer: (")
    assert set(result.heldout.generation) == {"perplexity"}


def test_tune_needs_words_for_user_datasets(llama: sl.SteeredModel) -> None:
    data = ContrastDataset.from_pairs(
        [(f"i love the {w}", f"i hate the {w}") for w in ("cat", "dog", "house", "car")],
        name="mine",
    )
    with pytest.raises(InvalidInputError, match="target_words"):
        tune(llama, data, layers=[1], progress=False)
    with pytest.raises(InvalidInputError, match="both"):
        tune(llama, data, layers=[1], target_words=[" good"], progress=False)
    result = tune(
        llama,
        data,
        layers=[1],
        strengths=[1.0],
        target_words=[" good"],
        contrast_words=[" bad"],
        n_examples=0,
        progress=False,
    )
    # without neutral prompts the texts of each split's pairs are the evaluation prompts
    assert result.settings["n_test_prompts"] == 2 * result.settings["n_test_pairs"]
    assert result.examples == () and result.heldout.generation == {}


# --- the real model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_sentiment_heldout_shift_on_the_default_model(default_model: Any) -> None:
    """The recommended point moves held-out prompts toward positive words, within the budget."""
    data = ContrastDataset.from_pairs(
        [(p.positive, p.negative) for p in load_builtin("sentiment").pairs()[:20]],
        name="sentiment-20",
    )
    pos, neg = concept_words("sentiment")
    result = tune(
        default_model,
        data,
        layers=[18, 24],
        strengths=[1.0, 2.0],
        max_kl=0.5,
        eval_prompts=neutral_prompts("sentiment")[:16],
        target_words=pos,
        contrast_words=neg,
        n_examples=1,
        max_new_tokens=8,
        progress=False,
    )
    _, strength = result.recommended
    assert strength > 0
    held = result.heldout
    assert held.n_prompts == 4
    assert held.steered > held.baseline  # larger than at strength 0
    assert held.shift > 3 * held.shift_sem > 0
    assert result.recommended_point.damage <= 0.5
    assert held.damage < 0.5


@pytest.mark.slow
def test_prefix_sweep_equals_naive_on_the_default_model(default_model: Any) -> None:
    prompts = neutral_prompts("sentiment")[:4]
    pos, neg = concept_words("sentiment")
    task = concept_task(default_model, prompts, target_words=pos, contrast_words=neg)
    vector = sl.SteeringVector(
        {
            10: torch.randn(576, generator=torch.Generator().manual_seed(0)),
            20: torch.randn(576, generator=torch.Generator().manual_seed(1)) * 5,
        }
    )
    fast = sweep(default_model, vector, behaviour=task, strengths=[2.0], progress=False)
    slow = sweep(
        default_model, vector, behaviour=task, strengths=[2.0], mode="naive", progress=False
    )
    assert fast.mode == "prefix"
    torch.testing.assert_close(fast.behaviour_scores, slow.behaviour_scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.damage_scores, slow.damage_scores, atol=1e-5, rtol=0)
