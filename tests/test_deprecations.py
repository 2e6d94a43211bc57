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


def _old_and_new(call: str, old: object, new: object) -> None:
    """``old()`` warns naming ``call``, ``new()`` does not, and both give the same tensors."""
    with pytest.warns(SteerlabDeprecationWarning, match=rf"^{call}\(") as caught:
        got_old = old()  # type: ignore[operator]
    assert len(caught) == 1  # one warning per call, never one per internal hop
    got_new = new()  # type: ignore[operator]
    flat_old = got_old if isinstance(got_old, (list, tuple)) else [got_old]
    flat_new = got_new if isinstance(got_new, (list, tuple)) else [got_new]
    assert len(flat_old) == len(flat_new)
    for a, b in zip(flat_old, flat_new):
        if isinstance(a, str):
            assert a == b
        elif isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert torch.equal(a, b)


def test_model_calls_old_and_new_spelling_are_bit_identical() -> None:
    model = tiny_model("llama")
    vec = _vector(model)
    s = sl.Steering(vec, strength={1: 3.0, 2: -1.5}, positions="last", op="add")
    loose = {"strength": {1: 3.0, 2: -1.5}, "positions": "last", "op": "add"}
    _old_and_new(
        "logits",
        lambda: model.logits(PROMPTS, steering=vec, **loose),
        lambda: model.logits(PROMPTS, steering=s),
    )
    _old_and_new(
        "next_token_logits",
        lambda: model.next_token_logits(PROMPTS, steering=[vec, None], **loose),
        lambda: model.next_token_logits(PROMPTS, steering=[s, None]),
    )
    _old_and_new(
        "generate",
        lambda: model.generate(PROMPTS, steering=vec, max_new_tokens=4, **loose),
        lambda: model.generate(PROMPTS, steering=s, max_new_tokens=4),
    )
    _old_and_new(
        "generate_ids",
        lambda: model.generate_ids(PROMPTS, steering=vec, max_new_tokens=4, **loose),
        lambda: model.generate_ids(PROMPTS, steering=s, max_new_tokens=4),
    )
    assert not torch.equal(model.logits(PROMPTS, steering=s), model.logits(PROMPTS))


def test_cache_replays_old_and_new_spelling_are_bit_identical() -> None:
    model = tiny_model("llama")
    vec = _vector(model, 2)
    s = sl.Steering(vec, strength=2.5, positions="last")
    prefix = model.prefix_cache(PROMPTS, layer=1)
    _old_and_new(
        "run_from",
        lambda: model.run_from(prefix, steering=vec, strength=2.5, positions="last"),
        lambda: model.run_from(prefix, steering=s),
    )
    last = model.last_token_cache(PROMPTS)
    _old_and_new(
        "run_last",
        lambda: model.run_last(last, steering=vec, strength=2.5, positions="last"),
        lambda: model.run_last(last, steering=s),
    )
    _old_and_new(
        "run_last_with_activations",
        lambda: model.run_last_with_activations(
            last, layers=[2], steering=vec, strength=2.5, positions="last"
        ),
        lambda: model.run_last_with_activations(last, layers=[2], steering=s),
    )
    prompt = model.prompt_cache(PROMPTS)
    gen = sl.Steering(vec, strength=2.5, positions="generated")
    _old_and_new(
        "score_continuations",
        lambda: model.score_continuations(
            prompt, [[5, 6], [7]], steering=vec, strength=2.5, positions="generated"
        ),
        lambda: model.score_continuations(prompt, [[5, 6], [7]], steering=gen),
    )
    steered = model.run_from(prefix, steering=s)
    assert not torch.equal(steered, model.run_from(prefix))  # the steering did something


