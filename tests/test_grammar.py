"""One parser per grammar: every front end reads positions, layer lists and strengths alike.

A table of forms (valid and invalid) runs through the library (``sl.Steering``, or the
parsers themselves for the command line's text spellings of layers and strengths), the CLI
(``generate``, ``sweep``, ``compute``), the HTTP server (a real request) and the vLLM wire
(:func:`steerlab.vllm.spec.validate`/``resolve``). Valid forms must reach the library as the
same value; invalid ones must fail with the same message after each front end's field name
(``positions: ``, ``--positions: ``, ``steering[0].positions: ``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import steerlab as sl
from steerlab.grammar import parse_layers, parse_strength
from steerlab.positions import Positions
from steerlab.testing import tiny_model, tiny_tokenizer
from steerlab.vllm.spec import resolve, validate

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from steerlab.cli import app  # noqa: E402
from steerlab.server.app import create_app, serve_in_thread  # noqa: E402
from steerlab.server.engine import TorchEngine  # noqa: E402

VALID_POSITIONS = [
    "all",
    "last",
    "prompt",
    "generated",
    "3",
    "-1",
    "0,2",
    " 0, -1 ",
    "2:",
    "-3:-1",
    "0:8:2",
    ":3",
    "first:4",
    "after:Yes",
    "after: Yes",
    "between:<think>,</think>",
    "outside:<a>,</a>",
]
INVALID_POSITIONS = [
    "sometimes",
    "1:2:3:4",
    "0:8:0",
    "first:x",
    "first:-1",
    "between:only-one",
    "after:",
    "0,,2",
    "1.5",
    " ",
]
# JSON-only forms (the CLI takes text): library, server and wire
JSON_POSITIONS: list[Any] = [3, [0, -1], {"start": 1, "stop": None, "step": 2}]
JSON_BAD_POSITIONS: list[Any] = [[], [1.5], {"start": "a"}, {"mode": "after", "markers": []}]

VALID_LAYERS = ["1", "0,-1", "0-2", "-3--1", "0:3:2", " 1 - 2 ", "all"]
INVALID_LAYERS = ["x", "3-1", "0:4:0", "1.5", "1-", ",", "0:0"]
# Python and JSON give layers as numbers: the library and the wire
INVALID_NATIVE_LAYERS: list[Any] = [[1.5], [], [True], "1", 2.0]

VALID_STRENGTHS: list[tuple[str, Any]] = [("2", 2), ("-1.5", -1.5), ("1:4,2:-2", {"1": 4, "2": -2})]
INVALID_CLI_STRENGTHS = ["x", "inf", "1:x", "x:1", "1:2,1:3", "nan"]
INVALID_JSON_STRENGTHS: list[Any] = [
    float("inf"),
    float("nan"),
    {},
    {"x": 1.0},
    {"1": float("inf")},
]

runner = CliRunner()


def _tail(message: str, field: str) -> str:
    """The message after the front end's field name (``--positions``, ``steering[0].strength``)."""
    assert field in message, (field, message)
    return message.split(field, 1)[1].strip()


@pytest.fixture(scope="module")
def model() -> sl.SteeredModel:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def vec(model: sl.SteeredModel) -> sl.SteeringVector:
    return sl.SteeringVector(
        {1: torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))}
    )


