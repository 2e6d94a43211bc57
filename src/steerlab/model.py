"""The steerable model: one wrapper around a Hugging Face causal LM and its tokenizer.

:class:`SteeredModel` owns no weights: it holds the user's ``hf_model`` and ``tokenizer`` (never
modified), an :class:`~steerlab.adapter.ModelAdapter` that knows where the sites are, and the
bookkeeping of the interventions currently installed. Every batch it builds is padded by steerlab
itself with explicit ``position_ids``, so left padding, right padding and one prompt at a time give
the same numbers.

>>> import steerlab as sl
>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> model.n_layers, model.d_model
(3, 32)
>>> model.logits(["the cat sat"]).shape[-1] == model.hf_model.config.vocab_size
True
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, overload

import torch
from torch import nn

from steerlab.adapter import ModelAdapter
from steerlab.checks import as_finite_float, as_int, as_positive_int, check_prompts
from steerlab.errors import EditRemovedError, InvalidInputError, VectorMismatchError
from steerlab.interventions import (
    HookHandle,
    HookSpec,
    Intervention,
    PositionTracker,
    RowSteering,
    ScopedStack,
    Steering,
    activate,
    active_trackers,
    install,
    normalize_steering,
    output_hidden,
    scoped_hooks,
)
from steerlab.operators import is_loreft
from steerlab.positions import PositionSpec
from steerlab.progress import progress_bar
from steerlab.sites import check_site, site_hook, site_width
from steerlab.vectors import SteeringVector

__all__ = [
    "Batch",
    "EditedModel",
    "LastTokenCache",
    "LayerActivations",
    "PrefixCache",
    "SteeredModel",
    "edit",
    "wrap",
]

_REDUCTIONS = ("last", "mean", "all")


@dataclasses.dataclass(frozen=True)
class Batch:
    """A padded batch built by steerlab: ``prompt_lengths[i]`` real tokens in row ``i``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    padding_side: str

    def rows(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` (same padded length)."""
        return Batch(
            self.input_ids[start:stop],
            self.attention_mask[start:stop],
            self.position_ids[start:stop],
            self.prompt_lengths[start:stop],
            self.padding_side,
        )

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.prompt_lengths,
            self.padding_side,
        )


class LayerActivations(dict[int, Any]):
    """``{layer: activations}`` that also accepts negative layer keys (``acts[-1]``)."""

    def __init__(self, data: Mapping[int, Any], n_layers: int) -> None:
        super().__init__(data)
        self.n_layers = n_layers

    def __getitem__(self, layer: int) -> Any:
        if isinstance(layer, int) and layer < 0:
            layer += self.n_layers
        return super().__getitem__(layer)

    def __contains__(self, layer: object) -> bool:
        if isinstance(layer, int) and layer < 0:
            layer += self.n_layers
        return super().__contains__(layer)


@dataclasses.dataclass(frozen=True)
class PrefixCache:
    """What :meth:`SteeredModel.run_from` needs to re-run blocks ``layer..`` alone.

    ``hidden`` is the input of block ``layer``; ``block_inputs`` the other arguments each later
    block received; ``logits`` the unsteered next-token logits; ``exact`` whether a replay of
    the tail reproduced them.
    """

    batch: Batch
    layer: int
    hidden: torch.Tensor
    block_inputs: Mapping[int, tuple[tuple[Any, ...], dict[str, Any]]]
    logits: torch.Tensor
    exact: bool


@dataclasses.dataclass(frozen=True)
class LastTokenCache:
    """What :meth:`SteeredModel.run_last` needs to re-run only the last token of each prompt.

    ``past`` is the unsteered key/value cache of every prompt minus its last token (left
    padding puts every last token in the final column); ``logits`` the unsteered next-token
    logits; ``exact`` whether replaying the last token over ``past`` reproduced them.
    """

    batch: Batch
    past: Any
    logits: torch.Tensor
    exact: bool


def tile_rows(value: Any, copies: int, batch: int) -> Any:
    """Repeat every batch-aligned tensor (``[batch, ...]``, 2-D or more, also inside tuples,
    lists and dicts) ``copies`` times along dim 0; 1-D tensors such as cache positions and
    anything else pass through."""
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim >= 2 and value.shape[0] == batch:
            return value.repeat(copies, *([1] * (value.ndim - 1)))
        return value
    if isinstance(value, tuple):
        return tuple(tile_rows(v, copies, batch) for v in value)
    if isinstance(value, list):
        return [tile_rows(v, copies, batch) for v in value]
    if isinstance(value, dict):
        return {k: tile_rows(v, copies, batch) for k, v in value.items()}
    return value


class _StopForward(Exception):
    """Raised by a capture hook once the deepest requested layer has run."""


def _output_cache(out: Any) -> Any:
    """The key/value cache a forward pass returned: ``out.cache`` on transformers releases
    that renamed it (reading the old ``past_key_values`` there warns), else the old name."""
    keys = out.keys() if callable(getattr(out, "keys", None)) else ()
    if "cache" in keys:
        return out["cache"]
    return getattr(out, "past_key_values", None)


def position_kwargs(hf_model: nn.Module, position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"position_ids": position_ids}`` when ``hf_model.forward`` takes them, else ``{}``.

    OPT before transformers 4.46 has no ``position_ids`` argument; it derives positions from
    the attention mask, which gives the real tokens the same numbers.

    >>> from steerlab.testing import tiny_hf_model
    >>> sorted(position_kwargs(tiny_hf_model("llama"), torch.zeros(1, 2)))
    ['position_ids']
    """
    try:
        params = inspect.signature(hf_model.forward).parameters
    except (TypeError, ValueError):
        return {"position_ids": position_ids}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"position_ids": position_ids} if takes_any or "position_ids" in params else {}


class SteeredModel:
    """A Hugging Face causal LM with steering, activation reads and steered generation.

    Build one with :func:`steerlab.load_model` or :func:`steerlab.wrap`. The underlying objects
    stay available as ``hf_model`` and ``tokenizer``; steerlab never mutates either.
    """

    def __init__(
        self,
        hf_model: nn.Module,
        tokenizer: Any,
        *,
        layers_path: str | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(hf_model, nn.Module):
            raise InvalidInputError(f"hf_model must be a torch.nn.Module, got {type(hf_model)}")
        if tokenizer is None or not callable(tokenizer):
            raise InvalidInputError("a tokenizer is required (the model's AutoTokenizer)")
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.adapter = ModelAdapter(hf_model, layers_path=layers_path)
        if self.adapter.n_experts > 1 and self.adapter.router_path is None:
            # Residual, attention and MLP steering still work; only site="router" cannot.
            warnings.warn(self.adapter.router_missing(), stacklevel=3)
        config = getattr(hf_model, "config", None)
        self.name: str = name or str(
            getattr(config, "_name_or_path", "") or type(hf_model).__name__
        )
        self._checked_vectors: weakref.WeakSet[SteeringVector] = weakref.WeakSet()

    # --- shape ------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of decoder blocks."""
        return self.adapter.n_layers

    @property
    def d_model(self) -> int:
        """Hidden size of the residual stream."""
        return self.adapter.d_model

    @property
    def device(self) -> torch.device:
        """Device of the token embedding (where inputs go)."""
        for param in self.adapter.embed.parameters():
            return param.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the token embedding."""
        for param in self.adapter.embed.parameters():
            return param.dtype
        return torch.float32

    def __repr__(self) -> str:
        return (
            f"SteeredModel({self.name!r}, type={self.adapter.model_type}, "
            f"n_layers={self.n_layers}, d_model={self.d_model})"
        )

    # --- tokenization -----------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        """Most positions the model was built for (``max_position_embeddings``), if known.

        >>> from steerlab.testing import tiny_model
        >>> tiny_model("gpt2").context_length
        128
        """
        config = getattr(self.hf_model, "config", None)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    @property
    def pad_token_id(self) -> int:
        """The pad id steerlab uses: the tokenizer's pad token, else its EOS token."""
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if isinstance(value, int):
                return value
        raise InvalidInputError(
            "the tokenizer has neither a pad token nor an EOS token, so batches cannot be padded; "
            "give it one (e.g. tokenizer.pad_token = tokenizer.unk_token) before wrapping"
        )

    def format_chat(self, prompt: str) -> str:
        """``prompt`` as a single user turn through the tokenizer's chat template."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise InvalidInputError("this tokenizer has no chat template; call with chat=False")
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return str(text)

    def encode(
        self,
        prompts: Sequence[str] | str,
        *,
        padding_side: str = "left",
        chat: bool = False,
        reserve: int = 0,
    ) -> Batch:
        """Tokenize and pad ``prompts`` without touching the tokenizer's own settings.

        A prompt longer than the model's context (:attr:`context_length`, less ``reserve``
        positions kept free for generated tokens) is refused with
        :class:`~steerlab.errors.InvalidInputError`.

        >>> from steerlab.testing import tiny_model
        >>> b = tiny_model("gpt2").encode(["a", "the cat sat"])
        >>> b.attention_mask.tolist()
        [[0, 0, 1], [1, 1, 1]]
        """
        items = check_prompts(prompts)
        if padding_side not in ("left", "right"):
            raise InvalidInputError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        reserve = as_int(reserve, "reserve")
        if chat:
            items = [self.format_chat(p) for p in items]
        encoded = self.tokenizer(items, add_special_tokens=not chat)["input_ids"]
        lengths = [len(ids) for ids in encoded]
        for i, length in enumerate(lengths):
            if length == 0:
                raise InvalidInputError(f"prompt {i} ({items[i]!r}) has no tokens")
        width = max(lengths)
        context = self.context_length
        if context is not None and width + reserve > context:
            longest = lengths.index(width)
            extra = f" plus {reserve} new tokens" if reserve else ""
            raise InvalidInputError(
                f"prompt {longest} has {width} tokens{extra}, longer than the model's context "
                f"of {context} positions; shorten it"
            )
        pad = self.pad_token_id
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, tokens in enumerate(encoded):
            span = (
                slice(width - len(tokens), width)
                if padding_side == "left"
                else slice(0, len(tokens))
            )
            ids[row, span] = torch.tensor(tokens, dtype=torch.long)
            mask[row, span] = 1
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return Batch(ids, mask, position_ids, torch.tensor(lengths), padding_side)

    # --- installing interventions -----------------------------------------------------------
    def add_steering(
        self,
        steering: Any,
        *,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
        layers: Sequence[int] | None = None,
        force: bool = False,
        op: str | None = None,
        when: Any = None,
    ) -> HookHandle:
        """Steer every call, in every thread, until ``handle.remove()``.

        The arguments are :meth:`steer`'s. Unlike ``steer`` (this thread only), this changes what
        every thread using the model computes, from the next hook call on; use it for a model
        that one program owns, and ``steer``/``steering=`` where threads share it.

        >>> import torch, steerlab as sl
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> handle = model.add_steering(sl.SteeringVector({1: torch.ones(model.d_model)}))
        >>> handle.active
        True
        >>> handle.remove(); handle.active
        False
        """
        interventions = self._checked_steering(
            steering,
            strength=strength,
            positions=positions,
            layers=layers,
            op=op,
            when=when,
            force=force,
        )
        return self.add_interventions(interventions)

    def _checked_steering(
        self,
        steering: Any,
        *,
        strength: float | Mapping[int, float] | None,
        positions: PositionSpec | None,
        layers: Sequence[int] | None,
        op: str | None,
        when: Any,
        force: bool,
    ) -> list[Intervention]:
        """``steering`` as interventions, its vectors checked against this model (``steer`` and
        ``add_steering`` differ only in the scope they activate them in)."""
        interventions = normalize_steering(
            steering,
            strength=strength,
            positions=positions,
            layers=layers,
            op=op,
            when=when,
            tokenizer=self.tokenizer,
        )
        self.check_vectors(interventions, force=force)
        return interventions

    def check_vectors(self, interventions: Sequence[Intervention], *, force: bool = False) -> None:
        """Refuse steering vectors whose metadata says they were made for another model.

        Vectors record the model they came from (layer count, an unembedding fingerprint);
        ``force=True`` applies them anyway with a warning. Each vector is checked once.
        """
        steerings: list[Steering] = []
        for item in interventions:
            if isinstance(item, Steering):
                steerings.append(item)
            elif isinstance(item, RowSteering):
                steerings.extend(row for row in item.rows if row is not None)
        for steering in steerings:
            vector = steering.vector
            # such a vector ablates by default (op=None); only an explicit op="add" adds it
            if vector.metadata.get("operation") == "project_out" and steering.resolved_op == "add":
                message = (
                    "this vector is marked operation='project_out' (a direction to ablate): "
                    "project it out with sl.DirectionalAblation(vec), or mark it for steering "
                    "with vec.with_metadata(operation='add')"
                )
                if not force:
                    raise VectorMismatchError(message + " (or pass force=True to add it anyway)")
                warnings.warn("adding " + message, stacklevel=3)
            if is_loreft(vector) and steering.resolved_op == "add":
                message = _LOREFT_ADD + " (op=None means 'add')"
                if not force:
                    raise VectorMismatchError(message + "; or pass force=True to add Rᵀb anyway")
                warnings.warn("adding Rᵀb: " + message, stacklevel=3)
            if vector in self._checked_vectors:
                continue
            vector.check_compatible(self, force=force)
            if not force:  # a forced vector is checked (and warned about) again next time
                self._checked_vectors.add(vector)

    def add_interventions(self, interventions: Sequence[Intervention]) -> HookHandle:
        """Activate any interventions for every thread; returns the handle that removes them.

        Prefer :meth:`steer` (this thread only) where several threads share the model.
        """
        return install(self.adapter, list(interventions))

    def _activate(
        self, interventions: list[Intervention]
    ) -> contextlib.AbstractContextManager[HookHandle]:
        """Activate interventions in this context only (``steer``'s scope)."""
        return activate(self.adapter, interventions)

    def edit(
        self,
        steering: Any = None,
        *,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
        layers: Sequence[int] | None = None,
    ) -> EditedModel:
        """A view of this model that stays edited on every call (the seed's ``model.edit()``).

        The original stays untouched and un-hooked; see :func:`edit`.

        >>> import torch, steerlab as sl
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> edited = model.edit(sl.SteeringVector({1: torch.ones(model.d_model)}), strength=2.0)
        >>> bool((edited.logits(["the cat"]) != model.logits(["the cat"])).any())
        True
        """
        return edit(self, steering, strength=strength, positions=positions, layers=layers)

    @contextlib.contextmanager
    def steer(
        self,
        steering: Any,
        *,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
        layers: Sequence[int] | None = None,
        force: bool = False,
        op: str | None = None,
        when: Any = None,
    ) -> Iterator[HookHandle]:
        """Steer every call inside the ``with`` block; hooks are removed on exit, even on error.

        ``steering`` is a :class:`~steerlab.vectors.SteeringVector`, a
        :class:`~steerlab.interventions.Steering`, any intervention, or a list with one entry
        per prompt row. ``strength`` is a number or ``{layer: strength}``; ``positions`` one of
        ``"all"`` (default), ``"last"``, ``"prompt"``, ``"generated"``, indices, a slice, or a
        content-based spec (``"first:K"``, ``"after:TEXT"``, ``"between:A,B"``,
        ``"outside:A,B"``, see :mod:`steerlab.positions`). ``op`` picks the operator
        (:mod:`steerlab.operators`; default ``"add"``). ``when`` is a
        :class:`~steerlab.conditions.Condition`: only rows whose prompt satisfies it are
        steered (per-token conditions gate each token). A vector whose metadata says it was
        made for another model is refused unless ``force=True``.

        Scope: the calls made in this thread (or asyncio task) inside the block, and nothing
        else. Other threads using the same model at the same time are not steered by it, so one
        model object can serve many threads, each with its own steering (use
        :meth:`add_steering` for steering that every thread sees).

        >>> import torch, steerlab as sl
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> vec = sl.SteeringVector({1: torch.ones(model.d_model)})
        >>> with model.steer(vec, strength=2.0, positions="last"):
        ...     steered = model.logits(["the cat"])
        >>> bool((steered != model.logits(["the cat"])).any())
        True
        """
        interventions = self._checked_steering(
            steering,
            strength=strength,
            positions=positions,
            layers=layers,
            op=op,
            when=when,
            force=force,
        )
        with self._activate(interventions) as handle:
            yield handle

    def _call_interventions(self, per_call: list[Intervention]) -> list[Intervention]:
        """What one call installs for its duration: the per-call steering (an edited model
        puts its edits first)."""
        return per_call

    @contextlib.contextmanager
    def _call_scope(
        self,
        steering: Any,
        batch: Batch,
        *,
        strength: float | Mapping[int, float] | None,
        positions: PositionSpec | None,
        row_offset: int = 0,
        op: str | None = None,
        when: Any = None,
    ) -> Iterator[list[PositionTracker]]:
        """Per-call steering plus pinned prompt lengths for every installed tracker."""
        per_call = normalize_steering(
            steering,
            strength=strength,
            positions=positions,
            op=op,
            when=when,
            tokenizer=self.tokenizer,
        )
        self.check_vectors(per_call)
        rows = batch.input_ids.shape[0]
        per_call = [
            i.slice(row_offset, row_offset + rows) if isinstance(i, RowSteering) else i
            for i in per_call
        ]
        interventions = self._call_interventions(per_call)
        with activate(self.adapter, interventions) if interventions else contextlib.nullcontext():
            trackers = active_trackers(self.adapter.backbone)
            try:
                # tracker state is per thread: pinning here never reaches another thread's call
                for tracker in trackers:
                    tracker.prompt_lengths_override = batch.prompt_lengths
                yield trackers
            finally:
                for tracker in trackers:
                    tracker.prompt_lengths_override = None

    # --- forward passes ------------------------------------------------------------------------
    def _forward(self, batch: Batch, **kwargs: Any) -> Any:
        batch = batch.to(self.device)
        return self.hf_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            **position_kwargs(self.hf_model, batch.position_ids),
            **kwargs,
        )

    def call_scope(self, batch: Batch) -> contextlib.AbstractContextManager[list[PositionTracker]]:
        """What every call of this model runs under, for code that runs an encoded batch itself
        (with hooks of its own, as :func:`steerlab.ablation.compute_means` does).

        For a ``with`` block: installs the steering recorded on this model (``add_steering``,
        ``steer`` in this context; an edited model's edits first) and pins every position
        tracker to ``batch``'s prompt lengths; yields the active trackers. Run the batch with
        :meth:`forward_batch` inside it.

        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> batch = model.encode(["the cat sat", "a dog"])
        >>> with model.call_scope(batch), torch.no_grad():
        ...     logits = model.forward_batch(batch).logits.float().cpu()
        >>> bool(torch.equal(logits, model.logits(["the cat sat", "a dog"])))
        True
        """
        return self._call_scope(None, batch, strength=None, positions=None)

    def forward_batch(self, batch: Batch, **kwargs: Any) -> Any:
        """``hf_model``'s output for a batch from :meth:`encode`: moved to the model's device,
        no KV cache, position ids where the model takes them; ``kwargs`` go to ``hf_model``.

        Installs nothing itself: inside :meth:`call_scope` it runs with the model's steering
        (see the example there).
        """
        return self._forward(batch, **kwargs)

    def _check_steering_rows(self, steering: Any, n_rows: int) -> None:
        if isinstance(steering, (list, tuple)) and len(steering) != n_rows:
            raise InvalidInputError(
                f"per-row steering has {len(steering)} entries but there are {n_rows} prompts"
            )

    @torch.no_grad()
    def logits(
        self,
        prompts: Sequence[str] | str,
        *,
        steering: Any = None,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
        batch_size: int | None = None,
        padding_side: str = "left",
        chat: bool = False,
        op: str | None = None,
        when: Any = None,
    ) -> torch.Tensor:
        """Next-token logits ``[batch, seq, vocab]`` (float32, CPU), left-padded by default.

        With left padding ``[:, -1]`` is each prompt's last token. ``steering`` may be a list
        with one vector (or ``None``) per prompt: every row runs in the same batch.

        >>> from steerlab.testing import tiny_model
        >>> tiny_model("qwen2").logits(["a b", "the cat sat"]).shape[:2]
        torch.Size([2, 3])
        """
        return self._run_chunks(
            prompts,
            lambda chunk: self._forward(chunk).logits.float().cpu(),
            steering=steering,
            strength=strength,
            positions=positions,
            batch_size=batch_size,
            padding_side=padding_side,
            chat=chat,
            op=op,
            when=when,
        )

    def _run_chunks(
        self,
        prompts: Sequence[str] | str,
        run: Any,
        *,
        steering: Any,
        strength: float | Mapping[int, float] | None,
        positions: PositionSpec | None,
        batch_size: int | None,
        padding_side: str = "left",
        chat: bool = False,
        op: str | None = None,
        when: Any = None,
    ) -> torch.Tensor:
        """Encode once, then ``run(chunk)`` per ``batch_size`` rows under per-call steering."""
        items = check_prompts(prompts)
        if batch_size is not None:
            batch_size = as_positive_int(batch_size, "batch_size")
        self._check_steering_rows(steering, len(items))
        batch = self.encode(items, padding_side=padding_side, chat=chat)
        size = batch_size or len(items)
        outputs = []
        for start in range(0, len(items), size):
            chunk = batch.rows(start, start + size)
            with self._call_scope(
                steering,
                chunk,
                strength=strength,
                positions=positions,
                row_offset=start,
                op=op,
                when=when,
            ):
                outputs.append(run(chunk))
        return torch.cat(outputs, dim=0)

    @torch.no_grad()
    def next_token_logits(
        self,
        prompts: Sequence[str] | str,
        *,
        steering: Any = None,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
        batch_size: int | None = None,
        chat: bool = False,
        op: str | None = None,
        when: Any = None,
    ) -> torch.Tensor:
        """Logits of the next token after each prompt, ``[batch, vocab]`` (float32, CPU).

        Cheaper than ``logits(...)[:, -1]``: the unembedding runs on the last position only.

        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> full = model.logits(["a b", "the cat sat"])[:, -1]
        >>> bool(torch.allclose(model.next_token_logits(["a b", "the cat sat"]), full, atol=1e-5))
        True
        """
        return self._run_chunks(
            prompts,
            self._last_logits,
            steering=steering,
            strength=strength,
            positions=positions,
            batch_size=batch_size,
            chat=chat,
            op=op,
            when=when,
        )

    def _last_logits(self, batch: Batch) -> torch.Tensor:
        try:
            out = self._forward(batch, logits_to_keep=1)
        except TypeError:  # older or custom models without logits_to_keep
            out = self._forward(batch)
        return out.logits[:, -1].float().cpu()

    # --- prefix reuse ----------------------------------------------------------------------------
    @torch.no_grad()
    def prefix_cache(
        self, prompts: Sequence[str] | str, *, layer: int, chat: bool = False
    ) -> PrefixCache:
        """Run the prompts once and keep what blocks ``layer..`` need to be re-run alone.

        Sweeps and scans that only change blocks ``>= layer`` reuse this prefix through
        :meth:`run_from` instead of recomputing the blocks below for every configuration.
        ``cache.exact`` is False when the replayed tail did not reproduce the full forward
        pass (an unusual architecture); callers then fall back to full passes.

        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> cache = model.prefix_cache(["the cat", "a dog ran"], layer=1)
        >>> cache.exact, tuple(cache.hidden.shape)
        (True, (2, 3, 32))
        """
        items = check_prompts(prompts)
        start_layer = self.adapter.resolve_layer(layer)
        batch = self.encode(items, chat=chat).to(self.device)
        inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

        def make_capture(index: int) -> Any:
            def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                inputs[index] = (args, dict(kwargs))

            return capture

        captures = [
            HookSpec(self.adapter.block(index), "forward_pre_kwargs", make_capture(index))
            for index in range(start_layer, self.n_layers)
        ]
        with self._call_scope(None, batch, strength=None, positions=None):
            with scoped_hooks(captures):
                logits = self._last_logits(batch)
        args, kwargs = inputs[start_layer]
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = PrefixCache(
            batch=batch,
            layer=start_layer,
            hidden=hidden,
            block_inputs=inputs,
            logits=logits,
            exact=True,
        )
        replayed = self.run_from(cache)
        exact = bool(torch.allclose(replayed, logits, atol=1e-4, rtol=1e-4))
        return dataclasses.replace(cache, exact=exact)

    @torch.no_grad()
    def run_from(
        self,
        cache: PrefixCache,
        *,
        repeat: int = 1,
        steering: Any = None,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``[repeat * n, vocab]`` re-running only blocks ``cache.layer..``.

        Row ``c * n + i`` is prompt ``i`` under configuration ``c``: pass per-row ``steering``
        (a list of ``repeat * n`` entries) to evaluate many strengths or vectors in one batch.
        Interventions below ``cache.layer`` have no effect here (that part was computed once).
        """
        if not isinstance(cache, PrefixCache):
            raise InvalidInputError(
                f"run_from needs a PrefixCache from model.prefix_cache(...), got "
                f"{type(cache).__name__}"
            )
        repeat = as_positive_int(repeat, "repeat")
        n = cache.batch.input_ids.shape[0]
        expanded = Batch(
            cache.batch.input_ids.repeat(repeat, 1),
            cache.batch.attention_mask.repeat(repeat, 1),
            cache.batch.position_ids.repeat(repeat, 1),
            cache.batch.prompt_lengths.repeat(repeat),
            cache.batch.padding_side,
        )
        self._check_steering_rows(steering, n * repeat)
        hidden = tile_rows(cache.hidden, repeat, n)
        with self._call_scope(steering, expanded, strength=strength, positions=positions) as trk:
            for tracker in trk:
                tracker.pre_hook(
                    self.adapter.backbone,
                    (),
                    {"input_ids": expanded.input_ids, "attention_mask": expanded.attention_mask},
                )
            for index in range(cache.layer, self.n_layers):
                args, kwargs = cache.block_inputs[index]
                args = tuple(tile_rows(a, repeat, n) for a in args)
                kwargs = {k: tile_rows(v, repeat, n) for k, v in kwargs.items()}
                if "hidden_states" in kwargs:
                    kwargs["hidden_states"] = hidden
                else:
                    args = (hidden, *args[1:])
                hidden = output_hidden(self.adapter.block(index)(*args, **kwargs))
            return self.adapter.logits_from_final_hidden(hidden[:, -1:]).squeeze(1).float().cpu()

    # --- last-position reuse -------------------------------------------------------------------
    @torch.no_grad()
    def last_token_cache(
        self, prompts: Sequence[str] | str, *, chat: bool = False
    ) -> LastTokenCache:
        """Run the prompts once, unsteered, and keep the key/value cache of all but the last token.

        Steering that only touches the last prompt position cannot change anything before it
        (attention is causal), so :meth:`run_last` re-runs that one token per configuration over
        this cache: ``T`` times fewer token-block passes than a full forward pass for prompts of
        ``T`` tokens. ``cache.exact`` is False when the replayed last token did not reproduce the
        full pass (a prompt of one token, or a model whose cache cannot be cropped); callers then
        use full passes.

        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> cache = model.last_token_cache(["the cat sat", "a dog"])
        >>> cache.exact, tuple(cache.logits.shape) == (2, model.hf_model.config.vocab_size)
        (True, True)
        """
        items = check_prompts(prompts)
        batch = self.encode(items, chat=chat)
        device_batch = batch.to(self.device)
        with self._call_scope(None, batch, strength=None, positions=None):
            try:
                out = self.hf_model(
                    input_ids=device_batch.input_ids,
                    attention_mask=device_batch.attention_mask,
                    position_ids=device_batch.position_ids,
                    use_cache=True,
                    logits_to_keep=1,
                )
            except TypeError:  # models without logits_to_keep
                out = self.hf_model(
                    input_ids=device_batch.input_ids,
                    attention_mask=device_batch.attention_mask,
                    position_ids=device_batch.position_ids,
                    use_cache=True,
                )
        logits = out.logits[:, -1].float().cpu()
        past = _output_cache(out)
        exact = (
            past is not None
            and callable(getattr(past, "crop", None))
            and callable(getattr(past, "reorder_cache", None))
            and bool(getattr(past, "is_croppable", True))
            and int(batch.prompt_lengths.min()) >= 2
        )
        if exact and past is not None:
            past.crop(-1)  # negative: drop that many tokens (every transformers version)
        cache = LastTokenCache(batch=batch, past=past, logits=logits, exact=exact)
        if exact:
            replayed = self.run_last(cache)
            exact = bool(torch.allclose(replayed, logits, atol=1e-4, rtol=1e-4))
        return dataclasses.replace(cache, exact=exact)

    def cache_keyword(self) -> str:
        """The keyword this model's forward takes its key/value cache by: ``"cache"`` on
        transformers releases that renamed it (the old name then warns), else
        ``"past_key_values"``.

        >>> from steerlab.testing import tiny_model
        >>> tiny_model("llama").cache_keyword() in ("cache", "past_key_values")
        True
        """
        params = inspect.signature(self.hf_model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @torch.no_grad()
    def run_last(
        self,
        cache: LastTokenCache,
        *,
        repeat: int = 1,
        steering: Any = None,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
        last_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``[repeat * n, vocab]`` re-running only each prompt's last token.

        Row ``c * n + i`` is prompt ``i`` under configuration ``c`` (as in :meth:`run_from`).
        Only steering of the last position is exact here: anything it would do to earlier
        positions is not applied (they come from the cache). ``last_ids`` replaces the last
        token of each of the ``n`` prompts (same prefix, another final token: the CAA answer
        letters ``A`` and ``B`` share everything before the letter).

        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> cache = model.last_token_cache(["the cat sat"])
        >>> bool(torch.allclose(model.run_last(cache), model.next_token_logits(["the cat sat"]),
        ...                     atol=1e-5))
        True
        """
        logits, _ = self.run_last_with_activations(
            cache,
            layers=(),
            repeat=repeat,
            steering=steering,
            strength=strength,
            positions=positions,
            last_ids=last_ids,
        )
        return logits

    @torch.no_grad()
    def run_last_with_activations(
        self,
        cache: LastTokenCache,
        *,
        layers: Sequence[int],
        repeat: int = 1,
        steering: Any = None,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
        last_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """:meth:`run_last` plus the block outputs at the re-run token:
        ``(logits, {layer: Tensor[repeat * n, d_model]})`` (float32, CPU).

        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> logits, acts = model.run_last_with_activations(
        ...     model.last_token_cache(["the cat sat"]), layers=[1])
        >>> tuple(acts[1].shape) == (1, model.d_model)
        True
        """
        if repeat < 1:
            raise InvalidInputError(f"repeat must be positive, got {repeat}")
        if cache.past is None:
            raise InvalidInputError("this LastTokenCache holds no key/value cache")
        n = cache.batch.input_ids.shape[0]
        self._check_steering_rows(steering, n * repeat)
        ids = cache.batch.input_ids
        if last_ids is not None:
            replacement = torch.as_tensor(last_ids, dtype=torch.long).reshape(-1)
            if replacement.shape[0] != n:
                raise InvalidInputError(f"last_ids has {replacement.shape[0]} ids for {n} prompts")
            ids = ids.clone()
            ids[:, -1] = replacement
        expanded = Batch(
            ids.repeat(repeat, 1),
            cache.batch.attention_mask.repeat(repeat, 1),
            cache.batch.position_ids.repeat(repeat, 1),
            cache.batch.prompt_lengths.repeat(repeat),
            cache.batch.padding_side,
        )
        # the forward pass appends to the cache: every call works on its own tiled copy
        past = copy.deepcopy(cache.past)
        if repeat > 1:
            past.reorder_cache(torch.arange(n, device=self.device).repeat(repeat))
        device_batch = expanded.to(self.device)
        wanted = self.adapter.resolve_layers(list(layers)) if layers else []
        captured: dict[int, torch.Tensor] = {}

        def make_capture(index: int) -> Any:
            def grab(module: nn.Module, args: Any, output: Any) -> None:
                captured[index] = output_hidden(output)[:, -1].float().cpu()

            return grab

        reads = [
            HookSpec(self.adapter.block(layer), "forward", make_capture(layer)) for layer in wanted
        ]
        with self._call_scope(steering, expanded, strength=strength, positions=positions):
            with scoped_hooks(reads):
                out = self.hf_model(
                    input_ids=device_batch.input_ids[:, -1:],
                    attention_mask=device_batch.attention_mask,
                    position_ids=device_batch.position_ids[:, -1:],
                    use_cache=True,
                    **{self.cache_keyword(): past},
                )
        return out.logits[:, -1].float().cpu(), captured

    @torch.no_grad()
    def prompt_cache(self, prompts: Sequence[str] | str, *, chat: bool = False) -> LastTokenCache:
        """Run the prompts once, unsteered, keeping the key/value cache of *every* prompt token.

        :meth:`score_continuations` then scores continuations after them under steering that
        only touches the continuation (``positions="generated"``), without re-running the
        prompts. ``cache.logits`` are the unsteered next-token logits after each prompt.

        >>> from steerlab.testing import tiny_model
        >>> cache = tiny_model("llama").prompt_cache(["the cat", "a dog ran"])
        >>> cache.exact, cache.logits.shape[0]
        (True, 2)
        """
        items = check_prompts(prompts)
        batch = self.encode(items, chat=chat)
        device_batch = batch.to(self.device)
        with self._call_scope(None, batch, strength=None, positions=None):
            out = self.hf_model(
                input_ids=device_batch.input_ids,
                attention_mask=device_batch.attention_mask,
                position_ids=device_batch.position_ids,
                use_cache=True,
            )
        past = _output_cache(out)
        exact = past is not None and callable(getattr(past, "reorder_cache", None))
        return LastTokenCache(
            batch=batch, past=past, logits=out.logits[:, -1].float().cpu(), exact=exact
        )

    @torch.no_grad()
    def score_continuations(
        self,
        cache: LastTokenCache,
        continuations: Sequence[Sequence[int]],
        *,
        repeat: int = 1,
        steering: Any = None,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
    ) -> torch.Tensor:
        """Sum of log p(continuation tokens) after each cached prompt: ``Tensor[repeat * n]``.

        Row ``c * n + i`` scores ``continuations[c * n + i]`` (token ids) after prompt ``i`` of
        a :meth:`prompt_cache`, under per-row ``steering`` (as in :meth:`run_from`). Only
        steering of the continuation is applied (the prompt comes from the cache): use
        ``positions="generated"``. The first token is scored from ``cache.logits``. float64.

        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> cache = model.prompt_cache(["the cat"])
        >>> ids = model.tokenizer(" sat on", add_special_tokens=False)["input_ids"]
        >>> bool(model.score_continuations(cache, [ids])[0] < 0)
        True
        """
        if repeat < 1:
            raise InvalidInputError(f"repeat must be positive, got {repeat}")
        if not cache.exact or cache.past is None:
            raise InvalidInputError("this cache cannot be reused (no reorderable key/value cache)")
        n = cache.batch.input_ids.shape[0]
        rows = n * repeat
        if len(continuations) != rows:
            raise InvalidInputError(f"{len(continuations)} continuations for {rows} rows")
        tails = [torch.as_tensor(list(c), dtype=torch.long) for c in continuations]
        if any(t.numel() == 0 for t in tails):
            raise InvalidInputError("every continuation needs at least one token")
        self._check_steering_rows(steering, rows)
        width = max(t.numel() for t in tails)
        tail_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        tail_mask = torch.zeros((rows, width), dtype=torch.long)
        for row, tail in enumerate(tails):
            tail_ids[row, : tail.numel()] = tail
            tail_mask[row, : tail.numel()] = 1
        lengths = cache.batch.prompt_lengths.repeat(repeat)
        tail_pos = lengths[:, None] + torch.arange(width)[None, :]
        expanded = Batch(
            torch.cat([cache.batch.input_ids.repeat(repeat, 1), tail_ids], dim=1),
            torch.cat([cache.batch.attention_mask.repeat(repeat, 1), tail_mask], dim=1),
            torch.cat([cache.batch.position_ids.repeat(repeat, 1), tail_pos], dim=1),
            lengths,
            cache.batch.padding_side,
        )
        past = copy.deepcopy(cache.past)
        if repeat > 1:
            past.reorder_cache(torch.arange(n, device=self.device).repeat(repeat))
        device_batch = expanded.to(self.device)
        with self._call_scope(steering, expanded, strength=strength, positions=positions):
            out = self.hf_model(
                input_ids=device_batch.input_ids[:, -width:],
                attention_mask=device_batch.attention_mask,
                position_ids=device_batch.position_ids[:, -width:],
                use_cache=True,
                **{self.cache_keyword(): past},
            )
        logp = out.logits.double().cpu().log_softmax(dim=-1)
        first = cache.logits.double().log_softmax(dim=-1).repeat(repeat, 1)
        totals = torch.empty(rows, dtype=torch.float64)
        for row, tail in enumerate(tails):
            total = first[row, tail[0]]
            if tail.numel() > 1:
                total = total + logp[row, : tail.numel() - 1].gather(1, tail[1:, None]).sum()
            totals[row] = total
        return totals

    @torch.no_grad()
    def activations(
        self,
        prompts: Sequence[str] | str,
        *,
        layers: int | Sequence[int] | None = None,
        positions: str | int = "last",
        batch_size: int = 16,
        steering: Any = None,
        strength: float | Mapping[int, float] | None = None,
        padding_side: str = "left",
        chat: bool = False,
        progress: bool | None = None,
        op: str | None = None,
        when: Any = None,
        site: str = "resid",
    ) -> LayerActivations:
        """Residual-stream activations at the output of ``layers`` (default: all), or those of
        another ``site`` of those blocks (:mod:`steerlab.sites`: ``"attn_out"``, ``"mlp_out"``,
        ``"head"`` (width ``n_heads * head_dim``), ``"router"`` (one logit per expert)).

        ``positions``: ``"last"`` → ``Tensor[n, d_model]`` of each prompt's last token,
        ``"mean"`` → the mean over each prompt's tokens, ``"all"`` → a list of
        ``Tensor[len_i, d_model]``, an int ``i`` → the token at index ``i`` of each prompt
        (negative counts from the end: ``-2`` is the answer letter of a CAA ``"(A)"`` prompt).
        Results are float32 on the CPU; memory grows with the reduced results, not with full
        sequences. The forward pass stops after the deepest requested layer.

        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> acts = model.activations(["the cat", "a dog ran"], layers=[0, -1])
        >>> sorted(acts), tuple(acts[-1].shape)
        ([0, 2], (2, 32))
        >>> tuple(model.activations(["the cat"], layers=[1], site="mlp_out")[1].shape)
        (1, 32)
        """
        items = check_prompts(prompts)
        site = check_site(site)
        width = site_width(self.adapter, site)
        if isinstance(positions, bool) or not (
            positions in _REDUCTIONS or isinstance(positions, int)
        ):
            raise InvalidInputError(
                f"positions for activations must be one of {_REDUCTIONS} or an int token index, "
                f"not {positions!r}"
            )
        batch_size = as_positive_int(batch_size, "batch_size")
        self._check_steering_rows(steering, len(items))
        wanted = self.adapter.resolve_layers(layers)
        read_at = {layer: site_hook(self.adapter, site, layer) for layer in wanted}
        deepest = max(wanted)
        results: dict[int, list[Any]] = {layer: [] for layer in wanted}
        reduced: dict[int, torch.Tensor] = {}
        if positions != "all":
            reduced = {
                layer: torch.empty(len(items), width, dtype=torch.float32) for layer in wanted
            }
        bar = progress_bar(len(items), "activations", progress)
        try:
            for start in range(0, len(items), batch_size):
                chunk_prompts = items[start : start + batch_size]
                batch = self.encode(chunk_prompts, padding_side=padding_side, chat=chat)
                mask = batch.attention_mask.to(self.device).bool()
                captured: dict[int, torch.Tensor] = {}

                def make_hook(
                    layer: int,
                    mask: torch.Tensor = mask,
                    captured: dict[int, torch.Tensor] = captured,
                ) -> Any:
                    def hook(module: nn.Module, args: Any, *output: Any) -> None:
                        # a pre-hook (heads) reads the argument, the others the output; a
                        # router's logits come flattened over the batch's tokens
                        seen = output_hidden(output[0] if output else args)
                        seen = seen.reshape(*mask.shape, seen.shape[-1])
                        captured[layer] = _reduce(seen, mask, positions)
                        if layer == deepest:
                            raise _StopForward

                    return hook

                with self._call_scope(
                    steering,
                    batch,
                    strength=strength,
                    positions=None,
                    row_offset=start,
                    op=op,
                    when=when,
                ):
                    reads = [HookSpec(*read_at[layer], make_hook(layer)) for layer in wanted]
                    with scoped_hooks(reads), contextlib.suppress(_StopForward):
                        self._forward(batch)
                for layer in wanted:
                    value = captured[layer]
                    if positions == "all":
                        results[layer].extend(
                            value[row][mask[row]].float().cpu() for row in range(value.shape[0])
                        )
                    else:
                        # filled in place: peak memory is the answer plus one batch, never a
                        # list of chunks and their concatenation side by side
                        reduced[layer][start : start + len(chunk_prompts)] = value.float().cpu()
                bar.update(len(chunk_prompts))
        finally:
            bar.close()
        final: dict[int, Any] = dict(results) if positions == "all" else dict(reduced)
        return LayerActivations(final, self.n_layers)

    # --- generation ------------------------------------------------------------------------------
    @overload
    def generate(self, prompts: str, **kwargs: Any) -> str: ...

    @overload
    def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[str]: ...

    def generate(self, prompts: Sequence[str] | str, **kwargs: Any) -> str | list[str]:
        """Generate continuations (new text only), steering at every step.

        Keyword options: ``max_new_tokens`` (32), ``steering``/``strength``/``positions``/``op``/
        ``when`` as in :meth:`steer`, ``do_sample`` (False: greedy), ``temperature``,
        ``top_p``, ``top_k``, ``seed`` (sampling seed, global RNG untouched), ``chat`` (apply
        the chat template), ``batch_size``, ``use_cache`` (True). A string prompt returns a string.

        >>> from steerlab.testing import tiny_model
        >>> text = tiny_model("mistral").generate("the cat", max_new_tokens=3)
        >>> isinstance(text, str)
        True
        """
        single = isinstance(prompts, str)
        texts = [
            self.tokenizer.decode(ids, skip_special_tokens=True)
            for ids in self.generate_ids(prompts, **kwargs)
        ]
        return texts[0] if single else texts

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence[str] | str,
        *,
        max_new_tokens: int = 32,
        steering: Any = None,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        chat: bool = False,
        batch_size: int | None = None,
        use_cache: bool = True,
        op: str | None = None,
        when: Any = None,
    ) -> list[torch.Tensor]:
        """Like :meth:`generate` but returns each row's new token ids (EOS and after removed)."""
        items = check_prompts(prompts)
        max_new_tokens = as_int(max_new_tokens, "max_new_tokens")
        if max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if batch_size is not None:
            batch_size = as_positive_int(batch_size, "batch_size")
        _check_sampling(do_sample, temperature, top_p, top_k, seed)
        self._check_steering_rows(steering, len(items))
        batch = self.encode(items, chat=chat, reserve=max_new_tokens)
        size = batch_size or len(items)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "pad_token_id": self.pad_token_id,
            "use_cache": use_cache,
        }
        if eos is not None:
            options["eos_token_id"] = eos
        if do_sample:
            options["temperature"] = temperature
            options["top_p"] = 1.0 if top_p is None else top_p
            options["top_k"] = 0 if top_k is None else top_k
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        outputs: list[torch.Tensor] = []
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(items), size):
                chunk = batch.rows(start, start + size).to(self.device)
                with self._call_scope(
                    steering,
                    chunk,
                    strength=strength,
                    positions=positions,
                    row_offset=start,
                    op=op,
                    when=when,
                ):
                    out = self.hf_model.generate(  # type: ignore[operator]
                        input_ids=chunk.input_ids, attention_mask=chunk.attention_mask, **options
                    )
                width = chunk.input_ids.shape[1]
                for row in out[:, width:].cpu():
                    outputs.append(_strip_after_eos(row, eos))
        return outputs


def _check_sampling(
    do_sample: object, temperature: object, top_p: object, top_k: object, seed: object
) -> None:
    """Refuse sampling options transformers would reject late or obscurely (or ignore)."""
    if not isinstance(do_sample, bool):
        raise InvalidInputError(f"do_sample must be True or False, got {do_sample!r}")
    if do_sample:
        value = as_finite_float(temperature, "temperature")
        if value <= 0:
            raise InvalidInputError(
                f"temperature must be positive, got {value} (for greedy decoding use "
                f"do_sample=False)"
            )
        if top_p is not None and not 0 < as_finite_float(top_p, "top_p") <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and as_int(top_k, "top_k") < 0:
            raise InvalidInputError(f"top_k must be 0 (off) or positive, got {top_k}")
    if seed is not None and not 0 <= as_int(seed, "seed") < 2**63:
        raise InvalidInputError(f"seed must be an integer in [0, 2**63), got {seed}")


def _strip_after_eos(ids: torch.Tensor, eos: int | list[int] | None) -> torch.Tensor:
    if eos is None:
        return ids
    stops = torch.tensor([eos] if isinstance(eos, int) else list(eos))
    hits = torch.isin(ids, stops).nonzero()
    return ids[: int(hits[0, 0])] if len(hits) else ids


def _reduce(hidden: torch.Tensor, mask: torch.Tensor, positions: str | int) -> torch.Tensor:
    if isinstance(positions, int):
        lengths = mask.sum(dim=1)
        if bool((positions >= lengths).any()) or bool((-positions > lengths).any()):
            raise InvalidInputError(
                f"token index {positions} is outside a prompt of {int(lengths.min())} tokens"
            )
        index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        first = torch.where(mask, index, torch.full_like(index, mask.shape[1])).min(dim=1).values
        target = first + positions if positions >= 0 else first + lengths + positions
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), target]
    if positions == "all":
        return hidden.detach()
    if positions == "mean":
        # where(), not multiply: padded positions may hold NaN from fully masked attention rows
        kept = torch.where(mask[..., None], hidden, torch.zeros_like(hidden))
        return kept.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(hidden.dtype)
    # last real token of each row, for either padding side
    index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, index, torch.full_like(index, -1)).max(dim=1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def wrap(
    hf_model: nn.Module, tokenizer: Any, *, layers_path: str | None = None, name: str | None = None
) -> SteeredModel:
    """Steer a model the user already built or loaded.

    ``layers_path`` overrides block detection for unknown architectures
    (``"model.layers.{i}"``).

    >>> import transformers, steerlab as sl
    >>> from steerlab.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    ...     n_layer=2, n_embd=16, n_head=2, vocab_size=len(tok)))
    >>> sl.wrap(hf, tok).n_layers
    2
    """
    return SteeredModel(hf_model, tokenizer, layers_path=layers_path, name=name)


# --- edited models --------------------------------------------------------------------------------
class _RecordedHandle(HookHandle):
    """Handle of steering recorded on an :class:`EditedModel` for every thread (applied per
    call, after the edits)."""

    def __init__(self, owner: EditedModel, entry: tuple[Intervention, ...]) -> None:
        super().__init__(None)
        self._owner = owner
        self._entry = entry

    @property
    def active(self) -> bool:
        return any(item is self._entry for item in self._owner._steering)

    def remove(self) -> None:
        self._owner._steering = tuple(
            item for item in self._owner._steering if item is not self._entry
        )


class _ScopedHandle(HookHandle):
    """Handle of steering recorded on an :class:`EditedModel` for this context only."""

    def __init__(self, owner: EditedModel, entry: tuple[Intervention, ...]) -> None:
        super().__init__(None)
        self._owner = owner
        self._entry = entry

    @property
    def active(self) -> bool:
        return any(item is self._entry for item in self._owner._scoped.items())

    def remove(self) -> None:
        self._owner._scoped.discard(self._entry)


_LOREFT_ADD = (
    "this vector is a LoReFT intervention (sl.train_intervention): its direction is only Rᵀb, "
    "the constant part of an edit that depends on the activation, so adding it is not the "
    "trained edit; apply it with op='loreft'"
)


class EditedModel(SteeredModel):
    """A model that stays edited: every call runs with the edits' hooks installed.

    Built by :func:`edit` (or ``model.edit(...)``). Shares ``hf_model``, ``tokenizer`` and
    ``adapter`` with the original; nothing is copied and nothing stays installed between calls.
    Steering installed on the original (``model.steer``) still applies, before the edits; steering
    of this object (``edited.steer``, ``steering=``) applies after them. After :meth:`remove`
    (or leaving its ``with`` block) using it raises :class:`~steerlab.errors.EditRemovedError`.

    >>> import torch, steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> with edit(model, sl.SteeringVector({0: torch.ones(model.d_model)})) as edited:
    ...     text = edited.generate("the cat", max_new_tokens=3)
    >>> edited.removed
    True
    """

    def __init__(self, original: SteeredModel, edits: Sequence[Intervention]) -> None:
        # Deliberately not calling SteeredModel.__init__: everything is shared, nothing rebuilt
        # (attributes SteeredModel may grow later come along with the copy of its __dict__).
        self.__dict__.update(vars(original))
        self.hf_model = original.hf_model
        self.tokenizer = original.tokenizer
        self.adapter = original.adapter
        self.name = original.name
        self._original = original
        self._edits: tuple[Intervention, ...] = tuple(edits)
        # steering recorded for every thread (add_steering), replaced whole, never mutated
        self._steering: tuple[tuple[Intervention, ...], ...] = ()
        # steering of ``with edited.steer(...)``: this thread / task only
        self._scoped: ScopedStack[tuple[Intervention, ...]] = ScopedStack(
            f"steerlab_edit_{id(self)}"
        )
        self._removed = False

    @property
    def original(self) -> SteeredModel:
        """The unedited model this one was made from."""
        return self._original

    @property
    def edits(self) -> tuple[Intervention, ...]:
        """The interventions applied to every call, in order."""
        return self._edits

    @property
    def removed(self) -> bool:
        """True once :meth:`remove` was called."""
        return self._removed

    def __repr__(self) -> str:
        names = ", ".join(type(e).__name__ for e in self._edits)
        state = ", removed" if self._removed else ""
        return f"EditedModel({self.name!r}, edits=[{names}]{state})"

    def check_alive(self) -> None:
        """Raise :class:`~steerlab.errors.EditRemovedError` once :meth:`remove` was called
        (every call of this object checks; so does :func:`steerlab.editing.bake`).

        >>> import torch, steerlab as sl
        >>> from steerlab.testing import tiny_model
        >>> edited = edit(tiny_model("gpt2"), sl.SteeringVector({0: torch.ones(32)}))
        >>> edited.check_alive(); edited.remove(); edited.check_alive()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        steerlab.errors.EditRemovedError: this edited model was removed; ...
        """
        if self._removed:
            raise EditRemovedError(
                "this edited model was removed; use the original model or make a new edit"
            )

    def remove(self) -> None:
        """Drop the edits: later calls on this object raise. Idempotent."""
        self._removed = True
        self._steering = ()

    def __enter__(self) -> EditedModel:
        self.check_alive()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def edit(
        self,
        steering: Any = None,
        *,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
        layers: Sequence[int] | None = None,
    ) -> EditedModel:
        """A new edited model with ``steering`` stacked after this one's edits (this one is
        left as it is)."""
        return edit(self, steering, strength=strength, positions=positions, layers=layers)

    def _checked(self, interventions: Sequence[Intervention]) -> tuple[Intervention, ...]:
        self.check_alive()
        for item in interventions:
            if not isinstance(item, Intervention):
                raise InvalidInputError(f"not an intervention: {item!r}")
        return tuple(interventions)

    def add_interventions(self, interventions: Sequence[Intervention]) -> HookHandle:
        """Record interventions applied to every call (every thread) after the edits, until the
        handle is removed (used by :meth:`add_steering`)."""
        entry = self._checked(interventions)
        handle = _RecordedHandle(self, entry)
        try:
            self._steering = (*self._steering, entry)
            return handle
        except BaseException:  # an interrupt between recording and returning: undo
            handle.remove()
            raise

    @contextlib.contextmanager
    def _activate(self, interventions: list[Intervention]) -> Iterator[HookHandle]:
        """``steer``'s scope: applied after the edits, in this thread / task only."""
        entry = self._checked(interventions)
        with self._scoped.pushed(entry):
            yield _ScopedHandle(self, entry)

    @contextlib.contextmanager
    def applied(self) -> Iterator[HookHandle]:
        """Apply the edits to the shared ``hf_model`` for a ``with`` block, for code that
        calls ``hf_model`` directly (a ``transformers`` pipeline, nnsight...); in this thread
        only."""
        self.check_alive()
        with activate(self.adapter, self._call_interventions([])) as handle:
            yield handle

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``hf_model(*args, **kwargs)`` with the edits installed."""
        with self.applied():
            return self.hf_model(*args, **kwargs)

    forward = __call__

    def _call_interventions(self, per_call: list[Intervention]) -> list[Intervention]:
        """The edits, then steering recorded on this object, then the per-call steering."""
        self.check_alive()
        recorded = [i for entry in (*self._steering, *self._scoped.items()) for i in entry]
        return [*self._edits, *recorded, *per_call]


def edit(
    model: SteeredModel,
    steering: Any = None,
    *,
    strength: float | Mapping[int, float] | None = None,
    positions: PositionSpec | None = None,
    layers: Sequence[int] | None = None,
) -> EditedModel:
    """A persistently edited view of ``model`` (``model.edit(...)`` calls this).

    ``steering`` is anything ``steering=`` accepts except a per-row list: a vector (with
    ``strength``/``positions``/``layers``), a :class:`~steerlab.interventions.Steering`, an
    ablation, a :class:`~steerlab.ablation.ReplaceActivation`, ... or a tuple of those. Editing an
    :class:`EditedModel` stacks the new edits after its own.

    The seed's example, replacing the last layer's output with the hidden states of a source
    prompt for every later call:

    >>> import steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> paris = model.activations(["the capital of france is paris"], layers=[-1],
    ...                           positions="all")[-1][0]
    >>> edited = edit(model, sl.ReplaceActivation(-1, paris))
    >>> a = edited.logits(["the capital of germany is"])[0, -1]
    >>> b = edited.logits(["the capital of japan is"])[0, -1]
    >>> bool(torch.allclose(a, b))   # both read Paris' hidden state at position 4
    True
    """
    if not isinstance(model, SteeredModel):
        raise InvalidInputError(f"edit() needs a SteeredModel, got {type(model).__name__}")
    if isinstance(steering, list):
        raise InvalidInputError(
            "a per-row list cannot be a persistent edit (rows change from call to call); pass "
            "one intervention or a tuple of interventions"
        )
    items = list(steering) if isinstance(steering, tuple) else [steering]
    new: list[Intervention] = []
    for item in items:
        new.extend(
            normalize_steering(
                item,
                strength=strength,
                positions=positions,
                layers=layers,
                tokenizer=model.tokenizer,
            )
        )
    for item in new:
        if isinstance(item, Steering) and is_loreft(item.vector) and item.resolved_op == "add":
            raise VectorMismatchError(
                _LOREFT_ADD + ": edit with model.edit(sl.Steering(vec, op='loreft'))"
            )
    if isinstance(model, EditedModel):
        model.check_alive()
        return EditedModel(model.original, [*model.edits, *new])
    return EditedModel(model, new)
