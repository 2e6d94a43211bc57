"""The vLLM plugin's steering arithmetic, without vLLM: wire format, per-token deltas, layer hooks.

These run in the main environment. The flattened-batch delta is checked against the torch
engine's own hooks on a tiny Llama (same tokens, same positions); the tensor-parallel path is
checked on a two-rank simulation of a row-parallel block.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

import steerlab as sl
from steerlab.conditions import condition_score
from steerlab.positions import Positions
from steerlab.vllm import extra_args, per_row_steering
from steerlab.vllm.plugin import (
    ReadoutExtension,
    RunnerSteering,
    StepPlan,
    add_to_block_output,
    decoder_layers,
)
from steerlab.vllm.spec import (
    StepRequest,
    positions_to_wire,
    readout_to_wire,
    resolve,
    resolve_readout,
    to_wire,
    token_deltas,
    validate,
)

SPECS: list[Any] = ["all", "last", "prompt", "generated", 1, [0, -1], slice(2, None), slice(-2, 5)]


@pytest.mark.parametrize("spec", SPECS)
def test_positions_round_trip(spec: Any) -> None:
    wire = json.loads(json.dumps(positions_to_wire(spec)))
    assert Positions.parse(wire) == Positions.parse(spec)


def test_wire_round_trip_gives_library_deltas() -> None:
    vec = sl.SteeringVector({2: torch.randn(8), 3: torch.randn(8)})
    terms = [
        sl.Steering(vec, strength=1.5, positions="last"),
        sl.Steering(vec.select([2]), strength={-1: 2.0, 1: -1.0}, positions=slice(1, None)),
    ]
    wire = json.loads(json.dumps(to_wire(terms)))
    entries = resolve(json.dumps(wire), n_layers=4, d_model=8)
    assert entries[0].positions == Positions.parse("last")
    assert torch.equal(entries[0].deltas[2], vec[2] * 1.5)
    assert torch.equal(entries[1].deltas[3], vec[2] * 2.0)
    assert torch.equal(entries[1].deltas[1], vec[2] * -1.0)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"steering": [{"vector": {"0": [1.0, 2.0]}, "op": "bogus"}]}, sl.InvalidInputError),
        ({"steering": [{"vector": {"0": [1.0, 2.0]}, "op": "rotate"}]}, sl.VectorMismatchError),
        ({"steering": [{"vector": {"9": [1.0, 2.0]}}]}, sl.LayerIndexError),
        ({"steering": [{"vector": {"0": [1.0]}}]}, sl.VectorMismatchError),
        ({"steering": [{"vector": {"0": [1.0, 2.0]}, "strength": "x"}]}, sl.InvalidInputError),
        (
            {"steering": [{"vector": {"0": [1.0, 2.0]}, "positions": "middle"}]},
            sl.InvalidInputError,
        ),
        ({"steering": [{"vector": "happy"}]}, sl.InvalidInputError),
        ("{not json", sl.InvalidInputError),
    ],
)
def test_bad_wire_values_raise(raw: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        resolve(raw, n_layers=4, d_model=2)


def test_named_vector_reads_only_the_configured_folder(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    vec = sl.SteeringVector({1: torch.arange(4.0)})
    vec.save(tmp_path / "calm.safetensors")
    monkeypatch.setenv("STEERLAB_VLLM_VECTORS", str(tmp_path))
    (entry,) = resolve([{"vector": "calm", "strength": 2.0}], n_layers=3, d_model=4)
    assert torch.equal(entry.deltas[1], torch.arange(4.0) * 2)
    with pytest.raises(sl.InvalidInputError):
        resolve([{"vector": "../calm"}], n_layers=3, d_model=4)


def test_flattened_batch_deltas_equal_torch_engine_hooks() -> None:
    """Three requests in one flattened step (chunked prefill, decode, prefill from a cached
    prefix) get exactly the additions the torch engine's per-row hook makes at those tokens."""
    model = sl.testing.tiny_model("llama")
    d, layer = model.d_model, 1
    vecs = [sl.SteeringVector({layer: torch.randn(d)}) for _ in range(3)]
    specs: list[Any] = ["last", slice(2, None), [0, -1]]
    terms = [sl.Steering(v, strength=2.0, positions=p) for v, p in zip(vecs, specs)]
    # (prompt length, first absolute position this step, tokens this step)
    layout = [(6, 0, 4), (5, 7, 1), (9, 4, 5)]
    positions = torch.cat([torch.arange(a, a + n) for _, a, n in layout])
    requests, start = [], 0
    for (plen, _, n), term in zip(layout, terms):
        entries = resolve(to_wire([term]), n_layers=model.n_layers, d_model=d)
        requests.append(StepRequest(start, start + n, plen, entries))
        start += n
    got = token_deltas(requests, positions, d_model=d)[layer]
    # the library's rule: each row's Positions.mask over its absolute indices
    start = 0
    for (plen, a, n), term in zip(layout, terms):
        mask = Positions.parse(term.positions).mask(
            torch.arange(a, a + n)[None], torch.tensor([plen])
        )[0]
        want = mask[:, None].float() * (term.vector[layer] * 2.0)[None]
        assert torch.equal(got[start : start + n], want)
        start += n
    assert got.abs().sum() > 0


