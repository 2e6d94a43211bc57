"""Steering and readout under vLLM tensor parallelism == one rank, on the default model.

The default model (SmolLM2-135M: 9 attention heads, 3 KV heads) cannot be split over 2 ranks
(vLLM refuses: "Total number of attention heads (9) must be divisible by tensor parallel size
(2)"), so the test shards it over 3, which vLLM's CPU backend runs here with one OpenMP thread
per rank and no core binding (``VLLM_CPU_OMP_THREADS_BIND=nobind``; its automatic binding wants
one NUMA node per rank). Every rank's decoder layers return the whole residual stream (the
row-parallel projections all-reduce first), so each rank adds the same delta and reads the same
probe values.

Runs from ``.venv-vllm`` (``make test-vllm``); skipped with the reason elsewhere.
"""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

import steerlab as sl
from steerlab.server.engine import GenerationRequest, ReadoutEntry, SteeringEntry, TokenEvent

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

RANKS = 3
PROMPTS = [
    "The weather today is",
    "My favourite food is",
    "Once upon a time",
    "I think that",
    "The capital of France is",
    "Yesterday I went to the",
]


def _requests() -> list[GenerationRequest]:
    probes = (ReadoutEntry("one", 15), ReadoutEntry("four", 10))
    steerings: list[tuple[SteeringEntry, ...]] = [
        (),
        (SteeringEntry("one", 8.0, "all"),),
        (SteeringEntry("four", 4.0, "last"),),
        (SteeringEntry("one", 8.0, "generated"),),
        (SteeringEntry("four", 4.0, slice(2, None)),),
        (SteeringEntry("one", 4.0, [0, -1]), SteeringEntry("four", 2.0, "all")),
    ]
    # each prompt steered (the first one not), then each unsteered: one mixed batch
    return [
        GenerationRequest(
            prompt=prompt,
            max_tokens=12,
            temperature=0.0,
            steering=steering,
            readout=probes,
            logprobs=0,
        )
        for prompt, steering in [*zip(PROMPTS, steerings), *((p, ()) for p in PROMPTS[1:])]
    ]


def _serve(
    ranks: int, vectors: dict[str, sl.SteeringVector], *, eager: bool
) -> list[list[TokenEvent]]:
    from steerlab.vllm.engine import VLLMEngine

    engine = VLLMEngine(
        dtype="float32",
        max_model_len=512,
        seed=0,
        gpu_memory_utilization=0.5,
        tensor_parallel_size=ranks,
        enforce_eager=eager,
    )
    for name, vec in vectors.items():
        engine.vectors.register(name, vec)
    engine.start()
    try:
        requests = _requests()
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(lambda r: list(engine.submit(r)), requests))
    finally:
        engine.shutdown()


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < RANKS,
    reason=f"tensor parallelism over {RANKS} ranks needs {RANKS} GPUs on a CUDA build",
)
def test_steered_greedy_and_readout_under_tensor_parallel_equal_one_rank(
    monkeypatch: pytest.MonkeyPatch, vllm_eager: bool
) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    gen = torch.Generator().manual_seed(5)
    vectors = {
        "one": sl.SteeringVector({15: torch.randn(576, generator=gen) / 2}),
        "four": sl.SteeringVector(
            {layer: torch.randn(576, generator=gen) / 2 for layer in (6, 10, 14, 18)}
        ),
    }
    single = _serve(1, vectors, eager=vllm_eager)
    sharded = _serve(RANKS, vectors, eager=vllm_eager)
    worst_logprob = worst_readout = 0.0
    assert len(single) == len(sharded) == 2 * len(PROMPTS) - 1
    for index, (one, many) in enumerate(zip(single, sharded)):
        assert [e.token_id for e in many] == [e.token_id for e in one], index
        assert "".join(e.text for e in many) == "".join(e.text for e in one)
        for a, b in zip(one, many):
            if a.token_id < 0:
                continue
            assert a.logprob is not None and b.logprob is not None
            worst_logprob = max(worst_logprob, abs(a.logprob - b.logprob))
            assert len(a.readout) == len(b.readout) == 2
            worst_readout = max(worst_readout, *(abs(x - y) for x, y in zip(a.readout, b.readout)))
    print(
        f"tp={RANKS} vs 1: max |dlogprob| {worst_logprob:.2e}, max |dreadout| {worst_readout:.2e}"
    )
    assert worst_logprob < 1e-3 and worst_readout < 1e-3, (worst_logprob, worst_readout)
    # the steering took effect: steered continuations differ from their unsteered twins
    tokens = [[e.token_id for e in events] for events in single]
    twins = tokens[len(PROMPTS) :]
    assert sum(a != b for a, b in zip(tokens[1 : len(PROMPTS)], twins)) >= len(twins) - 1
