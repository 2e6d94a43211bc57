"""Understanding steering vectors: logit lens, cosine similarities, norms and layer scans.

* :func:`logit_lens` — which tokens a direction pushes up and down when read straight through
  the unembedding (the seed's ``lm_head.weight @ v``), optionally through the final norm first.
* :func:`cosine_matrix` — cosine similarity across the layers of one vector, or across vectors.
* :func:`residual_norms` — the typical residual-stream norm per layer, the yardstick for
  strengths "relative to the residual" (``SteeringVector.scaled_to_residual``).
* :func:`scan_layers` — a method at every layer from one extraction pass, with held-out
  separability per layer: the evidence behind "middle-to-late layers often work best".

Every result is a frozen dataclass with ``table()`` (plain text) and ``plot(path)`` (a PNG drawn
with matplotlib's Agg renderer, without touching pyplot's global state).

>>> import torch, steerlab as sl
>>> v = sl.SteeringVector({0: torch.tensor([1.0, 0.0]), 1: torch.tensor([1.0, 1.0])})
>>> round(cosine_matrix(v).matrix[0, 1].item(), 4)
0.7071
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from steerlab.deprecation import renamed_keyword
from steerlab.errors import InvalidInputError, UnsupportedModelError, VectorMismatchError
from steerlab.methods import (
    METHODS,
    extract_activations,
    fit_probe,
    probe_accuracy,
    resolve_inputs,
    run_method,
    split_classes,
)
from steerlab.vectors import SteeringVector, vector_metadata

__all__ = [
    "CosineMatrix",
    "LayerScan",
    "LayerScore",
    "LogitLens",
    "TokenScore",
    "cosine_matrix",
    "logit_lens",
    "plot_norms",
    "residual_norms",
    "scan_layers",
]


# --- plotting -----------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: str | Path) -> Path:
    target = Path(path)
    if not target.parent.is_dir():
        raise InvalidInputError(f"cannot write {target}: folder {target.parent} does not exist")
    fig.savefig(target, format="png", dpi=110)
    return target


def _finite_or_none(value: Any) -> Any:
    """NaN and infinities as ``None``, so results stay valid JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


# --- logit lens ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenScore:
    """One token of a logit-lens list: id, decoded text, and its logit change."""

    token_id: int
    text: str
    value: float

    @property
    def display(self) -> str:
        """``repr`` of the text, so leading spaces and newlines stay visible (``' happy'``)."""
        return repr(self.text)


@dataclasses.dataclass(frozen=True)
class LogitLens:
    """Top boosted and suppressed tokens of one layer's direction, strongest first."""

    layer: int
    through_norm: bool
    boosted: tuple[TokenScore, ...]
    suppressed: tuple[TokenScore, ...]

    def table(self) -> str:
        """Two aligned columns: boosted and suppressed tokens with their values."""
        mode = "through final norm" if self.through_norm else "raw unembedding"
        head = f"logit lens, layer {self.layer} ({mode})"
        width = max([len(t.display) for t in self.boosted] + [7])
        lines = [head, f"  {'boosted':<{width}}  {'value':>9}    {'suppressed':<{width}}  value"]
        for up, down in zip(self.boosted, self.suppressed, strict=True):
            lines.append(
                f"  {up.display:<{width}}  {up.value:>+9.4f}    {down.display:<{width}}  "
                f"{down.value:+.4f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "layer": self.layer,
            "through_norm": self.through_norm,
            "boosted": [dataclasses.asdict(t) for t in self.boosted],
            "suppressed": [dataclasses.asdict(t) for t in self.suppressed],
        }

    def plot(self, path: str | Path) -> Path:
        """Horizontal bar charts of the boosted and suppressed tokens, as a PNG."""
        n = max(len(self.boosted), 1)
        fig = _figure(10, 0.28 * n + 1.4)
        for col, (tokens, colour, title) in enumerate(
            ((self.boosted, "tab:green", "boosted"), (self.suppressed, "tab:red", "suppressed"))
        ):
            ax = fig.add_subplot(1, 2, col + 1)
            labels = [t.display for t in tokens][::-1]
            ax.barh(range(len(tokens)), [t.value for t in tokens][::-1], color=colour)
            ax.set_yticks(range(len(tokens)), labels, fontsize=8)
            ax.set_title(title)
            ax.set_xlabel("logit change")
        mode = "through final norm" if self.through_norm else "raw unembedding"
        fig.suptitle(f"Logit lens of the layer-{self.layer} direction ({mode})")
        return _save(fig, path)


