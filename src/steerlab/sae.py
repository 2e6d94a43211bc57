"""Sparse autoencoders (SAEs) from the two formats people publish, and steering by their features.

:func:`load_sae` reads a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``; the
``standard`` (ReLU), ``jumprelu`` and ``topk`` architectures) or a Gemma Scope ``params.npz``
(JumpReLU). The SAE's hook point is mapped to steerlab's layer numbering, where layer ``L`` is
the residual stream at the output of block ``L``:

=====================================  ==================================================
hook point                             steerlab layer
=====================================  ==================================================
``blocks.L.hook_resid_post``           ``L``
``blocks.L.hook_resid_pre`` (L ≥ 1)    ``L − 1`` (the input of block L is the output of L−1)
anything else (``hook_resid_mid``,     refused with :class:`~steerlab.errors.VectorFileError`
``hook_mlp_out``, ``attn.hook_z``...)  naming the hook: steerlab steers the residual stream
=====================================  ==================================================

The encoder follows SAELens exactly: ``x̃ = x − b_dec`` when ``apply_b_dec_to_input`` (else
``x̃ = x``), pre-activations ``z = x̃ @ W_enc + b_enc``, then ``relu(z)`` (standard),
``relu(z)·[z > θ]`` (JumpReLU) or the ``k`` largest of ``z`` through ``relu`` (TopK; with
``rescale_acts_by_decoder_norm``, ``z`` is multiplied by the decoder row norms first and the
decoder divides by them again). ``decode(f) = f @ W_dec + b_dec``.

:meth:`SAE.feature` gives a feature's decoder row as a :class:`~steerlab.vectors.SteeringVector`
at the SAE's layer, carrying the feature's encoder as extras, so ``op="clamp"`` with strength
``c`` sets the feature's activation to ``c``: ``h' = h + (c − f_i(h))·W_dec[i]`` (see
:class:`~steerlab.operators.Clamp`). :meth:`SAE.top_features` says which features fire on which
tokens.

>>> import torch
>>> sae = SAE(W_enc=torch.eye(2), W_dec=torch.eye(2), b_enc=torch.zeros(2),
...           b_dec=torch.zeros(2), layer=0)
>>> sae.encode(torch.tensor([[3.0, -1.0]])).tolist()
[[3.0, 0.0]]
"""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerlab.checks import as_int, as_positive_int, check_prompts
from steerlab.errors import (
    InvalidInputError,
    VectorFileError,
    VectorFileNotFoundError,
    VectorMismatchError,
)
from steerlab.vectors import SteeringVector

__all__ = ["SAE", "FeatureHit", "TopFeatures", "hook_layer", "load_sae"]

ARCHITECTURES = ("standard", "jumprelu", "topk")
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
}


