"""Activation means: what a mean ablation puts in place of a component's activation.

:func:`compute_means` streams calibration prompts batch by batch (memory holds running sums,
never activations), stops each forward pass after the deepest layer it needs, and can cache the
result on disk; :class:`ActivationMeans` holds the means (position-averaged, and per absolute
token position) and saves them as a checksummed safetensors file.

>>> from steerlab.testing import tiny_model
>>> means = compute_means(tiny_model("gpt2"), ["the cat sat", "a dog"], layers=[1],
...                       components=["mlp"])
>>> means.sites, tuple(means.per_position[("mlp", 1)].shape)
([('mlp', 1)], (3, 32))
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlab.ablation.sites import COMPONENTS, check_component, component_site
from steerlab.adapter import ModelAdapter
from steerlab.checks import check_prompts
from steerlab.dispatch import HookSpec, scoped_hooks
from steerlab.errors import (
    FileWriteError,
    InvalidInputError,
    VectorFileError,
)
from steerlab.files import (
    CHECKSUM_KEY,
    check_file_checksum,
    decode_json_metadata,
    read_safetensors,
    save_safetensors,
)
from steerlab.identity import model_identity
from steerlab.progress import progress_bar
from steerlab.sites import output_hidden
from steerlab.vectors import MAX_LAYER, SteeringVector

__all__ = ["MEANS_FORMAT", "ActivationMeans", "absolute_positions", "compute_means"]


MEANS_FORMAT = "steerlab.means"
_MEANS_SCHEMA = 2  # 2 adds the checksum; version-1 files still load


def _site_key(component: str, layer: int) -> str:
    return f"{component}.{layer}"


@dataclasses.dataclass(frozen=True, eq=False)
class ActivationMeans:
    """Mean activations of components over calibration prompts.

    ``means[(component, layer)]`` is the mean over every real token (``[width]``);
    ``per_position[(component, layer)]`` (when computed) the mean at each absolute position
    ``[n_positions, width]``, with ``position_counts[i]`` tokens behind row ``i``. Width is
    ``d_model``, or ``n_heads * head_dim`` for ``"head"``.

    >>> from steerlab.testing import tiny_model
    >>> m = compute_means(tiny_model("gpt2"), ["the cat", "a dog ran"], layers=[0])
    >>> tuple(m.mean("block", 0).shape), m.position_counts.tolist()
    ((32,), [2, 2, 1])
    """

    means: Mapping[tuple[str, int], torch.Tensor]
    per_position: Mapping[tuple[str, int], torch.Tensor] = dataclasses.field(default_factory=dict)
    position_counts: torch.Tensor | None = None
    n_prompts: int = 0
    n_tokens: int = 0
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in (*self.means, *self.per_position):
            if (
                not isinstance(key, tuple)
                or len(key) != 2
                or key[0] not in COMPONENTS
                or not isinstance(key[1], int)
            ):
                raise InvalidInputError(f"keys must be (component, layer) pairs, got {key!r}")
        object.__setattr__(self, "means", dict(self.means))
        object.__setattr__(self, "per_position", dict(self.per_position))
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def sites(self) -> list[tuple[str, int]]:
        """The ``(component, layer)`` pairs held, sorted."""
        return sorted(self.means)

    def mean(self, component: str, layer: int) -> torch.Tensor:
        """The position-averaged mean of one site (``[width]``)."""
        key = (component, layer)
        if key not in self.means:
            raise InvalidInputError(
                f"no mean for component {component!r} at layer {layer}; these means hold "
                f"{self.sites} (compute them with compute_means(..., components=[...]))"
            )
        return self.means[key]

    def to_vector(self, component: str = "block") -> SteeringVector:
        """The position-averaged means of one component as a :class:`SteeringVector`
        (``d_model``-wide components only), e.g. to save in the vector file format."""
        if component == "head":
            raise InvalidInputError("head means are n_heads*head_dim wide, not a residual vector")
        directions = {layer: t for (c, layer), t in self.means.items() if c == component}
        if not directions:
            raise InvalidInputError(f"these means hold no {component!r} sites")
        meta = {**self.metadata, "method": "mean_activation", "component": component}
        meta.pop("components", None)
        return SteeringVector(directions, metadata=meta)

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the means to a safetensors file (atomically), in the style of vector files
        (with a SHA-256 :func:`~steerlab.files.file_checksum` in the header).

        >>> import tempfile, pathlib
        >>> from steerlab.testing import tiny_model
        >>> m = compute_means(tiny_model("gpt2"), ["the cat"], layers=[1], components=["mlp"])
        >>> d = tempfile.TemporaryDirectory()
        >>> back = ActivationMeans.load(m.save(pathlib.Path(d.name, "means.safetensors")))
        >>> bool(torch.equal(back.mean("mlp", 1), m.mean("mlp", 1)))
        True
        >>> d.cleanup()
        """
        target = Path(path)
        header = {"format": MEANS_FORMAT, "schema_version": str(_MEANS_SCHEMA)}
        info = {
            **self.metadata,
            "n_prompts": self.n_prompts,
            "n_tokens": self.n_tokens,
        }
        for key, value in info.items():
            if key in header:
                raise VectorFileError(f"metadata key {key!r} is reserved")
            try:
                header[key] = json.dumps(value, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise VectorFileError(f"metadata {key!r} cannot be saved as JSON ({err})") from None
        tensors = {
            f"mean.{_site_key(*key)}": t.detach().cpu().contiguous()
            for key, t in self.means.items()
        }
        tensors.update(
            {
                f"per_position.{_site_key(*key)}": t.detach().cpu().contiguous()
                for key, t in self.per_position.items()
            }
        )
        if self.position_counts is not None:
            tensors["position_counts"] = self.position_counts.detach().cpu().contiguous()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FileWriteError(f"cannot write {target}: {err.strerror or err}") from None
        return save_safetensors(target, tensors, header, what="means")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActivationMeans:
        """Read means written by :meth:`save`, verifying the checksum (files of schema version 1,
        without one, still load); raises :class:`~steerlab.errors.VectorFileError` naming the
        file on anything else, :class:`~steerlab.errors.VectorFileNotFoundError` when there is
        no file."""
        file = Path(path)
        tensors, header = read_safetensors(file, format=MEANS_FORMAT, what="means")
        version = header.get("schema_version")
        if version not in ("1", str(_MEANS_SCHEMA)):
            raise VectorFileError(f"{file}: unknown means schema version {version!r}")
        skip = ["format", "schema_version"]
        if version != "1":
            check_file_checksum(tensors, header, file)
            skip.append(CHECKSUM_KEY)
        meta = decode_json_metadata(header, file, skip=skip)
        means: dict[tuple[str, int], torch.Tensor] = {}
        per_position: dict[tuple[str, int], torch.Tensor] = {}
        counts = None
        for name, tensor in tensors.items():
            if name == "position_counts":
                counts = tensor
                continue
            kind, _, site = name.partition(".")
            component, _, layer = site.rpartition(".")
            if kind not in ("mean", "per_position") or component not in COMPONENTS:
                raise VectorFileError(f"{file}: unexpected tensor {name!r}")
            try:
                key = (component, int(layer))
            except ValueError:
                raise VectorFileError(f"{file}: unexpected tensor {name!r}") from None
            if not bool(torch.isfinite(tensor).all()):
                raise VectorFileError(f"{file}: tensor {name!r} contains NaN or inf")
            if tensor.numel() == 0:
                raise VectorFileError(f"{file}: tensor {name!r} is empty")
            if not 0 <= key[1] <= MAX_LAYER:
                raise VectorFileError(f"{file}: tensor {name!r} names an absurd layer number")
            (means if kind == "mean" else per_position)[key] = tensor
        counts_meta = [meta.pop("n_prompts", 0), meta.pop("n_tokens", 0)]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in counts_meta):
            raise VectorFileError(f"{file}: n_prompts/n_tokens are not counts: {counts_meta}")
        try:
            return cls(means, per_position, counts, counts_meta[0], counts_meta[1], meta)
        except InvalidInputError as err:
            raise VectorFileError(f"{file}: {err}") from None


