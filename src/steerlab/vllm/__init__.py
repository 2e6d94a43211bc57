"""Steering on vLLM: the same vectors, per request, inside vLLM's continuous batching.

Three ways in, one mechanism (the ``vllm.general_plugins`` entry point
:func:`steerlab.vllm.plugin.register`, loaded by vLLM in every process once steerlab is
installed next to it):

* offline batch jobs: :func:`generate` on a ``vllm.LLM`` (made by :func:`load`), with per-prompt
  steering, returning what :meth:`steerlab.SteeredModel.generate` returns;
* ``steerlab serve --engine vllm``: :class:`steerlab.vllm.engine.VLLMEngine` behind steerlab's
  HTTP server;
* a plain ``vllm serve MODEL``: requests send
  ``extra_body={"vllm_xargs": {"steerlab": json.dumps(steerlab.vllm.to_wire([...]))}}``.

Nothing here imports vLLM until it is used, so ``import steerlab`` never needs it.

>>> import torch, steerlab as sl
>>> vec = sl.SteeringVector({3: torch.ones(2)})
>>> args = extra_args(sl.Steering(vec, strength=2.0, positions="last"))
>>> args["steerlab"]["steering"][0]["positions"], args["steerlab"]["steering"][0]["strength"]
('last', 2.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import torch

from steerlab.deprecation import loose_steering_keywords
from steerlab.errors import InvalidInputError
from steerlab.interventions import RowSteering as _RowSteering
from steerlab.interventions import Steering, normalize_steering, steering_with
from steerlab.positions import PositionSpec
from steerlab.prompts import encode_prompts
from steerlab.vllm.memory import kv_cache_options
from steerlab.vllm.spec import EXTRA_ARGS_KEY, VECTORS_ENV, resolve, to_wire

__all__ = [
    "EXTRA_ARGS_KEY",
    "VECTORS_ENV",
    "extra_args",
    "generate",
    "generate_ids",
    "load",
    "per_row_steering",
    "to_wire",
]


def per_row_steering(
    steering: Any,
    *,
    n_rows: int,
    strength: float | Mapping[int, float] | None = None,
    positions: PositionSpec | None = None,
    layers: Sequence[int] | None = None,
    tokenizer: Any = None,
) -> list[list[Steering]]:
    """The steering terms of each of ``n_rows`` prompts, from what ``generate`` accepts.

    ``steering`` is ``None``, a vector, a :class:`~steerlab.interventions.Steering`, or a list
    with one entry per prompt (``None`` for an unsteered prompt), as for the torch engine.
    ``tokenizer`` turns the text markers of positions chosen by text into token ids, as the
    library does (vLLM's workers have none).

    >>> import torch, steerlab as sl
    >>> v = sl.SteeringVector({0: torch.ones(2)})
    >>> [len(r) for r in per_row_steering([v, None], n_rows=2)]
    [1, 0]

    ``strength``/``positions``/``layers`` are deprecated: give a
    :class:`~steerlab.interventions.Steering` (see ``docs/migrating.md``).
    """
    loose_steering_keywords(
        "per_row_steering", strength=strength, positions=positions, layers=layers
    )
    interventions = normalize_steering(
        steering_with(steering, strength=strength, positions=positions, layers=layers),
        n_rows=n_rows if isinstance(steering, (list, tuple)) else None,
        tokenizer=tokenizer,
    )
    rows: list[list[Steering]] = [[] for _ in range(n_rows)]
    for item in interventions:
        if isinstance(item, _RowSteering):
            for row, term in enumerate(item.rows):
                if term is not None:
                    rows[row].append(term)
        elif isinstance(item, Steering):
            for terms in rows:
                terms.append(item)
        else:
            raise InvalidInputError(
                f"the vLLM engine applies additive steering only, not {type(item).__name__}"
            )
    return rows


def extra_args(
    steering: Any,
    *,
    strength: float | Mapping[int, float] | None = None,
    positions: PositionSpec | None = None,
    layers: Sequence[int] | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """``SamplingParams.extra_args`` that steer one vLLM request (merge with your own).

    Positions chosen by text (``"after:Yes"``) need the model's ``tokenizer`` (e.g.
    ``llm.get_tokenizer()``): they travel as token ids.

    >>> extra_args(None)
    {}

    ``strength``/``positions``/``layers`` are deprecated: give a
    :class:`~steerlab.interventions.Steering`.
    """
    loose_steering_keywords("extra_args", strength=strength, positions=positions, layers=layers)
    (terms,) = per_row_steering(
        steering_with(steering, strength=strength, positions=positions, layers=layers),
        n_rows=1,
        tokenizer=tokenizer,
    )
    return {EXTRA_ARGS_KEY: to_wire(terms)} if terms else {}


def load(model: str | Path | None = None, **llm_options: Any) -> Any:
    """A ``vllm.LLM`` ready for steering (default: steerlab's default model, float32).

    Options pass through to ``vllm.LLM``. vLLM compiles the model as it does by default:
    steering runs inside the compiled graph, as a custom op the graph calls at every decoder
    layer (:mod:`steerlab.vllm.plugin`); ``enforce_eager=True`` runs it eagerly instead.
    On CPU the KV cache is sized from the free memory unless you set it
    (:mod:`steerlab.vllm.memory`; too little raises
    :class:`~steerlab.errors.InsufficientMemoryError` naming the setting).
    Call it under ``if __name__ == "__main__":`` in scripts: vLLM spawns its
    engine process.

    >>> llm = load(max_model_len=512)  # doctest: +SKIP
    """
    import vllm

    from steerlab.loading import default_model_path

    path = str(default_model_path() if model is None else model)
    options: dict[str, Any] = {"dtype": "float32"}
    options.update(llm_options)
    return vllm.LLM(model=path, **kv_cache_options(options))


def _dims(llm: Any) -> tuple[int, int]:
    config = llm.llm_engine.model_config.hf_text_config
    return int(config.num_hidden_layers), int(config.hidden_size)


def _eos_ids(tokenizer: Any, llm: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else list(eos or [])


@dataclasses.dataclass(frozen=True)
class _Options:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    logprobs: int | None


def _sampling_params(options: _Options, eos: list[int], extra: dict[str, Any]) -> Any:
    import vllm

    kwargs: dict[str, Any] = {
        "max_tokens": options.max_new_tokens,
        "stop_token_ids": eos,
        "skip_special_tokens": True,
        "extra_args": extra or None,
    }
    if options.do_sample:
        kwargs.update(
            temperature=options.temperature,
            top_p=1.0 if options.top_p is None else options.top_p,
            top_k=0 if options.top_k is None else options.top_k,
            seed=options.seed,
        )
    else:
        kwargs["temperature"] = 0.0
    if options.logprobs is not None:
        kwargs["logprobs"] = options.logprobs
    return vllm.SamplingParams(**kwargs)


def generate_ids(
    llm: Any,
    prompts: Sequence[str] | str,
    *,
    max_new_tokens: int = 32,
    steering: Any = None,
    strength: float | Mapping[int, float] | None = None,
    positions: PositionSpec | None = None,
    layers: Sequence[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    chat: bool = False,
    logprobs: int | None = None,
    return_outputs: bool = False,
) -> Any:
    """Each prompt's new token ids (EOS and after removed), steered per prompt, through vLLM.

    Arguments mean what they mean for :meth:`steerlab.SteeredModel.generate_ids`; ``llm`` is a
    ``vllm.LLM`` (see :func:`load`). ``return_outputs=True`` also returns vLLM's
    ``RequestOutput`` objects (for ``logprobs``). ``strength``/``positions``/``layers`` are
    deprecated: give ``steering=sl.Steering(vector, strength=..., ...)``.

    >>> ids = generate_ids(load(), ["The cat"], max_new_tokens=4)  # doctest: +SKIP
    """
    from vllm.inputs import TokensPrompt

    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items or any(not isinstance(p, str) for p in items):
        raise InvalidInputError("prompts must be a non-empty string or list of strings")
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    loose_steering_keywords("generate_ids", strength=strength, positions=positions, layers=layers)
    tokenizer = llm.get_tokenizer()
    rows = per_row_steering(
        steering_with(steering, strength=strength, positions=positions, layers=layers),
        n_rows=len(items),
        tokenizer=tokenizer,
    )
    n_layers, d_model = _dims(llm)
    wires = []
    for terms in rows:
        wire = to_wire(terms) if terms else None
        resolve(wire, n_layers=n_layers, d_model=d_model)  # refuse bad steering up front
        wires.append(wire)
    eos = _eos_ids(tokenizer, llm)
    options = _Options(max_new_tokens, do_sample, temperature, top_p, top_k, seed, logprobs)
    # the library's own encoding, so vLLM reads the prompt SteeredModel.generate reads
    requests = [
        TokensPrompt(prompt_token_ids=ids) for ids in encode_prompts(tokenizer, items, chat=chat)
    ]
    params = [
        _sampling_params(options, eos, {EXTRA_ARGS_KEY: wire} if wire else {}) for wire in wires
    ]
    outputs = llm.generate(requests, params, use_tqdm=False)
    ids: list[torch.Tensor] = []
    for output in outputs:
        tokens = list(output.outputs[0].token_ids)
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        ids.append(torch.tensor(tokens[:cut], dtype=torch.long))
    return (ids, outputs) if return_outputs else ids


@overload
def generate(llm: Any, prompts: str, **kwargs: Any) -> str: ...


@overload
def generate(llm: Any, prompts: Sequence[str], **kwargs: Any) -> list[str]: ...


def generate(llm: Any, prompts: Sequence[str] | str, **kwargs: Any) -> str | list[str]:
    """Continuations (new text only) through vLLM, each prompt with its own steering.

    Same keyword options and return value as :meth:`steerlab.SteeredModel.generate`
    (``steering`` may be a list with one entry per prompt); ``llm`` is a ``vllm.LLM``.

    >>> import torch, steerlab as sl
    >>> llm = load(max_model_len=512)                      # doctest: +SKIP
    >>> vec = sl.SteeringVector({15: torch.randn(576)})
    >>> texts = generate(llm, ["I think", "I think"], steering=[sl.Steering(vec, strength=4.0),
    ...                  None], max_new_tokens=8)          # doctest: +SKIP
    """
    loose = {key: kwargs.pop(key) for key in ("strength", "positions", "layers") if key in kwargs}
    if loose:  # deprecated: warn naming generate, not the generate_ids it forwards to
        loose_steering_keywords("generate", **loose)
        kwargs["steering"] = steering_with(kwargs.get("steering"), **loose)
    tokenizer = llm.get_tokenizer()
    texts = [
        str(tokenizer.decode(ids.tolist(), skip_special_tokens=True))
        for ids in generate_ids(llm, prompts, **kwargs)
    ]
    return texts[0] if isinstance(prompts, str) else texts
