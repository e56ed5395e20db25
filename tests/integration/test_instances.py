"""A model run as several instances (`instances:` in models.yaml), on the real int8 MiniLM."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from tests.conftest import loaded
from wafer.backends import available_backends
from wafer.backends.base import Embeddings, LoadOptions, ModelFiles, Tokenized
from wafer.backends.onnx import OnnxBackend
from wafer.domain import Priority
from wafer.registry import ModelRegistry, instance_plan
from wafer.scheduler import ComputeGate, ModelScheduler
from wafer.sources import SourceResolver
from wafer.specs import Catalog, ModelSpec, Task

pytestmark = pytest.mark.integration

TEXTS = [
    "The cat sat on the mat.",
    "A medium-length sentence that talks about vector databases, embeddings and how search works.",
    "Call me at 555-0100 tomorrow!!! :)",
    "hi",
]


@pytest.fixture
def minilm_files(resolver: SourceResolver, minilm_spec: ModelSpec) -> ModelFiles:
    assert minilm_spec.tokenizer is not None
    return ModelFiles(
        weights=resolver.resolve(minilm_spec.source, model=minilm_spec.name),
        tokenizer=resolver.resolve(minilm_spec.tokenizer, model=minilm_spec.name),
    )


class Timeline:
    """When each instance's calls ran: wraps the real `embed_tokenized` of each instance."""

    def __init__(self, instances: list[OnnxBackend]) -> None:
        self.spans: list[tuple[int, float, float]] = []
        self._lock = threading.Lock()
        for index, instance in enumerate(instances):
            self._wrap(index, instance)

    def _wrap(self, index: int, instance: OnnxBackend) -> None:
        compute = instance.embed_tokenized

        def timed(tokenized: Tokenized) -> Embeddings:
            started = time.perf_counter()
            try:
                return compute(tokenized)
            finally:
                with self._lock:
                    self.spans.append((index, started, time.perf_counter()))

        instance.embed_tokenized = timed  # type: ignore[method-assign]

    def overlapped(self) -> bool:
        return any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a in self.spans for b in self.spans if a is not b)


async def test_two_instances_give_identical_vectors_and_compute_at_once(
    minilm_spec: ModelSpec, minilm_files: ModelFiles
) -> None:
    instances = OnnxBackend.load_instances(minilm_spec, minilm_files, LoadOptions(threads=1), 2)
    assert len(instances) == 2 and instances[0] is not instances[1]
    onnx_instances = [instance for instance in instances if isinstance(instance, OnnxBackend)]
    first, second = (instance.embed(TEXTS, truncate=True) for instance in onnx_instances)
    np.testing.assert_array_equal(first.vectors, second.vectors)
    assert first.token_counts == second.token_counts

    timeline = Timeline(onnx_instances)
    scheduler = ModelScheduler(minilm_spec.name, onnx_instances, ComputeGate(), max_tokens=minilm_spec.max_tokens)
    try:
        corpus = [f"{text} (copy {i})" for i in range(64) for text in TEXTS]
        # Four batch-lane requests of 64 texts: each instance takes merged batches while the other computes.
        parts = [corpus[i : i + 64] for i in range(0, len(corpus), 64)]
        results = await asyncio.gather(*(scheduler.embed(part, truncate=True, lane=Priority.BATCH) for part in parts))
    finally:
        await asyncio.to_thread(scheduler.close)
        for instance in instances:
            instance.close()
    assert {index for index, _, _ in timeline.spans} == {0, 1}
    assert timeline.overlapped()
    reference = OnnxBackend.load(minilm_spec, minilm_files, LoadOptions(threads=1))
    try:
        for part, result in zip(parts, results, strict=True):
            np.testing.assert_allclose(result.value.vectors, reference.embed(part, truncate=True).vectors, atol=1e-5)
    finally:
        reference.close()


@pytest.fixture
async def registry(catalog: Catalog, resolver: SourceResolver) -> AsyncIterator[ModelRegistry]:
    registry = ModelRegistry(catalog, resolver, available_backends(), threads=2, drain_timeout_seconds=30)
    yield registry
    await registry.close()


async def test_the_registry_loads_the_instances_a_spec_asks_for(
    registry: ModelRegistry, minilm_spec: ModelSpec
) -> None:
    spec = minilm_spec.model_copy(update={"name": "minilm-3", "instances": 3, "load": "on_demand"})
    assert instance_plan(OnnxBackend, spec, 2) == (3, 1)
    await registry.load("minilm-3", spec=spec)
    async with registry.lease("minilm-3", Task.EMBED) as handle:
        model = loaded(registry, "minilm-3")
        assert len(model.instances) == 3 and model.instances[0] is model.backend
        assert model.scheduler.instances == 3
        names = {thread.name for thread in threading.enumerate()}
        assert {"wafer-minilm-3", "wafer-minilm-3-1", "wafer-minilm-3-2"} <= names
        result = await handle.embed(TEXTS, truncate=True)
        np.testing.assert_allclose(
            result.value.vectors, model.instances[2].embed(TEXTS, truncate=True).vectors, atol=1e-5
        )
    await registry.unload("minilm-3")
    names = {thread.name for thread in threading.enumerate()}
    assert not any(name.startswith("wafer-minilm-3") for name in names)
