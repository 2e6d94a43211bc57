"""The seed document's nnsight steering recipes, adapted to run on nnsight 0.8.1 + transformers 5.

Each function takes an nnsight-wrapped GPT-2-style model (see `wrap`) and returns detached CPU
tensors, so tests can compare steerlab against the seed's recipes. Adaptations to the seed:

* Block outputs: transformers 5's ``GPT2Block`` returns a Tensor, not a tuple, so the seed's
  ``h[L].output[0]`` would index the batch row, not the hidden states. `_hidden` takes
  ``output[0]`` only when the output is a tuple. Edits stay in place, so they reach the model.
* Saved values: a saved value is the tensor itself; the seed's ``.value`` no longer exists.
  ``nnsight.save(x)`` is used over ``x.save()``: the method is mounted on every object by an
  optional C extension (absent -> AttributeError) and is invisible to type checkers.
* Module inputs: ``.input`` is now the first positional input (``.inputs`` is ``(args,
  kwargs)``), so the seed's ``c_proj.input[0][0]`` is ``c_proj.input``.
* Generation: ``with tracer.all():`` is deprecated, and the seed's form silently skips the
  statements after the block (its open-ended last step never arrives), so ``generated`` is never
  bound. The loop is now ``for _ in tracer.iter[:max_new_tokens]:`` (a generation makes one
  forward per new token). ``model.generator.output`` is deprecated for ``tracer.result``, which
  is saved in a separate empty ``tracer.invoke()`` so it is still read if EOS cuts the loop short.
* Wrapping: ``LanguageModel`` is deprecated (it warns); ``TransformersModel`` is its replacement.
  A pre-built module is already dispatched, so ``dispatch=True`` is not needed, and a local
  tokenizer keeps the wrapper offline. The wrapper sets ``tokenizer.padding_side = "left"`` (so
  ``[:, -1]`` is each prompt's real last token in a batched trace) and swaps every submodule's
  ``forward`` for a pass-through controller; it registers no torch hooks and leaves
  ``training`` as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from nnsight import TransformersModel, save


def _hidden(output: Any) -> torch.Tensor:
    """The hidden states of a block output: the tensor itself, or a tuple's first element."""
    return output[0] if isinstance(output, tuple) else output


def _out(value: torch.Tensor) -> torch.Tensor:
    return value.detach().cpu()


def wrap(hf_model: torch.nn.Module, tokenizer: Any) -> TransformersModel:
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")


def basic_intervention(
    nn_model: TransformersModel, prompt: str, layer: int, vector: torch.Tensor
) -> torch.Tensor:
    with nn_model.trace(prompt):
        _hidden(nn_model.transformer.h[layer].output)[:, -1, :] += vector
        logits = save(nn_model.lm_head.output)
    return _out(logits)


def mean_diff_vector(
    nn_model: TransformersModel, positive: list[str], negative: list[str], layer: int
) -> torch.Tensor:
    positive_acts: list[torch.Tensor] = []
    negative_acts: list[torch.Tensor] = []
    with nn_model.trace() as tracer:
        for prompt in positive:
            with tracer.invoke(prompt):
                act = save(_hidden(nn_model.transformer.h[layer].output)[:, -1, :])
                positive_acts.append(act)
        for prompt in negative:
            with tracer.invoke(prompt):
                act = save(_hidden(nn_model.transformer.h[layer].output)[:, -1, :])
                negative_acts.append(act)
    pos_mean = torch.cat(positive_acts).mean(dim=0)
    neg_mean = torch.cat(negative_acts).mean(dim=0)
    return _out(pos_mean - neg_mean)


def apply_all_positions(
    nn_model: TransformersModel, prompt: str, layer: int, vector: torch.Tensor, strength: float
) -> torch.Tensor:
    with nn_model.trace(prompt):
        _hidden(nn_model.transformer.h[layer].output)[:, :, :] += strength * vector
        logits = save(nn_model.lm_head.output)
    return _out(logits)


def generate_steered_last(
    nn_model: TransformersModel,
    prompt: str,
    layer_strengths: dict[int, float],
    vector: torch.Tensor,
    max_new_tokens: int,
) -> torch.Tensor:
    with nn_model.generate(max_new_tokens=max_new_tokens, do_sample=False) as tracer:
        with tracer.invoke(prompt):
            for _ in tracer.iter[:max_new_tokens]:
                for layer, strength in layer_strengths.items():
                    _hidden(nn_model.transformer.h[layer].output)[:, -1, :] += strength * vector
        with tracer.invoke():
            generated = save(tracer.result)
    return _out(generated)


def layer_output_activation(nn_model: TransformersModel, prompt: str, layer: int) -> torch.Tensor:
    with nn_model.trace(prompt):
        hidden = save(_hidden(nn_model.transformer.h[layer].output))
    return _out(hidden)


def zero_ablate_head(
    nn_model: TransformersModel, prompt: str, layer: int, head: int
) -> torch.Tensor:
    head_dim = nn_model.config.n_embd // nn_model.config.n_head
    start, end = head * head_dim, (head + 1) * head_dim
    with nn_model.trace(prompt):
        attn_out = nn_model.transformer.h[layer].attn.c_proj.input
        attn_out[:, :, start:end] = 0
        logits = save(nn_model.lm_head.output)
    return _out(logits)


