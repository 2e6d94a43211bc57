"""``--site``/``--heads``/``--experts`` on the CLI (issue 22): compute reads at a site, generate
and bake act there exactly as the library does, and every bad value is a one-line error naming
the option (the loader is patched to a tiny model; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import steerlab as sl
from steerlab.cli import app
from steerlab.data import load_builtin
from steerlab.sites import site_width
from steerlab.testing import tiny_model

runner = CliRunner()
PROMPT = "the cat sat on the"


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> sl.SteeredModel:
    tiny = tiny_model("qwen3")  # grouped-query attention: 4 query heads, 2 KV heads
    monkeypatch.setattr(sl, "load_model", lambda *a, **k: tiny)
    return tiny


def _saved(model: sl.SteeredModel, site: str, path: Path, seed: int = 0) -> sl.SteeringVector:
    width = site_width(model.adapter, site)
    gen = torch.Generator().manual_seed(seed)
    vec = sl.SteeringVector({1: 3 * torch.randn(width, generator=gen)}, metadata={"site": site})
    vec.save(path)
    return vec


def _one_line_error(args: list[str], says: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert says in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


def test_compute_at_a_site_writes_the_library_vector(
    model: sl.SteeredModel, tmp_path: Path
) -> None:
    for site in ("head", "mlp_out"):
        out = tmp_path / f"{site}.safetensors"
        args = ["compute", "-d", "sentiment", "-l", "1,2", "--site", site, "-o", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"site {site!r}" in result.stdout
        vec = sl.SteeringVector.load(out)
        want = sl.compute_vector(
            model, load_builtin("sentiment"), layers=[1, 2], site=site, progress=False
        )
        assert vec.site == site and vec.d_model == site_width(model.adapter, site)
        assert all(torch.equal(vec[layer], want[layer]) for layer in (1, 2))
    _one_line_error(
        ["compute", "-d", "sentiment", "--site", "ffn", "-o", str(tmp_path / "x.safetensors")],
        "unknown --site='ffn'; use one of resid, attn_out, mlp_out, head, router",
    )
    assert not (tmp_path / "x.safetensors").exists()


def test_generate_with_heads_and_a_moved_site_equals_the_library(
    model: sl.SteeredModel, tmp_path: Path
) -> None:
    head_file, resid_file = tmp_path / "iti.safetensors", tmp_path / "resid.safetensors"
    head_vec, resid_vec = _saved(model, "head", head_file), _saved(model, "resid", resid_file, 1)
    base = ["generate", PROMPT, "--max-new-tokens", "6", "-s", "4"]
    cases = [
        (["-v", str(head_file), "--heads", "1,3"], sl.Steering(head_vec, strength=4, heads=[1, 3])),
        (["-v", str(head_file), "--heads", "-1"], sl.Steering(head_vec, strength=4, heads=[3])),
        (
            ["-v", str(resid_file), "--site", "mlp_out"],
            sl.Steering(resid_vec, strength=4, site="mlp_out"),
        ),
    ]
    outputs = set()
    for extra, steering in cases:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 0, result.output
        want = model.generate(PROMPT, steering=steering, max_new_tokens=6)
        assert result.stdout == f"{PROMPT}{want}\n"
        outputs.add(result.stdout)
    plain = runner.invoke(app, ["generate", PROMPT, "--max-new-tokens", "6"]).stdout
    assert len(outputs | {plain}) == 4  # each option changes the continuation


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--heads", "9"], "--heads: head 9 is out of range for a model with 4 heads"),
        (["--heads", "1;3"], "--heads: '1;3' is not a comma-separated list of integers"),
        (["--site", "resid"], "--site: site='resid': the vector was computed for site 'head'"),
        (["--site", "attn"], "--site: unknown site='attn'"),
        (["--heads", "0", "--op", "clamp"], "heads= selects slices of an added direction"),
        (["--experts", "0"], "--experts: experts apply to site 'router' or 'mlp_out'"),
        (["--site", "mlp_out", "--experts", "0"], "--site: site='mlp_out': the vector was"),
    ],
)
def test_generate_bad_site_options_are_one_line_errors(
    model: sl.SteeredModel, tmp_path: Path, extra: list[str], says: str
) -> None:
    file = tmp_path / "iti.safetensors"
    _saved(model, "head", file)
    _one_line_error(["generate", PROMPT, "-v", str(file), *extra], says)


def test_generate_site_options_on_resid_vectors_and_without_a_vector(
    model: sl.SteeredModel, tmp_path: Path
) -> None:
    file = tmp_path / "resid.safetensors"
    _saved(model, "resid", file)
    base = ["generate", PROMPT, "-v", str(file)]
    _one_line_error([*base, "--heads", "0"], "--heads: heads apply to site 'head'; this steering")
    _one_line_error([*base, "--site", "head"], "--site: site='head': the vector was computed")
    _one_line_error([*base, "--site", "mlp_out", "--experts", "1"], "--experts: 'qwen3' is not")
    _one_line_error(["generate", PROMPT, "--heads", "0"], "--site, --heads and --experts need")


def test_bake_with_heads_equals_the_hooks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transformers

    llama = tiny_model("llama")
    monkeypatch.setattr(sl, "load_model", lambda *a, **k: llama)
    file = tmp_path / "iti.safetensors"
    vec = _saved(llama, "head", file, seed=2)
    out = tmp_path / "baked"
    result = runner.invoke(app, ["bake", str(file), "-o", str(out), "-s", "2", "--heads", "0,3"])
    assert result.exit_code == 0, result.output
    _one_line_error(
        ["bake", str(file), "-o", str(tmp_path / "b2"), "--heads", "4"],
        "--heads: head 4 is out of range",
    )
    _one_line_error(
        ["bake", str(file), "-o", str(tmp_path / "b3"), "--ablate", "--heads", "1"],
        "--site and --heads apply to added steering",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baked", "iti.safetensors"]
    baked = transformers.AutoModelForCausalLM.from_pretrained(out)
    batch = llama.encode([PROMPT])
    with torch.no_grad():
        got = baked(input_ids=batch.input_ids).logits
    want = llama.logits([PROMPT], steering=sl.Steering(vec, strength=2.0, heads=[0, 3]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert not torch.allclose(want, llama.logits([PROMPT]), atol=1e-3)
