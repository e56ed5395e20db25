"""``wafer models ...``: list, inspect, load, swap, unload, quantize and pull models."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from wafer_client.cli._common import (
    client_for,
    echo_json,
    models_app,
    read_file,
    reporting_errors,
    short,
)
from wafer_client.types import ModelInfo


def _state(info: ModelInfo) -> str:
    colour = {"ready": "green", "failed": "red", "loading": "yellow", "unloading": "yellow"}.get(info.state)
    return f"[{colour}]{info.state}[/]" if colour else info.state


def _model_json(info: ModelInfo) -> dict[str, Any]:
    data = asdict(info)
    data["last_used"] = info.last_used.isoformat() if info.last_used else None
    return data


@models_app.command("list")
def models_list(
    ctx: typer.Context, *, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """The models the server knows, with their state."""
    with reporting_errors(), client_for(ctx) as client:
        models = client.list_models()
    if as_json:
        echo_json([_model_json(m) for m in models])
        return
    # Short columns that never wrap; tasks wrap between words. The free-text reasons a model is not
    # loadable, and which model answers a request that names none, go under the table, where long
    # text cannot squeeze the columns in an 80-column terminal.
    table = Table(show_edge=False, box=box.SIMPLE_HEAD, pad_edge=False)
    for column, justify in (("name", "left"), ("backend", "left"), ("state", "left"), ("dims", "right")):
        table.add_column(column, no_wrap=True, justify=justify)  # type: ignore[arg-type]
    table.add_column("MB", no_wrap=True, justify="right")
    table.add_column("tasks", min_width=9)
    notes: list[str] = []
    defaults: list[str] = []
    for m in models:
        table.add_row(
            escape(m.name) + (" *" if m.default_for else ""),
            m.backend,
            _state(m),
            str(m.dimensions) if m.dimensions else "",
            f"{m.memory_bytes / 1e6:.0f}" if m.memory_bytes else "",
            ", ".join(m.tasks),
        )
        defaults += [f"{task} → {escape(m.name)}" for task in m.default_for]
        if m.error:
            notes.append(f"[bold]{escape(m.name)}[/bold]: {escape(m.error)}")
        elif m.not_loaded_reason and m.not_loaded_reason != "never loaded":
            notes.append(f"[bold]{escape(m.name)}[/bold]: {escape(m.not_loaded_reason)}")
    console = Console()
    console.print(table)
    if defaults:
        console.print("* default for " + ", ".join(defaults))
    for note in notes:
        console.print(note, overflow="fold")


@models_app.command("get")
def models_get(
    ctx: typer.Context,
    *,
    name: Annotated[str, typer.Argument(help="Model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Everything the server says about one model."""
    with reporting_errors(), client_for(ctx) as client:
        info = client.get_model(name)
    data = _model_json(info)
    if as_json:
        echo_json(data)
        return
    table = Table(show_header=False, show_edge=False)
    for key, value in data.items():
        shown = ", ".join(value) if isinstance(value, list | tuple) else "" if value is None else str(value)
        table.add_row(key, escape(shown))
    Console().print(table)


def _report_model(info: ModelInfo, verb: str) -> None:
    if info.state == "failed":
        typer.echo(f"error: {info.name}: {info.error or 'load failed'}", err=True)
        raise typer.Exit(1)
    detail = []
    if info.memory_bytes:
        detail.append(f"{info.memory_bytes / 1e6:.1f} MB")
    if verb == "loaded" and info.load_seconds:
        detail.append(f"in {info.load_seconds:.2f} s")
    suffix = f" ({', '.join(detail)})" if detail else ""
    Console().print(f"{escape(info.name)}: {verb}, now {_state(info)}{suffix}")


@models_app.command("load")
def models_load(
    ctx: typer.Context,
    *,
    name: Annotated[str, typer.Argument(help="Model name (a new one needs --spec).")],
    spec: Annotated[
        Path | None,
        typer.Option(
            help="YAML or JSON file of models.yaml fields: swap the model to them (only the fields that "
            "change), or register a new model (a whole entry). '-' reads standard input."
        ),
    ] = None,
    pin: Annotated[
        bool | None, typer.Option("--pin/--unpin", help="Never unload it on its own (budget, idle time).")
    ] = None,
    keep_alive: Annotated[
        float | None, typer.Option(min=0, help="Unload after this many idle seconds; 0: keep it loaded.")
    ] = None,
) -> None:
    """Load a model and wait until it is ready; with --spec, swap it without failing a request."""
    text = None
    if spec is not None:
        text = sys.stdin.read() if str(spec) == "-" else read_file(spec, "the spec file").decode("utf-8")
    with reporting_errors(), client_for(ctx) as client:
        info = client.load_model(name, spec=text, pinned=pin, keep_alive_seconds=keep_alive)
    _report_model(info, "loaded")


@models_app.command("quantize")
def models_quantize(
    ctx: typer.Context,
    *,
    source_model: Annotated[str, typer.Argument(help="An fp32 ONNX model of the server's catalog.")],
    name: Annotated[str, typer.Option("--name", help="Name of the new int8 model.")],
    per_tensor: Annotated[
        bool, typer.Option(help="One scale per weight tensor, not per output channel (less faithful).")
    ] = False,
    static: Annotated[
        bool,
        typer.Option(
            help="Static int8 (QDQ): activation ranges calibrated on texts the server builds; int8 end to end "
            "(VNNI), faster than dynamic but less faithful."
        ),
    ] = False,
) -> None:
    """Have the server quantize an ONNX model to int8 and register it (loaded) under a new name."""
    with reporting_errors(), client_for(ctx) as client:
        info = client.quantize_model(source_model, name, per_tensor=per_tensor, static=static)
    _report_model(info, "quantized")
    Console().print(f"file on the server: {escape(info.source)}")


@models_app.command("pull")
def models_pull(ctx: typer.Context, *, name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Have the server download a model's hf:// files into its model cache (resumes, verifies)."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with reporting_errors(), client_for(ctx) as client, Progress(*columns, console=Console(stderr=True)) as bars:
        tasks: dict[str, Any] = {}
        for report in client.pull_model(name):
            if report.done:
                break
            if report.source not in tasks:
                tasks[report.source] = bars.add_task(short(report.source, 40), total=report.total_bytes or None)
            task = tasks[report.source]
            bars.update(task, completed=report.downloaded_bytes, total=report.total_bytes or None)
            if report.resumed_from_bytes and report.downloaded_bytes == report.resumed_from_bytes:
                bars.console.print(f"{escape(report.source)}: resuming at {report.resumed_from_bytes} bytes")
            if report.file_done:
                bars.console.print(f"{escape(report.source)}: verified, {escape(report.path)}")
    Console().print(f"{escape(name)}: every file is in the server's model cache")


@models_app.command("unload")
def models_unload(
    ctx: typer.Context,
    *,
    name: Annotated[str, typer.Argument(help="Model name.")],
    drain_timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to let running requests finish [default: server's].")
    ] = 0,
) -> None:
    """Unload a model once the requests holding it finish."""
    with reporting_errors(), client_for(ctx) as client:
        info = client.unload_model(name, drain_timeout_seconds=drain_timeout)
    _report_model(info, "unloaded")


# Index
