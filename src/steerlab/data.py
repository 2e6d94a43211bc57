"""Contrastive datasets: the texts a steering vector is computed from.

A steering vector for a concept (positive sentiment, formal register, sycophancy...) is the
difference between the model's mean activation on texts that *show* the concept (``positive``)
and texts that show its opposite (``negative``). This module holds those texts as immutable
:class:`ContrastDataset` values and reads them from built-in sets and from user files.

The shape of the data
---------------------
**Paired** (``paired=True``): ``positive[i]`` and ``negative[i]`` are the *same* prompt with only
the concept changed, so the activation difference of each pair isolates the concept::

    positive[0] = "I absolutely loved the concert last night, it was"
    negative[0] = "I absolutely hated the concert last night, it was"

**Unpaired** (``paired=False``): two independent lists, possibly of different lengths (for example
texts labelled 1 and 0). Only the two means are meaningful; :meth:`ContrastDataset.pairs` refuses.

**CAA A/B items** (Rimsky/Panickssery et al. 2024) are paired: one multiple-choice question, two
answer letters. :func:`load_caa` turns each item into::

    positive = f"{question}\\n\\nAnswer: {answer_matching_behavior}"      # ends "... (A)"
    negative = f"{question}\\n\\nAnswer: {answer_not_matching_behavior}"  # ends "... (B)"

so the answer letter is the second-to-last token (``" ("``, ``"A"``, ``")"`` for most BPE
tokenizers); the CAA reference code reads the activation at that letter (position ``-2``). The
question stems and the ``(matching, not matching)`` letters are kept in ``prompts`` and
``answers`` so A/B evaluation, or a caller that applies a chat template, can rebuild the texts.

Built-in sets (``builtin_names()``): ``sentiment`` and ``formality``, each with paired prompts,
held-out ``neutral_prompts`` (prompts leaning neither way, to evaluate steering on) and
``concept_words`` (single words with their leading space, e.g. ``" great"`` vs ``" awful"``, to
score the next-token distribution).

User files (all return a :class:`ContrastDataset`; blank lines are skipped; bad input raises
:class:`~steerlab.errors.DataError` naming the file and the line or item):

============================  =====================================================
``load_text_pair(pos, neg)``  two text files, one prompt a line
``load_jsonl(path)``          ``{"positive": ..., "negative": ...}`` a line (paired), or
                              ``{"text": ..., "label": 1|0}`` a line (unpaired)
``load_csv(path)``            columns ``positive,negative`` or ``text,label``
``load_caa(path)``            a CAA A/B JSON list
``load_dataset(x)``           any of the above by extension, a ``to_dict`` JSON, or a
                              built-in name
============================  =====================================================

>>> ds = load_builtin("sentiment")
>>> ds.paired, len(ds) >= 64
(True, True)
>>> ds.pairs()[10]
ContrastPair(positive='I absolutely loved the concert last night, it was', \
negative='I absolutely hated the concert last night, it was')
>>> train, test = ds.split(test_fraction=0.25, seed=0)
>>> len(train) + len(test) == len(ds)
True
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TypeAlias, Union

from steerlab.contrast import (
    ContrastDataset,
    ContrastPair,
    check_text,
    text_tuple,
)
from steerlab.errors import DataError

__all__ = [
    "CAA_TEMPLATE",
    "ContrastDataset",
    "ContrastPair",
    "PathLike",
    "builtin_names",
    "concept_words",
    "load_builtin",
    "load_caa",
    "load_csv",
    "load_dataset",
    "load_jsonl",
    "load_text_pair",
    "neutral_prompts",
]

PathLike: TypeAlias = Union[str, "os.PathLike[str]"]
"""A file path: ``str`` or any ``os.PathLike[str]`` such as :class:`pathlib.Path`."""

CAA_TEMPLATE = "{question}\n\nAnswer: {answer}"
"""How :func:`load_caa` joins a CAA question and an answer letter such as ``"(A)"``."""

_BUILTIN_FORMAT = "steerlab.builtin/1"
_BUILTIN_PACKAGE = "steerlab.datasets"
_TRUE_LABELS = frozenset({"1", "true"})
_FALSE_LABELS = frozenset({"0", "false"})


# --------------------------------------------------------------------------- built-in sets


@dataclasses.dataclass(frozen=True)
class _Builtin:
    dataset: ContrastDataset
    neutral: tuple[str, ...]
    positive_words: tuple[str, ...]
    negative_words: tuple[str, ...]


def builtin_names() -> list[str]:
    """Names of the contrastive sets shipped with steerlab, sorted.

    >>> builtin_names()
    ['formality', 'sentiment']
    """
    return list(_builtin_names())


@functools.cache
def _builtin_names() -> tuple[str, ...]:
    folder = resources.files(_BUILTIN_PACKAGE)
    return tuple(
        sorted(
            entry.name[: -len(".json")]
            for entry in folder.iterdir()
            if entry.name.endswith(".json") and entry.is_file()
        )
    )


def _builtin(name: str) -> _Builtin:
    if not isinstance(name, str) or name not in _builtin_names():
        raise DataError(
            f"unknown built-in dataset {name!r}; available: {', '.join(_builtin_names())}"
        )
    return _read_builtin(name)


@functools.cache
def _read_builtin(name: str) -> _Builtin:
    where = f"built-in dataset {name!r}"
    text = resources.files(_BUILTIN_PACKAGE).joinpath(f"{name}.json").read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON at line {err.lineno}: {err.msg}") from None
    return _parse_builtin(data, where, default_name=name)


def _parse_builtin(data: object, where: str, *, default_name: str) -> _Builtin:
    """Read the ``steerlab.builtin/1`` layout (see :mod:`steerlab.datasets`)."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fmt = data.get("format", _BUILTIN_FORMAT)
    if fmt != _BUILTIN_FORMAT:
        raise DataError(f"{where}: format {fmt!r} is not {_BUILTIN_FORMAT!r}")
    raw_pairs = data.get("pairs")
    if not isinstance(raw_pairs, list) or not raw_pairs:
        raise DataError(f"{where}: 'pairs' must be a non-empty list")
    pairs: list[ContrastPair] = []
    for i, item in enumerate(raw_pairs):
        pairs.append(_pair_from_object(item, "positive", "negative", f"{where}, pair {i}"))
    for key in ("name", "description", "source", "license"):
        if key in data and not isinstance(data[key], str):
            raise DataError(f"{where}: {key!r} must be a string")
    dataset = ContrastDataset.from_pairs(
        pairs,
        name=data.get("name", default_name),
        description=data.get("description", ""),
        source=data.get("source", ""),
        license=data.get("license", ""),
    )

    def texts(key: str) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list):
            raise DataError(f"{where}: {key!r} must be a list of strings")
        return text_tuple(value, f"{where}: {key}")

    return _Builtin(dataset, texts("neutral"), texts("positive_words"), texts("negative_words"))


