"""LoReFT: the operator against its formula on every architecture, per-row batches of mixed
ranks, the vector file, training (orthonormal R, likelihood up on held-out items) and the
server's torch engine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.operators import loreft_extras, loreft_matrices, operator_names
from steerlab.testing import hook_count, tiny_model

PROMPTS = ["the cat sat on the", "a dog", "i love the movie so much"]
LAYER = 1


def _loreft(d_model: int, rank: int, seed: int, layer: int = LAYER) -> sl.SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_model, rank, generator=gen))
    r, w, b = (
        q.T.contiguous(),
        torch.randn(rank, d_model, generator=gen) * 0.3,
        torch.randn(rank, generator=gen),
    )
    return sl.SteeringVector(
        {layer: torch.randn(d_model, generator=gen)}, extras=loreft_extras(r, w, b, layer)
    )


def _expected(h: torch.Tensor, vec: sl.SteeringVector, s: float) -> torch.Tensor:
    """``h + s·Rᵀ(W h + b − R h)`` written out directly, in float64."""
    r, w, b = (t.double() for t in loreft_matrices({k: v[LAYER] for k, v in vec.extras.items()}))
    h = h.double()
    return h + s * ((h @ w.T + b - h @ r.T) @ r)


def _hidden(model: sl.SteeredModel, **kwargs: Any) -> list[torch.Tensor]:
    return model.activations(PROMPTS, layers=[LAYER], positions="all", **kwargs)[LAYER]


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_loreft_formula_on_every_architecture(arch_model: sl.SteeredModel, strength: float) -> None:
    vec = _loreft(arch_model.d_model, 3, seed=1)
    base = _hidden(arch_model)
    steered = _hidden(arch_model, steering=sl.Steering(vec, strength=strength, op="loreft"))
    worst = 0.0
    for b, got in zip(base, steered, strict=True):
        want = _expected(b, vec, strength)
        worst = max(worst, float((got.double() - want).abs().max()))
        assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-5)
    assert float((torch.cat(steered) - torch.cat(base)).abs().max()) > 0.1  # it did something
    # at s = 1 the subspace coordinates are exactly W h + b
    if strength == 1.0:
        r, w, bias = loreft_matrices({k: v[LAYER] for k, v in vec.extras.items()})
        h, out = torch.cat(base).double(), torch.cat(steered).double()
        assert torch.allclose(out @ r.double().T, h @ w.double().T + bias.double(), atol=5e-5)


def test_per_row_batch_mixes_ranks_operators_and_unsteered_rows() -> None:
    model = tiny_model("llama")
    two, three = _loreft(model.d_model, 2, seed=2), _loreft(model.d_model, 3, seed=3)
    add = sl.SteeringVector({LAYER: torch.ones(model.d_model)})
    rows = [sl.Steering(two, op="loreft"), None, sl.Steering(three, strength=0.7, op="loreft")]
    mixed = _hidden(model, steering=rows)
    plain = _hidden(model)
    assert torch.equal(mixed[1], plain[1]), "an unsteered row must be bit-identical"
    assert torch.allclose(mixed[0].double(), _expected(plain[0], two, 1.0), atol=2e-5)
    assert torch.allclose(mixed[2].double(), _expected(plain[2], three, 0.7), atol=2e-5)
    logits = model.next_token_logits(PROMPTS, steering=[rows[0], sl.Steering(add), rows[2]])
    for i, row in enumerate([rows[0], sl.Steering(add), rows[2]]):
        assert torch.allclose(
            logits[i], model.next_token_logits([PROMPTS[i]], steering=row)[0], atol=1e-4
        )
    # generation: cache on = off, and batched = solo
    steering = sl.Steering(three, op="loreft", positions="generated")
    cached = model.generate_ids(PROMPTS, max_new_tokens=5, steering=steering)
    uncached = model.generate_ids(PROMPTS, max_new_tokens=5, steering=steering, use_cache=False)
    assert [c.tolist() for c in cached] == [u.tolist() for u in uncached]
    assert hook_count(model.hf_model) == 0


def test_vector_file_round_trip_is_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    vec = _loreft(model.d_model, 4, seed=4)
    loaded = sl.SteeringVector.load(vec.save(tmp_path / "reft.safetensors"))
    assert sorted(loaded.extras) == sorted(vec.extras)
    want = model.logits(PROMPTS, steering=vec, op="loreft")
    assert torch.equal(model.logits(PROMPTS, steering=loaded, op="loreft"), want)
    # select keeps the matrices of the chosen layer
    assert sorted(loaded.select([LAYER]).extras) == sorted(vec.extras)


def test_missing_matrices_are_a_clear_error() -> None:
    model = tiny_model("llama")
    plain = sl.SteeringVector({LAYER: torch.ones(model.d_model)})
    with pytest.raises(sl.VectorMismatchError, match="train_intervention"):
        model.logits(PROMPTS, steering=plain, op="loreft")
    broken = _loreft(model.d_model, 2, seed=5)
    extras = {k: v for k, v in broken.extras.items() if k != "loreft_w1"}
    with pytest.raises(sl.VectorMismatchError, match="loreft_w1"):
        model.logits(
            PROMPTS, steering=sl.SteeringVector(broken.directions, extras=extras), op="loreft"
        )
    with pytest.raises(sl.VectorMismatchError, match="rank"):
        loreft_extras(torch.eye(3), torch.eye(3)[:2], torch.zeros(2), 0)
    assert hook_count(model.hf_model) == 0


SUBJECTS = (
    "the cat|the dog|my house|the city|her song|his car|the book|our food|the film|the sky".split(
        "|"
    )
)
ITEMS = [{"prompt": f"{s} was", "chosen": " good", "rejected": " bad"} for s in SUBJECTS]


def test_train_intervention_learns_with_orthonormal_r_and_is_deterministic() -> None:
    model = tiny_model("llama")
    before = {k: t.clone() for k, t in model.hf_model.state_dict().items()}
    train, held = ITEMS[:7], ITEMS[7:]
    ref = sl.train_intervention(model, train, layer=LAYER, rank=2, steps=20, lr=0.1, seed=1)
    assert all(torch.equal(before[k], v) for k, v in model.hf_model.state_dict().items())
    assert all(p.grad is None for p in model.hf_model.parameters())
    r, w, b = loreft_matrices({k: v[LAYER] for k, v in ref.extras.items()})
    assert r.shape == w.shape == (2, model.d_model)
    assert float((w - r).norm()) > 0.05  # W moved away from the identity start W = R
    assert float((r @ r.T - torch.eye(2)).abs().max()) < 1e-5
    meta = ref.metadata
    assert (meta["method"], meta["objective"], meta["rank"], meta["steps"]) == (
        "loreft",
        "likelihood",
        2,
        20,
    )
    assert meta["loss_curve"][-1] < meta["loss_curve"][0] - 0.5
    assert torch.allclose(ref[LAYER], b @ r, atol=1e-6)  # the direction is Rᵀb
    # held-out: log p(" good") rises under the intervention
    prompts = [i["prompt"] for i in held]
    good = model.tokenizer(" good", add_special_tokens=False)["input_ids"][0]
    base = model.next_token_logits(prompts).log_softmax(-1)[:, good].mean()
    steered = model.next_token_logits(prompts, steering=ref, op="loreft").log_softmax(-1)[:, good]
    gain = float(steered.mean() - base)
    assert gain > 2.0, gain  # measured 3.0 (loss 5.16 -> 1.63)
    again = sl.train_intervention(model, train, layer=LAYER, rank=2, steps=20, lr=0.1, seed=1)
    assert all(torch.equal(again.extras[k][LAYER], ref.extras[k][LAYER]) for k in ref.extras)
    assert hook_count(model.hf_model) == 0


def test_served_by_the_torch_engine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from steerlab.server.app import create_app, serve_in_thread
    from steerlab.server.engine import TorchEngine

    model, reference = tiny_model("llama"), tiny_model("llama")
    vec = _loreft(model.d_model, 3, seed=6)
    engine = TorchEngine(model, max_batch=8, model_id="tiny-llama")
    engine.vectors.register("reft", vec)
    engine.vectors.register("plain", sl.SteeringVector({LAYER: torch.ones(model.d_model)}))
    jobs = [(p, s) for p in PROMPTS for s in (1.0, 0.5)]
    expected = [
        reference.tokenizer.decode(
            reference.generate_ids(
                p, max_new_tokens=6, steering=sl.Steering(vec, strength=s, op="loreft")
            )[0],
            skip_special_tokens=True,
        )
        for p, s in jobs
    ]
    with serve_in_thread(create_app(engine, max_tokens_cap=20)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def call(job: tuple[str, float]) -> str:
            steering = [{"vector": "reft", "strength": job[1], "op": "loreft"}]
            done = client.completions.create(
                model="default",
                prompt=job[0],
                max_tokens=6,
                temperature=0,
                extra_body={"steering": steering},
            )
            return str(done.choices[0].text)

        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(call, jobs))
        assert got == expected
        with pytest.raises(openai.BadRequestError, match="train_intervention"):
            client.completions.create(
                model="default",
                prompt="a",
                max_tokens=2,
                extra_body={"steering": [{"vector": "plain", "strength": 1.0, "op": "loreft"}]},
            )
        # every other operator on the LoReFT file: a 400 naming the field and the operator
        for op in [name for name in operator_names() if name != "loreft"]:
            entry: dict[str, Any] = {"vector": "reft", "strength": 1.0, "op": op}
            with pytest.raises(openai.BadRequestError) as caught:
                client.completions.create(
                    model="default", prompt="a", max_tokens=2, extra_body={"steering": [entry]}
                )
            message = caught.value.body["message"]
            assert message.startswith("steering[0].op: this vector is a LoReFT"), message
            assert f"op {op!r} would act on" in message, message


def test_intervention_gradient_matches_finite_differences() -> None:
    from steerlab.testing import tiny_hf_model, tiny_tokenizer

    model = sl.wrap(tiny_hf_model("llama").double(), tiny_tokenizer())
    gen = torch.Generator().manual_seed(8)
    d, rank = model.d_model, 2
    q, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
    params = [
        q.T.contiguous().requires_grad_(),
        (q.T + 0.3 * torch.randn(rank, d, generator=gen, dtype=torch.float64)).requires_grad_(),
        (0.5 * torch.randn(rank, generator=gen, dtype=torch.float64)).requires_grad_(),
    ]
    kwargs = {"layer": LAYER, "penalty": 0.01}
    loss = sl.intervention_loss(model, ITEMS[:3], tuple(params), **kwargs)  # type: ignore[arg-type]
    grads = torch.autograd.grad(loss, params)
    eps = 1e-3
    for which in range(3):
        u = torch.randn(params[which].shape, generator=gen, dtype=torch.float64)
        u = u / u.norm()

        def at(sign: float, which: int = which, u: torch.Tensor = u) -> float:
            moved = [
                p.detach() + (sign * eps * u if i == which else 0) for i, p in enumerate(params)
            ]
            with torch.no_grad():
                return float(sl.intervention_loss(model, ITEMS[:3], tuple(moved), **kwargs))  # type: ignore[arg-type]

        fd, analytic = (at(1.0) - at(-1.0)) / (2 * eps), float((grads[which] * u).sum())
        # the loreft operator runs in float32 inside the hook, hence 2e-3 and not 1e-8 (measured
        # relative errors: R 3e-4, W 1e-5, b 2e-4)
        assert abs(fd - analytic) <= 2e-3 * abs(analytic) + 2e-4, (which, fd, analytic)
        assert abs(analytic) > 1e-2, (which, analytic)
    # a trained LoReFT vector evaluates to the loss its training ended near
    ref = sl.train_intervention(
        tiny_model("llama"), ITEMS[:4], layer=LAYER, rank=2, steps=3, lr=0.1
    )
    with torch.no_grad():
        held = float(sl.intervention_loss(tiny_model("llama"), ITEMS[:4], ref, layer=LAYER))
    assert held < ref.metadata["loss_curve"][0]


# --- where the operator cannot run: refused, never degraded to adding Rᵀb ------------------------
def test_adding_a_loreft_vector_is_refused_unless_forced() -> None:
    model = tiny_model("llama")
    vec = _loreft(model.d_model, 2, seed=6)
    base = model.logits(PROMPTS)
    for op in (None, "add"):  # the default resolves to 'add' too
        with pytest.raises(sl.VectorMismatchError, match=r"LoReFT.*op='loreft'.*force=True"):
            model.logits(PROMPTS, steering=vec, op=op)
        with pytest.raises(sl.VectorMismatchError, match="LoReFT"):
            with model.steer(vec, op=op):
                pass
    assert hook_count(model.hf_model) == 0
    assert torch.equal(model.logits(PROMPTS), base)
    # force=True adds Rᵀb (strength 2) with a warning, exactly like a plain vector
    with pytest.warns(UserWarning, match="adding Rᵀb"), model.steer(vec, strength=2.0, force=True):
        forced = model.logits(PROMPTS)
    plain = sl.SteeringVector(vec.directions)
    assert torch.equal(forced, model.logits(PROMPTS, steering=plain, strength=2.0))
    assert not torch.allclose(forced, base)
    # op='loreft' is unchanged: the operator's formula, as in the tests above
    got = _hidden(model, steering=sl.Steering(vec, op="loreft"))
    for b, h in zip(_hidden(model), got, strict=True):
        assert torch.allclose(h.double(), _expected(b, vec, 1.0), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("op", [name for name in operator_names() if name not in ("add", "loreft")])
def test_every_other_operator_on_a_loreft_vector_is_refused_by_name(op: str) -> None:
    model = tiny_model("llama")
    vec = _loreft(model.d_model, 2, seed=6)
    base = model.logits(PROMPTS)
    with pytest.raises(sl.VectorMismatchError, match=rf"LoReFT.*op '{op}'.*op='loreft'"):
        model.logits(PROMPTS, steering=vec, op=op)
    with pytest.raises(sl.VectorMismatchError, match=rf"op '{op}'.*model.edit"):
        model.edit(sl.Steering(vec, op=op))
    assert hook_count(model.hf_model) == 0
    assert torch.equal(model.logits(PROMPTS), base)


def test_forced_ablate_acts_on_the_direction_with_a_warning() -> None:
    model = tiny_model("llama")
    vec = _loreft(model.d_model, 2, seed=6)
    with pytest.warns(UserWarning, match="applying op 'ablate' to Rᵀb"):
        with model.steer(vec, op="ablate", force=True):
            forced = model.logits(PROMPTS)
    plain = sl.SteeringVector(vec.directions)
    assert torch.equal(forced, model.logits(PROMPTS, steering=plain, op="ablate"))
    assert not torch.allclose(forced, model.logits(PROMPTS))


def test_edit_refuses_adding_and_applies_op_loreft_exactly() -> None:
    model = tiny_model("llama")
    vec = _loreft(model.d_model, 2, seed=7)
    for steering in (vec, sl.Steering(vec), sl.Steering(vec, op="add")):
        with pytest.raises(sl.VectorMismatchError, match=r"LoReFT.*op='loreft'"):
            model.edit(steering)
    assert hook_count(model.hf_model) == 0
    with model.edit(sl.Steering(vec, op="loreft")) as edited:
        got = edited.logits(PROMPTS)
    assert torch.equal(got, model.logits(PROMPTS, steering=vec, op="loreft"))
    assert hook_count(model.hf_model) == 0


def test_bake_refuses_a_loreft_vector_and_writes_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    vec = _loreft(model.d_model, 2, seed=8)
    out = tmp_path / "baked"
    edited = model.edit(sl.Steering(vec, op="loreft"))
    for model_, steering in [
        (model, vec),
        (model, sl.Steering(vec, op="add")),
        (model, sl.Steering(vec, op="loreft")),
        (edited, None),  # the LoReFT edit of an EditedModel
    ]:
        with pytest.raises(sl.BakeError, match=r"LoReFT.*cannot be baked.*op='loreft'"):
            sl.bake(model_, steering, out)
        assert not out.exists()
        assert list(tmp_path.iterdir()) == []
    assert hook_count(model.hf_model) == 0


def test_gguf_export_refuses_a_loreft_vector_and_writes_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    vec = _loreft(16, 2, seed=9, layer=2)
    out = tmp_path / "reft.gguf"
    for steering in (vec, sl.Steering(vec), sl.Steering(vec, op="loreft")):
        with pytest.raises(sl.InvalidInputError, match=r"LoReFT.*llama.cpp.*op='loreft'"):
            sl.export_gguf(steering, out)
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    # the same direction without the matrices exports as before
    back = sl.read_gguf(sl.export_gguf(sl.SteeringVector(vec.directions), out, strength=2.0))
    assert torch.equal(back[2], vec[2] * 2.0)
