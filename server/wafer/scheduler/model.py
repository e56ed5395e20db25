"""One scheduler per loaded model: two lanes, merged batches, bounded queues, a thread per instance.

Every call into a backend goes through its model's scheduler, never straight from an RPC handler:
- **One thread owns each backend instance.** A llama.cpp context must never be entered from two
  threads. A model may run as several instances (`instances:` in models.yaml), each its own
  session on its own thread with a share of the cores: each merged batch goes to a free instance,
  so one instance's Python work (padding, pooling) overlaps another's compute, as Triton's
  instance groups do. The first instance is the model's own (`LoadedModel.backend`): calls
  (`run`) and streams go only to it, since the model's handle closes over it; the others take
  embeddings.
- **Two lanes.** Interactive work (a person is waiting) is always taken before batch work (a
  corpus being indexed). While interactive work keeps coming, batch embeddings are cut into
  micro-batches whose estimated run time is `batching.batch_unit_ms`: an interactive request
  waits behind at most one, and the batch work still moves between interactive requests. After
  `quiet_seconds` without any interactive work, batch work runs in full batches, for throughput;
  on backends that can be interrupted (ONNX), such a full batch is stopped when interactive work
  arrives, for this model or any other, and its rows go back to the head of the batch lane.
- **Merged batches.** Embedding requests waiting in the same lane are merged into one backend call,
  up to `max_batch_size` inputs and `max_batch_tokens` estimated tokens. There is no waiting window:
  requests that arrive while the model is busy are merged into its next call (continuous batching,
  as TEI does), so a lone request on an idle server never waits for company. The backend then sorts
  the merged inputs by length into forward passes with little padding. Each caller gets exactly its
  own rows, or its own error: a failed merged call is re-run per request to find whose input failed.
- **Bounded queues.** Each lane holds at most `queue_capacity` inputs; past that, callers get
  RESOURCE_EXHAUSTED with a retry hint from the model's measured speed, never unbounded memory. A
  caller that cancels or whose deadline passes is removed from the queue, and its work never runs.
- **Streams** (generation) on a backend that decodes several together (GGUF: continuous batching,
  wafer.backends.gguf.streams) share one step per token: every admitted stream's next token in one
  decode, each step its own turn of the compute gate, so other models' work (and this model's
  other calls) run between steps. A new stream joins at the next step when the backend has a free
  sequence and the cells for it (`generation.parallel`, `generation.kv_cells` in models.yaml);
  others wait in their lane. On an idle engine the first step waits a few milliseconds for more
  calls (ADMISSION_GAP), so that callers who arrive together read their prompts in one step.
  A stream's first text and its end reach its caller at once; text within `stream_interval` of its
  last message travels in its next one (fewer messages: less CPU taken from decoding).
  Interactive streams are admitted first, batch-lane streams never take the last free sequence,
  and a step with an interactive stream is an interactive turn; a batch-lane-only step is
  interrupted (mid-decode) when interactive work arrives, and runs again. A stream that ends or
  whose caller leaves gives its sequence back at once, its step interrupted if it is in one. On
  other backends streams are served one at a time, a token per turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from wafer.backends.base import (
    Backend,
    ComputeInterrupted,
    Embeddings,
    GenerationStreams,
    InputTooLongError,
    Tokenized,
)
from wafer.domain import ChatMessage, Context, FloatMatrix, GenerationDelta, Priority, SamplingParams
from wafer.errors import ResourceExhaustedError, UnavailableError
from wafer.scheduler.gate import ComputeGate
from wafer.specs import BatchingSpec, Task

T = TypeVar("T")

_DONE = object()
# Handed over with a step's deltas: the thread is done with the stream (`_Streamed.release`).
_RELEASED = object()
# How long the first step of an idle engine waits for more Generate calls: until none came for
# ADMISSION_GAP, and at most ADMISSION_WINDOW after the first. Measured over gRPC (bench.generation's
# four callers, SmolLM2, 2 cores): the server saw consecutive calls 0.3-4.5 ms apart, all four
# within 3-10 ms of the first, and without a wait two or three of them waited for the others'
# prompt step (~300 ms) before theirs. A lone call pays ADMISSION_GAP once, before its first token:
# 5 ms of a ~70 ms first token and of a ~1 s 64-token answer.
ADMISSION_GAP = 0.005
ADMISSION_WINDOW = 0.015
# Weight of the newest measurement in the model's speed estimate.
_RATE_SMOOTHING = 0.3
# English text runs about 4 characters per token with BPE and WordPiece vocabularies. Only the
# scale matters: the speed that turns tokens into time is measured in the same estimated tokens.
_CHARS_PER_TOKEN = 4


def estimate_tokens(text: str, limit: int) -> int:
    """A cheap token estimate for sizing batches, without running the tokenizer before the queue."""
    return min(limit, len(text) // _CHARS_PER_TOKEN + 2)


class BatchObserver(Protocol):
    """Told about every backend call (the metrics implement it)."""

    def record_batch(self, model: str, task: Task, size: int, tokens: int) -> None: ...

    def record_instance_call(self, model: str, instance: int, size: int, seconds: float) -> None: ...

    def record_interruption(self, model: str) -> None: ...

    def record_tokenization(self, model: str, seconds: float) -> None: ...

    def record_prompt_cache(self, model: str, cached_tokens: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Scheduled(Generic[T]):
    """A result and where its time went."""

    value: T
    queued_seconds: float
    inference_seconds: float
    # Inputs in the largest backend call this request rode in (its own and others').
    batch_size: int
    # Tokenizing the request on arrival, before it queued (backends that tokenize ahead).
    tokenize_seconds: float = 0.0


# -- work items ------------------------------------------------------------------------------


class _Work:
    rows = 1

    def __init__(self, lane: Priority, loop: asyncio.AbstractEventLoop) -> None:
        self.lane = lane
        self.loop = loop
        self.context = contextvars.copy_context()
        self.arrived = time.perf_counter()
        self.started: float | None = None
        self.future: asyncio.Future[Any] = loop.create_future()

    def resolve(self, value: object) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, value)


class _CallWork(_Work):
    def __init__(self, fn: Callable[[], Any], lane: Priority, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(lane, loop)
        self.fn = fn


class _EmbedWork(_Work):
    def __init__(
        self,
        texts: Sequence[str],
        *,
        truncate: bool,
        task: Task,
        estimates: list[int],
        lane: Priority,
        loop: asyncio.AbstractEventLoop,
        context: Context | None = None,
        tokenized: Tokenized | None = None,
        tokenize_seconds: float = 0.0,
    ) -> None:
        super().__init__(lane, loop)
        self.texts = list(texts)
        self.truncate = truncate
        # The model's context (cde's corpus), not the contextvars one `context` holds.
        self.embed_context = context
        self.task = task
        # Exact token counts when the backend tokenized ahead (`tokenized`), estimates otherwise.
        self.estimates = estimates
        self.tokenized = tokenized
        self.tokenize_seconds = tokenize_seconds
        self.rows = len(self.texts)
        # Rows handed to backend calls so far, and rows whose vectors came back.
        self.taken = 0
        self.finished_rows = 0
        self.vectors: FloatMatrix | None = None
        self.token_counts = [0] * self.rows
        self.inference_seconds = 0.0
        self.batch_size = 0
        self.failed = False

    @property
    def remaining(self) -> int:
        return self.rows - self.taken

    def accept(
        self, start: int, count: int, embeddings: Embeddings, offset: int, *, seconds: float, batch_size: int
    ) -> None:
        """Take this work's rows [start, start + count) from a merged call's output at `offset`."""
        if self.failed:
            return
        vectors = embeddings.vectors[offset : offset + count]
        if self.vectors is None:
            self.vectors = np.empty((self.rows, vectors.shape[1]), dtype=np.float32)
        self.vectors[start : start + count] = vectors
        self.token_counts[start : start + count] = embeddings.token_counts[offset : offset + count]
        self.inference_seconds += seconds
        self.batch_size = max(self.batch_size, batch_size)
        self.finished_rows += count
        if self.finished_rows == self.rows:
            assert self.started is not None
            self.resolve(
                Scheduled(
                    value=Embeddings(vectors=self.vectors, token_counts=self.token_counts),
                    queued_seconds=self.started - self.arrived,
                    inference_seconds=self.inference_seconds,
                    batch_size=self.batch_size,
                    tokenize_seconds=self.tokenize_seconds,
                )
            )

    def fail(self, error: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self.resolve(error)


class _Streamed(_Work):
    """Work whose items are delivered one by one to a consumer on the event loop."""

    def __init__(self, lane: Priority, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(lane, loop)
        self.stop = threading.Event()
        self.items: asyncio.Queue[object] = asyncio.Queue()
        # Set when the thread is done with the stream: the lease may end only after it.
        self.released: asyncio.Future[None] = loop.create_future()

    def deliver(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    def release(self) -> None:
        self.loop.call_soon_threadsafe(_settle, self.released, None)


class _StreamWork(_Streamed):
    def __init__(
        self,
        start: Callable[[Callable[[], bool]], Iterator[Any]],
        lane: Priority,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(lane, loop)
        self.start = start


class _GenWork(_Streamed):
    """A Generate call on a backend that decodes streams together."""

    def __init__(
        self,
        request: Callable[[GenerationStreams], object],
        on_start: Callable[[], None],
        lane: Priority,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(lane, loop)
        self.request = request
        self.on_start = on_start
        self.handle: object | None = None
        # Deltas not yet handed to the consumer, and when the last ones were (None: none yet).
        self.held: list[GenerationDelta] = []
        self.sent: float | None = None


@dataclass(frozen=True, slots=True)
class _Slice:
    work: _EmbedWork
    start: int
    stop: int


def _takes(work: _Work, primary: bool) -> bool:
    """Whether an instance's thread takes this queued work: batched streams are admitted apart,
    and only the model's own instance runs calls and one-at-a-time streams."""
    if isinstance(work, _GenWork):
        return False
    return primary or isinstance(work, _EmbedWork)


