"""Cache replays: run the prompts once, then re-run only what a configuration changes.

Sweeps and the CAA evaluations try many steering configurations on the same prompts. A
:class:`PrefixCache` keeps the inputs of blocks ``layer..`` so :func:`run_from` re-runs only
those blocks; a :class:`LastTokenCache` keeps the key/value cache of all but each prompt's last
token so :func:`run_last` re-runs one token; :func:`prompt_cache` keeps every prompt token so
:func:`score_continuations` scores continuations alone. All are built on a model's public
``call_scope``/``forward_batch`` (:class:`~steerlab.batch.BatchRunner`); the
:class:`~steerlab.model.SteeredModel` methods of the same names delegate here.

>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> cache = last_token_cache(model, ["the cat sat"])
>>> bool(torch.allclose(run_last(model, cache), model.next_token_logits(["the cat sat"]),
...                     atol=1e-5))
True
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from steerlab.batch import Batch, BatchRunner, check_steering_rows, last_token_logits, tile_rows
from steerlab.checks import as_positive_int, check_prompts
from steerlab.dispatch import HookSpec, scoped_hooks
from steerlab.errors import InvalidInputError
from steerlab.sites import output_hidden

__all__ = [
    "LastTokenCache",
    "PrefixCache",
    "cache_keyword",
    "last_token_cache",
    "output_cache",
    "prefix_cache",
    "prompt_cache",
    "run_from",
    "run_last",
    "run_last_with_activations",
    "score_continuations",
]


@dataclasses.dataclass(frozen=True)
class PrefixCache:
    """What :func:`run_from` needs to re-run blocks ``layer..`` alone.

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
    """What :func:`run_last` needs to re-run only the last token of each prompt.

    ``past`` is the unsteered key/value cache of every prompt minus its last token (left
    padding puts every last token in the final column); ``logits`` the unsteered next-token
    logits; ``exact`` whether replaying the last token over ``past`` reproduced them.
    """

    batch: Batch
    past: Any
    logits: torch.Tensor
    exact: bool


def output_cache(out: Any) -> Any:
    """The key/value cache a forward pass returned: ``out.cache`` on transformers releases
    that renamed it (reading the old ``past_key_values`` there warns), else the old name."""
    keys = out.keys() if callable(getattr(out, "keys", None)) else ()
    if "cache" in keys:
        return out["cache"]
    return getattr(out, "past_key_values", None)


