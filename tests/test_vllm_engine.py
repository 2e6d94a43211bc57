"""vLLM (CPU build) steered by steerlab's plugin == steerlab's torch engine, on the default model.

Runs from ``.venv-vllm`` (``make test-vllm``); skipped with the reason elsewhere. One vLLM engine
for the module (fp32, eager), the torch engine in the same process as the reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import steerlab as sl

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [
    "The weather today is",
    "My favourite food is",
    "Tell me about your day.",
    "The capital of France is",
    "Once upon a time",
    "I think that people",
    "The best way to learn is",
    "Yesterday I went to the",
]
NEW = 16
POSITION_MODES: list[Any] = ["all", "last", "prompt", "generated", slice(2, None), [0, -1]]


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[Any, sl.SteeredModel]]:
    import steerlab.vllm as slv

    llm = slv.load(max_model_len=512, seed=0, gpu_memory_utilization=0.5)
    model = sl.load_model()
    try:
        yield llm, model
    finally:
        # stop the engine process now, not at interpreter exit: the next module starts its own
        llm.llm_engine.engine_core.shutdown()


def _vector(model: sl.SteeredModel, layers: list[int], seed: int) -> sl.SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return sl.SteeringVector(
        {layer: torch.randn(model.d_model, generator=gen) / 2.0 for layer in layers}
    )


def _configs(model: sl.SteeredModel) -> list[tuple[str, Any]]:
    one = _vector(model, [15], seed=1)
    four = _vector(model, [6, 10, 14, 18], seed=2)
    out: list[tuple[str, Any]] = [("unsteered", None)]
    for name, vec, strength in (("1 layer", one, 8.0), ("4 layers", four, 4.0)):
        for pos in POSITION_MODES:
            out.append((f"{name} {pos}", sl.Steering(vec, strength=strength, positions=pos)))
    return out


def test_greedy_and_logprobs_equal_torch_engine(engines: tuple[Any, sl.SteeredModel]) -> None:
    import steerlab.vllm as slv

    llm, model = engines
    configs = _configs(model)
    # every config's 8 prompts in one vLLM call: 104 requests batched together
    prompts = [p for _ in configs for p in PROMPTS]
    steering = [s for _, s in configs for _ in PROMPTS]
    got, outputs = slv.generate_ids(
        llm, prompts, steering=steering, max_new_tokens=NEW, logprobs=0, return_outputs=True
    )
    # the torch engine's reference for every config in one batch too (per-row steering, which
    # steerlab's own tests prove equal to running each configuration alone)
    want = model.generate_ids(prompts, steering=steering, max_new_tokens=NEW)
    ref = torch.log_softmax(model.next_token_logits(prompts, steering=steering).double(), dim=-1)
    unsteered = want[: len(PROMPTS)]
    for index, (name, steer) in enumerate(configs):
        rows = range(index * len(PROMPTS), (index + 1) * len(PROMPTS))
        same = sum(torch.equal(got[r], want[r]) for r in rows)
        assert same >= 7, f"{name}: only {same}/8 continuations equal the torch engine's"
        if steer is not None and steer.positions in ("all", "last"):
            moved = sum(not torch.equal(want[r], u) for r, u in zip(rows, unsteered))
            assert moved >= 4, f"{name}: steering changed only {moved}/8 continuations"
        for r in rows:
            first = outputs[r].outputs[0]
            token = first.token_ids[0]
            vllm_lp = first.logprobs[0][token].logprob
            assert abs(vllm_lp - float(ref[r, token])) < 1e-3, (name, r)


def test_mixed_batch_equals_each_alone(engines: tuple[Any, sl.SteeredModel]) -> None:
    import steerlab.vllm as slv

    llm, model = engines
    configs = _configs(model)
    mixed = [configs[0][1], *[s for _, s in configs[1:13:2]], configs[4][1]][:8]
    assert len(mixed) == 8 and mixed[0] is None
    batch, outs = slv.generate_ids(
        llm, PROMPTS, steering=mixed, max_new_tokens=NEW, logprobs=0, return_outputs=True
    )
    for row, steer in enumerate(mixed):
        alone = slv.generate_ids(llm, [PROMPTS[row]], steering=[steer], max_new_tokens=NEW)
        assert torch.equal(batch[row], alone[0]), f"row {row} differs from its solo run"
    # the unsteered row: bit-identical to the same batch with nobody steered (steering of
    # other rows adds exact zeros to its tokens)
    plain, plain_outs = slv.generate_ids(
        llm, PROMPTS, max_new_tokens=NEW, logprobs=0, return_outputs=True
    )
    assert torch.equal(batch[0], plain[0])
    steered_lps = [next(iter(lp.values())).logprob for lp in outs[0].outputs[0].logprobs]
    plain_lps = [next(iter(lp.values())).logprob for lp in plain_outs[0].outputs[0].logprobs]
    assert steered_lps == plain_lps


def test_prefix_caching_positions(engines: tuple[Any, sl.SteeredModel]) -> None:
    """A second request with the same prompt reuses cached blocks: positions stay absolute."""
    import steerlab.vllm as slv

    llm, model = engines
    long = "Write a short story about a robot who learns to paint. " * 6
    steer = sl.Steering(_vector(model, [15], seed=3), strength=8.0, positions="last")
    first = slv.generate_ids(llm, [long], steering=[None], max_new_tokens=NEW)
    second = slv.generate_ids(llm, [long], steering=[steer], max_new_tokens=NEW)
    want = model.generate_ids([long], steering=steer, max_new_tokens=NEW)
    assert torch.equal(second[0], want[0])
    assert not torch.equal(first[0], second[0])


def test_bad_steering_is_refused_before_the_engine(engines: tuple[Any, sl.SteeredModel]) -> None:
    import steerlab.vllm as slv

    llm, _ = engines
    wrong = sl.SteeringVector({3: torch.ones(7)})
    with pytest.raises(sl.VectorMismatchError):
        slv.generate(llm, "hi", steering=wrong, max_new_tokens=2)
    with pytest.raises(sl.LayerIndexError):
        slv.generate(llm, "hi", steering=sl.SteeringVector({99: torch.ones(576)}))
    # the engine keeps serving
    assert isinstance(slv.generate(llm, "hi", max_new_tokens=2), str)
