"""Scorers on fixed texts, and the damage metrics against hand computations."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.analysis import residual_norms
from steerlab.concepts import (
    Concept,
    available_operators,
    builtin_concepts,
    evaluate_concept,
    score_texts,
)
from steerlab.errors import InvalidInputError
from steerlab.interventions import Steering
from steerlab.scorers import (
    compression_ratio,
    continuation_logprobs,
    fluency_scores,
    harmonic_mean,
    neutral_corpus,
    neutral_damage,
    relevance_scores,
    repetition_rate,
    sentiment_score,
    words_score,
)
from steerlab.testing import hook_count, tiny_model


def test_word_list_scores_count_whole_words() -> None:
    texts = [
        "We ate bread, soup and more bread.",  # 3 hits -> capped at 1
        "The breadth of the report.",  # 'breadth' is not 'bread'
        "Soup!",
        "",
    ]
    assert words_score(texts, words=["bread", " soup"]).tolist() == [1.0, 0.0, 0.5, 0.0]
    with pytest.raises(InvalidInputError):
        words_score(texts, words=[" "])


def test_sentiment_score_maps_vader_to_unit_interval() -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["I love this, it is wonderful!", "This is terrible and sad.", "The box is blue."]
    compound = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in texts]
    up = sentiment_score(texts)
    down = sentiment_score(texts, sign=-1)
    assert up.tolist() == pytest.approx([(c + 1) / 2 for c in compound], abs=1e-6)
    assert down.tolist() == pytest.approx([(1 - c) / 2 for c in compound], abs=1e-6)
    assert up[0] > 0.8 and up[1] < 0.2 and up[2] == pytest.approx(0.5)


def test_repetition_compression_and_harmonic_mean() -> None:
    # 7 word 3-grams, 3 distinct: (a b c), (b c a), (c a b)
    assert repetition_rate("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert repetition_rate("one two") == 0.0
    loop = "the same words again " * 20
    assert compression_ratio(loop) < 0.15 < compression_ratio("A short, varied sentence here.")
    h = harmonic_mean(torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.5, 0.5, 0.0]))
    assert h.tolist() == pytest.approx([2 / 3, 0.5, 0.0])


def test_concept_scorers_of_the_builtin_concepts() -> None:
    concepts = builtin_concepts()
    assert score_texts(concepts["food"], ["Pizza and pasta for dinner.", "A train."]).tolist() == [
        1.0,
        0.0,
    ]
    formal = score_texts(concepts["formality"], ["We kindly request that you respond.", "hey"])
    assert formal.tolist() == [1.0, 0.0]
    assert score_texts(concepts["sentiment"], ["What a great day!"])[0] > 0.7
    with pytest.raises(InvalidInputError, match="scorer"):
        Concept(name="x", positive=("a",), negative=("b",), scorer="magic")


def test_formality_scorer_finds_the_formal_side_of_its_own_pairs() -> None:
    # the 20 words of formality.json (made for next-token mass) find a marker in 10 of the 46
    # formal sentences; the scorer's list finds one in 28 and in none of the casual ones
    formality = builtin_concepts()["formality"]
    formal = score_texts(formality, list(formality.positive))
    casual = score_texts(formality, list(formality.negative))
    old_words, _ = sl.data.concept_words("formality")
    old = words_score(list(formality.positive), words=old_words)
    assert (int((formal > 0).sum()), int((old > 0).sum()), len(formal)) == (28, 10, 46)
    assert float(formal.sum()) == 19.0 and float(casual.sum()) == 0.0


@pytest.fixture(scope="module")
def model() -> sl.SteeredModel:
    return tiny_model("llama")


def _logprob(model: sl.SteeredModel, prompt: str, continuation: str) -> tuple[float, int]:
    tok = model.tokenizer
    head = tok(prompt)["input_ids"]
    tail = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    logp = model.hf_model(ids).logits[0].double().log_softmax(-1)
    total = sum(float(logp[len(head) + t - 1, tail[t]]) for t in range(len(tail)))
    return total, len(tail)


@torch.no_grad()
def test_concept_strengths_are_residual_fractions_and_skip_the_first_token(
    model: sl.SteeredModel,
) -> None:
    concept = Concept(
        name="toy",
        positive=("i love the food", "the soup is good"),
        negative=("i hate the road", "the car is bad"),
        scorer="words",
        words=("food",),
        hint="talk about food",
    )
    instructions = ["the cat", "a dog", "the city", "my day"]
    result = evaluate_concept(
        model, concept, layer=1, methods=("mean_diff",), strengths=(0.5,),
        instructions=instructions, max_new_tokens=3, damage_passages=2, progress=False,
    )  # fmt: skip
    assert available_operators() == ("add", "clamp", "add_norm")
    assert [r.name for r in result.rows] == [
        "unsteered", "prompting", "mean_diff", "mean_diff+clamp", "mean_diff+add_norm",
    ]  # fmt: skip
    chat = model.tokenizer.chat_template is not None
    norms = residual_norms(model, instructions[:2], layers=[1], chat=chat)
    assert result.settings["residual_norm"] == pytest.approx(norms[1], rel=1e-9)
    raw = sl.compute_vector(
        model, list(concept.positive), list(concept.negative), layers=[1], progress=False
    )
    assert result.settings["raw_vector_norms"]["mean_diff"] == pytest.approx(
        float(raw[1].norm()), rel=1e-5
    )
    scaled = raw.scaled_to_residual(norms)
    passages = neutral_corpus(2)
    rows = {r.name: r for r in result.rows}
    for op, name in (("add", "mean_diff"), ("clamp", "mean_diff+clamp")):
        every_but_first, everywhere = neutral_damage(
            model,
            [Steering(scaled, 0.5, slice(1, None), op=op), Steering(scaled, 0.5, "all", op=op)],
            passages=passages,
        )
        assert rows[name].strength == 0.5
        assert rows[name].kl_neutral == pytest.approx(every_but_first.kl, rel=1e-4)
        assert rows[name].kl_neutral != pytest.approx(everywhere.kl, rel=1e-2)
    with pytest.raises(InvalidInputError, match="scale"):
        evaluate_concept(model, concept, layer=1, instructions=instructions, scale="norm")


@torch.no_grad()
def test_fluency_and_relevance_against_direct_forward_passes(model: sl.SteeredModel) -> None:
    prompts = ["the movie was", "i think the food is"]
    texts = [" good and the city is big", " very very very very bad"]
    lp, counts = continuation_logprobs(model, prompts, texts)
    expected = [_logprob(model, p, t) for p, t in zip(prompts, texts, strict=True)]
    assert lp.tolist() == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert counts.tolist() == [e[1] for e in expected]
    out = fluency_scores(model, prompts, texts)
    for i, (total, n) in enumerate(expected):
        ppl = math.exp(-total / n)
        assert float(out["perplexity"][i]) == pytest.approx(ppl, rel=1e-4)
        rep = repetition_rate(texts[i])
        f = min(1.0, max(0.0, 1 - math.log(ppl) / math.log(1000))) * (1 - rep)
        assert float(out["fluency"][i]) == pytest.approx(f, abs=1e-5)
    assert out["repetition"][1] > 0 == out["repetition"][0]
    rel = relevance_scores(model, prompts, texts, chat=False, generic="the")
    for i, (total, n) in enumerate(expected):
        plain, _ = _logprob(model, "the", texts[i])
        pmi = (total - plain) / n
        assert float(rel[i]) == pytest.approx(1 / (1 + math.exp(-2 * pmi)), abs=1e-5)


@torch.no_grad()
def test_neutral_damage_against_a_hand_written_hook(model: sl.SteeredModel) -> None:
    passages = ["the dog ran to the city", "a cat sat on the old car and the sun was hot"]
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(model.d_model, generator=gen)
    vec = sl.SteeringVector({1: direction})
    none, steered = neutral_damage(model, [None, sl.Steering(vec, 3.0)], passages=passages)
    hf, tok = model.hf_model, model.tokenizer

    def run(text: str, add: bool) -> torch.Tensor:
        def hook(module: Any, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + 3.0 * direction
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = hf.model.layers[1].register_forward_hook(hook) if add else None
        try:
            return hf(torch.tensor([tok(text)["input_ids"]])).logits[0].double()
        finally:
            if handle is not None:
                handle.remove()

    kls, nll_base, nll_steer, count = [], 0.0, 0.0, 0
    for text in passages:
        ids = tok(text)["input_ids"]
        base, steer = run(text, False), run(text, True)
        log_p, log_q = base.log_softmax(-1), steer.log_softmax(-1)
        for t in range(len(ids) - 1):
            kls.append(float((log_p[t].exp() * (log_p[t] - log_q[t])).sum()))
            nll_base -= float(log_p[t, ids[t + 1]])
            nll_steer -= float(log_q[t, ids[t + 1]])
            count += 1
    assert none.kl == 0.0 and none.n_tokens == steered.n_tokens == count
    assert steered.kl == pytest.approx(sum(kls) / count, rel=1e-4)
    assert steered.base_perplexity == pytest.approx(math.exp(nll_base / count), rel=1e-5)
    assert steered.perplexity == pytest.approx(math.exp(nll_steer / count), rel=1e-4)
    assert none.perplexity == steered.base_perplexity
    assert hook_count(hf) == 0


def test_neutral_corpus_is_shipped_and_neutral() -> None:
    passages = neutral_corpus()
    assert len(passages) == 16 and neutral_corpus(3) == passages[:3]
    assert sentiment_score(passages).sub(0.5).abs().max() < 0.45  # no strongly charged passage
    with pytest.raises(InvalidInputError):
        neutral_corpus(0)
