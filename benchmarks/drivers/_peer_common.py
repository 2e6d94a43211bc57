"""Helpers for the peer drivers, which run inside the peers' own virtual environments.

A driver is started as ``<venv>/bin/python benchmarks/drivers/<peer>_driver.py SPEC.json``. It may
import only what its venv has (torch, an older transformers, the peer) plus
``benchmarks.common`` (stdlib + torch only), never steerlab. It loads the same model folder the
main process uses, runs the workloads the spec asks for with the peer's own API and prints one
JSON object on stdout; progress goes to stderr.

Every driver also times *plain transformers of its own venv* on the same batches (``floor``), so a
peer running on an older transformers is judged both in absolute seconds and against its own
floor.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from benchmarks.common import log, summary, time_variants

__all__ = [
    "generation_options",
    "left_batch",
    "load_model_and_tokenizer",
    "log",
    "main",
    "short_warmup",
    "summary",
    "time_variants",
    "versions",
]


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of ``packages`` (plus torch, transformers, numpy) in this venv."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "numpy", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_model_and_tokenizer(path: str) -> tuple[Any, Any, list[str]]:
    """Load the benchmark's model folder with this venv's transformers; returns adaptations made.

    The folder is written by transformers 5. Older releases read two things differently:
    ``rope_parameters`` (v5) is ignored by v4 configs, which would silently fall back to the
    default ``rope_theta`` of 10000 instead of the model's 100000; and the v5 tokenizer class
    name ``TokenizersBackend`` is unknown to v4's ``AutoTokenizer``. Both are bridged here and
    reported, so the peer computes on exactly the same model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adaptations: list[str] = []
    config = AutoConfig.from_pretrained(path)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        theta = float(rope["rope_theta"])
        if getattr(config, "rope_theta", theta) != theta:
            adaptations.append(
                f"config.rope_theta set to {theta} from v5 rope_parameters "
                f"(this transformers read {getattr(config, 'rope_theta', None)})"
            )
            config.rope_theta = theta
    model = AutoModelForCausalLM.from_pretrained(path, config=config)
    model = model.float().eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as error:
        from transformers import PreTrainedTokenizerFast

        settings = json.loads((Path(path) / "tokenizer_config.json").read_text())
        specials = {
            key: settings[key]
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if isinstance(settings.get(key), str)
        }
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(Path(path) / "tokenizer.json"),
            model_input_names=["input_ids", "attention_mask"],
            **specials,
        )
        adaptations.append(
            f"tokenizer built from tokenizer.json (AutoTokenizer failed: {str(error)[:80]})"
        )
    return model, tokenizer, adaptations


def left_batch(tokenizer: Any, prompts: list[str]) -> Any:
    """Left-padded tensors, as every tool in the suite uses for generation."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = previous


def generation_options(tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    """Greedy decoding of exactly ``max_new_tokens`` tokens (EOS suppressed until then)."""
    return {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }


def main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Read the spec, run, print JSON; any failure is reported in the JSON, never swallowed."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(spec.get("threads", 2)))
    try:
        result = run(spec)
    except Exception as error:  # the harness reports the peer as failed, with this reason
        result = {
            "status": "failed",
            "reason": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc()[-4000:],
        }
    print(json.dumps(result))


def short_warmup(fn: Callable[[], Any], options: dict[str, Any]) -> Callable[[], Any]:
    """A warm-up running ``fn``'s code path with 2 new tokens (``options`` restored after)."""

    def warm() -> None:
        saved = dict(options)
        options.update(max_new_tokens=2, min_new_tokens=2)
        try:
            fn()
        finally:
            options.clear()
            options.update(saved)

    return warm
