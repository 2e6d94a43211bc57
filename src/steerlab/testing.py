"""Tiny random-weight models and an offline tokenizer, for tests, doctests and examples.

Nothing here downloads anything: the tokenizer is a word-level vocabulary built in memory and
the models are built from small configs with a fixed seed. One config per supported architecture
lives in :data:`TINY_CONFIGS`.

>>> from steerlab.testing import tiny_model, TINY_ARCHITECTURES
>>> len(TINY_ARCHITECTURES) >= 8
True
>>> tiny_model("gpt_neox").n_layers
3
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "hook_count",
    "MOE_ARCHITECTURES",
    "TINY_ARCHITECTURES",
    "TINY_CONFIGS",
    "tiny_hf_model",
    "tiny_model",
    "tiny_tokenizer",
]

_WORDS = (
    "the a an and or but of to in on at for with is was are were be been it this that these "
    "those i you he she we they my your his her our their me him us them cat dog bird fish man "
    "woman child people movie film book food song weather day night today tomorrow yesterday "
    "city house car road tree sky sun rain snow wind water fire time year week life world work "
    "love hate like think feel felt know want see saw went go going came come said say make made "
    "good bad great terrible happy sad wonderful awful amazing horrible fantastic nice kind "
    "cruel beautiful ugly best worst joy pain calm angry fun boring excellent poor delightful "
    "dreadful loved hated enjoyed disliked so very really quite not no yes all some many much "
    "more most little big small old new young hot cold warm long short high low fast slow "
    "sat ran walked ate drank slept read wrote played paris france berlin germany tokyo japan "
    "capital is , . ! ? : ' \" ( ) one two three four five six seven eight nine ten question "
    "answer choices"
).split()
_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


def tiny_tokenizer(*, with_pad: bool = True) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over a fixed vocabulary (about 240 entries).

    >>> tok = tiny_tokenizer()
    >>> tok.decode(tok("the cat sat")["input_ids"])
    'the cat sat'
    >>> sorted(tok("the cat"))
    ['attention_mask', 'input_ids']
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*_SPECIALS, *dict.fromkeys(_WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    specials: dict[str, str] = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    if with_pad:
        specials["pad_token"] = "<pad>"
    # Only ids and mask: transformers < 5 would otherwise add token_type_ids, which decoder-only
    # models do not take.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, model_input_names=["input_ids", "attention_mask"], **specials
    )
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> answer : {% endif %}"
    )
    return tok


def _configs(vocab: int) -> dict[str, Callable[[], Any]]:
    import transformers as tf

    common: dict[str, Any] = {"vocab_size": vocab, "initializer_range": 0.2}
    llama_like: dict[str, Any] = {
        "num_hidden_layers": 3,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        **common,
    }
    # Mixture-of-experts configs: 4 experts, 2 per token, so a router bias has room to move one.
    moe: dict[str, Any] = {"num_experts_per_tok": 2, **llama_like}
    configs: dict[str, Callable[[], Any]] = {
        "gpt2": lambda: tf.GPT2Config(
            n_layer=3,
            n_embd=32,
            n_head=4,
            n_positions=128,
            bos_token_id=2,
            eos_token_id=3,
            **common,
        ),
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "mistral": lambda: tf.MistralConfig(**llama_like),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "gemma2": lambda: tf.Gemma2Config(head_dim=8, **llama_like),
        "gemma3_text": lambda: tf.Gemma3TextConfig(head_dim=8, **llama_like),
        "phi3": lambda: tf.Phi3Config(**llama_like),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            bos_token_id=2,
            eos_token_id=3,
            **common,
        ),
        "opt": lambda: tf.OPTConfig(
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=4,
            ffn_dim=64,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            **common,
        ),
        "gptj": lambda: tf.GPTJConfig(
            n_layer=3,
            n_embd=32,
            n_head=4,
            rotary_dim=4,
            n_positions=128,
            bos_token_id=2,
            eos_token_id=3,
            **common,
        ),
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, **llama_like),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            num_experts=4, moe_intermediate_size=16, decoder_sparse_step=1, **moe
        ),
        "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, **moe),
        "olmo2": lambda: tf.Olmo2Config(**llama_like),
        "olmoe": lambda: tf.OlmoeConfig(num_experts=4, **moe),
        "granite": lambda: tf.GraniteConfig(**llama_like),
        "smollm3": lambda: tf.SmolLM3Config(**llama_like),
        "gpt_oss": lambda: tf.GptOssConfig(
            head_dim=8, num_local_experts=4, rope_parameters=_GPT_OSS_ROPE, **moe
        ),
        # Gemma 3 multimodal: a one-layer vision tower beside the text tower steerlab steers.
        "gemma3": lambda: tf.Gemma3Config(
            text_config={"head_dim": 8, **llama_like},
            vision_config=_GEMMA3_VISION,
            mm_tokens_per_image=4,
            image_token_index=vocab - 1,
            boi_token_index=vocab - 3,
            eoi_token_index=vocab - 2,
        ),
    }
    # Only the families this transformers has (Qwen3, OLMo 2, gpt-oss... came in 2025).
    return {name: make for name, make in configs.items() if _has_config(tf, name)}


_CONFIG_CLASSES = {
    "qwen3": "Qwen3Config",
    "qwen3_moe": "Qwen3MoeConfig",
    "mixtral": "MixtralConfig",
    "olmo2": "Olmo2Config",
    "olmoe": "OlmoeConfig",
    "granite": "GraniteConfig",
    "smollm3": "SmolLM3Config",
    "gpt_oss": "GptOssConfig",
    "gemma3": "Gemma3Config",
}
_GEMMA3_VISION: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
# gpt-oss defaults to YaRN scaling tuned for 128k contexts; plain RoPE keeps the tiny config quiet.
_GPT_OSS_ROPE: dict[str, Any] = {"rope_type": "default", "rope_theta": 150000.0}


def _has_config(tf: Any, name: str) -> bool:
    cls = _CONFIG_CLASSES.get(name)
    return cls is None or hasattr(tf, cls)


TINY_ARCHITECTURES: tuple[str, ...] = tuple(_configs(1))
"""Every architecture with a tiny config (those of issue 22 where this transformers has them)."""
TINY_CONFIGS = _configs
MOE_ARCHITECTURES: tuple[str, ...] = tuple(
    name for name in ("qwen3_moe", "mixtral", "olmoe", "gpt_oss") if name in TINY_ARCHITECTURES
)
"""The mixture-of-experts architectures among :data:`TINY_ARCHITECTURES`."""


def tiny_hf_model(architecture: str, *, seed: int = 0, vocab_size: int | None = None) -> Any:
    """A random-weight ``transformers`` causal LM of ``architecture`` in eval mode.

    >>> type(tiny_hf_model("opt")).__name__
    'OPTForCausalLM'
    """
    from transformers import AutoModelForCausalLM

    vocab = vocab_size or len(tiny_tokenizer())
    configs = _configs(vocab)
    if architecture not in configs:
        raise KeyError(f"no tiny config for {architecture!r}; known: {sorted(configs)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(configs[architecture]())
    return model.eval()


def tiny_model(architecture: str = "llama", *, seed: int = 0) -> Any:
    """A :class:`~steerlab.model.SteeredModel` over :func:`tiny_hf_model` and the tiny tokenizer.

    >>> tiny_model("gpt2").d_model
    32
    """
    from steerlab.model import wrap

    return wrap(
        tiny_hf_model(architecture, seed=seed), tiny_tokenizer(), name=f"tiny-{architecture}"
    )


def hook_count(module: torch.nn.Module) -> int:
    """Number of hooks that can change ``module``'s computation (see
    :func:`steerlab.interventions.count_hooks`).

    >>> m = tiny_model("gpt2")
    >>> hook_count(m.hf_model)
    0
    """
    from steerlab.dispatch import count_hooks

    return count_hooks(module)
