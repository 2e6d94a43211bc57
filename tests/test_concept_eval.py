"""The concept evaluation's sizes, per-item reliability, steerability predictor, and its LLM judge
reached through a real OpenAI-compatible server (``steerlab serve`` on a tiny model)."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.concepts import (
    Concept,
    builtin_concepts,
    concept_instructions,
    evaluate_concept,
    pair_consistency,
    score_texts,
)
from steerlab.judge import CRITERIA, Judge, judge_prompt, parse_rating
from steerlab.testing import tiny_model

TOY = Concept(
    name="toy",
    positive=("i love the food", "we ate bread", "soup is warm"),
    negative=("i hate the road", "we saw trains", "rain is cold"),
    scorer="words",
    words=("food", "bread", "soup"),
    hint="talk about food",
    description="food and eating",
)
ITEMS = ["the cat", "a dog", "the city", "my day", "a tree", "the sea"]


def test_the_bundled_data_is_big_enough_to_answer() -> None:
    concepts = builtin_concepts()
    assert len(concepts) >= 5
    items = concept_instructions()
    assert len(items) - len(items) // 2 >= 20 and len(set(items)) == len(items)
    for name, concept in concepts.items():
        assert len(concept.positive) >= 20, name
        assert concept.description and concept.hint
    for name in ("music", "animals"):
        c = concepts[name]
        pos = score_texts(c, list(c.positive))
        neg = score_texts(c, list(c.negative))
        # the word list finds the concept in its own positive side and never in the negative
        assert float((pos > 0).double().mean()) >= 0.9 and float(neg.sum()) == 0.0, name


@pytest.mark.parametrize(
    ("reply", "want"),
    [
        ("Clearly about food. Rating: [[2]]", 2.0),
        ("The scale is [[0]] to [[2]]. My verdict: [[1]]", 1.0),
        ("**Rating:** 0", 0.0),
        ("rating = 1.5", 1.5),
        ("Score: 2", 2.0),
        (" 1 ", 1.0),
        ("Rating: [[3]]", None),
        ("no idea", None),
        ("", None),
    ],
)
def test_ratings_are_parsed_robustly(reply: str, want: float | None) -> None:
    assert parse_rating(reply) == want


def test_reliability_and_steerability_beside_each_vector() -> None:
    model = tiny_model("llama")
    result = evaluate_concept(
        model,
        TOY,
        layer=1,
        methods=("mean_diff",),
        operators=("add",),
        strengths=(0.5,),
        instructions=ITEMS,
        max_new_tokens=4,
        damage=False,
        progress=False,
    )
    rows = {r.name: r for r in result.rows}
    acts = model.activations(list(TOY.positive + TOY.negative), layers=[1], positions="last")[1]
    diffs = (acts[:3] - acts[3:]).double()
    mean = diffs.mean(0)
    want = float(sum(d @ mean / (d.norm() * mean.norm()) for d in diffs) / 3)
    assert rows["mean_diff"].consistency == pytest.approx(want, abs=1e-6)
    assert result.settings["pair_consistency"] == pytest.approx(want, abs=1e-6)
    assert rows["unsteered"].consistency is None and rows["unsteered"].wrong_way is None
    # the unsteered row's items are the direct greedy continuations of the held-out half, scored
    test = ITEMS[3:]
    direct = model.generate(test, max_new_tokens=4, chat=True)
    assert list(rows["unsteered"].concept_items) == score_texts(TOY, direct).tolist()
    base = torch.tensor(rows["unsteered"].concept_items)
    for name in ("prompting", "mean_diff"):
        here = torch.tensor(rows[name].concept_items)
        assert rows[name].wrong_way == pytest.approx(float((here < base).double().mean()))
        assert rows[name].concept == pytest.approx(float(here.mean()))
    assert pair_consistency(acts[:3], acts[3:]) == pytest.approx(want, abs=1e-6)


# --- the judge through a real server -------------------------------------------------------------
@contextmanager
def _serve(folder: Path) -> Iterator[str]:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from steerlab.server.app import free_port

    port = free_port()
    src = str(Path(sl.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", "from steerlab.cli import main; main()", "serve"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--model", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, "steerlab serve exited early"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "steerlab serve did not become ready"
            time.sleep(0.2)
        yield url + "/v1"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_judge_through_a_local_steerlab_serve(tmp_path: Path) -> None:
    pytest.importorskip("openai")
    model = tiny_model("llama")
    folder = tmp_path / "judge-model"
    model.hf_model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    texts = ["We ate soup and bread.", "The train left at noon.", "a a a a"]
    instructions = ["Describe dinner.", "Describe a trip.", "Say something."]
    with _serve(folder) as url:
        judge = Judge(url, str(folder), max_tokens=6, concurrency=3)
        scores = judge.score("food and eating", instructions, texts, progress=False)
        # every request is the criterion's prompt as one user turn, answered greedily: the same
        # text the library generates for that prompt directly
        for criterion in CRITERIA:
            prompts = [
                judge_prompt(criterion, concept="food and eating", instruction=i, text=t)
                for i, t in zip(instructions, texts)
            ]
            direct = model.generate(prompts, max_new_tokens=6, chat=True)
            assert list(scores.replies[criterion]) == direct
            parsed = [parse_rating(r) for r in direct]
            got = scores.ratings[criterion].tolist()
            assert [None if math.isnan(g) else g for g in got] == parsed
        n_none = sum(parse_rating(r) is None for c in CRITERIA for r in scores.replies[c])
        assert scores.unparsed == n_none
        # the whole evaluation with the judge: every row counts its unreadable replies
        result = evaluate_concept(
            model,
            TOY,
            layer=1,
            methods=("mean_diff",),
            operators=("add",),
            strengths=(0.5,),
            instructions=ITEMS[:4],
            max_new_tokens=3,
            damage=False,
            progress=False,
            judge=judge,
        )
        assert result.settings["judge"] == {"url": url, "model": str(folder)}
        rows = {r.name: r for r in result.rows}
        unsteered = rows["unsteered"]
        outs = model.generate(ITEMS[2:4], max_new_tokens=3, chat=True)
        again = judge.score("food and eating", ITEMS[2:4], outs, progress=False)
        assert unsteered.unparsed == again.unparsed
        want = [v / 2 for v in again.ratings["concept"].tolist()]
        assert all(
            (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)
            for a, b in zip(unsteered.concept_items, want)
        )
    with pytest.raises(sl.ModelNotAvailableError, match="judge"):
        Judge(url, "x", max_tokens=2).score("food", ["a"], ["b"], progress=False)
    with pytest.raises(sl.InvalidInputError, match="judge_url"):
        Judge("localhost:8000", "x")


def test_extra_candidates_run_at_their_own_scale() -> None:
    """A vector made elsewhere (here a fixed random one) is used as given: its held-out row is
    the direct steered generation at the chosen multiple, scored, with its wrong-way share."""
    model = tiny_model("llama")
    vec = sl.SteeringVector(
        {1: torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))}
    )
    result = evaluate_concept(
        model,
        TOY,
        layer=1,
        methods=("mean_diff",),
        operators=("add",),
        strengths=(0.5,),
        instructions=ITEMS,
        max_new_tokens=4,
        damage=False,
        progress=False,
        extra={"given": (vec, "add")},
        extra_strengths=(3.0,),
    )
    rows = {r.name: r for r in result.rows}
    assert rows["given"].strength == 3.0
    assert result.settings["extra"] == {"given": {"op": "add", "strengths": [3.0]}}
    test = ITEMS[3:]
    direct = model.generate(
        test, max_new_tokens=4, chat=True, steering=vec, strength=3.0, positions=slice(1, None)
    )
    items = score_texts(TOY, direct).tolist()
    assert list(rows["given"].concept_items) == items
    base = torch.tensor(rows["unsteered"].concept_items)
    want = float((torch.tensor(items) < base).double().mean())
    assert rows["given"].wrong_way == pytest.approx(want)
    assert rows["given"].consistency == rows["mean_diff"].consistency


@pytest.mark.parametrize(
    ("extra", "strengths", "message"),
    [
        ({"x": "not a pair"}, (1.0,), "extra['x']"),
        ({"mean_diff": (None, "add")}, (1.0,), "extra['mean_diff']"),
        ({"prompting": (sl.SteeringVector({1: torch.ones(32)}), "add")}, (1.0,), "clashes"),
        ({"x": (sl.SteeringVector({1: torch.ones(32)}), "add")}, (0.0,), "extra_strengths"),
    ],
)
def test_bad_extra_candidates_are_refused(extra: Any, strengths: Any, message: str) -> None:
    with pytest.raises(sl.errors.InvalidInputError, match=re.escape(message)):
        evaluate_concept(
            tiny_model("llama"),
            TOY,
            layer=1,
            methods=("mean_diff",),
            instructions=ITEMS,
            extra=extra,
            extra_strengths=strengths,
            progress=False,
        )


def test_strength_choice_keeps_to_the_damage_budget() -> None:
    """With ``max_kl`` every (candidate, strength) is measured on the neutral corpus exactly as
    ``neutral_damage`` measures it, and the chosen strength is the best-scoring one within the
    budget; an entry with its own grid uses that grid."""
    from steerlab.scorers import neutral_corpus, neutral_damage

    model = tiny_model("llama")
    vec = sl.SteeringVector(
        {1: torch.randn(model.d_model, generator=torch.Generator().manual_seed(5))}
    )
    grid = (0.5, 4.0, 40.0)
    kwargs: dict[str, Any] = dict(
        layer=1,
        methods=("mean_diff",),
        operators=("add",),
        strengths=(0.5,),
        instructions=ITEMS,
        max_new_tokens=3,
        damage_passages=2,
        progress=False,
        extra={"given": (vec, "add", grid)},
    )
    direct = neutral_damage(
        model,
        [sl.Steering(vec, s, slice(1, None)) for s in grid],
        passages=neutral_corpus(2),
    )
    kls = [d.kl for d in direct]
    assert kls[0] < kls[1] < kls[2]
    budget = (kls[0] + kls[1]) / 2  # only the smallest strength fits
    result = evaluate_concept(model, TOY, max_kl=budget, **kwargs)
    assert result.settings["extra"]["given"]["strengths"] == list(grid)
    measured = dict(map(tuple, result.settings["train_kl"]["given"]))
    assert [measured[s] for s in grid] == pytest.approx(kls, rel=1e-6)
    rows = {r.name: r for r in result.rows}
    assert rows["given"].strength == 0.5
    assert rows["given"].kl_neutral == pytest.approx(kls[0], rel=1e-6)
    # no budget: the best train score over the whole grid, as the curve says
    free = evaluate_concept(model, TOY, **kwargs)
    curve = free.train_curves["given"]
    want = max(curve, key=lambda p: p[1])[0]
    assert {r.name: r for r in free.rows}["given"].strength == want
    assert free.settings["train_kl"] == {}
    # a budget nothing meets keeps the least damaging strength
    tight = evaluate_concept(model, TOY, max_kl=kls[0] / 2, **kwargs)
    assert {r.name: r for r in tight.rows}["given"].strength == 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_kl": 0.0}, "max_kl"),
        ({"max_kl": 0.5, "damage": False}, "max_kl"),
        ({"extra": {"x": (sl.SteeringVector({1: torch.ones(32)}), "add", ())}}, "extra['x']"),
    ],
)
def test_bad_damage_budget_or_grid_is_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(sl.errors.InvalidInputError, match=re.escape(message)):
        evaluate_concept(
            tiny_model("llama"),
            TOY,
            layer=1,
            methods=("mean_diff",),
            instructions=ITEMS,
            progress=False,
            **options,
        )