def cache_keyword(hf_model: nn.Module) -> str:
    """The keyword ``hf_model``'s forward takes its key/value cache by: ``"cache"`` on
    transformers releases that renamed it (the old name then warns), else
    ``"past_key_values"``.

    >>> from steerlab.testing import tiny_hf_model
    >>> cache_keyword(tiny_hf_model("llama")) in ("cache", "past_key_values")
    True
    """
    params = inspect.signature(hf_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# --- prefix reuse ----------------------------------------------------------------------------
@torch.no_grad()
def prefix_cache(
    model: BatchRunner, prompts: Sequence[str] | str, *, layer: int, chat: bool = False
) -> PrefixCache:
    """Run the prompts once and keep what blocks ``layer..`` need to be re-run alone.

    Sweeps and scans that only change blocks ``>= layer`` reuse this prefix through
    :func:`run_from` instead of recomputing the blocks below for every configuration.
    ``cache.exact`` is False when the replayed tail did not reproduce the full forward
    pass (an unusual architecture); callers then fall back to full passes.

    >>> from steerlab.testing import tiny_model
    >>> cache = prefix_cache(tiny_model("llama"), ["the cat", "a dog ran"], layer=1)
    >>> cache.exact, tuple(cache.hidden.shape)
    (True, (2, 3, 32))
    """
    items = check_prompts(prompts)
    start_layer = model.adapter.resolve_layer(layer)
    batch = model.encode(items, chat=chat).to(model.device)
    inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def make_capture(index: int) -> Any:
        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[index] = (args, dict(kwargs))

        return capture

    captures = [
        HookSpec(model.adapter.block(index), "forward_pre_kwargs", make_capture(index))
        for index in range(start_layer, model.n_layers)
    ]
    with model.call_scope(batch):
        with scoped_hooks(captures):
            logits = last_token_logits(model, batch)
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
    replayed = run_from(model, cache)
    exact = bool(torch.allclose(replayed, logits, atol=1e-4, rtol=1e-4))
    return dataclasses.replace(cache, exact=exact)


@torch.no_grad()
def run_from(
    model: BatchRunner,
    cache: PrefixCache,
    *,
    repeat: int = 1,
    steering: Any = None,
) -> torch.Tensor:
    """Next-token logits ``[repeat * n, vocab]`` re-running only blocks ``cache.layer..``.

    Row ``c * n + i`` is prompt ``i`` under configuration ``c``: pass per-row ``steering``
    (a list of ``repeat * n`` entries) to evaluate many strengths or vectors in one batch.
    Interventions below ``cache.layer`` have no effect here (that part was computed once).

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> cache = prefix_cache(model, ["the cat"], layer=1)
    >>> run_from(model, cache, repeat=2).shape[0]
    2
    """
    if not isinstance(cache, PrefixCache):
        raise InvalidInputError(
            f"run_from needs a PrefixCache from model.prefix_cache(...), got {type(cache).__name__}"
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
    check_steering_rows(steering, n * repeat)
    hidden = tile_rows(cache.hidden, repeat, n)
    with model.call_scope(expanded, steering=steering) as trackers:
        for tracker in trackers:
            tracker.pre_hook(
                model.adapter.backbone,
                (),
                {"input_ids": expanded.input_ids, "attention_mask": expanded.attention_mask},
            )
        for index in range(cache.layer, model.n_layers):
            args, kwargs = cache.block_inputs[index]
            args = tuple(tile_rows(a, repeat, n) for a in args)
            kwargs = {k: tile_rows(v, repeat, n) for k, v in kwargs.items()}
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = hidden
            else:
                args = (hidden, *args[1:])
            hidden = output_hidden(model.adapter.block(index)(*args, **kwargs))
        return model.adapter.logits_from_final_hidden(hidden[:, -1:]).squeeze(1).float().cpu()


# --- last-position reuse -------------------------------------------------------------------
def _cached_forward(model: BatchRunner, batch: Batch, **kwargs: Any) -> Any:
    """``model.hf_model`` on the whole of ``batch`` with a key/value cache kept."""
    device_batch = batch.to(model.device)
    return model.hf_model(
        input_ids=device_batch.input_ids,
        attention_mask=device_batch.attention_mask,
        position_ids=device_batch.position_ids,
        use_cache=True,
        **kwargs,
    )


@torch.no_grad()
def last_token_cache(
    model: BatchRunner, prompts: Sequence[str] | str, *, chat: bool = False
) -> LastTokenCache:
    """Run the prompts once, unsteered, and keep the key/value cache of all but the last token.

    Steering that only touches the last prompt position cannot change anything before it
    (attention is causal), so :func:`run_last` re-runs that one token per configuration over
    this cache: ``T`` times fewer token-block passes than a full forward pass for prompts of
    ``T`` tokens. ``cache.exact`` is False when the replayed last token did not reproduce the
    full pass (a prompt of one token, or a model whose cache cannot be cropped); callers then
    use full passes.

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> cache = last_token_cache(model, ["the cat sat", "a dog"])
    >>> cache.exact, tuple(cache.logits.shape) == (2, model.hf_model.config.vocab_size)
    (True, True)
    """
    items = check_prompts(prompts)
    batch = model.encode(items, chat=chat)
    with model.call_scope(batch):
        try:
            out = _cached_forward(model, batch, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep
            out = _cached_forward(model, batch)
    logits = out.logits[:, -1].float().cpu()
    past = output_cache(out)
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
        replayed = run_last(model, cache)
        exact = bool(torch.allclose(replayed, logits, atol=1e-4, rtol=1e-4))
    return dataclasses.replace(cache, exact=exact)


@torch.no_grad()
def run_last(
    model: BatchRunner,
    cache: LastTokenCache,
    *,
    repeat: int = 1,
    steering: Any = None,
    last_ids: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token logits ``[repeat * n, vocab]`` re-running only each prompt's last token.

    Row ``c * n + i`` is prompt ``i`` under configuration ``c`` (as in :func:`run_from`).
    Only steering of the last position is exact here: anything it would do to earlier
    positions is not applied (they come from the cache). ``last_ids`` replaces the last
    token of each of the ``n`` prompts (same prefix, another final token: the CAA answer
    letters ``A`` and ``B`` share everything before the letter). See the module example.
    """
    logits, _ = run_last_with_activations(
        model,
        cache,
        layers=(),
        repeat=repeat,
        steering=steering,
        last_ids=last_ids,
    )
    return logits


def _tiled_past(model: BatchRunner, past: Any, n: int, repeat: int) -> Any:
    """A copy of ``past`` with its ``n`` rows tiled ``repeat`` times (a forward pass appends
    to the cache, so every call works on its own copy)."""
    past = copy.deepcopy(past)
    if repeat > 1:
        past.reorder_cache(torch.arange(n, device=model.device).repeat(repeat))
    return past


@torch.no_grad()
def run_last_with_activations(
    model: BatchRunner,
    cache: LastTokenCache,
    *,
    layers: Sequence[int],
    repeat: int = 1,
    steering: Any = None,
    last_ids: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """:func:`run_last` plus the block outputs at the re-run token:
    ``(logits, {layer: Tensor[repeat * n, d_model]})`` (float32, CPU).

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> logits, acts = run_last_with_activations(
    ...     model, last_token_cache(model, ["the cat sat"]), layers=[1])
    >>> tuple(acts[1].shape) == (1, model.adapter.d_model)
    True
    """
    if repeat < 1:
        raise InvalidInputError(f"repeat must be positive, got {repeat}")
    if cache.past is None:
        raise InvalidInputError("this LastTokenCache holds no key/value cache")
    n = cache.batch.input_ids.shape[0]
    check_steering_rows(steering, n * repeat)
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
    past = _tiled_past(model, cache.past, n, repeat)
    device_batch = expanded.to(model.device)
    wanted = model.adapter.resolve_layers(list(layers)) if layers else []
    captured: dict[int, torch.Tensor] = {}

    def make_capture(index: int) -> Any:
        def grab(module: nn.Module, args: Any, output: Any) -> None:
            captured[index] = output_hidden(output)[:, -1].float().cpu()

        return grab

    reads = [
        HookSpec(model.adapter.block(layer), "forward", make_capture(layer)) for layer in wanted
    ]
    with model.call_scope(expanded, steering=steering):
        with scoped_hooks(reads):
            out = model.hf_model(
                input_ids=device_batch.input_ids[:, -1:],
                attention_mask=device_batch.attention_mask,
                position_ids=device_batch.position_ids[:, -1:],
                use_cache=True,
                **{cache_keyword(model.hf_model): past},
            )
    return out.logits[:, -1].float().cpu(), captured


# --- continuation scoring --------------------------------------------------------------------
@torch.no_grad()
def prompt_cache(
    model: BatchRunner, prompts: Sequence[str] | str, *, chat: bool = False
) -> LastTokenCache:
    """Run the prompts once, unsteered, keeping the key/value cache of *every* prompt token.

    :func:`score_continuations` then scores continuations after them under steering that
    only touches the continuation (``positions="generated"``), without re-running the
    prompts. ``cache.logits`` are the unsteered next-token logits after each prompt.

    >>> from steerlab.testing import tiny_model
    >>> cache = prompt_cache(tiny_model("llama"), ["the cat", "a dog ran"])
    >>> cache.exact, cache.logits.shape[0]
    (True, 2)
    """
    items = check_prompts(prompts)
    batch = model.encode(items, chat=chat)
    with model.call_scope(batch):
        out = _cached_forward(model, batch)
    past = output_cache(out)
    exact = past is not None and callable(getattr(past, "reorder_cache", None))
    return LastTokenCache(
        batch=batch, past=past, logits=out.logits[:, -1].float().cpu(), exact=exact
    )


@torch.no_grad()
def score_continuations(
    model: BatchRunner,
    cache: LastTokenCache,
    continuations: Sequence[Sequence[int]],
    *,
    repeat: int = 1,
    steering: Any = None,
) -> torch.Tensor:
    """Sum of log p(continuation tokens) after each cached prompt: ``Tensor[repeat * n]``.

    Row ``c * n + i`` scores ``continuations[c * n + i]`` (token ids) after prompt ``i`` of
    a :func:`prompt_cache`, under per-row ``steering`` (as in :func:`run_from`). Only
    steering of the continuation is applied (the prompt comes from the cache): use
    ``positions="generated"``. The first token is scored from ``cache.logits``. float64.

    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> cache = prompt_cache(model, ["the cat"])
    >>> ids = model.tokenizer(" sat on", add_special_tokens=False)["input_ids"]
    >>> bool(score_continuations(model, cache, [ids])[0] < 0)
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
    check_steering_rows(steering, rows)
    width = max(t.numel() for t in tails)
    tail_ids = torch.full((rows, width), model.pad_token_id, dtype=torch.long)
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
    past = _tiled_past(model, cache.past, n, repeat)
    device_batch = expanded.to(model.device)
    with model.call_scope(expanded, steering=steering):
        out = model.hf_model(
            input_ids=device_batch.input_ids[:, -width:],
            attention_mask=device_batch.attention_mask,
            position_ids=device_batch.position_ids[:, -width:],
            use_cache=True,
            **{cache_keyword(model.hf_model): past},
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
