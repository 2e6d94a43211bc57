"""Position tracking: the absolute index of every token during each forward call.

Every activation brings a :class:`PositionTracker` (per-thread state) that the backbone's
dispatcher (:mod:`steerlab.dispatch`) feeds with each forward call's attention mask; it works out
the *absolute* index of every token (prompt start = 0, padding = -1), so position specs
(:mod:`steerlab.positions`) mean the same thing with or without a KV cache. What is remembered
about one row between calls lives in its :class:`SequenceState`.

>>> tracker = PositionTracker()
>>> tracker.pre_hook(None, (), {"input_ids": torch.ones(1, 3, dtype=torch.long),
...                             "attention_mask": torch.tensor([[0, 1, 1]])})
>>> tracker.abs_index.tolist()
[[-1, 0, 1]]
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from steerlab.errors import InvalidInputError
from steerlab.positions import Positions, marker_flags

__all__ = ["PositionTracker", "SequenceState", "positions_without_2d_mask"]


_TRACKING_IDS: weakref.WeakSet[PositionTracker] = weakref.WeakSet()


# --- position tracking --------------------------------------------------------------------------
class PositionTracker(threading.local):
    """Knows, during each forward call, the absolute index of every token in the batch.

    ``prompt_lengths_override`` (set by steerlab's own ``generate``/``logits`` for the duration
    of a call) pins the prompt length ``P`` of each row; otherwise ``P`` is read off the first
    forward call of a sequence (one that starts with an empty cache).

    The state is per thread (a :class:`threading.local`): one tracker serves steering installed
    for every thread, and two threads running forward passes at once never see each other's
    positions.

    Token history: when an installed intervention selects tokens by content (``after:``,
    ``between:``, ``outside:``) it sets ``track_ids``; the tracker then keeps each row's token
    ids by absolute index (a new token is appended, a token that differs from the recorded one
    at its index truncates the row's history there: a new sequence), so a mask at token ``i``
    is computed from tokens ``0..i`` whether they arrive one per call (KV cache) or all at once.
    Scans are incremental: each row's marker state is carried from one call to the next.

    What is remembered about a row between calls lives in its :class:`SequenceState`. The
    tracker makes one per row of the batch it sees; ``sequences_override`` (set, like
    ``prompt_lengths_override``, for the duration of a call) hands each row its own instead,
    for a server that regroups sequences between calls: a request's token ids, marker scans and
    condition verdicts then follow it from one batch to the next.
    """

    def __init__(self) -> None:
        self.abs_index: torch.Tensor | None = None
        self.prompt_lengths: torch.Tensor | None = None
        self.all_real: bool = True
        self.prompt_lengths_override: torch.Tensor | None = None
        self.sequences_override: list[SequenceState] | None = None
        self.sequences: list[SequenceState] | None = None
        self._have_ids = False
        self._borrowed = False
        self._masks: dict[Positions, torch.Tensor] = {}

    @property
    def history(self) -> list[list[int]] | None:
        """Each row's recorded token ids (``None`` when the last call brought no ids)."""
        if self.sequences is None or not self._have_ids:
            return None
        return [state.ids for state in self.sequences]

    # configuration, not state: shared by every thread (a data descriptor on the class, so the
    # per-thread attribute dict never shadows it)
    @property
    def track_ids(self) -> bool:
        """Whether this tracker records token ids (set when content-based positions are used)."""
        return self in _TRACKING_IDS

    @track_ids.setter
    def track_ids(self, value: bool) -> None:
        if value:
            _TRACKING_IDS.add(self)
        else:
            _TRACKING_IDS.discard(self)

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook on the backbone (registered ``with_kwargs=True``)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            ids = kwargs.get("inputs_embeds")
        if not isinstance(ids, torch.Tensor) or ids.ndim < 2:
            return
        batch, length = ids.shape[0], ids.shape[1]
        mask = kwargs.get("attention_mask")
        if (
            isinstance(mask, torch.Tensor)
            and mask.ndim == 2
            and mask.shape[0] == batch
            and mask.shape[1] >= length
        ):
            offset = mask.shape[1] - length
            real = mask.bool()
            cum = real.long().cumsum(dim=1) - 1
            current_real = real[:, offset:]
            abs_index = torch.where(
                current_real, cum[:, offset:], torch.full_like(cum[:, offset:], -1)
            )
            inferred = real.long().sum(dim=1)
            self.all_real = bool(current_real.all())
        else:
            offset = _cache_length(kwargs)
            abs_index, inferred = positions_without_2d_mask(
                kwargs, batch, length, offset, ids.device
            )
            self.all_real = bool((abs_index >= 0).all())
        self.abs_index = abs_index
        self._masks = {}
        given = self.sequences_override
        if given is not None:
            if len(given) != batch:
                raise InvalidInputError(
                    f"{len(given)} sequence states were given for a batch of {batch} rows"
                )
            self.sequences = list(given)
        elif self._borrowed:
            self.sequences = None  # the lent states went back with their call
        self._borrowed = given is not None
        if self.track_ids:
            ids_now = kwargs.get("input_ids", args[0] if args else None)
            self._record(ids_now if isinstance(ids_now, torch.Tensor) else None, abs_index)
        override = self.prompt_lengths_override
        if override is not None and override.shape[0] == batch:
            self.prompt_lengths = override.to(ids.device)
        elif offset == 0 or self.prompt_lengths is None or self.prompt_lengths.shape[0] != batch:
            self.prompt_lengths = inferred if offset == 0 else torch.full_like(inferred, offset)

    def _record(self, ids: torch.Tensor | None, abs_index: torch.Tensor) -> None:
        if ids is None or ids.ndim != 2:
            self._have_ids = False  # embeddings only: content specs refuse in mask()
            return
        self._have_ids = True
        batch = ids.shape[0]
        if self.sequences is None or len(self.sequences) != batch:
            self.sequences = [SequenceState() for _ in range(batch)]
        for row, (tokens, indices) in enumerate(zip(ids.tolist(), abs_index.tolist())):
            self.sequences[row].record(tokens, indices, row=row)

    def mask(self, positions: Positions) -> torch.Tensor:
        """Boolean ``[batch, seq]`` mask of the tokens ``positions`` selects in this call."""
        if self.abs_index is None or self.prompt_lengths is None:
            raise RuntimeError("PositionTracker used outside a forward call")
        if not positions.needs_ids:
            return positions.mask(self.abs_index, self.prompt_lengths)
        cached = self._masks.get(positions)
        if cached is not None:
            return cached
        if self.sequences is None or not self._have_ids:
            raise InvalidInputError(
                f"positions {positions.describe()!r} need the token ids of the call (input_ids); "
                f"this forward call has none"
            )
        rows = []
        for state, indices in zip(self.sequences, self.abs_index.tolist()):
            flags = state.flags(positions)
            rows.append([0 <= i < len(flags) and flags[i] for i in indices])
        out = torch.tensor(rows, dtype=torch.bool).to(self.abs_index.device)
        self._masks[positions] = out
        return out


@dataclasses.dataclass(eq=False)
class SequenceState:
    """What a :class:`PositionTracker` remembers about one row's sequence between calls.

    ``ids``: its token ids by absolute index (recorded while content-based positions are in
    use); ``scans``: for each content spec, the selection flag of every recorded token and the
    scan state after the last one (see :func:`~steerlab.positions.marker_flags`);
    ``verdicts``: for each prompt-level condition, whether the prompt satisfied it (written by
    the condition's probe when it reads the whole prompt, read back on later calls).

    >>> state = SequenceState()
    >>> state.record([4, 5, 6], [0, 1, 2])
    >>> state.flags(Positions.after(ids=[5]))
    [False, True, True]
    >>> state.record([7], [3]); state.flags(Positions.after(ids=[5]))
    [False, True, True, True]
    """

    ids: list[int] = dataclasses.field(default_factory=list)
    scans: dict[Positions, tuple[list[bool], bool]] = dataclasses.field(default_factory=dict)
    verdicts: dict[Any, bool] = dataclasses.field(default_factory=dict)

    def record(self, tokens: Sequence[int], indices: Sequence[int], *, row: int = 0) -> None:
        """Record ``tokens`` at absolute ``indices`` (``-1``: padding, skipped).

        A token equal to the one recorded at its index changes nothing; a different one starts
        a new sequence there (the history, scans and verdicts from that index on are dropped).
        """
        ids = self.ids
        for token, index in zip(tokens, indices):
            if index < 0:
                continue
            if index < len(ids):
                if ids[index] == token:
                    continue
                del ids[index:]
                self.scans = {}
                self.verdicts = {}
            if index != len(ids):
                raise InvalidInputError(
                    f"token history of row {row} has {len(ids)} tokens but the call brings "
                    f"token {index}; content-based positions need every token of the sequence"
                )
            ids.append(int(token))

    def flags(self, positions: Positions) -> list[bool]:
        """Selection flag of every recorded token for the content spec ``positions``."""
        flags, state = self.scans.get(positions, ([], False))
        if len(flags) < len(self.ids):
            more, state = marker_flags(positions, self.ids, start=len(flags), state=state)
            flags.extend(more)
            self.scans[positions] = (flags, state)
        return flags


def positions_without_2d_mask(
    kwargs: Mapping[str, Any], batch: int, length: int, offset: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(abs_index [batch, length], real tokens so far [batch])`` for a forward call whose
    attention mask is not the usual 2-D padding mask.

    Read, in order of preference, off:

    * a 4-D mask ``[batch, 1, query, key]`` (what some models' ``generate`` builds before the
      backbone runs, e.g. Gemma 2 with its ``HybridCache`` on transformers 4.x): the last query
      attends to exactly the real keys up to it, padding excluded, so its row is the padding
      mask; the current tokens sit at keys ``cache_position`` (or the last ``length`` keys);
    * ``position_ids`` ``[batch, length]``: no padding information, every token counted real;
    * otherwise ``offset .. offset + length - 1`` (``offset``: the KV cache length).

    >>> mask = torch.tensor([[0, 1, 1], [1, 1, 1]]).bool()  # row 0 left-padded by one
    >>> causal = torch.ones(3, 3).tril().bool()
    >>> four_d = (mask[:, None, :] & causal[None])[:, None]
    >>> cpu = torch.device("cpu")
    >>> abs_index, real = positions_without_2d_mask({"attention_mask": four_d}, 2, 3, 0, cpu)
    >>> abs_index.tolist(), real.tolist()
    ([[-1, 0, 1], [0, 1, 2]], [2, 3])
    """
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[0] == batch:
        last = mask[:, 0, -1, :]
        attended = last if last.dtype == torch.bool else last == 0
        keys = attended.shape[1]
        where = kwargs.get("cache_position")
        if not (isinstance(where, torch.Tensor) and where.ndim == 1 and where.numel() == length):
            where = torch.arange(keys - length, keys, device=attended.device)
        where = where.to(attended.device).long()
        cum = attended.long().cumsum(dim=1) - 1
        current = attended[:, where]
        abs_index = torch.where(current, cum[:, where], torch.full_like(cum[:, where], -1))
        return abs_index, attended.long().sum(dim=1)
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2:
        if position_ids.shape == (batch, length) or position_ids.shape == (1, length):
            abs_index = position_ids.long().expand(batch, length)
            return abs_index, abs_index[:, -1] + 1
    abs_index = torch.arange(offset, offset + length, device=device).expand(batch, length)
    return abs_index, torch.full((batch,), offset + length, dtype=torch.long, device=device)


def _cache_length(kwargs: Mapping[str, Any]) -> int:
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        get = getattr(cache, "get_seq_length", None)
        if callable(get):
            return int(get())
        if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
            return int(cache[0][0].shape[-2])
    return 0
