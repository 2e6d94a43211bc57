"""Trained steering vectors (BiPO preference, likelihood): gradients against finite differences,
weights untouched, determinism, interrupts, data forms, and a measured behaviour shift."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.data import ContrastDataset
from steerlab.testing import (
    MOE_ARCHITECTURES,
    TINY_ARCHITECTURES,
    hook_count,
    tiny_hf_model,
    tiny_model,
    tiny_tokenizer,
)
from steerlab.training import PreferenceItem, data_hash

SUBJECTS = (
    "the cat|the dog|my house|the city|her song|his car|the book|our food|the film|their road|"
    "the sky|the water|this day|your work|the child|the tree"
).split("|")
# a synthetic preference: after "<subject> was/is" prefer " good" to " bad"
ITEMS = [
    {"prompt": f"{s} {v}", "chosen": " good", "rejected": " bad"}
    for s in SUBJECTS
    for v in ("was", "is")
]
TRAIN, HELD_OUT = ITEMS[:20], ITEMS[20:]
SMALL = ITEMS[:4]


def _margin(model: sl.SteeredModel, vec: sl.SteeringVector | None, strength: float) -> float:
    """Mean over held-out items of log p(chosen) − log p(rejected) (single-token answers)."""
    prompts = [i["prompt"] for i in HELD_OUT]
    logits = model.next_token_logits(
        prompts, steering=vec, strength=None if vec is None else strength
    )
    logp = logits.log_softmax(dim=-1)
    good, bad = (
        model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" good", " bad")
    )
    return float((logp[:, good] - logp[:, bad]).mean())


@pytest.mark.parametrize("objective", ["preference", "likelihood"])
def test_training_moves_held_out_preference_both_ways(objective: str) -> None:
    model = tiny_model("llama")
    vec = sl.train_vector(model, TRAIN, layer=1, objective=objective, steps=20, lr=0.08)
    base, plus, minus = _margin(model, None, 0), _margin(model, vec, 1.0), _margin(model, vec, -1.0)
    # measured: base 0.065; preference +v 4.67, -v -4.64 (loss 1.386 -> 0.990); likelihood
    # +v 4.07, -v -3.83 (loss 6.09 -> 3.30)
    assert abs(base) < 0.2
    assert plus - base > 3.0, (base, plus)
    assert base - minus > 3.0, (base, minus)
    curve = vec.metadata["loss_curve"]
    assert len(curve) == 20 and curve[-1] < curve[0] - 0.1


@pytest.mark.parametrize("objective", ["preference", "likelihood"])
def test_gradient_matches_finite_differences(objective: str) -> None:
    model = sl.wrap(tiny_hf_model("llama").double(), tiny_tokenizer())
    gen = torch.Generator().manual_seed(3)
    v = (0.5 * torch.randn(model.d_model, generator=gen, dtype=torch.float64)).requires_grad_()
    kwargs = {"layer": 1, "objective": objective, "beta": 0.5, "penalty": 0.01}
    loss = sl.training_loss(model, SMALL, v, **kwargs)
    (grad,) = torch.autograd.grad(loss, v)
    eps = 1e-3
    for _ in range(3):
        u = torch.randn(model.d_model, generator=gen, dtype=torch.float64)
        u = u / u.norm()
        with torch.no_grad():
            up = float(sl.training_loss(model, SMALL, v + eps * u, **kwargs))
            down = float(sl.training_loss(model, SMALL, v - eps * u, **kwargs))
        fd, analytic = (up - down) / (2 * eps), float(grad @ u)
        # the add operator's constants are float32, hence 2e-3 and not 1e-8 (measured relative
        # errors 1.5e-5 to 7e-4)
        assert abs(fd - analytic) <= 2e-3 * abs(analytic) + 1e-6, (fd, analytic)
        assert abs(analytic) > 1e-3  # a direction the loss actually depends on


class _HeadSizes:
    """Element counts of every ``lm_head`` output, and a switch that makes the model compute
    the logits of every position (the implementation before ``logits_to_keep``)."""

    def __init__(self, model: sl.SteeredModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self.full = False
        model.adapter.unembed.register_forward_hook(
            lambda module, args, out: self.sizes.append(out.numel())
        )
        original = model.hf_model.forward

        def forward(*args: Any, logits_to_keep: Any = 0, **kwargs: Any) -> Any:
            keep = 0 if self.full else logits_to_keep
            return original(*args, logits_to_keep=keep, **kwargs)

        monkeypatch.setattr(model.hf_model, "forward", forward)

    def run(self, full: bool, fn: Any) -> tuple[Any, int]:
        self.full, self.sizes = full, []
        out = fn()
        return out, max(self.sizes)


# prompts of different lengths and completions of one to four tokens: the gathered positions
# must line up per row under left padding
UNEVEN = [
    {"prompt": "the cat sat on the mat and then it was", "chosen": " good", "rejected": " bad"},
    {"prompt": "a dog", "chosen": " very good indeed", "rejected": " bad"},
    {"prompt": "my house is", "chosen": " fine", "rejected": " not fine at all"},
]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_loss_and_gradient_equal_full_logits_with_a_smaller_head(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float64, except where transformers 5 cannot: Gemma 2's (the soft-capped head) float64
    # attention gives NaN under left padding with either head, and the mixture-of-experts
    # grouped matmul takes no float64; those are compared in float32
    exact = arch != "gemma2" and arch not in MOE_ARCHITECTURES
    hf = tiny_hf_model(arch)
    model = sl.wrap(hf.double() if exact else hf, tiny_tokenizer())
    takes = "logits_to_keep" in inspect.signature(model.hf_model.forward).parameters
    heads = _HeadSizes(model, monkeypatch)
    v = 0.5 * torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    v = v.double() if exact else v
    rel = 1e-10 if exact else 1e-5

    def loss_and_grad() -> tuple[float, torch.Tensor]:
        x = v.clone().requires_grad_()
        loss = sl.training_loss(model, UNEVEN, x, layer=1, beta=0.5)
        (grad,) = torch.autograd.grad(loss, x)
        return float(loss.detach()), grad

    (loss, grad), kept = heads.run(False, loss_and_grad)
    (ref_loss, ref_grad), full = heads.run(True, loss_and_grad)
    assert loss == pytest.approx(ref_loss, rel=rel, abs=1e-12)
    assert torch.allclose(
        grad, ref_grad, rtol=10 * rel, atol=10 * rel * float(ref_grad.abs().max())
    )
    assert float(grad.norm()) > 1e-4  # the loss depends on v here
    # tiny_tokenizer: prompts of 10, 2 and 3 tokens; rejected completions of 1, 1 and 4. The
    # largest head output: 3 rows x (longest completion 4 + 1) positions, not x 11 (the widest
    # prompt + completion)
    vocab = model.adapter.unembed.weight.shape[0]
    # (a model whose forward has no logits_to_keep, such as OPT or GPT-J before transformers 5,
    # is given every position: the same loss, no saving)
    narrow = 3 * 5 * vocab if takes else 3 * 11 * vocab
    assert (kept, full) == (narrow, 3 * 11 * vocab), (kept, full)


def test_trained_vector_and_intervention_equal_full_logits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = sl.wrap(tiny_hf_model("llama").double(), tiny_tokenizer())
    heads = _HeadSizes(model, monkeypatch)
    for objective in ("preference", "likelihood"):

        def train(objective: str = objective) -> sl.SteeringVector:
            return sl.train_vector(
                model, UNEVEN, layer=1, objective=objective, steps=4, lr=0.05, batch_size=2
            )

        (vec, kept), (ref, full) = heads.run(False, train), heads.run(True, train)
        assert kept < full
        assert torch.allclose(vec[1].double(), ref[1].double(), rtol=1e-6, atol=1e-9)
        assert float(vec[1].norm()) > 1e-3  # it moved
        curve, ref_curve = vec.metadata["loss_curve"], ref.metadata["loss_curve"]
        assert curve == pytest.approx(ref_curve, rel=1e-9)

    def intervene() -> sl.SteeringVector:
        return sl.train_intervention(model, UNEVEN, layer=1, rank=2, steps=3, lr=0.05)

    (reft, kept), (ref_reft, full) = heads.run(False, intervene), heads.run(True, intervene)
    assert kept < full
    for key, value in reft.extras.items():
        assert torch.allclose(value[1].double(), ref_reft.extras[key][1].double(), atol=1e-8), key
    assert reft.metadata["loss_curve"] == pytest.approx(ref_reft.metadata["loss_curve"], rel=1e-9)


def test_weights_untouched_and_only_the_vector_gets_a_gradient() -> None:
    model = tiny_model("llama")
    before = {k: t.clone() for k, t in model.hf_model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.hf_model.named_parameters()}
    vec = sl.train_vector(model, SMALL, layer=1, steps=3, lr=0.1)
    after = model.hf_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a weight changed"
    assert all(p.grad is None for p in model.hf_model.parameters())
    assert {k: p.requires_grad for k, p in model.hf_model.named_parameters()} == flags
    assert hook_count(model.hf_model) == 0
    # a frozen model (no weight needs a gradient) trains to the identical vector
    frozen = tiny_model("llama")
    frozen.hf_model.requires_grad_(False)
    again = sl.train_vector(frozen, SMALL, layer=1, steps=3, lr=0.1)
    assert torch.equal(again[1], vec[1])


def test_same_seed_same_vector_and_another_seed_another() -> None:
    model = tiny_model("gpt2")
    kwargs = {"layer": 1, "steps": 2, "lr": 0.05, "batch_size": 2, "objective": "likelihood"}
    a = sl.train_vector(model, TRAIN[:6], seed=5, **kwargs)
    b = sl.train_vector(model, TRAIN[:6], seed=5, **kwargs)
    c = sl.train_vector(model, TRAIN[:6], seed=6, **kwargs)
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])  # another mini-batch order


def test_metadata_and_file_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    vec = sl.train_vector(model, SMALL, layer=-2, objective="likelihood", steps=3, lr=0.05)
    meta = vec.metadata
    assert vec.layers == (1,)
    assert (meta["method"], meta["objective"], meta["steps"], meta["lr"]) == (
        "trained",
        "likelihood",
        3,
        0.05,
    )
    assert meta["final_loss"] == meta["loss_curve"][-1] and meta["interrupted"] is False
    assert meta["data_hash"] == data_hash([PreferenceItem(**i) for i in SMALL])
    assert meta["data_hash"] != data_hash([PreferenceItem(**i) for i in SMALL[::-1]])
    loaded = sl.SteeringVector.load(vec.save(tmp_path / "v.safetensors"))
    assert torch.equal(loaded[1], vec[1]) and loaded.metadata["loss_curve"] == meta["loss_curve"]
    # the learned norm is the dose: strength 1 is the trained edit, -1 its opposite
    plus = model.logits(["the cat was"], steering=vec)
    assert torch.allclose(plus, model.logits(["the cat was"], steering=vec.scaled(-1), strength=-1))


def test_interrupt_from_the_progress_callback_returns_the_vector_so_far() -> None:
    model = tiny_model("llama")

    def stop_at_three(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    cut = sl.train_vector(model, TRAIN, layer=1, steps=10, lr=0.05, progress=stop_at_three)
    three = sl.train_vector(model, TRAIN, layer=1, steps=3, lr=0.05)
    assert cut.metadata["interrupted"] is True and cut.metadata["steps"] == 3
    assert cut.metadata["steps_requested"] == 10
    assert torch.equal(cut[1], three[1])
    assert hook_count(model.hf_model) == 0


def test_interrupt_inside_a_forward_pass_discards_the_half_step() -> None:
    model = tiny_model("llama")
    calls = {"n": 0}

    def hook(module, args, output):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:  # likelihood: one forward per step, so this is step 5's
            raise KeyboardInterrupt

    handle = model.hf_model.lm_head.register_forward_hook(hook)
    try:
        cut = sl.train_vector(model, TRAIN, layer=1, objective="likelihood", steps=10, lr=0.05)
    finally:
        handle.remove()
    four = sl.train_vector(model, TRAIN, layer=1, objective="likelihood", steps=4, lr=0.05)
    assert cut.metadata["interrupted"] is True and cut.metadata["steps"] == 4
    assert torch.equal(cut[1], four[1])
    assert hook_count(model.hf_model) == 0


def test_every_data_form_gives_the_same_items(tmp_path) -> None:  # type: ignore[no-untyped-def]
    want = [PreferenceItem("the film was", " good", " bad")]
    assert (
        sl.preference_items([{"prompt": "the film was", "chosen": " good", "rejected": " bad"}])
        == want
    )
    assert sl.preference_items(want) == want
    paired = ContrastDataset(
        name="p", positive=("the film was good",), negative=("the film was bad",), paired=True
    )
    assert sl.preference_items(paired) == want
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"prompt": "the film was", "chosen": " good", "rejected": " bad"}) + "\n\n"
    )
    assert sl.preference_items(path) == want and sl.preference_items(str(path)) == want
    ab = {
        "question": "Agree?\n\nChoices:\n (A) Yes\n (B) No",
        "answer_matching_behavior": "(B)",
        "answer_not_matching_behavior": "(A)",
    }
    caa_file = tmp_path / "ab.json"
    caa_file.write_text(json.dumps([ab]))
    expected = [PreferenceItem("Agree?\n\nChoices:\n (A) Yes\n (B) No\n\nAnswer:", " (B)", " (A)")]
    assert sl.preference_items([ab]) == expected
    assert sl.preference_items(caa_file) == expected
    assert sl.preference_items(sl.data.load_caa(caa_file)) == expected


def test_bad_input_is_a_named_error_and_leaves_nothing() -> None:
    model = tiny_model("llama")
    bad = [
        ([{"prompt": "a", "chosen": " b"}], {}, sl.DataError, "item 0.*rejected"),
        ([{"prompt": "a", "chosen": "", "rejected": " c"}], {}, sl.DataError, "chosen"),
        (ContrastDataset(name="u", positive=("x",), negative=("y",)), {}, sl.DataError, "unpaired"),
        (SMALL, {"objective": "dpo"}, sl.InvalidInputError, "objective"),
        (SMALL, {"steps": 0}, sl.InvalidInputError, "steps"),
        (SMALL, {"lr": -1.0}, sl.InvalidInputError, "lr"),
        (SMALL, {"layer": 7}, sl.LayerIndexError, "layer 7"),
        (SMALL, {"positions": "after:x"}, sl.InvalidInputError, "positions"),
        (SMALL, {"progress": 3}, sl.InvalidInputError, "progress"),
        (42, {}, sl.InvalidInputError, "data"),
    ]
    for data, kwargs, error, match in bad:
        options = {"layer": 1, "steps": 2, **kwargs}
        with pytest.raises(error, match=match):
            sl.train_vector(model, data, **options)  # type: ignore[arg-type]
    with pytest.raises(sl.InvalidInputError, match="rank"):
        sl.train_intervention(model, SMALL, layer=1, rank=0, steps=2)
    assert hook_count(model.hf_model) == 0


def test_completion_positions_steer_only_the_completion() -> None:
    """With positions="generated" only completion tokens are steered, as in generation: a
    single-token completion is predicted from the prompt's last token, so its likelihood does
    not move, while steering every position moves it."""
    model = tiny_model("llama")
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    opts = {"layer": 1, "objective": "likelihood", "penalty": 0.0}
    with torch.no_grad():
        unsteered = float(sl.training_loss(model, SMALL, torch.zeros(model.d_model), **opts))
        completion = float(sl.training_loss(model, SMALL, v, positions="generated", **opts))
        everywhere = float(sl.training_loss(model, SMALL, v, **opts))
    assert completion == unsteered
    assert abs(everywhere - unsteered) > 0.05, (everywhere, unsteered)


@pytest.mark.slow
def test_default_model_likelihood_vector_moves_held_out_sentiment(default_model: Any) -> None:
    model = default_model
    subjects = ["The movie", "My day", "The weather", "This book", "The food", "Her song"]
    subjects += ["The trip", "The game"]
    items = [
        {"prompt": f"{s} was really", "chosen": " wonderful", "rejected": " terrible"}
        for s in subjects
    ]
    train, held = items[:4], items[4:]
    vec = sl.train_vector(
        model, train, layer=10, objective="likelihood", steps=5, lr=0.2, batch_size=4
    )
    logp_ids = [
        model.tokenizer(w, add_special_tokens=False)["input_ids"][0]
        for w in (" wonderful", " terrible")
    ]

    def margin(strength: float | None) -> float:
        steering = None if strength is None else vec
        logits = model.next_token_logits(
            [i["prompt"] for i in held], steering=steering, strength=strength
        )
        logp = logits.log_softmax(-1)
        return float((logp[:, logp_ids[0]] - logp[:, logp_ids[1]]).mean())

    base, plus, minus = margin(None), margin(1.0), margin(-1.0)
    # measured: base 0.68, +v 4.95, -v -2.54; loss 6.80 -> 3.14 (20 s of CPU time)
    assert plus > base + 2.0 and minus < base - 1.5, (base, plus, minus)


def test_training_in_one_thread_leaves_other_threads_unsteered() -> None:
    import threading

    model = tiny_model("llama")
    prompts = ["the cat sat on the", "a dog ran"]
    want = model.logits(prompts)
    done = threading.Event()
    result: dict[str, Any] = {}

    def trainer() -> None:
        try:
            result["vec"] = sl.train_vector(model, TRAIN, layer=1, steps=4, lr=0.1)
        finally:
            done.set()

    thread = threading.Thread(target=trainer)
    thread.start()
    seen = 0
    while not done.is_set() or seen == 0:
        assert torch.equal(model.logits(prompts), want), "training steering leaked into a thread"
        seen += 1
    thread.join()
    assert seen >= 2 and result["vec"].metadata["steps"] == 4
    assert torch.equal(result["vec"][1], sl.train_vector(model, TRAIN, layer=1, steps=4, lr=0.1)[1])
