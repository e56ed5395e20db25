"""Protobuf ⇄ domain translation for the Jobs service. Pure functions, like rpc.convert."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from wafer.errors import InvalidArgumentError
from wafer.jobs import InlineSource, JobRequest, JobState, JobStatus, JsonlSource, RunPolicy, SqliteSource
from wafer.jobs.manager import JobSource
from wafer.rpc.convert import documents_from_proto
from wafer_proto.v1 import jobs_pb2

_STATE_TO_PROTO = {
    JobState.QUEUED: jobs_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    JobState.WAITING: jobs_pb2.JOB_STATE_WAITING,
    JobState.PAUSED: jobs_pb2.JOB_STATE_PAUSED,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
}


def job_id(value: str) -> str:
    if not value:
        raise InvalidArgumentError("id must not be empty")
    return value


def _policy(message: jobs_pb2.RunPolicy) -> RunPolicy:
    seconds = message.idle_seconds
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgumentError(f"policy.idle_seconds must be a non-negative number, not {seconds!r}")
    return RunPolicy(
        when_idle=message.when_idle,
        idle_seconds=seconds or None,
        when_charging=message.when_charging,
    )


def _source(message: jobs_pb2.SubmitJobRequest) -> JobSource:
    kind = message.WhichOneof("source")
    if kind == "inline":
        return InlineSource(documents=documents_from_proto(message.inline.documents))
    if kind == "jsonl":
        jsonl = message.jsonl
        if not jsonl.path:
            raise InvalidArgumentError("jsonl.path must not be empty")
        return JsonlSource(path=Path(jsonl.path), id_field=jsonl.id_field, text_field=jsonl.text_field)
    if kind == "sqlite":
        sqlite = message.sqlite
        if not sqlite.path:
            raise InvalidArgumentError("sqlite.path must not be empty")
        return SqliteSource(
            path=Path(sqlite.path),
            query=sqlite.query,
            id_column=sqlite.id_column,
            text_column=sqlite.text_column,
        )
    raise InvalidArgumentError("set a source: inline, jsonl or sqlite")


def job_request(message: jobs_pb2.SubmitJobRequest) -> JobRequest:
    return JobRequest(
        collection=message.collection,
        source=_source(message),
        model=message.model,
        policy=_policy(message.policy),
        batch_size=message.batch_size,
        truncate=message.truncate,
        fresh_context=message.fresh_context,
    )


def _stamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def job(status: JobStatus) -> jobs_pb2.Job:
    policy = status.policy
    message = jobs_pb2.Job(
        id=status.id,
        state=_STATE_TO_PROTO[status.state],
        reason=status.reason,
        collection=status.collection,
        model=status.model,
        source=status.source,
        policy=jobs_pb2.RunPolicy(
            when_idle=policy.when_idle,
            idle_seconds=policy.idle_seconds or 0.0,
            when_charging=policy.when_charging,
        ),
        done=status.done,
        skipped=status.skipped,
        docs_per_second=status.docs_per_second,
        error=status.error,
        created=_stamp(status.created),
        batch_size=status.batch_size,
    )
    if status.total is not None:
        message.total = status.total
    if status.eta_seconds is not None:
        message.eta_seconds = status.eta_seconds
    if status.started is not None:
        message.started.CopyFrom(_stamp(status.started))
    if status.finished is not None:
        message.finished.CopyFrom(_stamp(status.finished))
    return message
