"""Vector stores behind one interface (Qdrant: embedded local mode or a server).

`QdrantStore` is not re-exported here: importing it loads qdrant-client (about a second), which
code that only needs the interface should not pay for. Import it from `wafer.store.qdrant`.
"""

from wafer.store.base import CollectionInfo, VectorStore, point_id

__all__ = ["CollectionInfo", "VectorStore", "point_id"]
