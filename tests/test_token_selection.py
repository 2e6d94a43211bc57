"""Content-based token selection: first:K, after:, between:, outside: (streamed, cache-exact)."""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.positions import Positions, marker_flags
from steerlab.testing import tiny_model

LAYER = 1


def _vector(model: sl.SteeredModel) -> sl.SteeringVector:
    gen = torch.Generator().manual_seed(3)
    return sl.SteeringVector({LAYER: torch.randn(model.d_model, generator=gen)})


def _ids(model: sl.SteeredModel, text: str) -> list[int]:
    return list(model.tokenizer(text)["input_ids"])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("after:yes", [0, 0, 1, 1, 1, 1, 1, 1]),
        ("between:yes,no", [0, 0, 1, 1, 1, 1, 0, 1]),
        ("outside:yes,no", [1, 1, 0, 0, 0, 0, 1, 0]),
    ],
)
def test_marker_flags_stream(spec: str, expected: list[int]) -> None:
    model = tiny_model("llama")
    text = "the cat yes sat down no the yes"
    ids = _ids(model, text)
    bound = Positions.parse(spec).bind(model.tokenizer)
    flags, _ = marker_flags(bound, ids)
    assert [int(f) for f in flags] == expected
    # a scan continued token by token gives the same flags
    state, streamed = False, []
    for i in range(len(ids)):
        more, state = marker_flags(bound, ids[: i + 1], start=i, state=state)
        streamed.extend(more)
    assert streamed == flags


def test_multi_token_marker_completes_on_its_last_token() -> None:
    spec = Positions.after(ids=[7, 8])
    assert marker_flags(spec, [1, 7, 2, 7, 8, 3])[0] == [False] * 4 + [True, True]


@pytest.mark.parametrize("spec", ["between:yes,no", "outside:yes,no", "after:sat"])
def test_exact_tokens_changed_on_every_architecture(arch_model: sl.SteeredModel, spec: str) -> None:
    prompts = ["the cat yes sat down no yes more", "a dog sat", "yes i love it no"]
    vec = _vector(arch_model)
    base = arch_model.activations(prompts, layers=[LAYER], positions="all")[LAYER]
    steered = arch_model.activations(
        prompts, layers=[LAYER], positions="all", steering=vec, strength=2.0
    )[LAYER]
    with arch_model.steer(vec, strength=2.0, positions=spec):
        gated = arch_model.activations(prompts, layers=[LAYER], positions="all")[LAYER]
    bound = Positions.parse(spec).bind(arch_model.tokenizer)
    for row, prompt in enumerate(prompts):
        flags = torch.tensor(marker_flags(bound, _ids(arch_model, prompt))[0])
        assert torch.equal(gated[row][flags], steered[row][flags])
        assert torch.equal(gated[row][~flags], base[row][~flags])


@pytest.mark.parametrize(
    "spec", ["first:3", "after:@GEN", "between:@GEN,@GEN2", "outside:@GEN,@GEN2"]
)
@pytest.mark.parametrize("op", ["add", "clamp"])
def test_cache_on_equals_off_and_batched_equals_solo(spec: str, op: str) -> None:
    model = tiny_model("llama")
    prompts = ["the cat sat on", "a dog", "i love the movie so"]
    plain = model.generate_ids(prompts, max_new_tokens=8)
    # markers the model actually generates, so selection switches mid-generation
    gen, gen2 = int(plain[0][1]), int(plain[0][4])
    spec = spec.replace("@GEN2", f"@{gen2}").replace("@GEN", f"@{gen}")
    steering = sl.Steering(_vector(model), strength=3.0, positions=spec, op=op)
    cached = model.generate_ids(prompts, max_new_tokens=8, steering=steering)
    uncached = model.generate_ids(prompts, max_new_tokens=8, steering=steering, use_cache=False)
    assert [c.tolist() for c in cached] == [u.tolist() for u in uncached]
    solo = [model.generate_ids([p], max_new_tokens=8, steering=steering)[0] for p in prompts]
    assert [c.tolist() for c in cached] == [s.tolist() for s in solo]


def test_first_k_leaves_the_prefix_of_the_generation_and_steers_only_k_tokens() -> None:
    model = tiny_model("llama")
    prompts = ["the cat sat on"]
    vec = _vector(model)
    plain = model.generate_ids(prompts, max_new_tokens=6)[0]
    # steering from the 3rd generated token on cannot change the first two
    late = model.generate_ids(
        prompts,
        max_new_tokens=6,
        steering=vec,
        strength=8.0,
        positions=slice(len(_ids(model, prompts[0])) + 2, None),
    )[0]
    assert late[:3].tolist() == plain[:3].tolist()
    # first:2 equals steering exactly generated tokens P, P+1
    p = len(_ids(model, prompts[0]))
    a = model.generate_ids(
        prompts, max_new_tokens=6, steering=vec, strength=8.0, positions="first:2"
    )[0]
    b = model.generate_ids(
        prompts, max_new_tokens=6, steering=vec, strength=8.0, positions=[p, p + 1]
    )[0]
    assert a.tolist() == b.tolist()


def test_specs_parse_describe_and_refuse_nonsense() -> None:
    for text in ("first:4", "after:Answer:", "between:<think>,</think>", "outside:<a>,<b>"):
        assert Positions.parse(text).describe() == text
    assert Positions.parse("after:Answer:").markers == ("Answer:",)
    for bad in ("first:x", "between:onlyone", "after:", "first:-1"):
        with pytest.raises(sl.InvalidInputError):
            Positions.parse(bad)
    with pytest.raises(sl.InvalidInputError, match="tokenizer"):
        from steerlab.interventions import install

        model = tiny_model("gpt2")
        install(model.adapter, [sl.Steering(_vector(model), positions="after:cat")])
