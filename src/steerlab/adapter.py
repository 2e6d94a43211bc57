"""Model adapter: where the steerable sites of a decoder-only model are.

Every Hugging Face causal LM keeps its decoder blocks in a ``ModuleList`` somewhere
(``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ``model.decoder.layers``...), and the
attention output projection, MLP and final norm under architecture-specific names. The adapter
maps those onto one vocabulary so the rest of steerlab never looks at a module name:

=============  =============================================================================
site           meaning
=============  =============================================================================
block(L)       decoder block L; "layer L" is the residual stream at its *output*
attention(L)   the self-attention module of block L (its output is added to the residual)
attn_out(L)    the attention output projection; its *input* holds the per-head outputs
mlp(L)         the module whose output is the MLP's contribution to the residual stream
embed          token embedding; final_norm: the norm before the unembedding; unembed: lm_head
=============  =============================================================================

Known architectures are listed in :data:`ARCHITECTURES`. Anything else is auto-detected when it
has exactly one ``ModuleList`` with ``config.num_hidden_layers`` entries; when that fails, pass a
layer path template (``sl.wrap(m, tok, layers_path="model.layers.{i}")``) or register a spec with
:func:`register_architecture`.

>>> import torch, transformers
>>> from steerlab.adapter import ModelAdapter
>>> cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32)
>>> adapter = ModelAdapter(transformers.GPT2LMHeadModel(cfg))
>>> adapter.n_layers, adapter.d_model, adapter.n_heads, adapter.head_dim
(2, 16, 2, 8)
>>> adapter.resolve_layer(-1)
1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from steerlab.checks import as_int
from steerlab.errors import LayerIndexError, UnsupportedModelError

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "ModelAdapter",
    "register_architecture",
]


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one architecture.

    ``layers`` is a dotted path from the causal-LM root to the block ``ModuleList``; the other
    paths are relative to one block, except ``final_norm`` and ``backbone`` (from the root).
    ``router`` is a mixture of experts' gate (one logit per expert); ``backbone`` the module
    that receives the token ids and 2-D attention mask (default: the parent of ``layers``).
    ``None`` marks a site the architecture does not have (steerlab raises a clear error when
    it is asked for).

    >>> ArchitectureSpec(layers="model.layers", attention="self_attn",
    ...                  attn_out="self_attn.o_proj", mlp="mlp", final_norm="model.norm").layers
    'model.layers'
    """

    layers: str
    attention: str | None = None
    attn_out: str | None = None
    mlp: str | None = None
    final_norm: str | None = None
    router: str | None = None
    backbone: str | None = None


_LLAMA_LIKE = ArchitectureSpec(
    layers="model.layers",
    attention="self_attn",
    attn_out="self_attn.o_proj",
    mlp="mlp",
    final_norm="model.norm",
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "gpt2": ArchitectureSpec(
        layers="transformer.h",
        attention="attn",
        attn_out="attn.c_proj",
        mlp="mlp",
        final_norm="transformer.ln_f",
    ),
    "gptj": ArchitectureSpec(
        layers="transformer.h",
        attention="attn",
        attn_out="attn.out_proj",
        mlp="mlp",
        final_norm="transformer.ln_f",
    ),
    "gpt_neox": ArchitectureSpec(
        layers="gpt_neox.layers",
        attention="attention",
        attn_out="attention.dense",
        mlp="mlp",
        final_norm="gpt_neox.final_layer_norm",
    ),
    "opt": ArchitectureSpec(
        layers="model.decoder.layers",
        attention="self_attn",
        attn_out="self_attn.out_proj",
        mlp="fc2",
        final_norm="model.decoder.final_layer_norm",
    ),
    "phi3": dataclasses.replace(_LLAMA_LIKE),
    # Mixture-of-experts blocks: the sparse MoE block is the MLP; its router is a submodule.
    **{
        name: dataclasses.replace(_LLAMA_LIKE, router="mlp.gate")
        for name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
    },
    "gpt_oss": dataclasses.replace(_LLAMA_LIKE, router="mlp.router"),
    # Gemma 3 multimodal: the text tower beside the vision tower.
    "gemma3": ArchitectureSpec(
        layers="model.language_model.layers",
        attention="self_attn",
        attn_out="self_attn.o_proj",
        mlp="mlp",
        final_norm="model.language_model.norm",
        # the multimodal model, not the text tower, sees the 2-D padding mask
        backbone="model",
    ),
    **{
        name: _LLAMA_LIKE
        for name in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "cohere",
            "stablelm",
            "phi",
            "starcoder2",
            "smollm3",
        )
    },
}
# Phi-2 ("phi") names its output projection "dense" and its final norm differently.
ARCHITECTURES["phi"] = ArchitectureSpec(
    layers="model.layers",
    attention="self_attn",
    attn_out="self_attn.dense",
    mlp="mlp",
    final_norm="model.final_layernorm",
)


