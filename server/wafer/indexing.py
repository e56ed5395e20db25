"""The Index service's logic: embed documents into a collection, and search it.

A collection is bound to the embedding model that created it: vectors of two models are not
comparable, so writing with another model is refused and searches embed the query with the
collection's own model. Store calls run on one dedicated thread: the embedded Qdrant client is
not meant to be entered concurrently, and it must not block the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from wafer.domain import (
    EmbedRequest,
    InputType,
    Priority,
    StoredDocument,
    Timings,
    Usage,
)
from wafer.engine import InferenceEngine
from wafer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from wafer.store.base import CollectionInfo, VectorStore

T = TypeVar("T")

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DEFAULT_TOP_K = 10
MAX_TOP_K = 1000


@dataclass(frozen=True, slots=True)
class UpsertResult:
    model: str
    ids: list[str]
    usage: Usage
    timings: Timings


@dataclass(frozen=True, slots=True)
class SearchResult:
    model: str
    documents: list[StoredDocument]
    usage: Usage
    timings: Timings


def derived_id(text: str) -> str:
    """The id of a document given without one: its content, so re-sending it never duplicates."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _check_collection_name(name: str) -> None:
    if not COLLECTION_NAME.match(name):
        raise InvalidArgumentError(
            f"collection name {name!r} must be 1-128 characters of letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )


class IndexService:
    def __init__(self, engine: InferenceEngine, store: VectorStore) -> None:
        self._engine = engine
        self._store = store
        # One thread, in order: the embedded Qdrant client is not meant to be entered concurrently.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wafer-store")

    async def upsert(
        self,
        collection: str,
        documents: Sequence[StoredDocument],
        *,
        model: str = "",
        truncate: bool = False,
        priority: Priority = Priority.INTERACTIVE,
    ) -> UpsertResult:
        _check_collection_name(collection)
        if not documents:
            raise InvalidArgumentError("documents must not be empty")
        existing = await self._find(collection)
        if existing is not None:
            if model and model != existing.model:
                raise FailedPreconditionError(
                    f"collection {collection!r} holds {existing.model!r} vectors; "
                    f"it cannot take {model!r} vectors (use another collection)"
                )
            model = existing.model
        documents = [StoredDocument(id=d.id or derived_id(d.text), text=d.text, payload=d.payload) for d in documents]
        ids = [d.id for d in documents]
        if len(set(ids)) != len(ids):
            raise InvalidArgumentError("document ids must be unique within one request")
        embedded = await self._engine.embed(
            EmbedRequest(
                inputs=[d.text for d in documents],
                model=model,
                input_type=InputType.DOCUMENT,
                truncate=truncate,
                normalize=True,
                priority=priority,
            )
        )
        dimensions = int(embedded.vectors.shape[1])
        written = time.perf_counter()

        def write() -> None:
            self._store.ensure_collection(collection, dimensions=dimensions, model=embedded.model)
            self._store.upsert(collection, documents, embedded.vectors)

        await self._in_store_thread(write)
        timings = embedded.timings
        timings.inference_ms += (time.perf_counter() - written) * 1000.0
        return UpsertResult(model=embedded.model, ids=ids, usage=embedded.usage, timings=timings)

    async def search(
        self,
        collection: str,
        query: str,
        *,
        top_k: int = 0,
        filter: dict[str, Any] | None = None,
        with_vectors: bool = False,
    ) -> SearchResult:
        _check_collection_name(collection)
        top_k = top_k or DEFAULT_TOP_K
        if top_k > MAX_TOP_K:
            raise InvalidArgumentError(f"top_k must be at most {MAX_TOP_K}")
        info = await self._in_store_thread(lambda: self._store.collection(collection))
        embedded = await self._engine.embed(
            EmbedRequest(inputs=[query], model=info.model, input_type=InputType.QUERY, truncate=True, normalize=True)
        )
        vector = np.asarray(embedded.vectors[0], dtype=np.float32)
        started = time.perf_counter()
        found = await self._in_store_thread(
            lambda: self._store.search(collection, vector, top_k=top_k, filter=filter, with_vectors=with_vectors)
        )
        timings = embedded.timings
        timings.inference_ms += (time.perf_counter() - started) * 1000.0
        return SearchResult(model=embedded.model, documents=found, usage=embedded.usage, timings=timings)

    async def get_documents(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[StoredDocument]:
        _check_collection_name(collection)
        if not ids:
            raise InvalidArgumentError("ids must not be empty")
        wanted = list(ids)
        return await self._in_store_thread(lambda: self._store.retrieve(collection, wanted, with_vectors=with_vectors))

    async def delete_documents(self, collection: str, ids: Sequence[str]) -> None:
        _check_collection_name(collection)
        if not ids:
            raise InvalidArgumentError("ids must not be empty")
        await self._in_store_thread(lambda: self._store.delete(collection, list(ids)))

    async def list_collections(self) -> list[CollectionInfo]:
        return await self._in_store_thread(self._store.list_collections)

    async def close(self) -> None:
        await self._in_store_thread(self._store.close)
        self._thread.shutdown(wait=True)

    async def _in_store_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def _find(self, collection: str) -> CollectionInfo | None:
        try:
            return await self._in_store_thread(lambda: self._store.collection(collection))
        except NotFoundError:
            return None