def load_builtin(name: str) -> ContrastDataset:
    """A built-in paired contrastive set by name (see :func:`builtin_names`).

    Raises :class:`~steerlab.errors.DataError` listing the available names for an unknown one.

    >>> ds = load_builtin("formality")
    >>> ds.paired, len(ds) >= 40, ds.license != ""
    (True, True, True)
    >>> load_builtin("nope")
    Traceback (most recent call last):
        ...
    steerlab.errors.DataError: unknown built-in dataset 'nope'; available: formality, sentiment
    """
    return _builtin(name).dataset


def neutral_prompts(name: str) -> list[str]:
    """Held-out prompts of a built-in set that lean neither way, for evaluating steering.

    They are not in the contrastive pairs, so steering measured on them is not fitted to them.

    >>> prompts = neutral_prompts("sentiment")
    >>> len(prompts) >= 40, prompts[0]
    (True, 'The weather today is')
    """
    return list(_builtin(name).neutral)


def concept_words(name: str) -> tuple[list[str], list[str]]:
    """``(positive_words, negative_words)`` of a built-in set: single words, leading space kept.

    The leading space makes most of them one token in BPE vocabularies, so the probability mass
    the model puts on each list is a cheap score of which way a continuation leans. Raises
    :class:`~steerlab.errors.DataError` if the set ships no word lists.

    >>> pos, neg = concept_words("sentiment")
    >>> pos[:3], neg[:3]
    ([' good', ' great', ' happy'], [' bad', ' terrible', ' sad'])
    """
    entry = _builtin(name)
    if not entry.positive_words or not entry.negative_words:
        raise DataError(f"built-in dataset {name!r} has no concept word lists")
    return list(entry.positive_words), list(entry.negative_words)


