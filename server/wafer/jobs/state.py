"""A job's record and where it is kept: one JSON file per job in `<data_dir>/jobs/`.

Every write goes to a temporary file that is synced and then renamed over the old one, so a crash
(even `kill -9`, even a power cut) leaves either the previous record or the new one, never half of
one. The record's cursor is the checkpoint: the source position after the last batch the store
has written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from wafer.files import write_atomically
from wafer.jobs.policy import RunPolicy
from wafer.jobs.sources import Cursor, JsonlSource, SourceSpec, SqliteSource

log = structlog.get_logger("wafer.jobs")

RECORD_SUFFIX = ".job.json"
INLINE_SUFFIX = ".inline.jsonl"
FORMAT_VERSION = 1
# The largest batch a submit accepts (max_inputs_per_request's bound).
MAX_BATCH_SIZE = 100_000


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# A job the server was running (or about to) when it stopped resumes when it starts again.
RESUMABLE = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.WAITING})


@dataclass(slots=True)
class JobRecord:
    id: str
    collection: str
    model: str
    source: SourceSpec
    policy: RunPolicy
    batch_size: int
    truncate: bool = False
    # Contextual models (cde): drop the collection and build its context afresh from this source,
    # once (`context_ready` records that it was done, so a resumed job does not do it again).
    fresh_context: bool = False
    context_ready: bool = False
    # The source is a file this job wrote from inline documents, deleted when the job ends.
    inline: bool = False
    state: JobState = JobState.QUEUED
    reason: str = ""
    cursor: Cursor = field(default_factory=Cursor)
    done: int = 0
    skipped: int = 0
    total: int | None = None
    error: str = ""
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: datetime | None = None
    finished: datetime | None = None

    def describe_source(self) -> str:
        if self.inline:
            return f"inline ({self.total if self.total is not None else '?'} documents)"
        return self.source.describe()


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_time(value: object) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def to_json(record: JobRecord) -> dict[str, Any]:
    source: dict[str, Any]
    if isinstance(record.source, JsonlSource):
        source = {
            "kind": "jsonl",
            "path": str(record.source.path),
            "id_field": record.source.id_field,
            "text_field": record.source.text_field,
        }
    else:
        source = {
            "kind": "sqlite",
            "path": str(record.source.path),
            "query": record.source.query,
            "id_column": record.source.id_column,
            "text_column": record.source.text_column,
        }
    return {
        "version": FORMAT_VERSION,
        "id": record.id,
        "collection": record.collection,
        "model": record.model,
        "source": source,
        "inline": record.inline,
        "policy": {
            "when_idle": record.policy.when_idle,
            "idle_seconds": record.policy.idle_seconds,
            "when_charging": record.policy.when_charging,
        },
        "batch_size": record.batch_size,
        "truncate": record.truncate,
        "fresh_context": record.fresh_context,
        "context_ready": record.context_ready,
        "state": record.state.value,
        "reason": record.reason,
        "cursor": {"position": record.cursor.position, "rows": record.cursor.rows},
        "done": record.done,
        "skipped": record.skipped,
        "total": record.total,
        "error": record.error,
        "created": _time(record.created),
        "started": _time(record.started),
        "finished": _time(record.finished),
    }


def from_json(data: dict[str, Any]) -> JobRecord:
    raw = data["source"]
    source: SourceSpec
    if raw["kind"] == "jsonl":
        source = JsonlSource(path=Path(raw["path"]), id_field=raw["id_field"], text_field=raw["text_field"])
    else:
        source = SqliteSource(
            path=Path(raw["path"]), query=raw["query"], id_column=raw["id_column"], text_column=raw["text_column"]
        )
    policy = data["policy"]
    return JobRecord(
        id=data["id"],
        collection=data["collection"],
        model=data["model"],
        source=source,
        inline=bool(data["inline"]),
        policy=RunPolicy(
            when_idle=bool(policy["when_idle"]),
            idle_seconds=policy["idle_seconds"],
            when_charging=bool(policy["when_charging"]),
        ),
        batch_size=int(data["batch_size"]),
        truncate=bool(data["truncate"]),
        # Records written before contexts existed have neither.
        fresh_context=bool(data.get("fresh_context", False)),
        context_ready=bool(data.get("context_ready", False)),
        state=JobState(data["state"]),
        reason=data["reason"],
        cursor=Cursor(position=int(data["cursor"]["position"]), rows=int(data["cursor"]["rows"])),
        done=int(data["done"]),
        skipped=int(data["skipped"]),
        total=data["total"],
        error=data["error"],
        created=_parse_time(data["created"]) or datetime.now(UTC),
        started=_parse_time(data["started"]),
        finished=_parse_time(data["finished"]),
    )


def _check_record(record: JobRecord) -> None:
    """Refuse values no submit could have written (an edited file): a batch size of 0 would spin."""
    if not 0 < record.batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size {record.batch_size} is not between 1 and {MAX_BATCH_SIZE}")
    if min(record.cursor.position, record.cursor.rows, record.done, record.skipped) < 0:
        raise ValueError("negative cursor or counts")
    if not record.id or not all(ch.isalnum() for ch in record.id):
        raise ValueError(f"job id {record.id[:32]!r} is not a job id")


class JobStore:
    """The job records on disk. Calls do blocking I/O; the manager runs them on one thread, in order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _record_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}{RECORD_SUFFIX}"

    def inline_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}{INLINE_SUFFIX}"

    def save(self, snapshot: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = json.dumps(snapshot, ensure_ascii=False, indent=1).encode("utf-8")
        write_atomically(self._record_path(snapshot["id"]), data)

    def write_inline(self, job_id: str, lines: list[dict[str, Any]]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.inline_path(job_id)
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
        write_atomically(path, data)
        return path

    def remove_inline(self, job_id: str) -> None:
        self.inline_path(job_id).unlink(missing_ok=True)

    def load_all(self) -> list[JobRecord]:
        if not self.folder.is_dir():
            return []
        records = []
        for path in sorted(self.folder.glob(f"*{RECORD_SUFFIX}")):
            try:
                record = from_json(json.loads(path.read_text(encoding="utf-8")))
                _check_record(record)
                if path.name != f"{record.id}{RECORD_SUFFIX}":
                    # A copied file would start a second runner for the same id, which no call reaches.
                    raise ValueError(f"it holds job {record.id!r}, whose record is {record.id}{RECORD_SUFFIX}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Written atomically, so this is a file someone edited: keep it for them to look at.
                log.error("unreadable job record; ignored", path=str(path), error=str(exc))
                continue
            records.append(record)
        return records
