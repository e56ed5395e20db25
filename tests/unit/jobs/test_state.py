"""Job records on disk: exact round trips, atomic replacement, unreadable files set aside."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from wafer.files import write_atomically
from wafer.jobs.policy import RunPolicy
from wafer.jobs.sources import Cursor, JsonlSource, SqliteSource
from wafer.jobs.state import RECORD_SUFFIX, JobRecord, JobState, JobStore, from_json, to_json


def record(job_id: str, **changes: object) -> JobRecord:
    values: dict[str, object] = {
        "id": job_id,
        "collection": "sms",
        "model": "minilm",
        "source": SqliteSource(Path("/data/sms.db"), "SELECT id, body AS text FROM sms ORDER BY id", "id", "text"),
        "policy": RunPolicy(when_idle=True, idle_seconds=12.5, when_charging=True),
        "batch_size": 64,
        "state": JobState.RUNNING,
        "cursor": Cursor(position=640, rows=640),
        "done": 630,
        "skipped": 10,
        "total": 5574,
        "started": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    }
    values.update(changes)
    return JobRecord(**values)  # type: ignore[arg-type]


def test_round_trip_is_exact() -> None:
    for original in (record("a"), record("b", source=JsonlSource(Path("/x.jsonl"), "key", "body"), inline=True)):
        assert from_json(json.loads(json.dumps(to_json(original)))) == original


def test_fresh_context_round_trips_and_old_records_have_none() -> None:
    fresh = record("c", fresh_context=True, context_ready=True)
    assert from_json(json.loads(json.dumps(to_json(fresh)))) == fresh
    old = to_json(record("d"))
    del old["fresh_context"], old["context_ready"]  # a record written before contexts existed
    loaded = from_json(old)
    assert (loaded.fresh_context, loaded.context_ready) == (False, False)


def test_store_saves_replaces_and_loads(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs")
    store.save(to_json(record("a")))
    store.save(to_json(record("a", done=640, state=JobState.PAUSED)))
    store.save(to_json(record("b")))
    loaded = {r.id: r for r in store.load_all()}
    assert loaded["a"].done == 640 and loaded["a"].state is JobState.PAUSED
    assert set(loaded) == {"a", "b"}
    # Only the records: no temporary file is left behind.
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["a.job.json", "b.job.json"]


def test_unreadable_records_are_skipped(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.save(to_json(record("good")))
    (tmp_path / "bad.job.json").write_text("{ half a rec")
    (tmp_path / ".good.job.json.x.tmp").write_text("left by a crash")
    assert [r.id for r in store.load_all()] == ["good"]


def test_write_atomically_keeps_the_old_content_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "r.json"
    write_atomically(target, b"old")

    def disk_full(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    # The failure strikes after the new bytes were written to the temporary file, before the rename.
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_edited_or_copied_records_are_refused_and_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13 #11: batch_size 0 busy-looped; a copied file started a hidden second runner."""
    store = JobStore(tmp_path)
    good = JobRecord(
        id="abc123",
        collection="c",
        model="",
        source=JsonlSource(path=tmp_path / "c.jsonl"),
        policy=RunPolicy(),
        batch_size=8,
    )
    store.save(to_json(good))
    (tmp_path / f"copy{RECORD_SUFFIX}").write_text((tmp_path / f"abc123{RECORD_SUFFIX}").read_text())
    zero = to_json(good) | {"id": "def456", "batch_size": 0}
    store.save(zero)
    loaded = store.load_all()
    assert [r.id for r in loaded] == ["abc123"]
    logged = capsys.readouterr().out
    assert f"copy{RECORD_SUFFIX}" in logged and f"def456{RECORD_SUFFIX}" in logged
