"""Sites: where in a decoder block a vector is read or added.

=============  ======================================================================  ========
site           the activation                                                          width
=============  ======================================================================  ========
``resid``      the residual stream at the output of block ``L`` (the default)          d_model
``attn_out``   what block ``L``'s attention module outputs, before it joins the        d_model
               residual stream
``mlp_out``    what block ``L``'s MLP (or mixture of experts) outputs                  d_model
``head``       the per-head outputs: the input of the attention output projection,     n_heads
               one ``head_dim`` slice per head (``heads=[...]`` picks some)            × head_dim
``router``     a mixture of experts' router logits, one per expert                     n_experts
=============  ======================================================================  ========

Steering, reading (``model.activations(..., site=)``), the methods and the ablations
(:mod:`steerlab.ablation.sites` maps its components onto these) all locate a site here.

>>> from steerlab.testing import tiny_model
>>> adapter = tiny_model("llama").adapter
>>> module, kind = site_hook(adapter, "head", 1)
>>> kind, site_width(adapter, "head") == adapter.n_heads * adapter.head_dim
('forward_pre', True)
>>> head_mask(adapter, [1]).nonzero().flatten().tolist() == list(range(8, 16))
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from steerlab.adapter import ModelAdapter
from steerlab.errors import InvalidInputError, UnsupportedModelError

__all__ = [
    "SITES",
    "RESIDUAL_SPACE",
    "check_experts",
    "check_heads",
    "check_site",
    "check_site_override",
    "entry_site_options",
    "head_mask",
    "output_hidden",
    "replace_output_hidden",
    "reroute",
    "router_indices",
    "router_logits",
    "router_top_k",
    "site_hook",
    "site_width",
]

SITES: tuple[str, ...] = ("resid", "attn_out", "mlp_out", "head", "router")
"""The sites a vector can live at (see the table above)."""

RESIDUAL_SPACE: tuple[str, ...] = ("resid", "attn_out", "mlp_out")
"""The sites whose activations are vectors of the residual stream's space (``d_model`` wide,
added into it): a vector computed at one of them may be steered at another. ``head`` and
``router`` vectors have coordinates of their own (per-head slices, one entry per expert)."""

# Vector files written before sites existed say "block_output" for the residual stream.
_ALIASES = {"block_output": "resid"}


def check_site(site: object, argument: str = "site") -> str:
    """``site`` in its canonical spelling, or an error naming ``argument`` and the sites.

    >>> check_site("block_output")
    'resid'
    >>> check_site("ffn")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: unknown site='ffn'; use one of resid, attn_out, ...
    """
    name = _ALIASES.get(site, site) if isinstance(site, str) else site
    if name not in SITES:
        raise InvalidInputError(f"unknown {argument}={site!r}; use one of {', '.join(SITES)}")
    return str(name)


def check_site_override(recorded: object, site: str, argument: str = "site") -> None:
    """Refuse steering a vector at ``site`` when the vector records (``recorded``: its
    ``site`` metadata, ``None`` when it has none) a site whose coordinates differ: a vector
    may move among :data:`RESIDUAL_SPACE` (``resid``, ``attn_out``, ``mlp_out`` all write
    into the residual stream), a ``head`` or ``router`` vector only stays where it was
    computed. A vector that records no site (a raw tensor) may go to any site its width fits.

    >>> check_site_override("resid", "mlp_out")
    >>> check_site_override(None, "head")
    >>> check_site_override("resid", "head")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: site='head': the vector was computed for site 'resid'; ...
    """
    if recorded is None:
        return
    own = check_site(recorded)
    if own == site or (own in RESIDUAL_SPACE and site in RESIDUAL_SPACE):
        return
    raise InvalidInputError(
        f"{argument}={site!r}: the vector was computed for site {own!r}; a {own!r} vector "
        f"cannot be steered at {site!r} (resid, attn_out and mlp_out vectors share the "
        f"residual stream's coordinates and may move among those three; head and router "
        f"vectors stay at their own site)"
    )


def entry_site_options(
    adapter: ModelAdapter,
    vector: Any,
    *,
    site: str | None,
    heads: Sequence[int] | None,
    experts: Sequence[int] | None,
    field: str = "steering",
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """:class:`~steerlab.interventions.Steering`'s ``site``/``heads``/``experts`` options for
    one entry of a server request, checked against ``vector`` and the model with errors that
    start with the request's field (``steering[0].heads: ...``; ``names`` spells the three
    options otherwise, e.g. the CLI's ``--site``); only given options are kept.

    >>> from steerlab.testing import tiny_model
    >>> from steerlab.vectors import SteeringVector
    >>> adapter = tiny_model("llama").adapter
    >>> vec = SteeringVector({1: torch.ones(32)}, metadata={"site": "head"})
    >>> options = dict(heads=None, experts=None, field="steering[0]")
    >>> entry_site_options(adapter, vec, site=None, **{**options, "heads": [-1]})
    {'heads': (3,)}
    >>> entry_site_options(adapter, vec, site="resid", **options)
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: steering[0].site: site='resid': the vector was computed ...
    """
    site_name, heads_name, experts_name = names or (
        f"{field}.site",
        f"{field}.heads",
        f"{field}.experts",
    )
    options: dict[str, Any] = {}
    if site is not None:
        try:
            site = check_site(site)
            check_site_override(vector.metadata.get("site"), site)
        except InvalidInputError as err:
            raise InvalidInputError(f"{site_name}: {err}") from None
        options["site"] = site
    resolved = site if site is not None else vector.site
    if heads is not None:
        if resolved != "head":
            raise InvalidInputError(
                f"{heads_name}: heads apply to site 'head'; this steering acts at site {resolved!r}"
            )
        options["heads"] = check_heads(adapter, heads, heads_name)
    if experts is not None:
        if resolved not in ("router", "mlp_out"):
            raise InvalidInputError(
                f"{experts_name}: experts apply to site 'router' or 'mlp_out'; this steering "
                f"acts at site {resolved!r}"
            )
        try:
            options["experts"] = check_experts(adapter, experts, experts_name)
        except (InvalidInputError, UnsupportedModelError) as err:  # a dense model's refusal
            message = str(err)  # does not name the field
            if not message.startswith(experts_name):
                message = f"{experts_name}: {message}"
            raise InvalidInputError(message) from None
    return options


def site_hook(adapter: ModelAdapter, site: str, layer: int) -> tuple[nn.Module, str]:
    """The module whose hook of the returned kind sees ``site`` at ``layer``: its output
    (``"forward"``), or for heads the input of the output projection (``"forward_pre"``).

    >>> from steerlab.testing import tiny_model
    >>> adapter = tiny_model("gpt2").adapter
    >>> module, kind = site_hook(adapter, "resid", 0)
    >>> module is adapter.block(0), kind
    (True, 'forward')
    """
    site = check_site(site)
    if site == "resid":
        return adapter.block(layer), "forward"
    if site == "attn_out":
        return adapter.attention(layer), "forward"
    if site == "mlp_out":
        return adapter.mlp(layer), "forward"
    if site == "head":
        return adapter.attn_out(layer), "forward_pre"
    return adapter.router(layer), "forward"


def site_width(adapter: ModelAdapter, site: str) -> int:
    """The last dimension of ``site``'s activation.

    >>> from steerlab.testing import tiny_model
    >>> site_width(tiny_model("mixtral").adapter, "router")
    4
    """
    site = check_site(site)
    if site == "head":
        return adapter.n_heads * adapter.head_dim
    if site == "router":
        adapter.router(0)  # a dense model, or an MoE whose router was not found, says so
        return adapter.n_experts
    return adapter.d_model


def check_heads(
    adapter: ModelAdapter, heads: int | Sequence[int] | None, argument: str = "heads"
) -> tuple[int, ...]:
    """The heads ``heads`` names (an int or a list; negative indices count from the end),
    non-negative and without repeats, in the order given. ``argument`` names the option in
    errors.

    >>> from steerlab.testing import tiny_model
    >>> adapter = tiny_model("llama").adapter
    >>> check_heads(adapter, [-1, 0, adapter.n_heads - 1]) == (adapter.n_heads - 1, 0)
    True
    >>> check_heads(adapter, [9])
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: heads: head 9 is out of range for a model with 4 heads
    """
    if heads is None:
        raise InvalidInputError(f"{argument}= is needed (an int or a list of ints)")
    items = [heads] if isinstance(heads, int) else list(heads)
    if not items:
        raise InvalidInputError(f"{argument}: the list of heads is empty")
    out: list[int] = []
    for head in items:
        if isinstance(head, bool) or not isinstance(head, int):
            raise InvalidInputError(f"{argument}: a head index must be an int, got {head!r}")
        if not -adapter.n_heads <= head < adapter.n_heads:
            raise InvalidInputError(
                f"{argument}: head {head} is out of range for a model with {adapter.n_heads} heads"
            )
        if head % adapter.n_heads not in out:
            out.append(head % adapter.n_heads)
    return tuple(out)


def head_mask(adapter: ModelAdapter, heads: Sequence[int]) -> torch.Tensor:
    """``Tensor[n_heads * head_dim]`` bool, true on the slices of ``heads`` (query heads: with
    grouped-query attention the output projection still reads one slice per query head).

    >>> from steerlab.testing import tiny_model
    >>> int(head_mask(tiny_model("qwen3").adapter, [0, 3]).sum())
    16
    """
    mask = torch.zeros(adapter.n_heads, adapter.head_dim, dtype=torch.bool)
    mask[list(check_heads(adapter, heads))] = True
    return mask.flatten()


def check_experts(
    adapter: ModelAdapter, experts: int | Sequence[int], argument: str = "experts"
) -> tuple[int, ...]:
    """The experts ``experts`` names, checked against the model's expert count (``argument``
    names the option in errors).

    >>> from steerlab.testing import tiny_model
    >>> check_experts(tiny_model("mixtral").adapter, [3, 0, 3])
    (3, 0)
    """
    adapter.router(0)  # refuses a dense model, naming why
    items = [experts] if isinstance(experts, int) else list(experts)
    if not items:
        raise InvalidInputError(f"{argument}: the list of experts is empty")
    out: list[int] = []
    for expert in items:
        if isinstance(expert, bool) or not isinstance(expert, int):
            raise InvalidInputError(f"{argument}: an expert index must be an int, got {expert!r}")
        if not 0 <= expert < adapter.n_experts:
            raise InvalidInputError(
                f"{argument}: expert {expert} is out of range for a model with "
                f"{adapter.n_experts} experts (0..{adapter.n_experts - 1})"
            )
        if expert not in out:
            out.append(expert)
    return tuple(out)


def router_top_k(adapter: ModelAdapter, layer: int) -> int:
    """How many experts block ``layer``'s router picks per token (its ``top_k``, or its MoE
    block's where the router is a plain ``Linear`` as in transformers 4, or the config's).

    >>> from steerlab.testing import tiny_model
    >>> router_top_k(tiny_model("olmoe").adapter, 0)
    2
    """
    for module in (adapter.router(layer), adapter.mlp(layer)):
        top_k = getattr(module, "top_k", None)
        if isinstance(top_k, int) and not isinstance(top_k, bool):
            return top_k
    top_k = getattr(adapter.config, "num_experts_per_tok", None)
    if isinstance(top_k, int) and top_k > 0:
        return top_k
    raise InvalidInputError(
        f"cannot tell how many experts {adapter.model_type!r} routes each token to (no top_k on "
        f"its router or MoE block, no num_experts_per_tok in its config)"
    )


class _Rerouted(tuple):  # type: ignore[type-arg]
    """A ``(scores, indices)`` router output recomputed from edited logits, which it keeps:
    that layout returns no logits, and a reader after the edit must see the edited ones."""

    logits: torch.Tensor

    def __new__(cls, items: tuple[Any, ...], logits: torch.Tensor) -> _Rerouted:
        made = super().__new__(cls, items)
        made.logits = logits
        return made


def router_logits(router: nn.Module, args: Any, output: Any) -> torch.Tensor:
    """The router logits ``[tokens, n_experts]`` of one router call, whatever its layout:
    transformers 5 routers return ``(logits, scores, indices)``; a transformers 4 gate is a
    plain ``Linear`` returning the logits; transformers 4's gpt-oss router returns
    ``(scores, indices)``, so its logits are recomputed from its input (the same ``F.linear``
    on the same tensors: the same numbers).

    >>> from steerlab.testing import tiny_model
    >>> router = tiny_model("olmoe").adapter.router(0)
    >>> x = torch.randn(5, 32)
    >>> tuple(router_logits(router, (x,), router(x)).shape)
    (5, 4)
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and len(output) == 3:
        return output[0]
    if isinstance(output, _Rerouted):  # steered: the edited logits, not the input's
        return output.logits
    weight = getattr(router, "weight", None)
    if isinstance(output, tuple) and len(output) == 2 and isinstance(weight, torch.Tensor):
        hidden = args[0].reshape(-1, weight.shape[-1])
        return torch.nn.functional.linear(hidden, weight, getattr(router, "bias", None))
    raise InvalidInputError(
        f"steerlab cannot read the logits of {type(router).__name__}: it knows routers that "
        f"return logits, (logits, scores, indices) or (scores, indices) with a weight"
    )


