"""Mixture-of-experts sites (issue 22): a bias on the router logits re-routes exactly as the
router would with those logits, and an expert-gated vector touches only the tokens routed there."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.errors import InvalidInputError, UnsupportedModelError, VectorMismatchError
from steerlab.sites import output_hidden
from steerlab.testing import MOE_ARCHITECTURES, hook_count, tiny_model

PROMPTS = ["the cat sat on the mat", "a dog ran", "i love the big house"]
LAYER = 1


def _router_vector(values: list[float]) -> sl.SteeringVector:
    return sl.SteeringVector({LAYER: torch.tensor(values)}, metadata={"site": "router"})


def _routing(model: Any, steering: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(router logits, experts each token was sent to) at LAYER for the real tokens of PROMPTS:
    the logits as steerlab reads them, the experts as the experts module received them."""
    logits = model.activations(
        PROMPTS, layers=[LAYER], site="router", positions="all", steering=steering
    )[LAYER]
    real = model.encode(PROMPTS).attention_mask.bool().flatten()
    return torch.cat(logits), _sent_to(model, steering)[real]


def _sent_to(model: Any, steering: Any) -> torch.Tensor:
    """``[tokens, top_k]`` sorted: the experts each token of a forward pass reached, as the
    experts saw it. transformers 5 (and 4's gpt-oss) hand the experts module the indices; in
    transformers 4's ModuleList layout each expert is called with its tokens' rows of the
    block's input, which are matched back to their tokens here."""
    moe = model.adapter.mlp(LAYER)
    seen: list[torch.Tensor] = []
    handles = []
    if isinstance(moe.experts, torch.nn.ModuleList):
        block_in: list[torch.Tensor] = []
        rows: dict[int, torch.Tensor] = {}

        def keep_rows(index: int) -> Any:
            return lambda m, args: rows.__setitem__(index, args[0].detach().clone())

        handles.append(moe.register_forward_pre_hook(lambda m, a: block_in.append(a[0].clone())))
        handles += [e.register_forward_pre_hook(keep_rows(i)) for i, e in enumerate(moe.experts)]
    else:

        def keep(m: Any, args: Any, kwargs: Any) -> None:
            seen.append(kwargs.get("router_indices", args[1] if len(args) > 1 else None).clone())

        handles.append(moe.experts.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        model.logits(PROMPTS, steering=steering)
    finally:
        for handle in handles:
            handle.remove()
    if seen:
        return seen[-1].sort(dim=-1).values
    flat = block_in[-1].reshape(-1, model.d_model)
    member = torch.zeros(flat.shape[0], len(moe.experts), dtype=torch.bool)
    for index, got in rows.items():
        match = (flat[:, None, :] == got[None, :, :]).all(-1)  # [tokens, rows of this expert]
        # several matches are padding tokens with identical rows, hence identical routing
        assert bool((match.sum(0) >= 1).all()), "a row matches no token"
        member[:, index] = match.any(-1)
    k = int(member.sum(-1).max())
    assert bool((member.sum(-1) == k).all())  # every token reached top_k experts
    return member.nonzero()[:, 1].reshape(-1, k)


def _top(model: Any, logits: torch.Tensor) -> torch.Tensor:
    """The experts each token goes to, computed here from the logits (not with steerlab),
    sorted."""
    router = model.adapter.router(LAYER)
    k = getattr(router, "top_k", None) or model.adapter.mlp(LAYER).top_k
    if type(router).__name__ == "GptOssTopKRouter":
        return torch.topk(logits, k, dim=-1).indices.sort(dim=-1).values
    return torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1).indices.sort(dim=-1).values


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_router_bias_changes_exactly_the_chosen_experts_routing(arch: str) -> None:
    model = tiny_model(arch)
    # a zero bias recomputes the routing bit for bit
    assert torch.equal(
        model.logits(PROMPTS, steering=_router_vector([0.0] * 4)), model.logits(PROMPTS)
    )
    base_logits, base_experts = _routing(model, None)
    for expert, bias in ((2, 4.0), (0, -4.0)):
        values = [0.0] * 4
        values[expert] = bias
        logits, experts = _routing(model, _router_vector(values))
        shift = torch.zeros(4)
        shift[expert] = bias
        assert torch.equal(logits, base_logits + shift)
        assert torch.equal(experts, _top(model, logits))
        before = [set(row) for row in base_experts.tolist()]
        after = [set(row) for row in experts.tolist()]
        changed = [b != a for b, a in zip(before, after)]
        assert any(changed)  # the bias is big enough to move some tokens
        for old, new in zip(before, after):
            if bias > 0:  # e can only join a token's experts
                assert new - old <= {expert} and (new == old or expert in new)
            else:  # e can only leave
                assert old - new <= {expert} and (new == old or expert not in new)
        # experts= keeps only those entries of a full vector
        full = _router_vector([bias if i == expert else 3.0 for i in range(4)])
        _, picked = _routing(model, sl.Steering(full, experts=[expert]))
        assert torch.equal(picked, experts)
    assert hook_count(model.hf_model) == 0


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_expert_vector_touches_only_tokens_routed_there(arch: str) -> None:
    model = tiny_model(arch)
    expert = 1
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    vec = sl.SteeringVector({LAYER: direction}, metadata={"site": "mlp_out"})
    gated = sl.Steering(vec, experts=[expert])
    _, experts = _routing(model, None)
    routed = (experts == expert).any(dim=-1)
    assert 0 < int(routed.sum()) < routed.numel()
    base = model.activations(PROMPTS, layers=[LAYER], site="mlp_out", positions="all")[LAYER]
    steered = model.activations(
        PROMPTS, layers=[LAYER], site="mlp_out", positions="all", steering=gated
    )[LAYER]
    want_rows = routed
    base_all, steered_all = torch.cat(base), torch.cat(steered)
    assert torch.equal(steered_all[~want_rows], base_all[~want_rows])
    assert torch.equal(steered_all[want_rows], base_all[want_rows] + direction)


