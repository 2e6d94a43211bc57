"""Issue 9 part 3: vector, means and GGUF files are tamper-evident.

A SHA-256 checksum of the tensors and the metadata is stored in each file and verified on
load, so any flipped bit is refused with ``VectorFileError`` naming the file, while files
written before checksums existed (schema 1) still load.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import steerlab as sl
from steerlab.ablation import ActivationMeans
from steerlab.errors import VectorFileError
from steerlab.vectors import (
    CHECKSUM_KEY,
    FILE_FORMAT,
    SCHEMA_VERSION,
    SteeringVector,
    check_file_checksum,
    file_checksum,
)


def _vector() -> SteeringVector:
    g = torch.Generator().manual_seed(0)
    return SteeringVector(
        {1: torch.randn(4, generator=g), 2: torch.randn(4, generator=g)},
        metadata={"method": "manual", "n_layers": 3, "unembed_fingerprint": "unembed-v1:8x4:1,2"},
    )


def _flip(data: bytes, index: int, bit: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def _header(data: bytes) -> dict[str, str]:
    size = struct.unpack("<Q", data[:8])[0]
    meta: dict[str, str] = json.loads(data[8 : 8 + size])["__metadata__"]
    return meta


def test_saved_file_carries_the_checksum_of_its_content(tmp_path: Path) -> None:
    vec = _vector()
    data = vec.save(tmp_path / "v.safetensors").read_bytes()
    header = _header(data)
    assert header["schema_version"] == str(SCHEMA_VERSION) == "2"
    tensors = safetensors_load(data)
    assert header[CHECKSUM_KEY] == file_checksum(tensors, header)
    assert header[CHECKSUM_KEY].startswith("sha256:") and len(header[CHECKSUM_KEY]) == 71
    # the checksum is over content, not layout: key order does not matter, values do
    shuffled = dict(reversed(list(header.items())))
    assert file_checksum(tensors, shuffled) == header[CHECKSUM_KEY]
    assert file_checksum(tensors, {**header, "method": '"other"'}) != header[CHECKSUM_KEY]
    check_file_checksum(tensors, header, "v.safetensors")


def test_every_single_bit_flip_in_a_vector_file_is_refused(tmp_path: Path) -> None:
    data = _vector().save(tmp_path / "v.safetensors").read_bytes()
    accepted = []
    for index in range(len(data)):
        bit = index % 8  # one flip per byte, cycling through the bit positions
        path = tmp_path / "flipped.safetensors"
        path.write_bytes(_flip(data, index, bit))
        try:
            SteeringVector.load(path)
        except VectorFileError as err:
            assert "flipped.safetensors" in str(err)
        else:
            accepted.append((index, bit))
    assert not accepted, f"bit flips loaded without an error: {accepted[:10]}"


def test_flips_in_tensor_data_and_header_name_the_checksum(tmp_path: Path) -> None:
    data = _vector().save(tmp_path / "v.safetensors").read_bytes()
    end = 8 + struct.unpack("<Q", data[:8])[0]
    cases = {
        "data": _flip(data, len(data) - 1, 0),  # lowest mantissa bit of the last float
        "layer": data.replace(b'"layer.2"', b'"layer.3"'),  # '2' -> '3' is one bit
        "fingerprint": data.replace(b"unembed-v1:8x4:1,2", b"unembed-v1:8x4:1,3"),
        "n_layers": data.replace(b'"n_layers":"3"', b'"n_layers":"2"'),
    }
    for name, corrupt in cases.items():
        assert corrupt != data and len(corrupt) == len(data), name
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(corrupt)
        with pytest.raises(VectorFileError, match="checksum mismatch") as info:
            SteeringVector.load(path)
        assert str(path) in str(info.value)
    assert end < len(data)


def test_files_of_earlier_versions_still_load(tmp_path: Path) -> None:
    tensors = {"layer.5": torch.tensor([0.5, -1.0, 2.0])}
    header = {"format": FILE_FORMAT, "schema_version": "1", "method": '"mean_diff"'}
    path = tmp_path / "old.safetensors"
    path.write_bytes(safetensors_save(tensors, metadata=header))
    vec = SteeringVector.load(path)
    assert vec.layers == (5,) and vec[5].tolist() == [0.5, -1.0, 2.0]
    assert vec.metadata == {"method": "mean_diff"}
    # re-saving upgrades it to the checksummed format, with the same content
    again = SteeringVector.load(vec.save(tmp_path / "new.safetensors"))
    assert torch.equal(again[5], vec[5]) and again.metadata == vec.metadata


def test_a_schema_2_file_without_checksum_is_refused(tmp_path: Path) -> None:
    header = {"format": FILE_FORMAT, "schema_version": "2", "method": '"x"'}
    path = tmp_path / "stripped.safetensors"
    path.write_bytes(safetensors_save({"layer.0": torch.ones(2)}, metadata=header))
    with pytest.raises(VectorFileError, match="no 'checksum'"):
        SteeringVector.load(path)


@pytest.mark.parametrize(
    ("tensors", "meta", "words"),
    [
        ({"layer.0": torch.ones(2)}, {"recommended_strength": "NaN"}, "non-finite"),
        ({"layer.0": torch.ones(2)}, {"scale": "-Infinity"}, "non-finite"),
        ({"layer.70000": torch.ones(2)}, {}, "absurd layer"),
        ({"layer.1": torch.ones(0)}, {}, "empty direction"),
    ],
)
def test_non_finite_metadata_absurd_layers_and_empty_directions_are_refused(
    tmp_path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], words: str
) -> None:
    header = {"format": FILE_FORMAT, "schema_version": "2", **meta}
    header[CHECKSUM_KEY] = file_checksum(tensors, header)  # a valid checksum: content refused
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_save(tensors, metadata=header))
    with pytest.raises(VectorFileError, match=words) as info:
        SteeringVector.load(path)
    assert "bad.safetensors" in str(info.value)


def test_means_files_are_checksummed_and_old_ones_load(tmp_path: Path) -> None:
    means = ActivationMeans(
        {("block", 1): torch.tensor([1.0, 2.0]), ("mlp", 0): torch.tensor([3.0, 4.0])},
        n_prompts=2,
        n_tokens=5,
        metadata={"model_name": "m"},
    )
    data = means.save(tmp_path / "m.safetensors").read_bytes()
    back = ActivationMeans.load(tmp_path / "m.safetensors")
    assert torch.equal(back.mean("mlp", 0), torch.tensor([3.0, 4.0])) and back.n_tokens == 5
    accepted = []
    for index in range(len(data)):
        path = tmp_path / "flip.safetensors"
        path.write_bytes(_flip(data, index, index % 8))
        try:
            ActivationMeans.load(path)
        except VectorFileError:
            pass
        else:
            accepted.append(index)
    assert not accepted, f"bit flips loaded without an error at bytes {accepted[:10]}"
    header = {"format": "steerlab.means", "schema_version": "1", "n_prompts": "1"}
    old = tmp_path / "old.safetensors"
    old.write_bytes(safetensors_save({"mean.block.2": torch.ones(3)}, metadata=header))
    assert ActivationMeans.load(old).mean("block", 2).tolist() == [1.0, 1.0, 1.0]


def test_gguf_is_checksummed_and_damage_is_a_vector_file_error(tmp_path: Path) -> None:
    vec = _vector().with_metadata(model_type="llama")
    path = sl.export_gguf(vec, tmp_path / "v.gguf", strength=2.0)
    back = sl.read_gguf(path)
    assert torch.equal(back[2], vec[2] * 2.0) and back.metadata["model_hint"] == "llama"
    data = path.read_bytes()
    # every bit of the tensor data and of the model hint is covered (alignment padding between
    # tensors is not content: llama.cpp never reads it)
    import gguf

    reader = gguf.GGUFReader(path)
    spans = [(t.data_offset, t.data_offset + int(t.n_bytes)) for t in reader.tensors]
    assert sum(b - a for a, b in spans) == 2 * 4 * 4
    hint = data.index(b"llama")
    positions = [i for a, b in spans for i in range(a, b)] + list(range(hint, hint + 5))
    accepted = []
    for index in positions:
        for bit in range(8):
            corrupt = tmp_path / "flip.gguf"
            corrupt.write_bytes(_flip(data, index, bit))
            try:
                sl.read_gguf(corrupt)
            except VectorFileError as err:
                assert "flip.gguf" in str(err)
            else:
                accepted.append((index, bit))
    assert not accepted, accepted[:10]
    for name, blob in {"cut": data[: len(data) // 2], "text": b"GGUX not a gguf"}.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(VectorFileError, match=f"{name}.gguf"):
            sl.read_gguf(bad)


def test_gguf_without_checksum_from_other_tools_loads(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "llamacpp.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_int32("controlvector.layer_count", 1)
    writer.add_tensor("direction.4", np.array([1.0, 2.0, 3.0], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert sl.read_gguf(path)[4].tolist() == [1.0, 2.0, 3.0]
