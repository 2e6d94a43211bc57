"""Conditional steering: steer only where a condition probe fires (CAST, arXiv 2409.05907).

A :class:`Condition` is a direction ``c`` read at one layer ``A`` (the residual stream after
block ``A``), a threshold and a comparison. Its score for a hidden state ``h`` is CAST's
similarity between ``h`` and the squashed projection of ``h`` onto ``c``::

    score(h) = cos(h, tanh(P h)),    P = c cᵀ / (cᵀ c)

(``tanh`` elementwise). The condition *fires* when ``score > threshold`` (``comparison=
"greater"``; CAST calls this ``"smaller"``: the threshold is the smaller side) or ``score <
threshold`` (``"less"``, CAST's ``"larger"``).

Two scopes:

* ``scope="prompt"`` (CAST): ``h`` is the mean of the prompt's hidden states at layer ``A``;
  a row whose prompt satisfies the condition is steered at every selected token of the call,
  other rows are left bit-identical to an unsteered run of the same batch;
* ``scope="token"`` (:meth:`Condition.per_token`): each token's own hidden state at layer
  ``A`` decides whether that token is steered, at every steering layer ``B >= A``.

The condition is read inside the same forward pass (before this steering's own edit at layer
``A``), so it gates steering at layers ``>= A`` only; steering below ``A`` is refused.

:func:`fit_condition` learns a condition as CAST does: a direction per candidate layer from the
positive and negative prompts (PCA of the centred activations by default), then a grid search
over layer × threshold × comparison for the best F1 on a train split; it reports the held-out
accuracy. Conditions are saved like vectors: safetensors with string metadata and a SHA-256
checksum of the tensor and the metadata, verified on load.

>>> import steerlab as sl
>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> pos = ["the cat sat on the mat", "a cat and a cat", "cat cat cat", "my cat is here"]
>>> neg = ["go go go now", "a dog ran far", "we go to the park", "now we go"]
>>> cond = sl.fit_condition(model, pos, neg, layers=[0, 1], thresholds=[i / 50 for i in range(50)])
>>> cond.layer in (0, 1), 0.0 <= cond.metadata["heldout_accuracy"] <= 1.0
(True, True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlab.checks import check_prompt_list
from steerlab.errors import (
    InvalidInputError,
    VectorFileError,
    VectorMismatchError,
)
from steerlab.files import CHECKSUM_KEY, check_file_checksum, read_safetensors, save_safetensors
from steerlab.identity import model_identity
from steerlab.methods import run_method, split_classes
from steerlab.sites import output_hidden

__all__ = [
    "COMPARISONS",
    "CONDITION_FORMAT",
    "Condition",
    "condition_score",
    "fit_condition",
]

COMPARISONS = ("greater", "less")
SCOPES = ("prompt", "token")
CONDITION_FORMAT = "steerlab.condition"
_SCHEMA_VERSION = "2"  # 2: the checksum is steerlab.files.file_checksum (1 still loads)
CAST_THRESHOLDS: tuple[float, ...] = tuple(i / 100 for i in range(100))
"""CAST's threshold grid: 0.00, 0.01, ..., 0.99."""


def condition_score(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """CAST's similarity ``cos(h, tanh(P h))`` for every row of ``hidden`` ``[..., d_model]``.

    >>> import torch
    >>> condition_score(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([1.0, 0.0])).tolist()
    [1.0, 0.0]
    """
    h = hidden.double()
    c = direction.double().to(h.device)
    coef = (h @ c) / (c @ c)
    projected = torch.tanh(coef[..., None] * c)
    num = (h * projected).sum(dim=-1)
    den = h.norm(dim=-1) * projected.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).float()


