"""Unit-test fixtures: a catalog of fake models behind the real registry and engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.fakes.fake_backend import FakeBackend
from wafer.app import engine_limits
from wafer.config import Settings
from wafer.engine import InferenceEngine
from wafer.registry import ModelRegistry, ModelState
from wafer.sources import SourceResolver
from wafer.specs import Catalog


async def startup_settled(registry: ModelRegistry) -> None:
    """Wait until no model is loading: the startup models have loaded, or failed to."""
    changed = asyncio.Event()
    registry.subscribe(changed.set)
    while True:
        changed.clear()
        if not any(status.state is ModelState.LOADING for status in registry.statuses()):
            return
        await changed.wait()


def fake_catalog(folder: Path) -> Catalog:
    (folder / "fake.bin").write_bytes(b"weights")
    (folder / "broken.bin").write_bytes(b"broken weights")
    return Catalog.model_validate(
        {
            "base_dir": folder,
            "defaults": {"embed": "embedder", "generate": "writer"},
            "models": {
                "embedder": {
                    "backend": "fake",
                    "source": "fake.bin",
                    "tasks": ["embed", "rerank"],
                    "dimensions": 16,
                    "matryoshka_dimensions": [8, 16],
                    "max_tokens": 12,
                    "query_prompt": "query: ",
                    "load": "startup",
                },
                "writer": {
                    "backend": "fake",
                    "source": "fake.bin",
                    "tasks": ["generate", "rerank"],
                    "load": "startup",
                },
                "lazy": {"backend": "fake", "source": "fake.bin", "tasks": ["embed"], "dimensions": 4},
                "broken": {"backend": "fake", "source": "broken.bin", "tasks": ["embed"], "dimensions": 4},
                "missing": {"backend": "fake", "source": "nope.bin", "tasks": ["embed"], "dimensions": 4},
                "future": {
                    "backend": "cde",
                    "source": "fake.bin",
                    "tasks": ["embed"],
                    "dimensions": 4,
                    "requires": "needs the two-stage backend",
                },
            },
        }
    )


@pytest.fixture
def open_gate() -> Iterator[None]:
    FakeBackend.gate.set()
    yield
    FakeBackend.gate.set()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_inputs_per_request=100, max_input_bytes=10_000)


@pytest.fixture
async def registry(tmp_path: Path, open_gate: None) -> AsyncIterator[ModelRegistry]:
    catalog = fake_catalog(tmp_path)
    registry = ModelRegistry(
        catalog,
        SourceResolver(catalog.base_dir, tmp_path / "hub"),
        {"fake": FakeBackend},
        threads=1,
        drain_timeout_seconds=5,
    )
    yield registry
    FakeBackend.gate.set()
    await registry.close()


@pytest.fixture
def engine(registry: ModelRegistry, settings: Settings) -> InferenceEngine:
    return InferenceEngine(registry, engine_limits(settings))
