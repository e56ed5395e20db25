"""The ``wafer`` command: run the server, or talk to one.

Client commands print results for people (rich tables) or, with ``--json``, for programs. A failed
call prints ``error: <CODE>: <details>`` on stderr and exits 1, without a traceback.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import parse_qs

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

# Submodules, not the package root: they import even where the package is a namespace package (a
# stale editable install), so the command keeps working there.
from wafer_client._base import ClientOptions
from wafer_client._sync import WaferClient
from wafer_client.errors import WaferError
from wafer_client.types import ChatMessage, GenerationChunk, Job, JsonlSource, ModelInfo, SqliteSource

app = typer.Typer(
    name="wafer",
    help="Wafer: a gRPC inference server for small text models, and a client for it.",
    no_args_is_help=True,
    # Plain help text: rich markup would swallow the brackets of "[default: ...]" and "wafer[server]".
    rich_markup_mode=None,
    # Locals in a crash report would include the client and its metadata: authorization headers.
    pretty_exceptions_show_locals=False,
)
models_app = typer.Typer(
    help="List, inspect, load, swap, unload, quantize and pull models.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(models_app, name="models")

_PREVIEW = 6
_TEXT_WIDTH = 60


@dataclass
class _Options:
    address: str | None = None
    timeout: float | None = None
    headers: list[str] = field(default_factory=list)
    address_given: bool = False
    token: str | None = None
    token_file: Path | None = None
    tls: bool = False
    tls_ca: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None


def _options(ctx: typer.Context) -> _Options:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, _Options) else _Options()


def _metadata(headers: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for header in headers:
        # Whichever separator comes first splits, so values may contain the other one (URLs, tokens).
        cuts = [i for i in (header.find(":"), header.find("=")) if i >= 0]
        key, sep, value = header.partition(header[min(cuts)]) if cuts else (header, "", "")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{header!r} is not 'name: value'", param_hint="--header")
        pairs.append((key.strip(), value.strip()))
    return pairs


def _read(path: Path, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint=hint) from None


def _token(opts: _Options) -> str | None:
    if opts.token_file is not None:
        token = _read(opts.token_file, "--token-file").decode("utf-8", "replace").strip()
        if not token:
            raise typer.BadParameter(f"{opts.token_file} is empty", param_hint="--token-file")
        return token
    return opts.token.strip() if opts.token else None


def _client_options(opts: _Options) -> ClientOptions:
    metadata = _metadata(opts.headers)
    token = _token(opts)
    if token is not None:
        # Two authorization headers would leave it to the server which one counts.
        if any(key.lower() == "authorization" for key, _ in metadata):
            raise typer.BadParameter("give --token or an authorization header, not both", param_hint="--token")
        metadata.append(("authorization", f"Bearer {token}"))
    options: ClientOptions = {"metadata": metadata}
    if opts.timeout is not None:
        options["timeout"] = opts.timeout
    if (opts.tls_client_cert is None) != (opts.tls_client_key is None):
        raise typer.BadParameter("--tls-client-cert and --tls-client-key go together", param_hint="--tls-client-cert")
    if opts.tls or opts.tls_ca is not None or opts.tls_client_cert is not None:
        options["tls"] = True
        if opts.tls_ca is not None:
            options["root_certificates"] = _read(opts.tls_ca, "--tls-ca")
        if opts.tls_client_cert is not None and opts.tls_client_key is not None:
            options["certificate_chain"] = _read(opts.tls_client_cert, "--tls-client-cert")
            options["private_key"] = _read(opts.tls_client_key, "--tls-client-key")
    return options


def _client(ctx: typer.Context) -> WaferClient:
    opts = _options(ctx)
    return WaferClient(opts.address, **_client_options(opts))


@contextmanager
def _reporting_errors() -> Iterator[None]:
    try:
        yield
    except WaferError as error:
        typer.echo(f"error: {error.code.name}: {error.details}", err=True)
        if error.request_id:
            typer.echo(f"request id: {error.request_id}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _short(text: str, width: int = _TEXT_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, ensure_ascii=False, default=str))


@app.callback()
def main(
    ctx: typer.Context,
    *,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            "-a",
            envvar="WAFER_ADDRESS",
            help="Server address: host:port or unix:///path [default: 127.0.0.1:50051].",
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, help="Deadline of each call, in seconds [default: 60].")
    ] = None,
    header: Annotated[
        list[str] | None,
        typer.Option("--header", "-H", help="Extra call metadata, 'name: value' (repeatable)."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="WAFER_TOKEN",
            help="Bearer token for a server that requires one (prefer WAFER_TOKEN or --token-file: "
            "arguments show in the process list).",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(envvar="WAFER_TOKEN_FILE", dir_okay=False, help="File holding the bearer token."),
    ] = None,
    tls: Annotated[bool, typer.Option("--tls", help="Connect with TLS, trusting the system's CAs.")] = False,
    tls_ca: Annotated[
        Path | None, typer.Option(dir_okay=False, help="PEM CA bundle to verify the server with (implies --tls).")
    ] = None,
    tls_client_cert: Annotated[
        Path | None, typer.Option(dir_okay=False, help="PEM client certificate, for servers that require one.")
    ] = None,
    tls_client_key: Annotated[
        Path | None, typer.Option(dir_okay=False, help="PEM private key of --tls-client-cert.")
    ] = None,
) -> None:
    """Wafer: a gRPC inference server for small text models, and a client for it."""
    source = ctx.get_parameter_source("address")
    ctx.obj = _Options(
        address=address,
        timeout=timeout,
        headers=list(header or []),
        address_given=source is not None and source.name == "COMMANDLINE",
        token=token,
        token_file=token_file,
        tls=tls,
        tls_ca=tls_ca,
        tls_client_cert=tls_client_cert,
        tls_client_key=tls_client_key,
    )


# Server


class LogFormat(StrEnum):
    json = "json"
    console = "console"


ServeMain = Callable[[dict[str, object]], None]


@app.command()
def serve(
    ctx: typer.Context,
    *,
    address: Annotated[str | None, typer.Option(help="Address to listen on: host:port or unix:///path.")] = None,
    models: Annotated[Path | None, typer.Option("--models", help="The models.yaml to serve.", dir_okay=False)] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the vector store and the model cache live.", file_okay=False)
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    log_format: Annotated[LogFormat | None, typer.Option(help="json or console.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Threads for inference.")] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Server certificate chain (PEM); enables TLS.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(dir_okay=False, help="Private key of --tls-cert (PEM).")] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="Require client certificates from this CA (PEM): mutual TLS."),
    ] = None,
    auth_token_file: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="File holding the bearer token admin RPCs require [default: none]."),
    ] = None,
    auth_all_rpcs: Annotated[
        bool, typer.Option("--auth-all-rpcs", help="Require the token on every RPC, not only admin ones.")
    ] = False,
    allow_remote_admin: Annotated[
        bool,
        typer.Option(
            "--allow-remote-admin", help="Listen on a non-loopback address even though admin RPCs have no token."
        ),
    ] = False,
    metrics_address: Annotated[
        str | None, typer.Option(help="Serve Prometheus metrics at http://host:port/metrics [default: off].")
    ] = None,
    http_address: Annotated[
        str | None,
        typer.Option(help="Also serve the OpenAI-compatible HTTP API (/v1/...) on host:port [default: off]."),
    ] = None,
) -> None:
    """Run the Wafer server (needs the server extra: wafer[server])."""
    opts = _options(ctx)
    # Only flags the user gave: everything else stays with the server's own settings (file, env).
    given: dict[str, object | None] = {
        "address": address if address is not None else (opts.address if opts.address_given else None),
        "models_file": models,
        "data_dir": data_dir,
        "log_level": log_level,
        "log_format": log_format.value if log_format is not None else None,
        "threads": threads,
        "tls_cert_file": tls_cert,
        "tls_key_file": tls_key,
        "tls_client_ca_file": tls_client_ca,
        "auth_token_file": auth_token_file,
        # Only a given switch: absent, the environment (WAFER_AUTH_ALL_RPCS, ...) still decides.
        "auth_all_rpcs": True if auth_all_rpcs else None,
        "allow_remote_admin": True if allow_remote_admin else None,
        "metrics_address": metrics_address,
        "http_address": http_address,
    }
    overrides: dict[str, object] = {key: value for key, value in given.items() if value is not None}
    try:
        # Imported here: the client install has no server, and the server's imports are heavy.
        serve_main = cast(ServeMain, importlib.import_module("wafer.app").main)
    except ImportError as exc:
        typer.echo(f"error: the server is not installed ({exc}); install wafer[server]", err=True)
        raise typer.Exit(2) from None
    try:
        serve_main(overrides)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


# Inference


@app.command()
def embed(
    ctx: typer.Context,
    *,
    texts: Annotated[list[str], typer.Argument(metavar="TEXT", help="Texts to embed.")],
    model: Annotated[str, typer.Option(help="Model name [default: the server's embedder].")] = "",
    query: Annotated[bool, typer.Option("--query", help="Embed as search queries, not documents.")] = False,
    dimensions: Annotated[int, typer.Option(min=0, help="Keep the first N dimensions.")] = 0,
    truncate: Annotated[bool, typer.Option(help="Cut texts longer than the model's window.")] = False,
    pool_chunks: Annotated[
        bool, typer.Option(help="Read long texts whole: average the vectors of their overlapping windows.")
    ] = False,
    context_collection: Annotated[
        str, typer.Option(help="Contextual models (cde): embed in the context stored with this collection.")
    ] = "",
    context_document: Annotated[
        list[str] | None,
        typer.Option(help="Contextual models (cde): a corpus document to build the context from (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON with the full vectors.")] = False,
) -> None:
    """Embed texts and show the vectors."""
    with _reporting_errors(), _client(ctx) as client:
        result = client.embed(
            texts,
            model=model,
            input_type="query" if query else "document",
            dimensions=dimensions,
            truncate=truncate,
            pool_chunks=pool_chunks,
            context_collection=context_collection,
            context_documents=context_document or (),
        )
    if as_json:
        _echo_json(
            {
                "model": result.model,
                "dimensions": result.dimensions,
                "embeddings": result.vectors.tolist(),
                "cached": result.cached,
                "context_id": result.context_id,
                "usage": asdict(result.usage),
                "timings": asdict(result.timings),
            }
        )
        return
    console = Console()
    console.print(
        f"[bold]{escape(result.model)}[/]: {len(result)} x {result.dimensions}, "
        f"{result.usage.prompt_tokens} tokens, {result.timings.inference_ms:.1f} ms"
        + (f", {result.cached} from the cache" if result.cached else "")
        + (f", context {result.context_id[:12]}" if result.context_id else "")
    )
    table = Table(show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("text")
    table.add_column("norm", justify="right")
    table.add_column(f"first {_PREVIEW} values")
    for i, (text, vector) in enumerate(zip(texts, result.vectors, strict=False)):
        preview = " ".join(f"{v:+.4f}" for v in vector[:_PREVIEW].tolist())
        norm = math.sqrt(float((vector.astype("float64") ** 2).sum()))
        table.add_row(str(i), escape(_short(text, 40)), f"{norm:.3f}", preview + " …")
    console.print(table)


@app.command()
def rerank(
    ctx: typer.Context,
    *,
    query: Annotated[str, typer.Argument(help="The query.")],
    documents: Annotated[list[str], typer.Argument(metavar="DOC", help="Documents to rank.")],
    model: Annotated[str, typer.Option(help="Model name [default: the server's reranker].")] = "",
    top_n: Annotated[int, typer.Option(min=0, help="Keep the best N [default: all].")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Rank documents by relevance to a query, best first."""
    with _reporting_errors(), _client(ctx) as client:
        result = client.rerank(query, documents, model=model, top_n=top_n)
    if as_json:
        _echo_json(
            {
                "model": result.model,
                "results": [
                    {"index": hit.index, "score": hit.score, "document": documents[hit.index]} for hit in result.results
                ],
                "usage": asdict(result.usage),
            }
        )
        return
    table = Table(title=f"{escape(result.model)}: {escape(_short(query, 40))}", show_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("index", justify="right")
    table.add_column("score", justify="right")
    table.add_column("document")
    for rank, hit in enumerate(result.results, start=1):
        text = documents[hit.index] if hit.index < len(documents) else hit.document
        table.add_row(str(rank), str(hit.index), f"{hit.score:.4f}", escape(_short(text)))
    Console().print(table)


def _usage_line(last: GenerationChunk | None) -> str:
    if last is None:
        return "no output"
    parts = [last.model or "?"]
    if last.usage is not None:
        parts.append(f"{last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} completion tokens")
    if last.finish_reason is not None:
        parts.append(f"finish: {last.finish_reason}")
    if last.timings is not None:
        parts.append(f"first token {last.timings.time_to_first_token_ms:.0f} ms")
        if last.usage is not None and last.timings.inference_ms > 0:
            rate = last.usage.completion_tokens / (last.timings.inference_ms / 1000)
            parts.append(f"{rate:.1f} tokens/s")
    return " · ".join(parts)


@app.command()
def generate(
    ctx: typer.Context,
    *,
    prompt: Annotated[str, typer.Argument(help="The user's message (the raw text to continue with --raw).")],
    model: Annotated[str, typer.Option(help="Model name [default: the server's generator].")] = "",
    max_tokens: Annotated[int, typer.Option(min=0, help="Most tokens to generate.")] = 0,
    temperature: Annotated[float | None, typer.Option(min=0, max=2, help="0 is greedy.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop before this string (repeatable).")] = None,
    system: Annotated[str | None, typer.Option(help="System message (chat only).")] = None,
    chat: Annotated[
        bool, typer.Option("--chat/--raw", help="Use the model's chat template, or continue the raw text.")
    ] = True,
) -> None:
    """Generate text, printed as it streams; usage goes to stderr at the end."""
    if system is not None and not chat:
        raise typer.BadParameter("--system needs the chat template; drop --raw")
    messages: list[ChatMessage] | None = None
    if chat:
        messages = [ChatMessage("system", system)] if system is not None else []
        messages.append(ChatMessage("user", prompt))
    last: GenerationChunk | None = None
    with _reporting_errors(), _client(ctx) as client:
        try:
            for chunk in client.generate(
                None if messages is not None else prompt,
                messages=messages,
                model=model,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                stop=stop or (),
            ):
                sys.stdout.write(chunk.text)
                # Flushed per delta: the point of streaming is seeing text as it comes.
                sys.stdout.flush()
                last = chunk
        finally:
            # Whatever happened, end the line so the shell prompt (or the error) starts clean.
            sys.stdout.write("\n")
            sys.stdout.flush()
    typer.echo(_usage_line(last), err=True)


# Models


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
    with _reporting_errors(), _client(ctx) as client:
        models = client.list_models()
    if as_json:
        _echo_json([_model_json(m) for m in models])
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
    with _reporting_errors(), _client(ctx) as client:
        info = client.get_model(name)
    data = _model_json(info)
    if as_json:
        _echo_json(data)
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
        text = sys.stdin.read() if str(spec) == "-" else _read(spec, "the spec file").decode("utf-8")
    with _reporting_errors(), _client(ctx) as client:
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
    with _reporting_errors(), _client(ctx) as client:
        info = client.quantize_model(source_model, name, per_tensor=per_tensor, static=static)
    _report_model(info, "quantized")
    Console().print(f"file on the server: {escape(info.source)}")


@models_app.command("pull")
def models_pull(ctx: typer.Context, *, name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Have the server download a model's hf:// files into its model cache (resumes, verifies)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with _reporting_errors(), _client(ctx) as client, Progress(*columns, console=Console(stderr=True)) as bars:
        tasks: dict[str, Any] = {}
        for report in client.pull_model(name):
            if report.done:
                break
            if report.source not in tasks:
                tasks[report.source] = bars.add_task(_short(report.source, 40), total=report.total_bytes or None)
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
    with _reporting_errors(), _client(ctx) as client:
        info = client.unload_model(name, drain_timeout_seconds=drain_timeout)
    _report_model(info, "unloaded")


# Index


def _filter_value(text: str) -> str | int | bool:
    """A --filter value as the payload most likely holds it: true/false, a whole number, else text."""
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return text


def _parse_filters(items: list[str]) -> dict[str, str | int | bool]:
    conditions: dict[str, str | int | bool] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--filter")
        conditions[key] = _filter_value(value)
    return conditions


@app.command()
def search(
    ctx: typer.Context,
    *,
    query: Annotated[str, typer.Argument(help="The query.")],
    collection: Annotated[str, typer.Option("--collection", "-c", help="Collection to search.")],
    top_k: Annotated[int, typer.Option(min=1, help="How many documents to return.")] = 10,
    filters: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            metavar="KEY=VALUE",
            help="Only documents whose payload field KEY equals VALUE (true/false and whole numbers "
            "are typed); repeat to require several.",
        ),
    ] = None,
    rerank_model: Annotated[str, typer.Option(help="Rerank the nearest chunks with this model.")] = "",
    rerank_top_n: Annotated[int, typer.Option(min=0, help="How many chunks to rerank [default: max(top-k, 20)].")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Search a collection for the documents nearest a query, optionally reranked."""
    conditions = _parse_filters(filters or [])
    with _reporting_errors(), _client(ctx) as client:
        result = client.search(
            collection,
            query,
            top_k=top_k,
            filter=conditions or None,
            rerank_model=rerank_model,
            rerank_top_n=rerank_top_n,
        )
    if as_json:
        _echo_json(
            {
                "model": result.model,
                "rerank_model": result.rerank_model,
                "hits": [
                    {
                        "id": h.id,
                        "score": h.score,
                        "rerank_score": h.rerank_score,
                        "text": h.text,
                        "payload": h.payload,
                        "chunk": h.chunk,
                        "chunks": h.chunks,
                        "start": h.start,
                        "end": h.end,
                    }
                    for h in result.hits
                ],
            }
        )
        return
    models = escape(result.model) + (f", reranked by {escape(result.rerank_model)}" if result.rerank_model else "")
    table = Table(title=f"{escape(collection)} ({models})", show_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("id")
    table.add_column("score", justify="right")
    if result.rerank_model:
        table.add_column("rerank", justify="right")
    table.add_column("text")
    table.add_column("payload")
    for rank, hit in enumerate(result.hits, start=1):
        payload = json.dumps(hit.payload, ensure_ascii=False) if hit.payload else ""
        # A long document shows the chunk that matched, marked with its number.
        text = hit.matched_text if hit.chunks > 1 else hit.text
        label = f"[{hit.chunk + 1}/{hit.chunks}] " if hit.chunks > 1 else ""
        rerank = [f"{hit.rerank_score:.4f}" if hit.rerank_score is not None else ""] if result.rerank_model else []
        table.add_row(
            str(rank),
            escape(hit.id),
            f"{hit.score:.4f}",
            *rerank,
            escape(label + _short(text)),
            escape(_short(payload, 40)),
        )
    Console().print(table)


@app.command()
def collections(
    ctx: typer.Context, *, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """The collections in the index."""
    with _reporting_errors(), _client(ctx) as client:
        found = client.list_collections()
    if as_json:
        _echo_json([asdict(c) for c in found])
        return
    table = Table(show_edge=False)
    for name in ("name", "model", "dims", "documents", "context"):
        table.add_column(name, justify="right" if name in ("dims", "documents") else "left")
    for c in found:
        table.add_row(escape(c.name), escape(c.model), str(c.dimensions), str(c.documents), c.context_id[:12])
    Console().print(table)


# Health


@app.command()
def health(
    ctx: typer.Context,
    *,
    service: Annotated[str, typer.Option(help="One service, e.g. wafer.v1.Inference [default: all].")] = "",
) -> None:
    """Ask whether the server is serving; exits 0 only if it is."""
    opts = _options(ctx)
    # A probe should answer quickly or not at all, so a shorter deadline than other commands.
    timeout = opts.timeout if opts.timeout is not None else 5.0
    with _reporting_errors(), _client(ctx) as client:
        status = client.health(service, timeout=timeout)
    typer.echo(status)
    if status != "SERVING":
        raise typer.Exit(1)


# Jobs

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
    with _reporting_errors(), _client(ctx) as client:
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
        _echo_json(_job_json(job))
    else:
        _report_job(job)
    if wait and job.state != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context, *, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """Every job the server knows, newest first."""
    with _reporting_errors(), _client(ctx) as client:
        found = client.list_jobs()
    if as_json:
        _echo_json([_job_json(j) for j in found])
        return
    table = Table(show_edge=False)
    for name in ("id", "state", "collection", "done", "source", "created"):
        table.add_column(name, justify="right" if name == "done" else "left")
    for job in found:
        created = job.created.strftime("%Y-%m-%d %H:%M") if job.created else ""
        table.add_row(
            escape(job.id),
            escape(_short(_job_state(job), 40)),
            escape(job.collection),
            _job_progress(job),
            escape(_short(job.source, 40)),
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
    with _reporting_errors(), _client(ctx) as client:
        job = client.get_job(job_id)
    if as_json:
        _echo_json(_job_json(job))
    else:
        _report_job(job)


@jobs_app.command("watch")
def jobs_watch(ctx: typer.Context, *, job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")]) -> None:
    """Show a job's progress until it ends; exits 0 only if it succeeded."""
    with _reporting_errors(), _client(ctx) as client:
        job = _follow(client, client.get_job(job_id))
    _report_job(job)
    if job.state != "succeeded":
        raise typer.Exit(1)


def _control(ctx: typer.Context, job_id: str, action: Callable[[WaferClient, str], Job]) -> None:
    with _reporting_errors(), _client(ctx) as client:
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