class _Block(nn.Module):
    """A vLLM-style block: returns ``(hidden, residual)`` whose sum is the residual stream."""

    def __init__(self, d: int, ranks: int = 1) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d, bias=False)
        self.ranks = ranks

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> Any:
        residual = hidden if residual is None else hidden + residual
        act = torch.relu(self.up(residual))
        # row-parallel down projection: each rank owns a slice of the inner dimension, then
        # an all-reduce (the sum) makes the output whole on every rank
        parts = torch.chunk(torch.arange(act.shape[-1]), self.ranks)
        out = sum(act[:, p] @ self.down.weight[:, p].T for p in parts)
        return out, residual


class _Net(nn.Module):
    def __init__(self, d: int, ranks: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(d, ranks) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return hidden + residual


@pytest.mark.parametrize("ranks", [1, 2])
def test_hooks_add_to_the_block_output_under_tensor_parallel_blocks(ranks: int) -> None:
    """The delta lands on the whole residual stream, the same on every simulated rank."""
    torch.manual_seed(0)
    d = 6
    net = _Net(d, ranks)
    x = torch.randn(5, d)
    delta = torch.randn(5, d)
    # reference: add the delta to the block output (hidden + residual) of block 1, by hand
    with torch.no_grad():
        h, r = x, None
        for index, layer in enumerate(net.layers):
            h, r = layer(h, r)
            if index == 1:
                h, r = torch.zeros_like(h), h + r + delta
        want = h + r
    state = RunnerSteering(net, n_layers=3, d_model=d)
    try:
        state.active = StepPlan(deltas={1: delta}, reads={})
        with torch.no_grad():
            got = net(x)
        state.active = None
        with torch.no_grad():
            plain = net(x)
    finally:
        state.remove()
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, got)
    assert all(not layer._forward_hooks for layer in net.layers)


def test_steering_survives_torch_compile() -> None:
    """The hooks call steerlab's custom op, which torch.compile records as a call: one compiled
    graph (no recompilation) serves unsteered and steered steps, equal to eager."""
    torch.manual_seed(0)
    d = 6
    net = _Net(d, 1)
    x, delta = torch.randn(5, d), torch.randn(5, d)
    state = RunnerSteering(net, n_layers=3, d_model=d)
    try:
        compiled = torch.compile(net, backend="aot_eager", fullgraph=True, dynamic=False)
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            plain, first = net(x), compiled(x)
            state.active = StepPlan(deltas={1: delta}, reads={})
            steered, eager = compiled(x), net(x)
            state.active = None
            again = compiled(x)
    finally:
        state.remove()
        torch._dynamo.reset()
    assert torch.equal(first, plain) and torch.equal(again, plain)
    assert torch.allclose(steered, eager, atol=1e-6) and not torch.allclose(steered, plain)


