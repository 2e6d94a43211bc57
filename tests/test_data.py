"""Tests of steerlab.data: value objects, built-in sets, file loaders and their errors."""

from __future__ import annotations

import dataclasses
import doctest
import json
from pathlib import Path

import pytest

import steerlab.data as data_module
from steerlab.data import (
    CAA_TEMPLATE,
    ContrastDataset,
    ContrastPair,
    builtin_names,
    concept_words,
    load_builtin,
    load_caa,
    load_csv,
    load_dataset,
    load_jsonl,
    load_text_pair,
    neutral_prompts,
)
from steerlab.errors import DataError, SteerlabError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAA_DIR = SHARED / "data" / "CAA" / "datasets"
needs_caa = pytest.mark.skipif(
    not (CAA_DIR / "generate" / "sycophancy" / "generate_dataset.json").is_file(),
    reason=f"shared CAA data not found under {CAA_DIR}",
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def toy(n: int = 10) -> ContrastDataset:
    return ContrastDataset.from_pairs([(f"good {i}", f"bad {i}") for i in range(n)], name="toy")


def caa_item(question: str, matching: str = "(A)", not_matching: str = "(B)") -> dict[str, str]:
    return {
        "question": question,
        "answer_matching_behavior": matching,
        "answer_not_matching_behavior": not_matching,
    }


# --------------------------------------------------------------------------- value objects


def test_data_error_is_steerlab_and_value_error() -> None:
    assert issubclass(DataError, SteerlabError)
    assert issubclass(DataError, ValueError)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(data_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 20
    assert result.failed == 0


def test_contrast_pair_is_frozen_and_validated() -> None:
    pair = ContrastPair("I love it", "I hate it")
    assert (pair.positive, pair.negative) == ("I love it", "I hate it")
    with pytest.raises(dataclasses.FrozenInstanceError):
        pair.positive = "x"  # type: ignore[misc]
    with pytest.raises(DataError, match="positive is empty"):
        ContrastPair("  ", "x")
    with pytest.raises(DataError, match="negative must be a string"):
        ContrastPair("x", 3)  # type: ignore[arg-type]


def test_dataset_coerces_lists_and_counts() -> None:
    ds = ContrastDataset(
        name="t",
        positive=["a", "b"],  # type: ignore[arg-type]
        negative=["c", "d", "e"],  # type: ignore[arg-type]
    )
    assert ds.positive == ("a", "b") and ds.negative == ("c", "d", "e")
    assert not ds.paired
    assert len(ds) == 5
    assert len(toy(4)) == 4
    assert hash(toy(3)) == hash(toy(3)) and toy(3) == toy(3)


def test_dataset_fields_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        ContrastDataset("t", ("a",), ("b",))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"positive": (), "negative": ("b",)}, "no positive texts"),
        ({"positive": ("a",), "negative": ()}, "no negative texts"),
        ({"positive": ("a", " "), "negative": ("b", "c")}, r"positive\[1\] is empty"),
        ({"positive": "abc", "negative": ("b",)}, "sequence of strings"),
        ({"positive": ("a",), "negative": (None,)}, r"negative\[0\] must be a string"),
        ({"positive": ("a", "b"), "negative": ("c",), "paired": True}, "is paired but has 2"),
        ({"positive": ("a",), "negative": ("b",), "paired": "yes"}, "paired must be True"),
        ({"positive": ("a",), "negative": ("b",), "prompts": ("q",)}, "unpaired"),
        (
            {"positive": ("a",), "negative": ("b",), "paired": True, "prompts": ("q", "r")},
            "1 pairs but 2 prompts",
        ),
        (
            {"positive": ("a",), "negative": ("b",), "paired": True, "answers": (("(A)",),)},
            r"answers\[0\] must be a \(matching, not matching\) pair",
        ),
        ({"positive": ("a",), "negative": ("b",), "license": 3}, "license must be a string"),
    ],
)
def test_dataset_rejects_bad_fields(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        ContrastDataset(name="bad", **kwargs)  # type: ignore[arg-type]


def test_dataset_rejects_empty_name() -> None:
    with pytest.raises(DataError, match="dataset name is empty"):
        ContrastDataset(name="", positive=("a",), negative=("b",))


def test_pairs_of_paired_and_unpaired() -> None:
    ds = toy(3)
    assert ds.pairs() == tuple(ContrastPair(f"good {i}", f"bad {i}") for i in range(3))
    unpaired = ContrastDataset(name="u", positive=("a", "b"), negative=("c", "d"))
    with pytest.raises(DataError, match="'u' is unpaired"):
        unpaired.pairs()


def test_from_pairs_accepts_pairs_and_tuples_and_rejects_others() -> None:
    ds = ContrastDataset.from_pairs(
        [ContrastPair("a", "b"), ("c", "d")], name="mix", description="d", license="MIT"
    )
    assert ds.paired and ds.positive == ("a", "c") and ds.negative == ("b", "d")
    assert ds.description == "d" and ds.license == "MIT"
    with pytest.raises(DataError, match="pair 1 must be a ContrastPair"):
        ContrastDataset.from_pairs([("a", "b"), ["c", "d"]], name="x")  # type: ignore[list-item]
    with pytest.raises(DataError, match=r"pair 0: ContrastPair\.negative is empty"):
        ContrastDataset.from_pairs([("a", "")], name="x")
    with pytest.raises(DataError, match="no positive texts"):
        ContrastDataset.from_pairs([], name="x")


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_complete() -> None:
    ds = toy(20)
    train, test = ds.split(test_fraction=0.25, seed=7)
    again_train, again_test = ds.split(test_fraction=0.25, seed=7)
    assert (train, test) == (again_train, again_test)
    assert len(test) == 5 and len(train) == 15
    assert set(train.positive).isdisjoint(test.positive)
    assert set(train.positive) | set(test.positive) == set(ds.positive)
    # the original order is kept inside each half
    for part in (train, test):
        assert list(part.positive) == sorted(part.positive, key=ds.positive.index)
    other = [ds.split(test_fraction=0.25, seed=s)[1].positive for s in range(5)]
    assert len(set(other)) > 1, "different seeds should give different splits"


def test_split_keeps_pairs_prompts_and_answers_together() -> None:
    n = 12
    ds = ContrastDataset.from_pairs(
        [(f"q{i} A", f"q{i} B") for i in range(n)],
        name="ab",
        prompts=[f"q{i}" for i in range(n)],
        answers=[(f"A{i}", f"B{i}") for i in range(n)],
        license="MIT",
    )
    train, test = ds.split(test_fraction=0.5, seed=3)
    for part in (train, test):
        assert part.paired and part.license == "MIT"
        for pos, neg, prompt, (a, b) in zip(
            part.positive, part.negative, part.prompts, part.answers, strict=True
        ):
            i = pos.split()[0][1:]
            assert neg == f"q{i} B" and prompt == f"q{i}" and (a, b) == (f"A{i}", f"B{i}")
    assert train.name == "ab[train]" and test.name == "ab[test]"


@pytest.mark.parametrize("fraction", [0.001, 0.5, 0.999])
def test_split_halves_are_never_empty(fraction: float) -> None:
    train, test = toy(3).split(test_fraction=fraction, seed=0)
    assert len(train) >= 1 and len(test) >= 1 and len(train) + len(test) == 3


def test_split_unpaired_splits_each_side() -> None:
    ds = ContrastDataset(
        name="u", positive=tuple(f"p{i}" for i in range(10)), negative=("n0", "n1", "n2", "n3")
    )
    train, test = ds.split(test_fraction=0.5, seed=1)
    assert not train.paired and not test.paired
    assert (len(train.positive), len(test.positive)) == (5, 5)
    assert (len(train.negative), len(test.negative)) == (2, 2)
    assert set(train.negative).isdisjoint(test.negative)
    assert set(train.negative) | set(test.negative) == set(ds.negative)


@pytest.mark.parametrize("fraction", [0, 1, -0.5, 1.5, float("nan"), True, "0.5"])
def test_split_rejects_bad_fraction(fraction: object) -> None:
    with pytest.raises(DataError, match="test_fraction"):
        toy(4).split(test_fraction=fraction, seed=0)  # type: ignore[arg-type]


def test_split_rejects_impossible_and_bad_seed() -> None:
    with pytest.raises(DataError, match=r"cannot split .*1 item"):
        toy(1).split(test_fraction=0.5, seed=0)
    unpaired = ContrastDataset(name="u", positive=("a", "b"), negative=("c",))
    with pytest.raises(DataError, match="negative: 1 item"):
        unpaired.split(test_fraction=0.5, seed=0)
    with pytest.raises(DataError, match="seed must be an int"):
        toy(4).split(test_fraction=0.5, seed=1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- dict round trip


def test_to_dict_from_dict_round_trip_through_json() -> None:
    paired = ContrastDataset.from_pairs(
        [("q A", "q B"), ("r A", "r B")],
        name="ab",
        description="desc",
        source="src",
        license="MIT",
        prompts=["q", "r"],
        answers=[("(A)", "(B)"), ("(B)", "(A)")],
    )
    unpaired = ContrastDataset(name="u", positive=("a",), negative=("b", "c"))
    for ds in (paired, unpaired):
        again = ContrastDataset.from_dict(json.loads(json.dumps(ds.to_dict())))
        assert again == ds
    d = paired.to_dict()
    d["extra_key_from_the_future"] = 1
    assert ContrastDataset.from_dict(d) == paired


def test_from_dict_errors() -> None:
    with pytest.raises(DataError, match=r"missing the key.*'negative', 'paired'"):
        ContrastDataset.from_dict({"name": "x", "positive": ["a"]})
    with pytest.raises(DataError, match="format 'other/2'"):
        ContrastDataset.from_dict(
            {"format": "other/2", "name": "x", "positive": ["a"], "negative": ["b"], "paired": 0}
        )
    with pytest.raises(DataError, match="must be a mapping"):
        ContrastDataset.from_dict(["a"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- built-in sets


def test_builtin_names() -> None:
    assert builtin_names() == ["formality", "sentiment"]


@pytest.mark.parametrize(("name", "min_pairs"), [("sentiment", 64), ("formality", 40)])
def test_builtin_sets_are_well_formed(name: str, min_pairs: int) -> None:
    ds = load_builtin(name)
    assert ds.name == name and ds.paired
    assert len(ds) >= min_pairs
    assert ds.description and ds.source and ds.license
    for pair in ds.pairs():
        assert pair.positive.strip() and pair.negative.strip()
        assert pair.positive != pair.negative
    assert len(set(ds.positive)) == len(ds.positive)
    assert len(set(ds.negative)) == len(ds.negative)
    assert not set(ds.positive) & set(ds.negative)
    neutral = neutral_prompts(name)
    assert len(neutral) >= 40
    assert len(set(neutral)) == len(neutral) and all(p.strip() for p in neutral)
    assert not set(neutral) & (set(ds.positive) | set(ds.negative))
    pos_words, neg_words = concept_words(name)
    for words in (pos_words, neg_words):
        assert 15 <= len(words) <= 30 and len(set(words)) == len(words)
        for word in words:
            assert word.startswith(" ") and word[1:].isalpha(), repr(word)
    assert not set(pos_words) & set(neg_words)


def test_sentiment_contains_the_canonical_example_and_spans_domains() -> None:
    ds = load_builtin("sentiment")
    assert (
        ContrastPair(
            "I absolutely loved the concert last night, it was",
            "I absolutely hated the concert last night, it was",
        )
        in ds.pairs()
    )
    text = " ".join(ds.positive).lower()
    for topic in ("coffee", "film", "holiday", "job", "weather", "phone", "neighbour", "match"):
        assert topic in text, topic
    assert neutral_prompts("sentiment")[:3] == [
        "The weather today is",
        "My review of the restaurant:",
        "Yesterday I went to the",
    ]


def test_builtin_results_are_independent_copies() -> None:
    words, _ = concept_words("sentiment")
    words.append(" mutated")
    prompts = neutral_prompts("sentiment")
    prompts.clear()
    assert " mutated" not in concept_words("sentiment")[0]
    assert neutral_prompts("sentiment")
    assert load_builtin("sentiment") is load_builtin("sentiment")  # cached immutable value


@pytest.mark.parametrize("function", [load_builtin, neutral_prompts, concept_words])
def test_unknown_builtin_lists_available_names(function: object) -> None:
    with pytest.raises(DataError, match="unknown built-in dataset 'nope'; available: formality"):
        function("nope")  # type: ignore[operator]
    with pytest.raises(DataError, match="unknown built-in"):
        function(["sentiment"])  # type: ignore[operator]


# --------------------------------------------------------------------------- text files


def test_load_text_pair_unpaired_and_paired(tmp_path: Path) -> None:
    pos = write(tmp_path / "happy.txt", "I am glad\n\n   \nWhat a joy \r\nSo good\n")
    neg = write(tmp_path / "sad.txt", "I am sad\nWhat a bore\nSo bad")
    ds = load_text_pair(pos, neg)
    assert ds.name == "happy" and not ds.paired
    assert ds.positive == ("I am glad", "What a joy ", "So good")  # trailing space kept
    assert ds.negative == ("I am sad", "What a bore", "So bad")
    paired = load_text_pair(str(pos), str(neg), paired=True, name="mood")
    assert paired.name == "mood" and paired.pairs()[1] == ContrastPair("What a joy ", "What a bore")


def test_load_text_pair_errors(tmp_path: Path) -> None:
    pos = write(tmp_path / "pos.txt", "a\nb\n")
    neg = write(tmp_path / "neg.txt", "c\n")
    with pytest.raises(DataError, match=r"pos\.txt has 2, .*neg\.txt has 1"):
        load_text_pair(pos, neg, paired=True)
    assert len(load_text_pair(pos, neg)) == 3  # unpaired is fine
    empty = write(tmp_path / "empty.txt", "\n  \n")
    with pytest.raises(DataError, match=r"empty\.txt: empty file"):
        load_text_pair(pos, empty)
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        load_text_pair(tmp_path / "missing.txt", neg)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
        load_text_pair(binary, neg)
    with pytest.raises(DataError, match="is a directory"):
        load_text_pair(tmp_path, neg)
    with pytest.raises(DataError, match="positive_path must be a path"):
        load_text_pair(3, neg)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- JSON Lines


def test_load_jsonl_pairs(tmp_path: Path) -> None:
    f = write(
        tmp_path / "pairs.jsonl",
        '{"positive": "kind words", "negative": "cruel words", "id": 1}\n'
        "\n"
        '{"positive": "warm", "negative": "cold"}\n',
    )
    ds = load_jsonl(f)
    assert ds.paired and ds.name == "pairs" and ds.source == str(f)
    assert ds.pairs() == (ContrastPair("kind words", "cruel words"), ContrastPair("warm", "cold"))


def test_load_jsonl_labelled_and_custom_keys(tmp_path: Path) -> None:
    f = write(
        tmp_path / "labelled.jsonl",
        '{"text": "great", "label": 1}\n{"text": "awful", "label": 0}\n'
        '{"text": "superb", "label": true}\n{"text": "dire", "label": "0"}\n',
    )
    ds = load_jsonl(f)
    assert not ds.paired
    assert ds.positive == ("great", "superb") and ds.negative == ("awful", "dire")
    g = write(tmp_path / "custom.jsonl", '{"good": "yes", "bad": "no"}\n')
    assert load_jsonl(g, positive_key="good", negative_key="bad").pairs() == (
        ContrastPair("yes", "no"),
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        ("\n \n", "empty file"),
        ('{"positive": "a", "negative": "b"}\n{"positive": "a",\n', "line 2: invalid JSON"),
        ('{"positive": "a", "negative": "b"}\n\n["a", "b"]\n', "line 3: expected a JSON object"),
        ('{"positive": "a"}\n', "line 1: missing key 'negative'"),
        ('{"positive": "a", "negative": ""}\n', "line 1: 'negative' is empty"),
        ('{"positive": "a", "negative": 5}\n', "line 1: 'negative' must be a string"),
        ('{"prompt": "a"}\n', r"line 1: expected keys 'positive'/'negative' or 'text'/'label'"),
        (
            '{"positive": "a", "negative": "b"}\n{"text": "c", "label": 1}\n',
            "line 2: a labelled item, but line 1 was a pair item",
        ),
        ('{"text": "a", "label": 2}\n', "line 1: label must be 1 or 0"),
        ('{"text": "a"}\n', "line 1: missing key 'label'"),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n', "no item has label 0"),
        ('{"text": "a", "label": 0}\n', "no item has label 1"),
    ],
)
def test_load_jsonl_errors(tmp_path: Path, content: str, message: str) -> None:
    f = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=message) as info:
        load_jsonl(f)
    assert "bad.jsonl" in str(info.value)


# --------------------------------------------------------------------------- CSV


def test_load_csv_pairs_with_quotes_and_bom(tmp_path: Path) -> None:
    f = tmp_path / "pairs.csv"
    f.write_bytes(
        "\ufeffpositive, negative ,note\n"
        '"Thanks, that was great","Ugh, that was awful",x\n'
        ",,\n"
        '"two\nlines",plain,\n'.encode()
    )
    ds = load_csv(f)
    assert ds.paired and ds.name == "pairs"
    assert ds.pairs() == (
        ContrastPair("Thanks, that was great", "Ugh, that was awful"),
        ContrastPair("two\nlines", "plain"),
    )


def test_load_csv_labelled_and_tsv(tmp_path: Path) -> None:
    f = write(tmp_path / "lab.csv", "text,label\nnice,1\nnasty,0\nlovely,true\n")
    ds = load_csv(f)
    assert not ds.paired and ds.positive == ("nice", "lovely") and ds.negative == ("nasty",)
    t = write(tmp_path / "pairs.tsv", "positive\tnegative\nyes, indeed\tno, never\n")
    assert load_csv(t, delimiter="\t").pairs() == (ContrastPair("yes, indeed", "no, never"),)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        ("positive,negative\n", "no data rows"),
        ("text,label\n\n", "no data rows"),
        ("good,bad\na,b\n", "the header needs columns 'positive' and 'negative'"),
        ("positive,negative\na,b\nc\n", "line 3: missing column 'negative'"),
        ("positive,negative\na,b,c\n", "line 2: more fields than the 2 header columns"),
        ("positive,negative\na,\n", "line 2: 'negative' is empty"),
        ("text,label\na,yes\n", "line 2: label must be 1 or 0"),
        ("text,label\na,1\n", "no item has label 0"),
    ],
)
def test_load_csv_errors(tmp_path: Path, content: str, message: str) -> None:
    f = write(tmp_path / "bad.csv", content)
    with pytest.raises(DataError, match=message) as info:
        load_csv(f)
    assert "bad.csv" in str(info.value)


