"""``steerlab eval caa|concept``: the JSON contract on a tiny saved model, and clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _caa_data import TEST, write_caa
from steerlab.caa import CAA_BEHAVIOURS
from steerlab.cli import app
from steerlab.testing import tiny_hf_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_eval_caa_writes_the_contract(model_dir: Path, tmp_path: Path) -> None:
    data = write_caa(tmp_path / "CAA")
    out = tmp_path / "caa.json"
    result = CliRunner().invoke(
        app,
        [
            "eval", "caa", "--behaviour", "sycophancy", "--layer", "1",
            "--multipliers", "1,-1,0", "--limit", "2", "--data", str(data),
            "--model", str(model_dir), "--out", str(out), "--damage-passages", "2",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert list(doc)[:4] == ["behaviour", "layer", "model", "results"]
    assert doc["behaviour"] == "sycophancy" and doc["layer"] == 1
    assert doc["model"] == str(model_dir)
    assert [r["multiplier"] for r in doc["results"]] == [1.0, -1.0, 0.0]
    for row in doc["results"]:
        assert row["n"] == 2 and 0.0 < row["p_matching"] < 1.0
        assert {"kl_neutral", "perplexity_neutral"} <= set(row)
    zero = doc["results"][2]
    assert zero["kl_neutral"] == 0.0
    assert doc["results"][0]["kl_neutral"] > 0.0
    assert "sycophancy (layer 1)" in result.output


def test_eval_caa_all_runs_seven_behaviours(model_dir: Path, tmp_path: Path) -> None:
    data = write_caa(tmp_path / "CAA", CAA_BEHAVIOURS)
    out = tmp_path / "all.json"
    result = CliRunner().invoke(
        app,
        [
            "eval", "caa", "--behaviour", "all", "--layer", "best", "--sweep-layers", "0:3",
            "--validation", "2", "--data", str(data), "--model", str(model_dir),
            "--out", str(out), "--no-damage", "--open-ended",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    docs = json.loads(out.read_text())
    assert [d["behaviour"] for d in docs] == list(CAA_BEHAVIOURS)
    for doc in docs:
        assert list(doc)[:4] == ["behaviour", "layer", "model", "results"]
        assert [r["multiplier"] for r in doc["results"]] == [-1.0, 0.0, 1.0]
        assert all(r["n"] == len(TEST) for r in doc["results"])
        assert [s["layer"] for s in doc["layer_sweep"]] == [0, 1, 2]
        assert doc["settings"]["normalization"] == "caa_mean_norm"
        assert len(doc["open_ended"]) == 3
        # the layer is chosen on the 2 held-out generate items, the vector made from the other 2
        val = {v["layer"]: v["results"] for v in doc["validation_sweep"]}
        gaps = {k: rows[-1]["p_matching"] - rows[0]["p_matching"] for k, rows in val.items()}
        assert doc["layer"] == max(gaps, key=lambda k: gaps[k])
        assert all(r["n"] == 2 for rows in val.values() for r in rows)
        assert doc["settings"]["layer_chosen_on"] == "validation"
        assert (doc["settings"]["n_train"], doc["settings"]["n_validation"]) == (2, 2)
    # identical data for every behaviour and vectors normalised to one norm: same numbers
    assert docs[0]["results"] == docs[-1]["results"]


def test_eval_caa_user_errors_are_one_line(model_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(
        app,
        ["eval", "caa", "--behaviour", "sycophancy", "--data", str(tmp_path / "none"),
         "--model", str(model_dir), "--out", str(tmp_path / "x.json")],
    )  # fmt: skip
    assert missing.exit_code == 1
    assert "error: CAA data not found" in missing.output and "Traceback" not in missing.output
    assert not (tmp_path / "x.json").exists()
    bad = runner.invoke(app, ["eval", "caa", "--behaviour", "x", "--multipliers", "1,a"])
    assert bad.exit_code != 0 and "is not a number" in bad.output
    bad_layer = runner.invoke(app, ["eval", "caa", "--behaviour", "x", "--layer", "top"])
    assert bad_layer.exit_code != 0 and "'best'" in bad_layer.output
    no_val = runner.invoke(
        app, ["eval", "caa", "--behaviour", "x", "--layer", "best", "--validation", "0"]
    )
    assert no_val.exit_code != 0 and "--validation must be positive" in no_val.output
    too_many = runner.invoke(
        app,
        ["eval", "caa", "--behaviour", "sycophancy", "--layer", "best", "--sweep-layers", "0,1",
         "--data", str(write_caa(tmp_path / "CAA")), "--model", str(model_dir),
         "--out", str(tmp_path / "y.json")],
    )  # fmt: skip
    assert too_many.exit_code == 1
    assert "cannot give 16 validation items" in too_many.output
    assert "Traceback" not in too_many.output


def test_eval_concept_writes_rows(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "concept.json"
    result = CliRunner().invoke(
        app,
        [
            "eval", "concept", "--concept", "food", "--layer", "1", "--methods", "mean_diff,pca",
            "--strengths", "2,8", "--instructions", "4", "--max-new-tokens", "3",
            "--model", str(model_dir), "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["concept"] == "food" and doc["layer"] == 1
    names = [r["name"] for r in doc["rows"]]
    assert names[:2] == ["unsteered", "prompting"] and {"mean_diff", "pca"} <= set(names)
    for row in doc["rows"]:
        for key in ("concept", "fluency", "relevance", "combined"):
            assert 0.0 <= row[key] <= 1.0
        if row["name"] not in ("unsteered", "prompting"):
            assert row["strength"] in (2.0, 8.0)
            assert row["kl_neutral"] > 0.0
    assert set(doc["train_curves"]) >= {"mean_diff", "pca"}
    assert doc["settings"]["scale"] == "residual" and doc["settings"]["residual_norm"] > 0
    assert doc["settings"]["operators"] == ["add", "clamp", "add_norm"]
    # reliability beside every vector row: the pairs' consistency, the wrong-way share
    consistency = doc["settings"]["pair_consistency"]
    assert -1.0 <= consistency <= 1.0 and doc["settings"]["judge"] is None
    for row in doc["rows"][2:]:
        assert row["consistency"] == consistency and 0.0 <= row["wrong_way"] <= 1.0
        assert len(row["concept_items"]) == 2  # 4 instructions: 2 chose the strength
    assert "wrong-way" in result.output and "consistency" in result.output
    raw = CliRunner().invoke(
        app,
        [
            "eval", "concept", "--concept", "food", "--layer", "1", "--methods", "mean_diff",
            "--strengths", "2", "--instructions", "2", "--max-new-tokens", "2", "--scale", "raw",
            "--no-damage", "--no-prompting", "--model", str(model_dir), "--out", str(out),
        ],
    )  # fmt: skip
    assert raw.exit_code == 0, raw.output
    settings = json.loads(out.read_text())["settings"]
    assert settings["scale"] == "raw" and settings["residual_norm"] is None
    bad_scale = CliRunner().invoke(
        app, ["eval", "concept", "--scale", "norm", "--model", str(model_dir)]
    )
    assert bad_scale.exit_code == 1 and "scale must be one of" in bad_scale.output
    unknown = CliRunner().invoke(
        app, ["eval", "concept", "--concept", "nope", "--model", str(model_dir)]
    )
    assert unknown.exit_code == 1 and "unknown concept 'nope'" in unknown.output


def test_eval_concept_judge_flags_go_together(model_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["eval", "concept", "--concept", "food", "--layer", "1", "--model", str(model_dir),
         "--judge-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "c.json")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--judge-url and --judge-model go together" in result.output
    assert "Traceback" not in result.output