def test_conditions_gate_steering_in_the_plugin() -> None:
    """``when=`` in the worker: a prompt-level verdict decided on the whole prompt and kept for
    later steps, a per-token gate by each token's score, a split prompt left unsteered."""
    torch.manual_seed(1)
    d = 4
    net = _Net(d, 1)
    vec = sl.SteeringVector({1: torch.randn(d)})
    direction = torch.randn(d)
    x = torch.randn(5, d)
    cpu = {"device": torch.device("cpu"), "dtype": torch.float32}

    def run(steering: Any, rows: list[tuple[str, int, int, int]], positions: list[int]) -> Any:
        raw = None if steering is None else extra_args(steering)["steerlab"]
        plan = state.plan(
            [(r, raw, a, b, p) for r, a, b, p in rows], torch.tensor(positions), **cpu
        )
        state.active = plan
        try:
            with torch.no_grad():
                return net(x[: len(positions)])
        finally:
            state.active = None
            if plan is not None:
                state.record(plan)

    def stream1(inputs: torch.Tensor) -> torch.Tensor:  # block 0's output: the probe reads it
        with torch.no_grad():
            h, r = net.layers[0](inputs, None)
        return h + r

    state = RunnerSteering(net, n_layers=3, d_model=d)
    try:
        plain = run(None, [("p", 0, 5, 5)], [0, 1, 2, 3, 4])
        always = run(sl.Steering(vec, strength=3.0), [("q", 0, 5, 5)], [0, 1, 2, 3, 4])
        score = condition_score(stream1(x).mean(dim=0, keepdim=True), direction)[0]
        fires = sl.Condition(direction, layer=0, threshold=float(score) - 0.01)
        never = sl.Condition(direction, layer=0, threshold=float(score) + 0.01)
        got = run(sl.Steering(vec, strength=3.0, when=fires), [("a", 0, 5, 5)], [0, 1, 2, 3, 4])
        assert torch.equal(got, always)
        got = run(sl.Steering(vec, strength=3.0, when=never), [("b", 0, 5, 5)], [0, 1, 2, 3, 4])
        assert torch.equal(got, plain)
        # the next step of "a" (one generated token): its verdict was kept
        nxt = run(sl.Steering(vec, strength=3.0, when=fires), [("a", 0, 1, 5)], [5])
        assert not torch.allclose(nxt, run(None, [("a", 0, 1, 5)], [5]))
        # part of a prompt, no verdict yet (chunked prefill): left unsteered
        part = run(sl.Steering(vec, strength=3.0, when=fires), [("c", 0, 2, 5)], [3, 4])
        assert torch.equal(part, run(None, [("c", 0, 2, 5)], [3, 4]))
        # per token: exactly the tokens whose own score passes get the delta at layer 1
        scores = condition_score(stream1(x), direction)
        token = sl.Condition(direction, layer=0, threshold=float(scores.median())).per_token()
        fired = token.test(scores)
        assert 0 < int(fired.sum()) < 5
        got = run(sl.Steering(vec, strength=3.0, when=token), [("t", 0, 5, 5)], [0, 1, 2, 3, 4])
        assert torch.allclose(got[fired], always[fired]) and torch.equal(got[~fired], plain[~fired])
    finally:
        state.remove()


def test_add_to_block_output_shapes() -> None:
    out = add_to_block_output(torch.zeros(2, 3), torch.ones(4, 3))  # padded delta is cut
    assert out.tolist() == [[1.0] * 3] * 2
    with pytest.raises(sl.SteerlabError):
        add_to_block_output("nope", torch.ones(1))
    with pytest.raises(sl.SteerlabError):
        decoder_layers(nn.Linear(2, 2), 5)


