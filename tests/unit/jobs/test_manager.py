"""The job manager over the real engine (fake backend), the real index and an embedded Qdrant."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from tests.fakes.fake_backend import FakeBackend
from tests.unit.jobs.power_supply import laptop
from wafer.app import job_options
from wafer.config import Settings
from wafer.domain import EmbedRequest, Priority, StoredDocument
from wafer.engine import InferenceEngine
from wafer.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from wafer.indexing import IndexService, UpsertResult
from wafer.jobs import (
    InlineSource,
    JobManager,
    JobRequest,
    JobState,
    JobStatus,
    JsonlSource,
    PolicyChecker,
    PowerProbe,
    RunPolicy,
    SqliteSource,
)
from wafer.jobs.manager import MAX_WATCHERS, WATCH_MIN_INTERVAL_SECONDS
from wafer.jobs.runner import Job
from wafer.jobs.state import JobRecord, JobStore
from wafer.metrics import Metrics
from wafer.store.qdrant import QdrantStore

WAIT_SECONDS = 20


@dataclass
class Stack:
    settings: Settings
    engine: InferenceEngine
    index: IndexService
    metrics: Metrics
    power_root: Path

    def manager(self, *, metrics: bool = False) -> JobManager:
        checker = PolicyChecker(
            idle_for=self.engine.seconds_since_interactive,
            power=PowerProbe(self.settings.power_supply_root),
            default_idle_seconds=self.settings.jobs_default_idle_seconds,
        )
        manager = JobManager(
            job_options(self.settings),
            self.index,
            checker,
            known_model=self.engine.registry.status,
            metrics=self.metrics,
        )
        if metrics:
            self.metrics.watch_jobs(manager)
        return manager

    async def ids(self, collection: str, wanted: list[str]) -> list[str]:
        return sorted(d.id for d in await self.index.get_documents(collection, wanted))


@pytest.fixture
async def stack(engine: InferenceEngine, settings: Settings, tmp_path: Path) -> AsyncIterator[Stack]:
    settings = settings.model_copy(
        update={
            "power_supply_root": tmp_path / "power",
            "jobs_policy_poll_seconds": 0.02,
            "jobs_batch_size": 10,
            "jobs_allowed_roots": [tmp_path / "corpora"],
        }
    )
    (tmp_path / "corpora").mkdir()
    index = IndexService(engine, QdrantStore(path=settings.store_dir))
    yield Stack(settings, engine, index, Metrics(), tmp_path / "power")
    FakeBackend.gate.set()
    await index.close()


@pytest.fixture
async def manager(stack: Stack) -> AsyncIterator[JobManager]:
    manager = stack.manager(metrics=True)
    await manager.start()
    yield manager
    FakeBackend.gate.set()
    await manager.close()


def corpus(folder: Path, n: int, name: str = "sms.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps({"id": f"m{i}", "text": f"message {i}", "n": i}) + "\n" for i in range(n)))
    return path


async def until(manager: JobManager, job_id: str, done: Callable[[JobStatus], bool]) -> JobStatus:
    async with asyncio.timeout(WAIT_SECONDS):
        async for status in manager.watch(job_id):
            if done(status):
                return status
    raise AssertionError(f"job {job_id} ended without reaching the condition")


async def finished(manager: JobManager, job_id: str) -> JobStatus:
    return await until(manager, job_id, lambda s: s.state.finished)


async def test_inline_job_writes_every_document(stack: Stack, manager: JobManager) -> None:
    documents = [StoredDocument(id=f"d{i}", text=f"text number {i}", payload={"i": i}) for i in range(25)]
    submitted = await manager.submit(JobRequest(collection="inline", source=InlineSource(documents)))
    assert submitted.state is JobState.QUEUED and submitted.total == 25
    final = await finished(manager, submitted.id)
    assert final.state is JobState.SUCCEEDED, final.error
    assert (final.done, final.total, final.skipped, final.model) == (25, 25, 0, "embedder")
    assert final.source == "inline (25 documents)" and final.finished is not None
    assert await stack.ids("inline", [d.id for d in documents]) == sorted(d.id for d in documents)
    stored = await stack.index.get_documents("inline", ["d7"])
    assert stored[0].payload == {"i": 7}
    # The inline copy is gone with the job; the record stays.
    assert not JobStore(stack.settings.jobs_dir).inline_path(submitted.id).exists()
    assert stack.metrics.registry.get_sample_value("wafer_jobs", {"state": "succeeded"}) == 1
    assert stack.metrics.registry.get_sample_value("wafer_job_documents_total", {"model": "embedder"}) == 25


async def test_a_stopped_manager_resumes_from_its_checkpoint_without_duplicates(stack: Stack, tmp_path: Path) -> None:
    path = corpus(tmp_path / "corpora", 120)
    first = stack.manager()
    await first.start()
    # Hold the backend once 30 are embedded, so the job is surely mid-way when the server "dies"
    # (watches are rate-limited: by the time one saw 30 done, an unheld job could be finished).
    FakeBackend.hold_after = len(FakeBackend.embedded) + 30
    try:
        job = await first.submit(JobRequest(collection="resume", source=JsonlSource(path), batch_size=10))
        await until(first, job.id, lambda s: s.done >= 30 or s.state.finished)
    finally:
        FakeBackend.hold_after = None
    await first.close()
    on_disk = {r.id: r for r in JobStore(stack.settings.jobs_dir).load_all()}[job.id]
    assert on_disk.state is JobState.RUNNING and 30 <= on_disk.done < 120
    assert on_disk.cursor.rows == on_disk.done
    FakeBackend.gate.set()

    second = stack.manager()
    await second.start()
    try:
        final = await finished(second, job.id)
    finally:
        await second.close()
    assert final.state is JobState.SUCCEEDED and final.done == 120
    expected = [f"m{i}" for i in range(120)]
    assert await stack.ids("resume", expected) == sorted(expected)
    info = {c.name: c for c in await stack.index.list_collections()}["resume"]
    assert info.documents == 120


async def test_pause_resume_and_cancel(stack: Stack, manager: JobManager, tmp_path: Path) -> None:
    path = corpus(tmp_path / "corpora", 40)
    FakeBackend.gate.clear()
    job = await manager.submit(JobRequest(collection="paused", source=JsonlSource(path)))
    await until(manager, job.id, lambda s: s.state is JobState.RUNNING)
    paused = await manager.pause(job.id)
    assert paused.state is JobState.PAUSED and paused.reason == "paused by a caller"
    assert (await manager.pause(job.id)).state is JobState.PAUSED  # idempotent
    FakeBackend.gate.set()
    await asyncio.sleep(0.1)
    assert manager.get(job.id).state is JobState.PAUSED and manager.get(job.id).done == 0
    resumed = await manager.resume(job.id)
    assert resumed.state is JobState.QUEUED
    assert (await finished(manager, job.id)).done == 40

    FakeBackend.gate.clear()
    doomed = await manager.submit(JobRequest(collection="cancelled", source=JsonlSource(path)))
    await until(manager, doomed.id, lambda s: s.state is JobState.RUNNING)
    cancelled = await manager.cancel(doomed.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.finished is not None
    FakeBackend.gate.set()
    for refused in (manager.pause, manager.resume):
        with pytest.raises(FailedPreconditionError):
            await refused(doomed.id)
    assert (await manager.cancel(doomed.id)).state is JobState.CANCELLED
    with pytest.raises(FailedPreconditionError):
        await manager.cancel(job.id)  # it succeeded


async def test_one_job_runs_at_a_time_the_others_queue(stack: Stack, manager: JobManager, tmp_path: Path) -> None:
    path = corpus(tmp_path / "corpora", 20)
    FakeBackend.gate.clear()
    first = await manager.submit(JobRequest(collection="q1", source=JsonlSource(path)))
    second = await manager.submit(JobRequest(collection="q2", source=JsonlSource(path)))
    await until(manager, first.id, lambda s: s.state is JobState.RUNNING)
    await asyncio.sleep(0.1)
    assert manager.get(second.id).state is JobState.QUEUED
    assert [s.id for s in manager.all()] == [second.id, first.id]
    FakeBackend.gate.set()
    assert (await finished(manager, first.id)).state is JobState.SUCCEEDED
    assert (await finished(manager, second.id)).state is JobState.SUCCEEDED


async def test_when_charging_waits_for_the_charger(stack: Stack, manager: JobManager, tmp_path: Path) -> None:
    laptop(stack.power_root, charging=False)
    path = corpus(tmp_path / "corpora", 15)
    job = await manager.submit(
        JobRequest(collection="charging", source=JsonlSource(path), policy=RunPolicy(when_charging=True))
    )
    waiting = await until(manager, job.id, lambda s: s.state is JobState.WAITING)
    assert waiting.reason == "waiting for a charger (battery BAT0 discharging)"
    await asyncio.sleep(0.2)
    assert manager.get(job.id).state is JobState.WAITING and manager.get(job.id).done == 0
    laptop(stack.power_root, charging=True)
    final = await finished(manager, job.id)
    assert final.state is JobState.SUCCEEDED and final.done == 15


async def test_when_idle_waits_for_quiet_and_its_own_batches_do_not_count(
    stack: Stack, manager: JobManager, tmp_path: Path
) -> None:
    await stack.engine.embed(EmbedRequest(inputs=["someone searches"]))
    path = corpus(tmp_path / "corpora", 30)
    job = await manager.submit(
        JobRequest(collection="idle", source=JsonlSource(path), policy=RunPolicy(when_idle=True, idle_seconds=0.3))
    )
    waiting = await until(manager, job.id, lambda s: s.state is JobState.WAITING)
    assert waiting.reason == "waiting for 0.3s without interactive requests"
    final = await finished(manager, job.id)
    # Three batches in the batch lane, yet no wait between them: they are not interactive traffic.
    assert final.state is JobState.SUCCEEDED and final.done == 30


async def test_idle_clock_counts_interactive_calls_only(stack: Stack) -> None:
    engine = stack.engine
    await engine.embed(EmbedRequest(inputs=["a query"]))
    assert engine.seconds_since_interactive() < 0.5
    await asyncio.sleep(0.3)
    await engine.embed(EmbedRequest(inputs=["a job's text"], priority=Priority.BATCH))
    assert engine.seconds_since_interactive() >= 0.3
    FakeBackend.gate.clear()
    call = asyncio.create_task(engine.embed(EmbedRequest(inputs=["held"])))
    await asyncio.sleep(0.05)
    assert engine.seconds_since_interactive() == 0.0  # while one runs
    FakeBackend.gate.set()
    await call
    assert engine.seconds_since_interactive() < 0.2


async def test_a_bad_line_fails_the_job_after_the_good_batches(
    stack: Stack, manager: JobManager, tmp_path: Path
) -> None:
    path = corpus(tmp_path / "corpora", 20)
    with path.open("a") as file:
        file.write("{not json}\n")
    job = await manager.submit(JobRequest(collection="broken", source=JsonlSource(path)))
    final = await finished(manager, job.id)
    assert final.state is JobState.FAILED and "line 21 is not valid JSON" in final.error
    assert final.done == 20
    # Retrying fails the same way: the checkpoint is before the bad line.
    await manager.resume(job.id)
    assert "line 21" in (await finished(manager, job.id)).error


async def test_submit_refuses_bad_requests(stack: Stack, manager: JobManager, tmp_path: Path) -> None:
    path = corpus(tmp_path / "corpora", 3)
    outside = corpus(tmp_path, 3, "outside.jsonl")
    cases: list[tuple[JobRequest, type[Exception], str]] = [
        (JobRequest(collection="bad name!", source=JsonlSource(path)), InvalidArgumentError, "collection name"),
        (JobRequest(collection="c", source=JsonlSource(path), model="nope"), NotFoundError, "nope"),
        (JobRequest(collection="c", source=JsonlSource(path), batch_size=101), InvalidArgumentError, "batch_size"),
        (JobRequest(collection="c", source=JsonlSource(outside)), PermissionDeniedError, "may not read"),
        (JobRequest(collection="c", source=JsonlSource(path.with_name("x.jsonl"))), NotFoundError, "no file"),
        (JobRequest(collection="c", source=InlineSource([])), InvalidArgumentError, "at least one"),
    ]
    for request, error, message in cases:
        with pytest.raises(error, match=message):
            await manager.submit(request)
    with pytest.raises(NotFoundError):
        manager.get("nope")
    assert manager.all() == []


async def test_jobs_under_the_data_folder_are_allowed(stack: Stack, manager: JobManager) -> None:
    stack.settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = corpus(stack.settings.data_dir, 5)
    job = await manager.submit(JobRequest(collection="data", source=JsonlSource(path)))
    assert (await finished(manager, job.id)).done == 5


async def test_stopping_watches_ends_them_with_unavailable(stack: Stack, manager: JobManager, tmp_path: Path) -> None:
    laptop(stack.power_root, charging=False)
    path = corpus(tmp_path / "corpora", 5)
    job = await manager.submit(
        JobRequest(collection="watched", source=JsonlSource(path), policy=RunPolicy(when_charging=True))
    )
    seen: list[JobStatus] = []

    async def watch() -> None:
        async for status in manager.watch(job.id):
            seen.append(status)

    watcher = asyncio.create_task(watch())
    await until(manager, job.id, lambda s: s.state is JobState.WAITING)
    manager.stop_watches()
    with pytest.raises(UnavailableError, match="shutting down"):
        await asyncio.wait_for(watcher, 5)
    assert seen and not seen[-1].state.finished


async def test_a_failed_inline_job_keeps_its_documents_to_retry(stack: Stack) -> None:
    documents = [StoredDocument(id="ok", text="short text"), StoredDocument(id="two", text="more text")]
    first = stack.manager()
    await first.start()
    # "writer" exists but cannot embed: the job fails at its first write.
    job = await first.submit(JobRequest(collection="failing", source=InlineSource(documents), model="writer"))
    final = await finished(first, job.id)
    assert final.state is JobState.FAILED
    assert "cannot embed" in final.error, final.error
    await first.close()
    copy = JobStore(stack.settings.jobs_dir).inline_path(job.id)
    second = stack.manager()
    await second.start()  # a restart does not drop it either
    try:
        assert copy.exists()
        await second.resume(job.id)
        assert (await finished(second, job.id)).state is JobState.FAILED
        assert copy.exists()
    finally:
        await second.close()


# -- issue 13: work nobody waits for stops -----------------------------------------------------------

ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x AS id, 'a' AS text FROM c"


def job_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("wafer-job-") and t.is_alive()]


async def no_job_threads_within(seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.05) + 1):
        if not job_threads() or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return not job_threads()


async def test_cancel_stops_a_sqlite_count_that_never_ends(stack: Stack, manager: JobManager) -> None:
    db = stack.settings.jobs_allowed_roots[0] / "one.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()
    submitted = await manager.submit(JobRequest(collection="endless", source=SqliteSource(db, ENDLESS)))
    await asyncio.sleep(0.5)
    assert job_threads(), "the job is counting its endless query"
    cancelled = await manager.cancel(submitted.id)
    assert cancelled.state is JobState.CANCELLED
    assert await no_job_threads_within(3), "the count kept running after the cancel"


async def test_closing_the_manager_stops_a_sqlite_count_that_never_ends(stack: Stack) -> None:
    db = stack.settings.jobs_allowed_roots[0] / "one.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()
    manager = stack.manager()
    await manager.start()
    await manager.submit(JobRequest(collection="endless", source=SqliteSource(db, ENDLESS)))
    await asyncio.sleep(0.5)
    await manager.close()
    assert await no_job_threads_within(3), "shutdown left the count running (the process could not exit)"


async def test_submit_refuses_a_query_that_returns_no_row_in_time(stack: Stack) -> None:
    db = stack.settings.jobs_allowed_roots[0] / "one.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()
    stack.settings = stack.settings.model_copy(update={"jobs_sqlite_query_seconds": 0.5})
    manager = stack.manager()
    await manager.start()
    try:
        with pytest.raises(InvalidArgumentError, match="jobs_sqlite_query_seconds"):
            await manager.submit(JobRequest(collection="endless", source=SqliteSource(db, ENDLESS + " WHERE x < 0")))
    finally:
        await manager.close()


async def test_watches_are_rate_limited_and_bounded(stack: Stack, manager: JobManager) -> None:
    """Issue 13 #3: every change reached every watcher at once; 2,000 of them kept the cores busy."""
    documents = [StoredDocument(id=f"d{i}", text=f"text number {i}") for i in range(200)]
    submitted = await manager.submit(JobRequest(collection="many", source=InlineSource(documents), batch_size=1))
    started = time.monotonic()
    messages = 0
    async with asyncio.timeout(WAIT_SECONDS):
        async for status in manager.watch(submitted.id):
            messages += 1
            if status.state.finished:
                break
    elapsed = time.monotonic() - started
    assert messages <= elapsed / WATCH_MIN_INTERVAL_SECONDS + 2, (messages, elapsed)

    other = await manager.submit(
        JobRequest(collection="more", source=InlineSource(documents[:1]), policy=RunPolicy(when_charging=True))
    )
    watches = [cast(AsyncGenerator[JobStatus, None], manager.watch(other.id)) for _ in range(MAX_WATCHERS)]
    for watch in watches:
        await anext(watch)
    with pytest.raises(ResourceExhaustedError):
        await anext(manager.watch(other.id))
    await watches[0].aclose()
    await anext(manager.watch(other.id))
    for watch in watches[1:]:
        await watch.aclose()


