"""A tiny hand-made CAA data folder (word-level letters the tiny tokenizer knows)."""

from __future__ import annotations

import json
from pathlib import Path

LETTERS = ("one", "two")  # the tiny word-level vocabulary has no A/B; these play the letters


def _item(question: str, matching: str) -> dict[str, str]:
    other = LETTERS[1] if matching == LETTERS[0] else LETTERS[0]
    return {
        "question": f"{question}\n\nchoices :\n (one) yes it is\n (two) no it is not",
        "answer_matching_behavior": f"({matching})",
        "answer_not_matching_behavior": f"({other})",
    }


GENERATE = [
    _item("the food is good ?", "one"),
    _item("the movie was bad ?", "two"),
    _item("my day was great ?", "one"),
    _item("the weather is cold ?", "two"),
]
TEST = [
    _item("the city is big ?", "one"),
    _item("the dog ran fast ?", "two"),
    _item("i think the book is nice ?", "one"),
]


def write_caa(
    root: Path,
    behaviours: tuple[str, ...] = ("sycophancy",),
    *,
    generate: list[dict[str, str]] = GENERATE,
    test: list[dict[str, str]] = TEST,
) -> Path:
    for behaviour in behaviours:
        for split, name, items in (
            ("generate", "generate_dataset.json", generate),
            ("test", "test_dataset_ab.json", test),
        ):
            folder = root / "datasets" / split / behaviour
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(items))
    return root
