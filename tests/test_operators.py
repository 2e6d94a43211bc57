"""Steering operators: each formula checked on activations read back, on every architecture;
cache on = off and batched = solo for every operator; per-row mixing of operators."""

from __future__ import annotations

import math

import pytest
import torch

import steerlab as sl
from steerlab.interventions import RowSteering
from steerlab.operators import OPERATORS, angular_plane, get_operator
from steerlab.testing import hook_count, tiny_model

PROMPTS = ["the cat sat on the", "a dog", "i love the movie so much"]
LAYER = 1
OPS = ("add", "add_norm", "clamp", "cap", "ablate", "rotate", "affine")
STRENGTH = {
    "add": 2.5,
    "add_norm": 2.5,
    "clamp": 1.5,
    "cap": 0.2,
    "ablate": 7.0,
    "rotate": 60.0,
    "affine": 0.5,
}


def _vector(model: sl.SteeredModel, seed: int = 1) -> sl.SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    d = model.d_model
    return sl.SteeringVector(
        {LAYER: torch.randn(d, generator=gen)},
        extras={
            "reference": {LAYER: torch.randn(d, generator=gen)},
            "plane": {LAYER: torch.randn(d, generator=gen)},
        },
    )


def _hidden(model: sl.SteeredModel, **kwargs: object) -> list[torch.Tensor]:
    return model.activations(PROMPTS, layers=[LAYER], positions="all", **kwargs)[LAYER]


def _expected(op: str, h: torch.Tensor, vec: sl.SteeringVector, s: float) -> torch.Tensor:
    """Each formula written out independently of steerlab.operators, in float64."""
    h = h.double()
    v = vec[LAYER].double()
    u = v / v.norm()
    along = h @ u
    if op == "add":
        return h + s * v
    if op == "add_norm":
        added = h + s * v
        return added * (h.norm(dim=-1) / added.norm(dim=-1))[:, None]
    if op == "clamp":
        return h + (s * v.norm() - along)[:, None] * u
    if op == "cap":
        return h - torch.clamp(along - s * v.norm(), min=0)[:, None] * u
    if op == "ablate":
        return h - along[:, None] * u
    if op == "rotate":
        p = vec.extras["plane"][LAYER].double()
        b2 = p - (p @ u) * u
        b2 = b2 / b2.norm()
        a, b = h @ u, h @ b2
        r = torch.sqrt(a * a + b * b)
        t = math.radians(s)
        inplane = math.cos(t) * u + math.sin(t) * b2
        return h - a[:, None] * u - b[:, None] * b2 + r[:, None] * inplane
    if op == "affine":
        mu = vec.extras["reference"][LAYER].double()
        return h - ((h - mu) @ u)[:, None] * u + s * v
    raise AssertionError(op)


def test_every_contract_operator_is_registered() -> None:
    assert set(OPS) <= set(OPERATORS)


@pytest.mark.parametrize("op", OPS)
def test_operator_formula_on_activations_read_back(arch_model: sl.SteeredModel, op: str) -> None:
    vec = _vector(arch_model)
    base = _hidden(arch_model)
    s = STRENGTH[op]
    if op == "cap":  # a cap in the middle of the tokens' components, so both sides are hit
        along = (torch.cat(base) @ (vec[LAYER] / vec[LAYER].norm())).sort().values
        middle = len(along) // 2
        s = float(along[middle - 1] + along[middle]) / 2 / float(vec[LAYER].norm())
    steered = _hidden(arch_model, steering=sl.Steering(vec, strength=s, op=op))
    for b, got in zip(base, steered, strict=True):
        want = _expected(op, b, vec, s)
        assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-5), (
            op,
            (got - want).abs().max(),
        )
    # the defining property of each operator, measured on the steered activations
    u = vec[LAYER] / vec[LAYER].norm()
    flat_b, flat_s = torch.cat(base), torch.cat(steered)
    if op in ("add_norm", "rotate"):
        assert torch.allclose(flat_s.norm(dim=-1), flat_b.norm(dim=-1), rtol=1e-5)
    if op == "clamp":
        assert torch.allclose(
            flat_s @ u, torch.full((len(flat_s),), s * float(vec[LAYER].norm())), atol=1e-4
        )
    if op == "cap":
        limit = s * float(vec[LAYER].norm())
        assert bool(((flat_s @ u) <= limit + 1e-4).all())
        below = (flat_b @ u) <= limit
        assert below.any() and (~below).any(), "the test must hit both sides of the cap"
        assert torch.equal(flat_s[below], flat_b[below]), "tokens below the cap must be untouched"
    if op == "ablate":
        assert float((flat_s @ u).abs().max()) < 1e-4


def test_layers_below_untouched_and_hooks_removed(llama: sl.SteeredModel) -> None:
    vec = _vector(llama)
    before = llama.activations(PROMPTS, layers=[0])[0]
    for op in OPS:
        with llama.steer(vec, strength=STRENGTH[op], op=op):
            assert torch.equal(llama.activations(PROMPTS, layers=[0])[0], before)
        assert hook_count(llama.hf_model) == 0


