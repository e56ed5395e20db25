"""The scheduler seen from a client: merged batches, lanes and a bounded queue, on the real server."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import MODELS_YAML
from tests.e2e.conftest import ServerProcess, start_server
from wafer_client import EmbedResult, ResourceExhaustedError, WaferClient

pytestmark = pytest.mark.e2e

TEXTS = [
    f"{subject} {verb} the {thing} at {hour} o'clock"
    for subject, verb, hour in [("Anna", "moved", 3), ("The team", "cancelled", 9), ("Dad", "fixed", 6)]
    for thing in ("meeting", "car", "dinner", "delivery", "train ticket", "birthday party")
]


def fresh(texts: list[str]) -> list[str]:
    """The texts made new, so that the server's embedding cache cannot answer them."""
    nonce = uuid.uuid4().hex[:8]
    return [f"{text} ({nonce})" for text in texts]


def test_concurrent_callers_each_get_their_own_rows(server: ServerProcess) -> None:
    with WaferClient(server.address, timeout=60) as client:
        merged_seen = False
        for _ in range(3):
            texts = fresh(TEXTS)
            requests = [texts[i : i + 1 + i % 3] for i in range(16)]
            # Each text alone, unnormalized: another cache key than the normalized calls below.
            alone = {}
            for text in texts:
                vector = client.embed(text, model="minilm", normalize=False).vectors[0]
                alone[text] = vector / np.linalg.norm(vector)
            start = threading.Barrier(len(requests))

            def call(texts: list[str], client: WaferClient = client, start: threading.Barrier = start) -> EmbedResult:
                start.wait(10)
                return client.embed(texts, model="minilm")

            with ThreadPoolExecutor(len(requests)) as pool:
                results = list(pool.map(call, requests))
            for request, result in zip(requests, results, strict=True):
                assert result.vectors.shape == (len(request), 384)
                for text, vector in zip(request, result.vectors, strict=True):
                    # Batched with others or alone, a text gets its own vector (padding moves the
                    # last float bits only).
                    assert float(vector @ alone[text]) > 0.9999
                merged_seen |= result.timings.batch_size > len(request)
    assert merged_seen, "16 simultaneous callers never shared a model call"


def test_interactive_requests_overtake_a_batch_lane_flood(server: ServerProcess) -> None:
    stop = threading.Event()
    batch_waits: list[float] = []

    def flood() -> None:
        with WaferClient(server.address, timeout=120) as client:
            while not stop.is_set():
                result = client.embed(fresh(TEXTS + TEXTS[:14]), model="minilm", priority="batch")
                batch_waits.append(result.timings.queue_ms)

    with ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(flood) for _ in range(4)]
        try:
            time.sleep(1.0)  # the batch lane fills
            with WaferClient(server.address, timeout=60) as client:
                interactive = []
                for text in fresh(TEXTS[:12]):
                    interactive.append(client.embed(text, model="minilm").timings.queue_ms)
                    time.sleep(0.02)
        finally:
            stop.set()
        for done in floods:
            done.result(timeout=120)
    # Each batch request waits for the ones ahead of it; an interactive one for one micro-batch.
    assert statistics.median(interactive) < statistics.median(batch_waits) / 2, (interactive, batch_waits)


@pytest.fixture
def small_queue(tmp_path: Path) -> Path:
    """The repository's models.yaml with only minilm, whose lanes hold 8 inputs."""
    catalog = yaml.safe_load(MODELS_YAML.read_text(encoding="utf-8"))
    minilm = {**catalog["models"]["minilm"], "batching": {"queue_capacity": 8}}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"embed": "minilm"}, "models": {"minilm": minilm}}), "utf-8")
    return path


def test_a_full_queue_answers_resource_exhausted_with_a_hint_and_recovers(tmp_path: Path, small_queue: Path) -> None:
    server = start_server(tmp_path / "data", models=small_queue)
    try:
        refused: list[ResourceExhaustedError] = []
        served = 0
        lock = threading.Lock()

        def bulk(i: int) -> None:
            nonlocal served
            with WaferClient(server.address, timeout=60, retries=0) as client:
                try:
                    client.embed(fresh(TEXTS[i % 10 : i % 10 + 4]), priority="batch")
                except ResourceExhaustedError as error:
                    with lock:
                        refused.append(error)
                    return
            with lock:
                served += 1

        with ThreadPoolExecutor(24) as pool:
            list(pool.map(bulk, range(48)))
        assert refused, "48 simultaneous 4-text requests fit an 8-input lane"
        assert served > 0
        error = refused[0]
        assert "capacity 8" in error.details
        hints = [int(value) for key, value in error.metadata if key == "retry-after-ms"]
        assert hints and hints[0] > 0

        # Clients that honour the hint get through, and the queue is usable again.
        with WaferClient(server.address, timeout=60, retries=8) as client:
            with ThreadPoolExecutor(8) as pool:
                chunks = [fresh(TEXTS[i % 10 : i % 10 + 4]) for i in range(16)]
                results = list(pool.map(lambda texts: client.embed(texts, priority="batch"), chunks))
            assert all(r.vectors.shape == (4, 384) for r in results)
            alone = client.embed("recovered").vectors
            assert alone.shape == (1, 384) and bool(np.isfinite(alone).all())
    finally:
        server.stop()
