"""Model admin over gRPC: list, load, unload, on-demand loading, models that cannot load."""

from __future__ import annotations

import threading
import time

import pytest

from tests.e2e.conftest import ServerProcess
from wafer_client import (
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
    WaferClient,
)

pytestmark = pytest.mark.e2e


def test_list_models_shows_the_catalog_and_states(client: WaferClient) -> None:
    models = {m.name: m for m in client.list_models()}
    assert {"minilm", "smollm2", "gte-qwen2-1.5b-instruct", "cde-small-v1", "ember-v1"} <= set(models)
    minilm = models["minilm"]
    assert minilm.state == "ready"
    assert minilm.backend == "onnx"
    assert set(minilm.tasks) == {"embed", "rerank"}
    assert "embed" in minilm.default_for
    assert minilm.dimensions == 384 and minilm.pooling == "mean" and minilm.normalize
    assert minilm.memory_bytes > 0 and minilm.load_seconds > 0
    assert models["smollm2"].state == "ready"
    assert models["gte-qwen2-1.5b-instruct"].state == "unloaded"
    assert models["gte-qwen2-1.5b-instruct"].query_prompt.startswith("Instruct:")
    cde = models["cde-small-v1"]
    assert (cde.backend, cde.state, cde.error) == ("cde", "unloaded", "")


def test_load_use_and_unload_an_on_demand_model(client: WaferClient) -> None:
    name = "paraphrase-minilm-l3"
    assert client.get_model(name).state == "unloaded"
    loaded = client.load_model(name)
    assert loaded.state == "ready"
    assert loaded.memory_bytes > 0
    result = client.embed(["a test", "another test"], model=name)
    assert result.model == name and result.vectors.shape == (2, 384)
    assert client.get_model(name).last_used is not None
    assert client.unload_model(name).state == "unloaded"
    assert client.get_model(name).memory_bytes == 0
    # An unloaded model loads again on its next request.
    assert client.embed("again", model=name).model == name
    assert client.get_model(name).state == "ready"
    client.unload_model(name)


def test_models_that_cannot_load_say_why(client: WaferClient) -> None:
    with pytest.raises(FailedPreconditionError, match=r"not in the model cache.*hf download"):
        client.load_model("gte-qwen2-1.5b-instruct")
    # Offline and never pulled: its Hub files are not in the model cache.
    with pytest.raises(FailedPreconditionError, match=r"cde-small-v1.*not in the model cache"):
        client.embed("x", model="cde-small-v1")
    failed = client.get_model("gte-qwen2-1.5b-instruct")
    assert failed.state == "failed" and "hf download" in failed.error
    with pytest.raises(NotFoundError, match="unknown model 'nope'"):
        client.load_model("nope")
    # Everything else keeps serving.
    assert client.embed("still here").vectors.shape == (1, 384)


def test_unloading_a_model_in_use_drains_it_first(server: ServerProcess) -> None:
    """A long generation holds smollm2: unload refuses new requests (UNAVAILABLE), lets the running
    one finish, then frees the model; an unload that cannot drain in time leaves it serving."""
    with WaferClient(server.address, timeout=120, retries=0) as client:
        started = threading.Event()
        finished: list[str] = []

        def long_generation() -> None:
            # A raw count continues far past any natural end: the call runs its full max_tokens.
            chunks = client.generate("1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=300, temperature=0)
            for chunk in chunks:
                started.set()
                if chunk.finish_reason is not None:
                    finished.append(chunk.finish_reason)

        runner = threading.Thread(target=long_generation)
        runner.start()
        assert started.wait(60)
        with pytest.raises(FailedPreconditionError, match="still serving 1 request"):
            client.unload_model("smollm2", drain_timeout_seconds=0.2)
        assert client.get_model("smollm2").state == "ready"

        unload_result: list[str] = []
        unloader = threading.Thread(
            target=lambda: unload_result.append(client.unload_model("smollm2", drain_timeout_seconds=120).state)
        )
        unloader.start()
        deadline = time.monotonic() + 10
        while client.get_model("smollm2").state != "unloading" and time.monotonic() < deadline:
            time.sleep(0.01)
        if runner.is_alive():
            with pytest.raises(UnavailableError, match="being unloaded"):
                client.complete("Hi", max_tokens=2)
        runner.join(120)
        unloader.join(120)
        assert finished == ["length"], "the running generation must complete, not be cut"
        assert unload_result == ["unloaded"]
        assert client.load_model("smollm2").state == "ready"
        assert client.complete("Hi", max_tokens=2).text