# --------------------------------------------------------------------------- CAA


def test_load_caa_small_file(tmp_path: Path) -> None:
    items = [
        caa_item("Is the sky green?\n\nChoices:\n (A) Yes\n (B) No"),
        caa_item("Pick one\n\nChoices:\n (A) left\n (B) right", "(B)", "(A)"),
    ]
    f = write(tmp_path / "ab.json", json.dumps(items))
    ds = load_caa(f)
    assert ds.paired and len(ds) == 2
    assert ds.positive[0] == items[0]["question"] + "\n\nAnswer: (A)"
    assert ds.negative[0] == items[0]["question"] + "\n\nAnswer: (B)"
    assert ds.positive[1].endswith("Answer: (B)") and ds.negative[1].endswith("Answer: (A)")
    assert ds.prompts == tuple(item["question"] for item in items)
    assert ds.answers == (("(A)", "(B)"), ("(B)", "(A)"))
    assert ds.name == f"{tmp_path.name}/ab"
    custom = load_caa(f, template="Q: {question}\nA: {answer}", name="c")
    assert custom.name == "c" and custom.positive[0].startswith("Q: Is the sky")
    assert custom.positive[0].endswith("\nA: (A)")
    assert CAA_TEMPLATE.format(question="q", answer="(A)") == "q\n\nAnswer: (A)"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        ("[", "invalid JSON"),
        ('{"question": "q"}', "a CAA file is a JSON list"),
        ("[]", "empty list"),
        ('[{"question": "q", "answer_matching_behavior": "(A)"}]', "item 0: missing key"),
        (json.dumps([caa_item("q"), "oops"]), "item 1: expected an object"),
        (json.dumps([caa_item("q"), caa_item("")]), "item 1: 'question' is empty"),
        (json.dumps([caa_item("q", "(A)", "(A)")]), "item 0: both answers are '\\(A\\)'"),
        (
            json.dumps([{**caa_item("q"), "answer_matching_behavior": ["(A)"]}]),
            "item 0: 'answer_matching_behavior' must be a string",
        ),
    ],
)
def test_load_caa_errors(tmp_path: Path, content: str, message: str) -> None:
    f = write(tmp_path / "bad.json", content)
    with pytest.raises(DataError, match=message) as info:
        load_caa(f)
    assert "bad.json" in str(info.value)


