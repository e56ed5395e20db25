"""Metrics move with the work: engine calls, RPCs through the interceptor, the registry's models."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import wafer_client
from tests.fakes.fake_backend import FakeBackend
from tests.unit.conftest import fake_catalog
from wafer.app import engine_limits, serve_metrics
from wafer.config import Settings
from wafer.domain import EmbedRequest, GenerateRequest, RerankRequest, SamplingParams
from wafer.engine import InferenceEngine
from wafer.errors import InvalidArgumentError
from wafer.metrics import Metrics, parse_address
from wafer.registry import ModelRegistry, ModelState
from wafer.rpc.interceptor import RequestInterceptor
from wafer.rpc.servicers import InferenceServicer
from wafer.sources import SourceResolver
from wafer_client import AsyncWaferClient
from wafer_proto.v1 import inference_pb2_grpc

EMBED = "/wafer.v1.Inference/Embed"
GENERATE = "/wafer.v1.Inference/Generate"


@pytest.fixture
def metrics(tmp_path: Path) -> Metrics:
    return Metrics(models=fake_catalog(tmp_path).models)


def watched_registry(tmp_path: Path, metrics: Metrics, **options: Any) -> ModelRegistry:
    """A registry of the fake catalog whose models these metrics report."""
    catalog = fake_catalog(tmp_path)
    registry = ModelRegistry(
        catalog,
        SourceResolver(catalog.base_dir, tmp_path / "hub"),
        {"fake": FakeBackend},
        threads=1,
        drain_timeout_seconds=5,
        **options,
    )
    metrics.watch(registry)
    return registry


@pytest.fixture
async def registry(tmp_path: Path, open_gate: None, metrics: Metrics) -> AsyncIterator[ModelRegistry]:
    """The registry of conftest.py, telling these metrics about every backend call."""
    registry = watched_registry(tmp_path, metrics, batch_observer=metrics)
    yield registry
    FakeBackend.gate.set()
    await registry.close()


@pytest.fixture
def measured(registry: ModelRegistry, settings: Settings, metrics: Metrics) -> InferenceEngine:
    return InferenceEngine(registry, engine_limits(settings), metrics)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series that does not exist yet."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def eventually(check: Callable[[], bool]) -> None:
    """Poll: the values change on worker threads, which have no event to wait on."""
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 5 s")


# -- engine ------------------------------------------------------------------------------------


async def test_embed_counts_a_batch_and_its_tokens(measured: InferenceEngine, metrics: Metrics) -> None:
    result = await measured.embed(EmbedRequest(inputs=["one two", "three"]))
    labels = {"model": "embedder", "task": "embed"}
    assert value(metrics, "wafer_prompt_tokens_total", **labels) == result.usage.prompt_tokens > 0
    assert value(metrics, "wafer_batch_size_count", **labels) == 1
    assert value(metrics, "wafer_batch_size_sum", **labels) == 2
    assert value(metrics, "wafer_batch_size_bucket", le="2.0", **labels) == 1
    assert value(metrics, "wafer_batch_size_bucket", le="1.0", **labels) == 0
    assert value(metrics, "wafer_batch_tokens_sum", **labels) == result.usage.prompt_tokens

    await measured.embed(EmbedRequest(inputs=["four"]))
    assert value(metrics, "wafer_batch_size_count", **labels) == 2
    assert value(metrics, "wafer_batch_size_sum", **labels) == 3


async def test_failed_embed_counts_no_tokens(measured: InferenceEngine, metrics: Metrics) -> None:
    with pytest.raises(InvalidArgumentError):
        await measured.embed(EmbedRequest(inputs=["w " * 20]))  # over the window, truncate off
    assert value(metrics, "wafer_batch_size_count", model="embedder", task="embed") == 0
    assert value(metrics, "wafer_prompt_tokens_total", model="embedder", task="embed") == 0


async def test_rerank_batches_carry_the_task(measured: InferenceEngine, metrics: Metrics) -> None:
    # Cosine: the query is embedded with the documents, in one backend call.
    await measured.rerank(RerankRequest(query="q", documents=["a", "b", "c"]))
    assert value(metrics, "wafer_batch_size_sum", model="embedder", task="rerank") == 4
    # LLM relevance: one scored pair per document.
    result = await measured.rerank(RerankRequest(query="red apple", documents=["apple", "sky"], model="writer"))
    assert value(metrics, "wafer_batch_size_sum", model="writer", task="rerank") == 2
    tokens = value(metrics, "wafer_prompt_tokens_total", model="writer", task="rerank")
    assert tokens == result.usage.prompt_tokens > 0
    assert value(metrics, "wafer_batch_size_count", model="embedder", task="embed") == 0


async def test_generate_counts_prompt_and_generated_tokens(measured: InferenceEngine, metrics: Metrics) -> None:
    request = GenerateRequest(prompt="one two three four", sampling=SamplingParams(max_tokens=3))
    chunks = [chunk async for chunk in measured.generate(request)]
    usage = chunks[-1].usage
    assert usage is not None
    assert value(metrics, "wafer_generated_tokens_total", model="writer") == usage.completion_tokens == 3
    assert value(metrics, "wafer_prompt_tokens_total", model="writer", task="generate") == usage.prompt_tokens == 4


async def test_an_engine_without_metrics_still_works(engine: InferenceEngine) -> None:
    result = await engine.embed(EmbedRequest(inputs=["plain"]))
    assert result.vectors.shape[0] == 1


# -- registry gauges ---------------------------------------------------------------------------


async def test_model_state_follows_load_unload_and_failure(registry: ModelRegistry, metrics: Metrics) -> None:
    def state(model: str) -> set[str]:
        return {s.value for s in ModelState if value(metrics, "wafer_model_state", model=model, state=s.value) == 1}

    assert state("lazy") == {"unloaded"}
    assert value(metrics, "wafer_model_memory_bytes", model="lazy") == 0

    await registry.load("lazy")
    assert state("lazy") == {"ready"}
    assert value(metrics, "wafer_model_load_seconds", model="lazy") > 0

    await registry.unload("lazy")
    assert state("lazy") == {"unloaded"}
    assert value(metrics, "wafer_model_memory_bytes", model="lazy") == 0

    with pytest.raises(Exception, match="failed to load"):
        await registry.load("broken")
    assert state("broken") == {"failed"}
    # Every catalog model is reported, loaded or not.
    assert state("future") == {"unloaded"}


async def test_memory_in_use_is_what_the_loaded_models_hold(registry: ModelRegistry, metrics: Metrics) -> None:
    assert value(metrics, "wafer_memory_in_use_bytes") == 0
    # This registry has no budget: the budget gauge is absent, not a budget of 0.
    assert metrics.registry.get_sample_value("wafer_memory_budget_bytes", {}) is None

    await registry.load("lazy")
    held = value(metrics, "wafer_model_memory_bytes", model="lazy")
    assert value(metrics, "wafer_memory_in_use_bytes") == held == registry.memory_in_use()

    await registry.unload("lazy")
    assert value(metrics, "wafer_memory_in_use_bytes") == 0


async def test_the_memory_budget_is_reported_when_there_is_one(tmp_path: Path, metrics: Metrics) -> None:
    budget = 512 * 2**20
    registry = watched_registry(tmp_path, metrics, memory_budget_bytes=budget)
    try:
        assert value(metrics, "wafer_memory_budget_bytes") == budget
    finally:
        await registry.close()


async def test_in_flight_and_queue_depth_follow_held_calls(
    registry: ModelRegistry, measured: InferenceEngine, metrics: Metrics
) -> None:
    await registry.load("embedder")
    await registry.load("writer")
    FakeBackend.gate.clear()  # the first call computes and stays inside the backend
    first = asyncio.create_task(measured.embed(EmbedRequest(inputs=["first"])))
    await eventually(lambda: value(metrics, "wafer_requests_in_flight", model="embedder") == 1)
    assert value(metrics, "wafer_queue_depth", model="embedder", lane="interactive") == 0

    # Same model: waits for the model's worker thread. Other model: waits for a turn of the gate.
    second = asyncio.create_task(measured.embed(EmbedRequest(inputs=["second"])))
    third = asyncio.create_task(measured.rerank(RerankRequest(query="q", documents=["d"], model="writer")))
    await eventually(lambda: value(metrics, "wafer_queue_depth", model="embedder", lane="interactive") == 1)
    await eventually(lambda: value(metrics, "wafer_queue_depth", model="writer", lane="interactive") == 1)
    assert value(metrics, "wafer_requests_in_flight", model="embedder") == 2
    assert value(metrics, "wafer_requests_in_flight", model="writer") == 1

    FakeBackend.gate.set()
    await asyncio.gather(first, second, third)
    for model in ("embedder", "writer"):
        assert value(metrics, "wafer_requests_in_flight", model=model) == 0
        assert value(metrics, "wafer_queue_depth", model=model, lane="interactive") == 0


async def test_a_call_cancelled_while_queued_leaves_the_queue(
    registry: ModelRegistry, measured: InferenceEngine, metrics: Metrics
) -> None:
    await registry.load("embedder")
    FakeBackend.gate.clear()
    first = asyncio.create_task(measured.embed(EmbedRequest(inputs=["first"])))
    await eventually(lambda: value(metrics, "wafer_requests_in_flight", model="embedder") == 1)
    queued = asyncio.create_task(measured.embed(EmbedRequest(inputs=["queued"])))
    await eventually(lambda: value(metrics, "wafer_queue_depth", model="embedder", lane="interactive") == 1)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert value(metrics, "wafer_queue_depth", model="embedder", lane="interactive") == 0
    FakeBackend.gate.set()
    await first


# -- RPCs through the interceptor --------------------------------------------------------------


@pytest.fixture
async def client(measured: InferenceEngine, settings: Settings, metrics: Metrics) -> AsyncIterator[AsyncWaferClient]:
    """The Inference service alone, behind the real interceptor, on a free port of this loop."""
    server = grpc.aio.server(interceptors=[RequestInterceptor(metrics)])
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceServicer(measured, default_max_new_tokens=settings.default_max_new_tokens), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with AsyncWaferClient(f"127.0.0.1:{port}", timeout=10, retries=0) as client:
        yield client
    await server.stop(0)


async def test_rpcs_count_by_method_model_and_code(client: AsyncWaferClient, metrics: Metrics) -> None:
    await client.embed(["hello"])
    await client.embed(["hello"], model="embedder")
    with pytest.raises(wafer_client.InvalidArgumentError):
        await client.embed([""])
    with pytest.raises(wafer_client.NotFoundError):
        await client.embed(["x"], model="made-up-model")
    await client.complete("a b c", max_tokens=2)

    # An aborted call is recorded just after its status leaves; the calls after it leave time enough.
    await eventually(lambda: value(metrics, "wafer_requests_total", method=EMBED, model="", code="NOT_FOUND") == 1)
    assert value(metrics, "wafer_requests_total", method=EMBED, model="embedder", code="OK") == 2
    # Failures before a model answered carry the requested name only if the catalog knows it.
    assert value(metrics, "wafer_requests_total", method=EMBED, model="", code="INVALID_ARGUMENT") == 1
    assert value(metrics, "wafer_requests_total", method=EMBED, model="", code="NOT_FOUND") == 1
    assert value(metrics, "wafer_requests_total", method=GENERATE, model="writer", code="OK") == 1

    # Queue and inference times come from successful responses; total time from every call.
    assert value(metrics, "wafer_request_duration_seconds_count", method=EMBED, model="embedder") == 2
    assert value(metrics, "wafer_request_duration_seconds_count", method=EMBED, model="") == 2
    assert value(metrics, "wafer_request_queue_seconds_count", method=EMBED, model="embedder") == 2
    assert value(metrics, "wafer_request_inference_seconds_count", method=EMBED, model="embedder") == 2
    assert value(metrics, "wafer_request_inference_seconds_sum", method=EMBED, model="embedder") > 0
    assert value(metrics, "wafer_request_queue_seconds_count", method=EMBED, model="") == 0
    assert value(metrics, "wafer_request_inference_seconds_count", method=GENERATE, model="writer") == 1
    labels = [sample.labels for family in metrics.registry.collect() for sample in family.samples]
    assert not any("made-up-model" in label.values() for label in labels)


# -- exposition --------------------------------------------------------------------------------


async def test_metrics_are_served_over_http(measured: InferenceEngine, metrics: Metrics) -> None:
    await measured.embed(EmbedRequest(inputs=["served"]))
    server = metrics.serve("127.0.0.1:0")
    try:
        assert server.port > 0
        assert server.address == f"127.0.0.1:{server.port}"
        url = f"http://{server.address}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    finally:
        server.stop()
    families = {family.name: family for family in text_string_to_metric_families(body)}
    assert {"wafer_requests", "wafer_prompt_tokens", "wafer_batch_size", "wafer_model_state"} <= set(families)
    tokens = [s for s in families["wafer_prompt_tokens"].samples if s.name == "wafer_prompt_tokens_total"]
    assert [s.labels for s in tokens] == [{"model": "embedder", "task": "embed"}]


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.record_call(EMBED, "m", "OK", 0.01)
    assert first.registry.get_sample_value("wafer_requests_total", {"method": EMBED, "model": "m", "code": "OK"}) == 1
    assert (
        second.registry.get_sample_value("wafer_requests_total", {"method": EMBED, "model": "m", "code": "OK"}) is None
    )


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("localhost:0", ("localhost", 0)), ("[::1]:9464", ("::1", 9464))],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9464", ":9464", "host:", "host:port", "host:70000", "unix:///tmp/m.sock"])
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_address(address)
    # The server reports it as the configuration mistake it is.
    with pytest.raises(InvalidArgumentError, match="host:port"):
        serve_metrics(Metrics(), address)


def test_a_busy_port_is_a_clear_error() -> None:
    metrics = Metrics()
    running = metrics.serve("127.0.0.1:0")
    try:
        with pytest.raises(InvalidArgumentError, match="cannot serve metrics"):
            serve_metrics(Metrics(), running.address)
    finally:
        running.stop()


def test_unknown_model_names_do_not_become_labels() -> None:
    metrics = Metrics(models=["known"])
    assert metrics.model_label("known") == "known"
    assert metrics.model_label("anything else") == ""
    assert Metrics().model_label("anything") == "anything"  # no catalog: tests record freely


def test_repeated_calls_add_to_the_same_series_and_report_only_what_they_measured() -> None:
    """Each call's series are resolved once per method, model and code and then reused: repeated
    calls add up, a call without queue or inference times makes no series for them, and a later
    call that has them makes them then."""
    metrics = Metrics(models=["m"])
    labels = {"method": EMBED, "model": "m"}
    for _ in range(3):
        metrics.record_call(EMBED, "m", "OK", 0.01)
    assert metrics.registry.get_sample_value("wafer_requests_total", {**labels, "code": "OK"}) == 3
    assert metrics.registry.get_sample_value("wafer_request_duration_seconds_count", labels) == 3
    assert metrics.registry.get_sample_value("wafer_request_queue_seconds_count", labels) is None
    metrics.record_call(EMBED, "m", "OK", 0.02, queue_seconds=0.001, inference_seconds=0.005)
    metrics.record_call(EMBED, "unknown", "NOT_FOUND", 0.001)
    assert metrics.registry.get_sample_value("wafer_requests_total", {**labels, "code": "OK"}) == 4
    assert metrics.registry.get_sample_value("wafer_request_queue_seconds_count", labels) == 1
    assert metrics.registry.get_sample_value("wafer_request_inference_seconds_sum", labels) == 0.005
    assert metrics.registry.get_sample_value("wafer_request_inference_seconds_count", {**labels, "model": ""}) is None
    assert (
        metrics.registry.get_sample_value("wafer_requests_total", {"method": EMBED, "model": "", "code": "NOT_FOUND"})
        == 1
    )
