"""The job runner: queues jobs, runs a bounded number of them as asyncio tasks, checkpoints each
micro-batch, and resumes unfinished jobs when the server starts.

A running job loops: wait until its run policy holds, read a batch from the source (on a thread),
embed and write it with `IndexService.upsert` in the batch lane, then save the source position
after that batch. The position is saved only after the store has written the batch, and point
ids are derived from (collection, document id), so after a crash the job re-writes at most the
batch that was in flight and the collection never holds a document twice.

Pause and cancel stop the task at once; whatever the interrupted batch did is redone (or not) from
the checkpoint. On shutdown tasks stop without touching their records: a running job is still
"running" on disk, and the next start resumes it, exactly as after `kill -9`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import structlog

from wafer.backends.base import InputTooLongError
from wafer.config import Settings
from wafer.contexts import Reservoir
from wafer.domain import Priority, StoredDocument
from wafer.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    WaferError,
)
from wafer.indexing import IndexService
from wafer.jobs.policy import PolicyChecker, RunPolicy
from wafer.jobs.sources import (
    Batch,
    Cursor,
    JsonlSource,
    ReadLimits,
    SourceReader,
    SourceSpec,
    SqliteSource,
    TooManyRowsError,
    confine,
    open_reader,
)
from wafer.jobs.state import RESUMABLE, JobRecord, JobState, JobStore, to_json
from wafer.store.base import check_collection_name

log = structlog.get_logger("wafer.jobs")

T = TypeVar("T")

# The rate is measured over this window of running time, so it follows the current pace.
RATE_WINDOW_SECONDS = 30.0
# A watcher hears from a running job at least this often, so rate and ETA stay fresh.
WATCH_HEARTBEAT_SECONDS = 1.0
# A watcher hears at most this often, however often jobs change.
WATCH_MIN_INTERVAL_SECONDS = 0.25
# WatchJob streams open at once, over all jobs.
MAX_WATCHERS = 256
# After UNAVAILABLE or RESOURCE_EXHAUSTED without a hint (model unloading, queue full).
RETRY_SECONDS = 1.0
# Batches of one job in flight at once: two let the model embed one while the store writes the other.
PIPELINE_DEPTH = 2


@dataclass(frozen=True, slots=True)
class InlineSource:
    documents: list[StoredDocument]


JobSource = InlineSource | JsonlSource | SqliteSource


@dataclass(frozen=True, slots=True)
class JobRequest:
    collection: str
    source: JobSource
    model: str = ""
    policy: RunPolicy = field(default_factory=RunPolicy)
    # 0: the server's jobs_batch_size.
    batch_size: int = 0
    truncate: bool = False
    # Contextual models (cde): re-index the collection with a fresh context sampled from this source
    # (the collection is emptied first).
    fresh_context: bool = False


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A job as callers see it: its record, plus the live rate and ETA."""

    id: str
    state: JobState
    reason: str
    collection: str
    model: str
    source: str
    policy: RunPolicy
    batch_size: int
    done: int
    skipped: int
    total: int | None
    docs_per_second: float
    eta_seconds: float | None
    error: str
    created: datetime
    started: datetime | None
    finished: datetime | None


