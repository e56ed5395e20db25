"""The Jobs wire contract: what the client SDK sends is what the server reads, and back; and the
CLI's source syntax."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer

from wafer.domain import StoredDocument
from wafer.errors import InvalidArgumentError
from wafer.jobs import InlineSource, JobRequest, JobState, JobStatus, JsonlSource, RunPolicy, SqliteSource
from wafer.rpc import convert_jobs
from wafer_client import Document
from wafer_client import JsonlSource as ClientJsonl
from wafer_client import SqliteSource as ClientSqlite
from wafer_client._convert import job as client_job
from wafer_client._convert import submit_job_request
from wafer_client.cli import parse_source
from wafer_proto.v1 import jobs_pb2


def sent(source: object, **options: object) -> JobRequest:
    defaults: dict[str, object] = {
        "model": "",
        "when_idle": False,
        "idle_seconds": 0.0,
        "when_charging": False,
        "batch_size": 0,
        "truncate": False,
    }
    message = submit_job_request("sms", source, **{**defaults, **options})  # type: ignore[arg-type]
    return convert_jobs.job_request(jobs_pb2.SubmitJobRequest.FromString(message.SerializeToString()))


def test_sources_cross_the_wire() -> None:
    request = sent(ClientSqlite("/d/sms.db", "SELECT 1", text_column="body"), model="minilm", batch_size=8)
    assert request.source == SqliteSource(Path("/d/sms.db"), "SELECT 1", "", "body")
    assert (request.collection, request.model, request.batch_size) == ("sms", "minilm", 8)
    assert sent(ClientJsonl("/d/c.jsonl", id_field="key")).source == JsonlSource(Path("/d/c.jsonl"), "key", "")
    inline = sent(["plain", Document(text="with id", id="x", payload={"k": "v"})]).source
    assert inline == InlineSource([StoredDocument("", "plain"), StoredDocument("x", "with id", {"k": "v"})])


def test_policies_cross_the_wire() -> None:
    assert sent(["t"]).policy == RunPolicy()
    both = sent(["t"], when_idle=True, idle_seconds=12.5, when_charging=True).policy
    assert both == RunPolicy(when_idle=True, idle_seconds=12.5, when_charging=True)


def test_a_request_without_source_or_with_bad_values_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="set a source"):
        convert_jobs.job_request(jobs_pb2.SubmitJobRequest(collection="c"))
    with pytest.raises(InvalidArgumentError, match=r"jsonl\.path"):
        convert_jobs.job_request(jobs_pb2.SubmitJobRequest(collection="c", jsonl=jobs_pb2.JsonlSource()))
    bad_idle = jobs_pb2.SubmitJobRequest(
        collection="c", jsonl=jobs_pb2.JsonlSource(path="/x"), policy=jobs_pb2.RunPolicy(idle_seconds=-1)
    )
    with pytest.raises(InvalidArgumentError, match="idle_seconds"):
        convert_jobs.job_request(bad_idle)
    with pytest.raises(TypeError):
        submit_job_request(
            "c",
            "not a list",
            model="",
            when_idle=False,
            idle_seconds=0,
            when_charging=False,
            batch_size=0,
            truncate=False,
        )


def test_a_job_status_reaches_the_client_whole() -> None:
    created = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    status = JobStatus(
        id="abc",
        state=JobState.WAITING,
        reason="waiting for a charger (battery BAT0 discharging)",
        collection="sms",
        model="minilm",
        source="sqlite:/d/sms.db",
        policy=RunPolicy(when_charging=True),
        batch_size=64,
        done=640,
        skipped=2,
        total=5574,
        docs_per_second=0.0,
        eta_seconds=None,
        error="",
        created=created,
        started=created,
        finished=None,
    )
    job = client_job(jobs_pb2.Job.FromString(convert_jobs.job(status).SerializeToString()))
    assert (job.id, job.state, job.reason, job.done, job.total, job.skipped) == (
        "abc",
        "waiting",
        status.reason,
        640,
        5574,
        2,
    )
    assert job.when_charging and not job.when_idle and job.eta_seconds is None and job.finished is None
    assert job.created == created and not job.ended
    unknown_total = client_job(convert_jobs.job(dataclasses.replace(status, total=None)))
    assert unknown_total.total is None


def test_cli_source_syntax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_source("c.jsonl", id_field="", text_field="body") == ClientJsonl(str(tmp_path / "c.jsonl"), "", "body")
    parsed = parse_source(
        "sqlite:sms.db?query=SELECT%20_id%20AS%20id,%20body%20AS%20text%20FROM%20sms", id_field="", text_field=""
    )
    assert parsed == ClientSqlite(str(tmp_path / "sms.db"), "SELECT _id AS id, body AS text FROM sms")
    for bad in ("sqlite:sms.db", "sqlite:?query=SELECT 1", "sqlite:sms.db?query=SELECT 1&table=x"):
        with pytest.raises(typer.BadParameter):
            parse_source(bad, id_field="", text_field="")
