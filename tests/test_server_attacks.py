"""Issue 18's server attack table as tests: every row of ``tests/server_attack_table.py`` is
sent to a real server (torch engine, tiny model, API key, free port) while good streaming
requests run beside it, and must be refused cleanly (or served, for valid rows) with every
other request's output equal to its solo output and the server still serving afterwards.

Rows whose fix is another helper's unlanded work are ``xfail(strict=True)`` with that reason;
the strictness makes the mark fail the moment the fix lands, so it cannot outlive it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from server_attack_table import (
    ATTACKS,
    Harness,
    ServerAttack,
    attempt,
    running_server,
)
from steerlab.errors import InvalidInputError
from steerlab.server.engine import (
    MIN_TEMPERATURE,
    ChatMessage,
    GenerationRequest,
    SteeringEntry,
)
from steerlab.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    validation_message,
)

_OUTCOMES: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with running_server() as h:
        yield h
    target = os.environ.get("STEERLAB_ATTACK_JSON")
    if target:  # the table's rows as run here, for docs/server-attacks.md
        with open(target, "w") as f:
            json.dump({"rows": _OUTCOMES}, f, indent=1)


def _row(attack: ServerAttack) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=attack.pending)] if attack.pending else []
    return pytest.param(attack, id=attack.id, marks=marks)


@pytest.mark.parametrize("attack", [_row(a) for a in ATTACKS])
def test_server_attack(attack: ServerAttack, harness: Harness) -> None:
    kind, affected, detail = attempt(harness, attack)
    _OUTCOMES.append({"row": attack.id, "kind": kind, "affected": affected, "detail": detail})
    assert (kind, affected) == ("clean", False), detail


def test_the_table_covers_every_category_of_issue_18() -> None:
    categories = {a.category for a in ATTACKS}
    assert categories == {
        "json",
        "steering",
        "positions",
        "prompts",
        "sampling",
        "chat",
        "uploads",
        "auth",
        "disconnects",
        "cancellations",
        "concurrency",
    }
    assert len({a.id for a in ATTACKS}) == len(ATTACKS), "row names must be unique"


# --- the checks themselves, without HTTP ----------------------------------------------------------
def _refused(request: GenerationRequest, *words: str, context: int | None = None) -> None:
    with pytest.raises(InvalidInputError) as caught:
        request.check(context_length=context)
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_temperature_is_zero_or_at_least_the_minimum() -> None:
    GenerationRequest(prompt="a", temperature=0.0).check()
    GenerationRequest(prompt="a", temperature=MIN_TEMPERATURE).check()
    _refused(GenerationRequest(prompt="a", temperature=MIN_TEMPERATURE / 2), "temperature")
    _refused(GenerationRequest(prompt="a", temperature=1e-300), "temperature", str(MIN_TEMPERATURE))


def test_seed_is_a_64_bit_integer() -> None:
    for seed in (-(2**63), 0, 2**64 - 1):
        GenerationRequest(prompt="a", temperature=1.0, seed=seed).check()
    for seed in (-(2**63) - 1, 2**64, 10**30):
        _refused(GenerationRequest(prompt="a", temperature=1.0, seed=seed), "seed")


def test_positions_are_bounded_by_the_context() -> None:
    def steer(positions: Any) -> GenerationRequest:
        entry = SteeringEntry(vector="v", positions=positions)
        return GenerationRequest(prompt="a", steering=(SteeringEntry(vector="w"), entry))

    steer(127).check(context_length=128)
    steer(slice(-128, None)).check(context_length=128)
    _refused(steer(129), "steering[1].positions", "129", "128", context=128)
    _refused(steer([0, -129]), "steering[1].positions", "-129", context=128)
    _refused(steer(slice(5, 10**20)), "steering[1].positions", context=128)
    _refused(steer("first:1000"), "steering[1].positions", "1000", context=128)
    steer(10**6).check()  # no context known: only the overflow bound applies
    _refused(steer(99999999999999999999), "steering[1].positions")


def test_text_that_cannot_be_encoded_names_its_field() -> None:
    bad = "abc \ud800"
    _refused(GenerationRequest(prompt=bad), "prompt", "surrogate")
    _refused(GenerationRequest(prompt="a", stop=("ok", bad)), "stop[1]")
    turns = (ChatMessage("system", "x"), ChatMessage("user", bad))
    _refused(GenerationRequest(prompt="", chat=True, messages=turns), "messages[1].content")
    marker = SteeringEntry(vector="v", positions="between:<a>," + bad)
    _refused(GenerationRequest(prompt="a", steering=(marker,)), "steering[0].positions marker")


def test_validation_message_names_the_field_as_sent() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate(
            {"prompt": "a", "steering": [{"vector": "v", "positions": [0, True]}], "top_k": 3}
        )
    message, param = validation_message(caught.value.errors())
    assert message == (
        "steering[0].positions: [0, true] is not a string, an integer or a mapping of them; "
        "steering[0].positions[1]: true is not an integer; "
        "top_k: unknown field (this server does not implement it)"
    )
    assert param == "steering[0].positions"


def test_no_op_values_of_unimplemented_fields_are_accepted() -> None:
    """What clients send by default must pass; anything that asks for a feature is refused."""
    body = {
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": "a"},
        ],
        "n": 1,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "store": False,
        "service_tier": "auto",
        "user": "u",
        "metadata": {"k": "v"},
        "stream": False,
        "logprobs": False,
    }
    gen = ChatCompletionRequest.model_validate(body).to_generation()
    assert [m.role for m in gen.messages] == ["system", "user"]
    for field, value in (
        ("n", 2),
        ("tools", [{"type": "function"}]),
        ("tool_choice", "auto"),
        ("response_format", {"type": "json_object"}),
        ("presence_penalty", 0.5),
        ("logit_bias", {"5": 1}),
        ("store", True),
        ("parallel_tool_calls", False),
    ):
        request = ChatCompletionRequest.model_validate({**body, field: value})
        with pytest.raises(InvalidInputError, match=field):
            request.to_generation()


def test_text_too_long_for_any_context_is_refused_before_tokenizing() -> None:
    """Tokenizing holds the lock every running stream needs to detokenize, so a prompt that
    cannot fit is refused by its length in characters, before the tokenizer sees it."""
    from steerlab.server.engine import TorchEngine
    from steerlab.testing import tiny_model

    engine = TorchEngine(tiny_model("llama"))  # context 128 tokens
    longest = max(len(t) for t in engine.model.tokenizer.get_vocab())
    bound = 4 * 128 * max(16, longest)

    def no_tokenizing(request: GenerationRequest) -> list[int]:
        raise AssertionError("the tokenizer was reached")

    engine.planner.encode = no_tokenizing  # type: ignore[method-assign]
    for request, field in (
        (GenerationRequest(prompt="a" * (bound + 1)), "prompt"),
        (
            GenerationRequest(
                prompt="", chat=True, messages=(ChatMessage("user", "a" * (bound + 1)),)
            ),
            "messages",
        ),
    ):
        with pytest.raises(InvalidInputError, match=f"{field} has {bound + 1} characters"):
            engine.submit(request)
    with pytest.raises(AssertionError, match="tokenizer was reached"):
        engine.submit(GenerationRequest(prompt="a" * bound))
