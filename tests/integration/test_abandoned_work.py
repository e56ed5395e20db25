"""Work whose caller has gone stops (issue 13): a pooled long input between backend calls and
inside one (ONNX), an LLM rerank between documents and inside one (llama.cpp's abort callback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import MODELS_YAML, loaded
from wafer.app import engine_limits
from wafer.backends import available_backends
from wafer.config import Settings
from wafer.domain import EmbedRequest, Priority, RerankRequest
from wafer.engine import InferenceEngine
from wafer.registry import ModelRegistry
from wafer.sources import SourceResolver
from wafer.specs import Catalog, Task

pytestmark = pytest.mark.integration

LONG_DOCUMENT = " ".join(f"word{i % 97} of a long document about nothing" for i in range(300))


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[InferenceEngine]:
    catalog = Catalog.from_yaml(MODELS_YAML)
    settings = Settings(data_dir=tmp_path / "data", threads=2)
    registry = ModelRegistry(
        catalog,
        SourceResolver(catalog.base_dir, settings.hub_cache_dir),
        available_backends(),
        threads=settings.threads,
        drain_timeout_seconds=30,
    )
    yield InferenceEngine(registry, engine_limits(settings))
    await registry.close()


async def idle_within(engine: InferenceEngine, model: str, seconds: float) -> float:
    """How long a one-text Embed on `model` takes now."""
    started = time.monotonic()
    await asyncio.wait_for(engine.embed(EmbedRequest(inputs=["ping"], model=model)), seconds)
    return time.monotonic() - started


async def test_an_abandoned_pooled_embed_stops_inside_its_backend_call(engine: InferenceEngine) -> None:
    await engine.embed(EmbedRequest(inputs=["warm up"], model="minilm"))
    async with engine.registry.lease("minilm", Task.EMBED):
        scheduler = loaded(engine.registry, "minilm").scheduler
    # About 230 windows of 256 tokens in one request: seconds of ONNX work, after a quick split.
    call = asyncio.ensure_future(
        engine.embed(EmbedRequest(inputs=[LONG_DOCUMENT * 20], model="minilm", pool_chunks=True))
    )
    for _ in range(6000):  # until it is split and its windows are queued
        if scheduler.waiting(Priority.INTERACTIVE):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    assert not call.done()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # The running backend call was interrupted (not finished and thrown away).
    for _ in range(100):
        if scheduler.interrupted:
            break
        await asyncio.sleep(0.05)
    assert scheduler.interrupted >= 1
    assert await idle_within(engine, "minilm", 10) < 1.0


async def test_an_abandoned_llm_rerank_stops_within_a_document(engine: InferenceEngine) -> None:
    await engine.embed(EmbedRequest(inputs=["warm up"], model="minilm"))
    await engine.rerank(RerankRequest(query="warm", documents=["up"], model="smollm2"))
    request = RerankRequest(query="what is it about?", documents=[LONG_DOCUMENT] * 40, model="smollm2", truncate=True)
    call = asyncio.ensure_future(engine.rerank(request))
    await asyncio.sleep(3)
    assert not call.done()
    started = time.monotonic()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # The cancel returns once the model's thread let go of the call: llama.cpp stopped mid-decode.
    assert time.monotonic() - started < 2.0
    assert await idle_within(engine, "minilm", 10) < 1.0
