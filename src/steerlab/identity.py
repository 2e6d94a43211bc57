"""Model identity: what a file records about the model it was made for, and how to compare.

:func:`model_identity` is the name, type, sizes and :func:`model_fingerprint` (a short,
dtype-independent signature of the unembedding) that vectors, conditions and other steerlab
files record; :func:`fingerprints_match` tells whether two fingerprints describe the same
weights.

>>> from steerlab.testing import tiny_model
>>> ident = model_identity(tiny_model("gpt2"))
>>> fingerprints_match(ident["unembed_fingerprint"], model_fingerprint(tiny_model("gpt2")))
True
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["fingerprints_match", "model_fingerprint", "model_identity"]


_FINGERPRINT_PREFIX = "unembed-v1"
_FINGERPRINT_ROWS = 8
_FINGERPRINT_PROBES = 4
_FINGERPRINT_RTOL = 0.05


def model_fingerprint(model: Any) -> str:
    """A short signature of the model's unembedding, to tell models of the same shape apart.

    Eight rows of ``lm_head.weight`` (spread over the vocabulary) are projected onto four fixed
    pseudo-random directions, giving 32 numbers, written with four significant digits after the
    matrix shape: ``"unembed-v1:<vocab>x<d_model>:<n1>,<n2>,..."``. Unlike a hash of the bits,
    the numbers survive loading the same weights in another dtype or on another device;
    :func:`fingerprints_match` compares two signatures with a 5 % tolerance, while an unrelated
    model gives an unrelated signature. Returns ``""`` when the weights are not materialised
    (meta device).

    >>> from steerlab.testing import tiny_model
    >>> fp = model_fingerprint(tiny_model("llama"))
    >>> fp.split(":")[1].endswith("x32"), len(fp.split(":")[2].split(","))
    (True, 32)
    >>> fingerprints_match(fp, model_fingerprint(tiny_model("llama", seed=1)))
    False
    """
    weight = getattr(model.adapter.unembed, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.is_meta:
        return ""
    vocab, width = weight.shape
    rows = sorted({int((i + 0.5) * vocab / _FINGERPRINT_ROWS) for i in range(_FINGERPRINT_ROWS)})
    generator = torch.Generator().manual_seed(0)
    probes = torch.randn(width, _FINGERPRINT_PROBES, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        picked = weight.detach()[rows].to("cpu", torch.float64)
    values = (picked @ probes).flatten().tolist()
    numbers = ",".join(f"{x:.4g}" for x in values)
    return f"{_FINGERPRINT_PREFIX}:{vocab}x{width}:{numbers}"


def _parse_fingerprint(text: str) -> tuple[str, torch.Tensor] | None:
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != _FINGERPRINT_PREFIX:
        return None
    try:
        values = torch.tensor([float(x) for x in parts[2].split(",")], dtype=torch.float64)
    except ValueError:
        return None
    return parts[1], values


def fingerprints_match(a: str, b: str, *, rtol: float = _FINGERPRINT_RTOL) -> bool:
    """Whether two :func:`model_fingerprint` strings describe the same unembedding.

    Shapes must be equal and the signatures within ``rtol`` (relative, in norm). Fingerprints of
    an unknown format are compared as plain strings.

    >>> fingerprints_match("unembed-v1:4x2:1.0,2.0", "unembed-v1:4x2:1.001,2.0")
    True
    >>> fingerprints_match("unembed-v1:4x2:1.0,2.0", "unembed-v1:4x2:-1.0,2.0")
    False
    """
    pa, pb = _parse_fingerprint(a), _parse_fingerprint(b)
    if pa is None or pb is None:
        return a == b
    if pa[0] != pb[0] or pa[1].shape != pb[1].shape:
        return False
    scale = max(float(pa[1].norm()), float(pb[1].norm()))
    return float((pa[1] - pb[1]).norm()) <= rtol * scale


def model_identity(model: Any) -> dict[str, Any]:
    """The model-identity part of the vector metadata (name, type, sizes, fingerprint).

    >>> from steerlab.testing import tiny_model
    >>> ident = model_identity(tiny_model("gpt2"))
    >>> ident["model_name"], ident["d_model"], ident["n_layers"]
    ('tiny-gpt2', 32, 3)
    """
    weight = getattr(model.adapter.unembed, "weight", None)
    vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None
    return {
        "model_name": str(model.name),
        "model_type": str(model.adapter.model_type),
        "d_model": int(model.d_model),
        "n_layers": int(model.n_layers),
        "vocab_size": vocab,
        "unembed_fingerprint": model_fingerprint(model),
    }
