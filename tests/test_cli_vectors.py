"""CLI: steerlab compute / analyze / scan, on a tiny model swapped in for the default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

import steerlab
from steerlab.cli import ErrorHandlingGroup, _vectors
from steerlab.data import load_builtin
from steerlab.methods import compute_vector
from steerlab.testing import tiny_model
from steerlab.vectors import SteeringVector

runner = CliRunner()


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer(cls=ErrorHandlingGroup)  # the real CLI's error handling
    _vectors.register(app)
    return app


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``steerlab.load_model`` replaced by a tiny Llama; records the names asked for."""
    seen: dict[str, Any] = {"names": [], "model": tiny_model("llama")}

    def fake_load(name: str | None = None, **kwargs: Any) -> Any:
        seen["names"].append(name)
        return seen["model"]

    monkeypatch.setattr(steerlab, "load_model", fake_load)
    return seen


def test_compute_writes_the_library_vector(
    app: typer.Typer, loaded: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "sentiment.safetensors"
    result = runner.invoke(
        app,
        ["compute", "--data", "sentiment", "--layers", "0,-1", "--method", "pca", "-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "pca" in result.output
    vec = SteeringVector.load(out)
    reference = compute_vector(
        loaded["model"], load_builtin("sentiment"), layers=[0, 2], method="pca", progress=False
    )
    assert vec.layers == (0, 2)
    for layer in vec.layers:
        assert torch.equal(vec[layer], reference[layer])
    assert vec.metadata["dataset"]["name"] == "sentiment"
    assert loaded["names"] == [None]


def test_compute_plane_flag_stores_the_rotation_plane(
    app: typer.Typer, loaded: dict[str, Any], tmp_path: Path
) -> None:
    stored = {}
    for flag in ("--plane", "--no-plane", None):
        out = tmp_path / f"{flag}.safetensors"
        args = ["compute", "-d", "sentiment", "--layers", "1", "-o", str(out)]
        result = runner.invoke(app, args + ([flag] if flag else []))
        assert result.exit_code == 0, result.output
        stored[flag] = SteeringVector.load(out)
    reference = compute_vector(
        loaded["model"], load_builtin("sentiment"), layers=[1], plane=True, progress=False
    )
    assert torch.equal(stored["--plane"].extras["plane"][1], reference.extras["plane"][1])
    assert "plane" not in stored["--no-plane"].extras and "plane" not in stored[None].extras
    assert torch.equal(stored[None][1], reference[1])


def test_compute_from_text_files_with_options(
    app: typer.Typer, loaded: dict[str, Any], tmp_path: Path
) -> None:
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("i love it\nso happy today\nwhat a great day\nnice film\n")
    neg.write_text("i hate it\nso sad today\nwhat a terrible day\nawful film\n")
    out = tmp_path / "v.safetensors"
    args = ["compute", "--positive", str(pos), "--negative", str(neg), "--paired"]
    args += ["-m", "probe", "-l", "1", "-p", "mean", "--normalize", "--strength", "2.5"]
    args += ["--model", "my/model", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    vec = SteeringVector.load(out)
    assert vec.norms()[1] == pytest.approx(1.0, abs=1e-6)
    assert vec.metadata["recommended_strength"] == 2.5
    assert vec.metadata["positions"] == "mean" and vec.metadata["dataset"]["paired"]
    assert "held-out acc" in result.output
    assert loaded["names"] == ["my/model"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["compute", "-d", "sentiment", "-m", "magic"], "unknown method"),
        (["compute", "-d", "sentiment", "-l", "x,y"], "--layers: 'x' is not a layer"),
        (["compute", "-d", "sentiment", "-p", "first"], "positions"),
        (["compute"], "--data"),
        (["compute", "-d", "sentiment", "--positive", "a.txt"], "either --data"),
    ],
)
def test_compute_bad_options_are_usage_errors(
    app: typer.Typer, loaded: dict[str, Any], tmp_path: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "v.safetensors")])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "v.safetensors").exists()


def test_compute_library_errors_exit_1_or_2(
    app: typer.Typer, loaded: dict[str, Any], tmp_path: Path
) -> None:
    result = runner.invoke(
        app, ["compute", "-d", "no_such_set", "-o", str(tmp_path / "v.safetensors")]
    )
    assert result.exit_code == 1
    assert "error:" in result.output and "no_such_set" in result.output
    result = runner.invoke(
        app, ["compute", "-d", "sentiment", "-l", "7", "-o", str(tmp_path / "v.safetensors")]
    )
    assert result.exit_code == 2 and "out of range" in result.output


