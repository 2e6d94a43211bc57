"""The hostile-user attack table of issue 9: bad input → the error class → words in its message.

Each :class:`Attack` is one misuse of a public entry point. ``tests/test_errors.py`` runs every
row as a parametrized test; run this file directly to count how the library fares:

    PYTHONPATH=src python tests/attack_table.py

which prints ``attempts / clean refusals / wrong refusals / silently accepted / crashes``.
A *clean refusal* raises the expected :class:`steerlab.errors.SteerlabError` subclass (which is
also the expected builtin) with every listed word in its message; a *crash* is any exception
that is not a ``SteerlabError``; *silently accepted* means no error where one was due (or a
row without an expected error whose own assertion failed). CLI rows run the real command
through typer's runner and expect an exit code, words on stderr, and no traceback.

Adding a future entry point is one row in :data:`ATTACKS` (library) or :data:`CLI_ATTACKS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import steerlab as sl
from steerlab import errors


@dataclasses.dataclass
class Context:
    """What the attacks work on: a tiny model, a scratch folder and a few saved files."""

    model: Any
    other: Any
    tmp: Path
    vec: Any
    vec_file: Path

    def vector(self, layers: tuple[int, ...] = (1,), **meta: Any) -> Any:
        return sl.SteeringVector(
            {layer: torch.ones(self.model.d_model) for layer in layers}, metadata=meta
        )

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path


def make_context(tmp: Path, *, model: Any = None, other: Any = None) -> Context:
    """A fresh context in ``tmp``; pass the tiny models to reuse them across rows."""
    from steerlab.testing import tiny_model

    model = tiny_model("llama") if model is None else model
    other = tiny_model("llama", seed=1) if other is None else other
    vec = sl.mean_diff(model, ["i love it"], ["i hate it"], layers=[1])
    vec_file = vec.save(tmp / "good.safetensors")
    return Context(model=model, other=other, tmp=tmp, vec=vec, vec_file=vec_file)


Run = Callable[[Context], object]


@dataclasses.dataclass(frozen=True)
class Attack:
    """One misuse: ``run(ctx)`` must raise ``error`` with ``words`` in its message.

    With ``error=None`` the call must succeed and ``run`` itself asserts that the result is
    right (a copy kept, metadata merged): an ``AssertionError`` counts as silently wrong.
    """

    name: str
    run: Run
    error: type[BaseException] | None
    words: tuple[str, ...] = ()
    also: type[BaseException] | None = None  # the builtin the error must also be

    @property
    def id(self) -> str:
        return self.name


# --- helpers building corrupt files ----------
def _safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def _old_vector(ctx: Context, tensors: dict[str, torch.Tensor], **meta: str) -> bytes:
    """A schema-1 file (no checksum), as written by earlier steerlab versions."""
    header = {"format": "steerlab.vector", "schema_version": "1", **meta}
    return _safetensors(tensors, header)


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def _header_end(data: bytes) -> int:
    return 8 + int(struct.unpack("<Q", data[:8])[0])


def _flip_tensor_bit(ctx: Context) -> Path:
    data = ctx.vec_file.read_bytes()
    return ctx.file("flipped_data.safetensors", _flip(data, len(data) - 3, 5))


def _rename_layer(ctx: Context) -> Path:
    data = ctx.vec_file.read_bytes()
    end = _header_end(data)
    header = data[:end].replace(b'"layer.1"', b'"layer.0"')  # one bit: '1' -> '0'
    assert header != data[:end]
    return ctx.file("renamed_layer.safetensors", header + data[end:])


def _drop_fingerprint(ctx: Context) -> Path:
    data = ctx.vec_file.read_bytes()
    end = _header_end(data)
    header = data[:end].replace(b'"unembed_fingerprint"', b'"unembed_fingerprinu"')
    assert header != data[:end]
    return ctx.file("no_fingerprint.safetensors", header + data[end:])


def _means(ctx: Context) -> Any:
    from steerlab.ablation import compute_means

    return compute_means(ctx.model, ["the cat"], layers=[1])


def _gguf(ctx: Context) -> Path:
    return sl.export_gguf(ctx.vec, ctx.tmp / "good.gguf")


@contextlib.contextmanager
def _failing_replace() -> Iterator[None]:
    """``os.replace`` refused as in a read-only folder (root ignores chmod, so it is faked)."""
    real = os.replace

    def refuse(src: Any, dst: Any) -> None:
        raise PermissionError(13, "Permission denied", str(src))

    os.replace = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        os.replace = real


def _no_stray(folder: Path) -> None:
    stray = [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".old-" in p.name]
    stray += [p.name for p in folder.iterdir() if ".bake-" in p.name]
    assert not stray, f"stray files left: {stray}"


def _save_read_only(ctx: Context) -> None:
    folder = ctx.tmp / "readonly"
    folder.mkdir(exist_ok=True)
    try:
        with _failing_replace():
            ctx.vec.save(folder / "v.safetensors")
    finally:
        _no_stray(folder)


def _gguf_read_only(ctx: Context) -> None:
    folder = ctx.tmp / "readonly_gguf"
    folder.mkdir(exist_ok=True)
    try:
        with _failing_replace():
            sl.export_gguf(ctx.vec, folder / "v.gguf")
    finally:
        _no_stray(folder)


def _bake_over_user_folder(ctx: Context) -> None:
    folder = ctx.tmp / "precious"
    folder.mkdir(exist_ok=True)
    (folder / "thesis.txt").write_text("years of work")
    try:
        sl.bake(ctx.model, ctx.vec, folder, overwrite=True)
    finally:
        assert (folder / "thesis.txt").is_file(), "bake deleted a folder that was not a bake"


def _bake_over_file(ctx: Context) -> None:
    target = ctx.file("a_file", b"data")
    try:
        sl.bake(ctx.model, ctx.vec, target, overwrite=True)
    finally:
        assert target.read_bytes() == b"data"


def _bake_failure_leaves_nothing(ctx: Context) -> None:
    folder = ctx.tmp / "bakes"
    folder.mkdir(exist_ok=True)
    hf = ctx.model.hf_model
    real = type(hf).save_pretrained

    def broken(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    type(hf).save_pretrained = broken  # type: ignore[method-assign]
    try:
        sl.bake(ctx.model, ctx.vec, folder / "baked")
    finally:
        type(hf).save_pretrained = real  # type: ignore[method-assign]
        _no_stray(folder)
        assert not (folder / "baked").exists()


def _steering_copies_dict(ctx: Context) -> None:
    strengths = {1: 2.0}
    steering = sl.Steering(ctx.vec, strength=strengths)
    strengths[1] = float("nan")
    strengths[2] = 5.0
    assert dict(steering.strength) == {1: 2.0}, "Steering kept a reference to the caller's dict"  # type: ignore[arg-type]


def _sum_keeps_fingerprint(ctx: Context) -> None:
    bare = sl.SteeringVector({1: torch.ones(ctx.model.d_model)})
    for total in (bare + ctx.vec, ctx.vec + bare):
        assert (
            total.metadata.get("unembed_fingerprint") == ctx.vec.metadata["unembed_fingerprint"]
        ), "arithmetic dropped the model fingerprint"


def _sum_other_model(ctx: Context) -> object:
    theirs = sl.mean_diff(ctx.other, ["i love it"], ["i hate it"], layers=[1])
    return ctx.vec + theirs


def _old_file_loads(ctx: Context) -> None:
    data = _old_vector(ctx, {"layer.2": torch.arange(4.0)}, method='"manual"')
    vec = sl.SteeringVector.load(ctx.file("old.safetensors", data))
    assert vec.layers == (2,) and vec[2].tolist() == [0.0, 1.0, 2.0, 3.0]


def _one_row_list_in_steer(ctx: Context) -> object:
    with ctx.model.steer([ctx.vec]):
        return ctx.model.logits(["a", "b c", "d"])


def _long_prompt(ctx: Context) -> str:
    return " ".join(["cat"] * 200)


# --- the table ----------
IIE = errors.InvalidInputError
VME = errors.VectorMismatchError
VFE = errors.VectorFileError

ATTACKS: list[Attack] = [
    # batch sizes
    Attack(
        "generate batch_size=0",
        lambda c: c.model.generate(["a"], batch_size=0),
        IIE,
        ("batch_size",),
    ),
    Attack(
        "generate batch_size=-1",
        lambda c: c.model.generate(["a"], batch_size=-1),
        IIE,
        ("batch_size",),
    ),
    Attack(
        "logits batch_size=0", lambda c: c.model.logits(["a"], batch_size=0), IIE, ("batch_size",)
    ),
    Attack(
        "next_token_logits batch_size=-2",
        lambda c: c.model.next_token_logits(["a"], batch_size=-2),
        IIE,
        ("batch_size",),
    ),
    Attack(
        "activations batch_size=0",
        lambda c: c.model.activations(["a"], batch_size=0),
        IIE,
        ("batch_size",),
    ),
    Attack(
        "logits batch_size=1.5",
        lambda c: c.model.logits(["a", "b"], batch_size=1.5),
        IIE,
        ("batch_size",),
    ),
    # integers only: layers, positions, strength keys
    Attack(
        "activations layers=[1.5]",
        lambda c: c.model.activations(["a"], layers=[1.5]),
        IIE,
        ("layer", "integer"),
    ),
    Attack(
        "activations layers=[True]",
        lambda c: c.model.activations(["a"], layers=[True]),
        IIE,
        ("layer", "integer"),
    ),
    Attack(
        "activations layers=1.5",
        lambda c: c.model.activations(["a"], layers=1.5),
        IIE,
        ("layer", "integer"),
    ),
    Attack(
        "Steering layers=[1.5]",
        lambda c: sl.Steering(c.vec, layers=[1.5]),
        IIE,
        ("layer", "integer"),
    ),
    Attack(
        "Steering layers=[True]",
        lambda c: sl.Steering(c.vec, layers=[True]),
        IIE,
        ("layer", "integer"),
    ),
    Attack(
        "Steering strength key 1.5",
        lambda c: sl.Steering(c.vec, strength={1.5: 1.0}),
        IIE,
        ("strength", "integer"),
    ),
    Attack(
        "Steering strength key True",
        lambda c: sl.Steering(c.vec, strength={True: 1.0}),
        IIE,
        ("strength", "integer"),
    ),
    Attack(
        "steer layers=[1.5]",
        lambda c: c.model.steer(c.vec, layers=[1.5]).__enter__(),
        IIE,
        ("layer", "integer"),
    ),
    Attack(
        "positions=[1.5]",
        lambda c: c.model.logits(["a b"], steering=c.vec, positions=[1.5]),
        IIE,
        ("position",),
    ),
    Attack(
        "positions=[True]",
        lambda c: c.model.logits(["a b"], steering=c.vec, positions=[True]),
        IIE,
        ("position",),
    ),
    Attack(
        "from_tensor layers=[1.5]",
        lambda c: sl.SteeringVector.from_tensor(torch.ones(4), layers=[1.5]),
        VME,
        ("layer", "int"),
    ),
    Attack(
        "from_tensor layers=[True]",
        lambda c: sl.SteeringVector.from_tensor(torch.ones(4), layers=[True]),
        VME,
        ("layer", "int"),
    ),
    Attack("vector key 1.5", lambda c: sl.SteeringVector({1.5: torch.ones(4)}), VME, ("layer",)),
    # per-row lists and strength dicts
    Attack("steer([vec]) on 3 prompts", _one_row_list_in_steer, IIE, ("1 entries", "3")),
    Attack("strength={}", lambda c: sl.Steering(c.vec, strength={}), IIE, ("strength", "empty")),
    Attack(
        "strength keys -1 and 2 collide",
        lambda c: c.model.logits(["a"], steering=sl.Steering(c.vec, strength={-1: 1.0, 2: 2.0})),
        IIE,
        ("layer 2", "twice"),
    ),
    Attack(
        "layers [2, -1] collide",
        lambda c: c.model.logits(["a"], steering=sl.Steering(c.vec, layers=[2, -1])),
        IIE,
        ("layer 2", "twice"),
    ),
    # strengths
    Attack(
        "strength=nan",
        lambda c: c.model.logits(["a"], steering=c.vec, strength=float("nan")),
        IIE,
        ("strength", "finite"),
    ),
    Attack(
        "strength=inf in dict",
        lambda c: sl.Steering(c.vec, strength={1: float("inf")}),
        IIE,
        ("strength", "finite"),
    ),
    Attack(
        "strength=1e300 overflows",
        lambda c: c.model.logits(["a"], steering=c.vec, strength=1e300),
        IIE,
        ("strength", "overflow"),
    ),
    Attack(
        "strength=True", lambda c: sl.Steering(c.vec, strength=True), IIE, ("strength", "number")
    ),
    Attack("strength='2'", lambda c: sl.Steering(c.vec, strength="2"), IIE, ("strength", "number")),
    Attack("Steering copies the strength dict", _steering_copies_dict, None),
    # vector arithmetic and operations
    Attack("a + b keeps a fingerprint", _sum_keeps_fingerprint, None),
    Attack("a + b of different models", _sum_other_model, VME, ("different models",)),
    Attack(
        "project_out vector added",
        lambda c: c.model.logits(
            ["a"], steering=c.vec.with_metadata(operation="project_out"), op="add"
        ),
        VME,
        ("project_out", "DirectionalAblation"),
    ),
    Attack("vec[99]", lambda c: c.vec[99], errors.LayerNotFoundError, ("99",), KeyError),
    Attack("vec['1']", lambda c: c.vec["1"], errors.LayerNotFoundError, ("'1'",), KeyError),
    Attack(
        "vec.select([99])",
        lambda c: c.vec.select([99]),
        errors.LayerNotFoundError,
        ("99",),
        KeyError,
    ),
    Attack("zero-size direction", lambda c: sl.SteeringVector({0: torch.ones(0)}), VME, ("empty",)),
    # sampling options
    Attack(
        "temperature=0",
        lambda c: c.model.generate(["a"], do_sample=True, temperature=0.0),
        IIE,
        ("temperature",),
    ),
    Attack(
        "temperature=-1",
        lambda c: c.model.generate(["a"], do_sample=True, temperature=-1.0),
        IIE,
        ("temperature",),
    ),
    Attack(
        "temperature=nan",
        lambda c: c.model.generate(["a"], do_sample=True, temperature=float("nan")),
        IIE,
        ("temperature",),
    ),
    Attack(
        "top_k=-1", lambda c: c.model.generate(["a"], do_sample=True, top_k=-1), IIE, ("top_k",)
    ),
    Attack(
        "top_p=0", lambda c: c.model.generate(["a"], do_sample=True, top_p=0.0), IIE, ("top_p",)
    ),
    Attack(
        "top_p=1.5", lambda c: c.model.generate(["a"], do_sample=True, top_p=1.5), IIE, ("top_p",)
    ),
    Attack("seed=-1", lambda c: c.model.generate(["a"], do_sample=True, seed=-1), IIE, ("seed",)),
    Attack("seed='x'", lambda c: c.model.generate(["a"], do_sample=True, seed="x"), IIE, ("seed",)),
    Attack("seed=1.5", lambda c: c.model.generate(["a"], do_sample=True, seed=1.5), IIE, ("seed",)),
    Attack(
        "max_new_tokens=1.5",
        lambda c: c.model.generate(["a"], max_new_tokens=1.5),
        IIE,
        ("max_new_tokens",),
    ),
    Attack(
        "max_new_tokens=True",
        lambda c: c.model.generate(["a"], max_new_tokens=True),
        IIE,
        ("max_new_tokens",),
    ),
    # run_from misuse
    Attack("run_from(not a cache)", lambda c: c.model.run_from("the cat"), IIE, ("PrefixCache",)),
    Attack(
        "run_from repeat=0",
        lambda c: c.model.run_from(c.model.prefix_cache(["a"], layer=1), repeat=0),
        IIE,
        ("repeat",),
    ),
    Attack(
        "run_from repeat=1.5",
        lambda c: c.model.run_from(c.model.prefix_cache(["a"], layer=1), repeat=1.5),
        IIE,
        ("repeat",),
    ),
    Attack(
        "run_from rows mismatch",
        lambda c: c.model.run_from(
            c.model.prefix_cache(["a"], layer=1), repeat=2, steering=[c.vec]
        ),
        IIE,
        ("1 entries", "2"),
    ),
    Attack(
        "prefix_cache layer=1.5",
        lambda c: c.model.prefix_cache(["a"], layer=1.5),
        IIE,
        ("layer", "integer"),
    ),
    # loading
    Attack(
        "load_model bad dtype",
        lambda c: sl.load_model(str(c.tmp), dtype="float33"),
        IIE,
        ("dtype", "float33"),
    ),
    Attack(
        "load_model bad device",
        lambda c: sl.load_model(str(c.tmp), device="gpu9"),
        IIE,
        ("device", "gpu9"),
    ),
    # prompts longer than the context
    Attack(
        "logits prompt > context",
        lambda c: c.model.logits([_long_prompt(c)]),
        IIE,
        ("context", "128"),
    ),
    Attack(
        "generate prompt + new tokens > context",
        lambda c: c.model.generate([" ".join(["cat"] * 120)], max_new_tokens=20),
        IIE,
        ("context", "128"),
    ),
    # writing files
    Attack(
        "save into a directory",
        lambda c: c.vec.save(c.tmp),
        errors.FileWriteError,
        ("directory", "tmp"),
        OSError,
    ),
    Attack(
        "save into a read-only folder",
        _save_read_only,
        errors.FileWriteError,
        ("readonly", "v.safetensors", "Permission denied"),
        OSError,
    ),
    Attack(
        "means save into a directory",
        lambda c: _means(c).save(c.tmp),
        errors.FileWriteError,
        ("directory",),
        OSError,
    ),
    Attack(
        "export_gguf into a directory",
        lambda c: sl.export_gguf(c.vec, c.tmp),
        errors.FileWriteError,
        ("directory",),
        OSError,
    ),
    Attack(
        "export_gguf read-only folder",
        _gguf_read_only,
        errors.FileWriteError,
        ("v.gguf", "Permission denied"),
        OSError,
    ),
    Attack(
        "export_gguf strength=nan",
        lambda c: sl.export_gguf(c.vec, c.tmp / "nan.gguf", strength=float("nan")),
        IIE,
        ("strength", "finite"),
    ),
    Attack(
        "bake overwrite a non-bake folder",
        _bake_over_user_folder,
        errors.BakeError,
        ("precious", "not a folder written by bake"),
    ),
    Attack("bake overwrite a file", _bake_over_file, errors.BakeError, ("a_file", "not a folder")),
    Attack(
        "bake failure leaves no stray folders",
        _bake_failure_leaves_nothing,
        errors.FileWriteError,
        ("baked", "No space left"),
    ),
    # reading files
    Attack(
        "ActivationMeans.load(dir)",
        lambda c: sl.ActivationMeans.load(c.tmp),
        errors.VectorFileNotFoundError,
        ("means", "directory"),
        FileNotFoundError,
    ),
    Attack(
        "SteeringVector.load(dir)",
        lambda c: sl.SteeringVector.load(c.tmp),
        errors.VectorFileNotFoundError,
        ("directory",),
        FileNotFoundError,
    ),
    Attack(
        "load: bit flipped in tensor data",
        lambda c: sl.SteeringVector.load(_flip_tensor_bit(c)),
        VFE,
        ("flipped_data", "checksum"),
    ),
    Attack(
        "load: layer.1 renamed layer.0",
        lambda c: sl.SteeringVector.load(_rename_layer(c)),
        VFE,
        ("renamed_layer", "checksum"),
    ),
    Attack(
        "load: fingerprint key flipped",
        lambda c: sl.SteeringVector.load(_drop_fingerprint(c)),
        VFE,
        ("no_fingerprint", "checksum"),
    ),
    Attack(
        "load: NaN in metadata",
        lambda c: sl.SteeringVector.load(
            c.file(
                "nan_meta.safetensors",
                _old_vector(c, {"layer.1": torch.ones(4)}, recommended_strength="NaN"),
            )
        ),
        VFE,
        ("nan_meta", "recommended_strength"),
    ),
    Attack(
        "load: absurd layer number",
        lambda c: sl.SteeringVector.load(
            c.file("huge_layer.safetensors", _old_vector(c, {"layer.99999999999": torch.ones(4)}))
        ),
        VFE,
        ("huge_layer", "layer"),
    ),
    Attack(
        "load: empty direction",
        lambda c: sl.SteeringVector.load(
            c.file("empty.safetensors", _old_vector(c, {"layer.1": torch.ones(0)}))
        ),
        VFE,
        ("empty.safetensors", "empty"),
    ),
    Attack(
        "load: inf in tensor",
        lambda c: sl.SteeringVector.load(
            c.file(
                "inf.safetensors", _old_vector(c, {"layer.1": torch.tensor([1.0, float("inf")])})
            )
        ),
        VFE,
        ("inf.safetensors", "NaN or inf"),
    ),
    Attack("load: old file without checksum", _old_file_loads, None),
    Attack(
        "means: bit flipped in tensor data",
        lambda c: sl.ActivationMeans.load(
            c.file(
                "means_flip.safetensors",
                _flip(_means(c).save(c.tmp / "m.safetensors").read_bytes(), -3, 4),
            )
        ),
        VFE,
        ("means_flip", "checksum"),
    ),
    Attack(
        "read_gguf: not a GGUF",
        lambda c: sl.read_gguf(c.file("text.gguf", b"hello, this is not a gguf file at all")),
        VFE,
        ("text.gguf", "GGUF"),
    ),
    Attack(
        "read_gguf: truncated",
        lambda c: sl.read_gguf(c.file("cut.gguf", _gguf(c).read_bytes()[:100])),
        VFE,
        ("cut.gguf",),
    ),
    Attack(
        "read_gguf: bit flipped in data",
        lambda c: sl.read_gguf(c.file("gguf_flip.gguf", _flip(_gguf(c).read_bytes(), -5, 3))),
        VFE,
        ("gguf_flip.gguf", "checksum"),
    ),
    Attack(
        "read_gguf: missing",
        lambda c: sl.read_gguf(c.tmp / "nothing.gguf"),
        errors.VectorFileNotFoundError,
        ("nothing.gguf",),
        FileNotFoundError,
    ),
]


def _matches(attack: Attack, err: BaseException) -> bool:
    assert attack.error is not None
    if not isinstance(err, attack.error):
        return False
    if attack.also is not None and not isinstance(err, attack.also):
        return False
    text = str(err)
    return all(word in text for word in attack.words)


def outcome(attack: Attack, ctx: Context) -> tuple[str, str]:
    """``(kind, detail)``: kind is ``clean``, ``wrong`` (a SteerlabError, but not the expected
    one), ``accepted`` (no error where one was due, or a failed invariant) or ``crash``."""
    try:
        with _quiet():
            attack.run(ctx)
    except AssertionError as err:
        return "accepted", f"AssertionError: {err}"
    except Exception as err:
        detail = f"{type(err).__name__}: {err}"[:300]
        if attack.error is None:
            return ("wrong" if isinstance(err, errors.SteerlabError) else "crash"), detail
        if _matches(attack, err):
            return "clean", detail
        if isinstance(err, errors.SteerlabError):
            return "wrong", detail
        return "crash", detail
    if attack.error is None:
        return "clean", "ok"
    return "accepted", "no error raised"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- the CLI ----------
@dataclasses.dataclass(frozen=True)
class CliAttack:
    """One command line: it must exit with ``code`` and print ``words`` (on stderr for errors,
    on stdout for ``code == 0``), and never a traceback. ``args`` may use ``{tmp}``, ``{vec}``
    (a good vector file), ``{other}`` (a vector of another model), ``{corrupt}``."""

    name: str
    args: tuple[str, ...]
    code: int
    words: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @property
    def id(self) -> str:
        return self.name


CLI_ATTACKS: list[CliAttack] = [
    CliAttack(
        "generate: missing vector",
        ("generate", "hi", "-v", "{tmp}/missing.safetensors"),
        2,
        ("missing.safetensors",),
    ),
    CliAttack(
        "generate: corrupt vector",
        ("generate", "hi", "-v", "{corrupt}"),
        1,
        ("corrupt.safetensors",),
    ),
    CliAttack(
        "generate: -s nan",
        ("generate", "hi", "-v", "{vec}", "-s", "nan"),
        2,
        ("strength", "finite"),
    ),
    CliAttack(
        "generate: --layers 99",
        ("generate", "hi", "-v", "{vec}", "--layers", "99"),
        2,
        ("99", "out of range"),
    ),
    CliAttack(
        "generate: --layers abc", ("generate", "hi", "-v", "{vec}", "--layers", "abc"), 2, ("abc",)
    ),
    CliAttack(
        "generate: --positions nowhere",
        ("generate", "hi", "-v", "{vec}", "--positions", "nowhere"),
        2,
        ("nowhere",),
    ),
    CliAttack("generate: other model's vector", ("generate", "hi", "-v", "{other}"), 1, ("force",)),
    CliAttack("generate: empty prompt", ("generate", ""), 2, ("no tokens",)),
    CliAttack(
        "generate: missing model",
        ("generate", "hi", "--model", "{tmp}/no-such-model"),
        1,
        ("no-such-model",),
    ),
    CliAttack(
        "generate: --max-new-tokens 0",
        ("generate", "hi", "--max-new-tokens", "0"),
        2,
        ("max_new_tokens",),
    ),
    CliAttack(
        "generate: --temperature 0",
        ("generate", "hi", "--sample", "--temperature", "0"),
        2,
        ("temperature",),
    ),
    CliAttack("generate: unknown option", ("generate", "hi", "--frobnicate"), 2, ("--frobnicate",)),
    CliAttack(
        "generate: [/x] printed literally",
        ("generate", "Close it with [/x] then", "--max-new-tokens", "2"),
        0,
        ("Close it with [/x] then",),
    ),
    CliAttack(
        "generate: [red] printed literally",
        ("generate", "say [red] now", "--max-new-tokens", "2"),
        0,
        ("say [red] now",),
    ),
    CliAttack(
        "generate: not hard-wrapped",
        ("generate", "word " * 30 + "end", "--max-new-tokens", "2"),
        0,
        ("word " * 30 + "end",),
    ),
    CliAttack(
        "compute -o DIR",
        ("compute", "--data", "sentiment", "-o", "{tmp}", "--layers", "1"),
        1,
        ("directory",),
    ),
    CliAttack(
        "export-gguf --out DIR", ("export-gguf", "{vec}", "--out", "{tmp}"), 1, ("directory",)
    ),
    CliAttack(
        "export-gguf --strength nan",
        ("export-gguf", "{vec}", "--out", "{tmp}/x.gguf", "--strength", "nan"),
        2,
        ("strength", "finite"),
    ),
    CliAttack(
        "export-gguf: missing vector",
        ("export-gguf", "{tmp}/missing.safetensors", "--out", "{tmp}/x.gguf"),
        2,
        ("missing.safetensors",),
    ),
    CliAttack(
        "analyze --plots FILE",
        ("analyze", "{vec}", "--plots", "{vec}", "--no-lens"),
        1,
        ("good.safetensors",),
    ),
    CliAttack(
        "analyze: corrupt vector",
        ("analyze", "{corrupt}", "--no-lens"),
        1,
        ("corrupt.safetensors",),
    ),
    CliAttack(
        "bake over a non-bake folder",
        ("bake", "{vec}", "--out", "{tmp}/precious", "--overwrite"),
        1,
        ("not a folder written by bake",),
    ),
]


def cli_outcome(attack: CliAttack, ctx: Context, corrupt: Path, other: Path) -> tuple[str, str]:
    """Run one CLI attack (the loader patched to the tiny model unless a path is given)."""
    from typer.testing import CliRunner

    from steerlab.cli import app

    values = {
        "tmp": str(ctx.tmp),
        "vec": str(ctx.vec_file),
        "other": str(other),
        "corrupt": str(corrupt),
    }
    args = [a.format(**values) for a in attack.args]
    real = sl.load_model

    def load(name: Any = None, **kwargs: Any) -> Any:
        return ctx.model if name is None else real(name, **kwargs)

    sl.load_model = load  # type: ignore[assignment]
    try:
        with _quiet():
            result = CliRunner().invoke(app, args, env=dict(attack.env))
    finally:
        sl.load_model = real  # type: ignore[assignment]
    stderr = result.stderr
    output = result.stdout + stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return "crash", f"{type(result.exception).__name__}: {result.exception}"[:300]
    if "Traceback" in output:
        return "crash", "traceback printed"
    if result.exit_code != attack.code:
        kind = "accepted" if result.exit_code == 0 else "wrong"
        return kind, f"exit {result.exit_code}: {output.strip()[-300:]}"
    shown = result.stdout if attack.code == 0 else stderr
    if not all(word in shown for word in attack.words):
        return "wrong", f"missing words in: {shown.strip()[-300:]}"
    if attack.code != 0 and len(stderr.strip().split("\n")) != 1:
        return "wrong", f"not one line: {stderr.strip()[-300:]}"
    return "clean", shown.strip()[-200:]


def cli_files(ctx: Context) -> tuple[Path, Path]:
    """A corrupt vector file and a vector of another model, for the CLI rows."""
    data = ctx.vec_file.read_bytes()
    corrupt = ctx.file("corrupt.safetensors", data[: len(data) - 5])
    other = sl.mean_diff(ctx.other, ["i love it"], ["i hate it"], layers=[1])
    other_file = other.save(ctx.tmp / "other.safetensors")
    (ctx.tmp / "precious").mkdir(exist_ok=True)
    (ctx.tmp / "precious" / "thesis.txt").write_text("years of work")
    return corrupt, other_file


def main() -> int:
    """Count attempts / clean refusals / wrong refusals / silently accepted / crashes."""
    verbose = "-v" in sys.argv
    counts: dict[str, dict[str, int]] = {}
    wanted = [t for t in ("library", "cli") if f"--{t}" in sys.argv] or ["library", "cli"]
    from steerlab.testing import tiny_model

    models = {"model": tiny_model("llama"), "other": tiny_model("llama", seed=1)}
    for table in wanted:
        counts[table] = {"clean": 0, "wrong": 0, "accepted": 0, "crash": 0}
        rows: list[Any] = ATTACKS if table == "library" else CLI_ATTACKS
        for row in rows:
            with tempfile.TemporaryDirectory() as tmp:
                ctx = make_context(Path(tmp), **models)
                if table == "library":
                    kind, detail = outcome(row, ctx)
                else:
                    corrupt, other = cli_files(ctx)
                    kind, detail = cli_outcome(row, ctx, corrupt, other)
            counts[table][kind] += 1
            if verbose or kind != "clean":
                print(f"[{table}] {kind:8} {row.name}: {detail}")
    for table, c in counts.items():
        total = sum(c.values())
        print(
            f"{table}: {total} attempts, {c['clean']} clean refusals/behaviours, "
            f"{c['wrong']} wrong error, {c['accepted']} silently accepted, {c['crash']} crashes"
        )
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
