"""Bad input gets a clear SteerlabError (and the matching builtin); the model is left untouched."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import steerlab as sl
from steerlab.testing import hook_count, tiny_hf_model, tiny_tokenizer


def _state(model: sl.SteeredModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.hf_model.state_dict().items()}


def _untouched(model: sl.SteeredModel, state: dict[str, torch.Tensor]) -> None:
    assert hook_count(model.hf_model) == 0
    for key, value in model.hf_model.state_dict().items():
        assert torch.equal(value, state[key])


def test_wrong_vector_size(llama: sl.SteeredModel) -> None:
    state = _state(llama)
    vec = sl.SteeringVector({1: torch.ones(llama.d_model + 1)})
    with pytest.raises(sl.VectorMismatchError, match="size") as info:
        with llama.steer(vec):
            pass  # pragma: no cover
    assert isinstance(info.value, ValueError) and isinstance(info.value, sl.SteerlabError)
    with pytest.raises(ValueError, match="size"):
        llama.logits(["the cat"], steering=vec)
    _untouched(llama, state)


@pytest.mark.parametrize("layer", [3, -4, 100])
def test_layer_out_of_range(llama: sl.SteeredModel, layer: int) -> None:
    state = _state(llama)
    with pytest.raises(sl.LayerIndexError, match="out of range"):
        llama.activations(["the cat"], layers=[0, layer])
    with pytest.raises(IndexError):
        llama.logits(
            ["the cat"],
            steering=sl.Steering(sl.SteeringVector({0: torch.ones(llama.d_model)}), layers=[layer]),
        )
    _untouched(llama, state)


def test_negative_layers_accepted(llama: sl.SteeredModel) -> None:
    acts = llama.activations(["the cat"], layers=[-1])
    assert list(acts) == [2] and torch.equal(acts[-1], acts[2])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_vectors_and_strengths(llama: sl.SteeredModel, bad: float) -> None:
    direction = torch.ones(llama.d_model)
    direction[3] = bad
    with pytest.raises(sl.VectorMismatchError, match="NaN or inf"):
        sl.SteeringVector({1: direction})
    vec = sl.SteeringVector({1: torch.ones(llama.d_model)})
    with pytest.raises(sl.InvalidInputError, match="finite"):
        llama.steer(vec, strength=bad).__enter__()
    assert hook_count(llama.hf_model) == 0


def test_empty_prompt_lists(llama: sl.SteeredModel) -> None:
    for call in (
        lambda: llama.logits([]),
        lambda: llama.activations([], layers=[0]),
        lambda: llama.generate([], max_new_tokens=2),
        lambda: sl.mean_diff(llama, [], ["a"], layers=[0]),
    ):
        with pytest.raises(sl.InvalidInputError, match="empty"):
            call()
    with pytest.raises(sl.InvalidInputError, match="has no tokens"):
        llama.logits([""])


def test_unknown_architecture_has_clear_error_and_override() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stack_a = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.stack_b = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.config = SimpleNamespace(model_type="odd", hidden_size=2)

    with pytest.raises(sl.UnsupportedModelError, match="layers_path"):
        sl.wrap(Odd(), tiny_tokenizer())
    assert sl.wrap(Odd(), tiny_tokenizer(), layers_path="stack_b.{i}").n_layers == 1
    assert issubclass(sl.UnsupportedModelError, ValueError)


def test_renamed_architecture_is_auto_detected() -> None:
    hf = tiny_hf_model("llama")
    hf.config.model_type = "brand_new_llama"
    model = sl.wrap(hf, tiny_tokenizer())
    assert model.n_layers == 3 and model.adapter.spec.layers == "model.layers"


def test_tokenizer_without_pad_token_uses_eos_and_is_not_mutated() -> None:
    tokenizer = tiny_tokenizer(with_pad=False)
    model = sl.wrap(tiny_hf_model("llama"), tokenizer)
    assert tokenizer.pad_token is None
    batched = model.logits(["the cat sat", "a dog"])
    alone = model.logits(["a dog"])
    assert torch.allclose(batched[1, -1], alone[0, -1], atol=1e-5)
    assert tokenizer.pad_token is None


def test_tokenizer_without_pad_or_eos_is_refused() -> None:
    tokenizer = tiny_tokenizer(with_pad=False)
    model = sl.wrap(tiny_hf_model("llama"), tokenizer)
    model.tokenizer = type(
        "NoSpecials",
        (),
        {"__call__": tokenizer.__call__, "pad_token_id": None, "eos_token_id": None},
    )()
    with pytest.raises(sl.InvalidInputError, match="neither a pad token nor an EOS"):
        model.logits(["the cat", "a"])


@pytest.mark.parametrize("positions", ["middle", True, [], slice(0, 4, -1)])
def test_bad_positions(llama: sl.SteeredModel, positions: object) -> None:
    vec = sl.SteeringVector({0: torch.ones(llama.d_model)})
    with pytest.raises(sl.InvalidInputError):
        llama.logits(["the cat"], steering=vec, positions=positions)  # type: ignore[arg-type]
    assert hook_count(llama.hf_model) == 0


def test_per_row_steering_length_mismatch(llama: sl.SteeredModel) -> None:
    vec = sl.SteeringVector({0: torch.ones(llama.d_model)})
    with pytest.raises(sl.InvalidInputError, match="2 entries but there are 3 prompts"):
        llama.logits(["a", "b", "c"], steering=[vec, None])


def test_raw_tensor_steering_is_refused_helpfully(llama: sl.SteeredModel) -> None:
    with pytest.raises(sl.InvalidInputError, match="from_tensor"):
        llama.logits(["the cat"], steering=torch.ones(llama.d_model))


def test_vector_arithmetic_rejects_nonsense() -> None:
    vec = sl.SteeringVector({0: torch.ones(4)})
    with pytest.raises(TypeError):
        vec + 1.0  # type: ignore[operator]
    with pytest.raises(TypeError):
        vec * "2"  # type: ignore[operator]
    with pytest.raises(sl.VectorMismatchError):
        vec + sl.SteeringVector({0: torch.ones(5)})


def test_errors_are_steerlab_errors() -> None:
    for cls in (
        sl.InvalidInputError,
        sl.LayerIndexError,
        sl.VectorMismatchError,
        sl.UnsupportedModelError,
        sl.ModelNotAvailableError,
        sl.DataError,
        sl.VectorFileError,
    ):
        assert issubclass(cls, sl.SteerlabError)
    assert issubclass(sl.ModelNotAvailableError, FileNotFoundError)


def test_vector_for_another_model_is_refused_unless_forced(llama: sl.SteeredModel) -> None:
    from steerlab.testing import tiny_model

    other = tiny_model("llama", seed=1)  # same shapes, different weights
    vec = sl.mean_diff(other, ["i love it"], ["i hate it"], layers=[1])
    with pytest.raises(sl.VectorMismatchError, match="force=True"):
        llama.logits(["the cat"], steering=vec)
    with pytest.raises(sl.VectorMismatchError):
        llama.steer(vec).__enter__()
    assert hook_count(llama.hf_model) == 0
    with pytest.warns(UserWarning, match="another model"):
        with llama.steer(vec, force=True):
            llama.logits(["the cat"])
    own = sl.mean_diff(llama, ["i love it"], ["i hate it"], layers=[1])
    llama.logits(["the cat"], steering=own)  # its own vectors are fine


# --- the attack table of issue 9: one row per misuse of a public entry point ----------------------
# Rows live in tests/attack_table.py (run it directly for the before/after counts); a new entry
# point adds its misuses there and is tested here with no other change.
from attack_table import (  # noqa: E402
    ATTACKS,
    CLI_ATTACKS,
    Attack,
    CliAttack,
    Context,
    cli_files,
    cli_outcome,
    make_context,
    outcome,
)


@pytest.fixture(scope="module")
def attack_models() -> dict[str, sl.SteeredModel]:
    from steerlab.testing import tiny_model

    return {"model": tiny_model("llama"), "other": tiny_model("llama", seed=1)}


@pytest.fixture
def attack_context(tmp_path: Path, attack_models: dict[str, sl.SteeredModel]) -> Context:
    return make_context(tmp_path, **attack_models)


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.id)
def test_attack_is_refused_cleanly(attack: Attack, attack_context: Context) -> None:
    model = attack_context.model
    state = _state(model)
    kind, detail = outcome(attack, attack_context)
    assert kind == "clean", detail
    _untouched(model, state)  # no hook left behind, no weight changed
    stray = [p.name for p in attack_context.tmp.rglob("*") if p.name.endswith(".tmp")]
    assert not stray, f"temporary files left behind: {stray}"


@pytest.mark.parametrize("attack", CLI_ATTACKS, ids=lambda a: a.id)
def test_cli_attack_is_one_clean_line(attack: CliAttack, attack_context: Context) -> None:
    corrupt, other = cli_files(attack_context)
    kind, detail = cli_outcome(attack, attack_context, corrupt, other)
    assert kind == "clean", detail


def test_attack_table_covers_each_error_class() -> None:
    """The table exercises every error class a user can trigger (a guard against rows being
    dropped when the table is edited)."""
    expected = {a.error for a in ATTACKS if a.error is not None}
    for cls in (
        sl.InvalidInputError,
        sl.VectorMismatchError,
        sl.VectorFileError,
        sl.VectorFileNotFoundError,
        sl.LayerNotFoundError,
        sl.FileWriteError,
        sl.BakeError,
    ):
        assert cls in expected, cls
    assert len(ATTACKS) >= 80 and len(CLI_ATTACKS) >= 22