def test_analyze_shows_lens_norms_cosines_and_plots(
    app: typer.Typer, loaded: dict[str, Any], tmp_path: Path
) -> None:
    model = loaded["model"]
    vec = compute_vector(model, load_builtin("sentiment"), layers=[0, 1, 2], progress=False)
    path = vec.save(tmp_path / "v.safetensors")
    plots = tmp_path / "plots"
    result = runner.invoke(app, ["analyze", str(path), "-k", "4", "--plots", str(plots)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "method: mean_diff" in out and "norms:" in out and "cosine similarity" in out
    assert f"layer   2: {vec.norms()[2]:.4f}" in out
    top = model.tokenizer.decode([int((model.hf_model.lm_head.weight @ vec[2]).argmax())])
    assert "logit lens, layer 2 (raw unembedding)" in out and repr(top) in out
    names = sorted(p.name for p in plots.iterdir())
    assert names == [
        "cosine.png",
        "logit_lens_layer0.png",
        "logit_lens_layer1.png",
        "logit_lens_layer2.png",
        "norms.png",
    ]
    through = runner.invoke(app, ["analyze", str(path), "-l", "1", "--through-norm"])
    assert through.exit_code == 0 and "through final norm" in through.output
    assert "layer 2" not in through.output


def test_analyze_refuses_a_vector_for_another_model(
    app: typer.Typer, loaded: dict[str, Any], tmp_path: Path
) -> None:
    other = tiny_model("llama", seed=3)
    path = compute_vector(other, ["i love it"], ["i hate it"], layers=[1], progress=False).save(
        tmp_path / "other.safetensors"
    )
    refused = runner.invoke(app, ["analyze", str(path)])
    assert refused.exit_code == 1 and "force" in refused.output
    forced = runner.invoke(app, ["analyze", str(path), "--force"])
    assert forced.exit_code == 0 and "logit lens" in forced.output
    assert "warning: using a vector made for another model" in forced.output
    offline = runner.invoke(app, ["analyze", str(path), "--no-lens"])
    assert offline.exit_code == 0 and "logit lens" not in offline.output


def test_analyze_bad_files(app: typer.Typer, loaded: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a vector")
    result = runner.invoke(app, ["analyze", str(bad), "--no-lens"])
    assert result.exit_code == 1 and "error:" in result.output
    missing = runner.invoke(app, ["analyze", str(tmp_path / "none.safetensors"), "--no-lens"])
    assert missing.exit_code == 2 and "no vector file" in missing.output
    good = SteeringVector({0: torch.ones(32)}).save(tmp_path / "v.safetensors")
    wrong_layer = runner.invoke(app, ["analyze", str(good), "-l", "2", "--no-lens"])
    assert wrong_layer.exit_code == 1 and "no direction" in wrong_layer.output


def test_scan_prints_table_and_writes_outputs(
    app: typer.Typer, loaded: dict[str, Any], tmp_path: Path
) -> None:
    plot, scores, vec = tmp_path / "scan.png", tmp_path / "scan.json", tmp_path / "v.safetensors"
    result = runner.invoke(
        app,
        ["scan", "-d", "sentiment", "--seed", "1", "--test-fraction", "0.3", "--no-probe"]
        + ["--plot", str(plot), "--json", str(scores), "-o", str(vec)],
    )
    assert result.exit_code == 0, result.output
    assert "best layer" in result.output and "cohen_d" in result.output
    assert plot.read_bytes().startswith(b"\x89PNG")
    data = json.loads(scores.read_text())
    assert data["seed"] == 1 and [s["layer"] for s in data["scores"]] == [0, 1, 2]
    assert SteeringVector.load(vec).layers == (0, 1, 2)
    best = int(result.output.split("best layer (held-out Cohen's d):")[1].split()[0])
    cohens = {s["layer"]: s["cohens_d"] for s in data["scores"]}
    assert best == max(cohens, key=lambda k: cohens[k])


def test_registered_in_the_main_app() -> None:
    cli = pytest.importorskip("steerlab.cli")
    names = {c.name for c in cli.app.registered_commands}
    assert {"compute", "analyze", "scan"} <= names
