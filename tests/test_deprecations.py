"""The 0.2 spelling of steering (one ``Steering`` value) and the 0.1 spellings it replaces.

Old spellings must keep working for one release, with a ``SteerlabDeprecationWarning`` that
names the new one, and must give bit-identical numbers. Every test here runs with those warnings
turned into errors, so a new spelling that still warns somewhere inside steerlab fails.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import steerlab as sl
from steerlab.deprecation import SteerlabDeprecationWarning, warn_deprecated
from steerlab.evaluation import evaluate, kl_task
from steerlab.interventions import normalize_steering, steering_with
from steerlab.testing import tiny_model
from steerlab.vllm import extra_args, per_row_steering

pytestmark = pytest.mark.filterwarnings("error::steerlab.deprecation.SteerlabDeprecationWarning")

PROMPTS = ["the cat sat on the", "a dog ran"]


def _vector(model: sl.SteeredModel, layer: int = 1, seed: int = 0) -> sl.SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return sl.SteeringVector({layer: torch.randn(model.d_model, generator=gen)})


def test_the_warning_names_the_new_spelling_and_points_at_the_caller() -> None:
    with pytest.warns(SteerlabDeprecationWarning) as caught:
        warn_deprecated("f(x=...)", "f(y=...)")
    assert issubclass(SteerlabDeprecationWarning, DeprecationWarning)
    assert str(caught[0].message) == (
        "f(x=...) is deprecated and will be removed in steerlab 0.3; write f(y=...) instead"
    )
    # the user's line, not steerlab's: the walk skips every frame inside the package
    assert caught[0].filename == __file__


def test_an_explicit_all_is_not_overwritten_by_a_calls_positions() -> None:
    # 0.1 used "all" as the "not given" marker, so positions="last" replaced an explicit "all"
    vec = sl.SteeringVector({0: torch.ones(4)})
    [explicit] = normalize_steering(sl.Steering(vec, positions="all"), positions="last")
    [default] = normalize_steering(sl.Steering(vec), positions="last")
    assert (explicit.positions, default.positions) == ("all", "last")
    assert sl.Steering(vec).positions == "all"  # the default still reads as "all"


def test_an_explicit_all_steers_every_position_under_steer_shorthand() -> None:
    model = tiny_model("llama")
    vec = _vector(model)
    with model.steer(sl.Steering(vec, strength=4.0)):
        everywhere = model.logits(PROMPTS)
    with model.steer(sl.Steering(vec, strength=4.0, positions="last")):
        last_only = model.logits(PROMPTS)
    with model.steer(sl.Steering(vec, strength=4.0, positions="all"), positions="last"):
        kept = model.logits(PROMPTS)
    assert torch.equal(kept, everywhere)
    assert not torch.equal(kept[:, 0], last_only[:, 0])  # "last" leaves the first token alone


def test_steering_with_folds_keywords_as_normalize_steering_did() -> None:
    vec = sl.SteeringVector({0: torch.ones(4)})
    assert steering_with(vec) is vec
    folded = steering_with([vec, None], strength=2.0, positions="last", op="cap")
    assert folded[1] is None
    assert (folded[0].strength, folded[0].positions, folded[0].op) == (2.0, "last", "cap")
    with pytest.raises(sl.InvalidInputError, match="strength=/layers= apply to bare"):
        steering_with(sl.Steering(vec), strength=2.0)


def test_evaluate_old_and_new_spelling_give_identical_scores() -> None:
    model = tiny_model("llama")
    vec = _vector(model)
    task = kl_task(PROMPTS)
    new = evaluate(model, task, steering=sl.Steering(vec, strength=3.0, positions="last"))
    with pytest.warns(SteerlabDeprecationWarning, match=r"evaluate\(strength=\.\.\., positions"):
        old = evaluate(model, task, steering=vec, strength=3.0, positions="last")
    assert torch.equal(old, new)
    assert bool((new > 0).all())


def test_vllm_wire_old_and_new_spelling_are_identical() -> None:
    vec = sl.SteeringVector({1: torch.ones(4)})
    new = extra_args(sl.Steering(vec, strength=2.0, positions="generated", layers=[1, 2]))
    with pytest.warns(SteerlabDeprecationWarning, match=r"extra_args\(strength="):
        old = extra_args(vec, strength=2.0, positions="generated", layers=[1, 2])
    assert old == new and new
    with pytest.warns(SteerlabDeprecationWarning, match=r"per_row_steering\(strength="):
        rows = per_row_steering([vec, None], n_rows=2, strength=2.0)
    assert rows == per_row_steering([sl.Steering(vec, strength=2.0), None], n_rows=2)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    [file] = folder.glob("*.safetensors")
    return load_file(file)


def test_bake_old_spellings_warn_and_bake_the_same_weights(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    a, b = _vector(model, 1, seed=1), _vector(model, 2, seed=2)
    new = sl.editing.bake(
        model.edit(sl.Steering(a, strength=2.0)).edit(b), None, tmp_path / "new", verify=False
    )
    with pytest.warns(SteerlabDeprecationWarning) as caught:
        old = sl.editing.bake(model, (a, b), tmp_path / "old", strength=2.0, verify=False)
    messages = sorted(str(w.message) for w in caught)
    assert any("bake(strength=...)" in m for m in messages)
    assert any("bake(model.edit(a).edit(b), None, out_dir)" in m for m in messages)
    # the tuple's strength reached both edits in 0.1: bake the same with the new spelling
    both = sl.editing.bake(
        model.edit(sl.Steering(a, strength=2.0)).edit(sl.Steering(b, strength=2.0)),
        None,
        tmp_path / "both",
        verify=False,
    )
    old_w, both_w, new_w = _weights(old), _weights(both), _weights(new)
    assert all(torch.equal(old_w[k], both_w[k]) for k in old_w)
    assert any(not torch.equal(old_w[k], new_w[k]) for k in old_w)


def test_the_new_spellings_do_not_warn() -> None:
    model = tiny_model("llama")
    vec = _vector(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SteerlabDeprecationWarning)
        evaluate(model, kl_task(PROMPTS), steering=[sl.Steering(vec, strength=2.0), None])
        extra_args(sl.Steering(vec, positions="last"))