@pytest.mark.parametrize("op", OPS)
def test_cache_on_equals_off_and_batched_equals_solo(op: str) -> None:
    model = tiny_model("llama")
    steering = sl.Steering(_vector(model), strength=STRENGTH[op], op=op, positions="generated")
    cached = model.generate_ids(PROMPTS, max_new_tokens=6, steering=steering)
    uncached = model.generate_ids(PROMPTS, max_new_tokens=6, steering=steering, use_cache=False)
    assert [c.tolist() for c in cached] == [u.tolist() for u in uncached]
    solo = [model.generate_ids([p], max_new_tokens=6, steering=steering)[0] for p in PROMPTS]
    assert [c.tolist() for c in cached] == [s.tolist() for s in solo]
    unsteered = model.generate_ids(PROMPTS, max_new_tokens=6)
    assert [c.tolist() for c in cached] != [u.tolist() for u in unsteered]


def test_per_row_mixing_of_operators_in_one_batch(llama: sl.SteeredModel) -> None:
    vec = _vector(llama)
    ops = ["clamp", None, "rotate"]
    rows = [None if op is None else sl.Steering(vec, strength=STRENGTH[op], op=op) for op in ops]
    mixed = llama.activations(PROMPTS, layers=[LAYER], positions="all", steering=rows)[LAYER]
    plain = _hidden(llama)
    for i, op in enumerate(ops):
        if op is None:
            assert torch.equal(mixed[i], plain[i]), "an unsteered row must be bit-identical"
            continue
        want = _expected(op, plain[i], vec, STRENGTH[op])
        assert torch.allclose(mixed[i].double(), want, atol=2e-5)
    logits = llama.next_token_logits(PROMPTS, steering=rows)
    for i, row in enumerate(rows):
        solo = llama.next_token_logits([PROMPTS[i]], steering=row)
        assert torch.allclose(logits[i], solo[0], atol=1e-4)


def test_row_steering_refuses_a_batch_of_another_size(llama: sl.SteeredModel) -> None:
    vec = _vector(llama)
    with pytest.raises(sl.InvalidInputError, match="rows"):
        handle = llama.add_interventions([RowSteering((sl.Steering(vec, op="clamp"),))])
        try:
            llama.logits(PROMPTS)
        finally:
            handle.remove()
    assert hook_count(llama.hf_model) == 0


def test_op_on_every_entry_point(llama: sl.SteeredModel) -> None:
    vec = _vector(llama)
    want = llama.logits(PROMPTS, steering=sl.Steering(vec, strength=1.5, op="clamp"))
    assert torch.equal(llama.logits(PROMPTS, steering=vec, strength=1.5, op="clamp"), want)
    with llama.steer(vec, strength=1.5, op="clamp"):
        assert torch.equal(llama.logits(PROMPTS), want)
    nxt = llama.next_token_logits(PROMPTS, steering=vec, strength=1.5, op="clamp")
    assert torch.allclose(nxt, want[:, -1], atol=1e-5)
    acts = llama.activations(PROMPTS, layers=[2], steering=vec, strength=1.5, op="clamp")
    ref = llama.activations(
        PROMPTS, layers=[2], steering=sl.Steering(vec, strength=1.5, op="clamp")
    )
    assert torch.equal(acts[2], ref[2])
    texts = llama.generate(PROMPTS, max_new_tokens=3, steering=vec, strength=1.5, op="clamp")
    assert len(texts) == 3


def test_project_out_vectors_ablate_by_default(llama: sl.SteeredModel) -> None:
    vec = _vector(llama).with_metadata(operation="project_out")
    assert sl.Steering(vec).resolved_op == "ablate"
    u = vec[LAYER] / vec[LAYER].norm()
    steered = torch.cat(_hidden(llama, steering=vec))
    assert float((steered @ u).abs().max()) < 1e-4
    assert sl.Steering(vec, op="add").resolved_op == "add"


def test_bad_op_and_missing_extras_are_clear_errors(llama: sl.SteeredModel) -> None:
    bare = sl.SteeringVector({LAYER: torch.ones(llama.d_model)})
    with pytest.raises(sl.InvalidInputError, match="unknown op 'shove'"):
        sl.Steering(bare, op="shove")
    with pytest.raises(sl.InvalidInputError, match="unknown op"):
        llama.logits(PROMPTS, steering=bare, op="shove")
    for op, word in (("affine", "reference mean"), ("rotate", "rotation plane")):
        with pytest.raises(sl.VectorMismatchError, match=word):
            llama.logits(PROMPTS, steering=bare, op=op)
    with pytest.raises(sl.VectorMismatchError, match="non-zero"):
        llama.logits(PROMPTS, steering=bare * 0.0, op="clamp")
    assert hook_count(llama.hf_model) == 0


