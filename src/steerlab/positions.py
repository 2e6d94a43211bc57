"""Token positions an intervention acts on, defined over the absolute token sequence.

A position is counted from the first real (non-pad) token of the prompt, across prompt and
generated tokens alike, so the same spec selects the same tokens whether the model runs with a KV
cache (one new token per forward call) or recomputes the whole sequence each step.

==============  ========================================================================
spec            tokens selected (P = number of prompt tokens of that row)
==============  ========================================================================
``"all"``       every real token, prompt and generated
``"prompt"``    the prompt tokens ``0 .. P-1``
``"generated"`` generated tokens only, ``P ..``
``"last"``      the prompt's final token ``P-1`` and every generated token (what the seed's
                ``[:, -1, :]`` under ``tracer.all()`` does with a KV cache)
``3``/``[0,2]`` explicit indices from the prompt start; negative ones count from the prompt's
                end (``-1`` is ``P-1``)
``slice(a, b)`` ``a <= i < b`` (negative bounds relative to ``P``; ``b=None`` runs on into
                generated tokens)
==============  ========================================================================

The same specs as text, for the command line and JSON requests: ``"3"``, ``"0,-1"`` (indices),
``"2:"``, ``"-3:-1"``, ``"0:8:2"`` (slices). :meth:`Positions.parse` is the one parser of
this grammar: the library, the CLI, the server and the vLLM wire all call it.

Token selection by content. These specs are strings, so the same text works in Python, on the
command line (``--positions``) and in JSON requests; :class:`Positions` has a constructor for
each. A marker is text, turned into token ids with the model's tokenizer when the steering is
installed (also with a leading space, so ``" Yes"`` mid-sentence matches ``after:Yes``), or
token ids given directly (``Positions.after(ids=[...])``). Markers are looked for in the whole
sequence, prompt and generated tokens alike, and decided as tokens stream: whether token ``i``
is selected depends only on tokens ``0..i``, so a KV cache changes nothing.

========================  ==================================================================
spec                      tokens selected
========================  ==================================================================
``"first:K"``             the first ``K`` generated tokens, ``P <= i < P+K``
``"after:TEXT"``          from the token completing the first occurrence of ``TEXT`` on
                          (that token included)
``"between:A,B"``         inside ``A ... B`` blocks, both markers' completing tokens included;
                          blocks may repeat; an unclosed block runs to the end
``"outside:A,B"``         every real token not selected by ``between:A,B`` (steer everything
                          but the reasoning: ``"outside:<think>,</think>"``)
========================  ==================================================================

``A`` is everything before the first comma (use the constructor for a marker with a comma).

>>> import torch
>>> pos = Positions.parse("last")
>>> abs_index = torch.tensor([[-1, 0, 1, 2]])          # one left pad, three prompt tokens
>>> pos.mask(abs_index, prompt_lengths=torch.tensor([3])).tolist()
[[False, False, False, True]]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import torch

from steerlab.checks import as_int
from steerlab.errors import InvalidInputError

__all__ = ["PositionSpec", "Positions", "marker_flags"]

_MODES = ("all", "last", "prompt", "generated")
_MARKER_MODES = ("after", "between", "outside")
_INT = re.compile(r"-?\d+")
_INDEX_LIST = re.compile(r"-?\d+(?:\s*,\s*-?\d+)*")
_SLICE = re.compile(r"(-?\d*)\s*:\s*(-?\d*)(?:\s*:\s*(-?\d*))?")

PositionSpec = Union[
    Literal["all", "last", "prompt", "generated"],
    str,
    int,
    Sequence[int],
    slice,
    Mapping[str, Any],
    "Positions",
]
"""What ``positions=`` accepts (:meth:`Positions.parse` reads every form)."""


@dataclasses.dataclass(frozen=True)
class Positions:
    """A parsed position spec (see the module docstring for the table).

    >>> Positions.parse([0, -1])  # doctest: +NORMALIZE_WHITESPACE
    Positions(mode='indices', indices=(0, -1), start=None, stop=None, step=1,
              markers=(), marker_ids=None)
    """

    mode: str
    indices: tuple[int, ...] = ()
    start: int | None = None
    stop: int | None = None
    step: int = 1
    markers: tuple[str, ...] = ()
    marker_ids: tuple[tuple[tuple[int, ...], ...], ...] | None = None

    # --- constructors of the content-based specs ------------------------------------------
    @classmethod
    def first(cls, k: int) -> Positions:
        """The first ``k`` generated tokens (``"first:K"``).

        >>> Positions.first(2).mask(torch.tensor([[0, 1, 2, 3, 4]]), torch.tensor([2])).tolist()
        [[False, False, True, True, False]]
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidInputError(f"first:K needs a non-negative int K, got {k!r}")
        return cls(mode="first", indices=(k,))

    @classmethod
    def after(cls, text: str | None = None, *, ids: Sequence[int] | None = None) -> Positions:
        """Every token from the first occurrence of ``text`` (or token ``ids``) on.

        >>> Positions.after(ids=[7]).describe()
        'after:@7'
        """
        return cls._markers("after", [(text, ids)])

    @classmethod
    def between(
        cls,
        start: str | None = None,
        end: str | None = None,
        *,
        start_ids: Sequence[int] | None = None,
        end_ids: Sequence[int] | None = None,
    ) -> Positions:
        """Tokens inside ``start ... end`` blocks, markers included (``"between:A,B"``)."""
        return cls._markers("between", [(start, start_ids), (end, end_ids)])

    @classmethod
    def outside(
        cls,
        start: str | None = None,
        end: str | None = None,
        *,
        start_ids: Sequence[int] | None = None,
        end_ids: Sequence[int] | None = None,
    ) -> Positions:
        """Tokens outside ``start ... end`` blocks (``"outside:<think>,</think>"``)."""
        return cls._markers("outside", [(start, start_ids), (end, end_ids)])

    @classmethod
    def _markers(
        cls, mode: str, given: Sequence[tuple[str | None, Sequence[int] | None]]
    ) -> Positions:
        texts: list[str] = []
        id_lists: list[tuple[tuple[int, ...], ...]] = []
        for text, ids in given:
            if (text is None) == (ids is None):
                raise InvalidInputError(f"{mode}: give each marker as text or as ids=, not both")
            if ids is not None:
                values = tuple(int(i) for i in ids)
                if not values or any(isinstance(i, bool) or i < 0 for i in ids):
                    raise InvalidInputError(f"{mode}: marker ids must be non-empty token ids")
                texts.append("@" + ",".join(str(i) for i in values))
                id_lists.append((values,))
            else:
                if not isinstance(text, str) or text == "":
                    raise InvalidInputError(f"{mode}: a marker must be non-empty text")
                texts.append(text)
                id_lists.append(())
        bound = all(ids for ids in id_lists)
        return cls(mode=mode, markers=tuple(texts), marker_ids=tuple(id_lists) if bound else None)

    @classmethod
    def parse(cls, spec: PositionSpec | Mapping[str, Any], *, what: str = "positions") -> Positions:
        """Turn a position spec into :class:`Positions`, or raise ``InvalidInputError``.

        This is the one parser of the positions grammar: the library, the CLI
        (``--positions``), the server's ``positions`` field and the vLLM wire all call it, so
        they accept the same forms with the same messages (``what`` names the argument in
        them). Text forms: the four modes, ``"3"``, ``"0,-1"`` (indices), ``"2:"``,
        ``"-3:-1"``, ``"0:8:2"`` (slices), ``"first:K"``, ``"after:TEXT"``, ``"between:A,B"``,
        ``"outside:A,B"``. JSON forms (what :meth:`to_json` writes): an int, a list of ints,
        ``{"start", "stop", "step"}``, ``{"mode", "markers", "ids"}``.

        >>> Positions.parse("between:<think>,</think>").markers
        ('<think>', '</think>')
        >>> Positions.parse(" -3:-1 ").describe(), Positions.parse("0, 2").indices
        ('-3:-1', (0, 2))
        """
        if isinstance(spec, Positions):
            return spec
        try:
            return cls._parse(spec, what)
        except InvalidInputError as err:
            if str(err).startswith(f"{what}:") or str(err).startswith(f"{what} "):
                raise
            raise InvalidInputError(f"{what}: {err}") from None

    @classmethod
    def _parse(cls, spec: Any, what: str) -> Positions:
        if isinstance(spec, str):
            return cls._parse_text(spec, what)
        if isinstance(spec, bool):
            raise InvalidInputError(f"{what} must not be a bool, got {spec!r}")
        if isinstance(spec, int):
            return cls(mode="indices", indices=(spec,))
        if isinstance(spec, slice):
            return cls._slice(spec.start, spec.stop, spec.step, what, spec)
        if isinstance(spec, Mapping):
            return cls._parse_mapping(spec, what)
        if isinstance(spec, Sequence) or isinstance(spec, torch.Tensor):
            values = [as_int(v, "each index") for v in spec]
            if not values:
                raise InvalidInputError(f"{what}: the list of indices is empty")
            return cls(mode="indices", indices=tuple(values))
        raise InvalidInputError(f"{what}: cannot interpret {spec!r} ({type(spec).__name__})")

    @classmethod
    def _parse_text(cls, spec: str, what: str) -> Positions:
        # a marker's own spaces are part of it: only the text before the head is stripped
        head, sep, rest = spec.lstrip().partition(":")
        if sep and head == "first":
            if not _INT.fullmatch(rest.strip()):
                raise InvalidInputError(f"{what}: first:K needs an integer K, got {spec!r}")
            return cls.first(int(rest))
        if sep and head == "after":
            return cls._markers("after", [(rest, None)])
        if sep and head in ("between", "outside"):
            a, comma, b = rest.partition(",")
            if not comma or not a or not b:
                raise InvalidInputError(
                    f"{what}: {head} needs two markers separated by a comma, e.g. "
                    f"'{head}:<think>,</think>'; got {spec!r}"
                )
            return cls._markers(head, [(a, None), (b, None)])
        text = spec.strip()
        if text in _MODES:
            return cls(mode=text)
        if _INDEX_LIST.fullmatch(text):
            return cls(mode="indices", indices=tuple(int(p) for p in text.split(",")))
        match = _SLICE.fullmatch(text)
        if match:
            start, stop, step = (int(g) if g else None for g in match.groups())
            return cls._slice(start, stop, step, what, spec)
        raise InvalidInputError(
            f"{what}: unknown spec {spec!r}; use one of {', '.join(_MODES)}, an index "
            f"('3'), indices ('0,2'), a slice ('2:', '-3:-1', '0:8:2'), first:K, after:TEXT, "
            f"between:A,B or outside:A,B"
        )

    @classmethod
    def _slice(cls, start: Any, stop: Any, step: Any, what: str, spec: Any) -> Positions:
        for bound in (start, stop, step):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
                raise InvalidInputError(f"{what}: slice bounds must be ints, got {spec!r}")
        step = 1 if step is None else step
        if step <= 0:
            raise InvalidInputError(f"{what}: slice step must be positive, got {step}")
        return cls(mode="slice", start=start, stop=stop, step=step)

    @classmethod
    def _parse_mapping(cls, spec: Mapping[str, Any], what: str) -> Positions:
        keys = set(spec)
        if keys and keys <= {"start", "stop", "step"}:
            return cls._slice(spec.get("start"), spec.get("stop"), spec.get("step"), what, spec)
        mode = spec.get("mode")
        if keys <= {"mode", "markers", "ids"} and mode in _MARKER_MODES:
            texts = spec.get("markers")
            count = 1 if mode == "after" else 2
            if (
                not isinstance(texts, Sequence)
                or isinstance(texts, str)
                or len(texts) != count
                or not all(isinstance(t, str) and t for t in texts)
            ):
                raise InvalidInputError(f"{what}: {mode} needs {count} non-empty marker texts")
            parsed = cls._markers(str(mode), [(t, None) for t in texts])
            if spec.get("ids") is None:
                return parsed
            return dataclasses.replace(parsed, marker_ids=_marker_ids(spec["ids"], count, what))
        raise InvalidInputError(
            f"{what}: a positions object is {{'start', 'stop', 'step'}} or {{'mode': 'after' | "
            f"'between' | 'outside', 'markers': [...], 'ids': [...]}}, got {dict(spec)!r}"
        )

    def to_json(self) -> str | int | list[int] | dict[str, Any]:
        """The JSON form of these positions: :meth:`parse` reads it back to an equal value.

        Content specs whose markers are bound carry their token ids (one list of variants per
        marker), so a process without the tokenizer selects the same tokens.

        >>> Positions.parse("0,-1").to_json(), Positions.parse("2:").to_json()
        ([0, -1], '2:')
        >>> Positions.after(ids=[7]).to_json()
        {'mode': 'after', 'markers': ['@7'], 'ids': [[[7]]]}
        """
        if self.mode == "indices":
            return list(self.indices)
        plain_text = not self.markers or "," not in self.markers[0]
        if self.needs_ids and (self.marker_ids is not None or not plain_text):
            out: dict[str, Any] = {"mode": self.mode, "markers": list(self.markers)}
            if self.marker_ids is not None:
                out["ids"] = [[list(v) for v in variants] for variants in self.marker_ids]
            return out
        return self.describe()

    @property
    def covers_everything(self) -> bool:
        """True when every real token is selected (lets hooks skip building a mask)."""
        return self.mode == "all"

    @property
    def needs_ids(self) -> bool:
        """True for specs decided by token content (``after``/``between``/``outside``)."""
        return self.mode in _MARKER_MODES

    @property
    def bound(self) -> bool:
        """True when every marker has token ids (text markers get them from a tokenizer)."""
        return not self.needs_ids or self.marker_ids is not None

    def bind(self, tokenizer: object) -> Positions:
        """A copy with text markers turned into token ids by ``tokenizer``.

        Each text marker matches its tokenization with and without a leading space.

        >>> from steerlab.testing import tiny_tokenizer
        >>> Positions.parse("after:cat").bind(tiny_tokenizer()).bound
        True
        """
        if self.bound:
            return self
        id_lists: list[tuple[tuple[int, ...], ...]] = []
        for text in self.markers:
            if text.startswith("@") and all(p.strip().isdigit() for p in text[1:].split(",")):
                id_lists.append((tuple(int(p) for p in text[1:].split(",")),))
                continue
            variants: list[tuple[int, ...]] = []
            for form in (text, " " + text):
                encoded = tokenizer(form, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
                ids = tuple(int(i) for i in encoded)
                if ids and ids not in variants:
                    variants.append(ids)
            if not variants:
                raise InvalidInputError(f"marker {text!r} has no tokens")
            id_lists.append(tuple(variants))
        return dataclasses.replace(self, marker_ids=tuple(id_lists))

    def mask(self, abs_index: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """Boolean ``[batch, seq]`` mask of selected tokens.

        ``abs_index`` holds each token's absolute index (``-1`` for padding) and
        ``prompt_lengths`` the prompt length ``P`` of each row.
        """
        real = abs_index >= 0
        plen = prompt_lengths.to(abs_index.device).unsqueeze(-1)
        if self.mode == "all":
            return real
        if self.mode == "first":
            return real & (abs_index >= plen) & (abs_index < plen + self.indices[0])
        if self.needs_ids:
            raise InvalidInputError(
                f"positions {self.describe()!r} are decided by token content; they need the "
                f"token ids a PositionTracker records"
            )
        if self.mode == "prompt":
            return real & (abs_index < plen)
        if self.mode == "generated":
            return abs_index >= plen
        if self.mode == "last":
            return real & (abs_index >= plen - 1)
        if self.mode == "indices":
            out = torch.zeros_like(real)
            for index in self.indices:
                target = plen + index if index < 0 else torch.full_like(plen, index)
                out |= real & (abs_index == target)
            return out
        start = 0 if self.start is None else self.start
        start_t = plen + start if start < 0 else torch.full_like(plen, start)
        selected = real & (abs_index >= start_t)
        if self.stop is not None:
            stop_t = plen + self.stop if self.stop < 0 else torch.full_like(plen, self.stop)
            selected &= abs_index < stop_t
        if self.step != 1:
            selected &= ((abs_index - start_t) % self.step) == 0
        return selected

    def describe(self) -> str:
        """Short text form, used in vector metadata and CLI output (parses back).

        >>> Positions.parse("outside:<think>,</think>").describe()
        'outside:<think>,</think>'
        """
        if self.mode == "first":
            return f"first:{self.indices[0]}"
        if self.needs_ids:
            return f"{self.mode}:" + ",".join(self.markers)
        if self.mode == "indices":
            return ",".join(str(i) for i in self.indices)
        if self.mode == "slice":
            a = "" if self.start is None else str(self.start)
            b = "" if self.stop is None else str(self.stop)
            return f"{a}:{b}" + (f":{self.step}" if self.step != 1 else "")
        return self.mode


def _marker_ids(raw: Any, count: int, what: str) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Token ids of ``count`` markers: per marker, a non-empty list of non-empty id lists."""

    def ids(value: Any) -> tuple[int, ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
            raise InvalidInputError(f"{what}: a marker's token ids must be a non-empty list")
        out = tuple(as_int(i, f"{what} marker token id") for i in value)
        if any(i < 0 for i in out):
            raise InvalidInputError(f"{what}: marker token ids must not be negative")
        return out

    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or len(raw) != count:
        raise InvalidInputError(f"{what}: 'ids' needs one list of id lists per marker ({count})")
    per_marker = []
    for variants in raw:
        if isinstance(variants, (str, bytes)) or not isinstance(variants, Sequence) or not variants:
            raise InvalidInputError(f"{what}: each marker needs at least one list of token ids")
        per_marker.append(tuple(ids(v) for v in variants))
    return tuple(per_marker)


def _ends_at(ids: Sequence[int], i: int, variants: tuple[tuple[int, ...], ...]) -> bool:
    for variant in variants:
        n = len(variant)
        if n <= i + 1 and tuple(ids[i + 1 - n : i + 1]) == variant:
            return True
    return False


def marker_flags(
    positions: Positions, ids: Sequence[int], start: int = 0, state: bool = False
) -> tuple[list[bool], bool]:
    """Selection flags of tokens ``start..`` of ``ids`` for a content spec, as tokens stream.

    ``state`` is the scan's state before ``start`` (``after``: found; ``between``/``outside``:
    inside a block), so a scan continues where an earlier one stopped. Returns the flags and
    the state after the last token.

    >>> spec = Positions.between(start_ids=[5], end_ids=[6])
    >>> marker_flags(spec, [1, 5, 2, 6, 3])[0]
    [False, True, True, True, False]
    """
    if positions.marker_ids is None:
        raise InvalidInputError(f"positions {positions.describe()!r} have no token ids yet")
    flags: list[bool] = []
    if positions.mode == "after":
        (target,) = positions.marker_ids
        for i in range(start, len(ids)):
            state = state or _ends_at(ids, i, target)
            flags.append(state)
        return flags, state
    opening, closing = positions.marker_ids
    for i in range(start, len(ids)):
        if not state and _ends_at(ids, i, opening):
            state = True
            selected = True
        elif state and _ends_at(ids, i, closing):
            selected = True
            state = False
        else:
            selected = state
        flags.append(selected if positions.mode == "between" else not selected)
    return flags, state
