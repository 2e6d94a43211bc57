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

>>> import torch
>>> pos = Positions.parse("last")
>>> abs_index = torch.tensor([[-1, 0, 1, 2]])          # one left pad, three prompt tokens
>>> pos.mask(abs_index, prompt_lengths=torch.tensor([3])).tolist()
[[False, False, False, True]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, Union

import torch

from steerlab._checks import as_int
from steerlab.errors import InvalidInputError

__all__ = ["PositionSpec", "Positions"]

_MODES = ("all", "last", "prompt", "generated")

PositionSpec = Union[
    Literal["all", "last", "prompt", "generated"], int, Sequence[int], slice, "Positions"
]


@dataclasses.dataclass(frozen=True)
class Positions:
    """A parsed position spec (see the module docstring for the table).

    >>> Positions.parse([0, -1])
    Positions(mode='indices', indices=(0, -1), start=None, stop=None, step=1)
    """

    mode: str
    indices: tuple[int, ...] = ()
    start: int | None = None
    stop: int | None = None
    step: int = 1

    @classmethod
    def parse(cls, spec: PositionSpec) -> Positions:
        """Turn a user spec into :class:`Positions`, or raise ``InvalidInputError``."""
        if isinstance(spec, Positions):
            return spec
        if isinstance(spec, str):
            if spec not in _MODES:
                raise InvalidInputError(
                    f"unknown positions {spec!r}; use one of {', '.join(_MODES)}, an int, a list "
                    f"of ints or a slice"
                )
            return cls(mode=spec)
        if isinstance(spec, bool):
            raise InvalidInputError(f"positions must not be a bool, got {spec!r}")
        if isinstance(spec, int):
            return cls(mode="indices", indices=(spec,))
        if isinstance(spec, slice):
            step = 1 if spec.step is None else spec.step
            for bound in (spec.start, spec.stop, spec.step):
                if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
                    raise InvalidInputError(f"slice bounds must be ints, got {spec!r}")
            if step <= 0:
                raise InvalidInputError(f"slice step must be positive, got {step}")
            return cls(mode="slice", start=spec.start, stop=spec.stop, step=step)
        if isinstance(spec, Sequence) or isinstance(spec, torch.Tensor):
            values = [as_int(v, "positions entry") for v in spec]
            if not values:
                raise InvalidInputError("positions list is empty")
            return cls(mode="indices", indices=tuple(values))
        raise InvalidInputError(f"cannot interpret positions {spec!r}")

    @property
    def covers_everything(self) -> bool:
        """True when every real token is selected (lets hooks skip building a mask)."""
        return self.mode == "all"

    def mask(self, abs_index: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """Boolean ``[batch, seq]`` mask of selected tokens.

        ``abs_index`` holds each token's absolute index (``-1`` for padding) and
        ``prompt_lengths`` the prompt length ``P`` of each row.
        """
        real = abs_index >= 0
        plen = prompt_lengths.to(abs_index.device).unsqueeze(-1)
        if self.mode == "all":
            return real
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
        """Short text form, used in vector metadata and CLI output."""
        if self.mode == "indices":
            return ",".join(str(i) for i in self.indices)
        if self.mode == "slice":
            a = "" if self.start is None else str(self.start)
            b = "" if self.stop is None else str(self.stop)
            return f"{a}:{b}" + (f":{self.step}" if self.step != 1 else "")
        return self.mode