def mean_ablate_layer(
    nn_model: TransformersModel, prompt: str, layer: int, mean_activation: torch.Tensor
) -> torch.Tensor:
    with nn_model.trace(prompt):
        _hidden(nn_model.transformer.h[layer].output)[:] = mean_activation
        logits = save(nn_model.lm_head.output)
    return _out(logits)


if __name__ == "__main__":
    import sys
    from collections.abc import Callable, Iterator
    from contextlib import contextmanager

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = (
        "i think the movie was love hate this it is so wonderful awful happy sad "
        "weather today good bad am and"
    ).split()
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=4,
        vocab_size=len(tok),
        n_positions=128,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = wrap(hf, tok)
    blocks = hf.transformer.h

    HookFn = Callable[[torch.nn.Module, Any, Any], Any]

    @contextmanager
    def hooked(*pairs: tuple[torch.nn.Module, HookFn]) -> Iterator[None]:
        handles = [module.register_forward_hook(fn) for module, fn in pairs]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def add_last(vec: torch.Tensor) -> HookFn:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            _hidden(output)[:, -1, :] += vec

        return hook

    def capture(store: list[torch.Tensor]) -> HookFn:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            store.append(_hidden(output).detach().clone())

        return hook

    @torch.no_grad()
    def logits(prompt: str) -> torch.Tensor:
        return hf(**tok(prompt, return_tensors="pt")).logits

    prompt, layer, vec = "i think the movie was", 1, torch.randn(32)
    pos, neg = ["i love this", "this is so wonderful", "i am happy"], ["i hate it", "awful", "sad"]
    diffs: dict[str, float] = {}
    effects: dict[str, float] = {}

    def record(name: str, got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> None:
        diffs[name] = (got.float() - ref.float()).abs().max().item()
        effects[name] = (ref.float() - base.float()).abs().max().item()

    plain = logits(prompt)
    got = basic_intervention(model, prompt, layer, vec)  # run nnsight before hooking the model
    with hooked((blocks[layer], add_last(vec))):
        record("basic_intervention", got, logits(prompt), plain)

    def last_act(p: str) -> torch.Tensor:
        store: list[torch.Tensor] = []
        with hooked((blocks[layer], capture(store))):
            logits(p)
        return store[0][0, -1]

    ref_vec = torch.stack([last_act(p) for p in pos]).mean(0)
    ref_vec = ref_vec - torch.stack([last_act(p) for p in neg]).mean(0)
    steer = mean_diff_vector(model, pos, neg, layer)
    record("mean_diff_vector", steer, ref_vec, torch.zeros_like(ref_vec))

    def add_all(module: torch.nn.Module, args: Any, output: Any) -> None:
        _hidden(output)[:, :, :] += 1.5 * steer

    got = apply_all_positions(model, prompt, layer, steer, 1.5)
    with hooked((blocks[layer], add_all)):
        record("apply_all_positions", got, logits(prompt), plain)

    strengths, gen_prompt, new = {0: 0.5, 2: 1.5}, "the weather today is", 8
    enc = tok(gen_prompt, return_tensors="pt")
    with torch.no_grad():
        unsteered = hf.generate(**enc, max_new_tokens=new, do_sample=False)
        with hooked(*[(blocks[k], add_last(s * 8 * vec)) for k, s in strengths.items()]):
            ref_ids = hf.generate(**enc, max_new_tokens=new, do_sample=False)
    got_ids = generate_steered_last(model, gen_prompt, strengths, 8 * vec, new)
    print("generated:", got_ids.tolist(), "reference:", ref_ids.tolist())
    record("generate_steered_last", got_ids, ref_ids, unsteered)

    got = layer_output_activation(model, prompt, layer)
    store: list[torch.Tensor] = []
    with hooked((blocks[layer], capture(store))):
        logits(prompt)
    record("layer_output_activation", got, store[0], torch.zeros_like(store[0]))

    head = 2

    def zero_head(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        args[0][:, :, head * 8 : (head + 1) * 8] = 0

    got = zero_ablate_head(model, prompt, layer, head)
    handle = blocks[layer].attn.c_proj.register_forward_pre_hook(zero_head)
    try:
        record("zero_ablate_head", got, logits(prompt), plain)
    finally:
        handle.remove()

    mean_act = torch.randn(1, len(prompt.split()), 32)
    got = mean_ablate_layer(model, prompt, layer, mean_act)
    with hooked((blocks[layer], lambda m, a, o: mean_act.clone())):
        record("mean_ablate_layer", got, logits(prompt), plain)

    for name in diffs:
        print(
            f"{name:24s} max|nnsight - hook| = {diffs[name]:.3e}   "
            f"max|steered - plain| = {effects[name]:.3e}"
        )
    leftover = [n for n, m in hf.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    print("padding_side after wrap:", tok.padding_side, "| torch hooks left:", leftover)
    ok = all(d < 1e-5 for d in diffs.values()) and all(e > 0 for e in effects.values())
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok and not leftover else 1)
