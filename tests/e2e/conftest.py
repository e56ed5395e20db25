"""End-to-end fixtures: a real `wafer serve` process on a free port, driven through the client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import MODELS_YAML
from wafer_client import ClientOptions, WaferClient

STARTUP_TIMEOUT_SECONDS = 120


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    address: str
    data_dir: Path
    log_lines: list[str] = field(default_factory=list)
    # host:port of the OpenAI-compatible HTTP endpoint, when the server was started with one.
    http_address: str | None = None

    def logs(self) -> list[dict[str, object]]:
        records = []
        for line in list(self.log_lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _connectable(address: str) -> str:
    """Where a client on this machine reaches a server listening on `address`: a wildcard address
    (every interface) is not a destination, its loopback is."""
    for wildcard, loopback in (("0.0.0.0:", "127.0.0.1:"), ("[::]:", "[::1]:")):
        if address.startswith(wildcard):
            return loopback + address.removeprefix(wildcard)
    return address


def start_server(
    data_dir: Path,
    *,
    address: str | None = "127.0.0.1:0",
    models: Path = MODELS_YAML,
    env: dict[str, str] | None = None,
    metrics_address: str | None = None,
    extra_args: Sequence[str] = (),
    client_options: ClientOptions | None = None,
) -> ServerProcess:
    """Start `python -m wafer serve`, wait until it listens and its default models are ready.
    `address=None` leaves the flag out, so the server takes WAFER_ADDRESS or its default.
    `extra_args` go to `serve` as they are; `client_options` (TLS, for one) are what the readiness
    check needs to reach the server."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WAFER_THREADS": "2", **(env or {})}
    flags = ["--address", address] if address is not None else []
    if metrics_address is not None:  # the bound address is in the "metrics listening" log line
        flags += ["--metrics-address", metrics_address]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wafer",
            "serve",
            *flags,
            "--models",
            str(models),
            "--data-dir",
            str(data_dir),
            "--log-format",
            "json",
            *extra_args,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    lines: list[str] = []
    listening = threading.Event()
    bound: list[str] = []
    http: list[str] = []

    def read_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if '"http listening"' in line:  # logged before "server listening"
                http.append(json.loads(line)["address"])
            if '"server listening"' in line:
                bound.append(json.loads(line)["address"])
                listening.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not listening.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("server did not start:\n" + "".join(lines[-40:]))
    server = ServerProcess(
        process=process,
        address=_connectable(bound[0]),
        data_dir=data_dir,
        log_lines=lines,
        http_address=_connectable(http[0]) if http else None,
    )
    options: ClientOptions = {"timeout": 5, **(client_options or {})}
    with WaferClient(server.address, **options) as client:
        while client.health("wafer.v1.Inference") != "SERVING":
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("default models did not become ready:\n" + "".join(lines[-40:]))
            time.sleep(0.2)
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    running = start_server(tmp_path_factory.mktemp("wafer-data"))
    yield running
    assert running.stop() == 0, "server did not exit cleanly on SIGTERM"


@pytest.fixture
def client(server: ServerProcess) -> Iterator[WaferClient]:
    with WaferClient(server.address, timeout=120, retries=0) as client:
        yield client
