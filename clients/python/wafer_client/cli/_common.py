"""What every ``wafer`` sub-command shares: the app and its global options, the client they
build, and how results and errors are printed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer

# Submodules, not the package root: they import even where the package is a namespace package (a
# stale editable install), so the command keeps working there.
from wafer_client._base import ClientOptions
from wafer_client._sync import WaferClient
from wafer_client.errors import WaferError

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

PREVIEW = 6
TEXT_WIDTH = 60


@dataclass
class Options:
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


def options_of(ctx: typer.Context) -> Options:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Options) else Options()


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


def read_file(path: Path, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint=hint) from None


def _token(opts: Options) -> str | None:
    if opts.token_file is not None:
        token = read_file(opts.token_file, "--token-file").decode("utf-8", "replace").strip()
        if not token:
            raise typer.BadParameter(f"{opts.token_file} is empty", param_hint="--token-file")
        return token
    return opts.token.strip() if opts.token else None


def client_options(opts: Options) -> ClientOptions:
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
            options["root_certificates"] = read_file(opts.tls_ca, "--tls-ca")
        if opts.tls_client_cert is not None and opts.tls_client_key is not None:
            options["certificate_chain"] = read_file(opts.tls_client_cert, "--tls-client-cert")
            options["private_key"] = read_file(opts.tls_client_key, "--tls-client-key")
    return options


def client_for(ctx: typer.Context) -> WaferClient:
    opts = options_of(ctx)
    return WaferClient(opts.address, **client_options(opts))


@contextmanager
def reporting_errors() -> Iterator[None]:
    try:
        yield
    except WaferError as error:
        typer.echo(f"error: {error.code.name}: {error.details}", err=True)
        if error.request_id:
            typer.echo(f"request id: {error.request_id}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def short(text: str, width: int = TEXT_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def echo_json(value: Any) -> None:
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
    ctx.obj = Options(
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


def add_contributed_commands() -> None:
    """Register the commands other packages of the distribution contribute through the
    ``wafer.commands`` entry point: the server's ``serve``. Found by entry point, so the client
    imports nothing of the server."""
    for command in entry_points(group="wafer.commands"):
        app.command(command.name)(command.load())
