"""Metrics: exact values against hand computations and independent references."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import steerlab as sl
from steerlab.errors import InvalidInputError
from steerlab.evaluation import (
    METRICS,
    NextTokenTask,
    ab_probability,
    ab_prompt,
    ab_task,
    answer_letter,
    answer_token_id,
    concept_similarity,
    concept_task,
    concept_token_ids,
    embeddings_available,
    evaluate,
    keyword_rate,
    kl_divergence,
    kl_task,
    logprob_diff,
    perplexity,
    register_metric,
    token_ids,
    vader_sentiment,
)
from steerlab.testing import tiny_tokenizer


def _logits(seed: int, n: int = 5, vocab: int = 50) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_registry_has_every_metric_with_its_kind_and_role() -> None:
    expected = {
        "logprob_diff": ("next_token", "behaviour"),
        "ab_probability": ("next_token", "behaviour"),
        "kl": ("next_token", "damage"),
        "vader": ("text", "behaviour"),
        "keyword_rate": ("text", "behaviour"),
        "concept_similarity": ("text", "behaviour"),
        "perplexity": ("continuation", "damage"),
    }
    for name, (kind, role) in expected.items():
        assert (METRICS[name].kind, METRICS[name].role) == (kind, role)
        assert METRICS[name].higher_is_better == (role == "behaviour")
        assert METRICS[name].description


def test_register_metric_validates_kind_and_role() -> None:
    with pytest.raises(InvalidInputError, match="kind"):
        register_metric("x", kind="logits", role="behaviour")
    with pytest.raises(InvalidInputError, match="role"):
        register_metric("x", kind="text", role="quality")


def test_logprob_diff_is_mean_logprob_difference_and_mean_logit_difference() -> None:
    logits = _logits(0)
    target, contrast = [3, 7, 11], [2, 40]
    logp = logits.double().log_softmax(-1)
    by_hand = logp[:, target].mean(-1) - logp[:, contrast].mean(-1)
    got = logprob_diff(logits, target_ids=target, contrast_ids=contrast)
    torch.testing.assert_close(got.double(), by_hand, atol=1e-6, rtol=0)
    # the normaliser cancels: same as mean target logit minus mean contrast logit
    logit_diff = logits[:, target].mean(-1) - logits[:, contrast].mean(-1)
    torch.testing.assert_close(got, logit_diff, atol=1e-5, rtol=0)
    # and adding a constant to every logit of a row changes nothing
    shifted = logits + torch.arange(5.0)[:, None] * 100
    torch.testing.assert_close(
        logprob_diff(shifted, target_ids=target, contrast_ids=contrast), got, atol=1e-4, rtol=0
    )


def test_logprob_diff_rejects_empty_and_out_of_range_sets() -> None:
    logits = _logits(1)
    with pytest.raises(InvalidInputError, match="empty"):
        logprob_diff(logits, target_ids=[], contrast_ids=[1])
    with pytest.raises(InvalidInputError, match="outside"):
        logprob_diff(logits, target_ids=[50], contrast_ids=[1])


def test_ab_probability_matches_softmax_ratio() -> None:
    logits = _logits(2)
    match, other = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([9, 8, 7, 6, 5])
    p = logits.double().softmax(-1)
    rows = torch.arange(5)
    by_hand = p[rows, match] / (p[rows, match] + p[rows, other])
    got = ab_probability(logits, matching_ids=match, other_ids=other)
    torch.testing.assert_close(got.double(), by_hand, atol=1e-7, rtol=0)
    with pytest.raises(InvalidInputError, match="one matching"):
        ab_probability(logits, matching_ids=[0], other_ids=[1])


def test_kl_is_unsteered_given_steered_and_matches_torch_reference() -> None:
    steered, base = _logits(3), _logits(4)
    got = kl_divergence(steered, base)
    # F.kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q) = KL(p || q)
    reference = F.kl_div(
        steered.double().log_softmax(-1),
        base.double().log_softmax(-1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    torch.testing.assert_close(got.double(), reference, atol=1e-6, rtol=1e-6)
    reverse = kl_divergence(base, steered)
    assert not torch.allclose(got, reverse, atol=1e-3)  # the direction matters and is fixed
    assert kl_divergence(base, base).tolist() == [0.0] * 5


def test_kl_handles_minus_infinity_logits() -> None:
    base = torch.tensor([[0.0, -math.inf, 1.0]])
    steered = torch.tensor([[1.0, 0.0, 0.0]])
    got = kl_divergence(steered, base)
    p = base.softmax(-1)[0, [0, 2]].double()
    log_q = steered.double().log_softmax(-1)[0, [0, 2]]
    assert got.item() == pytest.approx(float((p * (p.log() - log_q)).sum()), abs=1e-6)


def test_token_ids_take_the_first_token_dedupe_and_skip_unknown() -> None:
    tok = tiny_tokenizer()
    good, great = tok.convert_tokens_to_ids(["good", "great"])
    assert token_ids(tok, [" good", " great", "good", " good movie", " qqqq"]) == (good, great)
    with pytest.raises(InvalidInputError):
        token_ids(tok, " good")
    shared = concept_token_ids(tok, [" good", " great"], exclude=[" good day"])
    assert shared == (great,)


def test_answer_letters_and_prompts() -> None:
    assert [answer_letter(a) for a in ("(A)", " (B) ", "C")] == ["A", "B", "C"]
    with pytest.raises(InvalidInputError):
        answer_letter("()")
    assert ab_prompt("Q?") == "Q?\n\nAnswer: ("


def test_ab_task_reads_letters_in_context(llama: sl.SteeredModel) -> None:
    task = ab_task(llama, ["pick one", "pick two"], [("(one)", "(two)"), ("(two)", "(one)")])
    one, two = llama.tokenizer.convert_tokens_to_ids(["one", "two"])
    assert task.options == {"matching_ids": (one, two), "other_ids": (two, one)}
    logits = llama.next_token_logits(list(task.prompts))
    p = logits.softmax(-1)
    expected = torch.stack(
        [p[0, one] / (p[0, one] + p[0, two]), p[1, two] / (p[1, one] + p[1, two])]
    )
    torch.testing.assert_close(task.score(logits, logits), expected, atol=1e-6, rtol=0)
    # the tiny vocabulary has no "A"/"B": both are the unknown token, which must be refused
    with pytest.raises(InvalidInputError, match="same token"):
        ab_task(llama, ["q"], [("(A)", "(B)")])


def test_concept_task_and_evaluate(llama: sl.SteeredModel) -> None:
    prompts = ["the movie was", "the day was so"]
    task = concept_task(llama, prompts, target_words=[" good", " zzzz"], contrast_words=[" bad"])
    assert task.options["target_ids"] == token_ids(llama.tokenizer, [" good"])
    vec = sl.SteeringVector(
        {1: torch.randn(llama.d_model, generator=torch.Generator().manual_seed(0))}
    )
    steered = llama.next_token_logits(prompts, steering=vec, strength=3.0)
    base = llama.next_token_logits(prompts)
    got = evaluate(llama, task, steering=vec, strength=3.0)
    assert torch.equal(got, task.score(steered, base))
    assert torch.equal(evaluate(llama, kl_task(prompts)), torch.zeros(2))
    with pytest.raises(InvalidInputError, match="no usable target"):
        concept_task(llama, prompts, target_words=[" zzzz"], contrast_words=[" bad"])


def test_task_validation() -> None:
    with pytest.raises(InvalidInputError, match="unknown metric"):
        NextTokenTask(("a",), "nope")
    with pytest.raises(InvalidInputError, match="scores 'text'"):
        NextTokenTask(("a",), "vader")
    with pytest.raises(InvalidInputError, match="at least one prompt"):
        NextTokenTask((), "kl")
    task = kl_task(["a", "b"])
    with pytest.raises(InvalidInputError, match="rows"):
        task.score(torch.zeros(3, 4), torch.zeros(3, 4))


def test_vader_matches_the_reference_analyzer() -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["What a lovely, wonderful day!", "I hate this awful weather.", "", "A table."]
    analyzer = SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(t)["compound"] for t in texts]
    assert vader_sentiment(texts).tolist() == pytest.approx(expected, abs=1e-7)
    assert vader_sentiment(texts)[0] > 0.5 > -0.5 > vader_sentiment(texts)[1]


def test_keyword_rate_counts_words() -> None:
    texts = ["Happy, HAPPY day; so glad!", "", "nothing here", "unhappy"]
    got = keyword_rate(texts, words=[" happy", "glad"])
    assert got.tolist() == pytest.approx([3 / 5, 0.0, 0.0, 0.0])
    with pytest.raises(InvalidInputError):
        keyword_rate(texts, words=[" "])


@pytest.mark.skipif(not embeddings_available(), reason="optional embedding extra not installed")
def test_concept_similarity_orders_texts_by_concept() -> None:
    scores = concept_similarity(
        ["I am overjoyed, this is wonderful", "This is miserable and I am furious"],
        positive=["I love this, it is great", "What a happy day"],
        negative=["I hate this, it is terrible", "What a sad day"],
    )
    assert scores[0] > 0 > scores[1]


def test_perplexity_matches_hand_computation_and_is_batch_invariant(
    arch_model: sl.SteeredModel,
) -> None:
    prompts = ["the cat", "a dog ran to the house", "i"]
    ids = arch_model.generate_ids(prompts, max_new_tokens=5)
    batched = perplexity(arch_model, prompts, ids)
    single = torch.cat([perplexity(arch_model, [p], [c]) for p, c in zip(prompts, ids)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-5)
    # by hand for row 1: one unpadded forward over prompt + continuation
    prompt_ids = arch_model.encode(prompts[1]).input_ids[0]
    full = torch.cat([prompt_ids, ids[1]])[None]
    with torch.no_grad():
        logits = arch_model.hf_model(input_ids=full).logits[0].float()
    logp = logits.log_softmax(-1)
    p = len(prompt_ids)
    nll = -logp[p - 1 : p - 1 + len(ids[1])].gather(1, ids[1][:, None]).double().mean()
    assert batched[1].item() == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert math.isnan(perplexity(arch_model, ["the cat"], [torch.tensor([], dtype=torch.long)])[0])


@pytest.mark.slow
def test_smollm_answer_letters_are_single_tokens_after_the_parenthesis(default_model: Any) -> None:
    tok = default_model.tokenizer
    prompt = ab_prompt("Is the sky blue?\n\nChoices:\n (A) Yes\n (B) No")
    ids = tok(prompt + "A", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids[-2:]] == [" (", "A"]  # not a merged " (A"
    a, b = (answer_token_id(tok, prompt, letter) for letter in "AB")
    assert (a, b) == tuple(tok.convert_tokens_to_ids(["A", "B"]))
    task = ab_task(
        default_model, ["Is the sky blue?\n\nChoices:\n (A) Yes\n (B) No"], [("(A)", "(B)")]
    )
    logits = default_model.next_token_logits(list(task.prompts))
    top = int(logits[0].argmax())
    assert top in (a, b)  # the model does answer with a letter here
