"""An LLM judge for the concept evaluation, reached through any OpenAI-compatible endpoint.

AxBench (Wu et al. 2025) scores a steered continuation with a language model on three criteria,
each 0, 1 or 2: is the **concept** there, is the text **relevant to the instruction**, is it
**fluent**. :class:`Judge` asks those three questions of a chat model behind an OpenAI-compatible
API (a hosted model, vLLM, or ``steerlab serve`` itself) with the real ``openai`` client,
greedy (temperature 0), and reads the rating out of each reply with :func:`parse_rating`.
A reply without a readable rating is counted (``unparsed``) and left out of the means, never
guessed.

>>> parse_rating("The text mentions soup twice. Rating: [[2]]")
2.0
>>> parse_rating("I cannot tell.") is None
True
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from steerlab.checks import as_positive_int
from steerlab.errors import InvalidInputError, ModelNotAvailableError
from steerlab.progress import progress_bar

__all__ = ["CRITERIA", "Judge", "JudgeScores", "judge_prompt", "parse_rating"]

CRITERIA = ("concept", "relevance", "fluency")

_PROMPTS = {
    "concept": (
        "You are a strict, impartial grader. Decide how clearly the concept below shows up in "
        "the text fragment. Ignore grammar and whether the text makes sense; judge only the "
        "concept.\n\nConcept: {concept}\n\nText fragment:\n{text}\n\n"
        "Score 0 if the concept is absent, 1 if it is only loosely or indirectly present, 2 if "
        "it is clearly present. Give one short sentence of reasons, then the score as "
        "'Rating: [[N]]'."
    ),
    "relevance": (
        "You are a strict, impartial grader. Decide whether the text fragment is a response to "
        "the instruction below (it may be cut off or mention other topics).\n\nInstruction: "
        "{instruction}\n\nText fragment:\n{text}\n\n"
        "Score 0 if it is unrelated to the instruction, 1 if it is somewhat related, 2 if it "
        "clearly responds to it. Give one short sentence of reasons, then the score as "
        "'Rating: [[N]]'."
    ),
    "fluency": (
        "You are a strict, impartial grader. Decide how fluent the text fragment is: "
        "grammatical, natural and free of repetition (it may be cut off at the end).\n\n"
        "Text fragment:\n{text}\n\n"
        "Score 0 if it is not fluent (broken, repetitive), 1 if it is somewhat fluent, 2 if it "
        "is fluent. Give one short sentence of reasons, then the score as 'Rating: [[N]]'."
    ),
}

_RATING = (
    re.compile(r"\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]\]"),
    re.compile(r"rating\s*[:=]?\s*\**\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE),
    re.compile(r"score\s*(?:is|of|:|=)?\s*\**\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE),
    re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*[.!]?\s*$"),
)


def parse_rating(reply: str | None) -> float | None:
    """The 0-2 rating in a judge's reply, or ``None`` when there is none (or it is out of range).

    Looks for ``[[N]]`` first, then ``Rating: N``, then ``score: N``, then a reply that is only
    a number; the last match of the first pattern found wins (a judge restating the scale
    before its verdict is read by its verdict).

    >>> parse_rating("Rating: 1"), parse_rating("**Rating:** [[0]]"), parse_rating("2")
    (1.0, 0.0, 2.0)
    >>> parse_rating("Rating: [[7]]") is None  # out of the 0-2 scale
    True
    """
    if not reply:
        return None
    for pattern in _RATING:
        found = pattern.findall(reply)
        if found:
            value = float(found[-1])
            return value if 0.0 <= value <= 2.0 else None
    return None


def judge_prompt(criterion: str, *, concept: str, instruction: str, text: str) -> str:
    """The user message the judge receives for one criterion and one continuation.

    >>> "Concept: food" in judge_prompt("concept", concept="food", instruction="", text="soup")
    True
    """
    if criterion not in CRITERIA:
        raise InvalidInputError(f"criterion must be one of {CRITERIA}, not {criterion!r}")
    return _PROMPTS[criterion].format(concept=concept, instruction=instruction, text=text)


@dataclasses.dataclass(frozen=True)
class JudgeScores:
    """Per-text ratings (``NaN`` where unparseable) and the judge's raw replies, by criterion."""

    ratings: dict[str, torch.Tensor]
    replies: dict[str, tuple[str, ...]]

    @property
    def unparsed(self) -> int:
        """How many replies held no readable rating (all criteria together)."""
        return sum(int(torch.isnan(v).sum()) for v in self.ratings.values())


