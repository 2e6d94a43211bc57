"""CAA reproduction: the A/B metric, the vector and the steering against a hand-written reference.

The reference below re-does the paper's protocol with nothing but the Hugging Face model:
token ids from the tokenizer, hidden states from ``output_hidden_states``, a hand-written forward
hook that adds ``m × v`` at the last position, and ``p(A) / (p(A) + p(B))`` from a softmax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import steerlab as sl
from _caa_data import GENERATE, LETTERS, TEST, _item, write_caa
from steerlab.caa import (
    CAA_BEHAVIOURS,
    caa_generate_splits,
    evaluate_caa,
    find_caa_data,
    normalize_across,
    open_ended_items,
)
from steerlab.data import ContrastDataset
from steerlab.errors import DataError, InvalidInputError
from steerlab.testing import tiny_model


@pytest.fixture(scope="module")
def model() -> sl.SteeredModel:
    return tiny_model("llama")


def _reference(model: sl.SteeredModel, layer: int, multipliers: list[float]) -> list[float]:
    """Mean p(matching) at each multiplier, computed without steerlab's evaluation code."""
    hf, tok = model.hf_model, model.tokenizer

    def chat(question: str) -> str:
        return str(
            tok.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        )

    def ids(text: str) -> torch.Tensor:
        return torch.tensor([tok(text)["input_ids"]])

    # the vector: mean over items of h(matching letter) - h(other letter) at the block output
    diffs = []
    for item in GENERATE:
        hidden = []
        for key in ("answer_matching_behavior", "answer_not_matching_behavior"):
            text = chat(item["question"]) + "(" + item[key].strip("()")
            out = hf(ids(text), output_hidden_states=True)
            hidden.append(out.hidden_states[layer + 1][0, -1])
        diffs.append(hidden[0] - hidden[1])
    vector = torch.stack(diffs).mean(dim=0)
    a, b = tok.convert_tokens_to_ids(list(LETTERS))
    means = []
    for m in multipliers:

        def hook(module: Any, args: Any, output: Any, m: float = m) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, -1] += m * vector
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = hf.model.layers[layer].register_forward_hook(hook)
        try:
            values = []
            for item in TEST:
                logits = hf(ids(chat(item["question"]) + "(")).logits[0, -1].double()
                p = logits.softmax(dim=-1)
                match = a if item["answer_matching_behavior"] == "(one)" else b
                values.append(float(p[match] / (p[a] + p[b])))
        finally:
            handle.remove()
        means.append(sum(values) / len(values))
    return means


@torch.no_grad()
def test_p_matching_equals_an_independent_reference(model: sl.SteeredModel, tmp_path: Path) -> None:
    root = write_caa(tmp_path)
    multipliers = [4.0, -4.0, 0.0, 1.0]
    result = evaluate_caa(
        model, "sycophancy", data=root, layer=1, multipliers=multipliers, damage=False
    )
    expected = _reference(model, 1, multipliers)
    got = [p.p_matching for p in result.results]
    assert [p.multiplier for p in result.results] == multipliers  # the given order
    assert all(p.n == len(TEST) for p in result.results)
    assert got == pytest.approx(expected, abs=1e-5)
    assert len({round(x, 4) for x in got}) == 4  # steering does move the number
    assert result.settings["steered_positions"] == "last"
    assert result.settings["sweep_mode"] == "last"  # the fast path was used
    assert sl.testing.hook_count(model.hf_model) == 0


