"""steerlab's files: atomic writes, checksums and checked safetensors headers, for every kind.

Vector files (:mod:`steerlab.vectors`), activation means (:mod:`steerlab.ablation.means`),
conditions (:mod:`steerlab.conditions`) and GGUF control vectors (:mod:`steerlab.editing`) are
written the same way: to a temporary file in the target's folder, flushed to disk and renamed
over the target (:func:`atomic_output`), so a reader never sees half a file and a failure leaves
nothing behind; with a SHA-256 :func:`file_checksum` of their tensors and header strings, checked
on load (:func:`check_file_checksum`). :func:`save_safetensors` and :func:`read_safetensors` do
both for the safetensors kinds, with the header checks (truncation, trailing bytes, the format
tag) in one place.

>>> import tempfile, pathlib, torch
>>> file = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
>>> _ = save_safetensors(file, {"t": torch.ones(2)}, {"format": "demo"}, what="demo")
>>> tensors, header = read_safetensors(file, format="demo", what="demo")
>>> tensors["t"].tolist(), header["format"], header[CHECKSUM_KEY][:7]
([1.0, 1.0], 'demo', 'sha256:')
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from steerlab.errors import FileWriteError, VectorFileError, VectorFileNotFoundError

__all__ = [
    "CHECKSUM_KEY",
    "atomic_output",
    "check_file_checksum",
    "decode_json_metadata",
    "file_checksum",
    "read_safetensors",
    "read_safetensors_header",
    "save_safetensors",
    "write_atomically",
]

CHECKSUM_KEY = "checksum"
"""Header key holding :func:`file_checksum` (a plain string, ``"sha256:<hex>"``, not JSON)."""

_MAX_HEADER = 64 * 1024 * 1024


def _write_error(target: Path, err: OSError) -> FileWriteError:
    error = FileWriteError(f"cannot write {target}: {err.strerror or err}")
    error.errno = err.errno
    return error


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path next to ``target`` to write to; renamed over ``target`` on success.

    A reader never sees a half-written file. Failures (``target`` is a folder, no permission,
    disk full) raise :class:`~steerlab.errors.FileWriteError` naming ``target``, not the
    hidden temporary file, and the temporary file is removed whatever happens (also on
    ``KeyboardInterrupt``). The folder must exist.

    >>> import tempfile, pathlib
    >>> file = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
    >>> with atomic_output(file) as tmp:
    ...     _ = tmp.write_text("ok")
    >>> file.read_text(), sorted(p.name for p in file.parent.iterdir())
    ('ok', ['x.txt'])
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise FileWriteError(f"cannot write {target}: it is a directory")
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise _write_error(target, err) from None
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as err:
        raise _write_error(target, err) from None
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through :func:`atomic_output` (flushed to disk first).

    >>> import tempfile, pathlib
    >>> file = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> write_atomically(file, b"ok"); file.read_bytes()
    b'ok'
    """
    with atomic_output(target) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


# --- checksums ---------------------------------------------------------------------------------
_CHECKSUM_DOMAIN = b"steerlab-file-checksum-v1\0"