def hook_layer(hook_name: str) -> int:
    """steerlab's layer for a TransformerLens hook point, or an error naming the hook.

    >>> hook_layer("blocks.6.hook_resid_post"), hook_layer("blocks.6.hook_resid_pre")
    (6, 5)
    >>> hook_layer("blocks.6.hook_mlp_out")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.VectorFileError: the SAE reads hook point 'blocks.6.hook_mlp_out', ...
    """
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", str(hook_name))
    if match:
        layer = int(match.group(1))
        if match.group(2) == "post":
            return layer
        if layer >= 1:
            return layer - 1
    raise VectorFileError(
        f"the SAE reads hook point {hook_name!r}, which steerlab's layers cannot express: "
        f"steerlab steers the residual stream at the output of a block "
        f"('blocks.L.hook_resid_post', or 'blocks.L.hook_resid_pre' for L >= 1)"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class SAE:
    """A sparse autoencoder on the residual stream at steerlab layer ``layer``.

    Weights are float32 copies (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc
    [d_sae]``, ``b_dec [d_in]``, ``threshold [d_sae]`` for JumpReLU); see the module docstring
    for the formulas. Usually built by :func:`load_sae`.
    """

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    layer: int
    architecture: str = "standard"
    threshold: torch.Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    rescale_acts_by_decoder_norm: bool = False
    hook_name: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InvalidInputError(
                f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}"
            )
        object.__setattr__(self, "layer", as_int(self.layer, "layer"))
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc}
        tensors["b_dec"] = self.b_dec
        if self.architecture == "jumprelu":
            if self.threshold is None:
                raise InvalidInputError("a jumprelu SAE needs threshold [d_sae]")
            tensors["threshold"] = self.threshold
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor) or not torch.is_floating_point(value):
                raise InvalidInputError(f"{name} must be a floating-point tensor")
            if not bool(torch.isfinite(value).all()):
                raise VectorMismatchError(f"{name} contains NaN or inf")
            object.__setattr__(self, name, value.detach().to(torch.float32).clone())
        if self.W_enc.ndim != 2:
            raise VectorMismatchError(f"W_enc must be [d_in, d_sae], got {tuple(self.W_enc.shape)}")
        d_in, d_sae = self.W_enc.shape
        shapes = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        if self.architecture == "jumprelu":
            shapes["threshold"] = (d_sae,)
        for name, want in shapes.items():
            got = tuple(getattr(self, name).shape)
            if got != want:
                raise VectorMismatchError(
                    f"{name} has shape {got}; with W_enc [{d_in}, {d_sae}] it must be {want}"
                )
        if self.architecture == "topk":
            k = as_positive_int(self.k, "k")
            if k > d_sae:
                raise InvalidInputError(f"k={k} is larger than d_sae={d_sae}")
            object.__setattr__(self, "k", k)

    @property
    def d_in(self) -> int:
        """Width of the residual stream the SAE reads."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return int(self.W_enc.shape[1])

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (
            f"SAE({self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, layer={self.layer}{k})"
        )

    # --- the autoencoder ---------------------------------------------------------------------
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.d_in,):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidInputError(f"x must be a tensor [..., {self.d_in}], got {shape}")
        return x.to(torch.float32)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``z = (x − b_dec·apply_b_dec_to_input) @ W_enc + b_enc`` (``[..., d_sae]``)."""
        x = self._input(x)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        z = x @ self.W_enc + self.b_enc
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            z = z * self.W_dec.norm(dim=-1)
        return z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` of residual vectors ``x`` ``[..., d_in]``.

        >>> import torch
        >>> sae = SAE(W_enc=torch.eye(3), W_dec=torch.eye(3), b_enc=torch.zeros(3),
        ...           b_dec=torch.zeros(3), layer=0, architecture="topk", k=1)
        >>> sae.encode(torch.tensor([1.0, 5.0, 2.0])).tolist()
        [0.0, 5.0, 0.0]
        """
        z = self.pre_activations(x)
        if self.architecture == "standard":
            return torch.relu(z)
        if self.architecture == "jumprelu":
            assert self.threshold is not None
            return torch.relu(z) * (z > self.threshold).to(z.dtype)
        top = torch.topk(z, k=int(self.k or 0), dim=-1)
        return torch.zeros_like(z).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``features @ W_dec + b_dec`` (``[..., d_in]``)."""
        if not isinstance(features, torch.Tensor) or features.shape[-1:] != (self.d_sae,):
            raise InvalidInputError(f"features must be a tensor [..., {self.d_sae}]")
        f = features.to(torch.float32)
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        return f @ self.W_dec + self.b_dec

    # --- steering ----------------------------------------------------------------------------
    def _index(self, i: Any) -> int:
        index = as_int(i, "feature")
        if not 0 <= index < self.d_sae:
            raise InvalidInputError(f"feature {index} is out of range [0, {self.d_sae})")
        return index

    def feature(self, i: int) -> SteeringVector:
        """Feature ``i``'s decoder row as a steering vector at the SAE's layer.

        ``op="add"`` adds ``strength × W_dec[i]`` (what the feature writes at activation
        ``strength``); ``op="clamp"`` sets the feature's activation to ``strength`` on the SAE's
        own encoder and decoder, ``h' = h + (strength − f_i(h))·W_dec[i]`` (standard and
        JumpReLU; a TopK feature refuses clamp, its activation depends on all the others).

        >>> import torch
        >>> sae = SAE(W_enc=torch.eye(2), W_dec=2 * torch.eye(2), b_enc=torch.zeros(2),
        ...           b_dec=torch.zeros(2), layer=3)
        >>> vec = sae.feature(1)
        >>> vec.layers, vec[3].tolist()
        ((3,), [0.0, 2.0])
        """
        index = self._index(i)
        layer = self.layer
        direction = self.W_dec[index].clone()
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            direction = direction / direction.norm().clamp_min(1e-30)
        meta = {
            "method": "sae",
            "sae_feature": index,
            "sae_architecture": self.architecture,
            "sae_hook_name": self.hook_name,
            "sae_source": self.source,
            "layers": [layer],
        }
        encoder = self.W_enc[:, index].double()
        if self.architecture == "topk":
            extras = {"sae_topk": {layer: self.W_enc[:, index].clone()}}
            return SteeringVector({layer: direction}, metadata=meta, extras=extras)
        sq = float(encoder @ encoder)
        if sq == 0.0:
            # a dead feature: its activation is a constant that no point along e can encode
            return SteeringVector({layer: direction}, metadata=meta)
        beta = float(self.b_enc[index])
        if self.apply_b_dec_to_input:
            beta -= float(self.b_dec.double() @ encoder)
        theta = 0.0
        if self.architecture == "jumprelu":
            assert self.threshold is not None
            theta = max(0.0, float(self.threshold[index]))
        # points where the pre-activation is 0 and where it reaches the threshold:
        # z = (h − p0)·e means p0 = −β·e/‖e‖², and likewise for β − θ
        zero = (-beta / sq) * encoder
        gate = (-(beta - theta) / sq) * encoder
        extras = {
            "sae_encoder": {layer: encoder.float()},
            "sae_zero": {layer: zero.float()},
            "sae_threshold": {layer: gate.float()},
        }
        return SteeringVector({layer: direction}, metadata=meta, extras=extras)

    def top_features(
        self,
        model: Any,
        prompts: Sequence[str] | str,
        k: int = 5,
        *,
        chat: bool = False,
        batch_size: int = 16,
    ) -> TopFeatures:
        """The ``k`` most active features at every token of ``prompts`` (zeros left out).

        >>> import torch
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> g = torch.Generator().manual_seed(0)
        >>> sae = SAE(W_enc=torch.randn(32, 8, generator=g), W_dec=torch.randn(8, 32, generator=g),
        ...           b_enc=torch.zeros(8), b_dec=torch.zeros(32), layer=1)
        >>> top = sae.top_features(model, ["the cat sat"], k=2)
        >>> len(top.tokens[0]) == len(top.hits[0])
        True
        """
        items = check_prompts(prompts)
        k = as_positive_int(k, "k")
        if model.d_model != self.d_in:
            raise VectorMismatchError(
                f"the SAE reads width {self.d_in} but the model's hidden size is {model.d_model}"
            )
        acts = model.activations(
            items, layers=[self.layer], read_at="all", chat=chat, batch_size=batch_size
        )[self.layer]
        texts = [model.format_chat(p) for p in items] if chat else items
        ids = model.tokenizer(texts, add_special_tokens=not chat)["input_ids"]
        hits: list[tuple[tuple[FeatureHit, ...], ...]] = []
        tokens: list[tuple[str, ...]] = []
        for row, per_token in enumerate(acts):
            feats = self.encode(per_token)
            top = torch.topk(feats, k=min(k, self.d_sae), dim=-1)
            words = tuple(model.tokenizer.decode([t]) for t in ids[row])
            tokens.append(words)
            hits.append(
                tuple(
                    tuple(
                        FeatureHit(int(i), float(v))
                        for v, i in zip(top.values[pos], top.indices[pos], strict=True)
                        if float(v) > 0
                    )
                    for pos in range(per_token.shape[0])
                )
            )
        return TopFeatures(tuple(items), tuple(tokens), tuple(hits))


@dataclasses.dataclass(frozen=True)
class FeatureHit:
    """One feature firing at one token: its index and activation."""

    feature: int
    activation: float


@dataclasses.dataclass(frozen=True)
class TopFeatures:
    """Which features fire on which tokens: ``prompts[p]``'s token ``tokens[p][t]`` has the
    hits ``hits[p][t]`` (most active first, at most ``k``, zeros left out)."""

    prompts: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]
    hits: tuple[tuple[tuple[FeatureHit, ...], ...], ...]

    def counts(self) -> dict[int, int]:
        """How many tokens each feature is among the top ones on, most frequent first."""
        seen: dict[int, int] = {}
        for prompt in self.hits:
            for token in prompt:
                for hit in token:
                    seen[hit.feature] = seen.get(hit.feature, 0) + 1
        return dict(sorted(seen.items(), key=lambda kv: (-kv[1], kv[0])))

    def table(self) -> str:
        """One line per token: prompt index, token, then ``feature:activation`` pairs."""
        lines = []
        for p, (tokens, hits) in enumerate(zip(self.tokens, self.hits, strict=True)):
            for token, token_hits in zip(tokens, hits, strict=True):
                pairs = "  ".join(f"{h.feature}:{h.activation:.3g}" for h in token_hits)
                lines.append(f"{p:>3}  {token!r:<14} {pairs}".rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        n_tokens = sum(len(t) for t in self.tokens)
        common = ", ".join(f"{f}×{n}" for f, n in list(self.counts().items())[:5])
        return f"TopFeatures({len(self.prompts)} prompts, {n_tokens} tokens, most often: {common})"


# --- loading -------------------------------------------------------------------------------------
def load_sae(path: str | Path, *, layer: int | None = None) -> SAE:
    """Load an SAE from a SAELens folder or a Gemma Scope ``params.npz``.

    ``path``: a folder with ``cfg.json`` and ``sae_weights.safetensors`` (SAELens), or a
    ``params.npz`` file (or a folder holding one; Gemma Scope). A Gemma Scope file names no hook,
    so its layer comes from ``layer=`` or from a ``layer_N`` folder in its path (as published:
    ``gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz``); Gemma Scope's MLP and
    attention SAEs (``-mlp``/``-att`` releases) are refused. Unknown ``cfg.json`` keys are
    ignored; missing or corrupt files raise :class:`~steerlab.errors.VectorFileError`
    (:class:`~steerlab.errors.VectorFileNotFoundError` when nothing is there).
    """
    where = Path(path)
    if where.is_dir() and (where / "cfg.json").exists():
        return _load_saelens(where)
    if where.is_dir() and (where / "params.npz").exists():
        where = where / "params.npz"
    if where.is_file() and where.suffix == ".npz":
        return _load_gemma_scope(where, layer)
    if where.is_file() and where.name == "cfg.json":
        return _load_saelens(where.parent)
    if not where.exists():
        raise VectorFileNotFoundError(f"no SAE at {str(where)!r}")
    raise VectorFileError(
        f"{str(where)!r} is neither a SAELens folder (cfg.json + sae_weights.safetensors) nor a "
        f"Gemma Scope params.npz"
    )


def _load_saelens(folder: Path) -> SAE:
    cfg_file = folder / "cfg.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VectorFileError(f"cannot read SAE config {str(cfg_file)!r}: {err}") from None
    if not isinstance(cfg, dict):
        raise VectorFileError(f"{str(cfg_file)!r} is not a JSON object")
    # SAELens >= 6 keeps the hook under "metadata"; older files (and the pre-6 "hook_point")
    # at the top level
    nested = cfg.get("metadata")
    meta: dict[str, Any] = nested if isinstance(nested, dict) else {}
    hook = cfg.get("hook_name") or meta.get("hook_name") or cfg.get("hook_point")
    if not isinstance(hook, str):
        raise VectorFileError(f"{str(cfg_file)!r} names no hook_name")
    architecture = str(cfg.get("architecture", "standard")).lower()
    activation = str(cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))).lower()
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k")
    if architecture == "standard" and activation == "topk":
        architecture, k = "topk", kwargs.get("k", k)
    if architecture not in ARCHITECTURES:
        raise VectorFileError(
            f"{str(cfg_file)!r}: architecture {architecture!r} is not supported; steerlab reads "
            f"{', '.join(ARCHITECTURES)}"
        )
    if architecture != "topk" and activation not in ("relu", "none"):
        raise VectorFileError(f"{str(cfg_file)!r}: activation_fn {activation!r} is not supported")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none", False):
        raise VectorFileError(
            f"{str(cfg_file)!r}: normalize_activations {norm!r} is not supported (only 'none'; "
            f"fold the scaling into the weights first)"
        )
    for key in ("hook_head_index", "hook_point_head_index"):
        if cfg.get(key) is not None:
            raise VectorFileError(f"{str(cfg_file)!r}: a per-head SAE ({key}) is not supported")
    dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise VectorFileError(f"{str(cfg_file)!r}: unknown dtype {dtype!r}")
    weights_file = folder / "sae_weights.safetensors"
    if not weights_file.is_file():
        raise VectorFileNotFoundError(f"no sae_weights.safetensors in {str(folder)!r}")
    try:
        from safetensors.torch import load_file

        weights = load_file(str(weights_file))
    except Exception as err:  # safetensors raises its own errors on corrupt headers
        raise VectorFileError(f"cannot read {str(weights_file)!r}: {err}") from None
    if "scaling_factor" in weights:
        if not torch.allclose(weights["scaling_factor"], torch.ones(1)):
            raise VectorFileError(
                f"{str(weights_file)!r} has a finetuning scaling_factor; fold it into W_dec first"
            )
    if "log_threshold" in weights and "threshold" not in weights:
        weights["threshold"] = weights["log_threshold"].exp()
    sae = _build(
        weights,
        source=str(folder),
        layer=hook_layer(hook),
        architecture=architecture,
        k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        hook_name=hook,
    )
    _check_sizes(sae, cfg, cfg_file)
    return sae


def _check_sizes(sae: SAE, cfg: Mapping[str, Any], cfg_file: Path) -> None:
    for key, have in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
        if key in cfg and cfg[key] != have:
            raise VectorFileError(
                f"{str(cfg_file)!r} says {key}={cfg[key]} but the weights have {have}"
            )


def _load_gemma_scope(file: Path, layer: int | None) -> SAE:
    text = file.as_posix()
    if re.search(r"-(mlp|att|transcoder)", text):
        raise VectorFileError(
            f"{text!r} looks like a Gemma Scope MLP or attention SAE; steerlab steers the "
            f"residual stream (the '-res' releases)"
        )
    if layer is None:
        found = re.findall(r"layer_(\d+)", text)
        if not found:
            raise InvalidInputError(
                f"a Gemma Scope params.npz names no layer: pass layer= (the residual stream after "
                f"block L), or keep the layer_L folder in its path ({text!r})"
            )
        layer = int(found[-1])
    layer = as_int(layer, "layer")
    try:
        with np.load(file, allow_pickle=False) as data:
            raw = {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise VectorFileError(f"cannot read {text!r}: {err}") from None
    weights = {}
    for key, value in raw.items():
        name = "W_" + key[2:] if key.startswith("w_") else key
        if value.dtype.kind != "f":
            raise VectorFileError(f"{text!r}: {key} is not floating point ({value.dtype})")
        weights[name] = torch.from_numpy(value.astype(np.float32))
    return _build(
        weights,
        source=text,
        layer=layer,
        architecture="jumprelu",
        k=None,
        apply_b_dec_to_input=False,
        rescale_acts_by_decoder_norm=False,
        hook_name=f"blocks.{layer}.hook_resid_post",
    )


def _build(weights: Mapping[str, torch.Tensor], *, source: str, **fields: Any) -> SAE:
    needed = ["W_enc", "W_dec", "b_enc", "b_dec"]
    if fields["architecture"] == "jumprelu":
        needed.append("threshold")
    missing = [name for name in needed if name not in weights]
    if missing:
        raise VectorFileError(f"{source!r} lacks the tensors {missing}")
    try:
        return SAE(
            W_enc=weights["W_enc"],
            W_dec=weights["W_dec"],
            b_enc=weights["b_enc"],
            b_dec=weights["b_dec"],
            threshold=weights.get("threshold") if "threshold" in needed else None,
            source=source,
            **fields,
        )
    except (InvalidInputError, VectorMismatchError) as err:
        raise VectorFileError(f"{source!r}: {err}") from None
