"""Reports of a sweep: PNG plots and one self-contained HTML page.

The plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, so no global
state and no display needed). The HTML page embeds the PNGs as base64 ``data:`` URIs and uses
inline CSS only, so the single file can be mailed or attached as it is; every piece of model
text in it is HTML-escaped.

The functions read results through the small protocols below (:class:`SweepLike`,
:class:`TuneLike`...), which :class:`~steerlab.sweeps.SweepResult` and
:class:`~steerlab.tuning.TuneResult` satisfy: :mod:`steerlab.sweeps` and :mod:`steerlab.tuning`
save their results with this module, so this module imports neither.

>>> import torch
>>> from steerlab.sweeps import SweepResult
>>> result = SweepResult(layers=(0, 1), strengths=(0.0, 1.0),
...     behaviour_scores=torch.tensor([[[0.0], [1.0]], [[0.0], [2.0]]]),
...     damage_scores=torch.tensor([[[0.0], [0.1]], [[0.0], [0.3]]]),
...     behaviour_metric="logprob_diff", damage_metric="kl", mode="prefix", seconds=0.0)
>>> png = curves_png(result, max_damage=0.2)
>>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = [
    "ExampleLike",
    "HeldOutLike",
    "PointLike",
    "SweepLike",
    "TuneLike",
    "curves_png",
    "heatmap_png",
    "render_html",
    "write_report",
]


# --- what a report reads -------------------------------------------------------------------------
class PointLike(Protocol):
    """One (layer, strength) of a sweep (:class:`~steerlab.sweeps.SweepPoint`)."""

    @property
    def layer(self) -> int: ...
    @property
    def strength(self) -> float: ...
    @property
    def behaviour(self) -> float: ...
    @property
    def shift(self) -> float: ...
    @property
    def damage(self) -> float: ...


class SweepLike(Protocol):
    """A layer × strength sweep (:class:`~steerlab.sweeps.SweepResult`)."""

    @property
    def layers(self) -> tuple[int, ...]: ...
    @property
    def strengths(self) -> tuple[float, ...]: ...
    @property
    def behaviour_metric(self) -> str: ...
    @property
    def damage_metric(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def seconds(self) -> float: ...
    @property
    def baseline(self) -> float: ...
    def point(self, layer: int, strength: float) -> PointLike: ...
    def grid(self, field: str = ...) -> torch.Tensor: ...
    def recommend(self, *, max_damage: float) -> PointLike: ...


class HeldOutLike(Protocol):
    """The held-out check of a recommendation (:class:`~steerlab.tuning.HeldOutResult`)."""

    @property
    def baseline(self) -> float: ...
    @property
    def steered(self) -> float: ...
    @property
    def shift(self) -> float: ...
    @property
    def shift_sem(self) -> float: ...
    @property
    def damage(self) -> float: ...
    @property
    def n_damage_prompts(self) -> int: ...
    @property
    def generation(self) -> Mapping[str, tuple[float, float]]: ...


class ExampleLike(Protocol):
    """A held-out prompt with its two continuations (:class:`~steerlab.tuning.Example`)."""

    @property
    def prompt(self) -> str: ...
    @property
    def baseline(self) -> str: ...
    @property
    def steered(self) -> str: ...


class TuneLike(Protocol):
    """A tuning run (:class:`~steerlab.tuning.TuneResult`)."""

    @property
    def sweep(self) -> SweepLike: ...
    @property
    def recommended_point(self) -> PointLike: ...
    @property
    def heldout(self) -> HeldOutLike: ...
    @property
    def examples(self) -> Sequence[ExampleLike]: ...
    @property
    def settings(self) -> Mapping[str, Any]: ...
    @property
    def dataset_name(self) -> str: ...
    @property
    def model_name(self) -> str: ...
    @property
    def max_kl(self) -> float: ...
    @property
    def seconds(self) -> float: ...


# --- plots ---------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def curves_png(
    result: SweepLike,
    *,
    max_damage: float | None = None,
    recommended: PointLike | None = None,
) -> bytes:
    """PNG: behaviour shift vs strength (left) and damage vs strength (right), one line a layer.

    The budget is a dashed line on the damage panel; the recommended point is a star.
    """
    from matplotlib import colormaps

    if recommended is None and max_damage is not None:
        recommended = result.recommend(max_damage=max_damage)
    figure = _figure(11.0, 4.2)
    left, right = figure.subplots(1, 2)
    cmap = colormaps["viridis"]
    shift, damage = result.grid("shift"), result.grid("damage")
    strengths = list(result.strengths)
    for i, layer in enumerate(result.layers):
        colour = cmap(i / max(1, len(result.layers) - 1))
        left.plot(strengths, shift[i].tolist(), marker="o", color=colour, label=f"layer {layer}")
        right.plot(strengths, damage[i].tolist(), marker="o", color=colour)
    if recommended is not None:
        for axis, value in ((left, recommended.shift), (right, recommended.damage)):
            axis.plot(
                [recommended.strength], [value], marker="*", markersize=16, color="crimson",
                linestyle="none", label="recommended" if axis is left else None, zorder=5,
            )  # fmt: skip
    if max_damage is not None:
        right.axhline(max_damage, linestyle="--", color="crimson", label=f"budget {max_damage:g}")
        right.legend(fontsize=8)
    left.axhline(0.0, color="grey", linewidth=0.8)
    left.set(xlabel="strength", ylabel=f"behaviour shift ({result.behaviour_metric})")
    right.set(xlabel="strength", ylabel=f"damage ({result.damage_metric})")
    left.set_title("behaviour vs strength")
    right.set_title("damage vs strength")
    left.legend(fontsize=8, ncol=2)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def heatmap_png(
    result: SweepLike,
    *,
    max_damage: float | None = None,
    recommended: PointLike | None = None,
) -> bytes:
    """PNG: layer × strength heatmap of the behaviour shift, damage printed in each cell.

    Cells over the damage budget are hatched; the recommended cell is outlined.
    """
    from matplotlib.patches import Rectangle

    if recommended is None and max_damage is not None:
        recommended = result.recommend(max_damage=max_damage)
    shift, damage = result.grid("shift"), result.grid("damage")
    n_layers, n_strengths = shift.shape
    figure = _figure(1.6 + 1.0 * n_strengths, 1.2 + 0.55 * n_layers)
    axis = figure.subplots()
    limit = float(shift.abs().max()) or 1.0
    image = axis.imshow(
        shift.numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto", origin="lower"
    )
    figure.colorbar(image, ax=axis, label=f"behaviour shift ({result.behaviour_metric})")
    for i in range(n_layers):
        for j in range(n_strengths):
            over = max_damage is not None and float(damage[i, j]) > max_damage
            if over:
                axis.add_patch(
                    Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                              edgecolor="grey", linewidth=0)
                )  # fmt: skip
            dark = abs(float(shift[i, j])) > 0.6 * limit  # white text on saturated cells
            axis.text(
                j, i, f"{float(shift[i, j]):+.2f}\nKL {float(damage[i, j]):.2f}",
                ha="center", va="center", fontsize=7, color="white" if dark else "black",
            )  # fmt: skip
    if recommended is not None:
        i = result.layers.index(recommended.layer)
        j = result.strengths.index(recommended.strength)
        axis.add_patch(
            Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="crimson", linewidth=2.5)
        )
    axis.set_xticks(range(n_strengths), [f"{s:g}" for s in result.strengths])
    axis.set_yticks(range(n_layers), [str(layer) for layer in result.layers])
    axis.set(xlabel="strength", ylabel="layer")
    title = "behaviour shift by layer and strength"
    if max_damage is not None:
        title += f" (hatched: KL > {max_damage:g})"
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return _png(figure)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.3em .6em;
vertical-align:top}th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.over{color:#999}.best{background:#ffe3e3;font-weight:bold}img{max-width:100%}
.gen td{white-space:pre-wrap;width:33%}.muted{color:#666;font-size:.9em}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _describe(metric: str) -> str:
    from steerlab.evaluation import METRICS

    known = METRICS.get(metric)
    return f"{metric}: {known.description}" if known is not None else metric


def render_html(result: TuneLike, *, images: dict[str, bytes] | None = None) -> str:
    """The report page as one HTML string (plots embedded; computed if ``images`` is None)."""
    esc = html.escape
    sweep = result.sweep
    best = result.recommended_point
    held = result.heldout
    if images is None:
        images = {
            "curves": curves_png(sweep, max_damage=result.max_kl, recommended=best),
            "heatmap": heatmap_png(sweep, max_damage=result.max_kl, recommended=best),
        }
    s = result.settings
    head = ["layer"] + [f"s = {v:g}" for v in sweep.strengths]
    rows = []
    for layer in sweep.layers:
        cells = [f"<th>{layer}</th>"]
        for strength in sweep.strengths:
            p = sweep.point(layer, strength)
            cls = "num"
            if (p.layer, p.strength) == (best.layer, best.strength):
                cls += " best"
            elif p.damage > result.max_kl:
                cls += " over"
            cells.append(
                f'<td class="{cls}">{p.shift:+.3f}<br><span class="muted">KL '
                f"{p.damage:.3f}</span></td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    sweep_table = (
        "<table><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    held_rows = [
        ("behaviour, unsteered", f"{held.baseline:.4f}"),
        ("behaviour, steered", f"{held.steered:.4f}"),
        ("shift (± s.e.m.)", f"{held.shift:+.4f} ± {held.shift_sem:.4f}"),
        (f"KL(unsteered ‖ steered) on {held.n_damage_prompts} prompts", f"{held.damage:.4f}"),
    ]
    for name, (a, b) in held.generation.items():
        held_rows.append((f"{name} of generations (unsteered → steered)", f"{a:.3f} → {b:.3f}"))
    held_table = "<table>" + "".join(
        f'<tr><th>{esc(k)}</th><td class="num">{esc(v)}</td></tr>' for k, v in held_rows
    ) + "</table>"  # fmt: skip
    examples = "".join(
        f"<tr><td>{esc(e.prompt)}</td><td>{esc(e.baseline)}</td><td>{esc(e.steered)}</td></tr>"
        for e in result.examples
    )
    example_table = (
        '<table class="gen"><tr><th>held-out prompt</th><th>unsteered</th>'
        f"<th>steered (layer {best.layer}, strength {best.strength:g})</th></tr>"
        f"{examples}</table>"
        if result.examples
        else '<p class="muted">no example generations were requested</p>'
    )
    settings = esc(json.dumps(dict(s), indent=2, default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>steerlab sweep: {esc(result.dataset_name)}</title><style>{_CSS}</style></head><body>
<h1>steerlab sweep: {esc(result.dataset_name)} on {esc(result.model_name)}</h1>
<p>Recommended: <b>layer {best.layer}, strength {best.strength:g}</b>: the highest train
behaviour ({esc(sweep.behaviour_metric)}) whose mean KL(unsteered ‖ steered) stays within
<b>{result.max_kl:g}</b> nats. Train: behaviour {sweep.baseline:.3f} → {best.behaviour:.3f}
(shift {best.shift:+.3f}), KL {best.damage:.3f}.</p>
<p class="muted">Vector ({esc(str(s.get("method")))}) from {s.get("n_train_pairs")} train pairs;
tuned on {s.get("n_train_prompts")} prompts; validated on {s.get("n_test_prompts")} held-out
prompts (seed {s.get("seed")}, test fraction {s.get("test_fraction")}). Sweep mode
{esc(sweep.mode)}, {sweep.seconds:.1f} s; total {result.seconds:.1f} s.</p>
<p class="muted">{esc(_describe(sweep.behaviour_metric))}</p>
<h2>Held-out validation</h2>
<p class="muted">Prompts that neither the vector nor the choice of layer and strength saw.</p>
{held_table}
<h2>Example generations (held-out prompts)</h2>
{example_table}
<h2>Behaviour and damage vs strength</h2>
{_img(images["curves"], "behaviour and damage vs strength, one line per layer")}
<h2>Layer × strength</h2>
{_img(images["heatmap"], "layer by strength heatmap of the behaviour shift")}
<h2>Every point (train split)</h2>
<p class="muted">Behaviour shift vs strength 0; grey: over the KL budget; red: recommended.</p>
{sweep_table}
<h2>Settings</h2>
<pre>{settings}</pre>
</body></html>
"""


def write_report(result: TuneLike, directory: str | Path) -> dict[str, Path]:
    """Write ``curves.png``, ``heatmap.png`` and ``report.html`` into ``directory``.

    Returns ``{"curves", "heatmap", "html"}`` → paths; the HTML embeds the same images.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    best = result.recommended_point
    images = {
        "curves": curves_png(result.sweep, max_damage=result.max_kl, recommended=best),
        "heatmap": heatmap_png(result.sweep, max_damage=result.max_kl, recommended=best),
    }
    paths = {"curves": folder / "curves.png", "heatmap": folder / "heatmap.png"}
    for key, path in paths.items():
        path.write_bytes(images[key])
    paths["html"] = folder / "report.html"
    paths["html"].write_text(render_html(result, images=images), encoding="utf-8")
    return paths