class ClearedAfterLen(deque[tuple[float, int]]):
    """Samples the event loop clears right after a metrics scrape's thread has read their length."""

    def __len__(self) -> int:
        length = super().__len__()
        self.clear()
        return length


def test_the_rate_survives_samples_cleared_while_a_scrape_reads_them() -> None:
    # Issue 15: `rate()` checked the length, then read both ends; a clear in between (a pause, a
    # retry) raised IndexError in the Prometheus scrape.
    record = JobRecord(
        id="j", collection="c", model="", source=JsonlSource(path=Path("/x.jsonl")), policy=RunPolicy(), batch_size=1
    )
    record.state = JobState.RUNNING
    job = Job(record, samples=ClearedAfterLen([(1.0, 10), (2.0, 30)]))
    assert job.rate() in (0.0, 20.0)
    assert job.status().docs_per_second in (0.0, 20.0)
    steady = Job(record, samples=deque([(1.0, 10), (2.0, 30)]))
    assert steady.rate() == 20.0


class SlowFirstWrite(IndexService):
    """The real index, whose first upsert takes longer than the next (a batch of long documents,
    a model busy elsewhere): the runner's next batch, in flight at the same time, finishes first."""

    def __init__(self, engine: InferenceEngine, store: QdrantStore) -> None:
        super().__init__(engine, store)
        self.events: list[str] = []

    async def upsert(self, collection: str, documents: Sequence[StoredDocument], **kwargs: Any) -> UpsertResult:
        call = len([e for e in self.events if e.startswith("start")])
        self.events.append(f"start {call}")
        if call == 0:
            await asyncio.sleep(1.0)
        try:
            return await super().upsert(collection, documents, **kwargs)
        finally:
            self.events.append(f"end {call}")


