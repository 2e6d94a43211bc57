"""Sites: the activations of a decoder block that an ablation can replace.

The *components* of block ``L`` (the table in :mod:`steerlab.ablation`): ``"block"`` (its
output, the residual stream at layer ``L``), ``"attn"`` and ``"mlp"`` (what those sub-layers
output), and ``"head"`` (slices of the input of the attention output projection, one per head).
These helpers find a component's module and hook kind, its width and the heads a call names
(through :mod:`steerlab.sites`, which steering and reading share);
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
from steerlab.sites import check_heads as site_heads
from steerlab.sites import site_hook, site_width

__all__ = [
    "COMPONENTS",
    "SITE_OF",
    "check_component",
    "check_heads",
    "component_site",
    "component_width",
    "residual_writers",
]

COMPONENTS: tuple[str, ...] = ("block", "attn", "mlp", "head")
"""The sites an ablation can target (see :mod:`steerlab.ablation`)."""
SITE_OF: dict[str, str] = {"block": "resid", "attn": "attn_out", "mlp": "mlp_out", "head": "head"}
"""Each component's :mod:`steerlab.sites` site, where its module and width are found."""


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
    return site_hook(adapter, SITE_OF[check_component(component)], layer)


def component_width(adapter: ModelAdapter, component: str) -> int:
    """The last dimension of a component's activation: ``d_model``, or ``n_heads * head_dim``
    for heads.

    >>> from steerlab.testing import tiny_model
    >>> adapter = tiny_model("gpt2").adapter
    >>> component_width(adapter, "mlp") == adapter.d_model
    True
    """
    return site_width(adapter, SITE_OF[check_component(component)])


def check_heads(adapter: ModelAdapter, heads: int | Sequence[int] | None) -> tuple[int, ...]:
    """The heads ``heads`` names (see :func:`steerlab.sites.check_heads`), for ``head=``.

    >>> from steerlab.testing import tiny_model
    >>> check_heads(tiny_model("llama").adapter, None)
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: component='head' needs head= (an int or a list of ints)
    """
    if heads is None:
        raise InvalidInputError("component='head' needs head= (an int or a list of ints)")
    return site_heads(adapter, heads, "head")


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
