"""Ablation scans: ablate every head (or component) of every layer and score each.

:func:`ablation_scan` batches many ablations as rows of one forward pass
(:class:`~steerlab.ablation.interventions.MaskedReplacement`) and, on its fast path, re-runs
only the blocks after the ablated layer; the result is an :class:`AblationScan` (table, CSV,
heatmap). Scores come from :mod:`steerlab.scan_metrics`.

>>> from steerlab.testing import tiny_model
>>> scan = ablation_scan(tiny_model("llama"), ["the cat sat on the"], component="mlp",
...                      metric="loss")
>>> scan.unit_name, tuple(scan.scores.shape)
('mlp', (3, 1))
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlab.ablation.interventions import MaskedReplacement
from steerlab.ablation.means import ActivationMeans, absolute_positions
from steerlab.ablation.plots import layer_heatmap
from steerlab.ablation.sites import check_component, check_heads
from steerlab.adapter import ModelAdapter
from steerlab.batch import tile_rows
from steerlab.checks import check_prompts
from steerlab.dispatch import HookSpec, Intervention, activate, count_hooks, scoped_hooks
from steerlab.errors import InvalidInputError
from steerlab.progress import progress_bar
from steerlab.scan_metrics import METRICS, LogitDiff, Loss, Metric
from steerlab.sites import output_hidden

__all__ = ["AblationScan", "ablation_scan"]


@dataclasses.dataclass(frozen=True, eq=False)
class AblationScan:
    """Result of :func:`ablation_scan`.

    ``scores[i, j]`` is the mean over prompts of (metric with unit ``units[j]`` of layer
    ``layers[i]`` ablated) minus (clean metric); ``ablated[i, j, p]`` the metric itself per
    prompt and ``baseline[p]`` the clean metric. Units are heads, or ``(0,)`` for whole
    components.
    """

    scores: torch.Tensor
    ablated: torch.Tensor
    baseline: torch.Tensor
    layers: tuple[int, ...]
    units: tuple[int, ...]
    component: str
    metric: str
    ablation: str
    model_name: str = ""
    path: str = "full"

    @property
    def unit_name(self) -> str:
        """``"head"`` for head scans, else the component name."""
        return "head" if self.component == "head" else self.component

    def rows(self) -> list[dict[str, Any]]:
        """One dict per ablated unit: layer, unit, score (mean change), per-prompt spread."""
        out = []
        for i, layer in enumerate(self.layers):
            for j, unit in enumerate(self.units):
                change = self.ablated[i, j] - self.baseline
                out.append(
                    {
                        "layer": layer,
                        self.unit_name: unit,
                        "score": float(self.scores[i, j]),
                        "std": float(change.std()) if change.numel() > 1 else 0.0,
                        "ablated": float(self.ablated[i, j].mean()),
                    }
                )
        return out

    def top(self, k: int = 10, *, by: str = "abs") -> list[dict[str, Any]]:
        """The ``k`` units with the largest ``|score|`` (``by="abs"``), most negative
        (``"neg"``) or most positive (``"pos"``) score."""
        keys: dict[str, Callable[[dict[str, Any]], float]] = {
            "abs": lambda r: -abs(r["score"]),
            "neg": lambda r: r["score"],
            "pos": lambda r: -r["score"],
        }
        if by not in keys:
            raise InvalidInputError(f"by must be one of {sorted(keys)}, not {by!r}")
        return sorted(self.rows(), key=keys[by])[:k]

    def format(self, top: int | None = 20) -> str:
        """A plain-text table (the ``top`` units by ``|score|``; all with ``None``)."""
        rows = self.rows() if top is None else self.top(top)
        unit = self.unit_name
        lines = [
            f"{self.ablation} ablation of {self.component} units, metric {self.metric} "
            f"(clean mean {float(self.baseline.mean()):.4f})",
            f"{'layer':>5} {unit:>5} {'change':>10} {'std':>9}",
        ]
        for row in rows:
            lines.append(
                f"{row['layer']:>5} {row[unit]:>5} {row['score']:>10.4f} {row['std']:>9.4f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write every unit's row as CSV."""
        import csv

        target = Path(path)
        rows = self.rows()
        with target.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return target

    def heatmap(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """Save a layer x unit heatmap of the scores as PNG (diverging colours, 0 = white).

        >>> import tempfile, pathlib
        >>> from steerlab.testing import tiny_model
        >>> scan = ablation_scan(tiny_model("llama"), ["the cat sat"], metric="logit_diff",
        ...                      target="on")
        >>> d = tempfile.TemporaryDirectory()
        >>> scan.heatmap(pathlib.Path(d.name, "h.png")).stat().st_size > 0
        True
        >>> d.cleanup()
        """
        return layer_heatmap(
            path,
            self.scores,
            layers=self.layers,
            units=self.units,
            unit_label=self.unit_name,
            title=title
            or f"{self.model_name}: {self.ablation} ablation, change in {self.metric}".strip(": "),
            value_label=f"change in {self.metric}",
        )


class _Tail:
    """Re-runs the blocks after a given layer from captured inputs (the scan's fast path).

    A clean forward records each block's call arguments; an ablation at layer ``L`` cannot change
    blocks before ``L``, so only blocks ``L..n-1`` run again, then the final norm and the
    unembedding. The result is checked against the clean forward before it is trusted.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.adapter: ModelAdapter = model.adapter
        self.inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.final_hidden: torch.Tensor | None = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        self.inputs = [((), {})] * self.adapter.n_layers

        def make(layer: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                self.inputs[layer] = (args, dict(kwargs))

            return hook

        def last(module: nn.Module, args: Any, output: Any) -> None:
            self.final_hidden = output_hidden(output)

        specs = [
            HookSpec(self.adapter.block(layer), "forward_pre_kwargs", make(layer))
            for layer in range(self.adapter.n_layers)
        ]
        specs.append(HookSpec(self.adapter.block(-1), "forward", last))
        with scoped_hooks(specs):
            yield

    def head(self, hidden: torch.Tensor, last_only: bool) -> torch.Tensor:
        return self.adapter.logits_from_final_hidden(hidden[:, -1:] if last_only else hidden)

    def run(self, layer: int, copies: int, batch: int, last_only: bool) -> torch.Tensor:
        args, kwargs = self.inputs[layer]
        first = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        hidden = tile_rows(first, copies, batch)
        for index in range(layer, self.adapter.n_layers):
            block_args, block_kwargs = self.inputs[index]
            rest = tile_rows(block_kwargs, copies, batch)
            if "hidden_states" in rest:
                rest["hidden_states"] = hidden
                out = self.adapter.block(index)(*tile_rows(block_args, copies, batch), **rest)
            else:
                out = self.adapter.block(index)(
                    hidden, *tile_rows(block_args[1:], copies, batch), **rest
                )
            hidden = output_hidden(out)
        return self.head(hidden, last_only)


def _resolve_metric(metric: str | Metric, target: Any, foil: Any) -> Metric:
    if isinstance(metric, Metric):
        if target is not None or foil is not None:
            raise InvalidInputError("target/foil belong to the metric object; pass them there")
        return metric
    if metric == "logit_diff":
        if target is None:
            raise InvalidInputError("metric='logit_diff' needs target= (and optionally foil=)")
        return LogitDiff(target, foil)
    if metric == "loss":
        if target is not None or foil is not None:
            raise InvalidInputError("metric='loss' scores the prompts themselves; drop target/foil")
        return Loss()
    raise InvalidInputError(f"unknown metric {metric!r}; use one of {sorted(METRICS)} or a Metric")


def ablation_scan(
    model: Any,
    prompts: Sequence[str],
    *,
    metric: str | Metric = "logit_diff",
    target: Any = None,
    foil: Any = None,
    component: str = "head",
    layers: int | Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    means: ActivationMeans | None = None,
    batch_size: int = 128,
    chat: bool = False,
    fast: bool = True,
    progress: bool | None = None,
) -> AblationScan:
    """Ablate every head (or ``component``) of every layer, one at a time, and score each.

    ``metric`` is ``"logit_diff"`` (``target`` token minus ``foil`` token at each prompt's last
    position), ``"loss"`` (mean next-token loss on the prompts) or a :class:`Metric`. Zero
    ablation by default; pass ``means`` (from :func:`compute_means` with the same component) for
    mean ablation. ``layers``/``heads`` restrict the scan.

    Several ablations run as rows of one batch (up to ``batch_size`` rows: heads x prompts). With
    ``fast`` (default) a clean forward records every block's inputs and each ablation re-runs
    only the blocks from the ablated layer on; this path is verified against the clean forward
    first and falls back to full forward passes when the check fails or other hooks are
    installed. ``scan.path`` says which path ran.

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> scan = ablation_scan(model, ["the cat sat on the", "a dog ran to the"],
    ...                      target="house", foil="road")
    >>> tuple(scan.scores.shape), scan.path
    ((3, 4), 'fast')
    """

    items = check_prompts(prompts)
    check_component(component)
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    scorer = _resolve_metric(metric, target, foil)
    scorer.prepare(model, items)
    adapter: ModelAdapter = model.adapter
    scan_layers = adapter.resolve_layers(layers)
    if component == "head":
        units: tuple[int, ...] = (
            tuple(range(adapter.n_heads)) if heads is None else check_heads(adapter, list(heads))
        )
    else:
        if heads is not None:
            raise InvalidInputError("heads= only applies to component='head'")
        units = (0,)
    if means is not None:
        for layer in scan_layers:
            means.mean(component, layer)  # fail early on a missing site
    n_units = len(units)
    n_prompts = len(items)
    ablated = torch.zeros(len(scan_layers), n_units, n_prompts)
    baseline = torch.zeros(n_prompts)
    use_fast = fast and count_hooks(model.hf_model) == 0 and not getattr(model, "edits", ())
    path_used = "fast" if use_fast else "full"
    chunk = max(1, min(batch_size, n_prompts))
    total = len(scan_layers) * n_units * n_prompts
    bar = progress_bar(total, "ablation scan", progress)
    try:
        for start in range(0, n_prompts, chunk):
            batch = model.encode(items[start : start + chunk], chat=chat)
            rows = batch.input_ids.shape[0]
            prompt_index = torch.arange(start, start + rows)
            per_forward = max(1, batch_size // rows)
            # equal groups: 9 heads in two forwards of 5 and 4 rather than 8 and 1
            per_forward = -(-n_units // -(-n_units // per_forward))
            abs_index = absolute_positions(batch.attention_mask)
            mask = batch.attention_mask.bool()
            tail = _Tail(model) if use_fast else None
            with torch.no_grad():
                clean = _full_logits(model, batch, [], scorer.last_only, tail)
            baseline[start : start + rows] = scorer(clean, batch.input_ids, mask, prompt_index)
            if tail is not None and not _tail_agrees(tail, clean, mask, min(scan_layers), scorer):
                tail = None
                path_used = "full"
            for li, layer in enumerate(scan_layers):
                mean_values = None
                if means is not None:
                    mean_values = _mean_table(means, component, layer, abs_index)
                for u0 in range(0, n_units, per_forward):
                    group = list(range(u0, min(n_units, u0 + per_forward)))
                    copies = len(group)
                    intervention = _scan_intervention(
                        adapter, component, layer, [units[j] for j in group], rows, mean_values
                    )
                    with torch.no_grad():
                        if tail is not None:
                            with activate(adapter, [intervention]):
                                logits = tail.run(layer, copies, rows, scorer.last_only)
                        else:
                            logits = _full_logits(
                                model,
                                _tile_batch(batch, copies),
                                [intervention],
                                scorer.last_only,
                                None,
                            )
                    scores = scorer(
                        logits.float().cpu(),
                        batch.input_ids.repeat(copies, 1),
                        mask.repeat(copies, 1),
                        prompt_index.repeat(copies),
                    )
                    ablated[li, group[0] : group[-1] + 1, start : start + rows] = scores.reshape(
                        copies, rows
                    )
                    bar.update(copies * rows)
    finally:
        bar.close()
    return AblationScan(
        scores=(ablated - baseline).mean(dim=-1),
        ablated=ablated,
        baseline=baseline,
        layers=tuple(scan_layers),
        units=units,
        component=component,
        metric=scorer.name,
        ablation="zero" if means is None else "mean",
        model_name=str(getattr(model, "name", "")),
        path=path_used,
    )


def _tile_batch(batch: Any, copies: int) -> Any:
    if copies == 1:
        return batch
    return dataclasses.replace(
        batch,
        input_ids=batch.input_ids.repeat(copies, 1),
        attention_mask=batch.attention_mask.repeat(copies, 1),
        position_ids=batch.position_ids.repeat(copies, 1),
        prompt_lengths=batch.prompt_lengths.repeat(copies),
    )


def _mean_table(
    means: ActivationMeans, component: str, layer: int, abs_index: torch.Tensor
) -> torch.Tensor:
    """``[rows, seq, width]`` mean values at each token's absolute position."""
    overall = means.mean(component, layer)
    table = means.per_position.get((component, layer))
    out = overall.expand(*abs_index.shape, overall.shape[0])
    if table is None:
        return out
    n = table.shape[0]
    inside = (abs_index >= 0) & (abs_index < n)
    return torch.where(inside[..., None], table[abs_index.clamp(0, n - 1)], out)


def _scan_intervention(
    adapter: ModelAdapter,
    component: str,
    layer: int,
    units: list[int],
    rows: int,
    mean_values: torch.Tensor | None,
) -> Intervention:
    copies = len(units)
    value = None if mean_values is None else mean_values.repeat(copies, 1, 1)
    if component == "head":
        mask = torch.zeros(copies * rows, adapter.n_heads, dtype=torch.bool)
        for k, head in enumerate(units):
            mask[k * rows : (k + 1) * rows, head] = True
    else:
        mask = torch.ones(copies * rows, dtype=torch.bool)
    return MaskedReplacement(layer, component, mask, value)


def _full_logits(
    model: Any,
    batch: Any,
    interventions: list[Intervention],
    last_only: bool,
    tail: _Tail | None,
) -> torch.Tensor:
    extra: dict[str, Any] = {"logits_to_keep": 1} if last_only else {}
    with model.call_scope(batch):
        with activate(model.adapter, interventions) if interventions else contextlib.nullcontext():
            with tail.capture() if tail is not None else contextlib.nullcontext():
                try:
                    out = model.forward_batch(batch, **extra)
                except TypeError:
                    if not extra:
                        raise
                    out = model.forward_batch(batch)
    logits = out.logits
    if last_only:
        logits = logits[:, -1:]
    return logits.float().cpu()


def _tail_agrees(
    tail: _Tail, clean: torch.Tensor, mask: torch.Tensor, layer: int, scorer: Metric
) -> bool:
    """Whether re-running blocks ``layer..`` (batch tiled twice) reproduces the clean logits."""
    rows = clean.shape[0]
    try:
        with torch.no_grad():
            again = tail.run(layer, 2, rows, scorer.last_only).float().cpu()
    except Exception:  # any architecture the generic tail does not fit -> full forwards
        return False
    if again.shape[0] != 2 * rows or again.shape[1:] != clean.shape[1:]:
        return False
    real = mask[:, -clean.shape[1] :]
    reference = clean[real]
    tolerance = 1e-4 * (1.0 + float(reference.abs().max()))
    return all(
        bool((copy[real] - reference).abs().max() <= tolerance)
        for copy in (again[:rows], again[rows:])
    )