def test_activations_read_at_and_steering_old_and_new_spelling() -> None:
    model = tiny_model("llama")
    vec = _vector(model, 0)
    s = sl.Steering(vec, strength=2.0)
    _old_and_new(
        "activations",
        lambda: model.activations(PROMPTS, layers=[1, 2], positions="mean", steering=s),
        lambda: model.activations(PROMPTS, layers=[1, 2], read_at="mean", steering=s),
    )
    _old_and_new(
        "activations",
        lambda: model.activations(PROMPTS, layers=[1, 2], steering=vec, strength=2.0),
        lambda: model.activations(PROMPTS, layers=[1, 2], steering=s),
    )
    plain = model.activations(PROMPTS, layers=[2], read_at="mean")[2]
    assert not torch.equal(
        plain, model.activations(PROMPTS, layers=[2], read_at="mean", steering=s)[2]
    )
    with pytest.raises(sl.InvalidInputError, match="both read_at= and positions="):
        model.activations(PROMPTS, read_at="last", positions="last")
    with pytest.raises(sl.InvalidInputError, match="read_at for activations"):
        model.activations(PROMPTS, read_at="first")


def test_reading_calls_take_read_at() -> None:
    model = tiny_model("llama")
    pos, neg = ["i love it", "so happy", "great", "joy"], ["i hate it", "so sad", "awful", "pain"]
    _old_and_new(
        "compute_vector",
        lambda: sl.compute_vector(model, pos, neg, layers=[1], positions="mean").directions[1],
        lambda: sl.compute_vector(model, pos, neg, layers=[1], read_at="mean").directions[1],
    )
    _old_and_new(
        "mean_diff",
        lambda: sl.mean_diff(model, pos, neg, layers=[1], positions=-1).directions[1],
        lambda: sl.mean_diff(model, pos, neg, layers=[1], read_at=-1).directions[1],
    )
    _old_and_new(
        "scan_layers",
        lambda: sl.scan_layers(model, pos, neg, positions="mean", probe=False).vector.directions[2],
        lambda: sl.scan_layers(model, pos, neg, read_at="mean", probe=False).vector.directions[2],
    )
    mean = sl.compute_vector(model, pos, neg, layers=[1], read_at="mean")
    last = sl.compute_vector(model, pos, neg, layers=[1])
    assert mean.metadata["positions"] == "mean"
    assert not torch.equal(mean.directions[1], last.directions[1])


def test_edit_old_spellings_warn_and_edit_the_same() -> None:
    model = tiny_model("gpt2")
    a, b = _vector(model, 1, seed=1), _vector(model, 2, seed=2)
    _old_and_new(
        "edit",
        lambda: model.edit(a, strength=2.0, positions="last").logits(PROMPTS),
        lambda: model.edit(sl.Steering(a, strength=2.0, positions="last")).logits(PROMPTS),
    )
    with pytest.warns(SteerlabDeprecationWarning, match=r"model\.edit\(a\)\.edit\(b\)"):
        stacked = model.edit((a, b)).logits(PROMPTS)
    assert torch.equal(stacked, model.edit(a).edit(b).logits(PROMPTS))
    with pytest.raises(sl.InvalidInputError, match=r"chain model\.edit"):
        model.edit([a, b])


def test_tune_reads_at_read_at() -> None:
    model = tiny_model("llama")
    options = {"layers": [1], "strengths": [2.0], "n_examples": 1, "max_new_tokens": 2}
    with pytest.warns(SteerlabDeprecationWarning, match=r"tune\(vector_positions=\.\.\.\)"):
        old = sl.tune(model, "sentiment", vector_positions="mean", progress=False, **options)
    new = sl.tune(model, "sentiment", read_at="mean", progress=False, **options)
    assert torch.equal(old.vector.directions[1], new.vector.directions[1])
    last = sl.tune(model, "sentiment", progress=False, **options)
    assert not torch.equal(last.vector.directions[1], new.vector.directions[1])


def test_tune_still_imports_from_sweeps() -> None:
    import steerlab.sweeps
    import steerlab.tuning

    with pytest.warns(SteerlabDeprecationWarning, match=r"steerlab\.tuning\.tune"):
        old_tune = steerlab.sweeps.tune
    assert old_tune is steerlab.tuning.tune
    with pytest.warns(SteerlabDeprecationWarning, match=r"steerlab\.tuning\.TuneResult"):
        from steerlab.sweeps import TuneResult
    assert TuneResult is steerlab.tuning.TuneResult
    with pytest.raises(AttributeError, match="no_such_name"):
        steerlab.sweeps.no_such_name  # noqa: B018
