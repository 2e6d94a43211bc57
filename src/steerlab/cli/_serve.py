"""``steerlab serve``: the OpenAI-compatible steered server (needs the ``server`` extra).

>>> import typer
>>> from typer.testing import CliRunner
>>> app = typer.Typer()
>>> register(app)
>>> "--max-strength" in CliRunner().invoke(app, ["serve", "--help"]).output
True
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from steerlab.errors import SteerlabError

__all__ = ["ENGINES", "register"]


def _torch_engine(model: str | None, max_batch: int, **options: Any) -> Any:
    import steerlab as sl
    from steerlab.server.torch_engine import TorchEngine

    return TorchEngine(sl.load_model(model), max_batch=max_batch, **options)


def _vllm_engine(model: str | None, max_batch: int, **vllm_options: Any) -> Any:
    from steerlab.vllm.engine import VLLMEngine

    return VLLMEngine(model, max_num_seqs=max_batch, **vllm_options)


ENGINES: dict[str, Callable[..., Any]] = {"torch": _torch_engine, "vllm": _vllm_engine}
"""Engine factories by ``--engine`` name: ``(model name or path, max batch) -> Engine``
(the vLLM factory also takes the pass-through vLLM options as keywords, the torch one
``prefill_chunk``)."""


def serve(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model folder or cached hub id (default: SmolLM2)."),
    ] = None,
    vectors: Annotated[
        Path | None,
        typer.Option(help="Folder whose *.safetensors vectors are registered under their stems."),
    ] = None,
    conditions: Annotated[
        Path | None,
        typer.Option(
            help="Folder whose *.safetensors conditions (sl.fit_condition, Condition.save) are "
            "registered under their stems, for the 'when' of steering entries."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 exposes it).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require 'Authorization: Bearer KEY' on /v1 routes.", envvar=None),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most requests decoded together.")] = 32,
    max_tokens_cap: Annotated[int, typer.Option(help="Largest max_tokens allowed.")] = 1024,
    max_strength: Annotated[float, typer.Option(help="Largest |strength| allowed.")] = 64.0,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body (413 beyond, refused as it streams in).")
    ] = 4 * 1024 * 1024,
    max_upload_bytes: Annotated[
        int, typer.Option(help="Largest body of a vector upload (POST /v1/vectors).")
    ] = 64 * 1024 * 1024,
    max_steering_entries: Annotated[
        int, typer.Option(help="Most 'steering' entries in one request.")
    ] = 32,
    max_readout_entries: Annotated[
        int, typer.Option(help="Most 'readout' entries in one request.")
    ] = 16,
    max_vectors: Annotated[
        int, typer.Option(help="Most registered vectors (uploads beyond it get 409).")
    ] = 256,
    engine: Annotated[
        str,
        typer.Option(
            help="Engine: torch (continuous batching on steerlab) or vllm (needs vLLM installed)."
        ),
    ] = "torch",
    tensor_parallel_size: Annotated[
        int | None, typer.Option(help="vLLM engine: GPUs (ranks) to shard the model over.")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="vLLM engine: weights dtype (auto, float32, bfloat16...).")
    ] = None,
    max_model_len: Annotated[
        int | None, typer.Option(help="vLLM engine: context length (prompt + completion).")
    ] = None,
    prefill_chunk: Annotated[
        int | None,
        typer.Option(
            help="torch engine: prompt tokens read per forward pass, between decoding steps of "
            "running requests (default 256; 0 reads each prompt whole)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(hidden=True, help="uvicorn log level.")] = "warning",
) -> None:
    """Serve the model over an OpenAI-compatible API with per-request steering (Ctrl-C stops)."""
    try:
        import uvicorn

        from steerlab.server.app import create_app
    except ImportError as err:
        typer.echo(
            f"error: the server needs its extra dependencies ({err.name} is missing): "
            f"pip install 'steerlab[server]'",
            err=True,
        )
        raise typer.Exit(code=1) from None
    if engine not in ENGINES:
        typer.echo(f"error: unknown engine {engine!r}; choose from {', '.join(ENGINES)}", err=True)
        raise typer.Exit(code=1)
    positive = {
        "--max-batch": max_batch,
        "--max-tokens-cap": max_tokens_cap,
        "--max-strength": max_strength,
        "--max-body-bytes": max_body_bytes,
        "--max-upload-bytes": max_upload_bytes,
        "--max-steering-entries": max_steering_entries,
        "--max-readout-entries": max_readout_entries,
        "--max-vectors": max_vectors,
    }
    wrong = [option for option, value in positive.items() if not value > 0]
    if wrong:
        typer.echo(f"error: {', '.join(wrong)} must be positive", err=True)
        raise typer.Exit(code=1)
    vllm_options = {
        key: value
        for key, value in (
            ("tensor_parallel_size", tensor_parallel_size),
            ("dtype", dtype),
            ("max_model_len", max_model_len),
        )
        if value is not None
    }
    if vllm_options and engine != "vllm":
        typer.echo(f"error: {', '.join(vllm_options)} apply to --engine vllm only", err=True)
        raise typer.Exit(code=1)
    engine_options: dict[str, Any] = dict(vllm_options)
    if prefill_chunk is not None:
        if engine != "torch":
            typer.echo("error: --prefill-chunk applies to --engine torch only", err=True)
            raise typer.Exit(code=1)
        if prefill_chunk < 0:
            typer.echo("error: --prefill-chunk must be 0 or positive", err=True)
            raise typer.Exit(code=1)
        engine_options["prefill_chunk"] = prefill_chunk or None
    try:
        served = ENGINES[engine](model, max_batch, **engine_options)
        names = served.vectors.register_dir(vectors) if vectors is not None else []
        gates = served.conditions.register_dir(conditions) if conditions is not None else []
        if len(names) > max_vectors:
            typer.echo(
                f"error: --vectors holds {len(names)} vectors, more than --max-vectors "
                f"{max_vectors}",
                err=True,
            )
            raise typer.Exit(code=1)
        app = create_app(
            served,
            api_key=api_key,
            max_tokens_cap=max_tokens_cap,
            max_strength=max_strength,
            max_body_bytes=max_body_bytes,
            max_upload_bytes=max_upload_bytes,
            max_steering_entries=max_steering_entries,
            max_readout_entries=max_readout_entries,
            max_vectors=max_vectors,
        )
    except SteerlabError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    shown = f"[{host}]" if ":" in host else host
    typer.echo(
        f"steerlab serve: {served.model_id} with {len(names)} vector(s) "
        f"({', '.join(names) or 'none'})"
        + (f" and {len(gates)} condition(s) ({', '.join(gates)})" if gates else "")
        + f" on http://{shown}:{port}  (playground: "
        f"http://{shown}:{port}/ , API: http://{shown}:{port}/v1 ; Ctrl-C stops)",
    )
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        pass
    if not server.started:
        typer.echo(f"error: could not start the server on {host}:{port}", err=True)
        raise typer.Exit(code=1)
    typer.echo("steerlab serve: stopped")


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``app``."""
    app.command("serve")(serve)
