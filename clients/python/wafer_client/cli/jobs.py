"""``wafer index`` and ``wafer jobs ...``: background indexing jobs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from wafer_client._sync import WaferClient
from wafer_client.cli._common import (
    app,
    client_for,
    echo_json,
    reporting_errors,
    short,
)
from wafer_client.types import Job, JsonlSource, SqliteSource

jobs_app = typer.Typer(
    help="List, watch, pause, resume and cancel indexing jobs.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(jobs_app, name="jobs")


class Policy(StrEnum):
    always = "always"
    idle = "idle"
    charging = "charging"
    idle_and_charging = "idle+charging"


def parse_source(text: str, *, id_field: str, text_field: str) -> JsonlSource | SqliteSource:
    """``FILE.jsonl`` or ``sqlite:PATH?query=SELECT...`` as a job source. Paths become absolute here: the
    server reads them, and it does not share this shell's working directory."""
    if text.startswith("sqlite:"):
        location, _, query_string = text.removeprefix("sqlite:").partition("?")
        params = parse_qs(query_string, keep_blank_values=True)
        unknown = sorted(set(params) - {"query"})
        if unknown:
            raise typer.BadParameter(f"unknown parameter(s) {unknown}; only query= is read", param_hint="SOURCE")
        query = params.get("query", [""])[-1]
        if not location or not query.strip():
            raise typer.BadParameter("write it as sqlite:PATH?query=SELECT id, text FROM ...", param_hint="SOURCE")
        return SqliteSource(
            path=str(Path(location).expanduser().absolute()), query=query, id_column=id_field, text_column=text_field
        )
    return JsonlSource(path=str(Path(text).expanduser().absolute()), id_field=id_field, text_field=text_field)


def _job_json(job: Job) -> dict[str, Any]:
    return {**asdict(job), "ended": job.ended}


def _job_progress(job: Job) -> str:
    total = f"/{job.total}" if job.total is not None else ""
    skipped = f" ({job.skipped} skipped)" if job.skipped else ""
    return f"{job.done + job.skipped}{total}{skipped}"


def _job_state(job: Job) -> str:
    if job.error:
        return f"{job.state}: {job.error}"
    return f"{job.state} ({job.reason})" if job.reason else str(job.state)


def _report_job(job: Job) -> None:
    typer.echo(f"job {job.id}: {_job_state(job)}, {_job_progress(job)} documents into {job.collection}")


def _follow(client: WaferClient, submitted: Job) -> Job:
    """Show a job's progress until it ends (or Ctrl-C stops watching: the job goes on)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[eta]}"),
        TextColumn("{task.fields[state]}"),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        job = submitted
        bar = progress.add_task(escape(job.collection), total=job.total, rate="", eta="", state="")
        for job in client.watch_job(submitted.id):
            eta = f"ETA {job.eta_seconds:.0f}s" if job.eta_seconds is not None else ""
            rate = f"{job.docs_per_second:.0f} docs/s" if job.docs_per_second else ""
            progress.update(
                bar,
                completed=job.done + job.skipped,
                total=job.total,
                rate=rate,
                eta=eta,
                state=escape(_job_state(job)),
            )
    return job


@app.command()
def index(
    ctx: typer.Context,
    *,
    source: Annotated[
        str,
        typer.Argument(
            help='A JSON Lines file (one {"id", "text", ...} object a line), or '
            "sqlite:PATH?query=SELECT id, text, ... (URL-encode & and #). Paths are on the server's "
            "machine, under its data folder or WAFER_JOBS_ALLOWED_ROOTS."
        ),
    ],
    collection: Annotated[str, typer.Option(help="The collection to write to.")],
    model: Annotated[str, typer.Option(help="Embedding model [default: the collection's, else the server's].")] = "",
    policy: Annotated[Policy, typer.Option(help="When the job may run.")] = Policy.always,
    idle_seconds: Annotated[
        float, typer.Option(min=0, help="Quiet seconds that count as idle [default: the server's, 30].")
    ] = 0,
    batch_size: Annotated[int, typer.Option(min=0, help="Documents per batch [default: the server's, 64].")] = 0,
    id_field: Annotated[str, typer.Option(help="Field (column) holding the id [default: id].")] = "",
    text_field: Annotated[str, typer.Option(help="Field (column) holding the text [default: text].")] = "",
    truncate: Annotated[
        bool, typer.Option(help="Cut texts longer than the model's window rather than fail the job.")
    ] = True,
    fresh_context: Annotated[
        bool,
        typer.Option(
            "--fresh-context",
            help="Contextual models (cde): empty the collection and re-index it with a context sampled "
            "afresh from SOURCE.",
        ),
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the job ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Index a JSONL file or a SQLite query into a collection, as a background job on the server."""
    spec = parse_source(source, id_field=id_field, text_field=text_field)
    with reporting_errors(), client_for(ctx) as client:
        job = client.submit_job(
            collection,
            spec,
            model=model,
            when_idle=policy in (Policy.idle, Policy.idle_and_charging),
            idle_seconds=idle_seconds,
            when_charging=policy in (Policy.charging, Policy.idle_and_charging),
            batch_size=batch_size,
            truncate=truncate,
            fresh_context=fresh_context,
        )
        if wait:
            job = _follow(client, job) if not as_json else client.wait_job(job.id)
    if as_json:
        echo_json(_job_json(job))
    else:
        _report_job(job)
    if wait and job.state != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context, *, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """Every job the server knows, newest first."""
    with reporting_errors(), client_for(ctx) as client:
        found = client.list_jobs()
    if as_json:
        echo_json([_job_json(j) for j in found])
        return
    table = Table(show_edge=False)
    for name in ("id", "state", "collection", "done", "source", "created"):
        table.add_column(name, justify="right" if name == "done" else "left")
    for job in found:
        created = job.created.strftime("%Y-%m-%d %H:%M") if job.created else ""
        table.add_row(
            escape(job.id),
            escape(short(_job_state(job), 40)),
            escape(job.collection),
            _job_progress(job),
            escape(short(job.source, 40)),
            created,
        )
    Console().print(table)


@jobs_app.command("get")
def jobs_get(
    ctx: typer.Context,
    *,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = True,
) -> None:
    """One job, as JSON (--no-json for a line)."""
    with reporting_errors(), client_for(ctx) as client:
        job = client.get_job(job_id)
    if as_json:
        echo_json(_job_json(job))
    else:
        _report_job(job)


@jobs_app.command("watch")
def jobs_watch(ctx: typer.Context, *, job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")]) -> None:
    """Show a job's progress until it ends; exits 0 only if it succeeded."""
    with reporting_errors(), client_for(ctx) as client:
        job = _follow(client, client.get_job(job_id))
    _report_job(job)
    if job.state != "succeeded":
        raise typer.Exit(1)


def _control(ctx: typer.Context, job_id: str, action: Callable[[WaferClient, str], Job]) -> None:
    with reporting_errors(), client_for(ctx) as client:
        job = action(client, job_id)
    _report_job(job)


@jobs_app.command("pause")
def jobs_pause(ctx: typer.Context, *, job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")]) -> None:
    """Pause a job after its last written batch."""
    _control(ctx, job_id, lambda client, i: client.pause_job(i))


@jobs_app.command("resume")
def jobs_resume(ctx: typer.Context, *, job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")]) -> None:
    """Resume a paused job (or retry a failed one) from its checkpoint."""
    _control(ctx, job_id, lambda client, i: client.resume_job(i))


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, *, job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")]) -> None:
    """Cancel a job for good; what it wrote stays in the collection."""
    _control(ctx, job_id, lambda client, i: client.cancel_job(i))