def test_runner_state_ignores_unsteered_and_caches_specs() -> None:
    net = _Net(4, 1)
    state = RunnerSteering(net, n_layers=3, d_model=4)
    try:
        raw = extra_args(sl.SteeringVector({2: torch.ones(4)}), positions="generated")["steerlab"]
        positions = torch.tensor([0, 1, 2, 5])
        plan = state.plan(
            [("a", None, 0, 3, 3), ("b", raw, 3, 4, 3)],
            positions,
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        assert plan is not None and set(plan.deltas) == {2} and not plan.reads
        assert plan.deltas[2][:3].abs().sum() == 0 and plan.deltas[2][3].tolist() == [1.0] * 4
        assert (
            state.plan(
                [("a", None, 0, 4, 4)], positions, device=torch.device("cpu"), dtype=torch.float32
            )
            is None
        )
        bad = {"steering": [{"vector": {"0": [1.0]}}]}
        assert (
            state.plan(
                [("c", bad, 0, 4, 2)], positions, device=torch.device("cpu"), dtype=torch.float32
            )
            is None
        )
    finally:
        state.remove()


def test_per_row_steering_matches_the_torch_engine_rules() -> None:
    vec = sl.SteeringVector({0: torch.ones(2)})
    rows = per_row_steering(vec, n_rows=3, strength=2.0, positions="last")
    assert [len(r) for r in rows] == [1, 1, 1] and rows[0][0].positions == "last"
    with pytest.raises(sl.InvalidInputError):
        per_row_steering([vec], n_rows=2)


def test_api_server_validator_refuses_bad_steering_and_passes_good() -> None:
    from types import SimpleNamespace

    from steerlab.vllm.validator import SteeringValidator

    good = extra_args(sl.SteeringVector({1: torch.ones(3)}), positions=slice(2, None))
    SteeringValidator.validate_params(SimpleNamespace(extra_args=good))
    SteeringValidator.validate_params(SimpleNamespace(extra_args=None))
    text = json.dumps({"steering": [{"vector": {"1": [1.0]}, "op": "bogus"}]})
    with pytest.raises(ValueError, match="invalid steerlab steering: unknown steering op 'bogus'"):
        SteeringValidator.validate_params(SimpleNamespace(extra_args={"steerlab": text}))


def test_serve_refuses_vllm_options_for_the_torch_engine() -> None:
    from typer.testing import CliRunner

    from steerlab.cli import app

    result = CliRunner().invoke(app, ["serve", "--tensor-parallel-size", "2"])
    assert result.exit_code == 1
    assert "apply to --engine vllm only" in result.output
    assert "Traceback" not in result.output


def test_operators_and_conditions_travel_text_markers_travel_as_ids() -> None:
    from steerlab.testing import tiny_tokenizer

    vec = sl.SteeringVector({0: torch.tensor([1.0, 0.5])})
    assert to_wire([sl.Steering(vec, op="clamp")])["steering"][0]["op"] == "clamp"
    # project_out vectors ablate by default: the wire says so explicitly
    wire = to_wire([sl.Steering(vec.with_metadata(operation="project_out"))])
    assert wire["steering"][0]["op"] == "ablate"
    gate = sl.Condition(torch.tensor([0.25, -1.0]), layer=0, threshold=0.5, comparison="less")
    (entry,) = resolve(to_wire([sl.Steering(vec, when=gate.per_token())]), n_layers=2, d_model=2)
    assert entry.when is not None and entry.when.scope == "token"
    assert (entry.when.layer, entry.when.threshold, entry.when.comparison) == (0, 0.5, "less")
    assert entry.when.direction.tolist() == [0.25, -1.0] and entry.deltas == {}
    assert entry.params[0]["delta"].tolist() == [1.0, 0.5]  # gated at run time: an edit
    with pytest.raises(sl.InvalidInputError, match="cannot gate steering at layers"):
        late = sl.Condition(torch.ones(2), layer=1, threshold=0.5)
        resolve(to_wire([sl.Steering(vec, when=late)]), n_layers=2, d_model=2)
    # text markers need their token ids on the wire (the workers have no tokenizer)
    with pytest.raises(sl.InvalidInputError, match="travel with their token ids"):
        to_wire([sl.Steering(vec, positions="after:cat")])
    with pytest.raises(sl.InvalidInputError, match="travel with their token ids"):
        validate({"steering": [{"vector": {"0": [1.0, 0.5]}, "positions": "after:cat"}]})
    bound = Positions.parse("between:<think>,</think>").bind(tiny_tokenizer())
    wire = json.loads(json.dumps(to_wire([sl.Steering(vec, positions=bound)])))
    assert wire["steering"][0]["positions"]["ids"] == [
        [list(v) for v in variants] for variants in bound.marker_ids or ()
    ]
    [entry] = resolve(wire, n_layers=2, d_model=2)
    assert entry.positions == bound
    assert to_wire([sl.Steering(vec, positions="first:2")])["steering"][0]["op"] == "add"


def test_worker_decides_text_positions_as_the_library_does() -> None:
    """Positions chosen by text, decided by the runner state over vLLM-like steps (chunked
    prefill, a prefix-cache hit, decode with the newest output id still a placeholder, a
    preempted request recomputed), select exactly the tokens the library's scan selects."""
    from types import SimpleNamespace

    from steerlab.positions import marker_flags

    d = 4
    net = _Net(d, 1)
    state = RunnerSteering(net, n_layers=3, d_model=d)
    vec = sl.SteeringVector({1: torch.ones(d)})
    specs = {
        "a": Positions.after(ids=[5]),
        "b": Positions.between(start_ids=[7, 8], end_ids=[9]),
        "c": Positions.outside(start_ids=[7, 8], end_ids=[9]),
    }
    raws = {k: to_wire([sl.Steering(vec, strength=2.0, positions=p)]) for k, p in specs.items()}
    tokens = {
        "a": [1, 2, 5, 3, 4, 6, 5, 2, 2],
        "b": [7, 8, 1, 9, 2, 7, 8, 3, 3, 9, 4],
        "c": [3, 7, 8, 2, 9, 7, 8, 1, 1, 1],
    }
    prompt = {"a": 4, "b": 6, "c": 5}

    def run(steps: list[dict[str, tuple[int, int, int]]]) -> dict[str, dict[int, float]]:
        """Each step: {request: (first position, count, outputs known)}; per request the
        delta at every absolute position the steps ran."""
        seen: dict[str, dict[int, float]] = {k: {} for k in specs}
        for step in steps:
            rows, ids, pos, start = [], [], [], 0
            for key, (first, count, outputs) in step.items():
                plen = prompt[key]
                known = tokens[key][: plen + outputs]
                output = known[plen:]
                if output and first + count > plen + outputs - 1:
                    output = output[:-1] + [-1]  # async scheduling: not copied back yet
                request = SimpleNamespace(
                    prompt_token_ids=known[:plen], output_token_ids=list(output)
                )
                rows.append((key, raws[key], start, start + count, plen, request))
                ids += tokens[key][first : first + count]
                pos += list(range(first, first + count))
                start += count
            plan = state.plan(
                rows,
                torch.tensor(pos),
                device=torch.device("cpu"),
                dtype=torch.float32,
                input_ids=torch.tensor(ids),
            )
            delta = plan.deltas[1] if plan is not None and 1 in plan.deltas else None
            for key, _, row_start, row_stop, _, _ in rows:
                for row in range(row_start, row_stop):
                    value = 0.0 if delta is None else float(delta[row, 0])
                    seen[key][pos[row]] = value
        return seen

    steps = [
        {"a": (0, 3, 0), "b": (0, 4, 0)},  # chunked prefill
        {"a": (3, 1, 0), "b": (4, 2, 0), "c": (2, 3, 0)},  # c: positions 0-1 were cached
        {"a": (4, 1, 1), "b": (6, 1, 1), "c": (5, 1, 1)},  # decode
        {"a": (5, 1, 2), "b": (7, 1, 2), "c": (6, 1, 2)},
        {"a": (6, 1, 3), "b": (8, 1, 3), "c": (7, 1, 3)},
        {"a": (7, 2, 5), "b": (9, 2, 5), "c": (8, 2, 5)},  # two tokens at once
    ]
    got = run(steps)
    for key, spec in specs.items():
        flags = marker_flags(spec, tokens[key])[0]
        want = {i: 2.0 * flags[i] for i in got[key]}
        assert got[key] == want, key
        assert any(flags) and not all(flags)
    # a preempted request recomputed from position 0 with other tokens starts a new history
    tokens["a"] = [5, 1, 1, 1, 1, 1]
    again = run([{"a": (0, 4, 0)}])["a"]
    assert again == {i: 2.0 for i in range(4)}


def _stand_in_vllm_engine(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Any:
    """A ``VLLMEngine`` over a tiny saved model, built (not started) where vLLM is not installed:
    its request validation runs before vLLM is needed."""
    import importlib.util

    from steerlab.testing import tiny_hf_model, tiny_tokenizer
    from steerlab.vllm.engine import VLLMEngine

    tiny_hf_model("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: object() if name == "vllm" else find_spec(name, *args),
    )
    return VLLMEngine(tmp_path, **options)


def test_vllm_server_engine_takes_when_and_binds_text_positions(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks happen in ``submit``'s validation, before vLLM is needed, so a stand-in for
    the installed package is enough to build the engine behind the real app."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from steerlab.errors import VectorMismatchError
    from steerlab.server.app import create_app
    from steerlab.server.requests import GenerationRequest, SteeringEntry

    engine = _stand_in_vllm_engine(tmp_path, monkeypatch)
    d_model = engine.d_model
    engine.vectors.register("calm", sl.SteeringVector({1: torch.ones(d_model)}))
    engine.conditions.register("gate", sl.Condition(torch.ones(d_model), layer=1, threshold=0.5))
    engine.conditions.register("late", sl.Condition(torch.ones(d_model), layer=2, threshold=0.5))
    with pytest.raises(VectorMismatchError, match="hidden size"):  # as the torch engine
        engine.conditions.register("wide", sl.Condition(torch.ones(3), layer=1, threshold=0.5))
    entry = SteeringEntry("calm", 1.0, "all", when="gate")
    request = GenerationRequest(prompt="the cat", steering=(entry,))
    wire = engine._wire(engine.planner.plan(request), "k")
    assert wire["steering"][0]["when"]["layer"] == 1
    with TestClient(create_app(engine, manage_engine=False)) as client:
        reply = client.post(
            "/v1/completions",
            json={
                "model": "default",
                "prompt": "the cat",
                "max_tokens": 2,
                "steering": [{"vector": "calm", "strength": 1.0, "when": "late"}],
            },
        )
        assert reply.status_code == 400, reply.text
        assert "cannot gate steering at layers [1]" in reply.text
    # text markers leave the engine as the token ids of the served model's tokenizer
    for spec in ("after:cat", "outside:<think>,</think>"):
        request = GenerationRequest(
            prompt="the cat", steering=(SteeringEntry(vector="calm", positions=spec),)
        )
        wire = engine._wire(engine.planner.plan(request), "k")
        want = Positions.parse(spec).bind(engine.tokenizer)
        assert Positions.parse(wire["steering"][0]["positions"]) == want
        assert want.marker_ids


# --- readout --------------------------------------------------------------------------------------
def _probe_wire(key: str, probes: list[tuple[int, torch.Tensor]], steer: Any = None) -> Any:
    wire = to_wire([] if steer is None else [steer])
    wire["readout"] = readout_to_wire(key, probes)
    return json.loads(json.dumps(wire))  # what crosses the process boundary


@pytest.mark.parametrize("ranks", [1, 2])
def test_readout_reads_the_steered_stream_at_each_requests_last_token(ranks: int) -> None:
    """Three requests in one flattened step: the values the hooks keep are the whole residual
    stream after the block (after this step's steering) at each request's last token, dotted
    with the probe, keyed by that token's absolute position, on every simulated rank."""
    torch.manual_seed(1)
    d = 6
    net = _Net(d, ranks)
    x = torch.randn(9, d)
    vec = sl.SteeringVector({1: torch.randn(d)})
    probe_1, probe_2 = torch.randn(d), torch.randn(d)
    # (req_id, tokens start:stop, prompt length, absolute positions, steerlab value)
    a = _probe_wire("ka", [(1, probe_1), (-1, probe_2)], sl.Steering(vec, strength=3.0))
    b = _probe_wire("kb", [(1, probe_1)])
    rows = [("a", a, 0, 4, 4), ("b", b, 4, 5, 3), ("c", None, 5, 9, 4)]
    positions = torch.tensor([0, 1, 2, 3, 7, 0, 1, 2, 3])
    # reference by hand: steer a's rows at block 1, read streams after blocks 1 and 2
    with torch.no_grad():
        h, r = x, None
        streams = []
        for index, layer in enumerate(net.layers):
            h, r = layer(h, r)
            if index == 1:
                r = r.clone()
                r[0:4] += vec[1] * 3.0
            streams.append(h + r)
    want = {
        "ka": [(3, [float(streams[1][3] @ probe_1), float(streams[2][3] @ probe_2)])],
        "kb": [(7, [float(streams[1][4] @ probe_1)])],
    }
    state = RunnerSteering(net, n_layers=3, d_model=d)
    try:
        plan = state.plan(rows, positions, device=torch.device("cpu"), dtype=torch.float32)
        assert plan is not None and set(plan.reads) == {1, 2}
        state.active = plan
        with torch.no_grad():
            net(x)
        state.active = None
        state.record(plan)
        got = state.take(["ka", "kb", "kc"])
        assert state.take(["ka", "kb"]) == {}  # handed over once
    finally:
        state.remove()
    assert set(got) == {"ka", "kb"}
    for key, pairs in want.items():
        assert [p for p, _ in got[key]] == [p for p, _ in pairs]
        for (_, values), (_, expected) in zip(got[key], pairs):
            assert values == pytest.approx(expected, abs=1e-5)
    # the steering moved the value (so the read is after it)
    assert abs(got["ka"][0][1][0] - float((streams[1][3] - vec[1] * 3.0) @ probe_1)) > 1e-3


def test_readout_off_without_the_extension_and_bounded_when_never_fetched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import steerlab.vllm.plugin as plugin

    net = _Net(4, 1)
    wire = _probe_wire("k0", [(0, torch.ones(4))])
    positions = torch.arange(3)
    off = RunnerSteering(net, n_layers=3, d_model=4, readout=False)
    try:
        assert (
            off.plan(
                [("r", wire, 0, 3, 3)], positions, device=torch.device("cpu"), dtype=torch.float32
            )
            is None
        )
    finally:
        off.remove()
    monkeypatch.setattr(plugin, "MAX_READOUT_REQUESTS", 2)
    state = RunnerSteering(net, n_layers=3, d_model=4)
    try:
        for n in range(3):
            w = _probe_wire(f"k{n}", [(0, torch.ones(4))])
            plan = state.plan(
                [(f"r{n}", w, 0, 3, 3)], positions, device=torch.device("cpu"), dtype=torch.float32
            )
            assert plan is not None
            state.active = plan
            with torch.no_grad():
                net(torch.randn(3, 4))
            state.active = None
            state.record(plan)
        assert set(state.take(["k0", "k1", "k2"])) == {"k1", "k2"}  # oldest dropped
    finally:
        state.remove()


def test_worker_extension_hands_over_the_runners_values() -> None:
    from types import SimpleNamespace

    net = _Net(4, 1)
    state = RunnerSteering(net, n_layers=3, d_model=4)
    try:
        wire = _probe_wire("k", [(2, torch.tensor([1.0, 0.0, 0.0, 0.0]))])
        plan = state.plan(
            [("r", wire, 0, 2, 2)],
            torch.tensor([0, 1]),
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        assert plan is not None
        state.active = plan
        with torch.no_grad():
            out = net(torch.randn(2, 4))
        state.active = None
        state.record(plan)
        worker = SimpleNamespace(model_runner=SimpleNamespace(_steerlab_state=state))
        got = ReadoutExtension.steerlab_take_readout(worker, ["k"])  # type: ignore[arg-type]
        assert got == {"k": [(1, [pytest.approx(float(out[1, 0]), abs=1e-6)])]}
        bare = SimpleNamespace(model_runner=SimpleNamespace())
        assert ReadoutExtension.steerlab_take_readout(bare, ["k"]) == {}  # type: ignore[arg-type]
    finally:
        state.remove()


@pytest.mark.parametrize(
    ("readout", "error"),
    [
        ({"key": "k", "probes": [{"layer": 9, "direction": [1.0, 0.0]}]}, sl.LayerIndexError),
        ({"key": "k", "probes": [{"layer": 1, "direction": [1.0]}]}, sl.VectorMismatchError),
        ({"key": "k", "probes": [{"layer": 1, "direction": ["a", "b"]}]}, sl.InvalidInputError),
        ({"key": "k", "probes": [{"layer": 1.5, "direction": [1.0, 0.0]}]}, sl.InvalidInputError),
        ({"key": "k", "probes": [{"layer": 1}]}, sl.InvalidInputError),
        ({"key": 3, "probes": []}, sl.InvalidInputError),
        ([{"layer": 1, "direction": [1.0, 0.0]}], sl.InvalidInputError),
        (
            {"key": "k", "probes": [{"layer": 1, "direction": [float("nan"), 0.0]}]},
            sl.InvalidInputError,
        ),
    ],
)
def test_bad_readout_values_raise(readout: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        resolve_readout({"readout": readout}, n_layers=4, d_model=2)
    if error is sl.InvalidInputError:  # what the API server can check without the model
        with pytest.raises(error):
            validate({"readout": readout})


def test_readout_wire_round_trip_is_exact() -> None:
    direction = torch.randn(8)
    wire = json.loads(json.dumps({"readout": readout_to_wire("k", [(-2, direction)])}))
    validate(wire)
    got = resolve_readout(json.dumps(wire), n_layers=4, d_model=8)
    assert got is not None and got.key == "k" and got.probes[0].layer == 2
    assert torch.equal(got.probes[0].direction, direction)
    with pytest.raises(sl.InvalidInputError, match="unknown steerlab fields"):
        validate({"steering": [], "probes": []})


def test_vllm_server_engine_refuses_readout_with_another_worker_extension(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readout needs steerlab's worker extension; an engine started with another one answers
    readout requests with a 400 naming the torch engine (checked before vLLM is needed)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from steerlab.server.app import create_app

    engine = _stand_in_vllm_engine(tmp_path, monkeypatch, worker_extension_cls="mypkg.MyExtension")
    engine.vectors.register("calm", sl.SteeringVector({1: torch.ones(engine.d_model)}))
    with TestClient(create_app(engine, manage_engine=False)) as client:
        reply = client.post(
            "/v1/completions",
            json={
                "model": "default",
                "prompt": "the cat",
                "max_tokens": 2,
                "readout": [{"vector": "calm", "layer": 1}],
            },
        )
    assert reply.status_code == 400, reply.text
    assert "--engine torch" in reply.json()["error"]["message"]


def _reft(d_model: int) -> sl.SteeringVector:
    from steerlab.operators import loreft_extras

    r = torch.eye(d_model)[:2]
    extras = loreft_extras(r, r * 0.5, torch.tensor([1.0, -2.0]), 1)
    return sl.SteeringVector({1: torch.tensor([1.0, -2.0]) @ r}, extras=extras)


def test_loreft_vectors_are_refused_by_the_plugin_when_added(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reft = _reft(4)
    for term in (sl.Steering(reft), sl.Steering(reft, op="add")):
        with pytest.raises(sl.InvalidInputError, match=r"LoReFT.*op 'add'.*op='loreft'"):
            to_wire([term])
    wire = json.loads(json.dumps(to_wire([sl.Steering(reft, op="loreft")])))
    assert wire["steering"][0]["op"] == "loreft"
    # a LoReFT file named on the wire is refused on the worker side unless op='loreft' is sent
    reft.save(tmp_path / "reft.safetensors")
    sl.SteeringVector(reft.directions).save(tmp_path / "plain.safetensors")
    monkeypatch.setenv("STEERLAB_VLLM_VECTORS", str(tmp_path))
    for entry in ({"vector": "reft"}, {"vector": "reft", "op": "add"}):
        with pytest.raises(sl.InvalidInputError, match="LoReFT"):
            resolve([entry], n_layers=3, d_model=4)
    (named,) = resolve([{"vector": "reft", "op": "loreft"}], n_layers=3, d_model=4)
    (sent,) = resolve(wire, n_layers=3, d_model=4)
    assert named.op == sent.op == "loreft"
    (entry,) = resolve([{"vector": "plain", "strength": 2.0}], n_layers=3, d_model=4)
    assert torch.equal(entry.deltas[1], reft[1] * 2)


def test_vllm_server_engine_answers_an_added_loreft_vector_with_a_400(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from steerlab.server.app import create_app

    engine = _stand_in_vllm_engine(tmp_path, monkeypatch)
    engine.vectors.register("reft", _reft(engine.d_model))
    with TestClient(create_app(engine, manage_engine=False)) as client:
        for entry in ({}, {"op": "add"}):
            reply = client.post(
                "/v1/completions",
                json={
                    "model": "default",
                    "prompt": "the cat",
                    "max_tokens": 2,
                    "steering": [{"vector": "reft", **entry}],
                },
            )
            assert reply.status_code == 400, reply.text
            message = reply.json()["error"]["message"]
            assert "LoReFT intervention" in message and "op='loreft'" in message