@dataclasses.dataclass(frozen=True, eq=False)
class Condition:
    """A probe that decides where steering applies (see the module docstring).

    ``direction`` is ``c`` (``[d_model]``), ``layer`` the block whose output is read,
    ``threshold``/``comparison`` when it fires, ``scope`` ``"prompt"`` or ``"token"``.

    >>> import torch
    >>> cond = Condition(torch.tensor([1.0, 0.0]), layer=0, threshold=0.5)
    >>> cond.test(torch.tensor([0.2, 0.9])).tolist()
    [False, True]
    """

    direction: torch.Tensor
    layer: int
    threshold: float
    comparison: str = "greater"
    scope: str = "prompt"
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.direction, torch.Tensor) or self.direction.ndim != 1:
            raise VectorMismatchError("a condition's direction must be a 1-D tensor [d_model]")
        if not torch.is_floating_point(self.direction) or not bool(
            torch.isfinite(self.direction).all()
        ):
            raise VectorMismatchError("a condition's direction must be finite floating point")
        if float(self.direction.double().norm()) == 0.0:
            raise VectorMismatchError("a condition's direction must not be zero")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise InvalidInputError(f"a condition's layer must be a non-negative int: {self.layer}")
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not math.isfinite(self.threshold)
        ):
            raise InvalidInputError(f"threshold must be a finite number, got {self.threshold!r}")
        if self.comparison not in COMPARISONS:
            raise InvalidInputError(
                f"comparison must be one of {COMPARISONS}, not {self.comparison!r}"
            )
        if self.scope not in SCOPES:
            raise InvalidInputError(f"scope must be one of {SCOPES}, not {self.scope!r}")
        object.__setattr__(self, "direction", self.direction.detach().float().clone())
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "metadata", json.loads(json.dumps(dict(self.metadata))))

    # --- variants ---------------------------------------------------------------------------
    def per_token(self) -> Condition:
        """The same probe deciding token by token (a token-level gate)."""
        return dataclasses.replace(self, scope="token")

    def per_prompt(self) -> Condition:
        """The same probe deciding once per prompt (CAST)."""
        return dataclasses.replace(self, scope="prompt")

    # --- evaluation --------------------------------------------------------------------------
    def test(self, scores: torch.Tensor) -> torch.Tensor:
        """Where ``scores`` make the condition fire."""
        if self.comparison == "greater":
            return scores > self.threshold
        return scores < self.threshold

    def scores(
        self, model: Any, prompts: Sequence[str] | str, *, chat: bool = False
    ) -> torch.Tensor:
        """Each prompt's score (mean hidden state at :attr:`layer`), float32 ``[n]``."""
        self._check(model.adapter)
        acts = model.activations(prompts, layers=[self.layer], read_at="mean", chat=chat)
        return condition_score(acts[self.layer], self.direction)

    def fires(
        self, model: Any, prompts: Sequence[str] | str, *, chat: bool = False
    ) -> torch.Tensor:
        """Which prompts satisfy the condition, bool ``[n]``.

        >>> import torch
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> Condition(torch.ones(32), layer=1, threshold=-1.0).fires(model, ["a", "b c"]).tolist()
        [True, True]
        """
        return self.test(self.scores(model, prompts, chat=chat))

    # --- the in-forward probe ------------------------------------------------------------------
    def check_compatible(self, model: Any) -> None:
        """Raise :class:`~steerlab.errors.VectorMismatchError` unless this condition can be read
        on ``model`` (its direction has the model's hidden size, its layer exists).

        >>> import torch
        >>> from steerlab.testing import tiny_model
        >>> Condition(torch.ones(5), layer=0, threshold=0.5).check_compatible(tiny_model("gpt2"))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        steerlab.errors.VectorMismatchError: the condition's direction has size 5 but ... is 32
        """
        self._check(model.adapter)

    def _check(self, adapter: Any) -> None:
        if self.direction.shape[0] != adapter.d_model:
            raise VectorMismatchError(
                f"the condition's direction has size {self.direction.shape[0]} but the model's "
                f"hidden size is {adapter.d_model}"
            )
        if self.layer >= adapter.n_layers:
            raise VectorMismatchError(
                f"the condition reads layer {self.layer} but the model has {adapter.n_layers}"
            )

    def probe(self, adapter: Any, tracker: Any) -> tuple[int, _Probe]:
        """``(layer, forward hook)`` computing this condition during a forward pass."""
        self._check(adapter)
        return self.layer, _Probe(self, tracker)

    # --- files -------------------------------------------------------------------------------
    def _header(self) -> dict[str, str]:
        return {
            "format": CONDITION_FORMAT,
            "schema_version": _SCHEMA_VERSION,
            "layer": json.dumps(self.layer),
            "threshold": json.dumps(self.threshold),
            "comparison": json.dumps(self.comparison),
            "scope": json.dumps(self.scope),
            "metadata": json.dumps(dict(self.metadata), sort_keys=True, allow_nan=False),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the condition to a safetensors file (atomically), with a SHA-256 checksum.

        >>> import tempfile, pathlib, torch
        >>> d = tempfile.TemporaryDirectory()
        >>> c = Condition(torch.tensor([1.0, 2.0]), layer=3, threshold=0.25, comparison="less")
        >>> back = Condition.load(c.save(pathlib.Path(d.name, "c.safetensors")))
        >>> back.layer, back.threshold, back.comparison, back.direction.tolist()
        (3, 0.25, 'less', [1.0, 2.0])
        >>> d.cleanup()
        """
        tensor = self.direction.contiguous()
        return save_safetensors(path, {"direction": tensor}, self._header(), what="condition")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Condition:
        """Read a condition written by :meth:`save`; a corrupt or altered file is refused with
        :class:`~steerlab.errors.VectorFileError` naming it."""
        file = Path(path)
        tensors, raw = read_safetensors(file, format=CONDITION_FORMAT, what="condition")
        version = raw.get("schema_version")
        if version not in ("1", _SCHEMA_VERSION):
            raise VectorFileError(f"{file}: unknown condition schema version {version!r}")
        if set(tensors) != {"direction"}:
            raise VectorFileError(f"{file}: expected one tensor 'direction', got {sorted(tensors)}")
        tensor = tensors["direction"]
        if tensor.dtype != torch.float32:
            raise VectorFileError(f"{file}: direction has dtype {tensor.dtype}, expected float32")
        if version == "1":
            _check_version_1(tensor, raw, file)
        else:
            check_file_checksum(tensors, raw, file)
        try:
            return cls(
                tensor,
                layer=json.loads(raw["layer"]),
                threshold=json.loads(raw["threshold"]),
                comparison=json.loads(raw["comparison"]),
                scope=json.loads(raw["scope"]),
                metadata=json.loads(raw["metadata"]),
            )
        except (KeyError, json.JSONDecodeError, InvalidInputError, VectorMismatchError) as err:
            raise VectorFileError(f"{file}: invalid condition ({err})") from None

    def __repr__(self) -> str:
        acc = self.metadata.get("heldout_accuracy")
        extra = f", heldout_accuracy={acc:.3f}" if isinstance(acc, float) else ""
        return (
            f"Condition(layer={self.layer}, threshold={self.threshold:g}, "
            f"comparison={self.comparison!r}, scope={self.scope!r}{extra})"
        )


def _check_version_1(tensor: torch.Tensor, header: Mapping[str, str], file: Path) -> None:
    """Verify the checksum of a condition file of schema version 1, which had a SHA-256 of its
    own (raw float32 bytes, then the other header fields as JSON); version 2 files carry
    :func:`~steerlab.files.file_checksum` like every other steerlab file."""
    digest = hashlib.sha256()
    digest.update(tensor.contiguous().numpy().astype("<f4").tobytes())
    fields = {k: v for k, v in header.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(fields, sort_keys=True).encode("utf-8"))
    if header.get(CHECKSUM_KEY) != digest.hexdigest():
        raise VectorFileError(
            f"{file}: checksum mismatch (the file was altered or corrupted after it was saved)"
        )


class _Probe:
    """Forward hook at the condition's layer: computes which rows/tokens may be steered."""

    def __init__(self, condition: Condition, tracker: Any) -> None:
        self.condition = condition
        self.tracker = tracker
        self._mask: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._placed: dict[torch.device, torch.Tensor] = {}

    def _direction(self, device: torch.device) -> torch.Tensor:
        placed = self._placed.get(device)
        if placed is None:
            placed = self.condition.direction.to(device)
            self._placed[device] = placed
        return placed

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = output_hidden(output).float()
        direction = self._direction(hidden.device)
        abs_index = self.tracker.abs_index.to(hidden.device)
        real = abs_index >= 0
        if self.condition.scope == "token":
            self._mask = self.condition.test(condition_score(hidden, direction)) & real
            return
        plen = self.tracker.prompt_lengths.to(hidden.device)[:, None]
        in_prompt = real & (abs_index < plen)
        counts = in_prompt.sum(dim=1)
        # a server regrouping requests between calls lends each row its own state: the verdict
        # decided on its prompt is kept there for the rest of its generation
        states = self.tracker.sequences_override
        if bool((counts == plen[:, 0]).all()):
            # where(), not multiply: padded positions may hold NaN from fully masked attention
            kept = torch.where(in_prompt[..., None], hidden, torch.zeros_like(hidden))
            pooled = kept.sum(dim=1) / counts[:, None].to(hidden.dtype)
            self._rows = self.condition.test(condition_score(pooled, direction))
            for state, verdict in zip(states or (), self._rows.tolist()):
                state.verdicts[self.condition] = bool(verdict)
        elif bool((counts != 0).any()):
            raise InvalidInputError(
                "a prompt-level condition needs each prompt whole in one forward call; this "
                "call has part of a prompt (chunked prefill?); use Condition.per_token()"
            )
        elif states is not None:
            # a row that never had this condition is outside its steering group anyway
            self._rows = torch.tensor([s.verdicts.get(self.condition, False) for s in states])
        elif self._rows is None:
            raise InvalidInputError(
                "a prompt-level condition decides on the whole prompt; this call continues a "
                "sequence whose prompt it never read"
            )
        if self._rows.shape[0] != hidden.shape[0]:
            raise InvalidInputError("the batch changed size during a conditioned call")
        self._mask = self._rows.to(hidden.device)[:, None] & real

    def mask(self, shape: Sequence[int]) -> torch.Tensor:
        """The ``[batch, seq]`` gate of the current forward call."""
        if self._mask is None or tuple(self._mask.shape) != tuple(shape):
            raise RuntimeError("the condition probe did not run before the gated steering")
        return self._mask


def _f1(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    tp = int((predicted & truth).sum())
    fp = int((predicted & ~truth).sum())
    fn = int((~predicted & truth).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def fit_condition(
    model: Any,
    positive_prompts: Sequence[str],
    negative_prompts: Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    method: str = "pca_center",
    thresholds: Sequence[float] | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    scope: str = "prompt",
    chat: bool = False,
    batch_size: int = 16,
    progress: bool | None = None,
) -> Condition:
    """Learn a condition (direction, layer, threshold, comparison) by CAST's grid search.

    The prompts of each class are split (``seed``, ``test_fraction``). At every candidate layer
    (``layers``, default all) the mean hidden state of each prompt is read; ``method`` (a
    :mod:`steerlab.methods` name, default ``"pca_center"`` as in CAST) gives the direction from
    the train prompts; each prompt's score is :func:`condition_score`. Every (layer,
    threshold, comparison) of the grid (``thresholds`` default: CAST's 0.00..0.99) is scored by
    F1 on the train prompts (positive = should fire); the first best wins (layers ascending,
    thresholds ascending, ``"greater"`` before ``"less"``). The returned condition's metadata
    holds ``train_f1``, ``train_accuracy``, ``heldout_accuracy``, ``heldout_f1`` and the split
    sizes. ``scope="token"`` returns the per-token gate of the same probe.
    """
    pos = list(check_prompt_list(positive_prompts, "positive"))
    neg = list(check_prompt_list(negative_prompts, "negative"))
    if scope not in SCOPES:
        raise InvalidInputError(f"scope must be one of {SCOPES}, not {scope!r}")
    grid = tuple(CAST_THRESHOLDS if thresholds is None else (float(t) for t in thresholds))
    if not grid or not all(math.isfinite(t) for t in grid):
        raise InvalidInputError("thresholds must be a non-empty list of finite numbers")
    resolved = model.adapter.resolve_layers(layers)
    (pos_train, pos_test), (neg_train, neg_test) = split_classes(
        len(pos), len(neg), paired=False, test_fraction=test_fraction, seed=seed
    )
    acts = model.activations(
        pos + neg,
        layers=resolved,
        read_at="mean",
        batch_size=batch_size,
        chat=chat,
        progress=progress,
    )
    n_pos = len(pos)
    train_rows = pos_train + [n_pos + i for i in neg_train]
    test_rows = pos_test + [n_pos + i for i in neg_test]
    truth = torch.tensor([True] * n_pos + [False] * len(neg))
    best: tuple[float, int, float, str] | None = None
    directions: dict[int, torch.Tensor] = {}
    scores: dict[int, torch.Tensor] = {}
    for layer in resolved:
        layer_acts = acts[layer]
        result = run_method(
            method,
            layer_acts[pos_train],
            layer_acts[[n_pos + i for i in neg_train]],
            paired=False,
            seed=seed,
        )
        if float(result.direction.norm()) == 0.0:
            continue
        directions[layer] = result.direction
        scores[layer] = condition_score(layer_acts, result.direction)
        train_scores = scores[layer][train_rows]
        train_truth = truth[train_rows]
        for threshold in grid:
            for comparison in COMPARISONS:
                fired = (
                    train_scores > threshold
                    if comparison == "greater"
                    else (train_scores < threshold)
                )
                f1 = _f1(fired, train_truth)
                if best is None or f1 > best[0]:
                    best = (f1, layer, threshold, comparison)
    if best is None:
        raise InvalidInputError("no layer gave a usable condition direction (identical classes?)")
    f1, layer, threshold, comparison = best

    def accuracy(rows: list[int]) -> float:
        probe = Condition(
            directions[layer], layer=layer, threshold=threshold, comparison=comparison
        )
        fired = probe.test(scores[layer][rows])
        return float((fired == truth[rows]).float().mean())

    def f1_on(rows: list[int]) -> float:
        probe = Condition(
            directions[layer], layer=layer, threshold=threshold, comparison=comparison
        )
        return _f1(probe.test(scores[layer][rows]), truth[rows])

    metadata = {
        **model_identity(model),
        "method": method,
        "train_f1": f1,
        "train_accuracy": accuracy(train_rows),
        "heldout_accuracy": accuracy(test_rows),
        "heldout_f1": f1_on(test_rows),
        "n_train": len(train_rows),
        "n_test": len(test_rows),
        "candidate_layers": list(resolved),
        "n_thresholds": len(grid),
        "seed": seed,
        "test_fraction": test_fraction,
        "chat": chat,
    }
    return Condition(
        directions[layer],
        layer=layer,
        threshold=threshold,
        comparison=comparison,
        scope=scope,
        metadata=metadata,
    )
