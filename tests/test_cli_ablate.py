"""The ``ablate``, ``bake`` and ``export-gguf`` commands, on a tiny model saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
import transformers
import typer
from typer.testing import CliRunner

import steerlab as sl
from steerlab.ablation import ZeroAblation, ablation_scan
from steerlab.cli import ErrorHandlingGroup, _ablate
from steerlab.editing import read_gguf
from steerlab.testing import tiny_hf_model, tiny_tokenizer

PROMPTS = ["the cat sat on the", "a dog ran to the big"]


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer(cls=ErrorHandlingGroup)  # the real CLI's error handling
    _ablate.register(app)
    return app


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_ablate_writes_table_csv_json_and_heatmap(
    app: typer.Typer, model_dir: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "scan"
    result = CliRunner().invoke(
        app,
        [
            "ablate",
            "--prompts-file",
            str(prompts),
            "--target",
            "house",
            "--foil",
            "road",
            "--layers",
            "0-1",
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--top",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "zero ablation of head units" in result.output
    summary = json.loads((out / "scan.json").read_text())
    assert summary["layers"] == [0, 1] and summary["units"] == [0, 1, 2, 3]
    assert summary["prompts"] == PROMPTS
    model = sl.load_model(model_dir)
    expected = ablation_scan(model, PROMPTS, target="house", foil="road", layers=[0, 1])
    torch.testing.assert_close(
        torch.tensor(summary["scores"]), expected.scores, atol=1e-5, rtol=1e-5
    )
    assert len((out / "scan.csv").read_text().splitlines()) == 1 + 2 * 4
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_ablate_mean_and_loss(app: typer.Typer, model_dir: Path, tmp_path: Path) -> None:
    calibration = tmp_path / "calib.txt"
    calibration.write_text("the big house\ni love the cat\n")
    cache = tmp_path / "means.safetensors"
    args = [
        "ablate",
        *PROMPTS,
        "--metric",
        "loss",
        "--component",
        "mlp",
        "--mean-prompts",
        str(calibration),
        "--means-cache",
        str(cache),
        "--model",
        str(model_dir),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mean ablation of mlp units, metric loss" in result.output
    assert cache.is_file()


def test_ablate_errors(app: typer.Typer, model_dir: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["ablate", *PROMPTS, "--model", str(model_dir)])
    assert missing.exit_code == 2 and "needs target" in missing.output
    none = runner.invoke(app, ["ablate", "--target", "x", "--model", str(model_dir)])
    assert none.exit_code != 0


def test_bake_command(app: typer.Typer, model_dir: Path, tmp_path: Path) -> None:
    model = sl.load_model(model_dir)
    vec = sl.SteeringVector(
        {1: torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))}
    )
    vec.save(tmp_path / "vec.safetensors")
    out = tmp_path / "baked"
    result = CliRunner().invoke(
        app,
        [
            "bake",
            str(tmp_path / "vec.safetensors"),
            "--strength",
            "2.5",
            "--out",
            str(out),
            "--model",
            str(model_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    batch = model.encode(["the cat sat on the"])
    with torch.no_grad():
        got = plain(input_ids=batch.input_ids).logits
    expected = model.logits(["the cat sat on the"], steering=vec, strength=2.5)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    again = CliRunner().invoke(
        app,
        ["bake", str(tmp_path / "vec.safetensors"), "--out", str(out), "--model", str(model_dir)],
    )
    assert again.exit_code == 2 and "already exists" in again.output


def test_bake_ablate_direction(app: typer.Typer, model_dir: Path, tmp_path: Path) -> None:
    model = sl.load_model(model_dir)
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    sl.SteeringVector({2: direction}).save(tmp_path / "dir.safetensors")
    out = tmp_path / "orth"
    result = CliRunner().invoke(
        app,
        [
            "bake",
            str(tmp_path / "dir.safetensors"),
            "--ablate",
            "--out",
            str(out),
            "--model",
            str(model_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "directional ablation" in result.output
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    unit = direction / direction.norm()
    assert float((plain.get_input_embeddings().weight.detach() @ unit).abs().max()) < 1e-5
    hooked = model.logits(
        ["the cat sat"], steering=sl.ablation.DirectionalAblation.everywhere(direction)
    )
    with torch.no_grad():
        got = plain(input_ids=model.encode(["the cat sat"]).input_ids).logits
    torch.testing.assert_close(got, hooked, atol=1e-4, rtol=0)


def test_export_gguf_command(app: typer.Typer, tmp_path: Path) -> None:
    vec = sl.SteeringVector(
        {0: torch.ones(8), 3: torch.arange(8.0), 5: torch.ones(8)},
        metadata={"model_type": "llama"},
    )
    vec.save(tmp_path / "vec.safetensors")
    runner = CliRunner()
    refused = runner.invoke(
        app, ["export-gguf", str(tmp_path / "vec.safetensors"), "--out", str(tmp_path / "a.gguf")]
    )
    assert refused.exit_code == 2 and "layer 0" in refused.output
    result = runner.invoke(
        app,
        [
            "export-gguf",
            str(tmp_path / "vec.safetensors"),
            "--out",
            str(tmp_path / "v.gguf"),
            "--layers",
            "3,5",
            "--strength",
            "-2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "direction.3, direction.5" in result.output
    reader = gguf.GGUFReader(tmp_path / "v.gguf")
    assert sorted(t.name for t in reader.tensors) == ["direction.3", "direction.5"]
    assert torch.equal(read_gguf(tmp_path / "v.gguf")[3], -2 * torch.arange(8.0))


def test_cli_uses_library_ablation(model_dir: Path) -> None:
    """The scan the CLI prints is the library's: spot-check one head against a direct run."""
    model = sl.load_model(model_dir)
    scan = ablation_scan(model, PROMPTS, target="house", layers=[1], heads=[2])
    direct = model.logits(PROMPTS, steering=ZeroAblation(1, component="head", head=2))[:, -1]
    house = model.tokenizer("house", add_special_tokens=False)["input_ids"][0]
    torch.testing.assert_close(scan.ablated[0, 0], direct[:, house], atol=1e-5, rtol=1e-5)