def test_load_caa_rejects_bad_template(tmp_path: Path) -> None:
    f = write(tmp_path / "ab.json", json.dumps([caa_item("q")]))
    with pytest.raises(DataError, match="template must contain"):
        load_caa(f, template="{question} only")
    with pytest.raises(DataError, match="cannot be filled"):
        load_caa(f, template="{question} {answer} {other}")


@needs_caa
def test_load_caa_real_sycophancy() -> None:
    path = CAA_DIR / "generate" / "sycophancy" / "generate_dataset.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    ds = load_caa(path)
    assert len(raw) == len(ds) == 1000
    assert ds.name == "sycophancy/generate_dataset" and ds.paired
    assert ds.answers == tuple(
        (item["answer_matching_behavior"], item["answer_not_matching_behavior"]) for item in raw
    )
    assert ds.prompts == tuple(item["question"] for item in raw)
    assert {a for pair in ds.answers for a in pair} == {"(A)", "(B)"}
    for i in (0, 1, 499, 999):
        matching = raw[i]["answer_matching_behavior"]
        other = raw[i]["answer_not_matching_behavior"]
        assert ds.positive[i] == f"{raw[i]['question']}\n\nAnswer: {matching}"
        assert ds.positive[i].endswith(matching) and ds.negative[i].endswith(other)
    # both letters occur on the matching side, so the vector is not just "A minus B"
    matching_letters = [a for a, _ in ds.answers]
    assert 300 < matching_letters.count("(A)") < 700
    train, test = ds.split(test_fraction=0.1, seed=0)
    assert (len(train), len(test)) == (900, 100)


