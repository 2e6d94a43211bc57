"""Steering vectors: per-layer directions in the residual stream, as immutable values.

A :class:`SteeringVector` maps layer indices (0-based, "output of block L") to one direction of
size ``d_model`` each, plus JSON-able metadata describing where it came from. Every transform
returns a new vector; the original and the caller's tensors are never modified.

>>> import torch
>>> v = SteeringVector.from_tensor(torch.tensor([3.0, 4.0]), layers=[1, 2])
>>> v.layers
(1, 2)
>>> v.scaled(2.0)[1].tolist(), v[1].tolist()
([6.0, 8.0], [3.0, 4.0])
>>> (v - v.scaled(0.5)).normalized()[2].tolist()
[0.6000000238418579, 0.800000011920929]

Metadata schema
---------------
Vectors made by steerlab carry these keys (all optional for hand-made vectors; unknown keys are
kept as they are):

=======================  ===================================================================
key                      meaning
=======================  ===================================================================
``model_name``           the model's name or path when the vector was made
``model_type``           ``config.model_type`` (``"llama"``, ``"gpt2"`` ...)
``d_model``              hidden size of the model (= size of every direction)
``n_layers``             number of decoder blocks of the model
``vocab_size``           rows of the unembedding
``unembed_fingerprint``  :func:`model_fingerprint` of the model
``operation``            what the direction is meant for: ``"add"`` (steering) or
                         ``"project_out"`` (directional ablation)
``site``                 where the vector lives (:mod:`steerlab.sites`): ``"resid"`` (the
                         residual stream after a decoder block; files without the key, or
                         with the older ``"block_output"``, mean this), ``"attn_out"``,
                         ``"mlp_out"``, ``"head"`` or ``"router"``
``heads``                for ``site="head"``: ``{"<layer>": [heads]}`` a method chose
``layer_convention``     ``"output of block L, 0-based"`` (llama.cpp's ``direction.L``)
``method``               how the direction was computed (``"mean_diff"``, ``"pca"`` ...)
``positions``            token positions activations were read at (``"last"``, ``"mean"``, -2)
``normalization``        ``None`` (raw), ``"unit"``, or ``"residual"`` (see below)
``recommended_strength`` a strength found by tuning, when there is one
``dataset``              ``{"name", "description", "source", "n_positive", "n_negative",
                         "paired"}``
``library_version``      ``steerlab.__version__`` that made it
``created``              creation time, ISO 8601 in UTC
=======================  ===================================================================

Strength conventions
--------------------
A strength is always a plain multiplier: steering adds ``strength * vec[L]`` to the residual
stream at layer ``L``. What "strength 1.0" means therefore depends on the vector's norm:

* **raw** (the default of every method): ``mean_diff`` at strength 1.0 moves the mean
  activation of the negative examples onto that of the positive ones; ``pca`` and ``probe`` are
  scaled the same way (the mean difference's component along their axis).
* **relative to the residual stream**: :meth:`SteeringVector.scaled_to_residual` rescales each
  layer to ``fraction`` times the typical residual norm at that layer (measure it with
  :func:`steerlab.analysis.residual_norms`), so strength 1.0 with ``fraction=0.5`` adds a vector
  half as long as a typical activation, at any layer and in any model.

Files
-----
:meth:`SteeringVector.save` writes safetensors: one tensor per layer keyed ``"layer.<L>"``, and
in the header's string metadata ``format = "steerlab.vector"``, ``schema_version``, every
metadata key with a JSON-encoded value, and ``checksum``: the SHA-256 of the tensors (names,
dtypes, shapes, bytes) and of every other metadata string (:func:`file_checksum`). The file is
written to a temporary file in the same folder and moved into place, so a crash never leaves
half a file. :meth:`SteeringVector.load` verifies the checksum (any flipped bit, in the tensors
or in the header, is refused), validates everything and raises
:class:`~steerlab.errors.VectorFileError` naming the file for anything else. Files of schema
version 1 (before checksums) still load. No pickle is involved anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from steerlab.checks import as_int
from steerlab.errors import (
    InvalidInputError,
    LayerNotFoundError,
    UnsupportedModelError,
    VectorFileError,
    VectorMismatchError,
)
from steerlab.files import (
    CHECKSUM_KEY,
    atomic_output,
    check_file_checksum,
    decode_json_metadata,
    file_checksum,
    read_safetensors,
    save_safetensors,
    write_atomically,
)
from steerlab.identity import fingerprints_match, model_fingerprint, model_identity
from steerlab.sites import check_site, site_width
from steerlab.version import __version__

__all__ = [
    "CHECKSUM_KEY",
    "MAX_LAYER",
    "FILE_FORMAT",
    "LAYER_CONVENTION",
    "SCHEMA_VERSION",
    "SteeringVector",
    "atomic_output",
    "check_file_checksum",
    "decode_json_metadata",
    "file_checksum",
    "fingerprints_match",
    "model_fingerprint",
    "model_identity",
    "vector_metadata",
    "write_atomically",
]

FILE_FORMAT = "steerlab.vector"
"""Value of the ``format`` key in the header of every steerlab vector file."""

SCHEMA_VERSION = 2
"""Version of the vector file layout this steerlab writes: 2 adds the checksum (1 still loads)."""

MAX_LAYER = 65535
"""Layer indices above this in a file are refused as corrupt (no model has that many blocks)."""

LAYER_CONVENTION = "output of block L, 0-based"
"""How layer keys are counted: layer ``L`` is the residual stream after decoder block ``L``."""

_SITE = "resid"
_OPERATIONS = ("add", "project_out")
_RESERVED_KEYS = ("format", "schema_version", CHECKSUM_KEY)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYER_KEY = re.compile(r"layer\.(0|[1-9][0-9]*)")
_EXTRA_KEY = re.compile(r"extra\.([a-z][a-z0-9_]*)\.(0|[1-9][0-9]*)")


def _check_direction(layer: int, tensor: torch.Tensor, d_model: int | None) -> None:
    if tensor.ndim != 1:
        raise VectorMismatchError(
            f"direction for layer {layer} must be 1-D [d_model], got shape {tuple(tensor.shape)}"
        )
    if tensor.shape[0] == 0:
        raise VectorMismatchError(f"direction for layer {layer} is empty (size 0)")
    if d_model is not None and tensor.shape[0] != d_model:
        raise VectorMismatchError(
            f"direction for layer {layer} has size {tensor.shape[0]}, others have {d_model}"
        )
    if not torch.is_floating_point(tensor):
        raise VectorMismatchError(f"direction for layer {layer} must be floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise VectorMismatchError(f"direction for layer {layer} contains NaN or inf")


@dataclasses.dataclass(frozen=True, eq=False)
class SteeringVector:
    """Per-layer steering directions plus provenance metadata.

    ``directions`` maps a non-negative layer index to a 1-D tensor of size ``d_model``. The
    constructor copies the tensors (detached), so later changes to the caller's tensors do not
    leak in, and validates shapes and finiteness.

    >>> import torch
    >>> v = SteeringVector({3: torch.ones(4)}, metadata={"method": "manual"})
    >>> v.d_model, v.layers, v.metadata["method"]
    (4, (3,), 'manual')
    """

    directions: Mapping[int, torch.Tensor]
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extras: Mapping[str, Mapping[int, torch.Tensor]] = dataclasses.field(default_factory=dict)
    """Named per-layer tensors some operators need (``{"reference": {layer: mean}, "plane":
    {layer: second basis vector}}``, see :mod:`steerlab.operators`); saved with the vector."""

    def __post_init__(self) -> None:
        if not isinstance(self.directions, Mapping) or not self.directions:
            raise VectorMismatchError("a SteeringVector needs at least one layer direction")
        copied: dict[int, torch.Tensor] = {}
        d_model: int | None = None
        for layer, tensor in sorted(self.directions.items()):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise VectorMismatchError(
                    f"layer keys must be non-negative ints (resolve negative indices against a "
                    f"model first), got {layer!r}"
                )
            if not isinstance(tensor, torch.Tensor):
                raise VectorMismatchError(f"direction for layer {layer} is not a torch.Tensor")
            _check_direction(layer, tensor, d_model)
            d_model = tensor.shape[0]
            copied[layer] = tensor.detach().clone()
        object.__setattr__(self, "directions", copied)
        object.__setattr__(self, "extras", _copy_extras(self.extras, d_model))
        # deep: nested metadata (dataset, layer_info) must not be shared with the caller
        object.__setattr__(self, "metadata", copy.deepcopy(dict(self.metadata)))

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_tensor(
        cls,
        tensor: torch.Tensor,
        *,
        layers: Iterable[int],
        metadata: Mapping[str, Any] | None = None,
    ) -> SteeringVector:
        """The same direction at every layer in ``layers`` (the seed's multi-layer steering).

        >>> import torch
        >>> SteeringVector.from_tensor(torch.zeros(8), layers=[6, 8]).layers
        (6, 8)
        """
        try:
            keys = [as_int(layer, "layer") for layer in layers]
        except InvalidInputError as err:
            raise VectorMismatchError(str(err)) from None
        return cls(dict.fromkeys(keys, tensor), metadata=metadata or {})

    # --- access ------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        """Layer indices this vector has a direction for, ascending."""
        return tuple(self.directions)

    @property
    def d_model(self) -> int:
        """Hidden size of the directions."""
        return next(iter(self.directions.values())).shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored directions."""
        return next(iter(self.directions.values())).dtype

    def __getitem__(self, layer: int) -> torch.Tensor:
        if isinstance(layer, bool) or layer not in self.directions:
            raise LayerNotFoundError(
                f"this vector has no direction for layer {layer!r}; it has {self.layers}"
            )
        return self.directions[layer].clone()

    def __contains__(self, layer: object) -> bool:
        return layer in self.directions

    def __len__(self) -> int:
        return len(self.directions)

    def __repr__(self) -> str:
        norms = ", ".join(f"{k}: {v.norm():.3g}" for k, v in self.directions.items())
        method = self.metadata.get("method", "?")
        return f"SteeringVector(d_model={self.d_model}, method={method!r}, norms={{{norms}}})"

    @property
    def site(self) -> str:
        """Where this vector lives (:mod:`steerlab.sites`): its ``site`` metadata, ``"resid"``
        when there is none.

        >>> import torch
        >>> SteeringVector({0: torch.ones(2)}).site
        'resid'
        >>> SteeringVector({0: torch.ones(2)}, metadata={"site": "mlp_out"}).site
        'mlp_out'
        """
        try:
            return check_site(self.metadata.get("site", _SITE))
        except InvalidInputError as err:
            raise VectorMismatchError(f"the vector's metadata: {err}") from None

    def norms(self) -> dict[int, float]:
        """Euclidean norm of each layer's direction."""
        return {k: float(v.norm()) for k, v in self.directions.items()}

    # --- transforms ---------------------------------------------------------------------------
    def _map(self, fn: Any, **meta: Any) -> SteeringVector:
        # extras (reference mean, rotation plane) describe the activations, not the direction's
        # scale, so they carry over unchanged
        return SteeringVector(
            {k: fn(k, v) for k, v in self.directions.items()},
            metadata={**self.metadata, **meta},
            extras=self.extras,
        )

    def scaled(self, factor: float | Mapping[int, float]) -> SteeringVector:
        """A new vector multiplied by ``factor`` (a number, or one per layer).

        >>> import torch
        >>> SteeringVector({0: torch.ones(2)}).scaled({0: 3.0})[0].tolist()
        [3.0, 3.0]
        """
        if isinstance(factor, Mapping):
            missing = set(self.layers) - set(factor)
            if missing:
                raise VectorMismatchError(f"no scale given for layers {sorted(missing)}")
            return self._map(lambda k, v: v * float(factor[k]))
        value = _finite_number(factor, "scale factor")
        return self._map(lambda _k, v: v * value)

    def normalized(self) -> SteeringVector:
        """Each layer's direction scaled to unit norm (zero directions raise)."""

        def unit(layer: int, v: torch.Tensor) -> torch.Tensor:
            norm = v.norm()
            if float(norm) == 0.0:
                raise VectorMismatchError(f"cannot normalize the zero direction at layer {layer}")
            return v / norm

        return self._map(unit, normalization="unit")

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SteeringVector:
        """A copy on another device and/or dtype; the original is untouched."""
        return self._map(lambda _k, v: v.to(device=device, dtype=dtype))

    def select(self, layers: Iterable[int]) -> SteeringVector:
        """Only the given layers.

        >>> import torch
        >>> SteeringVector({0: torch.ones(2), 1: torch.ones(2)}).select([1]).layers
        (1,)
        """
        chosen = list(layers)
        missing = [
            layer for layer in chosen if isinstance(layer, bool) or layer not in self.directions
        ]
        if missing:
            raise LayerNotFoundError(
                f"this vector has no direction for layers {missing}; it has {self.layers}"
            )
        extras = {
            name: {k: t for k, t in per_layer.items() if k in chosen or len(per_layer) == 1}
            for name, per_layer in self.extras.items()
        }
        return SteeringVector(
            {k: self.directions[k] for k in chosen}, metadata=self.metadata, extras=extras
        )

    def with_metadata(self, **metadata: Any) -> SteeringVector:
        """A copy with metadata keys added or replaced."""
        return SteeringVector(
            self.directions, metadata={**self.metadata, **metadata}, extras=self.extras
        )

    def with_extras(self, **extras: Mapping[int, torch.Tensor]) -> SteeringVector:
        """A copy with named per-layer extras added or replaced (``reference=``, ``plane=``).

        >>> import torch
        >>> v = SteeringVector({0: torch.ones(2)}).with_extras(reference={0: torch.zeros(2)})
        >>> sorted(v.extras)
        ['reference']
        """
        return SteeringVector(
            self.directions, metadata=self.metadata, extras={**self.extras, **extras}
        )

    # --- arithmetic -----------------------------------------------------------------------------
    def _combine(self, other: object, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.d_model != self.d_model:
            raise VectorMismatchError(
                f"cannot combine vectors of sizes {self.d_model} and {other.d_model}"
            )
        metadata = _combined_metadata(self.metadata, other.metadata)
        out: dict[int, torch.Tensor] = {}
        for layer in sorted(set(self.layers) | set(other.layers)):
            a = self.directions.get(layer)
            b = other.directions.get(layer)
            if a is None:
                assert b is not None
                out[layer] = sign * b
            elif b is None:
                out[layer] = a.clone()
            else:
                out[layer] = a + sign * b.to(a.dtype)
        return SteeringVector(out, metadata=metadata)

    def __add__(self, other: object) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: object) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, factor: object) -> SteeringVector:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        return self.scaled(float(factor))

    __rmul__ = __mul__

    def __truediv__(self, factor: object) -> SteeringVector:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        if factor == 0:
            raise ZeroDivisionError("cannot divide a steering vector by zero")
        return self.scaled(1.0 / float(factor))

    def __neg__(self) -> SteeringVector:
        return self.scaled(-1.0)

    # --- geometry -------------------------------------------------------------------------------
    def orthogonalized(
        self, against: SteeringVector | torch.Tensor | Sequence[SteeringVector | torch.Tensor]
    ) -> SteeringVector:
        """A new vector with the overlap with other directions removed (Gram–Schmidt, per layer).

        ``against`` is one vector or a list; a :class:`SteeringVector` acts on the layers it has
        (layers it lacks are left alone by it), a raw ``Tensor[d_model]`` on every layer. At each
        layer the ``against`` directions are orthonormalised (modified Gram–Schmidt in float64,
        twice, skipping zero and linearly dependent ones) and their span is projected out, so the
        result has dot product ~0 with each of them while the component of this vector outside
        their span is unchanged. This is the seed's "remove overlap with other behaviours".

        >>> import torch
        >>> v = SteeringVector({0: torch.tensor([1.0, 1.0, 1.0])})
        >>> v.orthogonalized([torch.tensor([2.0, 0.0, 0.0])])[0].tolist()
        [0.0, 1.0, 1.0]
        """
        items = [against] if isinstance(against, (SteeringVector, torch.Tensor)) else against
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise VectorMismatchError(
                "against must be a SteeringVector, a Tensor, or a list of them, got "
                f"{type(against).__name__}"
            )
        labels: list[str] = []
        for i, item in enumerate(items):
            if isinstance(item, SteeringVector):
                if item.d_model != self.d_model:
                    raise VectorMismatchError(
                        f"against[{i}] has size {item.d_model}, this vector {self.d_model}"
                    )
                labels.append(_describe(item))
            elif isinstance(item, torch.Tensor):
                _check_direction(-1, item, self.d_model)
                labels.append("tensor")
            else:
                raise VectorMismatchError(
                    f"against[{i}] must be a SteeringVector or a Tensor, got {type(item).__name__}"
                )

        def remove_span(layer: int, v: torch.Tensor) -> torch.Tensor:
            basis = [
                (item[layer] if isinstance(item, SteeringVector) else item).double().cpu()
                for item in items
                if not isinstance(item, SteeringVector) or layer in item
            ]
            q = _orthonormal_basis(basis)
            x = v.double().cpu()
            for _ in range(2):  # second pass removes what rounding left of the span
                for u in q:
                    x = x - (u @ x) * u
            return x.to(device=v.device, dtype=v.dtype)

        previous = list(self.metadata.get("orthogonalized_against", []))
        return self._map(remove_span, orthogonalized_against=previous + labels)

    def project_out_mean(self, mean: SteeringVector | None = None) -> SteeringVector:
        """A new vector without its component along a "mean" direction, per layer.

        Without ``mean``: the component along the all-ones direction (each direction minus the
        mean of its entries). A LayerNorm subtracts exactly that component from its input, so
        for LayerNorm models (GPT-2, GPT-NeoX, OPT, GPT-J) it never reaches any later block or
        the unembedding, and removing it changes nothing downstream of the next norm while
        making norms and cosines meaningful. RMSNorm models (Llama and most recent ones) do see
        it. With ``mean`` (e.g. the mean activation per layer, as a vector): the component along
        ``mean[L]`` at each layer, the common "remove the dominant mean direction".

        >>> import torch
        >>> SteeringVector({0: torch.tensor([3.0, 1.0])}).project_out_mean()[0].tolist()
        [1.0, -1.0]
        """
        if mean is not None:
            if not isinstance(mean, SteeringVector):
                raise VectorMismatchError(
                    f"mean must be a SteeringVector, got {type(mean).__name__}"
                )
            missing = [layer for layer in self.layers if layer not in mean]
            if missing:
                raise VectorMismatchError(f"mean has no direction for layers {missing}")
            return self.orthogonalized(mean).with_metadata(
                orthogonalized_against=list(self.metadata.get("orthogonalized_against", []))
                + ["mean direction"]
            )

        def centre(_layer: int, v: torch.Tensor) -> torch.Tensor:
            x = v.double()
            return (x - x.mean()).to(v.dtype)

        return self._map(centre, mean_removed=True)

    def scaled_to_residual(
        self, norms: Mapping[int, float], fraction: float = 1.0
    ) -> SteeringVector:
        """Each layer rescaled to ``fraction`` × the typical residual norm at that layer.

        ``norms`` is ``{layer: typical norm}``, as returned by
        :func:`steerlab.analysis.residual_norms`. Afterwards a steering strength ``s`` adds a
        vector of length ``s * fraction * norms[L]`` at layer ``L``: the same relative push at
        every layer and in every model, whereas a raw multiplier means more in a model or layer
        with a small residual stream.

        >>> import torch
        >>> v = SteeringVector({0: torch.tensor([3.0, 4.0]), 1: torch.tensor([0.0, 2.0])})
        >>> v.scaled_to_residual({0: 10.0, 1: 4.0}, fraction=0.5).norms()
        {0: 5.0, 1: 2.0}
        """
        value = _finite_number(fraction, "fraction")
        missing = [layer for layer in self.layers if layer not in norms]
        if missing:
            raise VectorMismatchError(f"no residual norm given for layers {missing}")
        targets = {
            layer: _finite_number(norms[layer], f"norm of layer {layer}") for layer in self.layers
        }

        def rescale(layer: int, v: torch.Tensor) -> torch.Tensor:
            norm = float(v.double().norm())
            if norm == 0.0:
                raise VectorMismatchError(f"cannot rescale the zero direction at layer {layer}")
            return (v.double() * (value * targets[layer] / norm)).to(v.dtype)

        return self._map(
            rescale,
            normalization="residual",
            residual_fraction=value,
            residual_norms={str(k): targets[k] for k in self.layers},
        )

    # --- compatibility ----------------------------------------------------------------------------
    def compatibility_problems(self, model: Any) -> tuple[list[str], list[str]]:
        """Why this vector may not fit ``model``: ``(fatal, overridable)`` lists of messages.

        Fatal problems make steering impossible (hidden size, a layer the model does not have);
        overridable ones mean the vector was made for another model (layer count, unembedding
        fingerprint, site) and :meth:`check_compatible` refuses them unless forced.

        >>> import torch
        >>> from steerlab.testing import tiny_model
        >>> SteeringVector({0: torch.ones(32)}).compatibility_problems(tiny_model("gpt2"))
        ([], [])
        """
        fatal: list[str] = []
        soft: list[str] = []
        made_for = self.metadata.get("model_name", "another model")
        try:
            site = self.site
            width = site_width(model.adapter, site) if site != "resid" else model.d_model
        except (VectorMismatchError, InvalidInputError, UnsupportedModelError) as err:
            return [str(err)], []
        where = "the residual stream" if site == "resid" else f"site {site!r}"
        if self.d_model != width:
            fatal.append(
                f"the vector's directions have size {self.d_model} but {where} of "
                f"{model.name!r} has size {width}"
            )
        beyond = [layer for layer in self.layers if layer >= model.n_layers]
        if beyond:
            fatal.append(
                f"the vector has layers {beyond} but {model.name!r} has only {model.n_layers} "
                f"layers (0..{model.n_layers - 1})"
            )
        n_layers = self.metadata.get("n_layers")
        if isinstance(n_layers, int) and n_layers != model.n_layers:
            soft.append(
                f"the vector was made for {made_for!r} with {n_layers} layers; {model.name!r} has "
                f"{model.n_layers}"
            )
        expected = self.metadata.get("unembed_fingerprint")
        if isinstance(expected, str) and expected and not fatal:
            actual = model_fingerprint(model)
            if actual and not fingerprints_match(expected, actual):
                soft.append(
                    f"the vector was made for {made_for!r}, whose unembedding differs from that "
                    f"of {model.name!r} (fingerprints do not match): a direction means nothing in "
                    f"another model's residual stream"
                )
        return fatal, soft

    def check_compatible(self, model: Any, *, force: bool = False) -> None:
        """Raise :class:`~steerlab.errors.VectorMismatchError` if this vector is not for ``model``.

        Compares the hidden size and the layer indices (always fatal), and, when the metadata
        records them, the layer count, the site and the unembedding fingerprint (made for another
        model). ``force=True`` turns the latter into a warning, for deliberate transfer between
        related models.

        >>> import torch
        >>> from steerlab.testing import tiny_model
        >>> vec = SteeringVector({0: torch.ones(32)}, metadata={"n_layers": 30})
        >>> vec.check_compatible(tiny_model("gpt2"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        steerlab.errors.VectorMismatchError: vector not compatible with 'tiny-gpt2': ...
        """
        fatal, soft = self.compatibility_problems(model)
        if fatal:
            raise VectorMismatchError(
                f"vector cannot be used with {model.name!r}: " + "; ".join(fatal)
            )
        if soft and not force:
            raise VectorMismatchError(
                f"vector not compatible with {model.name!r}: "
                + "; ".join(soft)
                + " (pass force=True to use it anyway)"
            )
        if soft:
            warnings.warn("using a vector made for another model: " + "; ".join(soft), stacklevel=2)

    # --- files ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write this vector to a safetensors file, atomically; returns the path.

        Tensors are stored as they are (dtype and bits exact) under ``"layer.<L>"``; metadata
        values must be JSON-serialisable (numbers must be finite), and the header gets a
        SHA-256 :func:`file_checksum` of both. The file appears complete or not at all: it is
        written to a temporary file in the same folder, flushed to disk, and renamed over
        ``path``; a folder in the way or a folder without write permission raises
        :class:`~steerlab.errors.FileWriteError` naming ``path`` and leaves nothing behind.

        >>> import tempfile, torch, pathlib
        >>> d = tempfile.TemporaryDirectory()
        >>> v = SteeringVector({2: torch.tensor([1.5, -2.0])}, metadata={"method": "manual"})
        >>> p = v.save(pathlib.Path(d.name, "v.safetensors"))
        >>> w = SteeringVector.load(p)
        >>> w.layers, w[2].tolist(), w.metadata
        ((2,), [1.5, -2.0], {'method': 'manual'})
        >>> d.cleanup()
        """
        header: dict[str, str] = {"format": FILE_FORMAT, "schema_version": str(SCHEMA_VERSION)}
        for key, value in self.metadata.items():
            if not isinstance(key, str):
                raise VectorFileError(f"metadata keys must be strings, got {key!r}")
            if key in _RESERVED_KEYS:
                raise VectorFileError(f"metadata key {key!r} is reserved for the file header")
            try:
                header[key] = json.dumps(value, allow_nan=False, sort_keys=True)
            except (TypeError, ValueError) as err:
                raise VectorFileError(
                    f"metadata {key!r} cannot be saved as JSON ({err}): {value!r}"
                ) from None
        tensors = {
            f"layer.{layer}": t.detach().to("cpu").contiguous()
            for layer, t in self.directions.items()
        }
        for name, per_layer in self.extras.items():
            for layer, t in per_layer.items():
                tensors[f"extra.{name}.{layer}"] = t.detach().to("cpu").contiguous()
        return save_safetensors(path, tensors, header, what="vector")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringVector:
        """Read a vector written by :meth:`save`, validating everything.

        Refused with :class:`~steerlab.errors.VectorFileError` (and a message naming the file
        and saying what is wrong): a file that is not safetensors, truncated or with trailing
        bytes, a corrupt header, a safetensors file that is not a steerlab vector, an unknown
        schema version, a checksum that does not match (any bit changed since it was written),
        metadata that is not JSON or holds NaN/inf, tensor names other than ``layer.<L>`` or
        with an absurd layer number, tensors that are not 1-D floating point, empty, of
        different sizes or of a size other than the recorded ``d_model``, and NaN or infinite
        values. Files of schema version 1 (no checksum) still load. Compatibility with a model
        is checked separately (:meth:`check_compatible`).
        """
        file = Path(path)
        tensors, raw_meta = read_safetensors(file, format=FILE_FORMAT, what="vector")
        metadata, version = _decode_metadata(raw_meta, file)
        if version >= 2:
            assert isinstance(raw_meta, dict)
            check_file_checksum(tensors, raw_meta, file)
        extras: dict[str, dict[int, torch.Tensor]] = {}
        for name in [n for n in tensors if n.startswith("extra.")]:
            match = _EXTRA_KEY.fullmatch(name)
            if match is None:
                raise VectorFileError(f"{file}: unexpected tensor {name!r}")
            tensor = tensors.pop(name)
            extras.setdefault(match.group(1), {})[int(match.group(2))] = tensor
        directions = _decode_tensors(tensors, metadata, file)
        try:
            return cls(directions, metadata=metadata, extras=extras)
        except VectorMismatchError as err:
            raise VectorFileError(f"{file}: {err}") from None


def _finite_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise VectorMismatchError(f"{what} must be a number, got {value!r}") from None
    number = float(value)
    if not math.isfinite(number):
        raise VectorMismatchError(f"{what} must be finite, got {number}")
    return number


def _copy_extras(
    extras: Mapping[str, Mapping[int, torch.Tensor]], d_model: int | None
) -> dict[str, dict[int, torch.Tensor]]:
    if not isinstance(extras, Mapping):
        raise VectorMismatchError(f"extras must be a mapping, got {type(extras).__name__}")
    out: dict[str, dict[int, torch.Tensor]] = {}
    for name, per_layer in extras.items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise VectorMismatchError(f"extra names must be lower-case identifiers, got {name!r}")
        if not isinstance(per_layer, Mapping) or not per_layer:
            raise VectorMismatchError(f"extra {name!r} must map layers to tensors")
        copied: dict[int, torch.Tensor] = {}
        for layer, tensor in sorted(per_layer.items()):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise VectorMismatchError(f"extra {name!r}: layer keys must be non-negative ints")
            if not isinstance(tensor, torch.Tensor):
                raise VectorMismatchError(f"extra {name!r} at layer {layer} is not a tensor")
            _check_direction(layer, tensor, d_model)
            copied[layer] = tensor.detach().clone()
        out[name] = copied
    return out


# --- helpers of the transforms ------------------------------------------------------------------
def _orthonormal_basis(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    basis: list[torch.Tensor] = []
    for v in vectors:
        scale = float(v.norm())
        if scale == 0.0:
            continue
        x = v / scale
        for _ in range(2):
            for u in basis:
                x = x - (u @ x) * u
        norm = float(x.norm())
        if norm > 1e-10:  # otherwise linearly dependent on the earlier ones
            basis.append(x / norm)
    return basis


_IDENTITY_KEYS = (
    "model_name",
    "model_type",
    "d_model",
    "n_layers",
    "vocab_size",
    "unembed_fingerprint",
)


def _combined_metadata(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata of ``a ± b``: ``a``'s, plus the model identity ``b`` records and ``a`` lacks;
    refused when both record a model and the models differ."""
    fa, fb = a.get("unembed_fingerprint"), b.get("unembed_fingerprint")
    differ = isinstance(fa, str) and fa and isinstance(fb, str) and fb
    if differ and not fingerprints_match(str(fa), str(fb)):
        raise VectorMismatchError(
            f"cannot combine vectors made for different models ({a.get('model_name', '?')!r} "
            f"and {b.get('model_name', '?')!r}: their unembedding fingerprints differ)"
        )
    for key in ("model_type", "n_layers", "operation"):
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            raise VectorMismatchError(
                f"cannot combine vectors made for different models or uses ({key} "
                f"{a[key]!r} vs {b[key]!r})"
            )
    merged = dict(a)
    for key in _IDENTITY_KEYS:
        if merged.get(key) in (None, "") and b.get(key) not in (None, ""):
            merged[key] = b[key]
    merged["method"] = "arithmetic"
    return merged