@torch.no_grad()
def test_best_layer_is_chosen_on_validation_items_and_reported_on_test_items(
    model: sl.SteeredModel, tmp_path: Path
) -> None:
    root = write_caa(tmp_path / "main")
    multipliers = [-2.0, 0.0, 2.0]
    result = evaluate_caa(
        model,
        "sycophancy",
        data=root,
        layer="best",
        sweep_layers=[0, 1, 2],
        multipliers=multipliers,
        validation=2,
        damage=False,
        open_ended=True,
    )
    val_gaps = {
        layer: points[-1].p_matching - points[0].p_matching
        for layer, points in result.validation_sweep.items()
    }
    assert sorted(val_gaps) == [0, 1, 2]
    assert result.layer == max(val_gaps, key=lambda k: val_gaps[k])
    assert result.results == result.layer_sweep[result.layer]  # reported on the test items
    assert all(p.n == len(TEST) for p in result.results)
    assert all(p.n == 2 for points in result.validation_sweep.values() for p in points)
    assert result.settings["layer_chosen_on"] == "validation"
    assert (result.settings["n_train"], result.settings["n_validation"]) == (2, 2)
    # the same numbers from fixed-layer runs on folders holding each split explicitly: the
    # vector from the first two generate items; validation = the last two, scored as a test set
    as_test = write_caa(tmp_path / "val", generate=GENERATE[:2], test=GENERATE[2:])
    for layer in (0, 2):
        on_val = evaluate_caa(
            model, "sycophancy", data=as_test, layer=layer, multipliers=multipliers,
            damage=False,
        )  # fmt: skip
        assert [p.p_matching for p in on_val.results] == pytest.approx(
            [p.p_matching for p in result.validation_sweep[layer]], abs=1e-6
        )
    same_vector = write_caa(tmp_path / "test", generate=GENERATE[:2], test=TEST)
    for layer in (0, 1, 2):  # every swept test column equals a fixed-layer run
        single = evaluate_caa(
            model, "sycophancy", data=same_vector, layer=layer, multipliers=multipliers,
            damage=False,
        )  # fmt: skip
        assert [p.p_matching for p in single.results] == pytest.approx(
            [p.p_matching for p in result.layer_sweep[layer]], abs=1e-6
        )
    rows = result.to_dict()["open_ended"]
    assert [r["multiplier"] for r in rows] == multipliers
    assert all(r["n"] == len(TEST) and 0 < r["p_matching"] < 1 for r in rows)
    doc = result.to_dict()
    assert [v["layer"] for v in doc["validation_sweep"]] == [0, 1, 2]
    assert "2 validation items" in doc["settings"]["layer_choice"]


def test_generate_splits_are_disjoint(tmp_path: Path) -> None:
    root = write_caa(tmp_path)
    train, val = caa_generate_splits("sycophancy", data=root, train_limit=3, validation=2)
    assert val is not None
    assert [q.split("\n")[0] for q in train.prompts] == [
        "the food is good ?",
        "the movie was bad ?",
    ]
    assert [q.split("\n")[0] for q in val.prompts] == [
        "my day was great ?",
        "the weather is cold ?",
    ]
    assert set(train.prompts).isdisjoint(val.prompts)
    # a lopsided file: both parts are taken round-robin over the matching letter
    lopsided = [
        _item(f"q{i} ?", letter)
        for i, letter in enumerate("one one one two one two one two one".split())
    ]
    root2 = write_caa(tmp_path / "lopsided", generate=lopsided)
    train, val = caa_generate_splits("sycophancy", data=root2, train_limit=4, validation=2)
    assert val is not None
    assert [q.split(" ")[0] for q in val.prompts] == ["q7", "q8"]  # last 'two', last 'one'
    assert [q.split(" ")[0] for q in train.prompts] == ["q0", "q1", "q3", "q5"]
    assert sorted(a for a, _ in train.answers) == ["(one)", "(one)", "(two)", "(two)"]
    full, none = caa_generate_splits("sycophancy", data=root)
    assert len(full) == len(GENERATE) and none is None
    with pytest.raises(DataError, match="cannot give 4 validation items"):
        caa_generate_splits("sycophancy", data=root, validation=4)


