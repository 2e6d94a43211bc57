"""Steering operators: what a steering hook does with the residual stream ``h`` at a token.

Adding ``s·v`` is one operator among several. Each operator is a small class with its formula
in the docstring, registered under a name in :data:`OPERATORS`; ``op="clamp"`` on
``model.steer``, on every per-call ``steering=``, on :class:`~steerlab.interventions.Steering`
and in the CLI (``--op``) picks one. Throughout, ``v`` is the vector's direction at the layer,
``u = v/‖v‖`` and ``s`` the (per-layer) strength:

============  ============================================================================
op            new residual ``h'`` at a selected token
============  ============================================================================
``add``       ``h + s·v`` (the default; CAA / ActAdd)
``add_norm``  ``h + s·v`` rescaled to the norm ``h`` had (``‖h'‖ = ‖h‖``)
``clamp``     component along ``u`` set to ``s·‖v‖``: ``h + (s‖v‖ − h·u)·u``
``cap``       component along ``u`` limited to at most ``s·‖v‖``: ``h − max(0, h·u − s‖v‖)·u``
``ablate``    component along ``u`` removed: ``h − (h·u)·u`` (strength ignored)
``rotate``    angular steering (arXiv 2510.26243): the part of ``h`` in the plane of ``b1 = u``
              and ``b2`` (the vector's ``plane`` extra, orthonormalised against ``b1``) is
              turned to the angle ``s`` degrees from ``b1``, keeping its length
``affine``    affine concept editing (arXiv 2411.09003): ``h − ((h − μ)·u)·u + s·v``, with
              ``μ`` the reference mean (the vector's ``reference`` extra)
``loreft``    low-rank representation fine-tuning (LoReFT, arXiv 2404.03592):
              ``h + s·Rᵀ(W h + b − R h)``, ``R`` of rank ``r`` with orthonormal rows, ``R``,
              ``W``, ``b`` stored as extras (:func:`loreft_extras`); ``v`` is not used
============  ============================================================================

A vector whose metadata says ``operation="project_out"`` (a refusal direction) uses ``ablate``
when no ``op`` is given. ``rotate`` and ``affine`` need per-layer tensors stored with the
vector (:attr:`~steerlab.vectors.SteeringVector.extras`): :func:`steerlab.compute_vector`
with ``method="mean_diff"`` records both (``reference`` = the mean activation of the negative
prompts, ``plane`` = the paper's second basis vector, see :func:`angular_plane`).

A new operator is a subclass of :class:`Operator` with ``params`` (per-layer constants) and
``apply`` (the formula), registered with :func:`register_operator`:

>>> import torch
>>> @register_operator("double_along")
... class DoubleAlong(Operator):
...     '''``h + (h·u)·u``: doubles the component along ``u``.'''
...     def params(self, direction, strength, extras):
...         return {"u": direction / direction.norm()}
...     def apply(self, hidden, p):
...         return hidden + (hidden * p["u"]).sum(-1, keepdim=True) * p["u"]
>>> h = torch.tensor([[[3.0, 4.0]]])
>>> get_operator("double_along").edit(h, torch.tensor([1.0, 0.0]), 1.0).tolist()
[[[6.0, 4.0]]]
>>> del OPERATORS["double_along"]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from steerlab.errors import InvalidInputError, VectorMismatchError

__all__ = [
    "OPERATORS",
    "Ablate",
    "Add",
    "AddNorm",
    "Affine",
    "Cap",
    "Clamp",
    "Operator",
    "Rotate",
    "LoReFT",
    "angular_plane",
    "check_extras",
    "get_operator",
    "is_loreft",
    "loreft_extras",
    "loreft_matrices",
    "loreft_op_refusal",
    "operator_names",
    "register_operator",
]


class Operator:
    """How a steering direction edits the residual stream; subclass and register to add one.

    :meth:`params` turns one layer's direction, strength and extras into constants (float32
    tensors of shape ``[d_model]`` or ``[]``); :meth:`apply` computes the new residual from
    ``hidden`` (``[..., d_model]`` float32) and those constants, broadcast with one row per
    batch row (``[batch, 1, d_model]`` / ``[batch, 1, 1]``), so rows with different vectors
    and strengths share one call. ``needs`` names the vector extras the operator reads;
    ``uses_strength`` is False for operators that ignore the strength.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    uses_strength: ClassVar[bool] = True

    def params(
        self, direction: torch.Tensor, strength: float, extras: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply(self, hidden: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def edit(
        self,
        hidden: torch.Tensor,
        direction: torch.Tensor,
        strength: float,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The operator applied to every token of ``hidden`` (a reference for tests and users).

        >>> import torch
        >>> get_operator("ablate").edit(torch.tensor([[2.0, 5.0]]), torch.tensor([0.0, 3.0]),
        ...                             0.0).tolist()
        [[2.0, 0.0]]
        """
        p = self.params(direction.float(), float(strength), dict(extras or {}))
        shaped = {k: v.float().reshape(-1) for k, v in p.items()}
        return self.apply(hidden.float(), shaped).to(hidden.dtype)

    def __repr__(self) -> str:
        return f"<operator {self.name!r}>"


OPERATORS: dict[str, Operator] = {}
"""Registered operators by name (see :func:`register_operator`)."""

_O = TypeVar("_O", bound=type[Operator])


def register_operator(name: str) -> Callable[[_O], _O]:
    """Class decorator registering an :class:`Operator` subclass under ``name``.

    >>> @register_operator("noop")
    ... class Noop(Operator):
    ...     def params(self, direction, strength, extras):
    ...         return {}
    ...     def apply(self, hidden, p):
    ...         return hidden
    >>> "noop" in operator_names()
    True
    >>> del OPERATORS["noop"]
    """
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"an operator name must be a non-empty string, got {name!r}")

    def add(cls: _O) -> _O:
        if not (isinstance(cls, type) and issubclass(cls, Operator)):
            raise InvalidInputError(f"{cls!r} is not an Operator subclass")
        cls.name = name
        OPERATORS[name] = cls()
        return cls

    return add


def operator_names() -> list[str]:
    """Names of the registered operators, in registration order."""
    return list(OPERATORS)


def get_operator(op: str | Operator) -> Operator:
    """The operator called ``op`` (an :class:`Operator` instance passes through).

    >>> get_operator("clamp").name
    'clamp'
    """
    if isinstance(op, Operator):
        return op
    if isinstance(op, str) and op in OPERATORS:
        return OPERATORS[op]
    raise InvalidInputError(f"unknown op {op!r}; available: {', '.join(OPERATORS)}")


def _dot(hidden: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return (hidden * u).sum(dim=-1, keepdim=True)


def _unit(direction: torch.Tensor, op: str) -> torch.Tensor:
    norm = float(direction.double().norm())
    if norm == 0.0 or not math.isfinite(norm):
        raise VectorMismatchError(f"op {op!r} needs a non-zero direction")
    return (direction.double() / norm).float()


# --- the operators -------------------------------------------------------------------------------
@register_operator("add")
class Add(Operator):
    """``h' = h + s·v``."""

    def params(
        self, direction: torch.Tensor, strength: float, extras: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {"delta": direction.float() * strength}

    def apply(self, hidden: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return hidden + p["delta"]


@register_operator("add_norm")
class AddNorm(Operator):
    """``h' = (h + s·v) · ‖h‖ / ‖h + s·v‖``: add, then restore the token's norm."""

    def params(
        self, direction: torch.Tensor, strength: float, extras: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {"delta": direction.float() * strength}

    def apply(self, hidden: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        added = hidden + p["delta"]
        before = hidden.norm(dim=-1, keepdim=True)
        after = added.norm(dim=-1, keepdim=True)
        # a sum of exactly zero has no direction to rescale; it stays zero
        return torch.where(after > 0, added * (before / after.clamp_min(1e-30)), added)


@register_operator("clamp")
class Clamp(Operator):
    """``h' = h + (s·‖v‖ − h·u)·u``: the component along ``u`` set to ``s·‖v‖``.

    On a sparse-autoencoder feature (:meth:`steerlab.sae.SAE.feature`, whose extras carry the
    feature's encoder) ``s`` is the feature's activation to set, on the SAE's own encoder and
    decoder: ``h' = h + (s − f(h))·v`` with ``v`` the decoder row and ``f(h)`` the feature's
    activation, ``z·[z > θ]`` with the pre-activation ``z = (h − p₀)·e`` (``e`` the
    ``sae_encoder`` extra, ``p₀`` the ``sae_zero`` point where ``z = 0``) and the gate
    ``(h − p_θ)·e > 0`` (``p_θ`` the ``sae_threshold`` point where ``z`` reaches the JumpReLU
    threshold, or 0 for ReLU). Both forms are one formula,
    ``h' = h + (target − z·gate)·d``, so plain and feature rows share a batch.
    """

    def params(
        self, direction: torch.Tensor, strength: float, extras: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if "sae_topk" in extras:
            raise VectorMismatchError(
                "op 'clamp' cannot set a TopK SAE feature: its activation depends on every "
                "other feature (the k largest win), so no per-feature formula is exact; steer "
                "the feature with op='add' instead"
            )
        if "sae_encoder" in extras:
            missing = [k for k in ("sae_zero", "sae_threshold") if k not in extras]
            if missing:
                raise VectorMismatchError(
                    f"op 'clamp' on an SAE feature needs the extras {missing} beside sae_encoder "
                    f"(take the vector from sae.feature(i))"
                )
            e = extras["sae_encoder"].double()
            zero = float(-(extras["sae_zero"].double() @ e))
            gate = float(-(extras["sae_threshold"].double() @ e))
            return {
                "d": direction.float(),
                "e": e.float(),
                "beta": torch.tensor([zero]),
                "gate": torch.tensor([gate]),
                "linear": torch.tensor([0.0]),
                "target": torch.tensor([strength]),
            }
        u = _unit(direction, self.name)
        return {
            "d": u,
            "e": u,
            "beta": torch.tensor([0.0]),
            "gate": torch.tensor([0.0]),
            "linear": torch.tensor([1.0]),
            "target": torch.tensor([strength * float(direction.double().norm())]),
        }

    def apply(self, hidden: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dot = _dot(hidden, p["e"])
        z = dot + p["beta"]
        open_ = torch.maximum((dot + p["gate"] > 0).to(hidden.dtype), p["linear"])
        return hidden + (p["target"] - z * open_) * p["d"]


@register_operator("cap")
class Cap(Operator):
    """``h' = h − max(0, h·u − s·‖v‖)·u``: the component along ``u`` limited to ``s·‖v‖``."""

    def params(
        self, direction: torch.Tensor, strength: float, extras: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        u = _unit(direction, self.name)
        target = torch.tensor([strength * float(direction.double().norm())])
        return {"u": u, "target": target}

    def apply(self, hidden: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        excess = (_dot(hidden, p["u"]) - p["target"]).clamp_min(0.0)
        return hidden - excess * p["u"]


@register_operator("ablate")
class Ablate(Operator):
    """``h' = h − (h·u)·u``: directional ablation; the strength is ignored."""

    uses_strength = False

    def params(
        self, direction: torch.Tensor, strength: float, extras: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {"u": _unit(direction, self.name)}

    def apply(self, hidden: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return hidden - _dot(hidden, p["u"]) * p["u"]


@register_operator("rotate")
class Rotate(Operator):
    """Angular steering (Vu & Nguyen, arXiv 2510.26243), ``s`` = the target angle in degrees.

    With ``b1 = u`` and ``b2`` the vector's ``plane`` extra made orthonormal to ``b1``, the
    projection ``P h = (h·b1) b1 + (h·b2) b2`` is replaced by a vector of the same length at
    angle ``θ = s°`` from ``b1`` in that plane:
    ``h' = h − P h + ‖P h‖ (cos θ · b1 + sin θ · b2)``. ``‖h'‖ = ‖h‖``; the component of ``h``
    outside the plane is untouched. ``θ = 0`` turns the in-plane part onto the direction,
    ``θ = 180`` onto its opposite.
    """

    needs = ("plane",)

    def params(
        self, direction: torch.Tensor, strength: float, extras: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        b1 = _unit(direction, self.name).double()
        second = extras["plane"].double()
        b2 = second - (second @ b1) * b1
        norm = float(b2.norm())
        if norm < 1e-6 * max(1.0, float(second.norm())):
            raise VectorMismatchError(
                "op 'rotate': the plane vector is parallel to the direction, so they span no plane"
            )
        theta = math.radians(strength)
        return {
            "b1": b1.float(),
            "b2": (b2 / norm).float(),
            "cos": torch.tensor([math.cos(theta)]),
            "sin": torch.tensor([math.sin(theta)]),
        }

    def apply(self, hidden: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = _dot(hidden, p["b1"])
        b = _dot(hidden, p["b2"])
        radius = torch.sqrt(a * a + b * b)
        return (
            hidden - a * p["b1"] - b * p["b2"] + radius * (p["cos"] * p["b1"] + p["sin"] * p["b2"])
        )


@register_operator("affine")
class Affine(Operator):
    """Affine concept editing (Marshall et al., arXiv 2411.09003), ``s`` = the paper's ``α``.

    ``h' = h − proj_u(h) + proj_u(μ) + s·v = h − ((h − μ)·u)·u + s·v``, where ``μ`` is the
    reference mean (the ``reference`` extra: the mean activation of the negative examples, the
    paper's ``r⁻``) and ``v = r⁺ − r⁻``. ``s = 0`` sets every token's component along ``u`` to the
    reference's (the concept erased, affinely); ``s = 1`` to that of the positive mean.
    """

    needs = ("reference",)

    def params(
        self, direction: torch.Tensor, strength: float, extras: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        u = _unit(direction, self.name)
        ref = float(extras["reference"].double() @ u.double())
        return {"u": u, "ref": torch.tensor([ref]), "delta": direction.float() * strength}

    def apply(self, hidden: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return hidden - (_dot(hidden, p["u"]) - p["ref"]) * p["u"] + p["delta"]


@register_operator("loreft")
class LoReFT(Operator):
    """Low-rank representation fine-tuning (Wu et al., arXiv 2404.03592), ``s`` scales the edit.

    ``h' = h + s·Rᵀ(W h + b − R h)``: within the ``r``-dimensional subspace spanned by ``R``'s
    orthonormal rows, the coordinates ``R h`` are replaced by the learned affine map ``W h + b``
    (``s = 1``, the paper's intervention); ``s = 0`` leaves ``h`` as it is. ``R`` (``[r,
    d_model]``), ``W`` (``[r, d_model]``) and ``b`` (``[r]``) are the vector's extras at the
    layer (see :func:`loreft_extras`; :func:`steerlab.training.train_intervention` trains them);
    the vector's direction is not read.
    """

    needs = ("loreft_b",)

    def params(
        self, direction: torch.Tensor, strength: float, extras: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        r, w, b = loreft_matrices(extras)
        return {
            "r": r.float().reshape(-1),
            "w": w.float().reshape(-1),
            "b": b.float(),
            "s": torch.tensor([strength], dtype=torch.float32),
        }

    def apply(self, hidden: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        b = p["b"]
        rank, width = b.shape[-1], hidden.shape[-1]
        # [rank] alone (edit) or [rows, 1, rank] in a hook: the matrices get the row dimension only
        lead = b.shape[:-1][:-1]
        r = p["r"].reshape(*lead, rank, width)
        w = p["w"].reshape(*lead, rank, width)
        coords = hidden @ (w - r).transpose(-1, -2) + b  # W h + b − R h
        return hidden + p["s"] * (coords @ r)


def loreft_extras(
    r: torch.Tensor, w: torch.Tensor, b: torch.Tensor, layer: int
) -> dict[str, dict[int, torch.Tensor]]:
    """LoReFT matrices of one layer as vector extras (each a ``[d_model]`` row, as files store).

    Row ``i`` of ``R`` is ``loreft_r{i}``, row ``i`` of ``W`` is ``loreft_w{i}``, and ``b`` is
    ``loreft_b`` zero-padded to ``d_model`` (the rank is the number of ``R`` rows).

    >>> import torch
    >>> ex = loreft_extras(torch.eye(3)[:2], torch.zeros(2, 3), torch.tensor([1.0, 2.0]), 5)
    >>> sorted(ex), ex["loreft_b"][5].tolist()
    (['loreft_b', 'loreft_r0', 'loreft_r1', 'loreft_w0', 'loreft_w1'], [1.0, 2.0, 0.0])
    """
    if r.ndim != 2 or w.shape != r.shape or b.shape != (r.shape[0],):
        raise VectorMismatchError(
            f"LoReFT needs R and W of shape [rank, d_model] and b of shape [rank], got "
            f"{tuple(r.shape)}, {tuple(w.shape)}, {tuple(b.shape)}"
        )
    rank, width = r.shape
    if not 1 <= rank <= width:
        raise VectorMismatchError(f"LoReFT rank must be between 1 and d_model={width}, got {rank}")
    out: dict[str, dict[int, torch.Tensor]] = {}
    for i in range(rank):
        out[f"loreft_r{i}"] = {layer: r[i].detach().clone()}
        out[f"loreft_w{i}"] = {layer: w[i].detach().clone()}
    padded = torch.zeros(width, dtype=b.dtype)
    padded[:rank] = b.detach()
    out["loreft_b"] = {layer: padded}
    return out


def is_loreft(vector: Any) -> bool:
    """True for a vector carrying LoReFT matrices (:func:`steerlab.training.train_intervention`).

    Its direction is only ``Rᵀb``, the constant part of an edit that depends on the activation,
    so whatever can only add a direction (an added vector, a baked bias, a llama.cpp control
    vector, the vLLM plugin) refuses it rather than apply a different edit.

    >>> import torch
    >>> from steerlab.vectors import SteeringVector
    >>> ex = loreft_extras(torch.eye(3)[:1], torch.zeros(1, 3), torch.tensor([1.0]), 0)
    >>> plain = SteeringVector({0: torch.ones(3)})
    >>> is_loreft(SteeringVector(plain.directions, extras=ex)), is_loreft(plain)
    (True, False)
    """
    extras = getattr(vector, "extras", None)
    return isinstance(extras, Mapping) and "loreft_b" in extras


def loreft_op_refusal(vector: Any, op: str) -> str | None:
    """Why operator ``op`` cannot run on ``vector``, or ``None`` when it can: a LoReFT
    intervention (:func:`is_loreft`) runs only under ``op='loreft'``; every other operator
    (``add``, ``ablate``, ``clamp``, ...) would act on its direction ``Rᵀb``, which is not the
    trained edit. The library, the CLI and both server engines refuse with this message.

    >>> import torch
    >>> from steerlab.vectors import SteeringVector
    >>> ex = loreft_extras(torch.eye(3)[:1], torch.zeros(1, 3), torch.tensor([1.0]), 0)
    >>> reft = SteeringVector({0: torch.ones(3)}, extras=ex)
    >>> plain = SteeringVector({0: torch.ones(3)})
    >>> loreft_op_refusal(reft, "loreft") is None, loreft_op_refusal(plain, "add") is None
    (True, True)
    >>> print(loreft_op_refusal(reft, "ablate"))  # doctest: +ELLIPSIS
    this vector is a LoReFT intervention (sl.train_intervention): op 'ablate' would act on ...
    """
    if not is_loreft(vector) or op == "loreft":
        return None
    return (
        f"this vector is a LoReFT intervention (sl.train_intervention): op {op!r} would act on "
        f"its direction, which is only Rᵀb, the constant part of an edit that depends on the "
        f"activation, so it is not the trained edit; apply it with op='loreft'"
    )


def loreft_matrices(
    extras: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(R, W, b)`` of one layer from its extras (the inverse of :func:`loreft_extras`).

    >>> import torch
    >>> ex = loreft_extras(torch.eye(3)[:2], torch.ones(2, 3), torch.tensor([1.0, 2.0]), 0)
    >>> r, w, b = loreft_matrices({k: v[0] for k, v in ex.items()})
    >>> r.shape, b.tolist()
    (torch.Size([2, 3]), [1.0, 2.0])
    """
    rank = 0
    while f"loreft_r{rank}" in extras:
        rank += 1
    missing = [f"loreft_w{i}" for i in range(rank) if f"loreft_w{i}" not in extras]
    if rank == 0 or missing or "loreft_b" not in extras:
        raise VectorMismatchError(
            "op 'loreft' needs the LoReFT matrices (extras loreft_r0.., loreft_w0.., loreft_b) "
            "that sl.train_intervention stores; "
            + ("missing " + ", ".join(missing) if missing else "the vector has no loreft_r0")
        )
    r = torch.stack([extras[f"loreft_r{i}"] for i in range(rank)])
    w = torch.stack([extras[f"loreft_w{i}"] for i in range(rank)])
    return r, w, extras["loreft_b"][:rank]


# --- the angular-steering plane ------------------------------------------------------------------
def angular_plane(
    positive: Mapping[int, torch.Tensor], negative: Mapping[int, torch.Tensor]
) -> torch.Tensor:
    """The second basis vector of angular steering's plane (arXiv 2510.26243, §3).

    ``positive``/``negative`` map every layer to the activations ``[n, d_model]`` of the two
    classes. Per layer, each activation is scaled to unit norm, the class means are taken and
    scaled to unit norm, and their difference is the layer's candidate direction; the first
    principal component of the (mean-centred) candidates of all layers is returned, unit norm.
    Needs at least two layers.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> pos = {k: torch.randn(4, 3, generator=g) + 2 for k in range(3)}
    >>> neg = {k: torch.randn(4, 3, generator=g) for k in range(3)}
    >>> round(float(angular_plane(pos, neg).norm()), 4)
    1.0
    """
    layers = sorted(positive)
    if len(layers) < 2:
        raise InvalidInputError("the angular-steering plane needs activations of at least 2 layers")
    rows = []
    for layer in layers:
        means = []
        for acts in (positive[layer], negative[layer]):
            x = acts.double()
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            mean = x.mean(dim=0)
            means.append(mean / mean.norm().clamp_min(1e-30))
        rows.append(means[0] - means[1])
    candidates = torch.stack(rows)
    centred = candidates - candidates.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    axis = vh[0]
    # the SVD's sign is arbitrary; orient it with the mean candidate so files are reproducible
    if float(axis @ candidates.mean(dim=0)) < 0:
        axis = -axis
    return (axis / axis.norm()).float()


def stack_params(
    op: Operator, per_row: Sequence[dict[str, torch.Tensor] | None], d_model: int
) -> dict[str, torch.Tensor]:
    """Per-row constants stacked to ``[rows, k]`` (zeros for rows the operator does not touch).

    Rows whose constant is shorter than another row's are zero-padded at the end (LoReFT
    vectors of different ranks share a batch: zero rows of ``R`` and ``W`` add nothing).
    """
    template = next(p for p in per_row if p is not None)
    out: dict[str, torch.Tensor] = {}
    for key in template:
        width = max(p[key].reshape(-1).shape[0] for p in per_row if p is not None)
        stacked = torch.zeros(len(per_row), width, dtype=torch.float32)
        for row, p in enumerate(per_row):
            if p is not None:
                flat = p[key].reshape(-1).float()
                stacked[row, : flat.shape[0]] = flat
        out[key] = stacked
    return out


def check_extras(op: Operator, extras: Mapping[str, Any], layer: int) -> None:
    """Refuse a vector that lacks an extra ``op`` reads (``op.needs``) at ``layer``, saying how
    to get one.

    >>> import torch
    >>> check_extras(get_operator("add"), {}, 3)  # add needs nothing
    >>> check_extras(get_operator("affine"), {}, 3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.VectorMismatchError: op 'affine' needs the reference mean (...)...
    """
    missing = [name for name in op.needs if name not in extras]
    if missing:
        hint = {
            "reference": "the reference mean (compute the vector with sl.compute_vector(..., "
            "method='mean_diff'), which stores it, or add one with vec.with_extras(reference="
            "{layer: mean}))",
            "plane": "the second basis vector of the rotation plane (compute the vector with "
            "sl.compute_vector(..., method='mean_diff', plane=True), which stores it, or add "
            "one with vec.with_extras(plane={layer: vector}))",
            "loreft_b": "the LoReFT matrices R, W, b (train them with sl.train_intervention)",
        }
        raise VectorMismatchError(
            f"op {op.name!r} needs {', '.join(hint.get(m, repr(m)) for m in missing)}; the vector "
            f"has none at layer {layer}"
        )