def _describe(vec: SteeringVector) -> str:
    dataset = vec.metadata.get("dataset")
    if isinstance(dataset, Mapping) and dataset.get("name"):
        return f"{dataset['name']} ({vec.metadata.get('method', '?')})"
    return str(vec.metadata.get("method", "vector"))


# --- file decoding ------------------------------------------------------------------------------
def _decode_metadata(raw: object, file: Path) -> tuple[dict[str, Any], int]:
    if not isinstance(raw, dict) or raw.get("format") != FILE_FORMAT:
        raise VectorFileError(
            f"{file}: a safetensors file, but not a steerlab vector (no format={FILE_FORMAT!r} "
            "in its metadata)"
        )
    version = raw.get("schema_version")
    if version not in ("1", str(SCHEMA_VERSION)):
        if isinstance(version, str) and version.isdigit() and int(version) > SCHEMA_VERSION:
            raise VectorFileError(
                f"{file}: written with vector schema version {version}, newer than the version "
                f"this steerlab reads ({SCHEMA_VERSION}); upgrade steerlab"
            )
        raise VectorFileError(
            f"{file}: unknown vector schema version {version!r} (this steerlab reads "
            f"{SCHEMA_VERSION})"
        )
    number = int(version)
    # a version-1 file predates checksums: its checksum key would be a damaged header
    skip = _RESERVED_KEYS if number >= 2 else ("format", "schema_version")
    return decode_json_metadata(raw, file, skip=skip), number


