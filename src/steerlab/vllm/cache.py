"""Prefix-cache isolation: vLLM reuses a cached block only where the steering was identical.

vLLM's prefix cache keys every full block of tokens (prompt and generated alike) by the block's
token ids, chained on the key of the block before it, plus "extra keys" (LoRA adapter,
multimodal hashes, the request's ``cache_salt``). Steering changes the keys and values a block
holds without changing its token ids, so without more, an unsteered request can pick up the
KV that a steered request computed (and the other way round).

The plugin adds one extra key to each block a request steers: a digest of the steering the
request applies at that block's positions, :func:`block_key`. A block's KV depends on the
steering of its own tokens and (through attention) of every token before it; the latter is
already in the key through the chain. So a block is reused exactly when the token ids and the
steering of every position up to its end are identical: unsteered requests share their prefixes
with each other, identically steered requests with each other, and a request steered only at
generated positions (or only at the last prompt token) still shares every block before the
first steered position with unsteered requests.

The digest is of the steering *content* the worker applies: per entry, its operator, the
float32 ``strength × direction`` (other operators: their constants) of each resolved layer (so
``strength=8`` and ``{15: 8}`` on a one-layer vector are the same), and the offsets of the
block's tokens it selects. Readout never enters it: probes read the stream, they do not change
it.

Why not vLLM's ``cache_salt``: it salts the first block and therefore the whole chain, so a
request steered only at generated positions would either lose all sharing with unsteered
requests or (unsalted) leave its steered generated blocks to be reused by a follow-up request
whose prompt contains that text. The per-block key covers both. A ``cache_salt`` the client
sends keeps working as vLLM documents it (tenants apart); clients of a plain ``vllm serve``
need not send anything for steering: the key is added in vLLM's engine process, where the
plugin is loaded like everywhere else.

>>> import torch
>>> from steerlab import Steering, SteeringVector
>>> from steerlab.vllm.spec import to_wire
>>> wire = to_wire([Steering(SteeringVector({1: torch.ones(2)}), positions="generated")])
>>> entries = steering_digests(wire, n_layers=2, d_model=2)
>>> block_key(entries, start=0, stop=4, prompt_len=6) is None      # prompt tokens: shareable
True
>>> block_key(entries, start=4, stop=8, prompt_len=6) is not None  # holds generated tokens
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from steerlab.errors import SteerlabError
from steerlab.positions import Positions, marker_flags
from steerlab.vllm.conditions import condition_digest
from steerlab.vllm.spec import EXTRA_ARGS_KEY, resolve

__all__ = [
    "EXTRA_KEY",
    "EntryDigest",
    "block_key",
    "request_block_key",
    "steering_digests",
]

EXTRA_KEY = "steerlab"
"""Name of the extra key steerlab adds to a steered block's prefix-cache hash."""


@dataclasses.dataclass(frozen=True)
class EntryDigest:
    """One steering entry as the cache sees it: where it applies and a digest of what it adds
    (``positions`` ``None``: the steering could not be parsed, every block is keyed)."""

    positions: Positions | None
    digest: bytes


def steering_digests(
    wire: Any, *, n_layers: int, d_model: int, prompt: Sequence[int] | None = None
) -> list[EntryDigest]:
    """Per steering entry of a request's wire value, its positions and content digest.

    A conditioned entry's digest holds its condition, and for a prompt-level condition the
    whole ``prompt`` too: whether it steers any block depends on every prompt token (a verdict
    on the prompt's mean), which the chain of block keys alone does not cover.

    Steering that fails to parse is keyed by its raw text on every block: the worker ignores
    it, but a cache that isolates too much is only slower, never wrong.

    >>> steering_digests(None, n_layers=2, d_model=2)
    []
    >>> [e.positions for e in steering_digests({"steering": 3}, n_layers=2, d_model=2)]
    [None]
    """
    if wire is None:
        return []
    try:
        entries = resolve(wire, n_layers=n_layers, d_model=d_model)
    except (SteerlabError, TypeError, ValueError):
        return [_raw_digest(wire)]
    out: list[EntryDigest] = []
    for entry in entries:
        hasher = hashlib.sha256(entry.op.encode())
        tensors = (
            {layer: {"delta": d} for layer, d in entry.deltas.items()}
            if entry.op == "add"
            else entry.params
        )
        for layer in sorted(tensors):
            hasher.update(layer.to_bytes(4, "little", signed=True))
            for name in sorted(tensors[layer]):
                value = tensors[layer][name].detach().to("cpu", torch.float32).contiguous()
                hasher.update(name.encode() + b"\0")
                hasher.update(value.numpy().tobytes())
        if entry.when is not None:
            hasher.update(b"when" + condition_digest(entry.when))
            if entry.when.scope == "prompt":
                ids = torch.tensor(list(prompt or ()), dtype=torch.long)
                hasher.update(b"prompt" + ids.numpy().tobytes())
        out.append(EntryDigest(entry.positions, hasher.digest()))
    return out


