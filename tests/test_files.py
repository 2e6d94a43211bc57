"""The one file helper (steerlab.files) behind every kind of steerlab file.

Vectors, activation means, conditions and GGUF control vectors are written through
``atomic_output``: a failure at any point of the write (here injected while the data is being
flushed, or as an interrupt) leaves neither the file nor a temporary file behind, and an older
file at the target stays as it was. Each kind carries ``file_checksum`` and a flipped bit in its
tensor data is refused on load, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as safetensors_save

import steerlab as sl
import steerlab.files
from steerlab.ablation import ActivationMeans
from steerlab.errors import FileWriteError, VectorFileError
from steerlab.files import CHECKSUM_KEY, file_checksum, read_safetensors, save_safetensors


def _vector() -> sl.SteeringVector:
    g = torch.Generator().manual_seed(0)
    return sl.SteeringVector({1: torch.randn(4, generator=g), 2: torch.randn(4, generator=g)})


def _save_vector(path: Path) -> Path:
    return _vector().save(path)


def _save_means(path: Path) -> Path:
    means = ActivationMeans(
        {("block", 1): torch.tensor([1.0, 2.0]), ("mlp", 0): torch.tensor([3.0, 4.0])},
        n_prompts=2,
        n_tokens=5,
    )
    return means.save(path)


def _save_condition(path: Path) -> Path:
    return sl.Condition(torch.tensor([1.0, -2.0, 0.5]), layer=2, threshold=0.25).save(path)


def _save_gguf(path: Path) -> Path:
    return sl.export_gguf(_vector().with_metadata(model_type="llama"), path, strength=2.0)


KINDS: dict[str, tuple[str, Callable[[Path], Path], Callable[[Path], Any]]] = {
    "vector": ("v.safetensors", _save_vector, sl.SteeringVector.load),
    "means": ("m.safetensors", _save_means, ActivationMeans.load),
    "condition": ("c.safetensors", _save_condition, sl.Condition.load),
    "gguf": ("v.gguf", _save_gguf, sl.read_gguf),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_write_that_fails_midway_leaves_no_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, failure: BaseException
) -> None:
    name, save, load = KINDS[kind]
    calls: list[str] = []
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        # the temporary file is complete here: the failure strikes between writing and renaming
        calls.append(Path(src).read_bytes()[:4].hex())
        raise failure

    monkeypatch.setattr(steerlab.files.os, "replace", failing_replace)
    error = FileWriteError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(error) as info:
        save(tmp_path / name)
    assert calls, "the write never reached the rename"
    if error is FileWriteError:
        assert name in str(info.value) and "No space left" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # an earlier file at the target survives a failed overwrite, bit for bit
    monkeypatch.setattr(steerlab.files.os, "replace", real_replace)
    good = save(tmp_path / name).read_bytes()
    monkeypatch.setattr(steerlab.files.os, "replace", failing_replace)
    with pytest.raises(error):
        save(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert (tmp_path / name).read_bytes() == good
    load(tmp_path / name)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_flipped_bit_in_the_tensor_data_is_refused_naming_the_file(
    tmp_path: Path, kind: str
) -> None:
    name, save, load = KINDS[kind]
    data = save(tmp_path / name).read_bytes()
    load(tmp_path / name)
    corrupt = bytearray(data)
    if kind == "gguf":
        import gguf

        tensor = gguf.GGUFReader(tmp_path / name).tensors[-1]
        index = tensor.data_offset + int(tensor.n_bytes) - 4  # lowest byte of the last float
    else:
        index = len(data) - 4  # lowest byte of the last float32
    corrupt[index] ^= 0x01
    bad = tmp_path / f"bad-{name}"
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(VectorFileError, match="checksum") as info:
        load(bad)
    assert bad.name in str(info.value)


def test_the_checksum_of_every_safetensors_kind_is_file_checksum(tmp_path: Path) -> None:
    for kind in ("vector", "means", "condition"):
        name, save, _ = KINDS[kind]
        tensors, header = read_safetensors(
            save(tmp_path / name), format=f"steerlab.{kind}", what=kind
        )
        assert header[CHECKSUM_KEY] == file_checksum(tensors, header), kind


def test_save_and_read_safetensors_round_trip_and_refuse_what_is_not_theirs(
    tmp_path: Path,
) -> None:
    path = save_safetensors(
        tmp_path / "x.safetensors", {"t": torch.arange(3.0)}, {"format": "demo"}, what="demo"
    )
    tensors, header = read_safetensors(path, format="demo", what="demo")
    assert tensors["t"].tolist() == [0.0, 1.0, 2.0] and set(header) == {"format", CHECKSUM_KEY}
    with pytest.raises(VectorFileError, match="not a steerlab other"):
        read_safetensors(path, format="other", what="other")
    data = path.read_bytes()
    for blob, words in [(data[:-1], "truncated"), (data + b"\0", "unexpected bytes")]:
        (tmp_path / "y.safetensors").write_bytes(blob)
        with pytest.raises(VectorFileError, match=words):
            read_safetensors(tmp_path / "y.safetensors", format="demo", what="demo")
    with pytest.raises(VectorFileError, match="reserved"):
        save_safetensors(tmp_path / "z.safetensors", {}, {CHECKSUM_KEY: "x"}, what="demo")
    with pytest.raises(sl.VectorFileNotFoundError, match="does not exist"):
        save_safetensors(tmp_path / "no" / "z.safetensors", {}, {}, what="demo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors", "y.safetensors"]


def test_condition_files_of_schema_1_still_load_and_are_still_checked(tmp_path: Path) -> None:
    """Schema 1 condition files had a checksum of their own (raw float32 bytes, then the other
    header fields as JSON); they load, and damage to them is still refused."""
    direction = torch.tensor([1.0, -2.0, 0.5])
    header = {
        "format": "steerlab.condition",
        "schema_version": "1",
        "layer": "2",
        "threshold": "0.25",
        "comparison": '"greater"',
        "scope": '"prompt"',
        "metadata": "{}",
    }
    digest = hashlib.sha256(direction.numpy().astype("<f4").tobytes())
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    old = tmp_path / "old.safetensors"
    old.write_bytes(
        safetensors_save(
            {"direction": direction}, metadata={**header, "checksum": digest.hexdigest()}
        )
    )
    cond = sl.Condition.load(old)
    assert cond.layer == 2 and cond.threshold == 0.25 and torch.equal(cond.direction, direction)
    data = bytearray(old.read_bytes())
    data[-4] ^= 0x01
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(VectorFileError, match="checksum"):
        sl.Condition.load(tmp_path / "bad.safetensors")
    # re-saving writes schema 2 with the shared checksum
    again = cond.save(tmp_path / "new.safetensors").read_bytes()
    size = struct.unpack("<Q", again[:8])[0]
    meta = json.loads(again[8 : 8 + size])["__metadata__"]
    assert meta["schema_version"] == "2" and meta[CHECKSUM_KEY].startswith("sha256:")
