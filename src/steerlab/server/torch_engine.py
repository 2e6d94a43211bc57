"""The torch engine of ``steerlab serve``: continuous batching over a
:class:`~steerlab.model.SteeredModel`, with per-row steering, readouts and conditions.

:class:`TorchEngine` implements :class:`steerlab.server.engine.Engine`: one worker thread owns
the model, prefills each prompt (in chunks of :data:`DEFAULT_PREFILL_CHUNK` tokens) and runs one
decoding forward pass for every active request together.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

from steerlab.errors import InvalidInputError, SteerlabError
from steerlab.interventions import SequenceState
from steerlab.server.pipeline import Emitter, Plan, Planner, Probe, RequestState
from steerlab.server.registry import ConditionRegistry, VectorRegistry
from steerlab.server.requests import (
    MIN_TEMPERATURE,
    EngineError,
    GenerationRequest,
    RequestLimits,
    SteeringEntry,
)
from steerlab.server.stream import RequestStream

__all__ = ["DEFAULT_PREFILL_CHUNK", "TorchEngine"]

DEFAULT_PREFILL_CHUNK = 256
"""Prompt tokens :class:`TorchEngine` reads per forward pass by default (chunked prefill)."""
_MIN_CHUNK = 16  # a timed piece is never cut below this (progress, and a meaningful timing)
_GROUP_TOKENS = DEFAULT_PREFILL_CHUNK  # padded tokens of prompts read together, unchunked engine
_SHORT_PROMPT = 64
"""A prompt of at most this many tokens (and at most ``prefill_chunk``) is read whole, beside
the other short prompts waiting, up to ``prefill_chunk`` tokens per worker iteration; a longer
one is cut to the time budget."""


# --- the torch engine -----------------------------------------------------------------------------
@dataclasses.dataclass
class _Job:
    """A request inside the torch engine (owned by the worker thread once queued)."""

    plan: Plan
    stream: RequestStream
    emitted: RequestState  # generated ids and stop matching (see Emitter)
    generator: Any  # torch.Generator or None (greedy)
    cached: int = 0  # tokens of this request in the KV cache
    next_token: int = -1  # sampled, not yet fed to the model
    cancelled: bool = False
    whole_prefill: bool = False  # a prompt-level condition reads the prompt in one call
    alone: bool = False  # its prompt is read alone (a grouped read failed)
    prefill_cache: Any = None  # the prompt's own cache while it is prefilled in chunks
    # what position trackers and condition probes remember about this request (its token ids,
    # marker scans, condition verdicts): it outlives the per-step trackers as rows regroup
    state: SequenceState = dataclasses.field(default_factory=SequenceState)

    @property
    def request(self) -> GenerationRequest:
        return self.plan.request

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.plan.prompt_ids

    @property
    def steerings(self) -> tuple[Any, ...]:
        return self.plan.steerings

    @property
    def readouts(self) -> tuple[Probe, ...]:
        return self.plan.probes

    @property
    def generated(self) -> list[int]:
        return self.emitted.generated

    def synced_state(self) -> SequenceState:
        """:attr:`state` holding every token before the next forward call's (indices
        ``0 .. cached-1``), so a tracker that did not record some step finds none missing."""
        ids = self.state.ids
        n_prompt = len(self.prompt_ids)
        for index in range(len(ids), self.cached):
            ids.append(
                self.prompt_ids[index] if index < n_prompt else self.generated[index - n_prompt]
            )
        return self.state


class TorchEngine:
    """Serve a :class:`~steerlab.model.SteeredModel` with continuous batching and per-row steering.

    One worker thread owns the model: it is the only code that installs hooks or runs a forward
    pass, so nothing races on the model's modules. Each iteration it admits queued requests
    (each prompt is prefilled alone, exactly as ``model.generate`` would run it, producing the
    first token), then runs **one** decoding forward pass for every active request together:
    the KV caches of all requests live in one left-padded cache, with a 2-D attention mask and
    explicit ``position_ids`` per row, and each row gets its own steering through
    :class:`~steerlab.interventions.RowSteering` with pinned per-row prompt lengths (so
    ``"last"``, ``"prompt"``, ``"generated"``, indices and slices mean the same as in
    ``model.generate``). Each request keeps a :class:`~steerlab.interventions.SequenceState` of
    its own (token ids, marker scans, condition verdicts) that every step lends to the position
    trackers and condition probes, so text-selected positions and ``when`` conditions also mean
    what they mean in ``model.generate`` although the batch regroups between steps. Requests
    join and leave at step boundaries; the padded cache is rebuilt only when the set of rows
    changes.

    >>> from steerlab.testing import tiny_model
    >>> engine = TorchEngine(tiny_model("llama"), max_batch=4)
    >>> engine.start()
    >>> events = list(engine.submit(GenerationRequest(prompt="the cat", max_tokens=3,
    ...                                               temperature=0.0)))
    >>> engine.shutdown()
    >>> len(events), events[-1].finish_reason, events[-1].completion_tokens
    (3, 'length', 3)
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 32,
        model_id: str | None = None,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        from steerlab.model import SteeredModel

        if not isinstance(model, SteeredModel):
            raise InvalidInputError(f"TorchEngine serves a SteeredModel, got {type(model)}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidInputError(f"max_batch must be a positive integer, got {max_batch!r}")
        if prefill_chunk is not None and (
            isinstance(prefill_chunk, bool)
            or not isinstance(prefill_chunk, int)
            or prefill_chunk < 1
        ):
            raise InvalidInputError(
                f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}"
            )
        self.model = model
        self.prefill_chunk = prefill_chunk
        self._short = min(_SHORT_PROMPT, prefill_chunk or _SHORT_PROMPT)  # see _SHORT_PROMPT
        self.model_id: str = model_id or model.name
        self.max_batch = max_batch
        self.vectors = VectorRegistry(check=lambda vector: vector.check_compatible(model))
        self.conditions = ConditionRegistry(check=lambda cond: cond.check_compatible(model))
        config = getattr(model.hf_model, "config", None)
        self._max_positions = _max_positions(config)
        self._tokenizer_lock = threading.Lock()
        self.planner = Planner(
            model.tokenizer,
            n_layers=model.n_layers,
            d_model=model.d_model,
            vectors=self.vectors,
            conditions=self.conditions,
            context_length=self._max_positions,
            site_options=self._site_options,
            check_steering=self._check_steering,
            lock=self._tokenizer_lock,
        )
        """Builds each request's :class:`~steerlab.server.pipeline.Plan` (shared pipeline)."""
        self.emitter = Emitter(model.tokenizer, lock=self._tokenizer_lock)
        """Turns chosen tokens into events (shared pipeline)."""
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counter = 0
        # the batch (worker thread only)
        self._rows: list[_Job] = []
        self._prefilling: list[_Job] = []  # admitted, prompt not fully read yet (FIFO)
        self._step_time = 0.0  # recent decoding step, seconds (sizes prefill pieces)
        self._token_time = 0.0  # recent prefill cost per prompt token, seconds
        self._cache: Any = None
        self._mask: Any = None
        self._cache_kwarg = model.cache_keyword()
        self.steps = 0  # decoding forward passes run (for tests and benchmarks)
        self.max_rows_seen = 0
        self.interleaved_steps = 0
        self.forwards = 0  # forward passes of any kind (prefill reads and decoding steps)

    # --- interface --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Decoder blocks of the served model."""
        return int(self.model.n_layers)

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name="steerlab-torch-engine", daemon=True
            )
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the worker; every open stream ends with an :class:`EngineError`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            jobs, self._pending = self._pending, []
        for job in jobs + self._prefilling + self._rows:
            job.stream.fail(EngineError("the engine was shut down"))
        self._rows, self._prefilling = [], []
        self._cache = self._mask = None
        self._thread = None

    def submit(
        self, request: GenerationRequest, *, limits: RequestLimits | None = None
    ) -> RequestStream:
        """Validate ``request`` (within ``limits``) and queue it; see :class:`Engine`."""
        import torch

        plan = self.planner.plan(request, limits=limits)
        generator = None
        if request.temperature > 0:
            generator = torch.Generator()
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(request.seed))
        with self._cond:
            if self._thread is None or self._stopping:
                raise EngineError("the engine is not running (call start())")
            self._counter += 1
            request_id = f"req-{self._counter}"
        job_box: list[_Job] = []
        stream = RequestStream(request_id, on_cancel=lambda: self._cancel(job_box))
        job = _Job(
            plan=plan,
            stream=stream,
            emitted=RequestState(plan),
            generator=generator,
            whole_prefill=any(
                s.when is not None and getattr(s.when, "scope", None) == "prompt"
                for s in plan.steerings
            ),
        )
        job_box.append(job)
        with self._cond:
            self._pending.append(job)
            self._cond.notify_all()
        return stream

    # --- validation (caller's thread) -----------------------------------------------------------
    def _site_options(self, entry: SteeringEntry, vector: Any, field: str) -> dict[str, Any]:
        from steerlab.sites import entry_site_options

        return entry_site_options(
            self.model.adapter,
            vector,
            site=entry.site,
            heads=entry.heads,
            experts=entry.experts,
            field=field,
        )

    def _check_steering(self, steering: Any, field: str) -> None:
        """Validate layers and operator constants against the model, and a condition's layer
        against the steering layers it gates, before anything is queued."""
        from steerlab.interventions import PositionTracker, RowSteering
        from steerlab.operators import loreft_op_refusal

        refusal = loreft_op_refusal(steering.vector, steering.resolved_op)
        if refusal is not None:  # a LoReFT file runs only under op 'loreft'
            raise InvalidInputError(f"{field}.op: {refusal}")
        RowSteering((steering,)).hooks(self.model.adapter, PositionTracker())

    def _cancel(self, box: list[_Job]) -> None:
        with self._cond:
            for job in box:
                job.cancelled = True
            self._cond.notify_all()

    # --- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    while (
                        not self._stopping
                        and not self._pending
                        and not self._rows
                        and not self._prefilling
                    ):
                        self._cond.wait()
                    if self._stopping:
                        return
                    room = self.max_batch - len(self._rows) - len(self._prefilling)
                    admitted, self._pending = self._pending[:room], self._pending[room:]
                try:
                    for job in admitted:
                        if job.cancelled:
                            self._finish_cancelled(job)
                        else:
                            self._prefilling.append(job)
                    self._prefill_some()
                    self._drop_cancelled()
                    if self._rows:
                        # counted for tests and benchmarks: decoding went on while a prompt
                        # was still being read
                        self.interleaved_steps += bool(self._prefilling)
                        self._decode_step()
                except Exception as err:  # a bug outside any one request: end these, keep serving
                    failed = [*self._rows, *self._prefilling]
                    self._rows, self._prefilling = [], []
                    self._cache = self._mask = None
                    for job in failed:
                        job.stream.fail(EngineError(f"generation failed: {err}"))

    # --- faults of one request -------------------------------------------------------------------
    def _fail(self, job: _Job, err: BaseException) -> None:
        """End ``job`` alone with the error that names what went wrong in its own work."""
        job.stream.fail(self._blame(job, err))

    @staticmethod
    def _blame(job: _Job, err: BaseException) -> SteerlabError:
        """The error to send for a fault found in ``job``'s own row (its forward pass run
        alone, or its token choice): steerlab's own errors as they are (their class says whose
        fault it is); anything else raised while this request's steering or readout hooks were
        active is charged to them (the same model serves every other request), and to the
        engine otherwise."""
        if isinstance(err, SteerlabError):
            return err
        fields = [
            name for name, used in (("steering", job.steerings), ("readout", job.readouts)) if used
        ]
        cause = f"{type(err).__name__}: {err}"
        if fields:
            return InvalidInputError(
                f"{' or '.join(fields)} of this request failed in the model ({cause}); "
                f"other requests were not affected"
            )
        return EngineError(f"this request failed in the engine ({cause})")

    def _scope(self, rows: list[_Job]) -> Any:
        """Install per-row steering for ``rows`` and pin their prompt lengths; a context."""
        import contextlib

        import torch

        from steerlab.interventions import RowSteering, activate, active_trackers

        @contextlib.contextmanager
        def scope() -> Iterator[None]:
            depth = max((len(job.steerings) for job in rows), default=0)
            interventions = [
                RowSteering(
                    tuple(job.steerings[k] if k < len(job.steerings) else None for job in rows)
                )
                for k in range(depth)
            ]
            adapter = self.model.adapter
            # activated in the worker thread only: a program that also calls the model from
            # other threads never sees the served requests' steering
            with activate(adapter, interventions) if interventions else contextlib.nullcontext():
                trackers = active_trackers(adapter.backbone)
                lengths = torch.tensor([len(job.prompt_ids) for job in rows])
                states = [job.synced_state() for job in rows]
                try:
                    for tracker in trackers:
                        tracker.prompt_lengths_override = lengths
                        tracker.sequences_override = states
                    yield
                finally:
                    for tracker in trackers:
                        tracker.prompt_lengths_override = None
                        tracker.sequences_override = None

        return scope()

    def _forward(
        self, rows: list[_Job], ids: Any, mask: Any, positions: Any, cache: Any, read: bool = True
    ) -> Any:
        """One forward pass under the rows' steering; returns (last logits, readout values).
        ``read=False`` (a prefill chunk before the last) skips the readout probes."""
        import torch

        from steerlab.interventions import HookSpec, output_hidden, scoped_hooks

        device = self.model.device
        wanted: dict[int, list[tuple[int, int, Any]]] = {}
        for row, job in enumerate(rows):
            for k, readout in enumerate(job.readouts if read else ()):
                wanted.setdefault(readout.layer, []).append((row, k, readout.direction))
        values: dict[tuple[int, int], float] = {}

        def make_hook(entries: list[tuple[int, int, Any]]) -> Any:
            def hook(module: Any, args: Any, output: Any) -> None:
                last = output_hidden(output)[:, -1].detach().to(torch.float32).cpu()
                for row, k, direction in entries:
                    values[(row, k)] = float(last[row] @ direction)

            return hook

        # activated after the steering (this thread only), so reads see the steered stream
        reads = [
            HookSpec(self.model.adapter.block(layer), "forward", make_hook(entries))
            for layer, entries in wanted.items()
        ]
        self.forwards += 1
        with self._scope(rows), scoped_hooks(reads):
            out = self.model.hf_model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: cache},
            )
        logits = out.logits[:, -1].to(torch.float32).cpu()
        readouts = [
            tuple(values[(row, k)] for k in range(len(job.readouts) if read else 0))
            for row, job in enumerate(rows)
        ]
        return logits, readouts

    def _new_cache(self, data: list[tuple[Any, Any]] | None = None) -> Any:
        from transformers import DynamicCache

        config = getattr(self.model.hf_model, "config", None)
        try:
            return DynamicCache(data, config=config) if data else DynamicCache(config=config)
        except TypeError:  # transformers 4: no config argument
            return DynamicCache(data) if data else DynamicCache()

    @staticmethod
    def _layers(cache: Any) -> list[tuple[Any, Any]]:
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        return list(zip(cache.key_cache, cache.value_cache))

    def _prefill_some(self) -> None:
        """Prefill queued prompts, at most one chunk's worth of tokens per worker iteration.

        A prompt is run through the model in pieces of at most ``prefill_chunk`` tokens (each
        piece attends to the cache of the ones before it, at its absolute positions, so the
        result is the unchunked prefill's), and one decoding step of the running requests
        follows each piece: a long prompt no longer freezes every stream while it is read.
        While requests are decoding, a piece is also cut to take about as long as one of their
        decoding steps (measured), so their inter-token gap stays near twice the usual.
        Short prompts (:data:`_SHORT_PROMPT`) are the exception: waiting ones are read whole
        and together, up to ``prefill_chunk`` tokens per iteration (see :meth:`_group`).
        """
        import time

        chunked = self.prefill_chunk is not None
        budget = self.prefill_chunk or 0
        if chunked and self._rows:
            if self._token_time > 0 and self._step_time > 0:
                budget = min(budget, max(_MIN_CHUNK, int(self._step_time / self._token_time)))
            else:  # nothing timed yet: a small first piece, timed for the next ones
                budget = min(budget, _MIN_CHUNK)
        # short prompts are read whole, up to a chunk's worth per iteration: a burst of clients
        # then joins the batch in a few forward passes (each one reads every weight, whatever
        # its size: 32 prompts read one by one cost about 32 decoding steps more), at the price
        # of one longer gap for the running streams; a long prompt is cut to the time budget
        whole = self.prefill_chunk or 0
        while self._prefilling:
            job = self._prefilling[0]
            if job.cancelled:
                self._prefilling.pop(0)
                self._finish_cancelled(job)
                continue
            short = _is_short(job, self._short)
            if chunked and (whole if short else budget) <= 0:
                return
            group = self._group(budget, whole) if chunked else self._group(0, _GROUP_TOKENS)
            if len(group) > 1:
                started = time.perf_counter()
                padded = self._prefill_group(group)
                self._time_tokens(padded, time.perf_counter() - started)
                budget, whole = budget - padded, whole - padded
                continue
            remaining = len(job.prompt_ids) - job.cached
            whole_read = not chunked or job.whole_prefill or short
            count = remaining if whole_read else min(budget, remaining)
            started = time.perf_counter()
            try:
                finished = self._prefill_chunk(job, count)
            except Exception as err:  # this prompt alone was being read: fail it alone
                self._prefilling.pop(0)
                self._fail(job, err)
                continue
            self._time_tokens(count, time.perf_counter() - started)
            budget, whole = budget - count, whole - count
            if finished:
                self._prefilling.pop(0)

    def _time_tokens(self, count: int, elapsed: float) -> None:
        """Fold a prefill forward of ``count`` (padded) tokens into the per-token cost."""
        if count >= _MIN_CHUNK:
            per_token = elapsed / count
            self._token_time = (
                per_token if not self._token_time else 0.5 * (self._token_time + per_token)
            )

    def _group(self, budget: int, short_budget: int) -> list[_Job]:
        """The prompts at the head of the prefill queue that are read together in one forward
        pass: not started, left-padded to the longest within ``budget`` tokens (or within
        ``short_budget`` while all are short, see :data:`_SHORT_PROMPT`), with at most as much
        padding as prompt. One forward pass reads the weights once whatever its rows, so 32
        short prompts arriving together cost about one pass, not 32 (as in ``generate_ids``,
        which also prefills its batch left-padded)."""
        group: list[_Job] = []
        width = real = 0
        all_short = True
        for job in self._prefilling:
            if job.cancelled or job.alone or job.cached or job.prefill_cache is not None:
                break
            size = len(job.prompt_ids)
            wide = max(width, size)
            short = all_short and _is_short(job, self._short)
            padded = wide * (len(group) + 1)
            if padded > max(short_budget if short else budget, size) or (
                group and padded > 2 * (real + size)
            ):
                break
            all_short = short
            group.append(job)
            width, real = wide, real + size
        return group

    def _prefill_group(self, group: list[_Job]) -> int:
        """Read the whole prompts of ``group`` (the head of the prefill queue) in one
        left-padded forward pass, emit each one's first token and move the unfinished ones into
        the batch; returns the padded token count. A fault re-reads each prompt alone, so only
        the prompts that fail alone fail."""
        import torch

        width = max(len(job.prompt_ids) for job in group)
        pad = int(self.model.pad_token_id or 0)
        ids = torch.tensor(
            [[pad] * (width - len(job.prompt_ids)) + list(job.prompt_ids) for job in group],
            dtype=torch.long,
        )
        mask = torch.tensor(
            [[0] * (width - len(job.prompt_ids)) + [1] * len(job.prompt_ids) for job in group],
            dtype=torch.long,
        )
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = self._new_cache()
        try:
            logits, readouts = self._forward(group, ids, mask, positions, cache)
        except Exception:  # someone's steering or readout broke: find whose, alone
            for job in group:
                job.alone = True
            return width * len(group)
        del self._prefilling[: len(group)]
        for job in group:
            job.cached = len(job.prompt_ids) - 1  # _emit_rows counts the token just read
        keep = self._emit_rows(group, logits, readouts, into_batch=False)
        if len(keep) == len(group):
            self._merge(group, cache, mask)
        elif keep:
            layers, mask = _select(self._layers(cache), mask, keep)
            self._merge([group[i] for i in keep], self._new_cache(layers), mask)
        return width * len(group)

    def _prefill_chunk(self, job: _Job, count: int) -> bool:
        """Run the next ``count`` prompt tokens of ``job`` (alone, on its own cache); after the
        last piece choose its first token and move it into the batch. True when it left the
        prefill queue (joined the batch or finished)."""
        import torch

        start = job.cached
        end = start + count
        last = end == len(job.prompt_ids)
        if job.prefill_cache is None:
            job.prefill_cache = self._new_cache()
        ids = torch.tensor([job.prompt_ids[start:end]], dtype=torch.long)
        mask = torch.ones((1, end), dtype=torch.long)
        positions = torch.arange(start, end)[None]
        logits, readouts = self._forward([job], ids, mask, positions, job.prefill_cache, last)
        job.cached = end
        if not last:
            return False
        cache, job.prefill_cache = job.prefill_cache, None
        if not self._emit(job, logits[0], readouts[0]):
            self._merge([job], cache, torch.ones((1, end), dtype=torch.long))
        return True

    def _merge(self, jobs: list[_Job], cache: Any, mask: Any) -> None:
        """Add prefilled requests (their ``cache`` and 2-D ``mask``, rows in ``jobs``
        order) to the batch cache, left-padding both to a common width: one copy of the batch
        cache per group that joins, not per request."""
        import torch

        if not self._rows:
            self._rows = list(jobs)
            self._cache = cache
            self._mask = mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            merged = [
                (
                    torch.cat([_pad_left(ok, width), _pad_left(nk, width)], dim=0),
                    torch.cat([_pad_left(ov, width), _pad_left(nv, width)], dim=0),
                )
                for (ok, ov), (nk, nv) in zip(self._layers(self._cache), self._layers(cache))
            ]
            self._cache = self._new_cache(merged)
            self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)], dim=0)
            self._rows = [*self._rows, *jobs]
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))

    def _keep(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` of the batch, dropping padding columns no row needs."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        layers, self._mask = _select(self._layers(self._cache), self._mask, keep)
        self._cache = self._new_cache(layers)
        self._rows = [self._rows[i] for i in keep]

    def _drop_cancelled(self) -> None:
        keep = [i for i, job in enumerate(self._rows) if not job.cancelled]
        for job in self._rows:
            if job.cancelled:
                self._finish_cancelled(job)
        self._keep(keep)

    def _decode_step(self) -> None:
        """One forward pass for every running request; a fault is kept to the request that
        caused it (see :meth:`_isolate`)."""
        import time

        import torch

        rows = self._rows
        ids = torch.tensor([[job.next_token] for job in rows], dtype=torch.long)
        mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        positions = torch.tensor([[job.cached] for job in rows], dtype=torch.long)
        before = self._layers(self._cache)  # the cache grows by new tensors: this stays valid
        started = time.perf_counter()
        try:
            logits, readouts = self._forward(rows, ids, mask, positions, self._cache)
        except Exception as err:
            self._cache = self._new_cache(before)
            if len(rows) == 1:
                self._rows, self._cache, self._mask = [], None, None
                self._fail(rows[0], err)
            else:
                self._isolate(before)
            self.steps += 1
            return
        elapsed = time.perf_counter() - started
        self._step_time = elapsed if not self._step_time else 0.5 * (self._step_time + elapsed)
        self._mask = mask
        self.steps += 1
        self._emit_rows(rows, logits, readouts)

    def _isolate(self, before: list[tuple[Any, Any]]) -> None:
        """The batched step raised: run each row's step alone (on its own slice of the cache
        as it was before the step) so only the rows that fail alone fail; the others get their
        token from the solo run and are regrouped into a new batch cache."""
        import torch

        rows, width = self._rows, int(self._mask.shape[1])
        self._rows, self._cache, self._mask = [], None, None
        for row, job in enumerate(rows):
            start = width - job.cached  # a row's tokens are the rightmost ``cached`` columns
            own = self._new_cache(
                [(k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in before]
            )
            ids = torch.tensor([[job.next_token]], dtype=torch.long)
            mask = torch.ones((1, job.cached + 1), dtype=torch.long)
            positions = torch.tensor([[job.cached]], dtype=torch.long)
            try:
                logits, readouts = self._forward([job], ids, mask, positions, own)
            except Exception as err:
                self._fail(job, err)
                continue
            job.cached += 1
            if not self._emit_or_fail(job, logits[0], readouts[0]):
                self._merge([job], own, mask)

    # --- tokens out ------------------------------------------------------------------------------
    def _emit_rows(
        self, rows: list[_Job], logits: Any, readouts: list[Any], *, into_batch: bool = True
    ) -> list[int]:
        """Emit one token per row of a forward pass (finiteness and greedy choices computed
        for all rows at once); returns the rows still generating, and (``into_batch``) keeps
        only those in the batch."""
        import torch

        finite = torch.isfinite(logits).all(dim=-1).tolist()
        greedy = logits.argmax(dim=-1).tolist()
        keep = []
        for row, job in enumerate(rows):
            job.cached += 1
            done = self._emit_or_fail(
                job, logits[row], readouts[row], finite=finite[row], greedy=greedy[row]
            )
            if not done:
                keep.append(row)
        if into_batch:
            self._keep(keep)
        return keep

    def _emit_or_fail(
        self, job: _Job, logits: Any, readout: tuple[float, ...], **batched: Any
    ) -> bool:
        """:meth:`_emit`, with a fault in this request's token ending this request alone."""
        try:
            return self._emit(job, logits, readout, **batched)
        except Exception as err:
            self._fail(job, err)
            return True

    def _emit(
        self,
        job: _Job,
        logits: Any,
        readout: tuple[float, ...],
        *,
        finite: bool | None = None,
        greedy: int | None = None,
    ) -> bool:
        """Choose the next token of ``job`` from ``logits``, send its event; True when done.
        ``finite`` and ``greedy`` (whether the logits are finite, their argmax) may come from
        one batched computation over the step's rows."""
        import torch

        request = job.request
        if finite is None:
            finite = bool(torch.isfinite(logits).all())
        if not finite:
            # a row's activations blew up (rows never mix, so it is this request's own doing)
            where = f"at completion token {len(job.generated) + 1}"
            if job.steerings:
                raise InvalidInputError(
                    f"steering: the model's logits became non-finite (inf/nan) {where}; "
                    f"the steering of this request is too strong for this model"
                )
            raise EngineError(f"the model's logits became non-finite (inf/nan) {where}")
        if job.generator is not None:
            token = _sample(logits, request.temperature, request.top_p, job.generator)
        else:
            token = int(torch.argmax(logits)) if greedy is None else greedy
        logprob: float | None = None
        top: list[tuple[int, float]] = []
        if request.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            logprob = float(logp[token])
            if request.logprobs > 0:
                values, indices = torch.topk(logp, request.logprobs)
                top = [(int(i), float(v)) for v, i in zip(values, indices)]
        event = self.emitter.emit(job.emitted, token, logprob=logprob, top=top, readout=readout)
        job.next_token = token
        job.stream.put(event)
        return event.finish_reason is not None

    def _finish_cancelled(self, job: _Job) -> None:
        job.stream.put(self.emitter.closing(job.emitted, "cancelled"))


def _is_short(job: _Job, limit: int) -> bool:
    """Whether ``job``'s prompt is read whole however busy the batch is (not started, and at
    most ``limit`` tokens)."""
    return not job.alone and job.cached == 0 and len(job.prompt_ids) <= limit


def _pad_left(tensor: Any, width: int) -> Any:
    """``tensor`` with zeros prepended along its sequence axis (dim 2 for caches, 1 for masks)."""
    import torch

    axis = 2 if tensor.ndim == 4 else 1
    missing = width - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def _select(
    layers: list[tuple[Any, Any]], mask: Any, keep: list[int]
) -> tuple[list[tuple[Any, Any]], Any]:
    """Rows ``keep`` of cache ``layers`` and their 2-D ``mask``, without the leading padding
    columns none of them needs."""
    import torch

    index = torch.tensor(keep)
    mask = mask.index_select(0, index)
    used = mask.any(dim=0).nonzero()
    first = int(used[0, 0]) if len(used) else 0
    selected = [
        (
            k.index_select(0, index.to(k.device))[:, :, first:].contiguous(),
            v.index_select(0, index.to(v.device))[:, :, first:].contiguous(),
        )
        for k, v in layers
    ]
    return selected, mask[:, first:]


def _sample(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    """Sample a token id from ``softmax(logits / temperature)`` within the ``top_p`` nucleus."""
    import torch

    probs = torch.softmax(logits.to(torch.float32) / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise InvalidInputError(
            f"temperature: softmax(logits / {temperature}) is not finite; use 0 (greedy) or a "
            f"temperature of at least {MIN_TEMPERATURE}"
        )
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _max_positions(config: Any) -> int | None:
    """Longest sequence the batch cache can hold: the model's context, and below a sliding
    window (the padded cache keeps one shared length per batch, so rows must never slide)."""
    limits = [
        value
        for name in ("max_position_embeddings", "n_positions", "sliding_window")
        if isinstance(value := getattr(config, name, None), int) and value > 0
    ]
    return min(limits) if limits else None
