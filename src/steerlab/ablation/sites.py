"""Sites: the activations of a decoder block that an ablation can replace.

The *components* of block ``L`` (the table in :mod:`steerlab.ablation`): ``"block"`` (its
output, the residual stream at layer ``L``), ``"attn"`` and ``"mlp"`` (what those sub-layers
output), and ``"head"`` (slices of the input of the attention output projection, one per head).
These helpers find a component's module and hook kind, its width and the heads a call names;
the ablation interventions, :func:`~steerlab.ablation.compute_means`,
:func:`~steerlab.ablation.ablation_scan` and :func:`~steerlab.editing.bake` all share them.

>>> from steerlab.testing import tiny_model
>>> adapter = tiny_model("llama").adapter
>>> module, kind = component_site(adapter, "head", 1)
>>> kind, component_width(adapter, "head") == adapter.n_heads * adapter.head_dim
('forward_pre', True)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from steerlab.adapter import ModelAdapter
from steerlab.errors import InvalidInputError

__all__ = [
    "COMPONENTS",
    "check_component",
    "check_heads",
    "component_site",
    "component_width",
    "residual_writers",
]

COMPONENTS: tuple[str, ...] = ("block", "attn", "mlp", "head")
"""The sites an ablation can target (see :mod:`steerlab.ablation`)."""


def check_component(component: str) -> str:
    """``component`` if it is one of :data:`COMPONENTS`; otherwise an error listing them.

    >>> check_component("mlp")
    'mlp'
    >>> check_component("ffn")
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: unknown component 'ffn'; use one of block, attn, mlp, head
    """
    if component not in COMPONENTS:
        raise InvalidInputError(
            f"unknown component {component!r}; use one of {', '.join(COMPONENTS)}"
        )
    return component


def component_site(adapter: ModelAdapter, component: str, layer: int) -> tuple[nn.Module, str]:
    """The module of a component and the hook kind that sees its activation (heads are read
    at the input of the attention output projection, hence ``"forward_pre"``).

    >>> from steerlab.testing import tiny_model
    >>> adapter = tiny_model("gpt2").adapter
    >>> module, kind = component_site(adapter, "block", 0)
    >>> module is adapter.block(0), kind
    (True, 'forward')
    """
    if component == "block":
        return adapter.block(layer), "forward"
    if component == "attn":
        return adapter.attention(layer), "forward"
    if component == "mlp":
        return adapter.mlp(layer), "forward"
    return adapter.attn_out(layer), "forward_pre"


def component_width(adapter: ModelAdapter, component: str) -> int:
    """The last dimension of a component's activation: ``d_model``, or ``n_heads * head_dim``
    for heads.

    >>> from steerlab.testing import tiny_model
    >>> adapter = tiny_model("gpt2").adapter
    >>> component_width(adapter, "mlp") == adapter.d_model
    True
    """
    return adapter.n_heads * adapter.head_dim if component == "head" else adapter.d_model


def check_heads(adapter: ModelAdapter, heads: int | Sequence[int] | None) -> tuple[int, ...]:
    """The heads ``heads`` names (an int or a list; negative indices count from the end),
    non-negative and without repeats, in the order given.

    >>> from steerlab.testing import tiny_model
    >>> adapter = tiny_model("llama").adapter
    >>> check_heads(adapter, [-1, 0, adapter.n_heads - 1]) == (adapter.n_heads - 1, 0)
    True
    >>> check_heads(adapter, None)
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: component='head' needs head= (an int or a list of ints)
    """
    if heads is None:
        raise InvalidInputError("component='head' needs head= (an int or a list of ints)")
    items = [heads] if isinstance(heads, int) else list(heads)
    if not items:
        raise InvalidInputError("the list of heads is empty")
    out: list[int] = []
    for head in items:
        if isinstance(head, bool) or not isinstance(head, int):
            raise InvalidInputError(f"a head index must be an int, got {head!r}")
        if not -adapter.n_heads <= head < adapter.n_heads:
            raise InvalidInputError(
                f"head {head} is out of range for a model with {adapter.n_heads} heads"
            )
        if head % adapter.n_heads not in out:
            out.append(head % adapter.n_heads)
    return tuple(out)


def residual_writers(adapter: ModelAdapter, layer: int) -> list[nn.Module]:
    """The modules of block ``layer`` whose outputs are added to the residual stream.

    Attention and MLP for pre-norm and parallel blocks; for blocks that normalise a
    sub-layer's output before adding it (Gemma 2/3, OLMo 2: ``post_feedforward_layernorm``), the
    two post-norms.

    >>> from steerlab.testing import tiny_model
    >>> [type(m).__name__ for m in residual_writers(tiny_model("gemma2").adapter, 0)]
    ['Gemma2RMSNorm', 'Gemma2RMSNorm']
    """
    block = adapter.block(layer)
    post_ff = getattr(block, "post_feedforward_layernorm", None)
    post_attn = getattr(block, "post_attention_layernorm", None)
    if isinstance(post_ff, nn.Module) and isinstance(post_attn, nn.Module):
        return [post_attn, post_ff]
    return [adapter.attention(layer), adapter.mlp(layer)]