def register_architecture(model_type: str, spec: ArchitectureSpec) -> None:
    """Teach steerlab the module paths of a ``config.model_type`` it does not know.

    >>> register_architecture("my_arch", ArchitectureSpec(layers="backbone.blocks"))
    >>> ARCHITECTURES["my_arch"].layers
    'backbone.blocks'
    """
    if not model_type:
        raise UnsupportedModelError("model_type must be a non-empty string")
    ARCHITECTURES[model_type] = spec


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    node: object = root
    for part in path.split("."):
        if part == "":
            continue
        if isinstance(node, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            index = int(part)
            if index >= len(node):
                return None
            node = node[index]
            continue
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nn.Module) else None


def _config_int(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_block_lists(model: nn.Module, n_layers: int | None) -> list[str]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if n_layers is None or len(module) == n_layers:
                found.append(name)
    return found


# transformers 4 laid Mixtral's block out differently: the sparse MoE block is
# `block_sparse_moe` (its router a plain Linear `gate`; the block computes the routing), where
# transformers 5 names it `mlp`. The spec names the newer paths; the older ones are used where
# the block has them instead.
_OLDER_LAYOUTS: dict[str, dict[str, str]] = {
    "mixtral": {"mlp": "block_sparse_moe", "router": "block_sparse_moe.gate"},
}


def _find_router(block: nn.Module, n_experts: int, d_model: int) -> str | None:
    """The path of the one submodule named ``gate`` or ``router`` with an ``(n_experts,
    d_model)`` weight, or ``None`` when there is not exactly one."""
    found = []
    for name, module in block.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in ("gate", "router") and isinstance(weight, torch.Tensor):
            if tuple(weight.shape) == (n_experts, d_model):
                found.append(name)
    return found[0] if len(found) == 1 else None


class ModelAdapter:
    """Find and name the sites of a decoder-only causal LM.

    ``layers_path`` overrides detection: a dotted path to the block ``ModuleList``
    (``"model.layers"``) or a template with ``{i}`` (``"model.layers.{i}"``).

    >>> import transformers
    >>> cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4,
    ...     num_key_value_heads=2, intermediate_size=32, vocab_size=32)
    >>> a = ModelAdapter(transformers.LlamaForCausalLM(cfg))
    >>> a.n_kv_heads, type(a.attn_out(0)).__name__
    (2, 'Linear')
    """

    def __init__(self, model: nn.Module, *, layers_path: str | None = None) -> None:
        self.model = model
        outer = getattr(model, "config", None)
        self.model_type: str = str(getattr(outer, "model_type", type(model).__name__))
        # Multimodal configs (Gemma 3) keep the decoder's sizes in a text sub-config.
        get_text = getattr(outer, "get_text_config", None)
        config = get_text() if callable(get_text) else outer
        self.config = config
        n_layers_cfg = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
        spec = ARCHITECTURES.get(self.model_type)
        if layers_path is not None:
            base = layers_path.replace(".{i}", "").replace("{i}", "").rstrip(".")
            spec = dataclasses.replace(spec, layers=base) if spec else ArchitectureSpec(base)
        if spec is None:
            candidates = _find_block_lists(model, n_layers_cfg)
            if len(candidates) != 1:
                raise UnsupportedModelError(
                    f"steerlab does not know where the decoder blocks of model_type "
                    f"{self.model_type!r} are (found {len(candidates)} candidate ModuleLists: "
                    f"{candidates[:5]}). Pass layers_path, e.g. "
                    f"sl.wrap(model, tokenizer, layers_path='model.layers.{{i}}'), or call "
                    f"steerlab.adapter.register_architecture()."
                )
            spec = ArchitectureSpec(layers=candidates[0])
        blocks = _get_path(model, spec.layers)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedModelError(
                f"no ModuleList of decoder blocks at {spec.layers!r} in {type(model).__name__} "
                f"(model_type {self.model_type!r}); pass layers_path='path.to.layers.{{i}}'"
            )
        older = _OLDER_LAYOUTS.get(self.model_type)
        if older and spec.mlp and _get_path(blocks[0], spec.mlp) is None:
            if all(_get_path(blocks[0], path) is not None for path in older.values()):
                spec = dataclasses.replace(spec, **older)
        self.spec = spec
        self.blocks: nn.ModuleList = blocks
        backbone_path = spec.layers.rsplit(".", 1)[0] if "." in spec.layers else ""
        backbone_path = spec.backbone if spec.backbone is not None else backbone_path
        backbone = _get_path(model, backbone_path) if backbone_path else model
        self.backbone: nn.Module = backbone if backbone is not None else model
        self.n_layers: int = len(blocks)
        d_model = _config_int(config, "hidden_size", "n_embd", "d_model")
        if d_model is None:
            raise UnsupportedModelError(f"cannot read the hidden size from {type(config)}")
        self.d_model: int = d_model
        n_heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
        self.n_heads: int = n_heads or 1
        self.n_kv_heads: int = _config_int(config, "num_key_value_heads") or self.n_heads
        self.head_dim: int = _config_int(config, "head_dim") or self.d_model // self.n_heads
        self.n_experts: int = _config_int(config, "num_local_experts", "num_experts") or 0
        self.router_path: str | None = spec.router
        if self.n_experts > 1 and self.router_path is None:
            self.router_path = _find_router(blocks[0], self.n_experts, self.d_model)

    # --- layer indices -------------------------------------------------------------------
    def resolve_layer(self, layer: int) -> int:
        """Map a possibly negative layer index onto ``0..n_layers-1``, or raise."""
        if not isinstance(layer, torch.SymInt):
            layer = as_int(layer, "layer")  # refuses 1.5 and True, which int() would truncate
        layer = int(layer)
        if not -self.n_layers <= layer < self.n_layers:
            raise LayerIndexError(
                f"layer {layer} is out of range for a model with {self.n_layers} layers "
                f"(valid: {-self.n_layers}..{self.n_layers - 1})"
            )
        return layer % self.n_layers

    def resolve_layers(self, layers: int | Iterable[int] | None) -> list[int]:
        """Resolve a layer, a list of layers or ``None`` (all layers), keeping order, no dups."""
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, int) or not isinstance(layers, Iterable):
            return [self.resolve_layer(layers)]
        out: list[int] = []
        for layer in layers:
            resolved = self.resolve_layer(layer)
            if resolved not in out:
                out.append(resolved)
        if not out:
            raise LayerIndexError("the list of layers is empty")
        return out

    # --- sites ---------------------------------------------------------------------------
    def block(self, layer: int) -> nn.Module:
        """Decoder block ``layer`` (negative indices allowed)."""
        return self.blocks[self.resolve_layer(layer)]

    def _site(self, layer: int, path: str | None, what: str) -> nn.Module:
        block = self.block(layer)
        module = _get_path(block, path) if path else None
        if module is None:
            raise UnsupportedModelError(
                f"steerlab does not know the {what} of {self.model_type!r} blocks; register an "
                f"ArchitectureSpec with steerlab.adapter.register_architecture()"
            )
        return module

    def attention(self, layer: int) -> nn.Module:
        """The self-attention module of block ``layer``."""
        return self._site(layer, self.spec.attention, "attention module")

    def attn_out(self, layer: int) -> nn.Module:
        """The attention output projection of block ``layer`` (its input holds head outputs)."""
        return self._site(layer, self.spec.attn_out, "attention output projection")

    def mlp(self, layer: int) -> nn.Module:
        """The module whose output is block ``layer``'s MLP contribution."""
        return self._site(layer, self.spec.mlp, "MLP")

    def router(self, layer: int) -> nn.Module:
        """The router (gate) of block ``layer``'s mixture of experts: the module whose weight
        maps the residual stream onto one logit per expert."""
        if self.n_experts < 2:
            raise UnsupportedModelError(
                f"{self.model_type!r} is not a mixture-of-experts model (its config declares no "
                f"num_experts / num_local_experts), so it has no router to steer"
            )
        if self.router_path is None:
            raise UnsupportedModelError(self.router_missing())
        module = _get_path(self.block(layer), self.router_path)
        if module is None:  # a dense block in a model that interleaves them (Qwen MoE sparse step)
            raise UnsupportedModelError(
                f"block {self.resolve_layer(layer)} of {self.model_type!r} has no router at "
                f"{self.router_path!r} (a dense block?)"
            )
        return module

    def router_missing(self) -> str:
        """Why no router was found, for the errors and warnings that need it."""
        return (
            f"{self.model_type!r} declares {self.n_experts} experts but steerlab found no router "
            f"in its blocks (looked for one submodule named 'gate' or 'router' with a "
            f"({self.n_experts}, {self.d_model}) weight); register "
            f"ArchitectureSpec(..., router='mlp.gate') with "
            f"steerlab.adapter.register_architecture() to steer its router"
        )

    @property
    def embed(self) -> nn.Module:
        """The token embedding module."""
        get = getattr(self.model, "get_input_embeddings", None)
        module = get() if callable(get) else None
        if not isinstance(module, nn.Module):
            raise UnsupportedModelError("the model exposes no input embeddings")
        return module

    @property
    def unembed(self) -> nn.Module:
        """The unembedding (``lm_head``)."""
        get = getattr(self.model, "get_output_embeddings", None)
        module = get() if callable(get) else None
        if not isinstance(module, nn.Module):
            raise UnsupportedModelError("the model exposes no output embeddings (lm_head)")
        return module

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm applied before the unembedding, or ``None`` if the model has none."""
        return _get_path(self.model, self.spec.final_norm) if self.spec.final_norm else None

    def logits_from_final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the output of the last block: final norm, projection, unembedding.

        Mirrors what the causal-LM head does after the blocks, including OPT's ``project_out``
        and Gemma-2's final logit soft-capping.
        """
        norm = self.final_norm
        if norm is not None:
            hidden = norm(hidden)
        project_out = getattr(self.backbone, "project_out", None)
        if isinstance(project_out, nn.Module):
            hidden = project_out(hidden)
        logits = self.unembed(hidden)
        config = self.config
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        scale = getattr(config, "logit_scale", None)
        if isinstance(scale, (int, float)) and self.model_type == "cohere":
            logits = logits * scale
        divisor = getattr(config, "logits_scaling", None)
        if isinstance(divisor, (int, float)) and divisor != 1:
            logits = logits / divisor
        return logits

    def layer_device_dtype(self, layer: int) -> tuple[torch.device, torch.dtype]:
        """Device and dtype of block ``layer``'s parameters (where its interventions live)."""
        for param in self.block(layer).parameters():
            return param.device, param.dtype
        return torch.device("cpu"), torch.float32

    def site_names(self) -> dict[str, str]:
        """The module paths this adapter resolved, for error messages and docs."""
        return {k: str(v) for k, v in dataclasses.asdict(self.spec).items()}
