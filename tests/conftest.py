"""Fixtures shared by every test layer: the repository's catalog and source resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from wafer.registry import LoadedModel, ModelRegistry
from wafer.sources import SourceResolver
from wafer.specs import Catalog, ModelSpec

ROOT = Path(__file__).resolve().parent.parent


def loaded(registry: ModelRegistry, name: str) -> LoadedModel:
    """The registry's own record of a ready model: its backend instances and scheduler, which a
    lease's handle does not hand out (for tests that compare against the backend itself)."""
    instance = registry._entries[name].current
    assert instance is not None, f"model {name!r} is not loaded"
    return instance.loaded


MODELS_YAML = ROOT / "models.yaml"


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.from_yaml(MODELS_YAML)


@pytest.fixture(scope="session")
def resolver(catalog: Catalog, tmp_path_factory: pytest.TempPathFactory) -> SourceResolver:
    return SourceResolver(catalog.base_dir, tmp_path_factory.mktemp("hub-cache"))


@pytest.fixture(scope="session")
def minilm_spec(catalog: Catalog) -> ModelSpec:
    return catalog.models["minilm"]


@pytest.fixture(scope="session")
def smollm2_spec(catalog: Catalog) -> ModelSpec:
    return catalog.models["smollm2"]
