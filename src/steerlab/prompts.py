"""How a prompt becomes token ids: one function for the library, both serving engines and vLLM.

"Greedy serving equals ``generate`` token for token" holds only if every path turns a prompt
into the same ids, so :meth:`SteeredModel.encode <steerlab.model.SteeredModel.encode>`, the
server's torch and vLLM engines and ``steerlab.vllm.generate_ids`` all call
:func:`encode_prompts`:

* plain text (``chat=False``) is tokenized with the tokenizer's special tokens (a BOS where the
  model has one), as ``tokenizer(text)`` does;
* a chat prompt (``chat=True``) is a single user turn, or a whole conversation given as
  ``{"role": ..., "content": ...}`` mappings; it is rendered by the tokenizer's chat template
  with the generation prompt added, then tokenized *without* special tokens (the template
  writes them).

>>> from steerlab.testing import tiny_model
>>> tokenizer = tiny_model("llama").tokenizer
>>> encode_prompts(tokenizer, ["the cat"]) == [tokenizer("the cat")["input_ids"]]
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

from steerlab.errors import InvalidInputError

__all__ = ["Conversation", "Prompt", "encode_prompts", "render_chat"]

Conversation = Sequence[Mapping[str, str]]
"""Chat turns, each ``{"role": "user" | "system" | "assistant" ..., "content": text}``."""

Prompt = Union[str, Conversation]
"""What :func:`encode_prompts` takes per row: text, or (with ``chat=True``) a conversation."""


def render_chat(tokenizer: Any, conversation: Prompt) -> str:
    """``conversation`` (or one user turn ``conversation`` when it is text) through the
    tokenizer's chat template, with the generation prompt added.

    >>> from steerlab.testing import tiny_model
    >>> render_chat(tiny_model("llama").tokenizer, "hi")
    '<s> user : hi </s> <s> answer : '
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError("this tokenizer has no chat template; call with chat=False")
    if isinstance(conversation, str):
        messages = [{"role": "user", "content": conversation}]
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in conversation]
        if not messages:
            raise InvalidInputError("the conversation is empty")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


def encode_prompts(
    tokenizer: Any, prompts: Sequence[Prompt], *, chat: bool = False
) -> list[list[int]]:
    """Token ids of each prompt (see the module doc); a prompt without tokens is refused with
    :class:`~steerlab.errors.InvalidInputError` naming it.

    >>> from steerlab.testing import tiny_model
    >>> tokenizer = tiny_model("llama").tokenizer
    >>> ids = encode_prompts(tokenizer, ["a", "the cat sat"])
    >>> [len(row) for row in ids] == [len(tokenizer(t)["input_ids"]) for t in ["a", "the cat sat"]]
    True
    """
    if chat:
        texts = [render_chat(tokenizer, prompt) for prompt in prompts]
    else:
        texts = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InvalidInputError(
                    f"prompt {i} is a conversation; conversations need chat=True"
                )
            texts.append(prompt)
    encoded = tokenizer(texts, add_special_tokens=not chat)["input_ids"] if texts else []
    for i, ids in enumerate(encoded):
        if not ids:
            shown = texts[i] if len(texts[i]) <= 80 else texts[i][:77] + "..."
            raise InvalidInputError(f"prompt {i} ({shown!r}) has no tokens")
    return [[int(t) for t in ids] for ids in encoded]
