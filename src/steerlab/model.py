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
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, overload

import torch
from torch import nn

from steerlab import generation, reading, replay
from steerlab.adapter import ModelAdapter
from steerlab.batch import (
    Batch,
    context_length,
    encode_batch,
    last_token_logits,
    pad_token_id,
    position_kwargs,
    run_chunks,
    tile_rows,
)
from steerlab.deprecation import renamed_keyword
from steerlab.dispatch import HookHandle, Intervention, activate, active_trackers, install
from steerlab.edit_stack import EditStack
from steerlab.errors import EditRemovedError, InvalidInputError
from steerlab.positions import PositionSpec
from steerlab.prompts import render_chat
from steerlab.reading import LayerActivations
from steerlab.replay import LastTokenCache, PrefixCache
from steerlab.steering import RowSteering, normalize_steering
from steerlab.tracking import PositionTracker
from steerlab.vectors import SteeringVector
from steerlab.vetting import (
    LOOSE_KEYWORDS,
    check_vectors,
    checked_steering,
    edit_interventions,
    fold_loose,
)

__all__ = [
    "Batch",
    "EditedModel",
    "LastTokenCache",
    "LayerActivations",
    "PrefixCache",
    "SteeredModel",
    "edit",
    "position_kwargs",
    "tile_rows",
    "wrap",
]


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
        return context_length(self.hf_model)

    @property
    def pad_token_id(self) -> int:
        """The pad id steerlab uses: the tokenizer's pad token, else its EOS token."""
        return pad_token_id(self.tokenizer)

    def format_chat(self, prompt: str) -> str:
        """``prompt`` as a single user turn through the tokenizer's chat template."""
        return render_chat(self.tokenizer, prompt)

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
        return encode_batch(
            self.tokenizer,
            prompts,
            padding_side=padding_side,
            chat=chat,
            reserve=reserve,
            context_length=self.context_length,
            pad_token_id=self.pad_token_id,
        )

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
        interventions = checked_steering(
            self,
            steering,
            strength=strength,
            positions=positions,
            layers=layers,
            op=op,
            when=when,
            force=force,
            checked=self._checked_vectors,
        )
        return self.add_interventions(interventions)

    def check_vectors(self, interventions: Sequence[Intervention], *, force: bool = False) -> None:
        """Refuse steering vectors whose metadata says they were made for another model.

        Vectors record the model they came from (layer count, an unembedding fingerprint);
        ``force=True`` applies them anyway with a warning. Each vector is checked once.
        """
        check_vectors(self, interventions, checked=self._checked_vectors, force=force)

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
        >>> vec = sl.SteeringVector({1: torch.ones(model.d_model)})
        >>> edited = model.edit(sl.Steering(vec, strength=2.0))
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
        interventions = checked_steering(
            self,
            steering,
            strength=strength,
            positions=positions,
            layers=layers,
            op=op,
            when=when,
            force=force,
            checked=self._checked_vectors,
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
        row_offset: int = 0,
    ) -> Iterator[list[PositionTracker]]:
        """Per-call steering plus pinned prompt lengths for every installed tracker."""
        per_call = normalize_steering(steering, tokenizer=self.tokenizer)
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
    def call_scope(
        self,
        batch: Batch,
        *,
        steering: Any = None,
        row_offset: int = 0,
    ) -> contextlib.AbstractContextManager[list[PositionTracker]]:
        """What every call of this model runs under, for code that runs an encoded batch itself
        (with hooks of its own, as :func:`steerlab.ablation.compute_means` and the cache
        replays of :mod:`steerlab.replay` do).

        For a ``with`` block: installs the steering recorded on this model (``add_steering``,
        ``steer`` in this context; an edited model's edits first), then the per-call
        ``steering`` (as in :meth:`logits`; a per-row list is sliced from ``row_offset``), and
        pins every position tracker to ``batch``'s prompt lengths; yields the active trackers.
        Run the batch with :meth:`forward_batch` inside it.

        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> batch = model.encode(["the cat sat", "a dog"])
        >>> with model.call_scope(batch), torch.no_grad():
        ...     logits = model.forward_batch(batch).logits.float().cpu()
        >>> bool(torch.equal(logits, model.logits(["the cat sat", "a dog"])))
        True
        """
        return self._call_scope(steering, batch, row_offset=row_offset)

    def forward_batch(self, batch: Batch, **kwargs: Any) -> Any:
        """``hf_model``'s output for a batch from :meth:`encode`: moved to the model's device,
        no KV cache, position ids where the model takes them; ``kwargs`` go to ``hf_model``.

        Installs nothing itself: inside :meth:`call_scope` it runs with the model's steering
        (see the example there).
        """
        batch = batch.to(self.device)
        return self.hf_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            **position_kwargs(self.hf_model, batch.position_ids),
            **kwargs,
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

        ``strength``/``positions``/``op``/``when`` are deprecated: give
        ``steering=sl.Steering(vector, strength=..., ...)``.
        """
        return run_chunks(
            self,
            prompts,
            lambda chunk: self.forward_batch(chunk).logits.float().cpu(),
            steering=fold_loose(
                "logits", steering, strength=strength, positions=positions, op=op, when=when
            ),
            batch_size=batch_size,
            padding_side=padding_side,
            chat=chat,
        )

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
        steering = fold_loose(
            "next_token_logits", steering, strength=strength, positions=positions, op=op, when=when
        )
        return run_chunks(
            self,
            prompts,
            lambda chunk: last_token_logits(self, chunk),
            steering=steering,
            batch_size=batch_size,
            chat=chat,
        )

    # --- cache replays (steerlab.replay) -------------------------------------------------------
    def prefix_cache(
        self, prompts: Sequence[str] | str, *, layer: int, chat: bool = False
    ) -> PrefixCache:
        """Run the prompts once and keep what blocks ``layer..`` need to be re-run alone
        (:func:`steerlab.replay.prefix_cache`)."""
        return replay.prefix_cache(self, prompts, layer=layer, chat=chat)

    def run_from(
        self,
        cache: PrefixCache,
        *,
        repeat: int = 1,
        steering: Any = None,
        strength: float | Mapping[int, float] | None = None,
        positions: PositionSpec | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``[repeat * n, vocab]`` re-running only blocks ``cache.layer..``
        (:func:`steerlab.replay.run_from`)."""
        steering = fold_loose("run_from", steering, strength=strength, positions=positions)
        return replay.run_from(self, cache, repeat=repeat, steering=steering)

    def last_token_cache(
        self, prompts: Sequence[str] | str, *, chat: bool = False
    ) -> LastTokenCache:
        """Run the prompts once, unsteered, and keep the key/value cache of all but the last
        token (:func:`steerlab.replay.last_token_cache`)."""
        return replay.last_token_cache(self, prompts, chat=chat)

    def cache_keyword(self) -> str:
        """The keyword this model's forward takes its key/value cache by
        (:func:`steerlab.replay.cache_keyword`).

        >>> from steerlab.testing import tiny_model
        >>> tiny_model("llama").cache_keyword() in ("cache", "past_key_values")
        True
        """
        return replay.cache_keyword(self.hf_model)

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
        """Next-token logits ``[repeat * n, vocab]`` re-running only each prompt's last token
        (:func:`steerlab.replay.run_last`).

        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> cache = model.last_token_cache(["the cat sat"])
        >>> bool(torch.allclose(model.run_last(cache), model.next_token_logits(["the cat sat"]),
        ...                     atol=1e-5))
        True
        """
        steering = fold_loose("run_last", steering, strength=strength, positions=positions)
        return replay.run_last(self, cache, repeat=repeat, steering=steering, last_ids=last_ids)

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
        """:meth:`run_last` plus the block outputs at the re-run token
        (:func:`steerlab.replay.run_last_with_activations`)."""
        steering = fold_loose(
            "run_last_with_activations", steering, strength=strength, positions=positions
        )
        return replay.run_last_with_activations(
            self, cache, layers=layers, repeat=repeat, steering=steering, last_ids=last_ids
        )

    def prompt_cache(self, prompts: Sequence[str] | str, *, chat: bool = False) -> LastTokenCache:
        """Run the prompts once, unsteered, keeping the key/value cache of every prompt token
        (:func:`steerlab.replay.prompt_cache`)."""
        return replay.prompt_cache(self, prompts, chat=chat)

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
        """Sum of log p(continuation tokens) after each cached prompt
        (:func:`steerlab.replay.score_continuations`)."""
        steering = fold_loose(
            "score_continuations", steering, strength=strength, positions=positions
        )
        return replay.score_continuations(
            self, cache, continuations, repeat=repeat, steering=steering
        )

    @torch.no_grad()
    def activations(
        self,
        prompts: Sequence[str] | str,
        *,
        layers: int | Sequence[int] | None = None,
        read_at: str | int | None = None,
        batch_size: int = 16,
        steering: Any = None,
        padding_side: str = "left",
        chat: bool = False,
        progress: bool | None = None,
        site: str = "resid",
        positions: str | int | None = None,
        strength: float | Mapping[int, float] | None = None,
        op: str | None = None,
        when: Any = None,
    ) -> LayerActivations:
        """Residual-stream activations at the output of ``layers`` (default: all), or those of
        another ``site`` of those blocks (:mod:`steerlab.sites`: ``"attn_out"``, ``"mlp_out"``,
        ``"head"`` (width ``n_heads * head_dim``), ``"router"`` (one logit per expert)).

        ``read_at`` (which tokens are read, not steered): ``"last"`` (default) →
        ``Tensor[n, d_model]`` of each prompt's last token, ``"mean"`` → the mean over each
        prompt's tokens, ``"all"`` → a list of ``Tensor[len_i, d_model]``, an int ``i`` → the
        token at index ``i`` of each prompt (negative counts from the end: ``-2`` is the answer
        letter of a CAA ``"(A)"`` prompt). ``steering`` (as in :meth:`logits`) steers the pass
        being read. Results are float32 on the CPU; memory grows with the reduced results, not
        with full sequences. The forward pass stops after the deepest requested layer.
        Deprecated: ``positions=`` (now ``read_at=``) and ``strength``/``op``/``when`` (give a
        :class:`~steerlab.interventions.Steering`).

        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> acts = model.activations(["the cat", "a dog ran"], layers=[0, -1])
        >>> sorted(acts), tuple(acts[-1].shape)
        ([0, 2], (2, 32))
        >>> tuple(model.activations(["the cat"], layers=[1], site="mlp_out")[1].shape)
        (1, 32)
        """
        positions = renamed_keyword(
            "activations",
            old="positions",
            new="read_at",
            old_value=positions,
            new_value=read_at,
            default="last",
        )
        steering = fold_loose("activations", steering, strength=strength, op=op, when=when)
        return reading.activations(
            self,
            prompts,
            layers=layers,
            read_at=positions,
            batch_size=batch_size,
            steering=steering,
            padding_side=padding_side,
            chat=chat,
            progress=progress,
            site=site,
        )

    # --- generation ------------------------------------------------------------------------------
    @overload
    def generate(self, prompts: str, **kwargs: Any) -> str: ...

    @overload
    def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[str]: ...

    def generate(self, prompts: Sequence[str] | str, **kwargs: Any) -> str | list[str]:
        """Generate continuations (new text only), steering at every step.

        Keyword options: ``max_new_tokens`` (32), ``steering`` as in :meth:`logits` (the loose
        ``strength``/``positions``/``op``/``when`` are deprecated), ``do_sample`` (False: greedy),
        ``temperature``,
        ``top_p``, ``top_k``, ``seed`` (sampling seed, global RNG untouched), ``chat`` (apply
        the chat template), ``batch_size``, ``use_cache`` (True). A string prompt returns a string.

        >>> from steerlab.testing import tiny_model
        >>> text = tiny_model("mistral").generate("the cat", max_new_tokens=3)
        >>> isinstance(text, str)
        True
        """
        single = isinstance(prompts, str)
        loose = {key: kwargs.pop(key) for key in LOOSE_KEYWORDS if key in kwargs}
        if loose:
            kwargs["steering"] = fold_loose("generate", kwargs.get("steering"), **loose)
        texts = [
            self.tokenizer.decode(ids, skip_special_tokens=True)
            for ids in self.generate_ids(prompts, **kwargs)
        ]
        return texts[0] if single else texts

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
        steering = fold_loose(
            "generate_ids", steering, strength=strength, positions=positions, op=op, when=when
        )
        return generation.generate_ids(
            self,
            prompts,
            max_new_tokens=max_new_tokens,
            steering=steering,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            chat=chat,
            batch_size=batch_size,
            use_cache=use_cache,
        )


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
        # steering of this object (add_steering, steer), applied after the edits
        self._stack = EditStack(f"steerlab_edit_{id(self)}")
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
        self._stack.clear()

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
        return self._stack.record(self._checked(interventions))

    @contextlib.contextmanager
    def _activate(self, interventions: list[Intervention]) -> Iterator[HookHandle]:
        """``steer``'s scope: applied after the edits, in this thread / task only."""
        with self._stack.pushed(self._checked(interventions)) as handle:
            yield handle

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
        return [*self._edits, *self._stack.items(), *per_call]


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
    ...                           read_at="all")[-1][0]
    >>> edited = edit(model, sl.ReplaceActivation(-1, paris))
    >>> a = edited.logits(["the capital of germany is"])[0, -1]
    >>> b = edited.logits(["the capital of japan is"])[0, -1]
    >>> bool(torch.allclose(a, b))   # both read Paris' hidden state at position 4
    True
    """
    if not isinstance(model, SteeredModel):
        raise InvalidInputError(f"edit() needs a SteeredModel, got {type(model).__name__}")
    new = edit_interventions(
        steering, strength=strength, positions=positions, layers=layers, tokenizer=model.tokenizer
    )
    if isinstance(model, EditedModel):
        model.check_alive()
        return EditedModel(model.original, [*model.edits, *new])
    return EditedModel(model, new)
