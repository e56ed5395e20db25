"""An engine over a registry of GGUF models, as the integration tests of decoder embeddings build it."""

from __future__ import annotations

from pathlib import Path

from wafer.app import engine_limits
from wafer.backends.gguf import GgufBackend
from wafer.config import Settings
from wafer.engine import InferenceEngine
from wafer.registry import ModelRegistry
from wafer.sources import SourceResolver
from wafer.specs import Catalog


def gguf_engine(
    catalog: Catalog, tmp_path: Path, *, hub: str = "hub", hub_endpoint: str | None = None
) -> tuple[ModelRegistry, InferenceEngine]:
    """`catalog`'s models on the GGUF backend, one thread each, their Hub cache and data under
    `tmp_path`; the caller closes the registry."""
    registry = ModelRegistry(
        catalog,
        SourceResolver(catalog.base_dir, tmp_path / hub, hub_endpoint=hub_endpoint),
        {"gguf": GgufBackend},
        threads=1,
        drain_timeout_seconds=5,
    )
    return registry, InferenceEngine(registry, engine_limits(Settings(data_dir=tmp_path / "data")))
