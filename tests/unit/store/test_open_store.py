"""The store setting: which engine `open_store` opens, and where."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from wafer.config import Settings
from wafer.store import open_store
from wafer.store.edge import EdgeStore
from wafer.store.qdrant import QdrantStore


def test_edge_is_the_default_and_lives_in_its_own_folder(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    store = open_store(settings)
    try:
        assert isinstance(store, EdgeStore)
        store.ensure_collection("c", dimensions=2, model="m")
        assert (tmp_path / "edge" / "c" / "collection.json").is_file()
    finally:
        store.close()


def test_local_mode_keeps_the_qdrant_folder(tmp_path: Path) -> None:
    store = open_store(Settings(data_dir=tmp_path, store="local"))
    try:
        assert isinstance(store, QdrantStore)
        assert (tmp_path / "qdrant").is_dir()
    finally:
        store.close()


# Nothing listens there: qdrant-client warns (on a thread of its own) that it cannot ask the version.
@pytest.mark.filterwarnings("ignore:Failed to obtain server version")
def test_a_server_store_needs_its_url() -> None:
    with pytest.raises(ValidationError, match="qdrant_url"):
        Settings(store="url")
    settings = Settings(store="url", qdrant_url="http://127.0.0.1:9")
    store = open_store(settings)
    assert isinstance(store, QdrantStore)
    store.close()