def _decode_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], file: Path
) -> dict[int, torch.Tensor]:
    if not tensors:
        raise VectorFileError(f"{file}: the file holds no layer directions")
    directions: dict[int, torch.Tensor] = {}
    for name, tensor in tensors.items():
        match = _LAYER_KEY.fullmatch(name)
        if match is None:
            raise VectorFileError(f"{file}: unexpected tensor {name!r} (expected 'layer.<L>')")
        if int(match.group(1)) > MAX_LAYER:
            raise VectorFileError(
                f"{file}: tensor {name!r} names an absurd layer number (more than {MAX_LAYER})"
            )
        if tensor.dtype not in _FLOAT_DTYPES:
            raise VectorFileError(
                f"{file}: tensor {name!r} has dtype {tensor.dtype}, expected a float dtype"
            )
        if tensor.ndim != 1:
            raise VectorFileError(
                f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, expected [d_model]"
            )
        if tensor.shape[0] == 0:
            raise VectorFileError(f"{file}: tensor {name!r} is an empty direction (size 0)")
        if not bool(torch.isfinite(tensor).all()):
            raise VectorFileError(f"{file}: tensor {name!r} contains NaN or infinite values")
        directions[int(match.group(1))] = tensor
    sizes = {t.shape[0] for t in directions.values()}
    if len(sizes) != 1:
        raise VectorFileError(f"{file}: layer directions have different sizes {sorted(sizes)}")
    d_model = metadata.get("d_model")
    if d_model is not None and (not isinstance(d_model, int) or d_model not in sizes):
        raise VectorFileError(
            f"{file}: shape mismatch: the metadata says d_model={d_model!r} but the directions "
            f"have size {sizes.pop()}"
        )
    n_layers = metadata.get("n_layers")
    if isinstance(n_layers, int) and max(directions) >= n_layers:
        raise VectorFileError(
            f"{file}: layer {max(directions)} is out of range for the recorded n_layers={n_layers}"
        )
    return directions


