"""The server on a unix socket chosen by WAFER_ADDRESS, and the `wafer` CLI against the real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import MODELS_YAML
from tests.e2e.conftest import ServerProcess, start_server
from wafer_client import WaferClient

pytestmark = pytest.mark.e2e


def test_unix_socket_from_the_environment(tmp_path: Path) -> None:
    catalog = yaml.safe_load(MODELS_YAML.read_text())
    # Only the small embedder: this test is about the transport, and a smaller catalog starts faster.
    small = {"defaults": {"embed": "minilm", "rerank": "minilm"}, "models": {"minilm": catalog["models"]["minilm"]}}
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(small))
    # Keep the socket path short: unix socket paths are limited to about 100 bytes.
    socket = Path(f"/tmp/wafer-test-{os.getpid()}.sock")
    address = f"unix://{socket}"
    server = start_server(tmp_path / "data", address=None, models=models, env={"WAFER_ADDRESS": address})
    try:
        assert server.address == address
        with WaferClient(address) as client:
            assert client.embed("over a unix socket").vectors.shape == (1, 384)
            assert [m.name for m in client.list_models()] == ["minilm"]
    finally:
        assert server.stop() == 0
        socket.unlink(missing_ok=True)


def wafer(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wafer", "--address", server.address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_against_the_server(server: ServerProcess) -> None:
    embedded = wafer(server, "embed", "--json", "hello", "world")
    assert embedded.returncode == 0, embedded.stderr
    assert len(json.loads(embedded.stdout)["embeddings"]) == 2

    generated = wafer(server, "generate", "Say hello.", "--max-tokens", "8", "--temperature", "0")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip()
    assert "8 completion tokens" in generated.stderr

    listed = wafer(server, "models", "list")
    assert listed.returncode == 0 and "minilm" in listed.stdout and "ready" in listed.stdout

    loaded = wafer(server, "models", "load", "paraphrase-minilm-l3")
    assert loaded.returncode == 0, loaded.stderr
    unloaded = wafer(server, "models", "unload", "paraphrase-minilm-l3")
    assert unloaded.returncode == 0, unloaded.stderr

    failed = wafer(server, "embed", "x", "--model", "nope")
    assert failed.returncode == 1
    assert "error: NOT_FOUND" in failed.stderr and "Traceback" not in failed.stderr
