"""The vector store contract: collections of documents with one vector each, bound to one model.

Synchronous on purpose: the embedded Qdrant client does blocking file I/O, so callers run every
store call off the event loop (on one worker thread) anyway.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from wafer.domain import StoredDocument

FloatVector = NDArray[np.float32]
FloatMatrix = NDArray[np.float32]
# What an exact-match filter may compare a payload field with.
FilterValue = str | int | bool | float
PayloadFilter = dict[str, FilterValue]

# A fixed namespace: point ids must come out the same in every process and every release, or
# re-running a job would write duplicates next to the old points instead of replacing them.
POINT_ID_NAMESPACE = uuid.UUID("6f1a2b3c-4d5e-5f60-8a7b-9c0d1e2f3a4b")


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    name: str
    # The embedding model whose vectors the collection holds ("" if Wafer did not create it).
    model: str
    dimensions: int
    documents: int


def point_id(collection: str, document_id: str, chunk: int = 0) -> str:
    """The store's id for one chunk of one document: a UUID5, so writing a document again replaces it.

    The parts are JSON-encoded before hashing so that no choice of collection name or document id can
    make two different triples hash the same string ("a/b" + "c" vs "a" + "b/c").
    """
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0, not {chunk}")
    key = json.dumps([collection, document_id, chunk], ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(POINT_ID_NAMESPACE, key))


class VectorStore(Protocol):
    """Collections of `StoredDocument`s searchable by cosine similarity.

    Errors are Wafer's: `NotFoundError` for an unknown collection, `InvalidArgumentError` for bad input
    (wrong vector size, reserved payload keys, bad filters), `FailedPreconditionError` when a
    collection exists with another model or dimension.
    """

    def ensure_collection(self, name: str, *, dimensions: int, model: str) -> CollectionInfo:
        """Creates the collection (cosine distance) or checks that the existing one matches."""
        ...

    def collection(self, name: str) -> CollectionInfo: ...

    def list_collections(self) -> list[CollectionInfo]: ...

    def upsert(self, name: str, documents: Sequence[StoredDocument], vectors: FloatMatrix) -> None:
        """Writes documents with their vectors ([len(documents), dimensions]); same id replaces."""
        ...

    def search(
        self,
        name: str,
        vector: FloatVector,
        *,
        top_k: int,
        filter: PayloadFilter | None = None,
        with_vectors: bool = False,
    ) -> list[StoredDocument]:
        """The `top_k` nearest documents, best first, each with its cosine similarity as `score`.

        `filter`: exact-match conditions on payload fields, all of which must hold.
        """
        ...

    def retrieve(self, name: str, ids: Sequence[str], *, with_vectors: bool = False) -> list[StoredDocument]:
        """Documents by id, in request order; unknown ids are left out."""
        ...

    def delete(self, name: str, ids: Sequence[str]) -> None:
        """Deletes documents by id; unknown ids are ignored."""
        ...

    def close(self) -> None:
        """Releases the store (for the embedded store: its folder lock). Idempotent."""
        ...