@dataclass(eq=False)
class _Job:
    record: JobRecord
    task: asyncio.Task[None] | None = None
    # (monotonic time, documents done) while running, for the rate.
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def rate(self) -> float:
        if self.record.state is not JobState.RUNNING or len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def sample(self) -> None:
        now = time.monotonic()
        self.samples.append((now, self.record.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_SECONDS:
            self.samples.popleft()

    def status(self) -> JobStatus:
        record = self.record
        rate = self.rate()
        eta = None
        if record.total is not None and rate > 0:
            eta = max(0, record.total - record.done - record.skipped) / rate
        return JobStatus(
            id=record.id,
            state=record.state,
            reason=record.reason,
            collection=record.collection,
            model=record.model,
            source=record.describe_source(),
            policy=record.policy,
            batch_size=record.batch_size,
            done=record.done,
            skipped=record.skipped,
            total=record.total,
            docs_per_second=rate,
            eta_seconds=eta,
            error=record.error,
            created=record.created,
            started=record.started,
            finished=record.finished,
        )


def _now() -> datetime:
    return datetime.now(UTC)


class _ReaderThread:
    """One thread per run of a job, so reader calls never overlap, even when the task is cancelled
    while a read is under way (the close queues behind it). Closing it stops a SQLite statement
    under way (`ReadLimits.stop`): a cancelled, paused or shut-down job leaves no thread working."""

    def __init__(self, job_id: str, limits: ReadLimits) -> None:
        self.limits = limits
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wafer-job-{job_id}")

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self, reader: SourceReader | None) -> None:
        self.limits.stop.set()
        if reader is not None:
            self._pool.submit(reader.close)
        self._pool.shutdown(wait=False)


async def _cancel_all(tasks: deque[tuple[asyncio.Task[bool], Batch]]) -> None:
    pending = [task for task, _ in tasks]
    tasks.clear()
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class JobObserver(Protocol):
    """Told about every batch a job writes (the metrics implement it)."""

    def record_job_documents(self, model: str, documents: int) -> None: ...


class JobManager:
    def __init__(
        self,
        settings: Settings,
        index: IndexService,
        policy: PolicyChecker,
        *,
        known_model: Callable[[str], object],
        metrics: JobObserver | None = None,
    ) -> None:
        """`known_model(name)` raises NotFoundError for a model the catalog does not have."""
        self._settings = settings
        self._index = index
        self._policy = policy
        self._known_model = known_model
        self._metrics = metrics
        self._store = JobStore(settings.jobs_dir)
        self._roots: list[Path] = [settings.data_dir, *settings.jobs_allowed_roots]
        self._jobs: dict[str, _Job] = {}
        self._slots = asyncio.Semaphore(settings.jobs_max_running)
        self._changed = asyncio.Event()
        # Records are written on one thread, in the order they were taken on the event loop.
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wafer-jobs")
        self._closing = False
        self._watchers = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the records of earlier runs and resume the jobs that were not finished or paused."""
        for record in await self._on_disk(self._store.load_all):
            job = _Job(record)
            self._jobs[record.id] = job
            if record.state in RESUMABLE:
                record.state, record.reason = JobState.QUEUED, "resuming after a restart"
                await self._save(job)
                self._launch(job)
            else:
                # A crash may have come between a job's final record and the removal of its copy.
                await self._drop_inline(job)
        resumed = sum(1 for j in self._jobs.values() if j.task is not None)
        if self._jobs:
            log.info("jobs loaded", jobs=len(self._jobs), resumed=resumed)

    def stop_watches(self) -> None:
        """End every WatchJob stream (UNAVAILABLE), so watchers do not hold up a graceful shutdown."""
        self._closing = True
        self._notify()

    async def close(self) -> None:
        """Stop every task and leave the records as they are, so the next start resumes them."""
        self.stop_watches()
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._disk.shutdown(wait=True)

    # -- calls ---------------------------------------------------------------------------------

    async def submit(self, request: JobRequest) -> JobStatus:
        check_collection_name(request.collection)
        batch_size = request.batch_size or self._settings.jobs_batch_size
        limit = self._settings.max_inputs_per_request
        if not 0 < batch_size <= limit:
            raise InvalidArgumentError(f"batch_size must be between 1 and {limit} (max_inputs_per_request)")
        if request.model:
            self._known_model(request.model)
        job_id = self._new_id()
        source: SourceSpec
        inline = isinstance(request.source, InlineSource)
        total: int | None = None
        if isinstance(request.source, InlineSource):
            documents = request.source.documents
            if not documents:
                raise InvalidArgumentError("an inline source needs at least one document")
            for i, d in enumerate(documents):
                if "id" in d.payload or "text" in d.payload:
                    raise InvalidArgumentError(f"documents[{i}].payload must not hold 'id' or 'text' fields")
            lines = [{"id": d.id, "text": d.text, **d.payload} for d in documents]
            path = await self._on_disk(lambda: self._store.write_inline(job_id, lines))
            source, total = JsonlSource(path=path), len(documents)
        else:
            source = self._confined(request.source)
            limits = self._read_limits()
            try:
                await asyncio.to_thread(self._check_source, source, limits)
            finally:
                # A caller gone (deadline, cancel) stops the query it started.
                limits.stop.set()
        record = JobRecord(
            id=job_id,
            collection=request.collection,
            model=request.model,
            source=source,
            policy=request.policy,
            batch_size=batch_size,
            truncate=request.truncate,
            fresh_context=request.fresh_context,
            inline=inline,
            total=total,
        )
        job = _Job(record)
        self._jobs[job_id] = job
        await self._save(job)
        self._launch(job)
        log.info("job submitted", job=job_id, collection=record.collection, source=record.describe_source())
        return job.status()

    def get(self, job_id: str) -> JobStatus:
        return self._job(job_id).status()

    def all(self) -> list[JobStatus]:
        """Every job, newest first. Metrics scrapes call it from another thread: it only reads."""
        jobs = sorted(list(self._jobs.values()), key=lambda j: j.record.created, reverse=True)
        return [job.status() for job in jobs]

    async def watch(self, job_id: str) -> AsyncIterator[JobStatus]:
        """The job now, then on every change (and each second while it runs), until it ends; at
        most one message per WATCH_MIN_INTERVAL_SECONDS, and at most MAX_WATCHERS streams at once
        (2,000 unbounded watchers once pushed 172k messages in 20 s and kept both cores busy)."""
        job = self._job(job_id)
        if self._watchers >= MAX_WATCHERS:
            raise ResourceExhaustedError(
                f"{self._watchers} job watches are open, the most the server keeps; poll GetJob instead",
                retry_after_seconds=WATCH_HEARTBEAT_SECONDS,
            )
        self._watchers += 1
        try:
            while True:
                if self._closing:
                    raise UnavailableError(
                        f"the server is shutting down; job {job_id} goes on when it starts again: watch it then"
                    )
                changed = self._changed
                status = job.status()
                yield status
                if status.state.finished:
                    return
                # Changes that come meanwhile are folded into the next message.
                await asyncio.sleep(WATCH_MIN_INTERVAL_SECONDS)
                if changed.is_set() or self._closing:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), WATCH_HEARTBEAT_SECONDS - WATCH_MIN_INTERVAL_SECONDS)
        finally:
            self._watchers -= 1

    async def pause(self, job_id: str) -> JobStatus:
        job = self._job(job_id)
        record = job.record
        if record.state.finished:
            raise FailedPreconditionError(f"job {job_id} has ended ({record.state.value}); it cannot be paused")
        if record.state is not JobState.PAUSED:
            await self._stop(job)
            if record.state.finished:
                # It ended while being stopped: its end stands.
                await self._end(job)
                return job.status()
            record.state, record.reason = JobState.PAUSED, "paused by a caller"
            await self._save(job)
        return job.status()

    async def resume(self, job_id: str) -> JobStatus:
        """Continue a paused job, or retry a failed one, from its checkpoint."""
        job = self._job(job_id)
        record = job.record
        if record.state not in (JobState.PAUSED, JobState.FAILED):
            if record.state in RESUMABLE:
                return job.status()
            raise FailedPreconditionError(f"job {job_id} is {record.state.value}; only paused or failed jobs resume")
        record.state, record.reason, record.error, record.finished = JobState.QUEUED, "", "", None
        await self._save(job)
        self._launch(job)
        return job.status()

    async def cancel(self, job_id: str) -> JobStatus:
        job = self._job(job_id)
        record = job.record
        if record.state.finished:
            if record.state is JobState.CANCELLED:
                return job.status()
            raise FailedPreconditionError(f"job {job_id} has ended ({record.state.value}); it cannot be cancelled")
        await self._stop(job)
        if not record.state.finished:
            record.state, record.reason, record.finished = JobState.CANCELLED, "cancelled by a caller", _now()
        await self._end(job)
        return job.status()

    # -- running -------------------------------------------------------------------------------

    def _launch(self, job: _Job) -> None:
        # A fresh context: the job outlives the call that started it, and must not log its request id.
        job.task = asyncio.get_running_loop().create_task(
            self._run(job), name=f"wafer-job-{job.record.id}", context=contextvars.Context()
        )

    async def _stop(self, job: _Job) -> None:
        task, job.task = job.task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        job.samples.clear()

    async def _run(self, job: _Job) -> None:
        record = job.record
        try:
            async with self._slots:
                await self._execute(job)
        except asyncio.CancelledError:
            raise
        except WaferError as error:
            await self._fail(job, error.message)
        except Exception as error:
            log.exception("job failed", job=record.id)
            await self._fail(job, f"internal error: {type(error).__name__}: {error}")

    async def _fail(self, job: _Job, message: str) -> None:
        record = job.record
        record.state, record.reason, record.error, record.finished = JobState.FAILED, "", message, _now()
        job.samples.clear()
        log.warning("job failed", job=record.id, error=message)
        await self._save(job)

    async def _execute(self, job: _Job) -> None:
        record = job.record
        thread = _ReaderThread(record.id, self._read_limits())
        try:
            reader = await thread.run(lambda: open_reader(record.source, record.cursor, thread.limits))
        except BaseException:
            thread.close(None)
            raise
        # Batches written but not yet checkpointed, oldest first: the next batch embeds while the
        # previous one is written, and checkpoints advance strictly in source order.
        in_flight: deque[tuple[asyncio.Task[bool], Batch]] = deque()
        try:
            await self._count(job, reader, thread)
            if record.started is None:
                record.started = _now()
            await self._prepare_context(job, thread)
            exhausted = False
            while not exhausted or in_flight:
                if not exhausted:
                    await self._wait_for_policy(job)
                    try:
                        batch = await thread.run(partial(reader.read, record.batch_size))
                    except WaferError:
                        # A bad row fails the job, but only after the batches before it are written.
                        await self._settle(job, in_flight)
                        raise
                    exhausted = batch.exhausted
                    in_flight.append((asyncio.get_running_loop().create_task(self._write(job, batch.documents)), batch))
                    if len(in_flight) < PIPELINE_DEPTH and not exhausted:
                        continue
                task, batch = in_flight.popleft()
                if not await task:
                    # A transient refusal: drop what followed it and read again from the checkpoint.
                    await _cancel_all(in_flight)
                    await thread.run(reader.close)
                    reader = await thread.run(lambda: open_reader(record.source, record.cursor, thread.limits))
                    exhausted = False
                    continue
                self._advance(job, batch)
                if not (exhausted and not in_flight):
                    await self._save(job)
        finally:
            await _cancel_all(in_flight)
            thread.close(reader)
        record.state, record.reason, record.finished = JobState.SUCCEEDED, "", _now()
        job.samples.clear()
        await self._end(job)
        log.info("job finished", job=record.id, done=record.done, skipped=record.skipped)

    async def _prepare_context(self, job: _Job, thread: _ReaderThread) -> None:
        """For a contextual model (cde), before anything is embedded: a collection without a context
        gets one sampled from the whole source (a uniform sample of the model's corpus size; all of it,
        oversampled, when the source is smaller). With `fresh_context` the collection is emptied first."""
        record = job.record
        model = record.model or self._index.default_embed_model()
        if not self._index.is_contextual(model):
            return
        if record.fresh_context and not record.context_ready:
            await self._index.drop_collection(record.collection)
        elif await self._index.has_context(record.collection, model):
            return
        size = await self._index.context_size(model)
        reservoir = Reservoir(size, seed=f"{record.collection}\x00{record.id}")
        sampler = await thread.run(lambda: open_reader(record.source, Cursor(), thread.limits))
        try:
            while True:
                batch = await thread.run(partial(sampler.read, record.batch_size))
                for document in batch.documents:
                    reservoir.add(document.text)
                if batch.exhausted:
                    break
        finally:
            await thread.run(sampler.close)
        if not reservoir.items:
            return  # an empty source writes nothing, and needs no context
        record.reason = f"building the context from {len(reservoir.items)} sampled documents"
        self._notify()
        await self._index.set_context(record.collection, model, reservoir.items, priority=Priority.BATCH)
        record.context_ready, record.reason = True, ""
        await self._save(job)
        log.info("job context built", job=record.id, collection=record.collection, sampled=len(reservoir.items))

    @staticmethod
    async def _count(job: _Job, reader: SourceReader, thread: _ReaderThread) -> None:
        record = job.record
        if record.total is not None:
            return
        try:
            record.total = await thread.run(reader.count)
        except TooManyRowsError:
            raise
        except WaferError as error:
            # Progress without a total (and an ETA) is still progress.
            log.warning("cannot count the source; no total or ETA", job=record.id, error=error.message)

    async def _settle(self, job: _Job, in_flight: deque[tuple[asyncio.Task[bool], Batch]]) -> None:
        """Wait for the batches in flight, in order, and checkpoint the ones that were written."""
        while in_flight:
            task, written = in_flight.popleft()
            if not await task:
                break
            self._advance(job, written)
        await self._save(job, notify=False)

    @staticmethod
    def _advance(job: _Job, batch: Batch) -> None:
        """Move the checkpoint past a batch the store has written."""
        record = job.record
        record.cursor = batch.end
        record.done += len(batch.documents)
        record.skipped += batch.skipped
        job.sample()

    async def _write(self, job: _Job, documents: list[StoredDocument]) -> bool:
        """Embed and write one batch; False when the server asked to come back later."""
        record = job.record
        if not documents:
            return True
        try:
            result = await self._index.upsert(
                record.collection,
                documents,
                model=record.model,
                truncate=record.truncate,
                priority=Priority.BATCH,
            )
        except InputTooLongError as error:
            # The batch's position means nothing to whoever reads the job's error: name the document.
            document = documents[error.index] if 0 <= error.index < len(documents) else None
            if document is None:
                raise
            name = f"document {document.id!r}" if document.id else f"the document starting {document.text[:40]!r}"
            raise error.renamed(name, error.index) from None
        except (UnavailableError, ResourceExhaustedError) as error:
            record.state, record.reason = JobState.WAITING, f"retrying: {error.message}"
            job.samples.clear()
            self._notify()
            await asyncio.sleep(error.retry_after_seconds or RETRY_SECONDS)
            return False
        # The collection is bound to this model from now on; show which one it is.
        record.model = result.model
        if self._metrics is not None:
            self._metrics.record_job_documents(result.model, len(documents))
        return True

    async def _wait_for_policy(self, job: _Job) -> None:
        record = job.record
        while (reason := self._policy.blocking_reason(record.policy)) is not None:
            if record.state is not JobState.WAITING or record.reason != reason:
                record.state, record.reason = JobState.WAITING, reason
                job.samples.clear()
                await self._save(job)
            await asyncio.sleep(self._settings.jobs_policy_poll_seconds)
        if record.state is not JobState.RUNNING:
            record.state, record.reason = JobState.RUNNING, ""
            await self._save(job)

    # -- helpers -------------------------------------------------------------------------------

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r}")
        return job

    def _new_id(self) -> str:
        while True:
            job_id = secrets.token_hex(6)
            if job_id not in self._jobs:
                return job_id

    def _confined(self, source: JsonlSource | SqliteSource) -> SourceSpec:
        path = confine(source.path, self._roots)
        if isinstance(source, JsonlSource):
            return JsonlSource(path=path, id_field=source.id_field or "id", text_field=source.text_field or "text")
        return SqliteSource(
            path=path,
            query=source.query,
            id_column=source.id_column or "id",
            text_column=source.text_column or "text",
        )

    def _read_limits(self) -> ReadLimits:
        """Fresh limits (and stop event) for one run of a reader."""
        settings = self._settings
        return ReadLimits(
            roots=tuple(self._roots),
            query_seconds=settings.jobs_sqlite_query_seconds,
            max_rows=settings.jobs_sqlite_max_rows,
            max_line_bytes=settings.jobs_max_line_bytes,
        )

    @staticmethod
    def _check_source(source: SourceSpec, limits: ReadLimits) -> None:
        """Open the source and read nothing: a wrong query or column fails the submit, not the job."""
        reader: SourceReader = open_reader(source, Cursor(), limits)
        reader.close()

    async def _save(self, job: _Job, *, notify: bool = True) -> None:
        """Write the record; watchers hear of the change once it is on disk."""
        snapshot = to_json(job.record)
        await self._on_disk(lambda: self._store.save(snapshot))
        if notify:
            self._notify()

    async def _end(self, job: _Job) -> None:
        """Save an ended job, then drop its inline copy: a crash in between leaves a file that the
        next start removes, never a resumable job without its documents."""
        await self._save(job, notify=False)
        await self._drop_inline(job)
        self._notify()

    async def _drop_inline(self, job: _Job) -> None:
        """Remove an inline job's copy of its documents once it can no longer run (a failed job
        keeps it: ResumeJob retries it)."""
        if job.record.inline and job.record.state in (JobState.SUCCEEDED, JobState.CANCELLED):
            await self._on_disk(lambda: self._store.remove_inline(job.record.id))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _on_disk(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._disk, fn)