class _StopForward(Exception):
    """Raised once the deepest site a computation needs has run."""


def _stop_hook(module: nn.Module, args: Any, output: Any) -> None:
    raise _StopForward


class _MeanAccumulator:
    """Running float64 sums of site activations over real tokens (and per absolute position)."""

    def __init__(self, *, per_position: bool, max_length: int | None) -> None:
        self.per_position = per_position
        self.max_length = max_length
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.pos_sums: dict[tuple[str, int], torch.Tensor] = {}
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.n_tokens = 0
        self._real = torch.zeros(0, 0, dtype=torch.bool)
        self._in_table = self._real
        self._abs = torch.zeros(0, 0, dtype=torch.long)

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        abs_index = absolute_positions(attention_mask)
        real = abs_index >= 0
        width = int(abs_index.max()) + 1
        if self.max_length is not None:
            width = min(width, self.max_length)
        in_table = real & (abs_index < width)
        if self.per_position:
            if self.counts.shape[0] < width:
                self.counts = _grow(self.counts, width)
            ones = torch.ones(int(in_table.sum()), dtype=torch.float64)
            self.counts = self.counts.index_add(0, abs_index[in_table], ones)
        self.n_tokens += int(real.sum())
        self._real, self._in_table, self._abs = real, in_table, abs_index

    def add(self, key: tuple[str, int], x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float64)
        if x.ndim == 2:  # OPT's flattened [batch * seq, width] MLP activations
            x = x.reshape(*self._real.shape, x.shape[-1])
        picked = x[self._real].sum(0)
        total = self.sums.get(key)
        self.sums[key] = picked if total is None else total + picked
        if self.per_position:
            table = self.pos_sums.get(key)
            if table is None:
                table = torch.zeros(self.counts.shape[0], x.shape[-1], dtype=torch.float64)
            elif table.shape[0] < self.counts.shape[0]:
                table = _grow(table, self.counts.shape[0])
            self.pos_sums[key] = table.index_add(0, self._abs[self._in_table], x[self._in_table])

    def hook(self, component: str, layer: int) -> Callable[..., None]:
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            self.add((component, layer), output_hidden(output))

        return fn

    def pre_hook(self, component: str, layer: int) -> Callable[..., None]:
        def fn(module: nn.Module, args: Any) -> None:
            self.add((component, layer), args[0])

        return fn

    def result(
        self,
    ) -> tuple[
        dict[tuple[str, int], torch.Tensor],
        dict[tuple[str, int], torch.Tensor],
        torch.Tensor | None,
    ]:
        means = {key: (t / self.n_tokens).to(torch.float32) for key, t in self.sums.items()}
        if not self.per_position:
            return means, {}, None
        denom = self.counts.clamp(min=1)[:, None]
        tables = {key: (t / denom).to(torch.float32) for key, t in self.pos_sums.items()}
        return means, tables, self.counts.to(torch.int64)