def file_checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 of tensors and string metadata, as ``"sha256:<64 hex digits>"``.

    Covers every tensor's name, dtype, shape and bytes (in name order) and every metadata
    key and value except :data:`CHECKSUM_KEY`, so a writer computes it over what it is about
    to save, stores it under :data:`CHECKSUM_KEY`, and a reader recomputes it over what it
    loaded (:func:`check_file_checksum`). Any changed bit changes it; the order of keys and
    the file layout do not. Used by vector, means and GGUF files (and meant for any other
    safetensors-with-metadata file of steerlab).

    >>> import torch
    >>> a = file_checksum({"layer.1": torch.ones(2)}, {"method": '"manual"'})
    >>> a.startswith("sha256:"), len(a)
    (True, 71)
    >>> a == file_checksum({"layer.1": torch.tensor([1.0, 1.0 + 2**-23])}, {"method": '"manual"'})
    False
    """
    digest = hashlib.sha256(_CHECKSUM_DOMAIN)
    meta = {str(k): str(v) for k, v in metadata.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        head = json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        for part in (head, raw):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return "sha256:" + digest.hexdigest()


def check_file_checksum(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], file: str | os.PathLike[str]
) -> None:
    """Raise :class:`~steerlab.errors.VectorFileError` naming ``file`` unless
    ``metadata[CHECKSUM_KEY]`` matches :func:`file_checksum` of what was read.

    >>> import torch
    >>> meta = {"k": "1"}
    >>> meta[CHECKSUM_KEY] = file_checksum({"t": torch.ones(2)}, meta)
    >>> check_file_checksum({"t": torch.ones(2)}, meta, "f.safetensors")
    >>> check_file_checksum({"t": torch.zeros(2)}, meta, "f.safetensors")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.VectorFileError: f.safetensors: checksum mismatch: ...
    """
    stored = metadata.get(CHECKSUM_KEY)
    if not isinstance(stored, str) or not stored:
        raise VectorFileError(
            f"{file}: no {CHECKSUM_KEY!r} in the header, which this file's schema requires "
            f"(the header was damaged or edited)"
        )
    actual = file_checksum(tensors, metadata)
    if stored != actual:
        raise VectorFileError(
            f"{file}: checksum mismatch: the file changed after it was written (corrupted "
            f"or edited); stored {stored[:19]}..., content gives {actual[:19]}..."
        )


def decode_json_metadata(
    raw: Mapping[str, object], file: str | os.PathLike[str], *, skip: Iterable[str] = ()
) -> dict[str, Any]:
    """JSON-decode each string value of a safetensors header, refusing NaN and infinities.

    Raises :class:`~steerlab.errors.VectorFileError` naming ``file`` and the key.

    >>> decode_json_metadata({"a": "[1, 2]", "format": "x"}, "f", skip=["format"])
    {'a': [1, 2]}
    >>> decode_json_metadata({"a": "NaN"}, "f")
    Traceback (most recent call last):
        ...
    steerlab.errors.VectorFileError: f: metadata 'a' holds a non-finite number (NaN)
    """

    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    skipped = set(skip)
    out: dict[str, Any] = {}
    for key, text in raw.items():
        if key in skipped:
            continue
        if not isinstance(text, str):
            raise VectorFileError(f"{file}: metadata {key!r} is not a string")
        try:
            out[key] = json.loads(text, parse_constant=refuse)
        except json.JSONDecodeError:
            raise VectorFileError(f"{file}: metadata {key!r} is not valid JSON: {text!r}") from None
        except ValueError as err:
            raise VectorFileError(
                f"{file}: metadata {key!r} holds a non-finite number ({err})"
            ) from None
        if isinstance(out[key], float) and not math.isfinite(out[key]):
            raise VectorFileError(f"{file}: metadata {key!r} holds a non-finite number")
    return out


# --- safetensors files ---------------------------------------------------------------------------
def read_safetensors_header(data: bytes, file: Path, *, what: str) -> dict[str, Any]:
    """The JSON header of safetensors ``data`` read from ``file``, its structure checked: the
    length field, that it is a JSON object, every tensor's offsets, and that the tensors end
    exactly where the file does (a truncated file or trailing bytes are refused).

    Raises :class:`~steerlab.errors.VectorFileError` naming ``file`` (a steerlab ``what`` file).

    >>> read_safetensors_header(b"abc", Path("v.safetensors"), what="vector")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.VectorFileError: v.safetensors: not a steerlab vector file (only 3 bytes: ...
    """
    if len(data) < 8:
        raise VectorFileError(
            f"{file}: not a steerlab {what} file (only {len(data)} bytes: truncated or empty)"
        )
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER or size < 2:
        raise VectorFileError(f"{file}: not a safetensors file (header length field reads {size})")
    if 8 + size > len(data):
        raise VectorFileError(
            f"{file}: truncated (the header claims {size} bytes, the file has {len(data) - 8} "
            f"after the length field)"
        )
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VectorFileError(f"{file}: corrupt header (not JSON: {err})") from None
    if not isinstance(header, dict):
        raise VectorFileError(f"{file}: corrupt header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(x, int) for x in offsets)
        ):
            raise VectorFileError(f"{file}: corrupt header entry for tensor {name!r}")
        end = max(end, offsets[1])
    body = len(data) - 8 - size
    if end > body:
        raise VectorFileError(
            f"{file}: truncated (tensor data needs {end} bytes, the file holds {body})"
        )
    if end < body:
        raise VectorFileError(f"{file}: corrupt ({body - end} unexpected bytes after the tensors)")
    return header


def save_safetensors(
    target: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    header: Mapping[str, str],
    *,
    what: str,
) -> Path:
    """Write ``tensors`` (contiguous, on the CPU) and the string ``header`` to ``target`` as
    safetensors, atomically (:func:`write_atomically`), the header completed with
    :data:`CHECKSUM_KEY` (:func:`file_checksum` of both); returns the path.

    The folder must exist: otherwise :class:`~steerlab.errors.VectorFileNotFoundError` naming it
    (``what`` names the kind of file in messages). See the module example.
    """
    from safetensors.torch import save as safetensors_save

    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise VectorFileNotFoundError(f"cannot save {target}: folder {folder} does not exist")
    if CHECKSUM_KEY in header:
        raise VectorFileError(f"{what} header key {CHECKSUM_KEY!r} is reserved for the checksum")
    stored = {**header, CHECKSUM_KEY: file_checksum(tensors, header)}
    write_atomically(target, safetensors_save(dict(tensors), metadata=stored))
    return target


def read_safetensors(
    path: str | os.PathLike[str], *, format: str, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, header strings)`` of a steerlab safetensors file whose header says
    ``format``; the checksum is left to the caller, whose schema version says whether there is
    one (:func:`check_file_checksum`).

    Refused with :class:`~steerlab.errors.VectorFileNotFoundError` (no file, a folder) or
    :class:`~steerlab.errors.VectorFileError` naming the file: unreadable, truncated, trailing
    bytes, a corrupt header or tensor data, another ``format``. See the module example.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    file = Path(path)
    if file.is_dir():
        raise VectorFileNotFoundError(f"{file} is a directory, not a {what} file")
    if not file.is_file():
        raise VectorFileNotFoundError(f"no {what} file at {file}")
    try:
        data = file.read_bytes()
    except OSError as err:
        raise VectorFileError(f"cannot read {file}: {err.strerror or err}") from None
    raw = read_safetensors_header(data, file, what=what).get("__metadata__")
    if not isinstance(raw, dict) or raw.get("format") != format:
        raise VectorFileError(
            f"{file}: a safetensors file, but not a steerlab {what} (no format={format!r} in its "
            "metadata)"
        )
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise VectorFileError(f"{file}: corrupt safetensors data ({err})") from None
    return tensors, raw
