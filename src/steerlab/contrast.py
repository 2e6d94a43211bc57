"""Contrast datasets as values: :class:`ContrastPair` and :class:`ContrastDataset`.

A steering vector for a concept is computed from texts that show the concept (``positive``) and
texts that show its opposite (``negative``); :class:`ContrastDataset` holds them, paired or not,
with the CAA question stems and answer letters when there are any. Reading them from built-in
sets and user files is :mod:`steerlab.data` (which re-exports these names).

>>> ds = ContrastDataset(name="demo", positive=("I loved it", "so happy"),
...                      negative=("I hated it", "so sad"), paired=True)
>>> ds.paired, ds.pairs()[1]
(True, ContrastPair(positive='so happy', negative='so sad'))
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from steerlab.errors import DataError

__all__ = ["DICT_FORMAT", "ContrastDataset", "ContrastPair", "check_text", "text_tuple"]

DICT_FORMAT = "steerlab.contrast_dataset/1"
"""The ``format`` of :meth:`ContrastDataset.to_dict` dicts."""


def check_text(value: object, where: str) -> str:
    """``value`` if it is a non-blank string, else :class:`~steerlab.errors.DataError` naming
    ``where``.

    >>> check_text("a cat", "prompt 0")
    'a cat'
    """
    if not isinstance(value, str):
        raise DataError(f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where} is empty")
    return value


def text_tuple(value: object, where: str) -> tuple[str, ...]:
    """``value`` (a sequence of non-blank strings, not one string) as a tuple, else
    :class:`~steerlab.errors.DataError` naming ``where`` and the item.

    >>> text_tuple(["a", "b"], "positive")
    ('a', 'b')
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise DataError(f"{where} must be a sequence of strings, got {type(value).__name__}")
    items = tuple(value)
    for i, item in enumerate(items):
        check_text(item, f"{where}[{i}]")
    return items


