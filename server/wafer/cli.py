"""The server's command line: ``wafer serve``.

The ``wafer`` command is the client's (``wafer_client.cli``); it finds this command through the
``wafer.commands`` entry point, so neither package imports the other. ``python -m wafer`` runs the
same ``wafer`` command.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, cast

import typer


class LogFormat(StrEnum):
    json = "json"
    console = "console"


ServeMain = Callable[[dict[str, object]], None]


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
    # Only flags the user gave: everything else stays with the server's own settings (file, env).
    given: dict[str, object | None] = {
        "address": address if address is not None else _global_address(ctx),
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


def _global_address(ctx: typer.Context) -> str | None:
    """The ``wafer --address`` given before the sub-command (``wafer --address X serve``), if the
    command line gave one; from the environment it is the server's own business."""
    root = ctx.find_root()
    if root is ctx:
        return None
    source = root.get_parameter_source("address")
    address = root.params.get("address")
    return address if source is not None and source.name == "COMMANDLINE" and isinstance(address, str) else None