def _decode(tokenizer: Any, token_id: int) -> str:
    text = str(tokenizer.decode([token_id]))
    if "\ufffd" in text or not text:
        # a lone byte of a multi-byte character: the raw token is more informative than U+FFFD
        raw = tokenizer.convert_ids_to_tokens(token_id)
        return str(raw) if raw is not None else text
    return text


def lens_direction(model: Any, direction: torch.Tensor, *, through_norm: bool) -> torch.Tensor:
    """The logit change ``W_U @ v'`` for one direction ``v`` (``Tensor[vocab]``, float32).

    ``through_norm=False``: ``v' = v`` (the seed's ``lm_head.weight @ v``; any output bias is
    left out, it does not depend on ``v``). ``through_norm=True``: ``v' = norm(v) - norm(0)``,
    the model's final norm applied to the vector *alone*. In the model the norm sees the whole
    residual ``x + v``, so this is an approximation that keeps what does not depend on ``x``: the
    norm's per-feature gain (and its mean removal for LayerNorm). Subtracting ``norm(0)`` drops a
    LayerNorm's additive bias, which is the same for every vector. Both the RMSNorm and the
    LayerNorm result are scale-free, so only the direction of ``v`` matters there.

    >>> import torch
    >>> from steerlab.testing import tiny_model
    >>> m = tiny_model("gpt2")
    >>> v = torch.randn(32)
    >>> torch.allclose(lens_direction(m, v, through_norm=False), m.hf_model.lm_head.weight @ v)
    True
    """
    weight = getattr(model.adapter.unembed, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise UnsupportedModelError("the model's unembedding has no 2-D weight matrix")
    if weight.shape[1] != direction.shape[0]:
        raise UnsupportedModelError(
            f"the unembedding reads {weight.shape[1]} features but the residual stream has "
            f"{direction.shape[0]} (a projection sits between them); the logit lens needs the "
            "unembedding to read the residual stream directly"
        )
    v = direction.detach()
    with torch.no_grad():
        if through_norm:
            norm = model.adapter.final_norm
            if norm is None:
                raise UnsupportedModelError(
                    f"steerlab knows no final norm for {model.adapter.model_type!r}; use "
                    "through_norm=False"
                )
            device, dtype = weight.device, weight.dtype
            for param in norm.parameters():
                device, dtype = param.device, param.dtype
                break
            x = v.to(device=device, dtype=dtype)[None, None, :]
            v = (norm(x) - norm(torch.zeros_like(x)))[0, 0]
        return (weight.float() @ v.to(weight.device, torch.float32)).cpu()


def logit_lens(
    model: Any,
    vec: SteeringVector,
    layer: int | None = None,
    k: int = 20,
    *,
    through_norm: bool = False,
) -> LogitLens:
    """Top ``k`` tokens a vector's direction at ``layer`` boosts and suppresses.

    Raw (default): ``lm_head.weight @ vec[layer]``, exactly the seed's analysis. With
    ``through_norm=True`` the direction first passes through the model's final norm on its own
    (see :func:`lens_direction` for why and what that approximates). ``layer`` may be negative
    (resolved against the model) and may be omitted for a single-layer vector. Tokens are
    decoded one by one; :attr:`TokenScore.display` shows them ``repr``-style.

    >>> import torch, steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> vec = sl.SteeringVector({1: model.hf_model.lm_head.weight[20].detach().clone()})
    >>> lens = logit_lens(model, vec, 1, k=3)
    >>> lens.boosted[0].token_id
    20
    """
    if not isinstance(vec, SteeringVector):
        raise InvalidInputError(f"logit_lens needs a SteeringVector, got {type(vec).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k must be a positive int, got {k!r}")
    if layer is None:
        if len(vec) != 1:
            raise InvalidInputError(f"the vector has layers {vec.layers}; say which one (layer=)")
        layer = vec.layers[0]
    resolved = model.adapter.resolve_layer(layer)
    if resolved not in vec:
        raise VectorMismatchError(f"the vector has no direction for layer {resolved}: {vec.layers}")
    if vec.d_model != model.d_model:
        raise VectorMismatchError(
            f"vector size {vec.d_model} does not match the model's d_model {model.d_model}"
        )
    scores = lens_direction(model, vec[resolved], through_norm=through_norm)
    k = min(k, scores.shape[0])
    top = scores.topk(k)
    bottom = scores.topk(k, largest=False)

    def tokens(values: torch.Tensor, ids: torch.Tensor) -> tuple[TokenScore, ...]:
        return tuple(
            TokenScore(int(i), _decode(model.tokenizer, int(i)), float(v))
            for v, i in zip(values, ids, strict=True)
        )

    return LogitLens(
        layer=resolved,
        through_norm=through_norm,
        boosted=tokens(top.values, top.indices),
        suppressed=tokens(bottom.values, bottom.indices),
    )


# --- cosine similarity --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CosineMatrix:
    """Pairwise cosine similarities (``matrix[i, j]``, float64) between labelled directions."""

    labels: tuple[str, ...]
    matrix: torch.Tensor

    def table(self) -> str:
        """The matrix as aligned text."""
        width = max(6, *(len(label) for label in self.labels))
        lines = [" " * width + "".join(f" {label:>{width}}" for label in self.labels)]
        for label, row in zip(self.labels, self.matrix.tolist(), strict=True):
            lines.append(f"{label:>{width}}" + "".join(f" {x:>{width}.3f}" for x in row))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | Path, *, title: str = "Cosine similarity") -> Path:
        """A heatmap PNG (values written in the cells when there are at most 16 rows)."""
        n = len(self.labels)
        size = min(12.0, 1.5 + 0.45 * n)
        fig = _figure(size + 1.2, size)
        ax = fig.add_subplot(1, 1, 1)
        image = ax.imshow(self.matrix.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(n), self.labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), self.labels, fontsize=8)
        if n <= 16:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{self.matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(title)
        return _save(fig, path)


def _cosines(rows: torch.Tensor) -> torch.Tensor:
    norms = rows.norm(dim=1)
    matrix = (rows @ rows.T) / (norms[:, None] * norms[None, :])
    return matrix.clamp(-1.0, 1.0)


def cosine_matrix(
    vectors: SteeringVector | Sequence[SteeringVector] | Mapping[str, SteeringVector],
    *,
    layer: int | None = None,
) -> CosineMatrix:
    """Cosine similarities across the layers of one vector, or across vectors.

    One :class:`SteeringVector`: its layers against each other (labels ``"L<layer>"``).
    Several (a list, or a ``{name: vector}`` mapping): at ``layer`` when given (every vector
    must have it), otherwise every ``(vector, layer)`` direction (labels ``"name@L<layer>"``).
    A zero direction has cosine NaN with everything.

    >>> import torch, steerlab as sl
    >>> a = sl.SteeringVector({3: torch.tensor([1.0, 0.0])})
    >>> b = sl.SteeringVector({3: torch.tensor([-2.0, 0.0])})
    >>> cosine_matrix({"a": a, "b": b}, layer=3).matrix.tolist()
    [[1.0, -1.0], [-1.0, 1.0]]
    """
    if isinstance(vectors, SteeringVector):
        if layer is not None:
            raise InvalidInputError("layer= selects one layer of several vectors, not of one")
        labels = [f"L{k}" for k in vectors.layers]
        rows = [vectors[k] for k in vectors.layers]
    else:
        named = (
            list(vectors.items())
            if isinstance(vectors, Mapping)
            else [(f"v{i}", v) for i, v in enumerate(vectors)]
        )
        if not named:
            raise InvalidInputError("no vectors given")
        for name, vec in named:
            if not isinstance(vec, SteeringVector):
                raise InvalidInputError(f"{name} is a {type(vec).__name__}, not a SteeringVector")
            if vec.d_model != named[0][1].d_model:
                raise VectorMismatchError("all vectors must have the same d_model")
        labels, rows = [], []
        for name, vec in named:
            if layer is not None:
                if layer not in vec:
                    raise VectorMismatchError(f"{name} has no direction for layer {layer}")
                labels.append(str(name))
                rows.append(vec[layer])
            else:
                for k in vec.layers:
                    labels.append(f"{name}@L{k}")
                    rows.append(vec[k])
    matrix = _cosines(torch.stack([r.double().cpu() for r in rows]))
    return CosineMatrix(tuple(labels), matrix)


# --- norms --------------------------------------------------------------------------------------
def residual_norms(
    model: Any,
    prompts: Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    skip_first: bool = True,
    batch_size: int = 16,
    chat: bool = False,
) -> dict[int, float]:
    """Typical residual-stream norm at the output of each layer: ``{layer: mean L2 norm}``.

    The mean of ``‖h‖`` over every token of every prompt. ``skip_first`` (default) leaves out
    each prompt's first token, whose residual is often an outlier tens of times larger than the
    rest (the attention-sink token), unless a prompt has a single token. Use the result with
    :meth:`~steerlab.vectors.SteeringVector.scaled_to_residual` for strengths that mean the
    same at every layer.

    >>> from steerlab.testing import tiny_model
    >>> norms = residual_norms(tiny_model("gpt2"), ["the cat sat", "a dog ran"], layers=[0, 2])
    >>> sorted(norms), all(n > 0 for n in norms.values())
    ([0, 2], True)
    """
    items = list(prompts)
    if isinstance(prompts, str) or not items:
        raise InvalidInputError("residual_norms needs a non-empty list of prompts")
    resolved = model.adapter.resolve_layers(layers)
    totals = dict.fromkeys(resolved, 0.0)
    count = 0
    for start in range(0, len(items), batch_size):
        acts = model.activations(
            items[start : start + batch_size],
            layers=resolved,
            read_at="all",
            batch_size=batch_size,
            chat=chat,
            progress=False,
        )
        for row in range(len(acts[resolved[0]])):
            first = 1 if skip_first and acts[resolved[0]][row].shape[0] > 1 else 0
            count += acts[resolved[0]][row].shape[0] - first
            for layer in resolved:
                totals[layer] += float(acts[layer][row][first:].double().norm(dim=-1).sum())
    return {layer: totals[layer] / count for layer in resolved}


def plot_norms(
    norms: SteeringVector | Mapping[int, float],
    path: str | Path,
    *,
    residual: Mapping[int, float] | None = None,
) -> Path:
    """Norm per layer as a PNG; ``residual`` adds the typical residual norms for scale.

    >>> import tempfile, pathlib, torch, steerlab as sl
    >>> d = tempfile.TemporaryDirectory()
    >>> v = sl.SteeringVector({0: torch.ones(4), 2: torch.ones(4) * 2})
    >>> plot_norms(v, pathlib.Path(d.name, "n.png")).stat().st_size > 0
    True
    >>> d.cleanup()
    """
    values = norms.norms() if isinstance(norms, SteeringVector) else dict(norms)
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(list(values), list(values.values()), marker="o", label="vector norm")
    if residual:
        ax.plot(list(residual), list(residual.values()), marker="s", label="typical residual norm")
        ax.set_yscale("log")
    ax.set_xlabel("layer (output of block L)")
    ax.set_ylabel("L2 norm")
    ax.legend()
    ax.set_title("Norm per layer")
    return _save(fig, path)


# --- layer scan ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerScore:
    """Held-out separability of one layer.

    ``projection_gap``: mean projection of held-out positives minus negatives on the unit
    direction; ``cohens_d``: that gap over the pooled standard deviation (scale-free, comparable
    across layers); ``projection_accuracy``: held-out accuracy of thresholding the projection
    at the midpoint of the training class means; ``pair_accuracy`` (paired data): fraction of
    held-out pairs whose positive projects higher; ``probe_accuracy``: held-out accuracy of a
    logistic-regression probe trained on the same split (``None`` when ``probe=False``).
    """

    layer: int
    norm: float
    projection_gap: float
    cohens_d: float
    projection_accuracy: float
    pair_accuracy: float | None
    probe_accuracy: float | None


_SCAN_METRICS = ("cohens_d", "projection_accuracy", "probe_accuracy", "projection_gap")


@dataclasses.dataclass(frozen=True)
class LayerScan:
    """A method computed at every layer, with held-out separability per layer.

    ``vector`` holds the direction of every scanned layer, computed on the training split only;
    ``scores`` one :class:`LayerScore` per layer in layer order.
    """

    method: str
    positions: str | int
    scores: tuple[LayerScore, ...]
    vector: SteeringVector
    n_train: int
    n_test: int
    test_fraction: float
    seed: int
    model_name: str = ""

    @property
    def layers(self) -> tuple[int, ...]:
        """The scanned layers."""
        return tuple(s.layer for s in self.scores)

    def best_layer(self, metric: str = "cohens_d") -> int:
        """The layer with the highest held-out ``metric`` (ties: the earliest layer).

        ``metric``: ``"cohens_d"`` (default), ``"projection_accuracy"``, ``"probe_accuracy"`` or
        ``"projection_gap"``. Layers where it is undefined (NaN, too few held-out examples) are
        skipped.
        """
        if metric not in _SCAN_METRICS:
            raise InvalidInputError(f"metric must be one of {_SCAN_METRICS}, not {metric!r}")
        best: tuple[float, int] | None = None
        for score in self.scores:
            value = getattr(score, metric)
            if value is None or math.isnan(value):
                continue
            if best is None or value > best[0]:
                best = (value, score.layer)
        if best is None:
            raise InvalidInputError(f"{metric} is undefined at every layer (too few examples?)")
        return best[1]

    def table(self) -> str:
        """One line per layer; the best layer (by Cohen's d) is starred."""
        try:
            best = self.best_layer()
        except InvalidInputError:
            best = -1
        lines = [
            f"layer scan: {self.method} at {self.positions!r}, {self.n_train} train / "
            f"{self.n_test} held-out examples (seed {self.seed})",
            "  layer      norm       gap  cohen_d  proj_acc  pair_acc  probe_acc",
        ]
        for s in self.scores:
            mark = "*" if s.layer == best else " "
            lines.append(
                f"{mark} {s.layer:>5}  {s.norm:>8.3f}  {s.projection_gap:>8.3f}  "
                f"{_fmt(s.cohens_d, 2):>7}  {_fmt(s.projection_accuracy):>8}  "
                f"{_fmt(s.pair_accuracy):>8}  {_fmt(s.probe_accuracy):>9}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (without the vector)."""
        return {
            "method": self.method,
            "positions": self.positions,
            "model_name": self.model_name,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "scores": [
                {k: _finite_or_none(v) for k, v in dataclasses.asdict(s).items()}
                for s in self.scores
            ],
        }

    def plot(self, path: str | Path) -> Path:
        """Separability per layer as a PNG: accuracies (left axis) and Cohen's d (right)."""
        layers = list(self.layers)
        fig = _figure(8, 4.5)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(layers, [s.projection_accuracy for s in self.scores], "o-", label="projection acc")
        if any(s.pair_accuracy is not None for s in self.scores):
            ax.plot(
                layers,
                [math.nan if s.pair_accuracy is None else s.pair_accuracy for s in self.scores],
                "^-",
                label="pair acc",
            )
        if any(s.probe_accuracy is not None for s in self.scores):
            ax.plot(
                layers,
                [math.nan if s.probe_accuracy is None else s.probe_accuracy for s in self.scores],
                "s-",
                label="probe acc",
            )
        ax.set_ylim(0.0, 1.05)
        ax.set_xlabel("layer (output of block L)")
        ax.set_ylabel("held-out accuracy")
        right = ax.twinx()
        right.plot(layers, [s.cohens_d for s in self.scores], "d--", color="tab:red")
        right.set_ylabel("Cohen's d (held-out)", color="tab:red")
        try:
            best = self.best_layer()
            ax.axvline(best, color="grey", linestyle=":", label=f"best layer {best}")
        except InvalidInputError:
            pass
        ax.legend(loc="lower right", fontsize=8)
        name = f" — {self.model_name}" if self.model_name else ""
        ax.set_title(f"Layer scan: {self.method}{name}")
        return _save(fig, path)


def _separability(
    direction: torch.Tensor,
    pos_train: torch.Tensor,
    neg_train: torch.Tensor,
    pos_test: torch.Tensor,
    neg_test: torch.Tensor,
    paired: bool,
) -> tuple[float, float, float, float | None]:
    norm = float(direction.double().norm())
    if norm == 0.0:
        return 0.0, math.nan, math.nan, None
    unit = direction.double() / norm
    train_p, train_n = pos_train.double() @ unit, neg_train.double() @ unit
    test_p, test_n = pos_test.double() @ unit, neg_test.double() @ unit
    gap = float(test_p.mean() - test_n.mean())
    dof = test_p.shape[0] + test_n.shape[0] - 2
    if dof > 0:
        pooled = (
            float((test_p - test_p.mean()).pow(2).sum() + (test_n - test_n.mean()).pow(2).sum())
            / dof
        )
        cohens_d = gap / math.sqrt(pooled) if pooled > 0 else math.copysign(math.inf, gap)
    else:
        cohens_d = math.nan
    threshold = float(train_p.mean() + train_n.mean()) / 2
    correct = int((test_p > threshold).sum()) + int((test_n <= threshold).sum())
    accuracy = correct / (test_p.shape[0] + test_n.shape[0])
    pair_acc = float((test_p > test_n).double().mean()) if paired else None
    return gap, cohens_d, accuracy, pair_acc


def scan_layers(
    model: Any,
    positive: Any,
    negative: Sequence[str] | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    method: str = "mean_diff",
    read_at: str | int | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    paired: bool | None = None,
    probe: bool = True,
    batch_size: int = 16,
    chat: bool = False,
    progress: bool | None = None,
    positions: str | int | None = None,
    **options: Any,
) -> LayerScan:
    """Compute ``method`` at every layer from one extraction pass and score each layer held-out.

    Inputs as in :func:`~steerlab.methods.compute_vector` (``read_at``: where each prompt is
    read, ``"last"`` by default; ``positions=`` is its deprecated name). The examples are split once
    (seeded; pairs stay together), the method runs on the training part of every layer's
    activations, and each direction is scored on the held-out part (:class:`LayerScore`).
    ``probe=True`` also trains a logistic-regression probe per layer on the same split.
    ``result.best_layer()`` picks by held-out Cohen's d; ``result.plot(path)`` draws the curve.

    >>> import steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> pos = ["i love it", "so happy", "great day", "what joy"]
    >>> neg = ["i hate it", "so sad", "awful day", "what pain"]
    >>> scan = scan_layers(tiny_model("llama"), pos, neg, test_fraction=0.5)
    >>> scan.layers, scan.n_test
    ((0, 1, 2), 4)
    """
    positions = renamed_keyword(
        "scan_layers",
        old="positions",
        new="read_at",
        old_value=positions,
        new_value=read_at,
        default="last",
    )
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    inputs = resolve_inputs(positive, negative, paired=paired)
    n_pos, n_neg = len(inputs.positive), len(inputs.negative)
    (pos_train, pos_test), (neg_train, neg_test) = split_classes(
        n_pos, n_neg, paired=inputs.paired, test_fraction=test_fraction, seed=seed
    )
    resolved = model.adapter.resolve_layers(layers)
    acts = extract_activations(
        model,
        inputs.positive + inputs.negative,
        layers=resolved,
        read_at=positions,
        batch_size=batch_size,
        chat=chat,
        progress=progress,
    )
    scores: list[LayerScore] = []
    directions: dict[int, torch.Tensor] = {}
    layer_info: dict[str, Any] = {}
    for layer in resolved:
        pos, neg = acts[layer][:n_pos], acts[layer][n_pos:]
        p_tr, p_te, n_tr, n_te = pos[pos_train], pos[pos_test], neg[neg_train], neg[neg_test]
        result = run_method(method, p_tr, n_tr, paired=inputs.paired, seed=seed, **options)
        gap, cohens_d, accuracy, pair_acc = _separability(
            result.direction, p_tr, n_tr, p_te, n_te, inputs.paired
        )
        probe_acc = None
        if probe:
            probe_acc = probe_accuracy(fit_probe(p_tr, n_tr), p_te, n_te)
        score = LayerScore(
            layer=layer,
            norm=float(result.direction.double().norm()),
            projection_gap=gap,
            cohens_d=cohens_d,
            projection_accuracy=accuracy,
            pair_accuracy=pair_acc,
            probe_accuracy=probe_acc,
        )
        scores.append(score)
        directions[layer] = result.direction
        info = {k: _finite_or_none(v) for k, v in dataclasses.asdict(score).items()}
        del info["layer"]
        layer_info[str(layer)] = {**dict(result.info), **info}
    dataset = dict(inputs.dataset)
    metadata = vector_metadata(
        model,
        method=method,
        positions=positions,
        dataset=dataset,
        chat=chat,
        layer_info=layer_info,
        split={"test_fraction": test_fraction, "seed": seed, "part": "train"},
    )
    return LayerScan(
        method=method,
        positions=positions,
        scores=tuple(scores),
        vector=SteeringVector(directions, metadata=metadata),
        n_train=len(pos_train) + len(neg_train),
        n_test=len(pos_test) + len(neg_test),
        test_fraction=test_fraction,
        seed=seed,
        model_name=str(model.name),
    )
