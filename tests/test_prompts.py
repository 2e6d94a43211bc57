"""One prompt encoding for every path: ``SteeredModel.encode``, the server's engines (their
shared planner) and ``steerlab.prompts.encode_prompts`` (which ``steerlab.vllm`` calls), for
raw text, chat prompts and whole conversations. The vLLM engine's planner is checked against
the library in tests/test_vllm_server_engine.py (it needs vLLM installed)."""

from __future__ import annotations

import pytest

from steerlab.errors import InvalidInputError
from steerlab.prompts import encode_prompts, render_chat
from steerlab.server.engine import ChatMessage, GenerationRequest, TorchEngine
from steerlab.testing import tiny_model

PROMPTS = ["the cat sat on", "a", "hello world , i think the movie was good"]


def _definition(tokenizer: object, prompt: str, chat: bool) -> list[int]:
    """The encoding written out from the tokenizer's own calls (what generate reads)."""
    if chat:
        text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    return list(tokenizer(prompt)["input_ids"])  # type: ignore[operator]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("chat", [False, True])
def test_every_path_encodes_a_prompt_to_the_same_ids(arch: str, chat: bool) -> None:
    model = tiny_model(arch)
    tokenizer = model.tokenizer
    engine = TorchEngine(model)  # its planner only: no worker needed
    expected = [_definition(tokenizer, p, chat) for p in PROMPTS]
    batch = model.encode(PROMPTS, chat=chat)
    library = [
        row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)
    ]
    served = [engine.planner.encode(GenerationRequest(prompt=p, chat=chat)) for p in PROMPTS]
    assert library == expected
    assert encode_prompts(tokenizer, PROMPTS, chat=chat) == expected
    assert served == expected
    assert batch.prompt_lengths.tolist() == [len(ids) for ids in expected]


def test_a_conversation_is_rendered_whole_by_the_template() -> None:
    model = tiny_model("llama")
    tokenizer = model.tokenizer
    turns = [("system", "be brief"), ("user", "the cat"), ("assistant", "sat"), ("user", "on")]
    text = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], tokenize=False, add_generation_prompt=True
    )
    expected = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    request = GenerationRequest(
        prompt="", chat=True, messages=tuple(ChatMessage(r, c) for r, c in turns)
    )
    conversation = [{"role": r, "content": c} for r, c in turns]
    assert TorchEngine(model).planner.encode(request) == expected
    assert encode_prompts(tokenizer, [conversation], chat=True) == [expected]
    assert render_chat(tokenizer, conversation) == text
    # one user turn is the one-turn conversation
    assert encode_prompts(tokenizer, ["on"], chat=True) == encode_prompts(
        tokenizer, [[{"role": "user", "content": "on"}]], chat=True
    )


def test_prompts_without_tokens_or_template_are_refused_by_name() -> None:
    tokenizer = tiny_model("llama").tokenizer
    with pytest.raises(InvalidInputError, match=r"prompt 1 \(''\) has no tokens"):
        encode_prompts(tokenizer, ["the cat", ""])
    with pytest.raises(InvalidInputError, match="prompt 0 is a conversation"):
        encode_prompts(tokenizer, [[{"role": "user", "content": "hi"}]])
    with pytest.raises(InvalidInputError, match="the conversation is empty"):
        encode_prompts(tokenizer, [[]], chat=True)
    tokenizer.chat_template = None
    with pytest.raises(InvalidInputError, match="no chat template"):
        encode_prompts(tokenizer, ["hi"], chat=True)
