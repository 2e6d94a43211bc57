"""Slow tier: the real default model (SmolLM2-135M-Instruct) actually moves."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab import data

pytestmark = pytest.mark.slow


def _shift(model: Any, prompts: list[str], steering: Any = None) -> float:
    """Mean log P(positive words) - log P(negative words) at the next position."""
    pos_words, neg_words = data.concept_words("sentiment")
    tok = model.tokenizer
    pos = [tok(w, add_special_tokens=False)["input_ids"][0] for w in pos_words]
    neg = [tok(w, add_special_tokens=False)["input_ids"][0] for w in neg_words]
    logp = model.next_token_logits(prompts, steering=steering).log_softmax(-1)
    return float((logp[:, pos].logsumexp(-1) - logp[:, neg].logsumexp(-1)).mean())


def test_default_model_shape(default_model: Any) -> None:
    assert (default_model.n_layers, default_model.d_model) == (30, 576)
    assert default_model.adapter.n_heads == 9 and default_model.adapter.n_kv_heads == 3


def test_sentiment_vector_moves_held_out_prompts(default_model: Any) -> None:
    dataset = data.load_builtin("sentiment")
    train, _ = dataset.split(test_fraction=0.25, seed=0)
    held_out = data.neutral_prompts("sentiment")[:24]
    layer = default_model.n_layers // 2
    vec = sl.mean_diff(default_model, list(train.positive), list(train.negative), layers=[layer])
    base = _shift(default_model, held_out)
    up = _shift(default_model, held_out, vec.scaled(2.0))
    down = _shift(default_model, held_out, vec.scaled(-2.0))
    assert up > base + 0.5, (base, up)
    assert down < base - 0.5, (base, down)


def test_steered_generation_is_more_positive(default_model: Any) -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    dataset = data.load_builtin("sentiment")
    layer = default_model.n_layers // 2
    vec = sl.mean_diff(
        default_model, list(dataset.positive), list(dataset.negative), layers=[layer]
    )
    prompts = data.neutral_prompts("sentiment")[-12:]
    analyzer = SentimentIntensityAnalyzer()

    def score(texts: list[str]) -> float:
        return sum(analyzer.polarity_scores(t)["compound"] for t in texts) / len(texts)

    base = default_model.generate(prompts, max_new_tokens=20)
    up = default_model.generate(prompts, max_new_tokens=20, steering=vec.scaled(3.0))
    down = default_model.generate(prompts, max_new_tokens=20, steering=vec.scaled(-3.0))
    up_score, base_score, down_score = score(up), score(base), score(down)
    assert up_score > base_score + 0.1, (up_score, base_score)
    assert down_score < up_score - 0.3, (down_score, up_score)


def test_batched_generation_matches_single_on_real_model(default_model: Any) -> None:
    prompts = ["The weather today is", "My favourite food is without any doubt"]
    vec = sl.SteeringVector({12: torch.randn(576, generator=torch.Generator().manual_seed(0))})
    batched = default_model.generate_ids(prompts, max_new_tokens=10, steering=vec)
    for i, prompt in enumerate(prompts):
        alone = default_model.generate_ids([prompt], max_new_tokens=10, steering=vec)[0]
        assert torch.equal(batched[i], alone)