# --- vector metadata ----------------------------------------------------------------------------
def vector_metadata(
    model: Any,
    *,
    method: str,
    positions: str | int = "last",
    operation: str = "add",
    normalization: str | None = None,
    dataset: Mapping[str, Any] | None = None,
    recommended_strength: float | None = None,
    site: str = "resid",
    **extra: Any,
) -> dict[str, Any]:
    """The full self-describing metadata for a vector made from ``model``.

    Fills the schema of this module (model identity, site, layer convention, library version,
    UTC creation time) and adds ``extra`` keys as they are.

    >>> from steerlab.testing import tiny_model
    >>> meta = vector_metadata(tiny_model("gpt2"), method="mean_diff")
    >>> meta["site"], meta["layer_convention"], meta["operation"]
    ('resid', 'output of block L, 0-based', 'add')
    """
    if operation not in _OPERATIONS:
        raise VectorMismatchError(f"operation must be one of {_OPERATIONS}, not {operation!r}")
    meta: dict[str, Any] = {
        **model_identity(model),
        "operation": operation,
        "site": check_site(site),
        "layer_convention": LAYER_CONVENTION,
        "method": method,
        "positions": positions,
        "normalization": normalization,
        "dataset": dict(dataset) if dataset is not None else None,
        "library_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if recommended_strength is not None:
        meta["recommended_strength"] = _finite_number(recommended_strength, "recommended_strength")
    meta.update(extra)
    return meta
