"""Fixtures shared by every test layer: the repository's catalog and source resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from wafer.sources import SourceResolver
from wafer.specs import Catalog, ModelSpec

ROOT = Path(__file__).resolve().parent.parent
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
