"""Persistent edits: edited models, edits baked into weights, llama.cpp control vectors.

Three ways to make steering outlast a single call, from lightest to most permanent:

* :func:`edit` returns an :class:`EditedModel`: the same interface as the original
  (``logits``, ``generate``, ``activations``, ``steer``, ``edit``) with the edits applied to every
  call, like the seed's ``model.edit()``. It shares the original's ``hf_model`` and tokenizer and
  installs its hooks only for the duration of each call, so the original object stays
  bit-identical and hook-free between calls; edits stack (``edited.edit(more)``).
* :func:`bake` writes the edits into the weights of a copy and saves a standard Hugging Face
  folder that plain ``transformers.AutoModelForCausalLM.from_pretrained`` loads, with no hooks
  and no steerlab at run time:

  - additive steering at all positions becomes a bias on the block's last residual-writing
    projection (MLP ``down_proj``/``fc2``/``c_proj``/``fc_out``/``dense_4h_to_h``; created, with
    the config flag that makes ``from_pretrained`` expect it, when the layer had none);
  - a directional ablation of the residual writers becomes weight orthogonalization
    ``W <- (I - u u^T) W`` (and ``b <- (I - u u^T) b``) of every attention and MLP output
    projection, and ``E <- E (I - u u^T)`` of the token (and position) embeddings;
  - zero or (position-averaged) mean ablation of a head, an attention or an MLP output zeroes
    the output projection's columns or weights and moves the mean into its bias.

  Before anything is written the baked copy is run against the hooked original on a probe
  prompt and the saved config is checked to describe exactly the saved tensors; an architecture
  where either fails raises :class:`~steerlab.errors.BakeError` (for example Gemma 2/3, whose
  post-feed-forward norm turns a ``down_proj`` bias into something other than a residual shift).
* :func:`export_gguf` writes additive vectors as a llama.cpp control vector.

Layer numbering in llama.cpp control vectors
--------------------------------------------
llama.cpp adds tensor ``direction.N`` to the output of (0-based) block ``N``: each model graph
ends block ``il`` with ``build_cvec(cur, il)``, and ``llama_adapter_cvec`` keeps ``tensors[il]``
filled from ``direction.il`` (its packed buffer starts at ``N = 1``, hence the ``(il - 1)``
offsets in the source; ``direction.0`` is rejected and block 0's output cannot be steered).
That is exactly steerlab's "layer L = output of block L", so steerlab layer ``L`` is written as
``direction.L`` (as repeng does). The off-by-one people meet lives elsewhere: llama.cpp's own
``cvector-generator`` reads a difference at block ``i``'s output and names it
``direction.{i+1}`` (so its vectors act one block later than they were read), and Hugging Face's
``output_hidden_states[L + 1]`` is steerlab layer ``L``.

>>> import torch, steerlab as sl
>>> from steerlab.testing import tiny_model, hook_count
>>> model = tiny_model("llama")
>>> vec = sl.SteeringVector({1: torch.ones(model.d_model)})
>>> edited = edit(model, sl.Steering(vec, strength=2.0))
>>> steered = edited.logits(["the cat"])
>>> hook_count(model.hf_model), bool((steered != model.logits(["the cat"])).any())
(0, True)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlab.ablation.interventions import (
    DirectionalAblation,
    MeanAblation,
    ReplaceActivation,
    ZeroAblation,
)
from steerlab.ablation.means import ActivationMeans
from steerlab.ablation.sites import check_heads, component_width
from steerlab.adapter import ModelAdapter
from steerlab.checks import as_finite_float
from steerlab.deprecation import loose_steering_keywords, warn_deprecated
from steerlab.dispatch import Intervention, activate, count_hooks, strip_dispatchers
from steerlab.errors import (
    BakeError,
    FileWriteError,
    InvalidInputError,
    VectorFileError,
    VectorFileNotFoundError,
    VectorMismatchError,
)
from steerlab.files import CHECKSUM_KEY, atomic_output, check_file_checksum, file_checksum
from steerlab.model import EditedModel, SteeredModel, edit, wrap
from steerlab.operators import is_loreft
from steerlab.positions import Positions
from steerlab.steering import RowSteering, Steering, normalize_steering
from steerlab.vectors import SteeringVector
from steerlab.version import __version__

__all__ = [
    "BAKE_TOLERANCE",
    "EditedModel",
    "ReplaceActivation",
    "bake",
    "edit",
    "export_gguf",
    "read_gguf",
]


# --- baking into weights ------------------------------------------------------------------------
BAKE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.bfloat16: 5e-2,
    torch.float16: 2e-2,
}
"""Largest accepted ``|baked - hooked|`` logit difference, relative to ``1 + max |logit|``."""

_PROBE = "The quick brown fox jumps over the lazy dog, and then it runs home."


@dataclasses.dataclass
class _Plan:
    """What to write into which weights (resolved against the original model)."""

    additive: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    # (layer, site, delta): additive steering at a block's attention/MLP output or heads
    site_biases: list[tuple[int, str, torch.Tensor]] = dataclasses.field(default_factory=list)
    orthogonal: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)
    embedding_units: list[torch.Tensor] = dataclasses.field(default_factory=list)
    # (layer, "head"|"attn"|"mlp", heads or None, mean or None)
    ablations: list[tuple[int, str, tuple[int, ...] | None, torch.Tensor | None]] = (
        dataclasses.field(default_factory=list)
    )
    summary: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _plan(adapter: ModelAdapter, interventions: Sequence[Intervention]) -> _Plan:
    plan = _Plan()
    for item in interventions:
        name = type(item).__name__
        if isinstance(item, Steering):
            if is_loreft(item.vector):
                raise BakeError(
                    "a LoReFT intervention (sl.train_intervention, op 'loreft') cannot be baked: "
                    "its edit Rᵀ(W h + b − R h) depends on the activation h, and a bias adds only "
                    "a constant (its direction Rᵀb); keep it as hooks with "
                    "model.edit(sl.Steering(vec, op='loreft'))"
                )
            if item.resolved_op != "add" or item.when is not None:
                raise BakeError(
                    f"only additive, unconditional steering can become a bias; this one uses "
                    f"op={item.resolved_op!r}" + ("" if item.when is None else " with a condition")
                )
            if not Positions.parse(item.positions).covers_everything:
                raise BakeError(
                    f"only steering at every position can become a bias; this one acts on "
                    f"positions={item.positions!r}"
                )
            site = item.resolved_site
            if site == "router":
                raise BakeError(
                    "a router bias cannot be baked: the MoE routers steerlab knows compute "
                    "their logits without a bias (gpt-oss's has one, but a bias there is not "
                    "exact for the others); steer the router with hooks instead"
                )
            for layer, delta in item.layer_deltas(adapter).items():
                if site == "resid":
                    plan.additive[layer] = plan.additive.get(layer, 0) + delta
                else:
                    plan.site_biases.append((layer, site, delta))
            plan.summary.append(
                {
                    "kind": "add",
                    "layers": sorted(item.layer_deltas(adapter)),
                    "method": "bias",
                    "site": site,
                }
            )
        elif isinstance(item, DirectionalAblation):
            if not item.writers:
                raise BakeError(
                    "a directional ablation of the residual stream at a layer's output "
                    "(writers=False) is not a weight edit; bake DirectionalAblation(..., "
                    "writers=True) or DirectionalAblation.everywhere(direction)"
                )
            if item.rows is not None:
                raise BakeError("a per-row ablation cannot be baked")
            units = item.unit_directions(adapter)
            plan.orthogonal.extend(units.items())
            if item.embeddings:
                plan.embedding_units.append(item.embedding_direction(adapter))
            plan.summary.append(
                {
                    "kind": "project_out",
                    "layers": sorted(units),
                    "embeddings": item.embeddings,
                    "method": "weight orthogonalization",
                }
            )
        elif isinstance(item, (ZeroAblation, MeanAblation)):
            plan.ablations.append(_plan_ablation(adapter, item))
            plan.summary.append(
                {
                    "kind": "zero_ablation" if isinstance(item, ZeroAblation) else "mean_ablation",
                    "layer": adapter.resolve_layer(item.layer),
                    "component": item.component,
                    "head": item.head
                    if isinstance(item.head, (int, type(None)))
                    else list(item.head),
                }
            )
        elif isinstance(item, RowSteering):
            raise BakeError("per-row steering cannot be baked into one set of weights")
        else:
            raise BakeError(
                f"{name} cannot be baked into weights; bakeable: additive steering at all "
                f"positions, DirectionalAblation(writers=True), zero/mean ablation of heads, "
                f"attention or MLP outputs"
            )
    return plan


def _plan_ablation(
    adapter: ModelAdapter, item: ZeroAblation | MeanAblation
) -> tuple[int, str, tuple[int, ...] | None, torch.Tensor | None]:
    if item.component not in ("head", "attn", "mlp"):
        raise BakeError(
            f"ablating a whole block's output is not a weight edit (component "
            f"{item.component!r}); ablate 'attn', 'mlp' or 'head'"
        )
    if item.rows is not None or not Positions.parse(item.positions).covers_everything:
        raise BakeError("only ablations of every row and position can be baked")
    layer = adapter.resolve_layer(item.layer)
    heads = check_heads(adapter, item.head) if item.component == "head" else None
    mean: torch.Tensor | None = None
    if isinstance(item, MeanAblation):
        if isinstance(item.means, ActivationMeans):
            if item.per_position and (item.component, layer) in item.means.per_position:
                raise BakeError(
                    "per-position means depend on the token position and cannot be a bias; use "
                    "MeanAblation(..., per_position=False) to bake the position-averaged mean"
                )
            mean = item.means.mean(item.component, layer)
        else:
            if item.means.ndim != 1:
                raise BakeError("only a position-independent mean ([width]) can be baked")
            mean = item.means
        if mean.shape[0] != component_width(adapter, item.component):
            raise VectorMismatchError("the mean does not fit this component's width")
    return layer, item.component, heads, mean


def _conv1d_like(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _out_major(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view: GPT-2's Conv1D stores ``[in, out]``)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise BakeError(f"{type(module).__name__} has no 2-D weight to edit")
    return weight.data.t() if _conv1d_like(module) else weight.data


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _conv1d_like(module)


_MLP_OUT_NAMES = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2", "w2")


def _mlp_out(adapter: ModelAdapter, layer: int) -> nn.Module:
    """The projection whose output is block ``layer``'s MLP contribution."""
    mlp = adapter.mlp(layer)
    if _is_projection(mlp):
        return mlp
    for name in _MLP_OUT_NAMES:
        module = getattr(mlp, name, None)
        if isinstance(module, nn.Module) and _is_projection(module):
            return module
    raise BakeError(
        f"cannot find the output projection of {adapter.model_type!r}'s MLP "
        f"({type(mlp).__name__}); mixture-of-experts MLPs are not supported for baking"
    )


