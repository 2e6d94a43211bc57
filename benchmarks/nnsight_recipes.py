"""The seed document's nnsight recipes, as the benchmark runs them (nnsight 0.8.1, transformers 5).

Same adaptations as ``tests/_nnsight_recipes.py`` (tuple-or-tensor block outputs, ``nnsight.save``,
``tracer.iter[:n]`` for "every generation step", ``tracer.result`` in an empty invoke), with one
generalisation: the seed hard-codes GPT-2's ``model.transformer.h``; here the block list is
reached through the dotted path steerlab's adapter knows for the architecture
(``model.layers`` for Llama-style models), so the recipes run on the default SmolLM2 model.

Recipes, as in the seed:

* extraction: one ``trace`` with one ``invoke`` per prompt, saving ``h[L].output[:, -1, :]`` for
  every requested layer (the seed's "Computing Steering Vectors"); nnsight batches the invokes of
  a trace into one padded forward pass. The benchmark traces ``batch_size`` prompts at a time so
  every tool runs the same batches.
* steered generation: ``generate`` with the edit ``h[L].output[:, -1, :] += s * v`` applied at
  every generation step, for one layer or a ``{layer: strength}`` mapping (the seed's "ActAdd" and
  "Multi-Layer Steering"). All prompts of the batch go into one invoke.

nnsight wraps a model by replacing every submodule's ``forward``; the benchmark gives it its own
copy of the model so the other tools time an untouched one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from nnsight import TransformersModel, save


def _hidden(output: Any) -> Any:
    """The hidden states of a block output: the tensor itself, or a tuple's first element."""
    return output[0] if isinstance(output, tuple) else output


def wrap(hf_model: torch.nn.Module, tokenizer: Any) -> TransformersModel:
    """An nnsight model over an already-built Hugging Face model (no download, no dispatch)."""
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")


def blocks(nn_model: TransformersModel, layers_path: str) -> Any:
    """The envoy of the decoder-block list, e.g. ``nn_model.model.layers``."""
    return functools.reduce(getattr, layers_path.split("."), nn_model)


def last_token_activations(
    nn_model: TransformersModel,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    layers_path: str,
    batch_size: int,
) -> dict[int, torch.Tensor]:
    """``{layer: Tensor[n, d]}``: the seed's invoke-per-prompt trace, ``batch_size`` at a time."""
    h = blocks(nn_model, layers_path)
    saved: dict[int, list[Any]] = {layer: [] for layer in layers}
    for start in range(0, len(prompts), batch_size):
        with nn_model.trace() as tracer:
            for prompt in prompts[start : start + batch_size]:
                with tracer.invoke(prompt):
                    for layer in layers:
                        act = save(_hidden(h[layer].output)[:, -1, :])
                        saved[layer].append(act)
    return {layer: torch.cat(acts).detach().float().cpu() for layer, acts in saved.items()}


def generate_steered_last(
    nn_model: TransformersModel,
    prompts: Sequence[str],
    layer_strengths: Mapping[int, float],
    vectors: Mapping[int, torch.Tensor],
    *,
    layers_path: str,
    max_new_tokens: int,
) -> torch.Tensor:
    """Greedy generation with ``h[L].output[:, -1, :] += s * v[L]`` at every step (seed ActAdd)."""
    h = blocks(nn_model, layers_path)
    deltas = {layer: float(s) * vectors[layer] for layer, s in layer_strengths.items()}
    with nn_model.generate(max_new_tokens=max_new_tokens, do_sample=False) as tracer:
        with tracer.invoke(list(prompts)):
            for _ in tracer.iter[:max_new_tokens]:
                for layer, delta in deltas.items():
                    _hidden(h[layer].output)[:, -1, :] += delta
        with tracer.invoke():
            generated = save(tracer.result)
    return generated.detach().cpu()