@dataclasses.dataclass(frozen=True)
class Judge:
    """A judge model behind an OpenAI-compatible endpoint (``url`` ends in ``/v1``).

    ``concurrency`` requests run at once; each is a chat completion with ``temperature=0`` and
    at most ``max_tokens`` tokens. ``api_key`` defaults to ``"EMPTY"`` (local servers take any).
    """

    url: str
    model: str
    api_key: str = "EMPTY"
    max_tokens: int = 96
    concurrency: int = 4
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not re.match(r"https?://", self.url):
            raise InvalidInputError(f"judge_url must be an http(s) URL, got {self.url!r}")
        if not isinstance(self.model, str) or not self.model:
            raise InvalidInputError("judge_model must name the judge model")
        as_positive_int(self.max_tokens, "max_tokens")
        as_positive_int(self.concurrency, "concurrency")

    def _client(self) -> Any:
        try:
            import openai
        except ImportError:  # pragma: no cover - openai is in the server extra
            raise InvalidInputError(
                "the LLM judge needs the openai package: pip install 'steerlab[server]'"
            ) from None
        return openai.OpenAI(
            base_url=self.url, api_key=self.api_key, timeout=self.timeout, max_retries=2
        )

    def ask(self, client: Any, prompt: str) -> str:
        """One greedy chat completion; the reply's text ("" when the judge sends none)."""
        import openai

        try:
            reply = client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                max_tokens=self.max_tokens,
            )
        except openai.APIConnectionError as err:
            raise ModelNotAvailableError(
                f"the judge at {self.url} cannot be reached ({err}); check --judge-url"
            ) from None
        except openai.APIStatusError as err:
            raise InvalidInputError(
                f"the judge at {self.url} refused the request (HTTP {err.status_code}: "
                f"{err.message}); check --judge-model {self.model!r}"
            ) from None
        content = reply.choices[0].message.content if reply.choices else None
        return str(content or "")

    def score(
        self,
        concept: str,
        instructions: Sequence[str],
        texts: Sequence[str],
        *,
        progress: bool | None = None,
    ) -> JudgeScores:
        """Rate every text on the three criteria (``instructions[i]`` is ``texts[i]``'s)."""
        if len(instructions) != len(texts):
            raise InvalidInputError(
                f"{len(instructions)} instructions for {len(texts)} texts; give one each"
            )
        jobs = [
            (criterion, judge_prompt(criterion, concept=concept, instruction=i, text=t))
            for criterion in CRITERIA
            for i, t in zip(instructions, texts, strict=True)
        ]
        client = self._client()
        bar = progress_bar(len(jobs), "judge", progress)
        replies: list[str] = [""] * len(jobs)
        try:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                futures = [pool.submit(self.ask, client, prompt) for _, prompt in jobs]
                for k, future in enumerate(futures):
                    replies[k] = future.result()
                    bar.update(1)
        finally:
            bar.close()
        n = len(texts)
        ratings: dict[str, torch.Tensor] = {}
        raw: dict[str, tuple[str, ...]] = {}
        for c, criterion in enumerate(CRITERIA):
            part = replies[c * n : (c + 1) * n]
            values = [parse_rating(r) for r in part]
            ratings[criterion] = torch.tensor(
                [math.nan if v is None else v for v in values], dtype=torch.float64
            )
            raw[criterion] = tuple(part)
        return JudgeScores(ratings, raw)
