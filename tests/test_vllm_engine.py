"""vLLM (CPU build) steered by steerlab's plugin == steerlab's torch engine, on the default model.

Runs from ``.venv-vllm`` (``make test-vllm``); skipped with the reason elsewhere. One vLLM engine
for the module (fp32; compiled, vLLM's default, or eager with ``STEERLAB_VLLM_EAGER=1``),
the torch engine in the same process as the reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import steerlab as sl

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [
    "The weather today is",
    "My favourite food is",
    "Tell me about your day.",
    "The capital of France is",
    "Once upon a time",
    "I think that people",
    "The best way to learn is",
    "Yesterday I went to the",
]
NEW = 16
POSITION_MODES: list[Any] = ["all", "last", "prompt", "generated", slice(2, None), [0, -1]]


@pytest.fixture(scope="module")
def engines(vllm_eager: bool) -> Iterator[tuple[Any, sl.SteeredModel]]:
    import steerlab.vllm as slv

    # prefix caching stays on (vLLM's default); blocks of 32 tokens (CPU default: 128) so the
    # ~200-token prompts of the cache tests span several blocks
    llm = slv.load(
        max_model_len=512,
        seed=0,
        gpu_memory_utilization=0.5,
        block_size=32,
        enforce_eager=vllm_eager,
    )
    model = sl.load_model()
    try:
        yield llm, model
    finally:
        # stop the engine process now, not at interpreter exit: the next module starts its own
        llm.llm_engine.engine_core.shutdown()


def _vector(model: sl.SteeredModel, layers: list[int], seed: int) -> sl.SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return sl.SteeringVector(
        {layer: torch.randn(model.d_model, generator=gen) / 2.0 for layer in layers}
    )


def _configs(model: sl.SteeredModel) -> list[tuple[str, Any]]:
    one = _vector(model, [15], seed=1)
    four = _vector(model, [6, 10, 14, 18], seed=2)
    out: list[tuple[str, Any]] = [("unsteered", None)]
    for name, vec, strength in (("1 layer", one, 8.0), ("4 layers", four, 4.0)):
        for pos in POSITION_MODES:
            out.append((f"{name} {pos}", sl.Steering(vec, strength=strength, positions=pos)))
    return out


def test_greedy_and_logprobs_equal_torch_engine(engines: tuple[Any, sl.SteeredModel]) -> None:
    import steerlab.vllm as slv

    llm, model = engines
    configs = _configs(model)
    # every config's 8 prompts in one vLLM call: 104 requests batched together
    prompts = [p for _ in configs for p in PROMPTS]
    steering = [s for _, s in configs for _ in PROMPTS]
    got, outputs = slv.generate_ids(
        llm, prompts, steering=steering, max_new_tokens=NEW, logprobs=0, return_outputs=True
    )
    # the torch engine's reference for every config in one batch too (per-row steering, which
    # steerlab's own tests prove equal to running each configuration alone)
    want = model.generate_ids(prompts, steering=steering, max_new_tokens=NEW)
    ref = torch.log_softmax(model.next_token_logits(prompts, steering=steering).double(), dim=-1)
    unsteered = want[: len(PROMPTS)]
    for index, (name, steer) in enumerate(configs):
        rows = range(index * len(PROMPTS), (index + 1) * len(PROMPTS))
        same = sum(torch.equal(got[r], want[r]) for r in rows)
        assert same >= 7, f"{name}: only {same}/8 continuations equal the torch engine's"
        if steer is not None and steer.positions in ("all", "last"):
            moved = sum(not torch.equal(want[r], u) for r, u in zip(rows, unsteered))
            assert moved >= 4, f"{name}: steering changed only {moved}/8 continuations"
        for r in rows:
            first = outputs[r].outputs[0]
            token = first.token_ids[0]
            vllm_lp = first.logprobs[0][token].logprob
            assert abs(vllm_lp - float(ref[r, token])) < 1e-3, (name, r)


def test_mixed_batch_equals_each_alone(engines: tuple[Any, sl.SteeredModel]) -> None:
    import steerlab.vllm as slv

    llm, model = engines
    configs = _configs(model)
    mixed = [configs[0][1], *[s for _, s in configs[1:13:2]], configs[4][1]][:8]
    assert len(mixed) == 8 and mixed[0] is None
    batch, outs = slv.generate_ids(
        llm, PROMPTS, steering=mixed, max_new_tokens=NEW, logprobs=0, return_outputs=True
    )
    for row, steer in enumerate(mixed):
        alone = slv.generate_ids(llm, [PROMPTS[row]], steering=[steer], max_new_tokens=NEW)
        assert torch.equal(batch[row], alone[0]), f"row {row} differs from its solo run"
    # the unsteered row: bit-identical to the same batch with nobody steered (steering of
    # other rows adds exact zeros to its tokens)
    plain, plain_outs = slv.generate_ids(
        llm, PROMPTS, max_new_tokens=NEW, logprobs=0, return_outputs=True
    )
    assert torch.equal(batch[0], plain[0])
    steered_lps = [next(iter(lp.values())).logprob for lp in outs[0].outputs[0].logprobs]
    plain_lps = [next(iter(lp.values())).logprob for lp in plain_outs[0].outputs[0].logprobs]
    assert steered_lps == plain_lps


def test_prefix_caching_positions(engines: tuple[Any, sl.SteeredModel]) -> None:
    """A second request with the same prompt reuses cached blocks: positions stay absolute."""
    import steerlab.vllm as slv

    llm, model = engines
    long = "Write a short story about a robot who learns to paint. " * 6
    steer = sl.Steering(_vector(model, [15], seed=3), strength=8.0, positions="last")
    first = slv.generate_ids(llm, [long], steering=[None], max_new_tokens=NEW)
    second = slv.generate_ids(llm, [long], steering=[steer], max_new_tokens=NEW)
    want = model.generate_ids([long], steering=steer, max_new_tokens=NEW)
    assert torch.equal(second[0], want[0])
    assert not torch.equal(first[0], second[0])


def test_bad_steering_is_refused_before_the_engine(engines: tuple[Any, sl.SteeredModel]) -> None:
    import steerlab.vllm as slv

    llm, _ = engines
    wrong = sl.SteeringVector({3: torch.ones(7)})
    with pytest.raises(sl.VectorMismatchError):
        slv.generate(llm, "hi", steering=wrong, max_new_tokens=2)
    with pytest.raises(sl.LayerIndexError):
        slv.generate(llm, "hi", steering=sl.SteeringVector({99: torch.ones(576)}))
    # the engine keeps serving
    assert isinstance(slv.generate(llm, "hi", max_new_tokens=2), str)


# --- prefix cache: steering never leaks through cached blocks ---------------------------------
LONG = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, "
    "a notebook and a flask of tea. From the gallery he could see the harbour, the fishing "
    "boats coming home, the gulls circling above the nets and the long grey line of the cliffs "
    "to the north. He wrote down the wind, the colour of the sea and the names of the boats "
    "that passed, as his father had done before him and his grandfather before that. One "
    "night in late autumn a storm came in from the west, faster than any he had seen, and the "
    "lamp began to flicker just as a small boat rounded the point. He trimmed the wick, wiped "
    "the glass and kept the light turning until morning, when the boat was safe in the "
    "harbour and the storm had blown itself out over the hills. The fishermen came up the hill "
    "in the afternoon with bread, smoked fish and a bottle of wine, and they sat with him in "
    "the kitchen. Tell me what happened next:"
)
BLOCK = 32


def _request(llm: Any, prompt_ids: list[int], steer: Any, new: int) -> tuple[list[int], Any]:
    """One greedy request (EOS ignored: fixed lengths); its tokens and vLLM output."""
    import vllm
    from vllm.inputs import TokensPrompt

    import steerlab.vllm as slv

    params = vllm.SamplingParams(
        max_tokens=new,
        temperature=0.0,
        ignore_eos=True,
        logprobs=0,
        extra_args=slv.extra_args(steer) or None,
    )
    (out,) = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)
    return list(out.outputs[0].token_ids), out


def _logprobs(out: Any) -> list[float]:
    return [next(iter(lp.values())).logprob for lp in out.outputs[0].logprobs]


def _fresh(llm: Any, prompt_ids: list[int], steer: Any, new: int) -> tuple[list[int], Any]:
    """The request on an empty prefix cache (what a fresh engine computes)."""
    assert llm.reset_prefix_cache()
    tokens, out = _request(llm, prompt_ids, steer, new)
    assert out.num_cached_tokens == 0
    return tokens, out


def _same(got: tuple[list[int], Any], want: tuple[list[int], Any], what: str) -> None:
    assert got[0] == want[0], f"{what}: tokens differ from a fresh engine's"
    worst = max(abs(a - b) for a, b in zip(_logprobs(got[1]), _logprobs(want[1])))
    assert worst < 1e-3, f"{what}: logprobs differ by {worst}"


def test_prefix_cache_keeps_steering_apart(engines: tuple[Any, sl.SteeredModel]) -> None:
    """Issue 18: plain -> steered -> plain -> steered on one ~200-token prompt, each equal to
    its output on an empty cache; hits only between identical steering."""
    llm, model = engines
    ids = model.tokenizer(LONG)["input_ids"]
    assert 190 <= len(ids) <= 230, len(ids)
    steer = sl.Steering(_vector(model, [12], seed=7), strength=8.0, positions="all")
    fresh_plain = _fresh(llm, ids, None, 24)
    fresh_steered = _fresh(llm, ids, steer, 24)
    assert fresh_plain[0] != fresh_steered[0]  # the steering shows in the text

    assert llm.reset_prefix_cache()
    full = len(ids) // BLOCK * BLOCK
    runs = [(None, fresh_plain), (steer, fresh_steered)] * 2
    cached = []
    for turn, (s, want) in enumerate(runs):
        got = _request(llm, ids, s, 24)
        _same(got, want, f"turn {turn} ({'steered' if s else 'plain'})")
        cached.append(got[1].num_cached_tokens)
    # nothing shared across the steering boundary; the repeats hit every full prompt block
    assert cached == [0, 0, full, full], cached


def test_prefix_cache_two_steerings_interleaved(engines: tuple[Any, sl.SteeredModel]) -> None:
    llm, model = engines
    ids = model.tokenizer(LONG)["input_ids"]
    vec = _vector(model, [12], seed=7)
    a = sl.Steering(vec, strength=8.0, positions="all")
    b = sl.Steering(vec, strength=4.0, positions="all")
    # the same content written another way shares the cache with `a`
    a_again = sl.Steering(vec, strength={12: 8.0}, positions="prompt")
    fresh = {"a": _fresh(llm, ids, a, 16), "b": _fresh(llm, ids, b, 16)}
    assert fresh["a"][0] != fresh["b"][0]
    assert llm.reset_prefix_cache()
    full = len(ids) // BLOCK * BLOCK
    cached = []
    for name, s in (("a", a), ("b", b), ("a", a), ("b", b)):
        got = _request(llm, ids, s, 16)
        _same(got, fresh[name], name)
        cached.append(got[1].num_cached_tokens)
    assert cached == [0, 0, full, full], cached
    # over the prompt, "prompt" and "all" steer the same tokens with the same delta
    got = _request(llm, ids, a_again, 16)
    assert got[1].num_cached_tokens == full


def test_prefix_cache_shares_unsteered_blocks(engines: tuple[Any, sl.SteeredModel]) -> None:
    """Steering from the last prompt token, or of generated tokens only, keeps every block
    before it shared with unsteered requests; a generated-only steered request's generated
    blocks are not reused by a later plain prompt that contains them."""
    llm, model = engines
    ids = model.tokenizer(LONG)["input_ids"]
    vec = _vector(model, [12], seed=7)
    last = sl.Steering(vec, strength=8.0, positions="last")
    generated = sl.Steering(vec, strength=8.0, positions="generated")
    fresh_last = _fresh(llm, ids, last, 16)
    fresh_generated = _fresh(llm, ids, generated, 32)
    assert llm.reset_prefix_cache()
    _request(llm, ids, None, 8)
    full = len(ids) // BLOCK * BLOCK
    last_len = (len(ids) - 1) // BLOCK * BLOCK  # blocks before the last prompt token
    got = _request(llm, ids, last, 16)
    _same(got, fresh_last, "last")
    assert got[1].num_cached_tokens == last_len
    got = _request(llm, ids, generated, 32)
    _same(got, fresh_generated, "generated")
    assert got[1].num_cached_tokens == full
    # a follow-up whose prompt is that prompt plus the steered continuation
    follow = ids + got[0]
    want = _fresh(llm, follow, None, 8)
    assert llm.reset_prefix_cache()
    _request(llm, ids, generated, 32)
    again = _request(llm, follow, None, 8)
    _same(again, want, "follow-up")
    assert again[1].num_cached_tokens == full  # the prompt blocks only


# --- operators other than add, mixed per row ----------------------------------------------------
def test_operators_equal_the_library_mixed_per_row(engines: tuple[Any, sl.SteeredModel]) -> None:
    """Every operator on the vLLM wire == the library's, one operator per row of one batch
    (greedy tokens; first-token logprobs within 1e-3), unsteered rows untouched."""
    import steerlab.vllm as slv

    llm, model = engines
    gen = torch.Generator().manual_seed(11)
    d = model.d_model

    def rand() -> torch.Tensor:
        return torch.randn(d, generator=gen)

    vec = sl.SteeringVector({15: rand() / 2, 10: rand() / 2})
    wide = sl.SteeringVector({layer: rand() for layer in range(4, 28, 2)})
    with_extras = vec.with_extras(
        plane={15: rand(), 10: rand()}, reference={15: rand() / 4, 10: rand() / 4}
    )
    rows: list[Any] = [
        None,
        sl.Steering(vec, strength=8.0, op="add_norm", positions="all"),
        sl.Steering(vec, strength=6.0, op="clamp", positions="last"),
        sl.Steering(vec, strength=-5.0, op="cap", positions="all"),
        sl.Steering(wide, op="ablate", positions="prompt"),
        sl.Steering(with_extras, strength=120.0, op="rotate", positions="all"),
        sl.Steering(with_extras, strength=3.0, op="affine", positions="generated"),
        sl.Steering(vec, strength=8.0, positions="all"),
    ]
    prompts = PROMPTS[: len(rows)]
    got, outputs = slv.generate_ids(
        llm, prompts, steering=rows, max_new_tokens=NEW, logprobs=0, return_outputs=True
    )
    want = model.generate_ids(prompts, steering=rows, max_new_tokens=NEW)
    ref = torch.log_softmax(model.next_token_logits(prompts, steering=rows).double(), dim=-1)
    plain = model.generate_ids(prompts, max_new_tokens=NEW)
    worst = 0.0
    for row, steer in enumerate(rows):
        name = "unsteered" if steer is None else steer.resolved_op
        assert torch.equal(got[row], want[row]), f"row {row} ({name}) differs from the library"
        first = outputs[row].outputs[0]
        token = first.token_ids[0]
        worst = max(worst, abs(first.logprobs[0][token].logprob - float(ref[row, token])))
        if steer is not None:
            assert not torch.equal(want[row], plain[row]), f"{name} changed nothing"
    assert worst < 1e-3, worst
    print(f"operators on vLLM vs the library: first-token logprob max |difference| {worst:.1e}")


# --- when= conditions, mixed per row ----------------------------------------------------------
def test_conditions_equal_the_library_mixed_per_row(engines: tuple[Any, sl.SteeredModel]) -> None:
    """``when=`` on vLLM == the library: prompt-level verdicts (some rows fire, some do not)
    and a per-token gate, in one batch with unconditioned and unsteered rows."""
    import steerlab.vllm as slv

    llm, model = engines
    gen = torch.Generator().manual_seed(21)
    direction = torch.randn(model.d_model, generator=gen)
    vec = sl.SteeringVector({12: torch.randn(model.d_model, generator=gen) / 2})
    prompts = PROMPTS[:6]
    scores = sl.Condition(direction, layer=8, threshold=0.0).scores(model, prompts)
    # halfway between the middle scores: no row sits on the threshold within float noise
    middle = float(scores[:4].sort().values[1:3].mean())
    prompt_gate = sl.Condition(direction, layer=8, threshold=middle)
    fired = prompt_gate.test(scores).tolist()
    assert any(fired[:4]) and not all(fired[:4])
    token_gate = prompt_gate.per_token()
    rows: list[Any] = [sl.Steering(vec, strength=8.0, when=prompt_gate) for _ in range(4)]
    rows += [sl.Steering(vec, strength=8.0, op="add_norm", when=token_gate), None]
    got = slv.generate_ids(llm, prompts, steering=rows, max_new_tokens=NEW)
    want = model.generate_ids(prompts, steering=rows, max_new_tokens=NEW)
    plain = model.generate_ids(prompts, max_new_tokens=NEW)
    always = model.generate_ids(
        prompts, steering=sl.Steering(vec, strength=8.0), max_new_tokens=NEW
    )
    for row in range(len(rows)):
        assert torch.equal(got[row], want[row]), f"row {row} differs from the library"
    for row in range(4):  # fired rows are steered, the others untouched
        assert torch.equal(want[row], always[row] if fired[row] else plain[row]), row
    assert not torch.equal(want[4], plain[4])  # the token gate let some tokens through


def test_steering_ops_split_piecewise_cuda_graphs() -> None:
    """On vLLM's piecewise compilation (CUDA), steerlab's ops are splitting ops and full CUDA
    graphs (which would replay the captured step's steering) give way to piecewise ones."""
    from vllm.config.compilation import CompilationConfig, CompilationMode, CUDAGraphMode

    from steerlab.vllm.plugin import STEER_OPS, register

    register()
    config = CompilationConfig(
        mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE
    )
    config.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    assert config.splitting_ops is not None and set(STEER_OPS) <= set(config.splitting_ops)
    assert config.splitting_ops_contain_attention()  # vLLM's own splits are kept
    assert config.cudagraph_mode == CUDAGraphMode.PIECEWISE


def test_text_positions_equal_the_library_mixed_per_row(
    engines: tuple[Any, sl.SteeredModel],
) -> None:
    """Positions chosen by text on vLLM == the library, one spec per row of one batch: markers
    in the prompt, a marker that only appears among the generated tokens (so the steering
    starts mid-generation), a block opened in the prompt and closed in the generation, its
    complement with another operator, and markers given as token ids (greedy tokens exact;
    first-token logprobs within 1e-3)."""
    import steerlab.vllm as slv

    llm, model = engines
    vec = _vector(model, [10, 15], seed=5)
    prompts = PROMPTS[:6]
    plain = model.generate_ids(prompts, max_new_tokens=NEW)

    def fresh(row: int) -> tuple[int, str]:
        """An unsteered generated token of ``row`` whose text appears nowhere before it: a
        marker the steered generation also reaches, with nothing steered before it."""
        for index in range(3, NEW):
            text = str(model.tokenizer.decode([int(plain[row][index])])).strip()
            before = prompts[row] + str(model.tokenizer.decode(plain[row][:index].tolist()))
            if text.isalpha() and text not in before:
                return index, text
        raise AssertionError(f"no fresh word in row {row}")

    (at2, word2), (_, word3) = fresh(2), fresh(3)
    rows: list[Any] = [
        None,
        sl.Steering(vec, strength=8.0, positions="after:favourite"),
        sl.Steering(vec, strength=8.0, positions=f"after:{word2}"),
        sl.Steering(vec, strength=8.0, positions=f"between:capital,{word3}"),
        sl.Steering(vec, strength=6.0, op="add_norm", positions="outside:upon,time"),
        sl.Steering(
            vec,
            strength=8.0,
            positions=sl.Positions.after(ids=model.tokenizer(" think")["input_ids"]),
        ),
    ]
    got, outputs = slv.generate_ids(
        llm, prompts, steering=rows, max_new_tokens=NEW, logprobs=0, return_outputs=True
    )
    want = model.generate_ids(prompts, steering=rows, max_new_tokens=NEW)
    ref = torch.log_softmax(model.next_token_logits(prompts, steering=rows).double(), dim=-1)
    worst = 0.0
    for row, steer in enumerate(rows):
        spec = "unsteered" if steer is None else sl.Positions.parse(steer.positions).describe()
        assert torch.equal(got[row], want[row]), f"row {row} ({spec}) differs from the library"
        first = outputs[row].outputs[0]
        token = first.token_ids[0]
        worst = max(worst, abs(first.logprobs[0][token].logprob - float(ref[row, token])))
        if steer is not None:
            assert not torch.equal(want[row], plain[row]), f"{spec} changed nothing"
    # the generated marker starts the steering mid-generation: the first tokens are unsteered
    assert torch.equal(want[2][:at2], plain[2][:at2]) and not torch.equal(want[2], plain[2])
    assert worst < 1e-3, worst
    print(f"text positions on vLLM vs the library: first-token logprob max |diff| {worst:.1e}")
