"""Methods for heads and experts (issue 22): per-head probes, ITI, expert attribution."""

from __future__ import annotations

from pathlib import Path

import torch

import steerlab as sl
from steerlab.methods import fit_probe, probe_accuracy, split_classes
from steerlab.testing import tiny_model

POS = ["i love it", "so happy", "great day", "a wonderful film", "i enjoyed the book", "so good"]
NEG = ["i hate it", "so sad", "awful day", "a terrible film", "i disliked the book", "so bad"]


def test_head_probes_equal_a_probe_fitted_on_each_slice() -> None:
    model = tiny_model("qwen3")  # grouped-query attention: 4 query heads, 2 KV heads
    hp = sl.head_probes(model, POS, NEG, layers=[1, 2], test_fraction=0.34, seed=3)
    acts = model.activations(POS + NEG, layers=[2], site="head")[2]
    (pt, ps), (nt, ns) = split_classes(6, 6, paired=True, test_fraction=0.34, seed=3)
    d = model.adapter.head_dim
    for head in range(model.adapter.n_heads):
        sl_ = acts[:, head * d : (head + 1) * d]
        pos, neg = sl_[:6], sl_[6:]
        probe = fit_probe(pos[pt], neg[nt])
        assert hp.accuracy[(2, head)] == probe_accuracy(probe, pos[ps], neg[ns])
        torch.testing.assert_close(hp.directions[(2, head)], pos.mean(0) - neg.mean(0))
    assert len(hp.accuracy) == 2 * model.adapter.n_heads


def test_iti_keeps_the_k_most_accurate_heads_and_steers_them(tmp_path: Path) -> None:
    model = tiny_model("llama")
    hp = sl.head_probes(model, POS, NEG, layers=[0, 1, 2], test_fraction=0.34)
    vec = sl.iti_vector(model, POS, NEG, k=3, layers=[0, 1, 2], test_fraction=0.34)
    chosen = hp.top(3)
    assert vec.site == "head" and vec.metadata["method"] == "iti"
    assert sorted((int(layer), h) for layer, hs in vec.metadata["heads"].items() for h in hs) == (
        sorted(chosen)
    )
    worst_chosen = min(hp.accuracy[key] for key in chosen)
    assert all(hp.accuracy[key] <= worst_chosen for key in hp.accuracy if key not in chosen)
    d = model.adapter.head_dim
    for layer in vec.layers:
        for head in range(model.adapter.n_heads):
            part = vec[layer][head * d : (head + 1) * d]
            if (layer, head) in chosen:
                assert torch.equal(part, hp.directions[(layer, head)])
            else:
                assert not bool(part.any())
    loaded = sl.SteeringVector.load(vec.save(tmp_path / "iti.safetensors"))
    assert loaded.metadata["heads"] == vec.metadata["heads"]
    base = model.logits(["the cat sat"])
    assert not torch.allclose(model.logits(["the cat sat"], steering=loaded, strength=4.0), base)


def test_expert_attribution_counts_routing_and_its_router_vector_moves_it() -> None:
    model = tiny_model("olmoe")
    att = sl.expert_attribution(model, POS, NEG, layers=[1])
    logits = model.activations(POS, layers=[1], site="router", positions="all")[1]
    flat = torch.cat(logits)
    top = flat.topk(2, dim=-1).indices
    want = torch.stack([(top == e).any(-1).double().mean() for e in range(4)]).float()
    torch.testing.assert_close(att.positive[1], want)
    torch.testing.assert_close(att.logits_positive[1], flat.mean(0))
    vec = att.router_vector(top=1)
    favoured = int(att.difference[1].abs().argmax())
    assert vec.site == "router" and int(vec[1].nonzero().flatten()) == favoured
    # steering the negative prompts with it moves their routing of that expert towards the
    # positive prompts' frequency
    steered = sl.expert_attribution(model, POS, NEG, layers=[1])  # unchanged without steering
    assert torch.equal(steered.negative[1], att.negative[1])
    with model.steer(vec, strength=3.0):
        after = sl.expert_attribution(model, POS, NEG, layers=[1])
    sign = 1.0 if float(att.difference[1][favoured]) > 0 else -1.0
    moved = sign * float(after.negative[1][favoured] - att.negative[1][favoured])
    assert moved > 0.05, moved
