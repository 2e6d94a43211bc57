"""repeng (vgel) running the benchmark workloads, inside its own venv.

* extraction: ``repeng.extract.batched_get_hiddens`` (the reader behind ``ControlVector.train``:
  ``output_hidden_states=True``, last non-padding token per prompt) at every layer, with the
  suite's batch size. repeng reads ``hidden_states[layer + 1]``; transformers applies the final
  norm to the last entry of ``hidden_states``, so repeng's last layer is the *normed* residual
  stream (the harness compares the other layers with steerlab).
* steered generation: ``ControlModel(model, layer_ids)`` + ``set_raw_control({layer: s * v})``
  around ``model.generate``. ``ControlModel`` replaces the model's blocks in place, so the floor is
  timed on a second, untouched copy of the model.
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
    from repeng import ControlModel
    from repeng.extract import batched_get_hiddens

    model, tokenizer, adaptations = load_model_and_tokenizer(spec["model_path"])
    out: dict[str, Any] = {
        "status": "ok",
        "versions": versions("repeng"),
        "adaptations": adaptations,
        "workloads": {},
    }
    repeats = int(spec["repeats"])
    timing = {"max_contention": spec.get("max_contention", 0.15), "retries": spec.get("retries", 2)}

    extraction = spec.get("extraction")
    if extraction:
        prompts: list[str] = extraction["prompts"]
        layers: list[int] = extraction["layers"]
        size = int(extraction["batch_size"])
        result: dict[str, Any] = {}

        def peer() -> None:
            hiddens = batched_get_hiddens(model, tokenizer, prompts, layers, size)
            result["acts"] = {layer: torch.from_numpy(hiddens[layer]) for layer in layers}

        def floor() -> None:
            with torch.no_grad():
                for start in range(0, len(prompts), size):
                    batch = tokenizer(
                        prompts[start : start + size], return_tensors="pt", padding=True
                    )
                    model.model(**batch, use_cache=False)

        log("  repeng: extraction")
        timings = time_variants({"floor": floor, "peer": peer}, repeats=repeats, log=log, **timing)
        torch.save(result["acts"], spec["extraction_out"])
        out["workloads"]["extraction"] = {
            "timings": timings,
            "n_prompts": len(prompts),
            "last_layer_is_normed": True,
        }

    generation = spec.get("generation")
    if generation:
        plain, _, _ = load_model_and_tokenizer(spec["model_path"])
        batch = left_batch(tokenizer, generation["prompts"])
        options = generation_options(tokenizer, int(generation["max_new_tokens"]))
        vectors = {int(k): torch.tensor(v) for k, v in generation["vectors"].items()}
        variants: dict[str, Any] = {}
        tokens: dict[str, Any] = {}

        def floor_gen() -> None:
            with torch.no_grad():
                tokens["floor"] = plain.generate(**batch, **options)

        variants["floor"] = floor_gen
        for name, config in generation["configs"].items():
            strengths = {int(k): float(v) for k, v in config["layer_strengths"].items()}
            control = {layer: s * vectors[layer] for layer, s in strengths.items()}

            def steered(name: str = name, control: dict[int, torch.Tensor] = control) -> None:
                wrapped = ControlModel(model, list(control))
                try:
                    wrapped.set_raw_control(control)
                    with torch.no_grad():
                        tokens[name] = wrapped.generate(**batch, **options)
                finally:
                    wrapped.unwrap()

            variants[name] = steered
        warm = {name: short_warmup(fn, options) for name, fn in variants.items()}
        log("  repeng: generation")
        timings = time_variants(variants, repeats=repeats, warmups=warm, log=log, **timing)
        width = batch["input_ids"].shape[1]
        out["workloads"]["generation"] = {
            "timings": timings,
            "new_tokens": {k: v[:, width:].tolist() for k, v in tokens.items()},
        }
    return out


if __name__ == "__main__":
    main(run)
