"""Running one job: read its source in batches, embed and write them, checkpoint after each.

A running job loops: wait until its run policy holds, read a batch from the source (on a thread),
embed and write it with `IndexService.upsert` in the batch lane, then save the source position
after that batch. The position is saved only after the store has written the batch, and point
ids are derived from (collection, document id), so after a crash the job re-writes at most the
batch that was in flight and the collection never holds a document twice.

Two batches are in flight at once (the model embeds one while the store writes the other), so a
later batch can finish first. A document id that a later batch shares with a batch still in flight
waits for that batch's write: writes for one id land in source order, and the newest text wins.

`JobManager` (wafer.jobs.manager) owns the jobs, their records and their tasks; this module only
runs one job to its end, or raises why it could not.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Protocol, TypeVar

import structlog

from wafer.backends.base import InputTooLongError
from wafer.contexts import Reservoir
from wafer.domain import Priority, StoredDocument
from wafer.errors import ResourceExhaustedError, UnavailableError, WaferError
from wafer.indexing import IndexService, derived_id
from wafer.jobs.policy import PolicyChecker, RunPolicy
from wafer.jobs.sources import Batch, Cursor, ReadLimits, SourceReader, TooManyRowsError, open_reader
from wafer.jobs.state import JobRecord, JobState
from wafer.serial import SerialExecutor

log = structlog.get_logger("wafer.jobs")

T = TypeVar("T")

# The rate is measured over this window of running time, so it follows the current pace.
RATE_WINDOW_SECONDS = 30.0
# After UNAVAILABLE or RESOURCE_EXHAUSTED without a hint (model unloading, queue full).
RETRY_SECONDS = 1.0
# Batches of one job in flight at once: two let the model embed one while the store writes the other.
PIPELINE_DEPTH = 2


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
class Job:
    """A job's record and its live state: the task that runs it and its recent progress."""

    record: JobRecord
    task: asyncio.Task[None] | None = None
    # (monotonic time, documents done) while running, for the rate.
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def rate(self) -> float:
        if self.record.state is not JobState.RUNNING:
            return 0.0
        # A metrics scrape calls this from its own thread while the event loop may clear the
        # samples: no length check then read (the deque can empty in between), one read that may
        # find it empty. One sample (t0 == t1) is no rate yet.
        try:
            (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        except IndexError:
            return 0.0
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


def now() -> datetime:
    return datetime.now(UTC)


class _ReaderThread:
    """One thread per run of a job, so reader calls never overlap, even when the task is cancelled
    while a read is under way (the close queues behind it). Closing it stops a SQLite statement
    under way (`ReadLimits.stop`): a cancelled, paused or shut-down job leaves no thread working."""

    def __init__(self, job_id: str, limits: ReadLimits) -> None:
        self.limits = limits
        self._thread = SerialExecutor(f"wafer-job-{job_id}")

    async def run(self, fn: Callable[[], T]) -> T:
        return await self._thread.run(fn)

    def close(self, reader: SourceReader | None) -> None:
        self.limits.stop.set()
        if reader is not None:
            self._thread.submit(reader.close)
        self._thread.close(wait=False)


@dataclass(eq=False)
class _InFlight:
    """A batch being embedded and written: its task (False: come back later) and its ids."""

    task: asyncio.Task[bool]
    batch: Batch
    ids: frozenset[str]


async def _cancel_all(in_flight: deque[_InFlight]) -> None:
    pending = [entry.task for entry in in_flight]
    in_flight.clear()
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class JobObserver(Protocol):
    """Told about every batch a job writes (the metrics implement it)."""

    def record_job_documents(self, model: str, documents: int) -> None: ...


class SaveJob(Protocol):
    """Writes a job's record; watchers hear of the change once it is on disk, unless told not to."""

    async def __call__(self, job: Job, *, notify: bool = True) -> None: ...


class JobRunner:
    """Runs jobs to their end; the manager decides when, and records how they ended."""

    def __init__(
        self,
        index: IndexService,
        policy: PolicyChecker,
        *,
        read_limits: Callable[[], ReadLimits],
        save: SaveJob,
        notify: Callable[[], None],
        policy_poll_seconds: float,
        metrics: JobObserver | None = None,
    ) -> None:
        """`read_limits()`: fresh limits (and stop event) for one run of a reader; `notify()` tells
        watchers of a change that is not saved."""
        self._index = index
        self._policy = policy
        self._read_limits = read_limits
        self._save = save
        self._notify = notify
        self._policy_poll_seconds = policy_poll_seconds
        self._metrics = metrics

    async def run(self, job: Job) -> None:
        """Write the job's source from its checkpoint to the end; raise (WaferError) why it failed."""
        record = job.record
        thread = _ReaderThread(record.id, self._read_limits())
        try:
            reader = await thread.run(lambda: open_reader(record.source, record.cursor, thread.limits))
        except BaseException:
            thread.close(None)
            raise
        # Batches written but not yet checkpointed, oldest first: the next batch embeds while the
        # previous one is written, and checkpoints advance strictly in source order.
        in_flight: deque[_InFlight] = deque()
        try:
            await self._count(job, reader, thread)
            if record.started is None:
                record.started = now()
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
                    in_flight.append(self._start_write(job, batch, in_flight))
                    if len(in_flight) < PIPELINE_DEPTH and not exhausted:
                        continue
                entry = in_flight.popleft()
                if not await entry.task:
                    # A transient refusal: drop what followed it and read again from the checkpoint.
                    await _cancel_all(in_flight)
                    await thread.run(reader.close)
                    reader = await thread.run(lambda: open_reader(record.source, record.cursor, thread.limits))
                    exhausted = False
                    continue
                self._advance(job, entry.batch)
                if not (exhausted and not in_flight):
                    await self._save(job)
        finally:
            await _cancel_all(in_flight)
            thread.close(reader)

    def _start_write(self, job: Job, batch: Batch, in_flight: Collection[_InFlight]) -> _InFlight:
        """Start embedding and writing a batch. It waits, before writing, for the earlier batches
        in flight that hold one of its ids: otherwise a later batch embedded faster could be
        overwritten by an earlier one, leaving the older text of a document stored."""
        # The index names a document without an id by its text; the same text is the same id here.
        ids = frozenset(d.id or derived_id(d.text) for d in batch.documents)
        earlier = [entry.task for entry in in_flight if not entry.ids.isdisjoint(ids)]
        task = asyncio.get_running_loop().create_task(self._write(job, batch.documents, after=earlier))
        return _InFlight(task, batch, ids)

    async def _prepare_context(self, job: Job, thread: _ReaderThread) -> None:
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
    async def _count(job: Job, reader: SourceReader, thread: _ReaderThread) -> None:
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

    async def _settle(self, job: Job, in_flight: deque[_InFlight]) -> None:
        """Wait for the batches in flight, in order, and checkpoint the ones that were written."""
        while in_flight:
            entry = in_flight.popleft()
            if not await entry.task:
                break
            self._advance(job, entry.batch)
        # The failure that follows tells the watchers.
        await self._save(job, notify=False)

    @staticmethod
    def _advance(job: Job, batch: Batch) -> None:
        """Move the checkpoint past a batch the store has written."""
        record = job.record
        record.cursor = batch.end
        record.done += len(batch.documents)
        record.skipped += batch.skipped
        job.sample()

    async def _write(self, job: Job, documents: list[StoredDocument], *, after: list[asyncio.Task[bool]]) -> bool:
        """Embed and write one batch, once the batches in `after` have ended; False when the server
        asked to come back later."""
        record = job.record
        if not documents:
            return True
        if after:
            # Their outcome is not this batch's to handle: the runner awaits each in order.
            await asyncio.wait(after)
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

    async def _wait_for_policy(self, job: Job) -> None:
        record = job.record
        while (reason := self._policy.blocking_reason(record.policy)) is not None:
            if record.state is not JobState.WAITING or record.reason != reason:
                record.state, record.reason = JobState.WAITING, reason
                job.samples.clear()
                await self._save(job)
            await asyncio.sleep(self._policy_poll_seconds)
        if record.state is not JobState.RUNNING:
            record.state, record.reason = JobState.RUNNING, ""
            await self._save(job)