@pytest.fixture(scope="module")
def vector_file(vec: sl.SteeringVector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grammar") / "v.safetensors"
    vec.save(path)
    return path


@pytest.fixture(scope="module")
def server(model: sl.SteeredModel, vec: sl.SteeringVector) -> Iterator[tuple[str, list[Any]]]:
    engine = TorchEngine(model, max_batch=4, model_id="tiny")
    engine.vectors.register("v", vec)
    seen: list[Any] = []
    submit = engine.submit

    def recording(request: Any, **options: Any) -> Any:
        seen.append(request.steering[0])
        return submit(request, **options)

    engine.submit = recording  # type: ignore[method-assign]
    with serve_in_thread(create_app(engine, max_strength=1e9)) as url:
        yield url, seen


class _Stop(Exception):
    """Raised by the captured library call so the CLI stops after parsing."""


@pytest.fixture()
def cli(model: sl.SteeredModel, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Library calls the CLI makes, recorded (and stopped) instead of run."""
    seen: list[dict[str, Any]] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        raise _Stop

    import steerlab.methods
    import steerlab.tuning

    monkeypatch.setattr(sl, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(model, "generate", record)
    monkeypatch.setattr(steerlab.tuning, "tune", record)
    monkeypatch.setattr(steerlab.methods, "compute_vector", record)
    yield seen


def _generate(vector_file: Path, *options: str) -> list[str]:
    return ["generate", "hi", "-v", str(vector_file), "--force", *options]


def _cli_value(cli: list[dict[str, Any]], args: list[str], key: str) -> Any:
    cli.clear()
    result = runner.invoke(app, args)
    assert len(cli) == 1, result.output
    value = cli[0][key]
    return value


def _cli_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _post(url: str, entry: dict[str, Any]) -> Any:
    body = {"model": "default", "prompt": "a b", "max_tokens": 1, "steering": [entry]}
    headers = {"content-type": "application/json"}
    return httpx.post(
        url + "/v1/completions", content=json.dumps(body), headers=headers, timeout=60
    )


def _wire(entry: dict[str, Any]) -> dict[str, Any]:
    return {"steering": [{"vector": {"1": [0.5] * 8}, **entry}]}


# --- positions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("form", VALID_POSITIONS)
def test_valid_positions_reach_the_library_alike(
    form: str,
    vec: sl.SteeringVector,
    vector_file: Path,
    cli: list[dict[str, Any]],
    server: tuple[str, list[Any]],
) -> None:
    expected = Positions.parse(form)
    assert Positions.parse(sl.Steering(vec, positions=form).positions) == expected
    steering = _cli_value(cli, _generate(vector_file, "--positions", form), "steering")
    assert Positions.parse(steering.positions) == expected
    swept = _cli_value(cli, ["sweep", "--positions", form], "positions")
    assert Positions.parse(swept) == expected
    url, seen = server
    seen.clear()
    assert _post(url, {"vector": "v", "positions": form}).status_code == 200
    assert Positions.parse(seen[0].positions) == expected
    if expected.needs_ids:
        # vLLM's workers have no tokenizer: text markers travel with their ids, which
        # steerlab's front ends add (to_wire of a bound spec); bare text is refused by name
        with pytest.raises(sl.InvalidInputError, match="travel with their token ids"):
            validate(_wire({"positions": form}))
        expected = expected.bind(tiny_tokenizer())
        form = expected.to_json()
    [entry] = resolve(_wire({"positions": form}), n_layers=4, d_model=8)
    assert entry.positions == expected


@pytest.mark.parametrize("form", INVALID_POSITIONS)
def test_invalid_positions_fail_alike(
    form: str,
    vec: sl.SteeringVector,
    vector_file: Path,
    cli: list[dict[str, Any]],
    server: tuple[str, list[Any]],
) -> None:
    with pytest.raises(sl.InvalidInputError) as library:
        sl.Steering(vec, positions=form)
    tail = _tail(str(library.value), "positions")
    assert _tail(_cli_error(_generate(vector_file, "--positions", form)), "--positions") == tail
    assert _tail(_cli_error(["sweep", "--positions", form]), "--positions") == tail
    response = _post(server[0], {"vector": "v", "positions": form})
    assert response.status_code == 400
    error = response.json()["error"]
    assert _tail(error["message"], "steering[0].positions") == tail
    with pytest.raises(sl.InvalidInputError) as wire:
        validate(_wire({"positions": form}))
    assert _tail(str(wire.value), "positions") == tail


@pytest.mark.parametrize("form", JSON_POSITIONS)
def test_json_positions_reach_the_library_alike(
    form: Any, vec: sl.SteeringVector, server: tuple[str, list[Any]]
) -> None:
    expected = Positions.parse(form)
    assert Positions.parse(sl.Steering(vec, positions=form).positions) == expected
    url, seen = server
    seen.clear()
    assert _post(url, {"vector": "v", "positions": form}).status_code == 200
    assert Positions.parse(seen[0].positions) == expected
    [entry] = resolve(_wire({"positions": form}), n_layers=4, d_model=8)
    assert entry.positions == expected


@pytest.mark.parametrize("form", JSON_BAD_POSITIONS)
def test_invalid_json_positions_fail_alike(
    form: Any, vec: sl.SteeringVector, server: tuple[str, list[Any]]
) -> None:
    with pytest.raises(sl.InvalidInputError) as library:
        sl.Steering(vec, positions=form)
    tail = _tail(str(library.value), "positions")
    response = _post(server[0], {"vector": "v", "positions": form})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    if not isinstance(form, list) or not form or isinstance(form[0], int):
        assert _tail(message, "steering[0].positions") == tail
    else:  # [1.5] fails the strict JSON schema first (an int list), still naming the field
        assert message.startswith("steering[0].positions")
    with pytest.raises(sl.InvalidInputError) as wire:
        validate(_wire({"positions": form}))
    assert _tail(str(wire.value), "positions") == tail


# --- layer lists -------------------------------------------------------------------------------
@pytest.mark.parametrize("form", VALID_LAYERS)
def test_valid_layer_lists_reach_the_library_alike(
    form: str,
    model: sl.SteeredModel,
    vec: sl.SteeringVector,
    vector_file: Path,
    cli: list[dict[str, Any]],
) -> None:
    parsed = parse_layers(form, text=True)
    every = list(range(model.n_layers))
    expected = every if parsed == "all" else parsed
    steering = _cli_value(cli, _generate(vector_file, "--layers", form), "steering")
    assert list(steering.layers) == expected
    assert _cli_value(cli, ["sweep", "--layers", form], "layers") == expected
    computed = _cli_value(cli, ["compute", "-d", "sentiment", "-l", form, "-o", "x.st"], "layers")
    assert computed == (None if parsed == "all" else expected)  # None: every layer
    if parsed != "all":  # a Steering value has no model to count "all" on
        assert list(sl.Steering(vec, layers=expected).layers) == expected
        [entry] = resolve(_wire({"layers": expected}), n_layers=model.n_layers, d_model=8)
        assert sorted(entry.deltas) == sorted({i % model.n_layers for i in expected})


@pytest.mark.parametrize("form", INVALID_LAYERS)
def test_invalid_layer_lists_fail_alike(
    form: str, vec: sl.SteeringVector, vector_file: Path, cli: list[dict[str, Any]]
) -> None:
    with pytest.raises(sl.InvalidInputError) as library:
        parse_layers(form, text=True)
    tail = _tail(str(library.value), "layers")
    assert _tail(_cli_error(_generate(vector_file, "--layers", form)), "--layers") == tail
    assert _tail(_cli_error(["sweep", "--layers", form]), "--layers") == tail
    compute = ["compute", "-d", "sentiment", "-l", form, "-o", "x.st"]
    assert _tail(_cli_error(compute), "--layers") == tail


@pytest.mark.parametrize("value", INVALID_NATIVE_LAYERS)
def test_invalid_native_layer_lists_fail_alike(value: Any, vec: sl.SteeringVector) -> None:
    with pytest.raises(sl.InvalidInputError) as library:
        sl.Steering(vec, layers=value)
    tail = _tail(str(library.value), "layers")
    with pytest.raises(sl.InvalidInputError) as wire:
        validate(_wire({"layers": value}))
    assert _tail(str(wire.value), "layers") == tail


# --- strengths ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "json_value"), VALID_STRENGTHS)
def test_valid_strengths_reach_the_library_alike(
    text: str,
    json_value: Any,
    vec: sl.SteeringVector,
    vector_file: Path,
    cli: list[dict[str, Any]],
    server: tuple[str, list[Any]],
) -> None:
    expected = parse_strength(text, text=True)
    assert parse_strength(json_value) == expected
    assert sl.Steering(vec, strength=json_value).strength == expected
    steering = _cli_value(cli, _generate(vector_file, "--strength", text), "steering")
    assert steering.strength == expected
    url, seen = server
    seen.clear()
    assert _post(url, {"vector": "v", "strength": json_value}).status_code == 200
    assert seen[0].strength == expected
    [entry] = resolve(_wire({"strength": json_value}), n_layers=4, d_model=8)
    per_layer = expected if isinstance(expected, dict) else {1: expected}
    assert {k: v[0].item() for k, v in entry.deltas.items()} == {
        k: 0.5 * s for k, s in per_layer.items()
    }


@pytest.mark.parametrize("text", INVALID_CLI_STRENGTHS)
def test_invalid_strength_text_fails_alike(
    text: str, vec: sl.SteeringVector, vector_file: Path, cli: list[dict[str, Any]]
) -> None:
    with pytest.raises(sl.InvalidInputError) as library:
        parse_strength(text, text=True)
    tail = _tail(str(library.value), "strength")
    assert _tail(_cli_error(_generate(vector_file, "--strength", text)), "--strength") == tail


@pytest.mark.parametrize("value", INVALID_JSON_STRENGTHS)
def test_invalid_json_strengths_fail_alike(
    value: Any, vec: sl.SteeringVector, server: tuple[str, list[Any]]
) -> None:
    with pytest.raises(sl.InvalidInputError) as library:
        sl.Steering(vec, strength=value)
    tail = _tail(str(library.value), "strength")
    response = _post(server[0], {"vector": "v", "strength": value})
    assert response.status_code == 400
    assert _tail(response.json()["error"]["message"], "steering[0].strength") == tail
    with pytest.raises(sl.InvalidInputError) as wire:
        validate(_wire({"strength": value}))
    assert _tail(str(wire.value), "strength") == tail


def test_finiteness_has_one_check() -> None:
    """NaN/inf strengths are refused by the grammar, whatever the spelling."""
    for value in ("nan", math.inf, {"3": -math.inf}, "3:nan"):
        with pytest.raises(sl.InvalidInputError, match="finite"):
            parse_strength(value, text=True)
    with pytest.raises(sl.InvalidInputError, match="number"):
        parse_strength("2")  # text is the command line's spelling only