def test_moe_arguments_are_checked() -> None:
    model = tiny_model("mixtral")
    vec = _router_vector([1.0, 0.0, 0.0, 0.0])
    with pytest.raises(InvalidInputError, match="experts: expert 4 is out of range"):
        model.logits(PROMPTS, steering=sl.Steering(vec, experts=[4]))
    with pytest.raises(InvalidInputError, match="experts= applies to site='router' or 'mlp_out'"):
        sl.Steering(sl.SteeringVector({1: torch.ones(32)}), experts=[0])
    with pytest.raises(VectorMismatchError, match="site 'router' of 'tiny-mixtral' has size 4"):
        model.logits(PROMPTS, steering=_router_vector([1.0, 2.0]))
    dense = tiny_model("llama")
    with pytest.raises(VectorMismatchError, match="not a mixture-of-experts"):
        dense.logits(PROMPTS, steering=vec)
    with pytest.raises(UnsupportedModelError, match="not a mixture-of-experts"):
        dense.activations(PROMPTS, site="router")
    assert hook_count(model.hf_model) == 0 and hook_count(dense.hf_model) == 0
    out = output_hidden(model.adapter.router(0)(torch.randn(3, 32)))
    assert tuple(out.shape) == (3, 4)


def test_threads_steering_different_sites_of_one_moe_get_their_solo_results() -> None:
    import threading

    model = tiny_model("qwen3_moe")
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    head = torch.randn(32, generator=torch.Generator().manual_seed(2))
    entries: list[Any] = [
        None,
        _router_vector([0.0, 6.0, 0.0, -6.0]),
        sl.Steering(
            sl.SteeringVector({LAYER: direction}, metadata={"site": "mlp_out"}), experts=[0]
        ),
        sl.Steering(sl.SteeringVector({LAYER: head}, metadata={"site": "head"}), heads=[1, 2]),
    ]
    solo = [model.logits(PROMPTS, steering=entry) for entry in entries]
    assert all(not torch.equal(solo[0], other) for other in solo[1:])
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(entries))}
    errors: list[BaseException] = []
    start = threading.Barrier(len(entries))

    def run(index: int) -> None:
        try:
            start.wait()
            for _ in range(4):
                results[index].append(model.logits(PROMPTS, steering=entries[index]))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(entries))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, outs in results.items():
        assert all(torch.equal(out, solo[index]) for out in outs), index
    assert hook_count(model.hf_model) == 0
