"""Memory defaults for vLLM's CPU backend: a KV cache sized to start beside other processes.

Left to itself, vLLM's CPU backend reserves ``gpu_memory_utilization`` (0.92 by default) of the
machine's *total* memory for the engine and refuses to start when less is free, with a message
that ends in "See root cause above". steerlab's front ends (:func:`steerlab.vllm.load`,
``steerlab serve --engine vllm``) instead give vLLM an explicit KV cache size on CPU, unless the
user chose one (``VLLM_CPU_KVCACHE_SPACE``, ``kv_cache_memory_bytes`` or
``gpu_memory_utilization``): :data:`DEFAULT_KV_CACHE_GIB` GiB, or :data:`FREE_FRACTION` of the
memory free at start if that is less. When even :data:`MIN_KV_CACHE_GIB` GiB does not fit, or a
size the user chose exceeds the free memory, they raise
:class:`~steerlab.errors.InsufficientMemoryError` naming the setting, before vLLM starts.

>>> GiB = 1 << 30
>>> kv_cache_options({}, on_cpu=True, available=16 * GiB, environ={})["kv_cache_memory_bytes"] / GiB
2.0
>>> kv_cache_options({}, on_cpu=True, available=2 * GiB, environ={})["kv_cache_memory_bytes"] / GiB
0.5
>>> kv_cache_options({"max_model_len": 512}, on_cpu=False, environ={})
{'max_model_len': 512}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from steerlab.errors import InsufficientMemoryError, InvalidInputError

__all__ = [
    "DEFAULT_KV_CACHE_GIB",
    "FREE_FRACTION",
    "KV_CACHE_ENV",
    "MIN_KV_CACHE_GIB",
    "kv_cache_options",
]

KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
"""vLLM's environment variable for the CPU KV cache size, in GiB."""

DEFAULT_KV_CACHE_GIB = 2.0
"""KV cache on CPU when the user sets none (room for ~45k tokens of the default model in fp32)."""

FREE_FRACTION = 0.25
"""At most this share of the free memory goes to the default KV cache (the rest is left for the
weights, activations and other processes)."""

MIN_KV_CACHE_GIB = 0.25
"""Below this, the default KV cache is not worth starting with: the engine refuses instead."""

_GiB = 1 << 30


def _available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _total() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
    except ImportError:  # no vLLM here: nothing will start, nothing to size
        return False
    return bool(current_platform.is_cpu())


def _gib(size: float) -> str:
    return f"{size / _GiB:.2f} GiB"


def kv_cache_options(
    options: Mapping[str, Any],
    *,
    on_cpu: bool | None = None,
    available: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """vLLM engine ``options`` with the KV cache size steerlab starts with (a new dict).

    On a GPU, or when the user set a size, ``options`` are returned unchanged (after checking a
    CPU size against the free memory). ``on_cpu``, ``available`` (bytes free) and ``environ``
    default to the running machine's; tests pass them.

    >>> kv_cache_options({}, on_cpu=True, available=1 << 28, environ={})
    Traceback (most recent call last):
        ...
    steerlab.errors.InsufficientMemoryError: only 0.25 GiB of memory is free, too little for vLLM's KV cache (at least 0.25 GiB beside the model): free memory, or set the size with VLLM_CPU_KVCACHE_SPACE=<GiB>
    """  # noqa: E501
    out = dict(options)
    env = os.environ if environ is None else environ
    if not (_on_cpu() if on_cpu is None else on_cpu):
        return out
    free = _available() if available is None else available
    chosen = env.get(KV_CACHE_ENV, "").strip()
    if chosen:
        try:  # vLLM reads it with int()
            size = int(chosen) * _GiB
        except ValueError:
            raise InvalidInputError(
                f"{KV_CACHE_ENV}={chosen!r} is not a whole number of GiB"
            ) from None
        if size > free:
            raise InsufficientMemoryError(
                f"{KV_CACHE_ENV}={chosen} asks for {_gib(size)} of KV cache but only "
                f"{_gib(free)} of memory is free: lower {KV_CACHE_ENV} or free memory"
            )
        return out
    if out.get("kv_cache_memory_bytes") is not None:
        size = int(out["kv_cache_memory_bytes"])
        if size > free:
            raise InsufficientMemoryError(
                f"kv_cache_memory_bytes={size} ({_gib(size)}) exceeds the {_gib(free)} of free "
                f"memory: lower kv_cache_memory_bytes or free memory"
            )
        return out
    if out.get("gpu_memory_utilization") is not None:
        fraction = float(out["gpu_memory_utilization"])
        total = _total()
        if fraction * total > free:
            raise InsufficientMemoryError(
                f"gpu_memory_utilization={fraction} reserves {_gib(fraction * total)} of this "
                f"machine's {_gib(total)} on vLLM's CPU backend but only {_gib(free)} is free: "
                f"lower gpu_memory_utilization, or leave it unset (steerlab then sizes the KV "
                f"cache from the free memory)"
            )
        return out
    default = min(DEFAULT_KV_CACHE_GIB * _GiB, FREE_FRACTION * free)
    if default < MIN_KV_CACHE_GIB * _GiB:
        raise InsufficientMemoryError(
            f"only {_gib(free)} of memory is free, too little for vLLM's KV cache (at least "
            f"{MIN_KV_CACHE_GIB} GiB beside the model): free memory, or set the size with "
            f"{KV_CACHE_ENV}=<GiB>"
        )
    # whole MiB: vLLM divides the cache into blocks anyway
    out["kv_cache_memory_bytes"] = int(default) // (1 << 20) * (1 << 20)
    return out