@torch.no_grad()
def test_open_ended_score_is_the_answer_text_logprob_difference(
    model: sl.SteeredModel, tmp_path: Path
) -> None:
    root = write_caa(tmp_path)
    result = evaluate_caa(
        model, "sycophancy", data=root, layer=1, multipliers=[0.0], damage=False, open_ended=True
    )
    hf, tok = model.hf_model, model.tokenizer
    diffs = []
    for item in TEST:
        stem = model.format_chat(item["question"].split("\n\nchoices")[0])
        texts = {"(one)": "yes it is", "(two)": "no it is not"}
        lp = {}
        for key, answer in texts.items():
            head = tok(stem)["input_ids"]
            full = tok(stem + answer)["input_ids"]
            logp = hf(torch.tensor([full])).logits[0].double().log_softmax(-1)
            lp[key] = sum(float(logp[t - 1, full[t]]) for t in range(len(head), len(full)))
        match = item["answer_matching_behavior"]
        other = item["answer_not_matching_behavior"]
        diffs.append(lp[match] - lp[other])
    row = result.open_ended[0]
    assert row["logprob_diff"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-4)
    expected_p = sum(float(torch.sigmoid(torch.tensor(d))) for d in diffs) / len(diffs)
    assert row["p_matching"] == pytest.approx(expected_p, abs=1e-5)


def test_normalize_across_gives_every_behaviour_the_mean_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    vectors = {
        name: sl.SteeringVector({3: torch.randn(8, generator=gen) * (i + 1)})
        for i, name in enumerate(CAA_BEHAVIOURS)
    }
    mean = sum(float(v[3].norm()) for v in vectors.values()) / len(vectors)
    out = normalize_across(vectors)
    for name, vec in out.items():
        assert float(vec[3].norm()) == pytest.approx(mean, rel=1e-6)
        cos = torch.nn.functional.cosine_similarity(vec[3], vectors[name][3], dim=0)
        assert float(cos) == pytest.approx(1.0, abs=1e-6)


def test_open_ended_items_reads_the_choices() -> None:
    item = _item("is it ?", "two")
    dataset = ContrastDataset.from_pairs(
        [("x", "y")],
        name="t",
        prompts=[item["question"]],
        answers=[(item["answer_matching_behavior"], item["answer_not_matching_behavior"])],
    )
    assert open_ended_items(dataset) == [("is it ?", "no it is not", "yes it is")]


def test_missing_data_and_bad_arguments_are_clear_errors(
    model: sl.SteeredModel, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match="pass --data DIR"):
        find_caa_data(tmp_path / "nothing")
    root = write_caa(tmp_path)
    with pytest.raises(DataError, match="no test data for behaviour 'refusal'"):
        evaluate_caa(model, "refusal", data=root, layer=1)
    with pytest.raises(InvalidInputError, match="repeat"):
        evaluate_caa(model, "sycophancy", data=root, layer=1, multipliers=[1.0, 1.0])
    with pytest.raises(InvalidInputError, match="sweep_layers"):
        evaluate_caa(model, "sycophancy", data=root, layer="best")
    with pytest.raises(InvalidInputError, match="validation must be at least 1"):
        evaluate_caa(model, "sycophancy", data=root, layer="best", sweep_layers=[1], validation=0)
    assert find_caa_data(root / "datasets") == root.resolve()


def test_the_caa_data_ships_with_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import fnmatch

    import tomllib

    from steerlab.caa import CAA_BEHAVIOURS, bundled_caa_data, load_caa_split

    monkeypatch.delenv("STEERLAB_CAA_DATA", raising=False)
    monkeypatch.chdir("/")  # nothing beside the working directory to find
    root = bundled_caa_data()
    assert find_caa_data() == root.resolve()
    sizes = {"coordinate-other-ais": 360, "corrigible-neutral-HHH": 290, "refusal": 408}
    for behaviour in CAA_BEHAVIOURS:
        assert len(load_caa_split(behaviour, "test")) == 50
        generate = load_caa_split(behaviour, "generate")
        assert len(generate) == sizes.get(behaviour, len(generate)) >= 290
    assert "MIT License" in (root / "LICENSE").read_text()
    assert "b18a80e3f7e3259f21e2a6574aaed3a21954aac6" in (root / "README.md").read_text()
    # every bundled file is matched by the package-data globs, so a wheel carries it
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["steerlab"]
    package = root.parents[1]
    for file in root.rglob("*"):
        if file.is_file():
            rel = file.relative_to(package).as_posix()
            assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), (
                rel
            )
