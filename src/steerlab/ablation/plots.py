"""Plots of ablation results: a layer x unit heatmap of score changes.

Diverging colours centred on zero (white): red where ablating a unit raised the metric, blue
where it lowered it. matplotlib is imported only when a plot is drawn.

>>> import pathlib, tempfile, torch
>>> folder = tempfile.TemporaryDirectory()
>>> path = layer_heatmap(pathlib.Path(folder.name, "scan.png"), torch.tensor([[0.5, -1.0]]),
...                      layers=(3,), units=(0, 1), unit_label="head", title="a scan",
...                      value_label="change in loss")
>>> path.read_bytes()[:4] == b"\\x89PNG"
True
>>> folder.cleanup()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["layer_heatmap"]


def layer_heatmap(
    path: str | os.PathLike[str],
    scores: torch.Tensor,
    *,
    layers: Sequence[int],
    units: Sequence[int],
    unit_label: str,
    title: str,
    value_label: str,
) -> Path:
    """Save ``scores`` (``[len(layers), len(units)]``) as a PNG heatmap, one row per layer and
    one column per unit, coloured symmetrically around 0; returns the path (see the module
    example)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = scores.numpy()
    limit = float(abs(data).max()) or 1.0
    fig, ax = plt.subplots(
        figsize=(
            max(3.5, 0.45 * len(units) + 2.5),
            max(3.0, 0.28 * len(layers) + 1.5),
        )
    )
    try:
        image = ax.imshow(data, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(units)), [str(u) for u in units])
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel(unit_label)
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label=value_label)
        fig.tight_layout()
        target = Path(path)
        fig.savefig(target, format="png", dpi=120)
    finally:
        plt.close(fig)
    return target
