"""SteeringVector: value semantics, transforms, file format, compatibility with a model."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file

import steerlab as sl
from steerlab.errors import VectorFileError, VectorFileNotFoundError, VectorMismatchError
from steerlab.testing import tiny_model
from steerlab.vectors import (
    FILE_FORMAT,
    SteeringVector,
    fingerprints_match,
    model_fingerprint,
    vector_metadata,
)


def _random_vector(
    d: int = 16, layers: tuple[int, ...] = (0, 3, 7), seed: int = 0
) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({layer: torch.randn(d, generator=g) for layer in layers})


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, torch.int16)
    return t.contiguous().view(view)


# --- value semantics ----------------------------------------------------------------------------
def test_constructor_copies_and_transforms_do_not_mutate() -> None:
    t = torch.tensor([1.0, 2.0])
    v = SteeringVector({0: t})
    t.add_(100.0)
    assert v[0].tolist() == [1.0, 2.0]
    v[0].add_(5.0)  # __getitem__ hands out a copy
    assert v[0].tolist() == [1.0, 2.0]
    w = _random_vector()
    before = {k: w[k] for k in w.layers}
    for out in (w.normalized(), w.scaled(3.0), w.project_out_mean(), w.orthogonalized(w * 2.0)):
        assert out is not w
    for k in w.layers:
        assert torch.equal(w[k], before[k])


def test_arithmetic_is_exact_and_rejects_nonsense() -> None:
    a, b = _random_vector(seed=1), _random_vector(seed=2, layers=(3, 9))
    s = a + b
    assert s.layers == (0, 3, 7, 9)
    assert torch.equal(s[3], a[3] + b[3]) and torch.equal(s[0], a[0]) and torch.equal(s[9], b[9])
    assert torch.equal((a - b)[9], -b[9])
    assert torch.equal((2.0 * a)[7], a[7] * 2.0) and torch.equal((a / 4)[7], a[7] / 4)
    assert torch.equal((-a)[0], -a[0])
    with pytest.raises(TypeError):
        _ = a + 1.0  # type: ignore[operator]
    with pytest.raises(TypeError):
        _ = a * "x"  # type: ignore[operator]
    with pytest.raises(TypeError):
        _ = a * True  # type: ignore[operator]
    with pytest.raises(VectorMismatchError):
        _ = a + _random_vector(d=8)


def test_to_changes_dtype_without_touching_the_original() -> None:
    v = _random_vector()
    half = v.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and v.dtype == torch.float32
    assert torch.equal(half[3], v[3].to(torch.bfloat16))


# --- orthogonalization ---------------------------------------------------------------------------
def test_orthogonalized_has_zero_dot_and_keeps_the_rest_exactly() -> None:
    d = 64
    g = torch.Generator().manual_seed(0)
    basis_raw = torch.randn(3, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(basis_raw.T)  # orthonormal basis of their span, [d, 3]
    rest = torch.randn(d, generator=g, dtype=torch.float64)
    rest = rest - q @ (q.T @ rest)  # component outside the span
    inside = q @ torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    v = SteeringVector({4: rest + inside}, metadata={"method": "x"})
    others = [SteeringVector({4: basis_raw[i]}) for i in range(2)] + [basis_raw[2]]
    out = v.orthogonalized(others)
    for other in basis_raw:
        assert abs(float(out[4] @ other)) < 1e-12 * float(other.norm() * v[4].norm())
    assert torch.allclose(out[4], rest, atol=1e-12, rtol=0)
    # float32 vectors: still ~0 dot (relative to float32 precision)
    v32 = v.to(dtype=torch.float32)
    out32 = v32.orthogonalized([o.to(dtype=torch.float32) for o in others[:2]])
    for other in basis_raw[:2].float():
        assert abs(float(out32[4] @ other)) < 1e-5 * float(other.norm() * v32[4].norm())
    assert out.metadata["orthogonalized_against"] == ["vector", "vector", "tensor"]


def test_orthogonalized_skips_dependent_and_missing_layers() -> None:
    v = SteeringVector({0: torch.tensor([1.0, 2.0, 3.0]), 5: torch.tensor([1.0, 1.0, 1.0])})
    a = SteeringVector({0: torch.tensor([1.0, 0.0, 0.0])})
    twice = [a, a * 3.0, SteeringVector({0: torch.zeros(3)})]  # dependent and zero entries
    out = v.orthogonalized(twice)
    assert out[0].tolist() == [0.0, 2.0, 3.0]
    assert torch.equal(out[5], v[5])  # no against-direction at layer 5: untouched
    with pytest.raises(VectorMismatchError):
        v.orthogonalized("not a vector")  # type: ignore[arg-type]
    with pytest.raises(VectorMismatchError):
        v.orthogonalized([torch.ones(4)])


def test_project_out_mean_is_invisible_to_layernorm_models_only() -> None:
    g = torch.Generator().manual_seed(3)
    direction = torch.randn(32, generator=g) + 2.0  # large mean component on purpose
    vec = SteeringVector({1: direction})
    centred = vec.project_out_mean()
    assert abs(float(centred[1].mean())) < 1e-6
    assert torch.allclose(vec[1] - centred[1], torch.full((32,), float(direction.mean())))
    prompts = ["the cat sat on the mat", "a dog ran"]
    gpt2 = tiny_model("gpt2")  # LayerNorm everywhere: the all-ones component never gets read
    full = gpt2.logits(prompts, steering=vec, strength=4.0)
    clean = gpt2.logits(prompts, steering=centred, strength=4.0)
    plain = gpt2.logits(prompts)
    assert (full - plain).abs().max() > 1e-2
    assert torch.allclose(full, clean, atol=1e-4)
    llama = tiny_model("llama")  # RMSNorm does see it
    diff = llama.logits(prompts, steering=vec, strength=4.0) - llama.logits(
        prompts, steering=centred, strength=4.0
    )
    assert diff.abs().max() > 1e-2


def test_project_out_mean_with_a_mean_vector() -> None:
    v = _random_vector(seed=4)
    mean = _random_vector(seed=5)
    out = v.project_out_mean(mean)
    for layer in v.layers:
        assert abs(float(out[layer] @ mean[layer])) < 1e-5 * float(mean[layer].norm())
    with pytest.raises(VectorMismatchError):
        v.project_out_mean(mean.select([0]))


def test_scaled_to_residual_sets_each_norm() -> None:
    v = _random_vector()
    out = v.scaled_to_residual({0: 10.0, 3: 2.0, 7: 0.5}, fraction=0.25)
    for layer, expected in {0: 2.5, 3: 0.5, 7: 0.125}.items():
        assert math.isclose(out.norms()[layer], expected, rel_tol=1e-6)
        cos = torch.nn.functional.cosine_similarity(out[layer], v[layer], dim=0)
        assert float(cos) > 1 - 1e-6
    assert out.metadata["normalization"] == "residual"
    with pytest.raises(VectorMismatchError):
        v.scaled_to_residual({0: 1.0})
    with pytest.raises(VectorMismatchError):
        SteeringVector({0: torch.zeros(3)}).scaled_to_residual({0: 1.0})


# --- files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_save_load_round_trip_is_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    directions = {layer: (torch.randn(48, generator=g) * 10).to(dtype) for layer in (0, 5, 17)}
    directions[5][0] = -0.0
    directions[5][1] = torch.finfo(dtype).tiny / 2  # subnormal
    metadata: dict[str, Any] = {
        "method": "pca",
        "dataset": {"name": "sentiment ✓", "n_positive": 3, "paired": True},
        "recommended_strength": 0.1,
        "tiny": 1e-300,
        "layers": [0, 5, 17],
        "note": None,
    }
    vec = SteeringVector(directions, metadata=metadata)
    path = vec.save(tmp_path / "vec.safetensors")
    loaded = SteeringVector.load(path)
    assert loaded.layers == vec.layers
    for layer in vec.layers:
        assert loaded[layer].dtype == dtype
        assert torch.equal(_bits(loaded[layer]), _bits(vec[layer]))
    assert loaded.metadata == metadata
    # saving the loaded vector again gives the same tensor bytes (header key order may differ)
    again = SteeringVector.load(loaded.save(tmp_path / "again.safetensors"))
    assert all(torch.equal(_bits(again[k]), _bits(vec[k])) for k in vec.layers)
    assert again.metadata == metadata


def test_compute_vector_output_survives_a_round_trip(tmp_path: Path, llama: Any) -> None:
    vec = sl.compute_vector(
        llama, ["i love it", "so good"], ["i hate it", "so bad"], layers=[0, 2], progress=False
    )
    loaded = SteeringVector.load(vec.save(tmp_path / "v.safetensors"))
    assert loaded.metadata == vec.metadata
    assert all(torch.equal(loaded[k], vec[k]) for k in vec.layers)
    loaded.check_compatible(llama)


def test_load_uses_no_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _random_vector().save(tmp_path / "v.safetensors")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert SteeringVector.load(path).layers == (0, 3, 7)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "v.safetensors"
    old = _random_vector(seed=1).save(target).read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        _random_vector(seed=2).save(target)
    assert target.read_bytes() == old  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]  # no temp left


def test_save_refuses_unserialisable_metadata(tmp_path: Path) -> None:
    v = _random_vector()
    for bad in ({"x": torch.ones(1)}, {"x": float("nan")}, {"format": "mine"}, {3: "int key"}):
        with pytest.raises(VectorFileError):
            v.with_metadata(**{}).__class__(v.directions, metadata=bad).save(tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(VectorFileNotFoundError):
        v.save(tmp_path / "missing_folder" / "v.safetensors")


def _write_raw(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    save_file(tensors, str(path), metadata=meta)
    return path


def _header(**extra: str) -> dict[str, str]:
    # schema 1: no checksum, so each case reaches the check it is about
    return {"format": FILE_FORMAT, "schema_version": "1", **extra}


def _corrupt_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = _random_vector().save(tmp_path / "good.safetensors").read_bytes()
    cases: dict[str, tuple[Path, str]] = {}

    def raw(name: str, data: bytes, match: str) -> None:
        path = tmp_path / name
        path.write_bytes(data)
        cases[name] = (path, match)

    raw("empty", b"", "truncated or empty")
    raw("four_bytes", good[:4], "truncated or empty")
    raw("cut_in_header", good[:40], "truncated")
    raw("cut_in_data", good[:-10], "truncated")
    raw("trailing_bytes", good + b"\0\0\0\0", "unexpected bytes")
    (size,) = struct.unpack("<Q", good[:8])
    header = bytearray(good)
    header[8:12] = b"#!@$"
    raw("bad_header_json", bytes(header), "not JSON")
    raw("text_file", b"layer.0 = [1, 2, 3]\nthis is not safetensors at all\n", "not a safetensors")
    raw("pickle_file", pickle.dumps({"layer.0": [1.0, 2.0]}), "safetensors")
    bad_offsets = json.loads(good[8 : 8 + size])
    bad_offsets["layer.0"]["data_offsets"] = "nope"
    blob = json.dumps(bad_offsets).encode()
    raw("bad_offsets", struct.pack("<Q", len(blob)) + blob + good[8 + size :], "corrupt header")
    ones = {"layer.0": torch.ones(4)}
    cases["foreign_safetensors"] = (
        _write_raw(tmp_path / "foreign.safetensors", ones, {"format": "pt"}),
        "not a steerlab vector",
    )
    cases["no_metadata"] = (
        _write_raw(tmp_path / "nometa.safetensors", ones, {}),
        "not a steerlab vector",
    )
    cases["newer_schema"] = (
        _write_raw(tmp_path / "v99.safetensors", ones, {**_header(), "schema_version": "99"}),
        "newer than",
    )
    cases["garbage_schema"] = (
        _write_raw(tmp_path / "vx.safetensors", ones, {**_header(), "schema_version": "one"}),
        "unknown vector schema",
    )
    nan = torch.ones(4)
    nan[2] = float("nan")
    cases["nan_tensor"] = (
        _write_raw(tmp_path / "nan.safetensors", {"layer.0": nan}, _header()),
        "NaN",
    )
    inf = torch.ones(4)
    inf[0] = float("inf")
    cases["inf_tensor"] = (
        _write_raw(tmp_path / "inf.safetensors", {"layer.0": inf}, _header()),
        "NaN or infinite",
    )
    cases["matrix_tensor"] = (
        _write_raw(tmp_path / "2d.safetensors", {"layer.0": torch.ones(2, 4)}, _header()),
        "expected \\[d_model\\]",
    )
    cases["sizes_differ"] = (
        _write_raw(
            tmp_path / "sizes.safetensors",
            {"layer.0": torch.ones(4), "layer.1": torch.ones(5)},
            _header(),
        ),
        "different sizes",
    )
    cases["d_model_mismatch"] = (
        _write_raw(tmp_path / "dm.safetensors", ones, _header(d_model="8")),
        "shape mismatch",
    )
    cases["layer_beyond_n_layers"] = (
        _write_raw(tmp_path / "nl.safetensors", {"layer.5": torch.ones(4)}, _header(n_layers="3")),
        "out of range",
    )
    cases["int_tensor"] = (
        _write_raw(
            tmp_path / "int.safetensors", {"layer.0": torch.ones(4, dtype=torch.int32)}, _header()
        ),
        "float dtype",
    )
    cases["bad_key"] = (
        _write_raw(tmp_path / "key.safetensors", {"layers.0": torch.ones(4)}, _header()),
        "unexpected tensor",
    )
    cases["leading_zero_key"] = (
        _write_raw(tmp_path / "key0.safetensors", {"layer.01": torch.ones(4)}, _header()),
        "unexpected tensor",
    )
    cases["metadata_not_json"] = (
        _write_raw(tmp_path / "meta.safetensors", ones, _header(method="mean_diff")),
        "not valid JSON",
    )
    empty = tmp_path / "none.safetensors"
    empty.write_bytes(safetensors_save({}, metadata=_header()))
    cases["no_tensors"] = (empty, "no layer directions")
    return cases


CORRUPT = [
    "empty",
    "four_bytes",
    "cut_in_header",
    "cut_in_data",
    "trailing_bytes",
    "bad_header_json",
    "text_file",
    "pickle_file",
    "bad_offsets",
    "foreign_safetensors",
    "no_metadata",
    "newer_schema",
    "garbage_schema",
    "nan_tensor",
    "inf_tensor",
    "matrix_tensor",
    "sizes_differ",
    "d_model_mismatch",
    "layer_beyond_n_layers",
    "int_tensor",
    "bad_key",
    "leading_zero_key",
    "metadata_not_json",
    "no_tensors",
]


@pytest.mark.parametrize("case", CORRUPT)
def test_every_corrupt_file_is_refused(tmp_path: Path, case: str) -> None:
    path, match = _corrupt_cases(tmp_path)[case]
    with pytest.raises(VectorFileError, match=match) as info:
        SteeringVector.load(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, sl.SteerlabError)


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    good = _random_vector(d=8, layers=(0, 1)).save(tmp_path / "good.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    for length in range(len(good)):
        cut.write_bytes(good[:length])
        with pytest.raises(VectorFileError):
            SteeringVector.load(cut)


def test_missing_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SteeringVector.load(tmp_path / "nope.safetensors")
    with pytest.raises(VectorFileNotFoundError):
        SteeringVector.load(tmp_path)  # a folder


# --- model identity and compatibility ----------------------------------------------------------
def test_fingerprint_survives_dtype_and_separates_models() -> None:
    model = tiny_model("llama")
    fp = model_fingerprint(model)
    assert fp.startswith("unembed-v1:") and len(fp.split(":")[2].split(",")) == 32
    for dtype in (torch.bfloat16, torch.float16):
        other = tiny_model("llama")
        other.hf_model.to(dtype)
        assert fingerprints_match(fp, model_fingerprint(other))
    for other in (tiny_model("llama", seed=1), tiny_model("qwen2", seed=5)):
        assert not fingerprints_match(fp, model_fingerprint(other))
    assert model_fingerprint(tiny_model("llama")) == fp  # deterministic


def test_vector_metadata_schema_is_complete(llama: Any) -> None:
    meta = vector_metadata(
        llama, method="pca", positions=-2, dataset={"name": "x"}, recommended_strength=2
    )
    for key in (
        "model_name",
        "model_type",
        "d_model",
        "n_layers",
        "vocab_size",
        "unembed_fingerprint",
        "operation",
        "site",
        "layer_convention",
        "method",
        "positions",
        "normalization",
        "recommended_strength",
        "dataset",
        "library_version",
        "created",
    ):
        assert key in meta, key
    assert meta["library_version"] == sl.__version__
    assert meta["created"].endswith("+00:00")
    assert json.loads(json.dumps(meta)) == meta
    with pytest.raises(VectorMismatchError):
        vector_metadata(llama, method="x", operation="multiply")


def test_check_compatible_refuses_other_models_unless_forced(llama: Any) -> None:
    vec = sl.compute_vector(llama, ["i love it"], ["i hate it"], layers=[1], progress=False)
    vec.check_compatible(llama)
    same_weights_other_dtype = tiny_model("llama")
    same_weights_other_dtype.hf_model.to(torch.bfloat16)
    vec.check_compatible(same_weights_other_dtype)
    other = tiny_model("llama", seed=1)
    with pytest.raises(VectorMismatchError, match="unembedding differs"):
        vec.check_compatible(other)
    with pytest.warns(UserWarning, match="another model"):
        vec.check_compatible(other, force=True)
    more_layers = vec.with_metadata(n_layers=30)
    with pytest.raises(VectorMismatchError, match="30 layers"):
        more_layers.check_compatible(llama)
    wrong_site = vec.with_metadata(site="mlp_output")
    with pytest.raises(VectorMismatchError, match="site"):
        wrong_site.check_compatible(llama)


def test_check_compatible_fatal_problems_cannot_be_forced(llama: Any) -> None:
    wide = SteeringVector({0: torch.ones(64)})
    deep = SteeringVector({7: torch.ones(32)})
    for vec, match in ((wide, "size 64"), (deep, "only 3 layers")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(VectorMismatchError, match=match):
                vec.check_compatible(llama, force=True)
