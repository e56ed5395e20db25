"""Serve the HTTP app with uvicorn, on the event loop the gRPC server runs on.

The socket is bound here, before anything starts, so a taken port or a bad address ends the start
like gRPC's (FailedPreconditionError, exit status 2) and port 0 can be read back. uvicorn's own
signal handling is switched off: Wafer's loop owns SIGTERM and SIGINT and stops both doors.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import structlog
import uvicorn

from wafer.config import Settings
from wafer.errors import FailedPreconditionError, InvalidArgumentError
from wafer.http.app import Door, create_app
from wafer.rpc.auth import check_exposure, is_local_address

log = structlog.get_logger("wafer.http")

# After the drain has let running requests finish (or given up on them), how long uvicorn may
# still take to close idle keep-alive connections before it cancels what is left.
CLOSE_SECONDS = 2


def parse_http_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6 host]:port` → (host, port)."""
    host, sep, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidArgumentError(f"http address {address!r} must be host:port, e.g. 127.0.0.1:8080")
    return host, int(port_text)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would install its own SIGTERM/SIGINT handlers over the loop's, and re-raise the
        # signal when it stops; the process's shutdown is app.serve's.
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FailedPreconditionError(f"cannot listen for HTTP on {host}:{port}: {exc}") from exc
    sock.setblocking(False)
    return sock


class HttpServer:
    """The OpenAI-compatible door: build (bind) it, `start()` it on the running loop, `stop()` it
    after the drain."""

    def __init__(self, settings: Settings, door: Door, address: str | None = None) -> None:
        address = address or settings.http_address
        if address is None:
            raise InvalidArgumentError("no http address")
        host, port = parse_http_address(address)
        check_exposure(
            address,
            token_configured=door.token is not None,
            client_certificates=settings.tls_client_ca_file is not None,
            allow_remote_admin=settings.allow_remote_admin,
        )
        tls = settings.tls_cert_file is not None
        if door.token is not None and not tls and not is_local_address(address):
            log.warning(
                "the bearer token crosses the network in plain text over HTTP; enable TLS or put a TLS proxy in front",
                address=address,
            )
        self._door = door
        config = uvicorn.Config(
            create_app(door),
            lifespan="off",
            http="h11",
            log_config=None,
            access_log=False,  # the app writes its own line per request
            server_header=False,
            timeout_graceful_shutdown=CLOSE_SECONDS,
            ssl_certfile=settings.tls_cert_file,
            ssl_keyfile=settings.tls_key_file,
            ssl_ca_certs=settings.tls_client_ca_file,
            ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls_client_ca_file is not None else ssl.CERT_NONE,
        )
        try:
            config.load()  # reads the TLS files now, so a bad one fails the start, not the first request
        except (OSError, ssl.SSLError) as exc:
            raise FailedPreconditionError(f"cannot use the TLS files for HTTP: {exc}") from exc
        self._socket = _bind(host, port)
        self.host = host
        self.port = int(self._socket.getsockname()[1])
        self.tls = tls
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise FailedPreconditionError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("http listening", address=self.address, tls=self.tls)

    async def stop(self) -> None:
        """Close the listener and the idle connections; streams still running (the drain gave up on
        them) are cancelled."""
        for stream in list(self._door.streams):
            stream.cancel()
        if self._task is None:
            self._socket.close()
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
