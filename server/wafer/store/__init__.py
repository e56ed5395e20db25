"""Vector stores behind one interface: qdrant-edge (embedded), qdrant-client local mode, a Qdrant server.

The implementations are not re-exported here: importing one loads its engine (qdrant-client takes
about a second), which code that only needs the interface should not pay for. `open_store` imports
only the one the settings pick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wafer.store.base import CollectionInfo, StoredPoint, VectorStore, point_id

if TYPE_CHECKING:
    from wafer.config import Settings

__all__ = ["CollectionInfo", "StoredPoint", "VectorStore", "open_store", "point_id"]


def open_store(settings: Settings) -> VectorStore:
    """The store `settings.store` names."""
    if settings.store == "edge":
        from wafer.store.edge import EdgeStore

        return EdgeStore(path=settings.store_dir, max_open=settings.edge_max_open_collections)
    from wafer.store.qdrant import QdrantStore

    if settings.store == "url":
        key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        return QdrantStore(url=settings.qdrant_url, api_key=key)
    return QdrantStore(path=settings.store_dir)