async def run_with_slow_first_write(stack: Stack, lines: list[dict[str, str]]) -> SlowFirstWrite:
    path = stack.settings.jobs_allowed_roots[0] / "twice.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    index = SlowFirstWrite(stack.engine, QdrantStore(path=stack.settings.data_dir / "slow-store"))
    stack.index = index
    manager = stack.manager()
    await manager.start()
    try:
        submitted = await manager.submit(JobRequest(collection="twice", source=JsonlSource(path), batch_size=2))
        final = await finished(manager, submitted.id)
        assert final.state is JobState.SUCCEEDED, final.error
    finally:
        await manager.close()
    return index


async def test_an_id_written_by_two_batches_in_flight_keeps_the_newest_text(stack: Stack) -> None:
    """Issue 13 #10: the second batch, written while the first was slow, was overwritten by it."""
    lines = [
        {"id": "a", "text": "old text of a"},
        {"id": "b", "text": "text of b"},
        {"id": "a", "text": "new text of a"},
        {"id": "c", "text": "text of c"},
    ]
    index = await run_with_slow_first_write(stack, lines)
    try:
        stored = {d.id: d.text for d in await index.get_documents("twice", ["a", "b", "c"])}
        assert stored == {"a": "new text of a", "b": "text of b", "c": "text of c"}
        # The later batch waited for the earlier one's write.
        assert index.events == ["start 0", "end 0", "start 1", "end 1"]
    finally:
        await index.close()


async def test_batches_without_a_shared_id_are_still_written_in_parallel(stack: Stack) -> None:
    lines = [{"id": f"d{i}", "text": f"text {i}"} for i in range(4)]
    index = await run_with_slow_first_write(stack, lines)
    try:
        assert len(await index.get_documents("twice", [f"d{i}" for i in range(4)])) == 4
        # The second batch was written while the first was still in flight.
        assert index.events.index("start 1") < index.events.index("end 0"), index.events
    finally:
        await index.close()
