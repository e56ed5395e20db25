"""SIGTERM drains: health turns NOT_SERVING, calls already accepted finish, the process exits 0."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import start_server
from wafer_client import UnavailableError, WaferClient

pytestmark = pytest.mark.e2e

# Generous: the point is that accepted calls finish, not how fast; a busy CI machine can slow
# llama.cpp several times over.
GRACE = {"WAFER_SHUTDOWN_GRACE_SECONDS": "120"}


def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", env=GRACE)
    results: list[str] = []
    accepted = threading.Event()

    def generation() -> str:
        with WaferClient(server.address, timeout=120, retries=0) as client:
            chunks = client.generate("1, 2, 3, 4, 5,", max_tokens=120, temperature=0)
            text = ""
            for chunk in chunks:
                accepted.set()
                text += chunk.text
                if chunk.finish_reason is not None:
                    return chunk.finish_reason
            return "no finish"

    def embedding(i: int) -> str:
        with WaferClient(server.address, timeout=120, retries=0) as client:
            return client.embed([f"message {i} " * 20] * 32).model

    with ThreadPoolExecutor(max_workers=8) as pool:
        generations = [pool.submit(generation) for _ in range(2)]
        assert accepted.wait(60)
        embeddings = [pool.submit(embedding, i) for i in range(4)]
        time.sleep(0.2)  # let the embeddings reach the server before the signal
        server.process.send_signal(signal.SIGTERM)
        results = [f.result(timeout=120) for f in generations + embeddings]
    assert results == ["length", "length"] + ["minilm"] * 4
    assert server.process.wait(60) == 0
    assert any(r.get("event") == "shutting down" for r in server.logs())
    assert any(r.get("event") == "stopped" for r in server.logs())


def test_new_calls_after_sigterm_are_refused_while_draining(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", env=GRACE)
    with WaferClient(server.address, timeout=60, retries=0) as client:
        chunks = client.generate("1, 2, 3, 4, 5,", max_tokens=400, temperature=0)
        next(iter(chunks))
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        refused = False
        with WaferClient(server.address, timeout=5, retries=0) as other:
            while time.monotonic() < deadline and not refused:
                try:
                    status = other.health("wafer.v1.Inference")
                    if status == "NOT_SERVING":
                        other.embed("too late")
                except UnavailableError:
                    refused = True
        assert refused, "calls arriving after SIGTERM must be refused (UNAVAILABLE)"
        finish = [c.finish_reason for c in chunks if c.finish_reason is not None]
        assert finish == ["length"]
    assert server.process.wait(60) == 0
