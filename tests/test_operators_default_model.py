"""Slow tier: on the real default model every operator moves the concept on held-out prompts,
with its KL damage reported; a fitted condition steers only the prompts it should."""

from __future__ import annotations

from typing import Any

import pytest

import steerlab as sl
from steerlab import data
from steerlab.evaluation import concept_task, kl_task
from steerlab.interventions import Steering
from steerlab.sweeps import compare

pytestmark = pytest.mark.slow

LAYER = 15
# Operators that set an absolute component (clamp, cap, ablate, affine) must not touch the first
# token: its activation along the sentiment direction is ~1500 (attention sink) against ~15
# elsewhere, and rewriting it reverses their effect (measured: clamp at "all" shifts -3.0).
LAST = "last"


@pytest.fixture(scope="module")
def sentiment(default_model: Any) -> tuple[sl.SteeringVector, Any, Any]:
    dataset = data.load_builtin("sentiment")
    train, test = dataset.split(test_fraction=0.25, seed=0)
    vec = sl.compute_vector(
        default_model,
        list(train.positive)[:24],
        list(train.negative)[:24],
        layers=[LAYER],
        progress=False,
        plane=True,  # op="rotate" below
    )
    return vec, train, test


def _points(model: Any, vec: sl.SteeringVector, prompts: list[str], configs: dict[str, Any]) -> Any:
    pos_words, neg_words = data.concept_words("sentiment")
    task = concept_task(model, prompts, target_words=pos_words, contrast_words=neg_words)
    points = compare(model, configs, behaviour=task, damage=kl_task(prompts), progress=False)
    for name, p in points.items():  # the report: shift of log P(pos) - log P(neg), and KL
        print(f"{name:>10}: shift {p.shift:+.3f} ± {p.behaviour_sem:.3f}, KL {p.damage:.3f}")
    return points


def test_every_operator_moves_the_concept_on_held_out_prompts(
    default_model: Any, sentiment: Any
) -> None:
    vec, _, _ = sentiment
    neutral = data.neutral_prompts("sentiment")[:8]
    up = _points(
        default_model,
        vec,
        neutral,
        {
            "add": Steering(vec, 2.0, LAST, op="add"),
            "add_norm": Steering(vec, 2.0, LAST, op="add_norm"),
            "clamp": Steering(vec, 2.0, LAST, op="clamp"),
            "affine": Steering(vec, 2.0, LAST, op="affine"),
            "rotate": Steering(vec, 0.0, LAST, op="rotate"),  # in-plane part onto the concept
            "rotate180": Steering(vec, 180.0, LAST, op="rotate"),
        },
    )
    for name in ("add", "add_norm", "clamp", "affine", "rotate"):
        assert up[name].shift > 0.3, (name, up[name])
        assert up[name].damage < 2.0, (name, up[name])
    assert up["rotate180"].shift < -0.3, up["rotate180"]


def test_ablate_and_cap_remove_the_concept_from_positive_text(
    default_model: Any, sentiment: Any
) -> None:
    vec, _, test = sentiment
    positive = list(test.positive)[:8]
    down = _points(
        default_model,
        vec,
        positive,
        {
            "ablate": Steering(vec, positions=LAST, op="ablate"),
            "cap": Steering(vec, 0.0, LAST, op="cap"),
        },
    )
    for name in ("ablate", "cap"):
        assert down[name].shift < -0.1, (name, down[name])


def test_condition_steers_only_matching_prompts(default_model: Any, sentiment: Any) -> None:
    vec, _, _ = sentiment
    questions = [
        "What is the capital of France?",
        "How many legs does a spider have?",
        "Who wrote Hamlet?",
        "What is the boiling point of water?",
        "Which planet is the largest?",
        "How far away is the moon?",
        "What year did the war end?",
        "Why is the sky blue?",
    ]
    statements = [
        "Write a short story about a dragon.",
        "Describe a walk in the forest.",
        "Write a poem about the sea.",
        "Tell me a story about a robot.",
        "Describe your ideal holiday.",
        "Write a letter to a friend.",
        "Tell a tale about a lost key.",
        "Describe a rainy afternoon.",
    ]
    cond = sl.fit_condition(
        default_model, questions, statements, layers=[6, 8, 10], progress=False, test_fraction=0.25
    )
    print(cond, cond.metadata["heldout_accuracy"])
    assert cond.metadata["heldout_accuracy"] >= 0.75
    prompts = ["What is the tallest mountain?", "Write a story about a cat."]
    fires = cond.fires(default_model, prompts)
    base = default_model.generate(prompts, max_new_tokens=8)
    steered = default_model.generate(prompts, max_new_tokens=8, steering=vec, strength=4.0)
    gated = default_model.generate(prompts, max_new_tokens=8, steering=vec, strength=4.0, when=cond)
    for row in range(len(prompts)):
        assert gated[row] == (steered[row] if fires[row] else base[row])