def _embedding_writers(model: nn.Module, adapter: ModelAdapter) -> list[nn.Module]:
    """Embedding tables (and input projections) whose rows enter the residual stream."""
    blocks = {id(m) for m in adapter.blocks.modules()}
    out: list[nn.Module] = []
    token = adapter.embed
    for module in model.modules():
        if id(module) in blocks or module is adapter.unembed:
            continue
        if isinstance(module, nn.Embedding) and module.embedding_dim == adapter.d_model:
            out.append(module)
    if not isinstance(token, nn.Embedding) or token.embedding_dim != adapter.d_model:
        project_in = getattr(adapter.backbone, "project_in", None)
        if not isinstance(project_in, nn.Linear) or project_in.out_features != adapter.d_model:
            raise BakeError(
                "cannot find the projection that writes token embeddings into the residual stream"
            )
        out.append(project_in)
    return out


def _bias_recipe(model: Any, adapter: ModelAdapter, module: nn.Module) -> None:
    """Give ``module`` a (zero) bias the saved config can express, or raise ``BakeError``."""
    config = model.config
    mlp_modules = {id(m) for layer in range(adapter.n_layers) for m in adapter.mlp(layer).modules()}
    attn_modules = {
        id(m) for layer in range(adapter.n_layers) for m in adapter.attention(layer).modules()
    }
    if id(module) in mlp_modules and isinstance(getattr(config, "mlp_bias", None), bool):
        flag, scope = "mlp_bias", [adapter.mlp(layer) for layer in range(adapter.n_layers)]
    elif id(module) in attn_modules and isinstance(getattr(config, "attention_bias", None), bool):
        flag, scope = (
            "attention_bias",
            [adapter.attention(layer) for layer in range(adapter.n_layers)],
        )
    elif isinstance(getattr(config, "enable_bias", None), bool):
        flag, scope = "enable_bias", [adapter.block(layer) for layer in range(adapter.n_layers)]
    else:
        where = next((n for n, m in model.named_modules() if m is module), type(module).__name__)
        raise BakeError(
            f"{adapter.model_type!r} has no bias on {where} and its config cannot declare one "
            f"(no mlp_bias/attention_bias/enable_bias flag), so a baked bias would not load; "
            f"this edit cannot be baked for this architecture"
        )
    setattr(config, flag, True)
    for root in scope:
        for sub in root.modules():
            if isinstance(sub, nn.Linear) and sub.bias is None:
                weight = sub.weight
                sub.bias = nn.Parameter(
                    torch.zeros(sub.out_features, dtype=weight.dtype, device=weight.device),
                    requires_grad=weight.requires_grad,
                )


