"""The Index service's logic: chunk and embed documents into a collection, and search it.

A collection is bound to the embedding model that created it: vectors of two models are not
comparable, so writing with another model is refused and searches embed the query with the
collection's own model. Store calls run on one dedicated thread: the embedded Qdrant client is
not meant to be entered concurrently, and it must not block the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

import numpy as np
import structlog

from wafer.contexts import ContextStore, StoredContext
from wafer.domain import (
    Context,
    EmbedRequest,
    FloatMatrix,
    InputType,
    Priority,
    RerankRequest,
    StoredDocument,
    Timings,
    Usage,
)
from wafer.engine import InferenceEngine
from wafer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from wafer.serial import SerialExecutor
from wafer.specs import Task
from wafer.store.base import (
    CollectionInfo,
    FloatVector,
    StoredPoint,
    VectorStore,
    check_collection_name,
    user_payload,
)

T = TypeVar("T")

log = structlog.get_logger("wafer.indexing")

DEFAULT_TOP_K = 10
# A document's payload as JSON: every search and GetDocuments returns it.
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
MAX_TOP_K = 1000
DEFAULT_RERANK_TOP_N = 20
# Chunks one search may read while looking for top_k distinct documents.
MAX_CHUNKS_SEARCHED = 4 * MAX_TOP_K


@dataclass(frozen=True, slots=True)
class UpsertResult:
    model: str
    ids: list[str]
    usage: Usage
    timings: Timings
    # Vectors written (one per chunk) and how many of them the embedding cache supplied.
    chunks: int = 0
    cached: int = 0


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One document found: its whole text and payload, and the chunk that matched best."""

    document: StoredDocument
    # Cosine similarity of the query to the best chunk.
    score: float
    rerank_score: float | None
    chunk: int
    chunks: int
    start: int
    end: int
    vector: list[float] | None = None


@dataclass(frozen=True, slots=True)
class SearchResult:
    model: str
    hits: list[SearchHit]
    usage: Usage
    timings: Timings
    rerank_model: str = ""