# --------------------------------------------------------------------------- user files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def _lines(text: str) -> list[tuple[int, str]]:
    """``(1-based line number, line)`` for each non-blank line; only the newline is removed."""
    out = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            out.append((number, line))
    return out


def _as_path(value: object, what: str) -> Path:
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise DataError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")


def _label(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    if isinstance(value, str):
        folded = value.strip().lower()
        if folded in _TRUE_LABELS:
            return True
        if folded in _FALSE_LABELS:
            return False
    raise DataError(f"{where}: label must be 1 or 0 (or true/false), got {value!r}")


def _pair_from_object(
    item: object, positive_key: str, negative_key: str, where: str
) -> ContrastPair:
    if not isinstance(item, Mapping):
        raise DataError(f"{where}: expected an object, got {type(item).__name__}")
    values = []
    for key in (positive_key, negative_key):
        if key not in item:
            raise DataError(f"{where}: missing key {key!r}")
        values.append(check_text(item[key], f"{where}: {key!r}"))
    return ContrastPair(values[0], values[1])


def _labelled_dataset(
    items: list[tuple[str, bool]], *, name: str, source: str, path: Path
) -> ContrastDataset:
    positive = tuple(text for text, label in items if label)
    negative = tuple(text for text, label in items if not label)
    if not positive:
        raise DataError(f"{path}: no item has label 1 (positive)")
    if not negative:
        raise DataError(f"{path}: no item has label 0 (negative)")
    return ContrastDataset(
        name=name, positive=positive, negative=negative, paired=False, source=source
    )


def load_text_pair(
    positive_path: PathLike,
    negative_path: PathLike,
    *,
    paired: bool = False,
    name: str | None = None,
) -> ContrastDataset:
    """Two plain UTF-8 text files, one prompt a line: positive texts and negative texts.

    Blank lines are skipped; other lines are kept exactly (only the newline is removed, so
    trailing spaces survive). ``paired=True`` pairs line ``i`` of both files and requires the
    same number of prompts in each. ``name`` defaults to the positive file's stem.

    >>> import pathlib, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> pos, neg = pathlib.Path(tmp.name, "pos.txt"), pathlib.Path(tmp.name, "neg.txt")
    >>> _ = pos.write_text("I am so happy\\n\\nWhat a joy\\n")
    >>> _ = neg.write_text("I am so sad\\nWhat a bore\\n")
    >>> ds = load_text_pair(pos, neg, paired=True)
    >>> ds.pairs()[1], ds.name
    (ContrastPair(positive='What a joy', negative='What a bore'), 'pos')
    >>> tmp.cleanup()
    """
    pos_path = _as_path(positive_path, "positive_path")
    neg_path = _as_path(negative_path, "negative_path")
    texts = []
    for path in (pos_path, neg_path):
        lines = [line for _, line in _lines(_read_text(path))]
        if not lines:
            raise DataError(f"{path}: empty file (no non-blank lines)")
        texts.append(tuple(lines))
    if paired and len(texts[0]) != len(texts[1]):
        raise DataError(
            f"paired=True needs as many prompts in both files: {pos_path} has {len(texts[0])}, "
            f"{neg_path} has {len(texts[1])}"
        )
    return ContrastDataset(
        name=name if name is not None else pos_path.stem,
        positive=texts[0],
        negative=texts[1],
        paired=paired,
        source=f"{pos_path} | {neg_path}",
    )


def load_jsonl(
    path: PathLike,
    *,
    positive_key: str = "positive",
    negative_key: str = "negative",
    text_key: str = "text",
    label_key: str = "label",
    name: str | None = None,
) -> ContrastDataset:
    """A JSON Lines file: one JSON object a line, all of one of two shapes.

    * ``{"positive": "...", "negative": "..."}`` - a pair; the dataset is paired.
    * ``{"text": "...", "label": 1}`` - label 1 (or ``true``) is positive, 0 (or ``false``)
      negative; the dataset is unpaired.

    The key names are configurable; other keys are ignored; blank lines are skipped. ``name``
    defaults to the file's stem.

    >>> import pathlib, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> f = pathlib.Path(tmp.name, "labelled.jsonl")
    >>> _ = f.write_text('{"text": "Lovely day", "label": 1}\\n'
    ...                  '{"text": "Awful day", "label": 0}\\n')
    >>> ds = load_jsonl(f)
    >>> ds.paired, ds.positive, ds.negative
    (False, ('Lovely day',), ('Awful day',))
    >>> tmp.cleanup()
    """
    file = _as_path(path, "path")
    lines = _lines(_read_text(file))
    if not lines:
        raise DataError(f"{file}: empty file (no non-blank lines)")
    pairs: list[ContrastPair] = []
    labelled: list[tuple[str, bool]] = []
    first_shape: tuple[str, int] | None = None
    for number, line in lines:
        where = f"{file}, line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        if positive_key in item or negative_key in item:
            shape = "pair"
        elif text_key in item or label_key in item:
            shape = "labelled"
        else:
            raise DataError(
                f"{where}: expected keys {positive_key!r}/{negative_key!r} or "
                f"{text_key!r}/{label_key!r}, found {sorted(item)}"
            )
        if first_shape is None:
            first_shape = (shape, number)
        elif shape != first_shape[0]:
            raise DataError(
                f"{where}: a {shape} item, but line {first_shape[1]} was a {first_shape[0]} "
                "item; use one shape per file"
            )
        if shape == "pair":
            pairs.append(_pair_from_object(item, positive_key, negative_key, where))
        else:
            labelled.append(_labelled_item(item, text_key, label_key, where))
    dataset_name = name if name is not None else file.stem
    if pairs:
        return ContrastDataset.from_pairs(pairs, name=dataset_name, source=str(file))
    return _labelled_dataset(labelled, name=dataset_name, source=str(file), path=file)


def _labelled_item(
    item: Mapping[str, object], text_key: str, label_key: str, where: str
) -> tuple[str, bool]:
    for key in (text_key, label_key):
        if key not in item or item[key] is None:
            raise DataError(f"{where}: missing key {key!r}")
    return check_text(item[text_key], f"{where}: {text_key!r}"), _label(item[label_key], where)


def load_csv(
    path: PathLike,
    *,
    positive_key: str = "positive",
    negative_key: str = "negative",
    text_key: str = "text",
    label_key: str = "label",
    delimiter: str = ",",
    name: str | None = None,
) -> ContrastDataset:
    """A CSV file with a header row: columns ``positive,negative`` or ``text,label``.

    The first shape gives a paired dataset, the second (label ``1``/``0`` or ``true``/``false``)
    an unpaired one. Quoted fields may contain commas and newlines; extra columns are ignored;
    blank rows are skipped. Use ``delimiter="\\t"`` for TSV. ``name`` defaults to the file's stem.

    >>> import pathlib, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> f = pathlib.Path(tmp.name, "pairs.csv")
    >>> _ = f.write_text('positive,negative\\n"Thanks, that was great","Ugh, that was awful"\\n')
    >>> load_csv(f).pairs()
    (ContrastPair(positive='Thanks, that was great', negative='Ugh, that was awful'),)
    >>> tmp.cleanup()
    """
    file = _as_path(path, "path")
    text = _read_text(file)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames
        if not header:
            raise DataError(f"{file}: empty file (no header row)")
        columns = [c.strip() for c in header]
        reader.fieldnames = columns
        if positive_key in columns and negative_key in columns:
            wanted, shape = (positive_key, negative_key), "pair"
        elif text_key in columns and label_key in columns:
            wanted, shape = (text_key, label_key), "labelled"
        else:
            raise DataError(
                f"{file}: the header needs columns {positive_key!r} and {negative_key!r}, or "
                f"{text_key!r} and {label_key!r}; found {columns}"
            )
        pairs: list[ContrastPair] = []
        labelled: list[tuple[str, bool]] = []
        for row in reader:
            where = f"{file}, line {reader.line_num}"
            if None in row:
                raise DataError(f"{where}: more fields than the {len(columns)} header columns")
            if all(v is None or not v.strip() for v in row.values()):
                continue
            for key in wanted:
                if row[key] is None:
                    raise DataError(f"{where}: missing column {key!r}")
            if shape == "pair":
                pairs.append(_pair_from_object(row, positive_key, negative_key, where))
            else:
                labelled.append(_labelled_item(row, text_key, label_key, where))
    except csv.Error as err:
        raise DataError(f"{file}, line {reader.line_num}: malformed CSV ({err})") from None
    dataset_name = name if name is not None else file.stem
    if shape == "pair":
        if not pairs:
            raise DataError(f"{file}: no data rows after the header")
        return ContrastDataset.from_pairs(pairs, name=dataset_name, source=str(file))
    if not labelled:
        raise DataError(f"{file}: no data rows after the header")
    return _labelled_dataset(labelled, name=dataset_name, source=str(file), path=file)


def _load_json(file: Path) -> object:
    text = _read_text(file)
    if not text.strip():
        raise DataError(f"{file}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{file}: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None


def load_caa(
    path: PathLike,
    *,
    template: str = CAA_TEMPLATE,
    name: str | None = None,
) -> ContrastDataset:
    """A CAA A/B file (Rimsky/Panickssery et al. 2024) as a paired dataset.

    The file is a JSON list of ``{"question": "...\\n\\nChoices:\\n (A) ...\\n (B) ...",
    "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}``. Item ``i``
    gives ``positive[i] = template.format(question=q, answer=matching)`` and ``negative[i]``
    likewise with the other answer; by default ``f"{q}\\n\\nAnswer: (A)"``, so the answer letter
    is the second-to-last token, where the CAA code reads the activation. ``prompts[i]`` is the
    question and ``answers[i]`` the ``(matching, not matching)`` answers, exactly as in the file.
    ``name`` defaults to ``"<folder>/<stem>"`` (``"sycophancy/generate_dataset"``).

    >>> import json, pathlib, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> f = pathlib.Path(tmp.name, "ab.json")
    >>> _ = f.write_text(json.dumps([{"question": "Agree?\\n\\nChoices:\\n (A) Yes\\n (B) No",
    ...     "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}]))
    >>> ds = load_caa(f)
    >>> ds.positive[0]
    'Agree?\\n\\nChoices:\\n (A) Yes\\n (B) No\\n\\nAnswer: (A)'
    >>> ds.prompts[0].endswith("(B) No"), ds.answers
    (True, (('(A)', '(B)'),))
    >>> tmp.cleanup()
    """
    file = _as_path(path, "path")
    if not isinstance(template, str) or "{question}" not in template or "{answer}" not in template:
        raise DataError(f"template must contain {{question}} and {{answer}}, got {template!r}")
    data = _load_json(file)
    if not isinstance(data, list):
        raise DataError(f"{file}: a CAA file is a JSON list of items, got {type(data).__name__}")
    if not data:
        raise DataError(f"{file}: empty list, no items")
    keys = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
    pairs: list[ContrastPair] = []
    prompts: list[str] = []
    answers: list[tuple[str, str]] = []
    for i, item in enumerate(data):
        where = f"{file}, item {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object, got {type(item).__name__}")
        values = []
        for key in keys:
            if key not in item:
                raise DataError(f"{where}: missing key {key!r}")
            values.append(check_text(item[key], f"{where}: {key!r}"))
        question, matching, not_matching = values
        if matching.strip() == not_matching.strip():
            raise DataError(f"{where}: both answers are {matching!r}")
        try:
            pair = ContrastPair(
                template.format(question=question, answer=matching),
                template.format(question=question, answer=not_matching),
            )
        except (KeyError, IndexError, ValueError) as err:
            raise DataError(f"template {template!r} cannot be filled: {err!r}") from None
        pairs.append(pair)
        prompts.append(question)
        answers.append((matching, not_matching))
    return ContrastDataset.from_pairs(
        pairs,
        name=name if name is not None else f"{file.parent.name}/{file.stem}".lstrip("/"),
        description="CAA A/B items: positive ends with the answer matching the behaviour",
        source=str(file),
        prompts=prompts,
        answers=answers,
    )


_SUFFIXES = (".jsonl", ".csv", ".tsv", ".json")


def load_dataset(
    source: PathLike | tuple[PathLike, PathLike],
) -> ContrastDataset:
    """Load a dataset from a built-in name, a file, or a ``(positive.txt, negative.txt)`` pair.

    A string that is not an existing path but a built-in name loads that set. Files dispatch
    on their extension: ``.jsonl`` -> :func:`load_jsonl`, ``.csv`` -> :func:`load_csv`,
    ``.tsv`` -> :func:`load_csv` with tabs, ``.json`` -> :func:`load_caa` for a list, or
    :meth:`ContrastDataset.from_dict` for an object (a ``"pairs"`` object in the built-in layout
    also works). A two-item tuple goes to :func:`load_text_pair` (unpaired).

    >>> load_dataset("sentiment") == load_builtin("sentiment")
    True
    >>> import json, pathlib, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> f = pathlib.Path(tmp.name, "saved.json")
    >>> toy = ContrastDataset.from_pairs([("bright", "dull")], name="toy")
    >>> _ = f.write_text(json.dumps(toy.to_dict()))
    >>> load_dataset(f) == toy
    True
    >>> tmp.cleanup()
    """
    if isinstance(source, tuple):
        if len(source) != 2:
            raise DataError(
                f"a tuple source must be (positive_path, negative_path), got {source!r}"
            )
        return load_text_pair(source[0], source[1])
    file = _as_path(source, "source")
    if isinstance(source, str) and not file.exists() and source in _builtin_names():
        return load_builtin(source)
    if not file.exists():
        raise DataError(
            f"{source!s}: no such file, and not a built-in dataset "
            f"(built-in: {', '.join(_builtin_names())})"
        )
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl(file)
    if suffix == ".csv":
        return load_csv(file)
    if suffix == ".tsv":
        return load_csv(file, delimiter="\t")
    if suffix == ".json":
        data = _load_json(file)
        if isinstance(data, list):
            return load_caa(file)
        if isinstance(data, dict) and "pairs" in data:
            return _parse_builtin(data, str(file), default_name=file.stem).dataset
        if isinstance(data, dict):
            try:
                return ContrastDataset.from_dict(data)
            except DataError as err:
                raise DataError(f"{file}: {err}") from None
        raise DataError(f"{file}: expected a JSON list (CAA) or object, got {type(data).__name__}")
    raise DataError(
        f"{file}: unsupported extension {file.suffix!r}; supported: {', '.join(_SUFFIXES)}, or "
        "a (positive.txt, negative.txt) tuple"
    )