def _bias(model: nn.Module, adapter: ModelAdapter, module: nn.Module) -> torch.Tensor:
    if getattr(module, "bias", None) is None:
        _bias_recipe(model, adapter, module)
    bias = module.bias
    assert isinstance(bias, torch.Tensor)
    return bias.data


def _untie_embeddings(model: Any) -> None:
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if out is None or out.weight is not inp.weight:
        return
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    config = model.config
    config.tie_word_embeddings = False
    text = getattr(config, "get_text_config", None)
    if callable(text):
        text_config = text()
        if text_config is not config and hasattr(text_config, "tie_word_embeddings"):
            text_config.tie_word_embeddings = False


def _apply_plan(model: nn.Module, adapter: ModelAdapter, plan: _Plan) -> None:
    post_norm = isinstance(getattr(adapter.block(0), "post_feedforward_layernorm", None), nn.Module)
    config = getattr(model, "config", None)
    multiplier = getattr(config, "residual_multiplier", None)
    with torch.no_grad():
        # 1. ablations: the hooks replace an output before anything else touches it
        for layer, component, heads, mean in plan.ablations:
            module = (
                adapter.attn_out(layer)
                if component in ("head", "attn")
                else _mlp_out(adapter, layer)
            )
            weight = _out_major(module)
            if component == "head":
                assert heads is not None
                for head in heads:
                    cols = slice(head * adapter.head_dim, (head + 1) * adapter.head_dim)
                    if mean is not None:
                        shift = weight[:, cols].double() @ mean[cols].double().to(weight.device)
                        bias = _bias(model, adapter, module)
                        bias += shift.to(bias.dtype)
                    weight[:, cols] = 0
            else:
                weight.zero_()
                if mean is not None:
                    bias = _bias(model, adapter, module)
                    bias.copy_(mean.to(bias.dtype))
                else:
                    existing = getattr(module, "bias", None)
                    if isinstance(existing, torch.Tensor):
                        existing.data.zero_()
        # 2. directional ablation: every writer (and embedding) loses its u component
        if plan.orthogonal and post_norm:
            raise BakeError(
                f"{adapter.model_type!r} normalises each sub-layer's output "
                f"(post_feedforward_layernorm) before adding it to the residual stream, so "
                f"orthogonalizing the projections does not remove the direction; a directional "
                f"ablation cannot be baked for this architecture"
            )
        for layer, unit in plan.orthogonal:
            for module in (adapter.attn_out(layer), _mlp_out(adapter, layer)):
                _orthogonalize_output(module, unit)
        if plan.embedding_units:
            _untie_embeddings(model)
            for unit in plan.embedding_units:
                for module in _embedding_writers(model, adapter):
                    if isinstance(module, nn.Embedding):
                        table = module.weight.data
                        u = unit.to(table.device, torch.float64)
                        table -= ((table.double() @ u)[:, None] * u).to(table.dtype)
                    else:
                        _orthogonalize_output(module, unit)
        # 3. additive steering: a bias on the last projection that writes to the residual
        if plan.additive and post_norm:
            raise BakeError(
                f"{adapter.model_type!r} normalises the MLP output (post_feedforward_layernorm) "
                f"before adding it to the residual stream, so a bias on its down projection is "
                f"not an additive shift of the residual stream; additive steering cannot be "
                f"baked for this architecture"
            )
        for layer, delta in plan.additive.items():
            module = _mlp_out(adapter, layer)
            bias = _bias(model, adapter, module)
            shift = delta.double()
            if isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool):
                shift = shift / float(multiplier)  # Granite scales each sub-layer's output
            bias += shift.to(device=bias.device, dtype=bias.dtype)
        # 4. steering at a sub-layer's output is a bias on its last projection; on the heads,
        # o_proj(x + v) = o_proj(x) + W_o v, a bias of W_o v
        for layer, site, delta in plan.site_biases:
            module = _mlp_out(adapter, layer) if site == "mlp_out" else adapter.attn_out(layer)
            shift = delta.double()
            if site == "head":
                weight = _out_major(module)
                shift = weight.double() @ shift.to(weight.device)
            bias = _bias(model, adapter, module)
            bias += shift.to(device=bias.device, dtype=bias.dtype)