@needs_caa
@pytest.mark.parametrize(
    ("behaviour", "count"),
    [
        ("coordinate-other-ais", 360),
        ("corrigible-neutral-HHH", 290),
        ("hallucination", 1000),
        ("myopic-reward", 950),
        ("refusal", 408),
        ("survival-instinct", 903),
        ("sycophancy", 1000),
    ],
)
def test_load_caa_every_real_behaviour(behaviour: str, count: int) -> None:
    generate = load_dataset(CAA_DIR / "generate" / behaviour / "generate_dataset.json")
    assert len(generate) == count
    test = load_caa(CAA_DIR / "test" / behaviour / "test_dataset_ab.json")
    assert len(test) == 50
    for ds in (generate, test):
        for pos, (matching, _) in zip(ds.positive, ds.answers, strict=True):
            assert pos.endswith("\n\nAnswer: " + matching)


# --------------------------------------------------------------------------- load_dataset


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    assert load_dataset("formality") == load_builtin("formality")
    jsonl = write(tmp_path / "a.jsonl", '{"positive": "p", "negative": "n"}\n')
    csv_file = write(tmp_path / "b.CSV", "positive,negative\np,n\n")
    tsv = write(tmp_path / "c.tsv", "text\tlabel\np\t1\nn\t0\n")
    caa = write(tmp_path / "d.json", json.dumps([caa_item("q")]))
    saved = write(tmp_path / "e.json", json.dumps(toy(2).to_dict()))
    layout = write(
        tmp_path / "f.json",
        json.dumps({"pairs": [{"positive": "p", "negative": "n"}], "neutral": ["x"]}),
    )
    assert load_dataset(jsonl).pairs() == (ContrastPair("p", "n"),)
    assert load_dataset(str(csv_file)).pairs() == (ContrastPair("p", "n"),)
    assert load_dataset(tsv).positive == ("p",)
    assert load_dataset(caa).answers == (("(A)", "(B)"),)
    assert load_dataset(saved) == toy(2)
    assert load_dataset(layout).name == "f" and len(load_dataset(layout)) == 1
    pos = write(tmp_path / "pos.txt", "p\n")
    neg = write(tmp_path / "neg.txt", "n\n")
    assert load_dataset((pos, neg)).positive == ("p",)


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a built-in dataset.*formality, sentiment"):
        load_dataset("sentimnet")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "gone.jsonl")
    odd = write(tmp_path / "data.parquet", "x")
    with pytest.raises(DataError, match=r"unsupported extension '\.parquet'; supported: \.jsonl"):
        load_dataset(odd)
    bad_dict = write(tmp_path / "bad.json", '{"name": "x"}')
    with pytest.raises(DataError, match=r"bad\.json: dataset dict is missing"):
        load_dataset(bad_dict)
    scalar = write(tmp_path / "num.json", "3")
    with pytest.raises(DataError, match="expected a JSON list"):
        load_dataset(scalar)
    with pytest.raises(DataError, match="a tuple source"):
        load_dataset((tmp_path / "a.txt",))  # type: ignore[arg-type]
