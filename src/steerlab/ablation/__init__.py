"""Ablation: zero, mean and directional ablation, activation means, and ablation scans.

Ablating a component means replacing what it computes and asking how much the model's behaviour
depends on it. The *sites* ("components") of decoder block ``L`` are:

===========  ==================================================================================
component    the activation that is replaced
===========  ==================================================================================
``block``    the block's output: the residual stream at layer ``L``
``attn``     the attention module's output (what attention contributes; before a Gemma-style
             post-attention norm)
``mlp``      the MLP's output (OPT: ``fc2``)
``head``     one or more attention heads: head ``h`` is the slice ``[h*head_dim:(h+1)*head_dim]``
             of the *input* of the attention output projection (``o_proj``, GPT-2's
             ``c_proj``, ``dense``, ``out_proj``). That projection is linear,
             ``o_proj(x) = sum_h W_O[:, h] x_h (+ b)``, so zeroing ``x_h`` removes exactly head
             ``h``'s contribution. Its input is ``n_heads * head_dim`` wide whatever the number of
             key/value heads, so grouped-query models work the same way.
===========  ==================================================================================

* :class:`ZeroAblation` replaces the activation with zeros (the seed's head ablation).
* :class:`MeanAblation` replaces it with its mean over calibration prompts, per absolute token
  position (prompt start = 0) or averaged over positions: less disruptive than zeros because
  the model never sees an out-of-distribution activation. :func:`compute_means` streams the
  prompts batch by batch (memory holds sums, never activations) and caches the result on disk.
* :class:`ReplaceActivation` puts any stored activation there (activation patching; the seed's
  "replace the layer output with a stored activation" edit).
* :class:`DirectionalAblation` removes the component along a unit direction ``u``:
  ``h <- h - (h . u) u``, either from the residual stream at chosen layers or from the output of
  every module that writes to it (the "refusal direction" recipe; what
  :func:`steerlab.editing.bake` turns into orthogonalized weights).

All of them are :class:`~steerlab.interventions.Intervention` objects: pass them as
``steering=`` to ``logits``/``generate``/``activations``, install them with ``model.steer(...)``
or make them permanent with ``model.edit(...)``. ``rows`` (a boolean per batch row) restricts an
ablation to some rows of each forward batch, so many configurations share one forward pass.

:func:`ablation_scan` ablates every head of every layer (or chosen ones, or whole components)
and scores each by the change in a metric (target-token logit difference, or loss), batching
many ablations as rows of one forward pass and re-running only the blocks after the ablated one.

The package is split by concept; this module re-exports the public names of each:

* :mod:`steerlab.ablation.sites`: the components and how to find them in a model;
* :mod:`steerlab.ablation.means`: :class:`ActivationMeans` and :func:`compute_means`;
* :mod:`steerlab.ablation.interventions`: the ablation interventions above;
* :mod:`steerlab.scan_metrics`: the metrics a scan scores by (:class:`LogitDiff`, :class:`Loss`);
* :mod:`steerlab.ablation.scan`: :func:`ablation_scan` and :class:`AblationScan`;
* :mod:`steerlab.ablation.plots`: the scan's heatmap.

>>> import torch, steerlab as sl
>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> clean = model.logits(["the cat sat"])
>>> ablated = model.logits(["the cat sat"], steering=ZeroAblation(1, component="head", head=2))
>>> bool((clean[0, -1] != ablated[0, -1]).any())
True
"""

from steerlab.ablation.interventions import (
    DirectionalAblation,
    MeanAblation,
    ReplaceActivation,
    RowsSpec,
    ZeroAblation,
)
from steerlab.ablation.means import MEANS_FORMAT, ActivationMeans, compute_means
from steerlab.ablation.scan import AblationScan, ablation_scan
from steerlab.ablation.sites import COMPONENTS, residual_writers
from steerlab.scan_metrics import METRICS, LogitDiff, Loss, Metric

__all__ = [
    "COMPONENTS",
    "MEANS_FORMAT",
    "METRICS",
    "AblationScan",
    "ActivationMeans",
    "DirectionalAblation",
    "LogitDiff",
    "Loss",
    "MeanAblation",
    "Metric",
    "ReplaceActivation",
    "RowsSpec",
    "ZeroAblation",
    "ablation_scan",
    "compute_means",
    "residual_writers",
]