def _orthogonalize_output(module: nn.Module, unit: torch.Tensor) -> None:
    weight = _out_major(module)
    u = unit.to(weight.device, torch.float64)
    w64 = weight.double()
    weight.copy_((w64 - u[:, None] * (u @ w64)[None, :]).to(weight.dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        b64 = bias.data.double()
        bias.data.copy_((b64 - (u @ b64) * u).to(bias.dtype))


def _check_config_matches(model: Any) -> None:
    """The saved config must build a model with exactly the tensors we save."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(model.config)
    except Exception as err:
        raise BakeError(f"cannot rebuild the model from its edited config: {err}") from err
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if ours != theirs:
        missing = sorted(set(ours) - set(theirs))[:5]
        extra = sorted(set(theirs) - set(ours))[:5]
        shapes = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])[:5]
        raise BakeError(
            "the saved config would not load the edited weights (tensors it does not expect: "
            f"{missing}; tensors it expects but are not saved: {extra}; shape mismatches: "
            f"{shapes}); this edit cannot be baked for this architecture"
        )


def bake(
    model: SteeredModel,
    steering: Any,
    out_dir: str | os.PathLike[str],
    *,
    strength: float | Mapping[int, float] | None = None,
    layers: Sequence[int] | None = None,
    overwrite: bool = False,
    save_tokenizer: bool = True,
    verify: bool = True,
) -> Path:
    """Write ``model`` with ``steering`` baked into its weights as a Hugging Face folder.

    ``steering`` is a vector, a :class:`~steerlab.interventions.Steering` at all positions, a
    writer-mode :class:`~steerlab.ablation.DirectionalAblation`, a zero/mean ablation of a head,
    ``attn`` or ``mlp``, or ``None``; an :class:`EditedModel`'s own edits are baked first, so
    several edits are baked by chaining them: ``bake(model.edit(a).edit(b), None, out_dir)``.
    (A tuple of edits, and ``strength``/``layers`` beside a vector, are deprecated spellings of
    the same: a tuple means one entry per row everywhere else.) The
    original is never touched: a deep copy is edited (memory for a second model), compared with
    the hooked original on a probe prompt (``verify``; tolerance :data:`BAKE_TOLERANCE` relative
    to ``1 + max |logit|``), checked against its own config, and saved into a temporary folder
    that is renamed to ``out_dir`` at the end. Architectures where the edit cannot be expressed
    raise :class:`~steerlab.errors.BakeError` before anything is written.

    >>> import tempfile, pathlib, torch, transformers, steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> vec = sl.SteeringVector({1: torch.randn(model.d_model)})
    >>> d = tempfile.TemporaryDirectory()
    >>> out = bake(model, sl.Steering(vec, strength=2.0), pathlib.Path(d.name, "baked"))
    >>> plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    >>> ids = model.encode(["the cat sat"]).input_ids
    >>> hooked = model.logits(["the cat sat"], steering=sl.Steering(vec, strength=2.0))
    >>> bool(torch.allclose(plain(ids).logits, hooked, atol=1e-4))
    True
    >>> d.cleanup()
    """

    if not isinstance(model, SteeredModel):
        raise InvalidInputError(f"bake() needs a SteeredModel, got {type(model).__name__}")
    target = Path(out_dir)
    if target.exists() and not overwrite:
        raise InvalidInputError(f"{target} already exists; pass overwrite=True to replace it")
    if target.exists() and not target.is_dir():
        raise BakeError(
            f"{target} is not a folder; bake writes a model folder and never replaces a file"
        )
    if target.is_dir() and any(target.iterdir()) and not (target / _PROVENANCE).is_file():
        # overwrite=True replaces an earlier bake, never an arbitrary folder of the user's
        raise BakeError(
            f"{target} is not a folder written by bake (it has no {_PROVENANCE}); refusing to "
            f"replace it: choose another output folder"
        )
    if isinstance(model, EditedModel):
        model.check_alive()
        base = model.original
        interventions = list(model.edits)
    else:
        base = model
        interventions = []
    loose_steering_keywords("bake", strength=strength, layers=layers)
    if isinstance(steering, tuple):
        warn_deprecated(
            "bake(model, (a, b), out_dir)", "bake(model.edit(a).edit(b), None, out_dir)"
        )
    if steering is not None:
        items = list(steering) if isinstance(steering, tuple) else [steering]
        for item in items:
            interventions.extend(normalize_steering(item, strength=strength, layers=layers))
    if not interventions:
        raise InvalidInputError("nothing to bake: pass a vector or an intervention")
    if count_hooks(base.hf_model):
        raise BakeError(
            "the model has hooks installed (active steering?); remove them before baking so the "
            "copy and the verification see only the edits being baked"
        )
    adapter = base.adapter
    plan = _plan(adapter, interventions)

    baked = copy.deepcopy(base.hf_model)
    strip_dispatchers(baked)  # the copy leaves steerlab: no hooks of ours ride along
    baked_adapter = ModelAdapter(baked, layers_path=adapter.spec.layers)
    _apply_plan(baked, baked_adapter, plan)
    _check_config_matches(baked)
    max_diff = None
    if verify:
        max_diff = _verify(base, interventions, baked)

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.bake-", dir=target.parent))
    except OSError as err:
        raise FileWriteError(f"cannot write {target}: {err.strerror or err}") from None
    try:
        baked.save_pretrained(staging)  # type: ignore[operator]
        if save_tokenizer and callable(getattr(base.tokenizer, "save_pretrained", None)):
            base.tokenizer.save_pretrained(staging)
        provenance = {
            "source_model": base.name,
            "model_type": adapter.model_type,
            "edits": plan.summary,
            "verified_max_abs_logit_diff": max_diff,
            "library": f"steerlab {__version__}",
        }
        (staging / _PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        _replace_dir(staging, target)
    except OSError as err:
        raise FileWriteError(f"cannot write {target}: {err.strerror or err}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


_PROVENANCE = "steerlab_edit.json"


def _replace_dir(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    trash.rmdir()
    target.rename(trash)
    try:
        staging.rename(target)
    except BaseException:
        trash.rename(target)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _verify(base: SteeredModel, interventions: list[Intervention], baked: nn.Module) -> float:
    with activate(base.adapter, interventions):
        hooked = base.logits([_PROBE])
    plain = wrap(baked, base.tokenizer, layers_path=base.adapter.spec.layers).logits([_PROBE])
    diff = float((plain - hooked).abs().max())
    dtype = next(iter(baked.parameters())).dtype
    tolerance = BAKE_TOLERANCE.get(dtype, 1e-4) * (1.0 + float(hooked.abs().max()))
    if not diff <= tolerance:
        raise BakeError(
            f"the baked {base.adapter.model_type!r} model does not reproduce the hooked one "
            f"(max |logit difference| {diff:.3g} > {tolerance:.3g}); this edit cannot be baked "
            f"for this architecture"
        )
    return diff


# --- llama.cpp control vectors ------------------------------------------------------------------
def export_gguf(
    steering: SteeringVector | Steering,
    path: str | os.PathLike[str],
    *,
    strength: float = 1.0,
    model_hint: str | None = None,
) -> Path:
    """Write additive steering as a llama.cpp control-vector GGUF (``--control-vector``).

    Steerlab layer ``L`` becomes tensor ``direction.L`` (llama.cpp adds it to the output of
    block ``L``; see the module docstring for why there is no offset, and where llama.cpp's own
    generator shifts by one). Each tensor is ``strength * vec[L]`` in float32; llama.cpp adds it
    at every token, i.e. steerlab's ``positions="all"``. Layer 0 cannot be expressed (llama.cpp
    rejects ``direction.0``). ``model_hint`` (default: the vector's ``model_type`` metadata) is
    stored as ``controlvector.model_hint``.

    >>> import tempfile, pathlib, torch
    >>> vec = SteeringVector({3: torch.ones(8), 5: torch.zeros(8)},
    ...                      metadata={"model_type": "llama"})
    >>> d = tempfile.TemporaryDirectory()
    >>> p = export_gguf(vec, pathlib.Path(d.name, "v.gguf"), strength=2.0)
    >>> back = read_gguf(p)
    >>> back.layers, back[3][:2].tolist(), back.metadata["model_hint"]
    ((3, 5), [2.0, 2.0], 'llama')
    >>> d.cleanup()
    """
    import gguf
    import numpy as np

    strength = as_finite_float(strength, "strength")
    if is_loreft(getattr(steering, "vector", steering)):
        raise InvalidInputError(
            "steering is a LoReFT intervention (sl.train_intervention, op 'loreft'), which "
            "llama.cpp cannot apply: a control vector only adds a direction, and this one's "
            "direction Rᵀb is not the trained edit; apply it in steerlab with op='loreft' "
            "(model.steer, or the torch server)"
        )
    if isinstance(steering, Steering):
        if not Positions.parse(steering.positions).covers_everything:
            raise InvalidInputError("llama.cpp applies control vectors at every token")
        if steering.resolved_op != "add" or steering.when is not None:
            raise InvalidInputError("llama.cpp control vectors are added, unconditionally")
        if isinstance(steering.strength, Mapping) or steering.layers is not None:
            raise InvalidInputError(
                "export per-layer strengths as a vector: vec.scaled({layer: s, ...})"
            )
        vector = steering.vector.scaled(float(steering.strength))
        site = steering.resolved_site
    elif isinstance(steering, SteeringVector):
        vector = steering
        site = vector.site
    else:
        raise InvalidInputError(
            f"export_gguf needs a SteeringVector or Steering, got {type(steering).__name__}"
        )
    if site != "resid":
        raise InvalidInputError(
            f"llama.cpp control vectors are added to the residual stream at a block's output; "
            f"it has no place for a vector at site {site!r} (bake it into the weights with "
            f"steerlab.bake where that is exact, then convert the model)"
        )
    if 0 in vector.layers:
        raise InvalidInputError(
            "llama.cpp cannot steer layer 0 (the output of the first block): its control vectors "
            "start at direction.1 and it rejects direction.0; drop layer 0 (vec.select([...]))"
        )
    hint = model_hint if model_hint is not None else str(vector.metadata.get("model_type", ""))
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidInputError(f"cannot write {target}: folder {folder} does not exist")
    tensors: dict[str, torch.Tensor] = {}
    for layer in vector.layers:
        data = (vector[layer].to(torch.float64) * strength).to(torch.float32)
        if not bool(torch.isfinite(data).all()):
            raise InvalidInputError(
                f"strength {strength:g} overflows float32 at layer {layer}; use a smaller one"
            )
        tensors[f"direction.{layer}"] = data
    arch = "controlvector"
    checksum = file_checksum(tensors, _gguf_checked_fields(hint, len(tensors)))
    with atomic_output(target) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_string(f"{arch}.model_hint", hint)
        writer.add_int32(f"{arch}.layer_count", len(vector.layers))
        writer.add_string(_GGUF_CHECKSUM, checksum)
        for name, data in tensors.items():
            writer.add_tensor(name, data.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return target


_GGUF_CHECKSUM = "controlvector.steerlab_checksum"


def _gguf_checked_fields(hint: str, layer_count: int) -> dict[str, str]:
    return {"model_hint": hint, "layer_count": str(layer_count)}


def read_gguf(path: str | os.PathLike[str]) -> SteeringVector:
    """Read a llama.cpp control-vector GGUF: ``direction.N`` becomes steerlab layer ``N``.

    The ``controlvector.model_hint`` is kept as metadata ``model_hint``. A file written by
    :func:`export_gguf` carries a SHA-256 checksum of its tensors and fields, verified here;
    control vectors from other tools (no checksum) load too. Anything that is not a readable
    control vector (not GGUF, truncated, corrupt, NaN/inf, absurd layer numbers) raises
    :class:`~steerlab.errors.VectorFileError` naming the file.
    """
    import gguf

    from steerlab.vectors import MAX_LAYER

    file = Path(path)
    if file.is_dir():
        raise VectorFileNotFoundError(f"{file} is a directory, not a GGUF file")
    if not file.is_file():
        raise VectorFileNotFoundError(f"no GGUF file at {file}")
    try:
        reader = gguf.GGUFReader(file)
        arch_field = reader.get_field("general.architecture")
        arch = arch_field.contents() if arch_field is not None else None
        fields = {name: reader.get_field(name) for name in reader.fields}
        raw = {t.name: torch.tensor(t.data.copy()).reshape(-1) for t in reader.tensors}
        dims = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
        hint = _field_text(fields.get("controlvector.model_hint"))
        stored = _field_text(fields.get(_GGUF_CHECKSUM))
        count_field = fields.get("controlvector.layer_count")
        count = count_field.contents() if count_field is not None else None
    except Exception as err:
        raise VectorFileError(
            f"{file}: not a readable GGUF file (truncated or corrupt: {type(err).__name__}: {err})"
        ) from None
    if arch != "controlvector":
        raise VectorFileError(f"{file} is not a control vector (architecture {arch!r})")
    suspicious = [
        name
        for name in fields
        if ("steerlab" in name or "checksum" in name) and name != _GGUF_CHECKSUM
    ]
    if suspicious:
        raise VectorFileError(f"{file}: damaged header (unexpected fields {suspicious})")
    if stored is not None:
        checked = {name: t.float() if t.dtype != torch.float32 else t for name, t in raw.items()}
        check_file_checksum(
            checked,
            {**_gguf_checked_fields(hint or "", int(count or 0)), CHECKSUM_KEY: stored},
            file,
        )
    directions: dict[int, torch.Tensor] = {}
    for name, data in raw.items():
        prefix, _, number = name.partition(".")
        if prefix != "direction" or not number.isdigit():
            raise VectorFileError(f"{file}: unexpected tensor {name!r}")
        if int(number) > MAX_LAYER:
            raise VectorFileError(f"{file}: tensor {name!r} names an absurd layer number")
        if len(dims[name]) > 1 and sorted(dims[name])[:-1] != [1] * (len(dims[name]) - 1):
            raise VectorFileError(f"{file}: tensor {name!r} has shape {dims[name]}, not 1-D")
        directions[int(number)] = data.float()
    if not directions:
        raise VectorFileError(f"{file}: the control vector holds no direction tensors")
    meta: dict[str, Any] = {"source": "llama.cpp control vector"}
    if hint is not None:
        meta["model_hint"] = hint
    try:
        return SteeringVector(directions, metadata=meta)
    except VectorMismatchError as err:
        raise VectorFileError(f"{file}: {err}") from None


def _field_text(field: Any) -> str | None:
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else str(value)
