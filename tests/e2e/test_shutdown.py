"""SIGTERM drains: health turns NOT_SERVING, calls already accepted finish, the process exits 0."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.conftest import MODELS_YAML
from tests.e2e.conftest import start_server
from tests.fakes.fake_hub import running_fake_hub
from wafer.specs import Catalog
from wafer_client import UnavailableError, WaferClient, WaferError

pytestmark = pytest.mark.e2e

# Generous: the point is that accepted calls finish, not how fast; a busy CI machine can slow
# llama.cpp several times over.
GRACE = {"WAFER_SHUTDOWN_GRACE_SECONDS": "120"}
SLOW_REPO = "wafer-tests/slow-model"


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


def test_sigterm_during_an_on_demand_download_ends_the_process(tmp_path: Path) -> None:
    """A model loaded on demand from a slow Hub: SIGTERM stops its download (kept, to resume), and
    the process exits at once instead of when the last byte arrives."""
    minilm = Catalog.from_yaml(MODELS_YAML).models["minilm"]
    slow = {
        "backend": "onnx",
        "source": f"hf://{SLOW_REPO}/model.onnx",
        "tokenizer": minilm.tokenizer,
        "tasks": ["embed"],
        "dimensions": 384,
    }
    fields = minilm.model_dump(mode="json", exclude_unset=True, exclude={"name"})
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"defaults": {"embed": "minilm"}, "models": {"minilm": fields, "slow": slow}}))
    with running_fake_hub() as hub:
        # 32 MiB at 256 KiB/s: two minutes of download, unless something stops it.
        hub.add_file(SLOW_REPO, "model.onnx", os.urandom(32 << 20))
        hub.throttle_bytes_per_second = 256 << 10
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "WAFER_SHUTDOWN_GRACE_SECONDS": "1"}
        server = start_server(tmp_path / "data", models=models, env=env)

        def embed_with_the_slow_model() -> None:
            with WaferClient(server.address, timeout=300, retries=0) as client, contextlib.suppress(WaferError):
                client.embed("hello", model="slow")

        caller = threading.Thread(target=embed_with_the_slow_model, daemon=True)
        caller.start()
        blobs = tmp_path / "data" / "models" / f"models--{SLOW_REPO.replace('/', '--')}" / "blobs"
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in blobs.glob("*.incomplete")):
            assert time.monotonic() < deadline, "the download did not start"
            time.sleep(0.1)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(30)
        finally:
            server.stop()
        assert time.monotonic() - signalled < 30
        assert code == 0
        assert any(r.get("event") == "stopped" for r in server.logs())
        assert any(p.stat().st_size > 0 for p in blobs.glob("*.incomplete")), "the partial download is kept to resume"
