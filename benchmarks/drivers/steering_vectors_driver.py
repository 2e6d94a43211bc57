"""steering-vectors (D. Chanin) running the benchmark workloads, inside its own venv.

* extraction: ``steering_vectors.extract_activations`` over the prompts as (positive, negative)
  pairs: ``batch_size`` pairs per step, i.e. one forward of ``batch_size`` positive prompts and
  one of ``batch_size`` negative prompts, so every forward has the suite's batch size;
  ``read_token_index=-1`` (last token), all decoder blocks. Halves of the prompt list become the
  two sides, so the 256 prompts are each read once.
* steered generation: ``SteeringVector({layer: s * v}).apply(model)`` (adds at every position,
  the library default) around ``model.generate``.
"""

from __future__ import annotations

from typing import Any

import torch
from _peer_common import (
    generation_options,
    left_batch,
    load_model_and_tokenizer,
    log,
    main,
    short_warmup,
    time_variants,
    versions,
)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from steering_vectors import SteeringVector, extract_activations

    model, tokenizer, adaptations = load_model_and_tokenizer(spec["model_path"])
    out: dict[str, Any] = {
        "status": "ok",
        "versions": versions("steering-vectors"),
        "adaptations": adaptations,
        "workloads": {},
    }
    repeats = int(spec["repeats"])
    timing = {"max_contention": spec.get("max_contention", 0.15), "retries": spec.get("retries", 2)}
    backbone = model.model

    extraction = spec.get("extraction")
    if extraction:
        prompts: list[str] = extraction["prompts"]
        layers: list[int] = extraction["layers"]
        size = int(extraction["batch_size"])
        half = len(prompts) // 2
        pairs = list(zip(prompts[:half], prompts[half : 2 * half]))
        result: dict[str, Any] = {}

        def peer() -> None:
            pos, neg = extract_activations(
                model, tokenizer, pairs, layers=layers, batch_size=size, read_token_index=-1
            )
            result["acts"] = {
                layer: torch.cat([torch.cat(pos[layer]), torch.cat(neg[layer])]).float()
                for layer in layers
            }

        def floor() -> None:
            with torch.no_grad():
                for part in (prompts[:half], prompts[half : 2 * half]):
                    for start in range(0, len(part), size):
                        batch = tokenizer(
                            part[start : start + size], return_tensors="pt", padding=True
                        )
                        backbone(**batch, use_cache=False)

        log("  steering-vectors: extraction")
        timings = time_variants({"floor": floor, "peer": peer}, repeats=repeats, log=log, **timing)
        torch.save(result["acts"], spec["extraction_out"])
        out["workloads"]["extraction"] = {"timings": timings, "n_prompts": 2 * half}

    generation = spec.get("generation")
    if generation:
        batch = left_batch(tokenizer, generation["prompts"])
        options = generation_options(tokenizer, int(generation["max_new_tokens"]))
        vectors = {int(k): torch.tensor(v) for k, v in generation["vectors"].items()}
        variants: dict[str, Any] = {}
        tokens: dict[str, Any] = {}

        def floor_gen() -> None:
            with torch.no_grad():
                tokens["floor"] = model.generate(**batch, **options)

        variants["floor"] = floor_gen
        for name, config in generation["configs"].items():
            strengths = {int(k): float(v) for k, v in config["layer_strengths"].items()}
            vector = SteeringVector(
                {layer: s * vectors[layer] for layer, s in strengths.items()}, "decoder_block"
            )

            def steered(name: str = name, vector: SteeringVector = vector) -> None:
                with torch.no_grad(), vector.apply(model, multiplier=1.0):
                    tokens[name] = model.generate(**batch, **options)

            variants[name] = steered
        warm = {name: short_warmup(fn, options) for name, fn in variants.items()}
        log("  steering-vectors: generation")
        timings = time_variants(variants, repeats=repeats, warmups=warm, log=log, **timing)
        width = batch["input_ids"].shape[1]
        out["workloads"]["generation"] = {
            "timings": timings,
            "new_tokens": {k: v[:, width:].tolist() for k, v in tokens.items()},
        }
    return out


if __name__ == "__main__":
    main(run)