def test_user_operator_registered_by_a_class(llama: sl.SteeredModel) -> None:
    @sl.register_operator("negate_along")
    class NegateAlong(sl.Operator):
        """``h − 2(h·u)u``: reflects the component along ``u``."""

        def params(self, direction, strength, extras):  # type: ignore[no-untyped-def]
            return {"u": direction / direction.norm()}

        def apply(self, hidden, p):  # type: ignore[no-untyped-def]
            return hidden - 2 * (hidden * p["u"]).sum(-1, keepdim=True) * p["u"]

    try:
        vec = _vector(llama)
        u = vec[LAYER] / vec[LAYER].norm()
        base = torch.cat(_hidden(llama))
        got = torch.cat(_hidden(llama, steering=vec, op="negate_along"))
        assert torch.allclose(got @ u, -(base @ u), atol=1e-5)
    finally:
        del sl.OPERATORS["negate_along"]


def test_mean_diff_records_reference_and_plane(llama: sl.SteeredModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pos, neg = ["i love it", "so happy today"], ["i hate it", "so sad today"]
    vec = sl.compute_vector(llama, pos, neg, layers=[1, 2])
    acts = llama.activations(neg, layers=[1, 2])
    assert torch.allclose(vec.extras["reference"][1], acts[1].mean(dim=0), atol=1e-6)
    all_pos = llama.activations(pos, layers=list(range(llama.n_layers)))
    all_neg = llama.activations(neg, layers=list(range(llama.n_layers)))
    plane = angular_plane(dict(all_pos), dict(all_neg))
    (stored,) = vec.extras["plane"].values()
    assert torch.allclose(stored, plane, atol=1e-5)
    back = sl.SteeringVector.load(vec.save(tmp_path / "v.safetensors"))
    assert torch.equal(back.extras["reference"][2], vec.extras["reference"][2])
    assert torch.equal(back.select([2]).extras["plane"][1], stored)
    # rotate and affine run straight from the computed vector
    for op in ("rotate", "affine"):
        llama.logits(["the cat"], steering=back.select([2]), strength=30.0, op=op)


def test_old_files_without_extras_still_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    vec = sl.SteeringVector({0: torch.ones(4)}, metadata={"method": "manual"})
    back = sl.SteeringVector.load(vec.save(tmp_path / "v.safetensors"))
    assert back.extras == {} and back.layers == (0,)


def test_operator_edit_reference_matches_hook(llama: sl.SteeredModel) -> None:
    vec = _vector(llama)
    base = torch.cat(_hidden(llama))
    for op in OPS:
        extras = {k: v[LAYER] for k, v in vec.extras.items()}
        ref = get_operator(op).edit(base, vec[LAYER], STRENGTH[op], extras)
        got = torch.cat(_hidden(llama, steering=vec, strength=STRENGTH[op], op=op))
        assert torch.allclose(got, ref, atol=1e-5), op


def test_sweep_and_tune_compare_operators_on_the_same_data(llama: sl.SteeredModel) -> None:
    from steerlab.evaluation import kl_task
    from steerlab.sweeps import compare_operators, operator_table

    vec = _vector(llama)
    task = kl_task(PROMPTS)
    results = compare_operators(
        llama,
        vec,
        ops=["add", "clamp", "add_norm"],
        strengths=[1.0, 2.0],
        behaviour=task,
        progress=False,
    )
    assert [r.op for r in results.values()] == ["add", "clamp", "add_norm"]
    # each operator's sweep is that operator: the clamp column equals a direct clamp run
    base = llama.next_token_logits(PROMPTS)
    direct = llama.next_token_logits(PROMPTS, steering=vec, strength=2.0, op="clamp")
    want = task.score(direct, base).double().mean()
    assert results["clamp"].point(LAYER, 2.0).behaviour == pytest.approx(float(want), abs=1e-5)
    assert (
        results["add"].point(LAYER, 2.0).behaviour != results["clamp"].point(LAYER, 2.0).behaviour
    )
    assert "clamp" in operator_table(results, max_damage=100.0)
    tuned = sl.tune(
        llama,
        "sentiment",
        layers=[1],
        strengths=[1.0],
        op=["add", "clamp"],
        n_examples=1,
        max_new_tokens=3,
        progress=False,
    )
    assert set(tuned.op_sweeps) == {"add", "clamp"} and tuned.op in ("add", "clamp")
    assert "operators compared" in tuned.summary()
    assert tuned.to_dict()["recommended"]["op"] == tuned.op


def test_tune_with_rotate_computes_the_plane_itself(llama: sl.SteeredModel) -> None:
    # layer 1 of 3: a plain compute_vector stops there and stores no plane; tune asks for it
    tuned = sl.tune(
        llama,
        "sentiment",
        layers=[1],
        strengths=[30.0],
        op="rotate",
        n_examples=1,
        max_new_tokens=2,
        progress=False,
    )
    assert set(tuned.vector.extras["plane"]) == {1} and tuned.op == "rotate"


def test_cli_takes_op_positions_and_when(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from steerlab.cli import app

    out = CliRunner().invoke(app, ["generate", "--help"]).output
    assert "--op" in out and "--when" in out and "outside:A,B" in out
    out = CliRunner().invoke(app, ["sweep", "--help"]).output
    assert "--op" in out
    bad = CliRunner().invoke(app, ["sweep", "--op", "shove", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "shove" in bad.output