def router_indices(router: nn.Module, args: Any, output: Any, top_k: int) -> torch.Tensor:
    """The experts ``[tokens, top_k]`` one router call picked (see :func:`router_logits` for
    the layouts; a plain ``Linear`` gate's block picks the ``top_k`` largest logits).

    >>> from steerlab.testing import tiny_model
    >>> router = tiny_model("olmoe").adapter.router(0)
    >>> x = torch.randn(5, 32)
    >>> tuple(router_indices(router, (x,), router(x), 2).shape)
    (5, 2)
    """
    if isinstance(output, tuple) and len(output) in (2, 3):
        return output[-1]
    return torch.topk(router_logits(router, args, output), top_k, dim=-1).indices


# Routers that pick the top-k logits and softmax over those alone; the others softmax over
# every expert, take the top k and (unless norm_topk_prob is false) renormalise them.
_TOPK_THEN_SOFTMAX = ("GptOssTopKRouter",)


def reroute(router: nn.Module, output: Any, logits: torch.Tensor) -> Any:
    """The router's output recomputed from edited ``logits``, the way that router computes it
    (so a zero edit gives its own output back, bit for bit): ``(logits, scores, indices)``
    (transformers 5), ``(scores, indices)`` (transformers 4's gpt-oss) or the logits alone (a
    plain gate, whose block routes from them).

    >>> from steerlab.testing import tiny_model
    >>> router = tiny_model("olmoe").adapter.router(0)
    >>> x = torch.randn(5, 32)
    >>> out = router(x)
    >>> again = reroute(router, out, router_logits(router, (x,), out))
    >>> all(torch.equal(a, b) for a, b in zip(out, again))
    True
    """
    if isinstance(output, torch.Tensor):
        return logits  # a plain gate (transformers 4): its block routes from the logits
    top_k = getattr(router, "top_k", None)
    if isinstance(output, tuple) and len(output) == 2 and isinstance(top_k, int):
        # transformers 4's gpt-oss router: softmax over the top-k logits, scattered densely
        top, indices = torch.topk(logits, top_k, dim=-1)
        top = torch.softmax(top, dim=1, dtype=top.dtype)
        dense = torch.zeros_like(logits).scatter_(1, indices, top)
        return _Rerouted((dense.to(output[0].dtype), indices), logits)
    if not isinstance(output, tuple) or len(output) != 3 or not isinstance(top_k, int):
        raise InvalidInputError(
            f"steerlab cannot re-route {type(router).__name__}: it knows routers that return "
            f"logits, (logits, scores, indices) or (scores, indices) and have a top_k"
        )
    scores_dtype = output[1].dtype
    if type(router).__name__ in _TOPK_THEN_SOFTMAX:
        top, indices = torch.topk(logits, top_k, dim=-1)
        scores = torch.softmax(top, dim=1, dtype=top.dtype)
    else:
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top, indices = torch.topk(probs, top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True)
        scores = top
    return (logits, scores.to(scores_dtype), indices)


# --- module outputs: tensor (transformers 5) or tuple (transformers 4, attention, gpt-oss MLP) --
def output_hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output that may be a tensor or a tuple.

    >>> output_hidden((torch.ones(1), None)).tolist()
    [1.0]
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the hidden state in a module output of type {type(output)}")


def replace_output_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced, keeping the container type.

    >>> replace_output_hidden((torch.ones(1), "kept"), torch.zeros(1))[1]
    'kept'
    """
    if isinstance(output, torch.Tensor):
        return hidden
    return (
        type(output)((hidden, *output[1:])) if isinstance(output, tuple) else [hidden, *output[1:]]
    )