def _grow(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    extra = tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, extra])


def absolute_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counted from its prompt's first real token, ``-1`` at padding
    (``[batch, seq]`` from a left- or right-padded attention mask).

    >>> absolute_positions(torch.tensor([[0, 1, 1], [1, 1, 1]])).tolist()
    [[-1, 0, 1], [0, 1, 2]]
    """
    real = attention_mask.bool()
    index = real.long().cumsum(dim=1) - 1
    return torch.where(real, index, torch.full_like(index, -1))


def _prompts_digest(prompts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def compute_means(
    model: Any,
    prompts: Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    components: Sequence[str] = ("block",),
    per_position: bool = True,
    max_length: int | None = None,
    batch_size: int = 16,
    chat: bool = False,
    cache: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> ActivationMeans:
    """Mean activations of ``components`` at ``layers`` over calibration ``prompts``, streamed.

    Memory holds running sums (float64) only, so any number of prompts fits; each batch's forward
    pass stops after the deepest layer needed. ``per_position`` also keeps the mean at every
    absolute position below ``max_length`` (default: the longest prompt); tokens beyond count
    towards the position-averaged mean only. With ``cache`` (a file path) the means are loaded
    from there when it holds the same model, prompts and settings, and written there otherwise.

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> m = compute_means(model, ["the cat sat", "a dog"], layers=[0, 1],
    ...                   components=["attn", "head"])
    >>> m.sites, tuple(m.per_position[("head", 1)].shape)
    ([('attn', 0), ('attn', 1), ('head', 0), ('head', 1)], (3, 32))
    """
    items = check_prompts(prompts)
    comps = [check_component(c) for c in dict.fromkeys(components)]
    if not comps:
        raise InvalidInputError("components is empty")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    if max_length is not None and max_length < 1:
        raise InvalidInputError(f"max_length must be positive, got {max_length}")
    adapter: ModelAdapter = model.adapter
    wanted = adapter.resolve_layers(layers)
    settings = {
        "prompts_sha256": _prompts_digest(items),
        "n_prompts_given": len(items),
        "layers": wanted,
        "components": comps,
        "per_position": per_position,
        "max_length": max_length,
        "chat": chat,
    }
    identity = model_identity(model)
    if cache is not None and Path(cache).is_file():
        try:
            cached = ActivationMeans.load(cache)
        except VectorFileError:
            cached = None
        if cached is not None and all(
            cached.metadata.get(k) == v for k, v in {**settings, **identity}.items()
        ):
            return cached

    acc = _MeanAccumulator(per_position=per_position, max_length=max_length)
    deepest = max(wanted)
    bar = progress_bar(len(items), "means", progress)
    try:
        for start in range(0, len(items), batch_size):
            batch = model.encode(items[start : start + batch_size], chat=chat)
            acc.begin_batch(batch.attention_mask)
            reads: list[HookSpec] = []
            for layer in wanted:
                for component in comps:
                    module, kind = component_site(adapter, component, layer)
                    if kind == "forward_pre":
                        reads.append(HookSpec(module, kind, acc.pre_hook(component, layer)))
                    else:
                        reads.append(HookSpec(module, "forward", acc.hook(component, layer)))
            reads.append(HookSpec(adapter.block(deepest), "forward", _stop_hook))
            with model.call_scope(batch):
                with scoped_hooks(reads), torch.no_grad(), contextlib.suppress(_StopForward):
                    model.forward_batch(batch)
            bar.update(batch.input_ids.shape[0])
    finally:
        bar.close()
    if acc.n_tokens == 0:
        raise InvalidInputError("the calibration prompts have no tokens")
    means, tables, counts = acc.result()
    result = ActivationMeans(
        means,
        tables,
        counts,
        n_prompts=len(items),
        n_tokens=acc.n_tokens,
        metadata={**identity, **settings},
    )
    if cache is not None:
        result.save(cache)
    return result