def block_key(
    entries: Sequence[EntryDigest],
    *,
    start: int,
    stop: int,
    prompt_len: int,
    token_ids: Sequence[int] | None = None,
) -> str | None:
    """The extra key of the block of positions ``start:stop`` (``None``: nothing steered there).

    Positions chosen by text are decided on ``token_ids`` (the request's ids through at least
    ``stop``); without them such an entry keys every block (isolating, never sharing wrongly).

    >>> e = EntryDigest(Positions.parse("last"), b"x")
    >>> block_key([e], start=0, stop=4, prompt_len=8) is None
    True
    >>> key = block_key([e], start=4, stop=8, prompt_len=8)
    >>> key == block_key([e], start=4, stop=8, prompt_len=9), key is not None
    (False, True)
    """
    hasher: Any = None
    index = torch.arange(start, stop).unsqueeze(0)
    plen = torch.tensor([prompt_len])
    for entry in entries:
        if entry.positions is None:
            offsets = b"*"
        elif entry.positions.needs_ids:
            if token_ids is None or len(token_ids) < stop or entry.positions.marker_ids is None:
                offsets = b"*"
            else:
                flags = marker_flags(entry.positions, list(token_ids[:stop]))[0][start:stop]
                if not any(flags):
                    continue
                offsets = bytes(flags)
        else:
            mask = entry.positions.mask(index, plen)[0]
            if not bool(mask.any()):
                continue
            offsets = mask.to(torch.uint8).numpy().tobytes()
        hasher = hasher or hashlib.sha256()
        hasher.update(entry.digest)
        hasher.update(offsets)
    return None if hasher is None else hasher.hexdigest()


def _raw_digest(wire: Any) -> EntryDigest:
    text = wire if isinstance(wire, str) else json.dumps(wire, sort_keys=True, default=str)
    return EntryDigest(None, hashlib.sha256(text.encode("utf-8", "replace")).digest())


_ENTRIES = "_steerlab_cache_entries"


def request_block_key(
    request: Any, start: int, stop: int, *, dims: tuple[int, int] | None
) -> str | None:
    """:func:`block_key` for a vLLM ``Request`` (its steering parsed once, kept on it).

    ``dims`` is the model's ``(n_layers, d_model)``; unknown, steered blocks are keyed by the
    raw steering (isolating, never sharing wrongly).
    """
    entries = getattr(request, _ENTRIES, None)
    if entries is None:
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        wire = extra.get(EXTRA_ARGS_KEY) if isinstance(extra, dict) else None
        if wire is None:
            entries = []
        elif dims is None:
            entries = [_raw_digest(wire)]
        else:
            prompt = getattr(request, "prompt_token_ids", None)
            entries = steering_digests(wire, n_layers=dims[0], d_model=dims[1], prompt=prompt)
        setattr(request, _ENTRIES, entries)
    if not entries:
        return None
    prompt_len = int(getattr(request, "num_prompt_tokens", 0) or 0)
    token_ids = None
    if any(e.positions is not None and e.positions.needs_ids for e in entries):
        token_ids = getattr(request, "all_token_ids", None)
    return block_key(entries, start=start, stop=stop, prompt_len=prompt_len, token_ids=token_ids)