def derived_id(text: str) -> str:
    """The id of a document given without one: its content, so re-sending it never duplicates."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class IndexService:
    def __init__(
        self,
        engine: InferenceEngine,
        store: VectorStore,
        contexts: ContextStore | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self._engine = engine
        self._store = store
        self._max_payload_bytes = max_payload_bytes
        # Contexts of collections indexed with contextual models (cde), one per collection.
        self._contexts = contexts
        # Held while a new collection's context is built, so two first upserts agree on one.
        self._context_locks: dict[str, asyncio.Lock] = {}
        # One thread, in order: the embedded Qdrant client is not meant to be entered concurrently.
        self._thread = SerialExecutor("wafer-store")
        # Collection -> model. A collection's model never changes, so searches need not ask the
        # store (which counts documents to describe a collection) every time.
        self._models: dict[str, str] = {}

    async def upsert(
        self,
        collection: str,
        documents: Sequence[StoredDocument],
        *,
        model: str = "",
        truncate: bool = False,
        priority: Priority = Priority.INTERACTIVE,
        context_sample: Sequence[str] = (),
    ) -> UpsertResult:
        """Chunks, embeds and writes documents. `truncate`: embed only the first window of a long
        document instead of chunking it. With a contextual model, a new collection's context is
        built from `context_sample` (a job's sample of its source) or else from these documents."""
        check_collection_name(collection)
        if not documents:
            raise InvalidArgumentError("documents must not be empty")
        existing = await self._model_of(collection)
        if existing is not None:
            if model and model != existing:
                raise FailedPreconditionError(
                    f"collection {collection!r} holds {existing!r} vectors; "
                    f"it cannot take {model!r} vectors (use another collection)"
                )
            model = existing
        documents = [StoredDocument(id=d.id or derived_id(d.text), text=d.text, payload=d.payload) for d in documents]
        ids = [d.id for d in documents]
        if len(set(ids)) != len(ids):
            raise InvalidArgumentError("document ids must be unique within one request")
        # Payloads are checked before anything is embedded or created: a refused upsert to a new
        # collection leaves no collection behind.
        for document in documents:
            self._check_payload(document)
        texts = [d.text for d in documents]
        # Documents, not chunks, count against the request limit: chunks are embedded in batches.
        self._engine.check_texts(texts, what="documents")
        started = time.perf_counter()
        if truncate:
            model = model or self._engine.registry.resolve("", Task.EMBED).name
            spans = [[(0, len(t))] for t in texts]
        else:
            model, spans = await self._engine.split(model, texts, input_type=InputType.DOCUMENT, priority=priority)
        context = await self._context_for_upsert(
            collection, model, existing is not None, context_sample or texts, priority=priority
        )
        points: list[StoredPoint] = []
        chunk_texts: list[str] = []
        for document, doc_spans in zip(documents, spans, strict=True):
            for i, (start, end) in enumerate(doc_spans):
                text = document.text if i == 0 else ""
                points.append(StoredPoint(document.id, text, document.payload, i, len(doc_spans), start, end))
                chunk_texts.append(document.text[start:end])
        vectors: list[FloatMatrix] = []
        prompt_tokens = cached = 0
        queue_ms = 0.0
        limit = self._engine.max_inputs_per_request
        for first in range(0, len(chunk_texts), limit):
            embedded = await self._engine.embed(
                EmbedRequest(
                    inputs=chunk_texts[first : first + limit],
                    model=model,
                    input_type=InputType.DOCUMENT,
                    # Every chunk fits the window (the split counted its tokens, prompt included);
                    # truncation only absorbs a token of rounding where pieces join differently.
                    truncate=True,
                    normalize=True,
                    priority=priority,
                    context=context,
                )
            )
            vectors.append(embedded.vectors)
            prompt_tokens += embedded.usage.prompt_tokens
            cached += embedded.cached
            queue_ms += embedded.timings.queue_ms
        matrix = np.concatenate(vectors)
        dimensions = int(matrix.shape[1])

        def write() -> None:
            self._store.ensure_collection(collection, dimensions=dimensions, model=model)
            self._store.upsert(collection, points, matrix)

        await self._in_store_thread(write)
        self._models[collection] = model
        timings = Timings(
            queue_ms=queue_ms,
            inference_ms=(time.perf_counter() - started) * 1000.0 - queue_ms,
            batch_size=len(points) - cached,
        )
        return UpsertResult(
            model=model,
            ids=ids,
            usage=Usage(prompt_tokens=prompt_tokens),
            timings=timings,
            chunks=len(points),
            cached=cached,
        )

    async def search(
        self,
        collection: str,
        query: str,
        *,
        top_k: int = 0,
        filter: dict[str, Any] | None = None,
        with_vectors: bool = False,
        rerank_model: str = "",
        rerank_top_n: int = 0,
    ) -> SearchResult:
        check_collection_name(collection)
        top_k = top_k or DEFAULT_TOP_K
        if top_k > MAX_TOP_K:
            raise InvalidArgumentError(f"top_k must be at most {MAX_TOP_K}")
        if rerank_top_n > MAX_TOP_K:
            raise InvalidArgumentError(f"rerank_top_n must be at most {MAX_TOP_K}")
        if rerank_top_n and not rerank_model:
            raise InvalidArgumentError("rerank_top_n needs rerank_model")
        if rerank_model:
            # Refused before any work: FAILED_PRECONDITION for a model that cannot rerank.
            rerank_model = self._engine.registry.resolve(rerank_model, Task.RERANK).name
            rerank_top_n = rerank_top_n or max(top_k, DEFAULT_RERANK_TOP_N)
        started = time.perf_counter()
        model = self._models.get(collection)
        if model is None:
            model = (await self._in_store_thread(lambda: self._store.collection(collection))).model
            self._models[collection] = model
        context = await self._stored_context(collection, model) if self._engine.is_contextual(model) else None
        embedded = await self._engine.embed(
            EmbedRequest(
                inputs=[query],
                model=model,
                input_type=InputType.QUERY,
                truncate=True,
                normalize=True,
                context=context,
            )
        )
        vector = np.asarray(embedded.vectors[0], dtype=np.float32)
        wanted = max(top_k, rerank_top_n)
        chunks = await self._nearest(collection, vector, wanted, filter=filter, with_vectors=with_vectors)
        texts = await self._texts(collection, chunks)
        usage_tokens = embedded.usage.prompt_tokens
        rerank_scores: dict[tuple[str, int], float] = {}
        if rerank_model and chunks:
            candidates = chunks[:rerank_top_n]
            reranked = await self._engine.rerank(
                RerankRequest(
                    query=query,
                    documents=[texts[c.id][c.start : c.end] for c in candidates],
                    model=rerank_model,
                    truncate=True,
                )
            )
            usage_tokens += reranked.usage.prompt_tokens
            rerank_scores = {(candidates[r.index].id, candidates[r.index].chunk): r.score for r in reranked.results}
            chunks = sorted(candidates, key=lambda c: rerank_scores[(c.id, c.chunk)], reverse=True)
        hits: dict[str, SearchHit] = {}
        for c in chunks:
            if c.id in hits:
                continue  # a better chunk of this document came first
            hits[c.id] = SearchHit(
                document=StoredDocument(id=c.id, text=texts[c.id], payload=c.payload),
                score=c.score,
                rerank_score=rerank_scores.get((c.id, c.chunk)),
                chunk=c.chunk,
                chunks=c.chunks,
                start=c.start,
                end=c.end,
                vector=c.vector,
            )
        timings = Timings(
            queue_ms=embedded.timings.queue_ms,
            inference_ms=(time.perf_counter() - started) * 1000.0 - embedded.timings.queue_ms,
            batch_size=1,
        )
        return SearchResult(
            model=embedded.model,
            hits=list(hits.values())[:top_k],
            usage=Usage(prompt_tokens=usage_tokens),
            timings=timings,
            rerank_model=rerank_model,
        )

    async def _nearest(
        self, collection: str, vector: FloatVector, wanted: int, *, filter: dict[str, Any] | None, with_vectors: bool
    ) -> list[StoredPoint]:
        """The nearest chunks, enough of them to hold `wanted` distinct documents where the
        collection has that many: chunks of one document can fill a page, so ask again for more."""
        limit = wanted
        while True:
            search = partial(
                self._store.search, collection, vector, top_k=limit, filter=filter, with_vectors=with_vectors
            )
            found = await self._in_store_thread(search)
            documents = len({c.id for c in found})
            if documents >= wanted or len(found) < limit or limit >= MAX_CHUNKS_SEARCHED:
                return found
            limit = min(limit * 4, MAX_CHUNKS_SEARCHED)

    async def _texts(self, collection: str, chunks: Sequence[StoredPoint]) -> dict[str, str]:
        """The whole text of each document found (chunk 0 holds it; other chunks are looked up)."""
        texts = {c.id: c.text for c in chunks if c.chunk == 0}
        missing = list(dict.fromkeys(c.id for c in chunks if c.id not in texts))
        if missing:
            for point in await self._in_store_thread(lambda: self._store.retrieve(collection, missing)):
                texts[point.id] = point.text
        for c in chunks:
            texts.setdefault(c.id, "")  # deleted between the search and the lookup
        return texts

    async def get_documents(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[StoredPoint]:
        check_collection_name(collection)
        if not ids:
            raise InvalidArgumentError("ids must not be empty")
        wanted = list(ids)
        return await self._in_store_thread(lambda: self._store.retrieve(collection, wanted, with_vectors=with_vectors))

    async def delete_documents(self, collection: str, ids: Sequence[str]) -> None:
        check_collection_name(collection)
        if not ids:
            raise InvalidArgumentError("ids must not be empty")
        await self._in_store_thread(lambda: self._store.delete(collection, list(ids)))

    async def list_collections(self) -> list[CollectionInfo]:
        collections = await self._in_store_thread(self._store.list_collections)
        if self._contexts is None:
            return collections
        described = []
        for info in collections:
            try:
                stored = await asyncio.to_thread(self._contexts.get, info.name)
            except FailedPreconditionError as exc:
                # One collection's unreadable context must not hide the others: listed without one.
                log.warning("collection context unreadable", collection=info.name, error=exc.message)
                stored = None
            described.append(replace(info, context_id=stored.context.id) if stored is not None else info)
        return described

    # -- contexts (contextual models) ------------------------------------------------------------

    async def _context_for_upsert(
        self, collection: str, model: str, exists: bool, sample: Sequence[str], *, priority: Priority
    ) -> Context | None:
        """The collection's context for a contextual model: its stored one, or for a new collection
        one built from `sample` and stored before any vector is written. None for other models."""
        if not self._engine.is_contextual(model):
            return None
        if exists:
            return await self._stored_context(collection, model)
        lock = self._context_locks.setdefault(collection, asyncio.Lock())
        async with lock:
            stored = await self._stored(collection)
            # A context stored by a concurrent first upsert, or one set for this collection (a job's).
            if stored is not None and stored.model == model:
                return stored.context
            return await self.set_context(collection, model, sample, priority=priority)

    async def set_context(
        self, collection: str, model: str, sample: Sequence[str], *, priority: Priority = Priority.INTERACTIVE
    ) -> Context:
        """Build the collection's context from `sample` (documents of its corpus) and store it."""
        contexts = self._require_contexts()
        context = await self._engine.build_context(model, sample, priority=priority)
        await asyncio.to_thread(contexts.put, collection, model, context)
        return context

    def is_contextual(self, model: str) -> bool:
        return self._engine.is_contextual(model)

    def default_embed_model(self) -> str:
        return self._engine.registry.resolve("", Task.EMBED).name

    async def context_size(self, model: str) -> int:
        return await self._engine.context_size(model)

    async def has_context(self, collection: str, model: str) -> bool:
        stored = await self._stored(collection)
        return stored is not None and stored.model == model

    async def drop_collection(self, collection: str) -> bool:
        """Delete a collection, its points and its context; False if it did not exist."""
        check_collection_name(collection)
        existed = await self._in_store_thread(lambda: self._store.drop_collection(collection))
        self._models.pop(collection, None)
        if self._contexts is not None:
            await asyncio.to_thread(self._contexts.delete, collection)
        return existed

    async def _stored(self, collection: str) -> StoredContext | None:
        return await asyncio.to_thread(self._require_contexts().get, collection)

    async def _stored_context(self, collection: str, model: str) -> Context:
        stored = await self._stored(collection)
        if stored is None or stored.model != model:
            raise FailedPreconditionError(
                f"collection {collection!r} holds vectors of the contextual model {model!r} but its context is "
                "missing; re-index it with a fresh context (docs/contextual.md)"
            )
        return stored.context

    def _require_contexts(self) -> ContextStore:
        if self._contexts is None:
            raise FailedPreconditionError("this server keeps no contexts; contextual models cannot index")
        return self._contexts

    async def close(self) -> None:
        await self._in_store_thread(self._store.close)
        self._thread.close()

    async def _in_store_thread(self, fn: Callable[[], T]) -> T:
        return await self._thread.run(fn)

    def _check_payload(self, document: StoredDocument) -> None:
        payload = user_payload(document.id, document.payload)
        size = len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        if size > self._max_payload_bytes:
            raise InvalidArgumentError(
                f"document {document.id[:64]!r}: its payload takes {size} bytes as JSON; the limit is "
                f"{self._max_payload_bytes} (max_payload_bytes): every search returns it"
            )

    async def _model_of(self, collection: str) -> str | None:
        """The collection's model, None when it does not exist. The store is asked once per
        collection: describing one counts its documents exactly, which every job batch paid for."""
        model = self._models.get(collection)
        if model is not None:
            return model
        try:
            info = await self._in_store_thread(lambda: self._store.collection(collection))
        except NotFoundError:
            return None
        self._models[collection] = info.model
        return info.model