@dataclasses.dataclass(frozen=True)
class ContrastPair:
    """One paired example: the same prompt showing the concept (positive) and its opposite.

    Both texts must be non-empty strings.

    >>> pair = ContrastPair("The film was wonderful", "The film was dreadful")
    >>> pair.positive
    'The film was wonderful'
    >>> ContrastPair("fine", "")
    Traceback (most recent call last):
        ...
    steerlab.errors.DataError: ContrastPair.negative is empty
    """

    positive: str
    negative: str

    def __post_init__(self) -> None:
        check_text(self.positive, "ContrastPair.positive")
        check_text(self.negative, "ContrastPair.negative")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContrastDataset:
    """Texts showing a concept (``positive``) and its opposite (``negative``), immutable.

    ``paired=True`` means ``positive[i]`` and ``negative[i]`` belong together (equal lengths
    required); ``paired=False`` means two independent lists. ``prompts`` and ``answers`` are
    optional, per pair, and only for paired sets: the question stem and the ``(matching, not
    matching)`` answer of A/B items (see :func:`steerlab.data.load_caa`); empty tuples
    otherwise. Lists passed in are stored as tuples; every text must be a non-empty string.

    ``len(ds)`` is the number of pairs of a paired set, and the number of texts
    (``len(positive) + len(negative)``) of an unpaired one.

    >>> ds = ContrastDataset(name="toy", positive=("I love it",), negative=("I hate it",),
    ...                      paired=True)
    >>> len(ds), ds.pairs()[0].negative
    (1, 'I hate it')
    >>> ContrastDataset(name="bad", positive=("a", "b"), negative=("c",), paired=True)
    Traceback (most recent call last):
        ...
    steerlab.errors.DataError: dataset 'bad' is paired but has 2 positive and 1 negative texts
    """

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    paired: bool = False
    description: str = ""
    source: str = ""
    license: str = ""
    prompts: tuple[str, ...] = ()
    answers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        name = check_text(self.name, "dataset name")
        where = f"dataset {name!r}"
        for attr in ("description", "source", "license"):
            if not isinstance(getattr(self, attr), str):
                raise DataError(f"{where}: {attr} must be a string")
        if not isinstance(self.paired, bool):
            raise DataError(f"{where}: paired must be True or False, got {self.paired!r}")
        positive = text_tuple(self.positive, f"{where}: positive")
        negative = text_tuple(self.negative, f"{where}: negative")
        if not positive:
            raise DataError(f"{where} has no positive texts")
        if not negative:
            raise DataError(f"{where} has no negative texts")
        if self.paired and len(positive) != len(negative):
            raise DataError(
                f"{where} is paired but has {len(positive)} positive and "
                f"{len(negative)} negative texts"
            )
        prompts = text_tuple(self.prompts, f"{where}: prompts")
        answers = self._check_answers(self.answers, where)
        for label, extra in (("prompts", prompts), ("answers", answers)):
            if extra and not self.paired:
                raise DataError(f"{where}: {label} are per pair, but the dataset is unpaired")
            if extra and len(extra) != len(positive):
                raise DataError(f"{where} has {len(positive)} pairs but {len(extra)} {label}")
        object.__setattr__(self, "positive", positive)
        object.__setattr__(self, "negative", negative)
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "answers", answers)

    @staticmethod
    def _check_answers(value: object, where: str) -> tuple[tuple[str, str], ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise DataError(f"{where}: answers must be a sequence of (matching, not matching)")
        answers: list[tuple[str, str]] = []
        for i, item in enumerate(value):
            if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
                raise DataError(f"{where}: answers[{i}] must be a (matching, not matching) pair")
            answers.append(
                (
                    check_text(item[0], f"{where}: answers[{i}][0]"),
                    check_text(item[1], f"{where}: answers[{i}][1]"),
                )
            )
        return tuple(answers)

    def __len__(self) -> int:
        if self.paired:
            return len(self.positive)
        return len(self.positive) + len(self.negative)

    def pairs(self) -> tuple[ContrastPair, ...]:
        """The ``(positive, negative)`` pairs of a paired dataset, in order.

        Raises :class:`~steerlab.errors.DataError` for an unpaired dataset, whose texts do not
        belong together.

        >>> ds = ContrastDataset.from_pairs([("warm hello", "cold hello")], name="toy")
        >>> ds.pairs()
        (ContrastPair(positive='warm hello', negative='cold hello'),)
        """
        if not self.paired:
            raise DataError(
                f"dataset {self.name!r} is unpaired ({len(self.positive)} positive, "
                f"{len(self.negative)} negative texts): use .positive and .negative instead"
            )
        return tuple(ContrastPair(p, n) for p, n in zip(self.positive, self.negative, strict=True))

    def split(self, *, test_fraction: float, seed: int) -> tuple[ContrastDataset, ContrastDataset]:
        """Split into ``(train, test)`` at random, reproducibly for a given ``seed``.

        A paired set is split by pair (``prompts`` and ``answers`` follow their pair); an
        unpaired set splits its positive and negative texts separately, each by
        ``test_fraction``. The test part gets ``round(n * test_fraction)`` items, at least one
        and at most ``n - 1``, so both halves are non-empty; both keep the original order.
        Raises :class:`~steerlab.errors.DataError` when ``test_fraction`` is not strictly between
        0 and 1 or a side has fewer than two items.

        >>> ds = ContrastDataset.from_pairs([(f"good {i}", f"bad {i}") for i in range(4)],
        ...                                 name="toy")
        >>> train, test = ds.split(test_fraction=0.5, seed=1)
        >>> len(train), len(test), train.name, test.name
        (2, 2, 'toy[train]', 'toy[test]')
        >>> sorted(train.positive + test.positive) == sorted(ds.positive)
        True
        """
        if (
            isinstance(test_fraction, bool)
            or not isinstance(test_fraction, (int, float))
            or not math.isfinite(test_fraction)
            or not 0 < test_fraction < 1
        ):
            raise DataError(
                f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DataError(f"seed must be an int, got {seed!r}")
        rng = random.Random(seed)
        where = f"dataset {self.name!r}"
        if self.paired:
            n_pairs = len(self.positive)
            train_i, test_i = _split_indices(n_pairs, test_fraction, rng, f"{where}: pairs")
            parts = [
                dataclasses.replace(
                    self,
                    name=f"{self.name}[{part}]",
                    positive=tuple(self.positive[i] for i in idx),
                    negative=tuple(self.negative[i] for i in idx),
                    prompts=tuple(self.prompts[i] for i in idx) if self.prompts else (),
                    answers=tuple(self.answers[i] for i in idx) if self.answers else (),
                )
                for part, idx in (("train", train_i), ("test", test_i))
            ]
        else:
            pos = _split_indices(len(self.positive), test_fraction, rng, f"{where}: positive")
            neg = _split_indices(len(self.negative), test_fraction, rng, f"{where}: negative")
            parts = [
                dataclasses.replace(
                    self,
                    name=f"{self.name}[{part}]",
                    positive=tuple(self.positive[i] for i in pos[k]),
                    negative=tuple(self.negative[i] for i in neg[k]),
                )
                for k, part in enumerate(("train", "test"))
            ]
        return parts[0], parts[1]

    @classmethod
    def from_pairs(
        cls,
        pairs: Iterable[ContrastPair | tuple[str, str]],
        *,
        name: str,
        description: str = "",
        source: str = "",
        license: str = "",
        prompts: Sequence[str] = (),
        answers: Sequence[tuple[str, str]] = (),
    ) -> ContrastDataset:
        """A paired dataset from :class:`ContrastPair` values or ``(positive, negative)`` tuples.

        >>> ds = ContrastDataset.from_pairs(
        ...     [ContrastPair("so kind", "so cruel"), ("so calm", "so angry")], name="toy")
        >>> ds.paired, ds.positive, ds.negative
        (True, ('so kind', 'so calm'), ('so cruel', 'so angry'))
        """
        positive: list[str] = []
        negative: list[str] = []
        for i, item in enumerate(pairs):
            if isinstance(item, ContrastPair):
                pair = item
            elif isinstance(item, tuple) and len(item) == 2:
                try:
                    pair = ContrastPair(item[0], item[1])
                except DataError as err:
                    raise DataError(f"dataset {name!r}: pair {i}: {err}") from None
            else:
                raise DataError(
                    f"dataset {name!r}: pair {i} must be a ContrastPair or a (positive, negative) "
                    f"tuple, got {type(item).__name__}"
                )
            positive.append(pair.positive)
            negative.append(pair.negative)
        return cls(
            name=name,
            positive=tuple(positive),
            negative=tuple(negative),
            paired=True,
            description=description,
            source=source,
            license=license,
            prompts=tuple(prompts),
            answers=tuple(answers),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back to an equal dataset.

        >>> ds = ContrastDataset.from_pairs([("yes", "no")], name="toy")
        >>> d = ds.to_dict()
        >>> d["format"], d["positive"], d["paired"]
        ('steerlab.contrast_dataset/1', ['yes'], True)
        >>> ContrastDataset.from_dict(d) == ds
        True
        """
        return {
            "format": DICT_FORMAT,
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "license": self.license,
            "paired": self.paired,
            "positive": list(self.positive),
            "negative": list(self.negative),
            "prompts": list(self.prompts),
            "answers": [list(a) for a in self.answers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContrastDataset:
        """Rebuild a dataset from :meth:`to_dict` output (unknown keys are ignored).

        ``name``, ``positive``, ``negative`` and ``paired`` are required; a ``format`` other than
        ``"steerlab.contrast_dataset/1"`` is refused.

        >>> ContrastDataset.from_dict(
        ...     {"name": "toy", "positive": ["a"], "negative": ["b", "c"], "paired": False})
        ... # doctest: +ELLIPSIS
        ContrastDataset(name='toy', positive=('a',), negative=('b', 'c'), paired=False, ...)
        >>> ContrastDataset.from_dict({"name": "toy"})
        Traceback (most recent call last):
            ...
        steerlab.errors.DataError: dataset dict is missing the key(s) 'positive', 'negative', \
'paired'
        """
        if not isinstance(data, Mapping):
            raise DataError(f"dataset dict must be a mapping, got {type(data).__name__}")
        fmt = data.get("format", DICT_FORMAT)
        if fmt != DICT_FORMAT:
            raise DataError(f"dataset dict has format {fmt!r}; this steerlab reads {DICT_FORMAT!r}")
        missing = [k for k in ("name", "positive", "negative", "paired") if k not in data]
        if missing:
            raise DataError(
                "dataset dict is missing the key(s) " + ", ".join(repr(k) for k in missing)
            )
        return cls(
            name=data["name"],
            positive=data["positive"],
            negative=data["negative"],
            paired=data["paired"],
            description=data.get("description", ""),
            source=data.get("source", ""),
            license=data.get("license", ""),
            prompts=data.get("prompts", ()),
            answers=data.get("answers", ()),
        )


def _split_indices(
    n: int, fraction: float, rng: random.Random, what: str
) -> tuple[list[int], list[int]]:
    if n < 2:
        raise DataError(f"cannot split {what}: {n} item(s), need at least 2 for two halves")
    n_test = min(max(round(n * fraction), 1), n - 1)
    order = list(range(n))
    rng.shuffle(order)
    return sorted(order[n_test:]), sorted(order[:n_test])
