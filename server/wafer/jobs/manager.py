"""The job manager: queues jobs, runs a bounded number of them as asyncio tasks (each with
`JobRunner`, wafer.jobs.runner), keeps their records, and resumes unfinished jobs when the server
starts.

Pause and cancel stop the task at once; whatever the interrupted batch did is redone (or not) from
the checkpoint. On shutdown tasks stop without touching their records: a running job is still
"running" on disk, and the next start resumes it, exactly as after `kill -9`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from wafer.domain import StoredDocument
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
from wafer.jobs.runner import Job, JobObserver, JobRunner, JobStatus, now
from wafer.jobs.sources import (
    Cursor,
    JsonlSource,
    ReadLimits,
    SourceReader,
    SourceSpec,
    SqliteSource,
    confine,
    open_reader,
)
from wafer.jobs.state import RESUMABLE, JobRecord, JobState, JobStore, to_json
from wafer.serial import SerialExecutor
from wafer.store.base import check_collection_name

log = structlog.get_logger("wafer.jobs")

T = TypeVar("T")

# A watcher hears from a running job at least this often, so rate and ETA stay fresh.
WATCH_HEARTBEAT_SECONDS = 1.0
# A watcher hears at most this often, however often jobs change.
WATCH_MIN_INTERVAL_SECONDS = 0.25
# WatchJob streams open at once, over all jobs.
MAX_WATCHERS = 256


@dataclass(frozen=True, slots=True)
class JobOptions:
    """The settings the job manager uses (app.py builds them from Settings)."""

    # Where the job records (and inline documents) are kept.
    jobs_dir: Path
    # Folders a JSONL or SQLite source may lie under: the data folder and jobs_allowed_roots.
    allowed_roots: tuple[Path, ...]
    max_running: int
    # A job's batch size when its request sets none, and the most it may set.
    default_batch_size: int
    max_inputs_per_request: int
    policy_poll_seconds: float
    sqlite_query_seconds: float
    sqlite_max_rows: int
    max_line_bytes: int


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


class JobManager:
    def __init__(
        self,
        options: JobOptions,
        index: IndexService,
        policy: PolicyChecker,
        *,
        known_model: Callable[[str], object],
        metrics: JobObserver | None = None,
    ) -> None:
        """`known_model(name)` raises NotFoundError for a model the catalog does not have."""
        self._options = options
        self._known_model = known_model
        self._store = JobStore(options.jobs_dir)
        self._jobs: dict[str, Job] = {}
        self._slots = asyncio.Semaphore(options.max_running)
        self._changed = asyncio.Event()
        # Records are written on one thread, in the order they were taken on the event loop.
        self._disk = SerialExecutor("wafer-jobs")
        self._closing = False
        self._watchers = 0
        self._runner = JobRunner(
            index,
            policy,
            read_limits=self._read_limits,
            save=self._save,
            notify=self._notify,
            policy_poll_seconds=options.policy_poll_seconds,
            metrics=metrics,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the records of earlier runs and resume the jobs that were not finished or paused."""
        for record in await self._on_disk(self._store.load_all):
            job = Job(record)
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
        self._disk.close()

    # -- calls ---------------------------------------------------------------------------------

    async def submit(self, request: JobRequest) -> JobStatus:
        check_collection_name(request.collection)
        batch_size = request.batch_size or self._options.default_batch_size
        limit = self._options.max_inputs_per_request
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
        job = Job(record)
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
            record.state, record.reason, record.finished = JobState.CANCELLED, "cancelled by a caller", now()
        await self._end(job)
        return job.status()

    # -- running -------------------------------------------------------------------------------

    def _launch(self, job: Job) -> None:
        # A fresh context: the job outlives the call that started it, and must not log its request id.
        job.task = asyncio.get_running_loop().create_task(
            self._run(job), name=f"wafer-job-{job.record.id}", context=contextvars.Context()
        )

    async def _stop(self, job: Job) -> None:
        task, job.task = job.task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        job.samples.clear()

    async def _run(self, job: Job) -> None:
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

    async def _fail(self, job: Job, message: str) -> None:
        record = job.record
        record.state, record.reason, record.error, record.finished = JobState.FAILED, "", message, now()
        job.samples.clear()
        log.warning("job failed", job=record.id, error=message)
        await self._save(job)

    async def _execute(self, job: Job) -> None:
        record = job.record
        await self._runner.run(job)
        record.state, record.reason, record.finished = JobState.SUCCEEDED, "", now()
        job.samples.clear()
        await self._end(job)
        log.info("job finished", job=record.id, done=record.done, skipped=record.skipped)

    # -- helpers -------------------------------------------------------------------------------

    def _job(self, job_id: str) -> Job:
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
        path = confine(source.path, self._options.allowed_roots)
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
        options = self._options
        return ReadLimits(
            roots=options.allowed_roots,
            query_seconds=options.sqlite_query_seconds,
            max_rows=options.sqlite_max_rows,
            max_line_bytes=options.max_line_bytes,
        )

    @staticmethod
    def _check_source(source: SourceSpec, limits: ReadLimits) -> None:
        """Open the source and read nothing: a wrong query or column fails the submit, not the job."""
        reader: SourceReader = open_reader(source, Cursor(), limits)
        reader.close()

    async def _save(self, job: Job, *, notify: bool = True) -> None:
        """Write the record; watchers hear of the change once it is on disk."""
        snapshot = to_json(job.record)
        await self._on_disk(lambda: self._store.save(snapshot))
        if notify:
            self._notify()

    async def _end(self, job: Job) -> None:
        """Save an ended job, then drop its inline copy: a crash in between leaves a file that the
        next start removes, never a resumable job without its documents."""
        await self._save(job, notify=False)
        await self._drop_inline(job)
        self._notify()

    async def _drop_inline(self, job: Job) -> None:
        """Remove an inline job's copy of its documents once it can no longer run (a failed job
        keeps it: ResumeJob retries it)."""
        if job.record.inline and job.record.state in (JobState.SUCCEEDED, JobState.CANCELLED):
            await self._on_disk(lambda: self._store.remove_inline(job.record.id))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _on_disk(self, fn: Callable[[], T]) -> T:
        return await self._disk.run(fn)
