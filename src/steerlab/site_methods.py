"""Methods for the sites inside a block: per-head probes and ITI, expert attribution.

* :func:`head_probes` reads every head's output (site ``"head"``) on a contrast set, fits a
  logistic probe per (layer, head) on a seeded split and scores it on the held-out rest; each
  head's direction is the mean difference of its output (ITI's "mass mean shift").
* :func:`iti_vector` keeps the ``k`` heads whose probes are most accurate (inference-time
  intervention): a ``site="head"`` vector that adds each chosen head's direction to its output.
* :func:`expert_attribution` counts how often a mixture of experts' router sends the positive
  and the negative prompts' tokens to each expert; its :meth:`ExpertAttribution.router_vector`
  is a ``site="router"`` bias towards the experts the positive set uses more.

(Mean difference at ``"attn_out"``/``"mlp_out"`` is :func:`steerlab.mean_diff` with ``site=``.)

>>> from steerlab.testing import tiny_model
>>> model = tiny_model("qwen3")
>>> pos, neg = ["i love it", "so happy", "great day"], ["i hate it", "so sad", "awful day"]
>>> vec = iti_vector(model, pos, neg, k=2, layers=[1, 2], test_fraction=0.34)
>>> vec.site, sum(len(h) for h in vec.metadata["heads"].values())
('head', 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from steerlab.errors import InvalidInputError
from steerlab.methods import fit_probe, probe_accuracy, resolve_inputs, split_classes
from steerlab.sites import router_top_k
from steerlab.vectors import SteeringVector, vector_metadata

__all__ = [
    "ExpertAttribution",
    "HeadProbes",
    "expert_attribution",
    "head_probes",
    "iti_vector",
]


@dataclasses.dataclass(frozen=True)
class HeadProbes:
    """Per-head probe accuracy (held out) and mean-difference direction, keyed ``(layer, head)``.

    >>> import torch
    >>> hp = HeadProbes({(1, 0): 0.5, (1, 2): 1.0}, {(1, 0): torch.ones(2), (1, 2): torch.ones(2)})
    >>> hp.top(1)
    [(1, 2)]
    """

    accuracy: Mapping[tuple[int, int], float]
    directions: Mapping[tuple[int, int], torch.Tensor]

    def top(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` most accurate heads, best first (ties: lower layer, then lower head)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"k must be a positive int, got {k!r}")
        ranked = sorted(self.accuracy, key=lambda key: (-self.accuracy[key], key))
        return ranked[:k]


def head_probes(
    model: Any,
    positive: Any,
    negative: Sequence[str] | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    positions: str | int = "last",
    test_fraction: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
    batch_size: int = 16,
) -> HeadProbes:
    """Fit one logistic probe per (layer, head) on the heads' outputs and score it held out.

    The split is seeded (pairs stay on one side, as in the ``probe`` method); a head's
    direction is ``mean(positive) - mean(negative)`` of its ``head_dim`` slice over every row.

    >>> from steerlab.testing import tiny_model
    >>> hp = head_probes(tiny_model("llama"), ["i love it", "so good"], ["i hate it", "so bad"],
    ...                  layers=[1], test_fraction=0.5)
    >>> sorted(hp.accuracy)[:2], hp.directions[(1, 0)].shape[0]
    ([(1, 0), (1, 1)], 8)
    """
    inputs = resolve_inputs(positive, negative)
    adapter = model.adapter
    resolved = adapter.resolve_layers(layers)
    n_pos, n_neg = len(inputs.positive), len(inputs.negative)
    (pos_train, pos_test), (neg_train, neg_test) = split_classes(
        n_pos, n_neg, paired=inputs.paired, test_fraction=test_fraction, seed=seed
    )
    acts = model.activations(
        list(inputs.positive + inputs.negative),
        layers=resolved,
        read_at=positions,
        batch_size=batch_size,
        site="head",
        progress=False,
    )
    accuracy: dict[tuple[int, int], float] = {}
    directions: dict[tuple[int, int], torch.Tensor] = {}
    width = adapter.head_dim
    for layer in resolved:
        per_head = acts[layer].reshape(-1, adapter.n_heads, width)
        for head in range(adapter.n_heads):
            pos, neg = per_head[:n_pos, head], per_head[n_pos:, head]
            probe = fit_probe(pos[pos_train], neg[neg_train], C=C)
            accuracy[(layer, head)] = probe_accuracy(probe, pos[pos_test], neg[neg_test])
            directions[(layer, head)] = pos.double().mean(0).float() - neg.double().mean(0).float()
    return HeadProbes(accuracy, directions)


def iti_vector(
    model: Any,
    positive: Any,
    negative: Sequence[str] | None = None,
    *,
    k: int = 8,
    layers: int | Sequence[int] | None = None,
    positions: str | int = "last",
    test_fraction: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
    batch_size: int = 16,
) -> SteeringVector:
    """Inference-time intervention: a ``site="head"`` vector over the ``k`` heads (across
    ``layers``) whose held-out probe accuracy is highest, each adding its mean difference.

    Metadata: ``heads`` (``{"<layer>": [heads]}``) and ``layer_info`` with every chosen
    head's accuracy. Steer with it like any vector; ``strength`` scales every head alike.
    """
    probes = head_probes(
        model,
        positive,
        negative,
        layers=layers,
        positions=positions,
        test_fraction=test_fraction,
        seed=seed,
        C=C,
        batch_size=batch_size,
    )
    chosen = probes.top(k)
    adapter = model.adapter
    width = adapter.n_heads * adapter.head_dim
    directions: dict[int, torch.Tensor] = {}
    heads: dict[str, list[int]] = {}
    info: dict[str, dict[str, float]] = {}
    for layer, head in sorted(chosen):
        direction = directions.setdefault(layer, torch.zeros(width))
        cols = slice(head * adapter.head_dim, (head + 1) * adapter.head_dim)
        direction[cols] = probes.directions[(layer, head)]
        heads.setdefault(str(layer), []).append(head)
        info.setdefault(str(layer), {})[f"head_{head}_heldout_accuracy"] = probes.accuracy[
            (layer, head)
        ]
    inputs = resolve_inputs(positive, negative)
    metadata = vector_metadata(
        model,
        method="iti",
        positions=positions,
        dataset=inputs.dataset,
        site="head",
        heads=heads,
        layer_info=info,
        method_options={"k": k, "test_fraction": test_fraction, "seed": seed, "C": C},
    )
    return SteeringVector(directions, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ExpertAttribution:
    """How often each expert is picked, per layer, for the positive and negative tokens, and
    the mean router logits of each set.

    ``positive[L][e]``: fraction of the positive prompts' tokens whose top-k experts at layer
    ``L`` include ``e``; ``difference = positive - negative``.
    """

    positive: Mapping[int, torch.Tensor]
    negative: Mapping[int, torch.Tensor]
    logits_positive: Mapping[int, torch.Tensor]
    logits_negative: Mapping[int, torch.Tensor]
    metadata: Mapping[str, Any]

    @property
    def difference(self) -> dict[int, torch.Tensor]:
        """``positive - negative`` routing frequency per layer and expert."""
        return {layer: self.positive[layer] - self.negative[layer] for layer in self.positive}

    def router_vector(self, *, top: int | None = None) -> SteeringVector:
        """A ``site="router"`` vector: per layer, the mean router-logit difference (positive
        minus negative), kept only on the ``top`` experts whose routing frequency differs most
        (all experts when ``top`` is ``None``). At strength 1 it moves the negative tokens'
        mean logits of those experts onto the positive ones'.

        >>> import torch
        >>> a = ExpertAttribution({0: torch.tensor([0.5, 0.1])}, {0: torch.tensor([0.5, 0.8])},
        ...     {0: torch.tensor([1.0, 0.0])}, {0: torch.tensor([0.0, 0.5])}, {})
        >>> a.router_vector(top=1)[0].tolist()
        [0.0, -0.5]
        """
        directions = {}
        for layer, diff in self.difference.items():
            shift = self.logits_positive[layer] - self.logits_negative[layer]
            if top is not None:
                if isinstance(top, bool) or not isinstance(top, int) or top < 1:
                    raise InvalidInputError(f"top must be a positive int, got {top!r}")
                keep = torch.zeros_like(shift, dtype=torch.bool)
                keep[diff.abs().topk(min(top, diff.numel())).indices] = True
                shift = torch.where(keep, shift, torch.zeros_like(shift))
            directions[layer] = shift
        meta = {**self.metadata, "method": "expert_attribution", "site": "router", "top": top}
        return SteeringVector(directions, metadata=meta)


def expert_attribution(
    model: Any,
    positive: Any,
    negative: Sequence[str] | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 16,
) -> ExpertAttribution:
    """Which experts each side of a contrast set is routed to, over every prompt token.

    A token's experts are the ``top_k`` largest router logits (the order softmax keeps).

    >>> from steerlab.testing import tiny_model
    >>> att = expert_attribution(tiny_model("mixtral"), ["i love it"], ["i hate it"], layers=[1])
    >>> round(float(att.positive[1].sum()), 6)  # two experts per token
    2.0
    """
    inputs = resolve_inputs(positive, negative)
    adapter = model.adapter
    resolved = adapter.resolve_layers(layers)
    n_pos = len(inputs.positive)
    acts = model.activations(
        list(inputs.positive + inputs.negative),
        layers=resolved,
        read_at="all",
        batch_size=batch_size,
        site="router",
        progress=False,
    )
    freq: dict[str, dict[int, torch.Tensor]] = {"pos": {}, "neg": {}}
    means: dict[str, dict[int, torch.Tensor]] = {"pos": {}, "neg": {}}
    for layer in resolved:
        k = router_top_k(adapter, layer)
        for side, rows in (("pos", acts[layer][:n_pos]), ("neg", acts[layer][n_pos:])):
            logits = torch.cat(list(rows))
            picked = torch.zeros_like(logits)
            picked.scatter_(1, logits.topk(k, dim=-1).indices, 1.0)
            freq[side][layer] = picked.double().mean(0).float()
            means[side][layer] = logits.double().mean(0).float()
    metadata = vector_metadata(model, method="expert_attribution", dataset=inputs.dataset)
    return ExpertAttribution(freq["pos"], freq["neg"], means["pos"], means["neg"], metadata)