def _joined(unit: list[_Slice]) -> Tokenized:
    parts = []
    for part in unit:
        assert part.work.tokenized is not None
        parts.append(part.work.tokenized.rows(part.start, part.stop))
    return Tokenized.joined(parts)


def _context_id(work: _EmbedWork) -> str:
    return "" if work.embed_context is None else work.embed_context.id


@dataclass(frozen=True, slots=True)
class _Tokenizing:
    """A request waiting for this turn's joint tokenizer call."""

    texts: Sequence[str]
    truncate: bool
    future: asyncio.Future[Tokenized]


def _settle_all(results: list[tuple[asyncio.Future[Tokenized], object]]) -> None:
    for future, value in results:
        _settle(future, value)


def _hand_over(batch: Sequence[tuple[_Streamed, object]]) -> None:
    """Deliver a step's items to their streams' consumers, on their event loop."""
    for work, item in batch:
        if item is _RELEASED:
            _settle(work.released, None)
        else:
            work.items.put_nowait(item)


def _settle(future: asyncio.Future[Any], value: object) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


# -- the scheduler ---------------------------------------------------------------------------


class ModelScheduler:
    def __init__(
        self,
        name: str,
        backend: Backend | Sequence[Backend],
        gate: ComputeGate,
        *,
        batching: BatchingSpec | None = None,
        max_tokens: int = 512,
        stream_interval: float = 0.0,
        observer: BatchObserver | None = None,
    ) -> None:
        """`stream_interval`: seconds within which a batched stream's text is sent together (`_step`)."""
        self.name = name
        # Instances of one model: the first is the model's own; all are loaded alike.
        self._instances = [backend] if isinstance(backend, Backend) else list(backend)
        if not self._instances:
            raise ValueError(f"model {name!r}: a scheduler needs at least one backend instance")
        self._backend = self._instances[0]
        self._gate = gate
        self._batching = batching or BatchingSpec()
        self._max_tokens = max_tokens
        self._stream_interval = stream_interval
        self._observer = observer
        self._changed = threading.Condition()
        # Requests to tokenize in the next joint call (event loop side only).
        self._tokenizing: list[_Tokenizing] = []
        self._queues: dict[Priority, deque[_Work]] = {lane: deque() for lane in Priority}
        self._queued_rows = dict.fromkeys(Priority, 0)
        self._queued_tokens = dict.fromkeys(Priority, 0)
        # Estimated tokens per second of embedding calls; None until the first one is measured.
        self._rate: float | None = None
        # Backend calls stopped for interactive work and run again (for metrics and tests).
        self.interrupted = 0
        # The embedding call running on each instance's thread: stopped when every caller in it
        # has gone.
        self._running: dict[int, list[_Slice]] = {}
        # The stream the thread is driving: its backend step is stopped when its consumer goes.
        self._driving: _StreamWork | None = None
        self._closed = False
        self._streams = self._backend.streams()
        # Generate calls admitted into the backend's streams, in admission order.
        self._active: list[_GenWork] = []
        self._threads = [
            threading.Thread(
                target=self._serve, args=(index,), name=f"wafer-{name}" + (f"-{index}" if index else ""), daemon=True
            )
            for index in range(len(self._instances))
        ]
        for thread in self._threads:
            thread.start()

    # -- asking for work (event loop side) ------------------------------------------------------

    async def embed(
        self,
        texts: Sequence[str],
        *,
        truncate: bool,
        lane: Priority = Priority.INTERACTIVE,
        task: Task = Task.EMBED,
        context: Context | None = None,
    ) -> Scheduled[Embeddings]:
        """Embed `texts`, merged with other waiting requests into as few backend calls as fit.
        Requests are merged only with requests of the same context (none, or the same id).

        A backend that tokenizes ahead has the request tokenized here, on a thread beside the
        event loop (the tokenizer's batch call releases the GIL), while the model's thread
        computes other requests: the batch is then budgeted by exact token counts, and bad input
        is refused before it queues. Requests that arrive in the same turn of the event loop are
        tokenized together, in one call on one thread (`_tokenize`)."""
        tokenized: Tokenized | None = None
        tokenize_seconds = 0.0
        if self._backend.tokenizes_ahead and context is None:
            started = time.perf_counter()
            tokenized = await self._tokenize(texts, truncate)
            tokenize_seconds = time.perf_counter() - started
            if self._observer is not None:
                self._observer.record_tokenization(self.name, tokenize_seconds)
            estimates = tokenized.token_counts
        else:
            estimates = [estimate_tokens(text, self._max_tokens) for text in texts]
        work = _EmbedWork(
            texts,
            truncate=truncate,
            task=task,
            estimates=estimates,
            lane=lane,
            loop=asyncio.get_running_loop(),
            context=context,
            tokenized=tokenized,
            tokenize_seconds=tokenize_seconds,
        )
        result: Scheduled[Embeddings] = await self._wait(work)
        return result

    async def _tokenize(self, texts: Sequence[str], truncate: bool) -> Tokenized:
        """`texts` tokenized off the event loop, with every other request that asks in this turn
        of the loop: one hop to a worker thread, one tokenizer call and one wake-up of the loop
        for all of them, instead of one each (a burst of single-text requests comes in a few turns)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Tokenized] = loop.create_future()
        if not self._tokenizing:
            loop.call_soon(self._tokenize_pending, loop)
        self._tokenizing.append(_Tokenizing(texts, truncate, future))
        return await future

    def _tokenize_pending(self, loop: asyncio.AbstractEventLoop) -> None:
        pending, self._tokenizing = self._tokenizing, []
        loop.run_in_executor(None, self._tokenize_together, pending, loop)

    def _tokenize_together(self, pending: list[_Tokenizing], loop: asyncio.AbstractEventLoop) -> None:
        """On a worker thread: one `tokenize_each` per truncation setting; each request gets its
        own Tokenized or its own error."""
        results: list[tuple[asyncio.Future[Tokenized], object]] = []
        for truncate in (False, True):
            group = [each for each in pending if each.truncate == truncate]
            if not group:
                continue
            try:
                outcomes: Sequence[object] = self._backend.tokenize_each(
                    [each.texts for each in group], truncate=truncate
                )
                if len(outcomes) != len(group):
                    raise RuntimeError(f"tokenize_each answered {len(outcomes)} of {len(group)} requests")
            except Exception as exc:  # the tokenizer itself failed: everyone in the call hears of it
                outcomes = [exc] * len(group)
            results += [(each.future, outcome) for each, outcome in zip(group, outcomes, strict=True)]
        loop.call_soon_threadsafe(_settle_all, results)

    async def run(self, fn: Callable[[], T], *, lane: Priority = Priority.INTERACTIVE) -> Scheduled[T]:
        """Run `fn` on the model's thread, in one turn of the compute gate."""
        work = _CallWork(fn, lane, asyncio.get_running_loop())
        result: Scheduled[T] = await self._wait(work)
        return result

    async def stream(
        self,
        start: Callable[[Callable[[], bool]], Iterator[T]],
        *,
        lane: Priority = Priority.INTERACTIVE,
    ) -> AsyncGenerator[T, None]:
        """Drive the iterator `start(cancelled)` on the model's thread, yielding its items here.

        Each item is computed in its own turn of the compute gate. If the consumer stops early
        (the client cancelled), `cancelled()` turns true and the backend ends at its next step.
        """
        work = _StreamWork(start, lane, asyncio.get_running_loop())
        self._submit(work)
        try:
            while True:
                item = await work.items.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            work.stop.set()
            if not self._withdraw(work):
                with self._changed:
                    if self._driving is work:
                        # Stop the step under way too (a long prompt, a rerank document): it
                        # can take seconds, and nobody waits for it.
                        self._backend.interrupt()
                # The thread is driving it: wait until it lets go, so the model outlives its use.
                await asyncio.shield(work.released)

    async def generate(
        self,
        *,
        prompt: str | None,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        lane: Priority = Priority.INTERACTIVE,
        on_start: Callable[[], None] = lambda: None,
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Stream a generation: batched with the model's other streams where the backend can,
        one stream at a time otherwise. `on_start` is called on the model's thread when it starts."""
        backend, streams = self._backend, self._streams
        if streams is None:

            def start(cancelled: Callable[[], bool]) -> Iterator[GenerationDelta]:
                on_start()
                return backend.generate(prompt=prompt, messages=messages, sampling=sampling, cancelled=cancelled)

            deltas = self.stream(start, lane=lane)
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    yield delta
            return

        def request(target: GenerationStreams) -> object:
            return target.open(prompt=prompt, messages=messages, sampling=sampling)

        work = _GenWork(request, on_start, lane, asyncio.get_running_loop())
        self._submit(work)
        ended = False
        try:
            while True:
                item = await work.items.get()
                if item is _DONE or isinstance(item, BaseException):
                    ended = True
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, GenerationDelta)
                yield item
        finally:
            work.stop.set()
            if not self._withdraw(work):
                if not ended and not work.released.done():
                    streams.interrupt()  # it may be in a step: stop that now, not at the step's end
                await asyncio.shield(work.released)

    def waiting(self, lane: Priority) -> int:
        """Requests queued in `lane` that have not been fully handed to the backend."""
        return len(self._queues[lane])

    @property
    def instances(self) -> int:
        return len(self._instances)

    @property
    def tokens_per_second(self) -> float | None:
        """Measured speed of embedding calls, in (estimated, or exact) tokens per second."""
        return self._rate

    async def _wait(self, work: _Work) -> Any:
        self._submit(work)
        try:
            return await work.future
        except asyncio.CancelledError:
            # Cancelled or past its deadline: drop what has not run. A call already running
            # finishes on the thread and its result is thrown away.
            self._withdraw(work)
            raise

    def _submit(self, work: _Work) -> None:
        lane = work.lane
        tokens = sum(work.estimates) if isinstance(work, _EmbedWork) else 0
        with self._changed:
            if self._closed:
                raise UnavailableError(f"model {self.name!r} is being unloaded; retry once it is loaded again")
            queued = self._queued_rows[lane]
            capacity = self._batching.queue_capacity
            if queued and queued + work.rows > capacity:
                retry = self._drain_estimate(lane)
                raise ResourceExhaustedError(
                    f"model {self.name!r} has {queued} inputs waiting in the {lane.name.lower()} lane "
                    f"(capacity {capacity}); retry in about {retry:.1f} s",
                    retry_after_seconds=retry,
                )
            self._queues[lane].append(work)
            self._queued_rows[lane] += work.rows
            self._queued_tokens[lane] += tokens
            self._changed.notify_all()
        if lane is Priority.INTERACTIVE:
            self._gate.interactive_arrived()

    def _withdraw(self, work: _Work) -> bool:
        """Take `work` out of its queue; False if the thread already took (all of) it."""
        with self._changed:
            if isinstance(work, _EmbedWork):
                work.failed = True  # rows of it in a running call are dropped, not delivered
                for index, running in self._running.items():
                    instance = self._instances[index]
                    if instance.interruptible and all(p.work.failed for p in running):
                        # Nobody waits for the call in progress any more (a long pooled input
                        # whose caller left): stop it rather than compute rows nobody will read.
                        instance.interrupt()
            queue = self._queues[work.lane]
            if work not in queue:
                return False
            queue.remove(work)
            self._release(work, work.remaining if isinstance(work, _EmbedWork) else work.rows)
            return True

    def _release(self, work: _Work, rows: int) -> None:
        """Uncount `rows` rows of `work` from its lane (they ran, or never will)."""
        self._queued_rows[work.lane] -= rows
        if isinstance(work, _EmbedWork):
            self._queued_tokens[work.lane] -= sum(work.estimates[work.taken : work.taken + rows])

    def _drain_estimate(self, lane: Priority) -> float:
        """Seconds until the lane's queue has room again, from the model's measured speed."""
        lanes = [Priority.INTERACTIVE, lane] if lane is not Priority.INTERACTIVE else [lane]
        tokens = sum(self._queued_tokens[each] for each in lanes)
        if self._rate is None or tokens <= 0:
            return 1.0
        # Room comes back as soon as part of the queue has run: half of it is a fair hint, and a
        # retry that is a little early is refused again cheaply.
        return min(30.0, max(0.05, tokens / (self._rate * len(self._instances)) / 2))

    # -- serving (the model's thread) ------------------------------------------------------------

    def _serve(self, index: int) -> None:
        # The model's own instance takes every kind of work; the others only embeddings.
        primary = index == 0
        while True:
            with self._changed:
                if primary:
                    while not self._closed and not any(self._queues.values()) and not self._active:
                        self._changed.wait()
                else:
                    while not self._closed and self._lane_for(primary) is None:
                        self._changed.wait()
                if self._closed:
                    if primary:
                        error = UnavailableError(f"model {self.name!r} was unloaded before this request ran")
                        self._fail_queued(error)
                        self._end_streams(UnavailableError(f"model {self.name!r} was unloaded"))
                    return
            if primary and self._streams is not None:
                self._admit_streams(self._streams)
            with self._changed:
                lane = self._lane_for(primary)
            if lane is not None:
                if primary and self._active:
                    self._hand_over_held(flush=True)  # this work can take seconds
                self._serve_other(lane, index)
            if primary and self._active:
                assert self._streams is not None
                self._step(self._streams)

    def _serve_other(self, lane: Priority, index: int) -> None:
        """Run the next unit of work that is not a batched stream on one instance, in a turn of
        the gate (shared with the model's other instances)."""
        backend = self._instances[index]
        with self._gate.turn(lane, owner=self):
            # Taken inside the turn: interactive work that arrived while waiting goes first.
            with self._changed:
                unit, full_batch = self._take(primary=index == 0)
            if isinstance(unit, _CallWork):
                unit.context.run(self._call, unit)
            elif isinstance(unit, list):
                if full_batch and backend.interruptible:
                    self._gate.allow_interrupt(backend.interrupt)
                with self._changed:
                    self._running[index] = unit
                try:
                    # A copy: another instance may be running rows of the same request in its
                    # context, and a context is entered by one thread at a time.
                    unit[0].work.context.copy().run(self._embed, unit, backend, index)
                finally:
                    with self._changed:
                        del self._running[index]
        if isinstance(unit, _StreamWork):
            unit.context.run(self._drive, unit)

    def _lane_for(self, primary: bool) -> Priority | None:
        """The lane an instance's thread takes its next unit from, interactive first, or None if
        neither holds work it may take: the model's own instance takes any work but batched
        streams (admitted apart, `_admit_streams`), the others only embeddings."""
        for lane in Priority:  # declared interactive first
            if any(_takes(work, primary) for work in self._queues[lane]):
                return lane
        return None

    # -- batched streams (the model's thread) ----------------------------------------------------

    def _admit_streams(self, streams: GenerationStreams) -> None:
        """Start waiting Generate calls while the backend has room: interactive ones first, and
        batch-lane ones never in the last free sequence (an interactive caller would wait for a
        whole answer). On an idle engine, callers who arrive together start together: the first
        step waits for more calls until none came for ADMISSION_GAP, at most ADMISSION_WINDOW after
        the first call arrived, so that their prompts are read in one step, not in two or three."""
        gathering = not self._active
        while self._admit_waiting(streams) and gathering and self._await_companion(streams.slots):
            pass

    def _await_companion(self, slots: int) -> bool:
        """Wait for another Generate call to join the streams just started on an idle engine;
        False when the window closed (or other work, or a full engine, is not to be kept waiting)."""
        first = min(work.arrived for work in self._active)
        with self._changed:
            while True:
                if self._closed or len(self._active) >= slots or self._lane_for(primary=True) is not None:
                    return False
                if self._next_stream(slots, take=False) is not None:
                    return True
                latest = max(work.arrived for work in self._active)
                left = min(latest + ADMISSION_GAP, first + ADMISSION_WINDOW) - time.perf_counter()
                if left <= 0:
                    return False
                self._changed.wait(left)

    def _admit_waiting(self, streams: GenerationStreams) -> bool:
        """Admit the waiting Generate calls the backend has room for; whether it admitted any."""
        admitted = False
        while True:
            with self._changed:
                work = self._next_stream(streams.slots)
                if work is None:
                    return admitted
            if work.handle is None:
                try:
                    work.handle = work.context.run(work.request, streams)
                except Exception as exc:  # a bad request: its caller gets the error
                    work.deliver(exc)
                    work.release()
                    continue
            if not streams.admit(work.handle):
                with self._changed:  # no room for it yet: it waits at the head of its lane
                    if not work.stop.is_set():
                        self._queues[work.lane].appendleft(work)
                        self._queued_rows[work.lane] += work.rows
                        return admitted
                streams.close(work.handle)
                work.release()
                return admitted
            work.started = time.perf_counter()
            work.context.run(work.on_start)
            self._active.append(work)
            admitted = True
            if self._observer is not None and streams.caches_prompts:
                self._observer.record_prompt_cache(self.name, streams.cached_tokens(work.handle))

    def _next_stream(self, slots: int, *, take: bool = True) -> _GenWork | None:
        """The next Generate call to admit, taken out of its queue unless `take` is False."""
        free = slots - len(self._active)
        if free <= 0:
            return None
        for lane in Priority:
            if lane is Priority.BATCH and free == 1 and slots > 1:
                return None
            for work in self._queues[lane]:
                if isinstance(work, _GenWork):
                    if take:
                        self._queues[lane].remove(work)
                        self._release(work, work.rows)
                    return work
        return None

    def _step(self, streams: GenerationStreams) -> None:
        """One decode for every admitted stream, in one turn of the gate."""
        self._drop_stopped(streams)
        if not self._active:
            return
        interactive = any(work.lane is Priority.INTERACTIVE for work in self._active)
        lane = Priority.INTERACTIVE if interactive else Priority.BATCH
        if self._gate.busy:  # another model's turn can take seconds
            self._hand_over_held(flush=True)
        with self._gate.turn(lane):
            if lane is Priority.BATCH:
                self._gate.allow_interrupt(streams.interrupt)
            try:
                deltas = self._active[0].context.run(streams.step)
            except ComputeInterrupted:  # for interactive work or a caller that left: runs again
                self._hand_over_held(flush=True)  # the work that interrupted it runs first
                if lane is Priority.BATCH:
                    self.interrupted += 1
                    if self._observer is not None:
                        self._observer.record_interruption(self.name)
                return
            except Exception as exc:
                self._end_streams(exc)
                return
        owners = {id(work.handle): work for work in self._active}
        for handle, delta in deltas:
            owners[id(handle)].held.append(delta)
        self._hand_over_held()

    def _hand_over_held(self, *, flush: bool = False) -> None:
        """Hand each stream's held deltas to its consumer, as one: its first text and its end at once,
        the rest once `stream_interval` has passed since its last message; all of it if `flush`, when
        the thread is about to do something other than the next token step, which can take seconds
        (another call of this model, a step interrupted for other work, a wait for another model's
        turn). Each message is an event loop wake-up, a gRPC write and a client read, CPU taken from
        decoding: measured on 2 cores, ~0.8 ms of a 13 ms token step for one stream. Text within the
        interval (~3 tokens of a lone stream, one or two of four) goes together, at a delay nobody
        reading it sees."""
        now = time.perf_counter()
        handed: dict[asyncio.AbstractEventLoop, list[tuple[_GenWork, object]]] = {}
        for work in list(self._active):
            if not work.held:
                continue
            finished = work.held[-1].finish_reason is not None
            recent = work.sent is not None and now - work.sent < self._stream_interval
            if recent and not (finished or flush):
                continue
            batch = handed.setdefault(work.loop, [])
            batch.append((work, GenerationDelta.joined(work.held)))
            work.held, work.sent = [], now
            if finished:  # the backend closed the stream
                batch += [(work, _DONE), (work, _RELEASED)]
                self._active.remove(work)
        # One wake-up of each event loop per step, not one per token: each is a write to the loop's
        # pipe, made between two decodes, while the compute threads wait.
        for loop, batch in handed.items():
            loop.call_soon_threadsafe(_hand_over, batch)

    def _drop_stopped(self, streams: GenerationStreams) -> None:
        """Close the streams whose callers left: their sequences and cells are free at once."""
        for work in [work for work in self._active if work.stop.is_set()]:
            streams.close(work.handle)
            self._active.remove(work)
            work.release()

    def _end_streams(self, error: BaseException) -> None:
        for work in self._active:
            if self._streams is not None:
                self._streams.close(work.handle)
            if work.held:  # text generated before the error still reaches its caller
                work.deliver(GenerationDelta.joined(work.held))
            work.deliver(error)
            work.release()
        self._active.clear()

    def _take(self, primary: bool = True) -> tuple[_CallWork | _StreamWork | list[_Slice] | None, bool]:
        """The next unit of work, and whether it is a full batch-lane batch (one that may be
        interrupted): interactive first, and within a lane the oldest request, with as many other
        waiting embedding requests merged in as the lane's budget allows. An instance other than
        the model's own skips calls and streams."""
        lane = self._lane_for(primary)
        if lane is None:
            return None, False
        queue = self._queues[lane]
        head = next(work for work in queue if _takes(work, primary))
        now = time.perf_counter()
        if not isinstance(head, _EmbedWork):
            queue.remove(head)
            self._release(head, head.rows)
            head.started = now
            assert isinstance(head, _CallWork | _StreamWork)
            return head, False
        max_rows = self._batching.max_batch_size
        max_tokens = self._unit_tokens(lane)
        full_batch = lane is Priority.BATCH and max_tokens == self._batching.max_batch_tokens
        rows = tokens = 0
        unit: list[_Slice] = []
        for work in list(queue):
            if (
                not isinstance(work, _EmbedWork)
                or work.truncate != head.truncate
                or _context_id(work) != _context_id(head)
            ):
                continue  # waits for the next unit, which starts with the oldest request
            start = work.taken
            stop = start
            while stop < work.rows and rows < max_rows:
                estimate = work.estimates[stop]
                if rows and tokens + estimate > max_tokens:
                    break
                rows += 1
                tokens += estimate
                stop += 1
            if stop == start:
                break
            self._release(work, stop - start)
            work.taken = stop
            if work.started is None:
                work.started = now
            unit.append(_Slice(work, start, stop))
            if work.remaining == 0:
                queue.remove(work)
            if rows >= max_rows or tokens >= max_tokens:
                break
        return unit, full_batch

    def _unit_tokens(self, lane: Priority) -> int:
        """The token budget of the next call: full for interactive work, and for batch work on a
        quiet machine with an interruptible backend; a micro-batch otherwise."""
        budget = self._batching.max_batch_tokens
        quiet = self._gate.quiet_seconds() >= self._batching.quiet_seconds
        if lane is Priority.BATCH and not (quiet and self._backend.interruptible):
            # One row at a time until the model's speed is known, then as much as fits the target.
            rate = self._rate
            budget = 0 if rate is None else min(budget, int(rate * self._batching.batch_unit_ms / 1000))
        return budget

    def _call(self, work: _CallWork) -> None:
        started = time.perf_counter()
        try:
            value = work.fn()
        except BaseException as exc:
            work.resolve(exc)
            return
        assert work.started is not None
        work.resolve(
            Scheduled(
                value=value,
                queued_seconds=work.started - work.arrived,
                inference_seconds=time.perf_counter() - started,
                batch_size=1,
            )
        )

    def _embed(self, unit: list[_Slice], backend: Backend, instance: int = 0) -> None:
        texts = [text for part in unit for text in part.work.texts[part.start : part.stop]]
        started = time.perf_counter()
        try:
            head = unit[0].work
            if head.tokenized is not None:
                output = backend.embed_tokenized(_joined(unit))
            else:
                output = backend.embed(texts, truncate=head.truncate, context=head.embed_context)
        except ComputeInterrupted:
            self._requeue(unit)
            return
        except Exception as exc:
            if len(unit) > 1:
                # Someone's input failed the merged call: run each request's rows alone, so only
                # the one it belongs to gets the error.
                for part in unit:
                    self._embed([part], backend, instance)
            else:
                part = unit[0]
                if isinstance(exc, InputTooLongError):
                    at = part.start + exc.index
                    exc = exc.renamed(f"input {at}", at)
                part.work.fail(exc)
            return
        seconds = time.perf_counter() - started
        estimated = sum(sum(p.work.estimates[p.start : p.stop]) for p in unit)
        if seconds > 0:
            rate = estimated / seconds
            self._rate = rate if self._rate is None else self._rate + _RATE_SMOOTHING * (rate - self._rate)
        if self._observer is not None:
            self._observer.record_batch(self.name, unit[0].work.task, len(texts), sum(output.token_counts))
            self._observer.record_instance_call(self.name, instance, len(texts), seconds)
        offset = 0
        for part in unit:
            count = part.stop - part.start
            part.work.accept(part.start, count, output, offset, seconds=seconds, batch_size=len(texts))
            offset += count

    def _requeue(self, unit: list[_Slice]) -> None:
        """Put an interrupted call's rows back at the head of their lanes, in their order."""
        self.interrupted += 1
        if self._observer is not None:
            self._observer.record_interruption(self.name)
        with self._changed:
            for part in reversed(unit):
                work = part.work
                if work.failed:  # withdrawn meanwhile
                    continue
                work.taken = part.start
                queue = self._queues[work.lane]
                if work not in queue:
                    queue.appendleft(work)
                self._queued_rows[work.lane] += part.stop - part.start
                self._queued_tokens[work.lane] += sum(work.estimates[part.start : part.stop])

    def _drive(self, work: _StreamWork) -> None:
        with self._changed:
            self._driving = work
        try:
            items: Iterator[Any] | None = None
            while not work.stop.is_set():
                with self._gate.turn(work.lane):
                    if items is None:
                        items = work.start(work.stop.is_set)
                    item = next(items, _DONE)
                if item is _DONE:
                    break
                work.deliver(item)
            work.deliver(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            work.deliver(exc)
        finally:
            with self._changed:
                self._driving = None
            work.release()

    def _fail_queued(self, error: BaseException) -> None:
        for queue in self._queues.values():
            while queue:
                work = queue.popleft()
                if isinstance(work, _Streamed):
                    if isinstance(work, _GenWork) and work.handle is not None and self._streams is not None:
                        self._streams.close(work.handle)
                    work.deliver(error)
                    work.release()
                else:
                    work.resolve(error)

    def close(self) -> None:
        """Stop the threads after the units they are running; requests still queued get UNAVAILABLE."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()
