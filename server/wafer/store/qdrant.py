"""The vector store on Qdrant: qdrant-client's embedded local mode (a folder) or a Qdrant server (a URL).

Layout of a point: id = `point_id(collection, document id, chunk)`; vector = the chunk's (Qdrant
keeps cosine vectors unit-length); payload = the user's payload at the top level, so filters address
its fields by their own names, plus Wafer's reserved keys (`wafer.store.base.payload_of`).

Which model a collection belongs to is kept in Qdrant's collection metadata (`create_collection(
metadata=...)`, qdrant-client >= 1.16 and Qdrant server >= 1.16). Checked on qdrant-client 1.20: local
mode writes it into the folder's meta.json with the collection's config and reads it back on reopen,
and the server stores it with the collection config. The alternative, a marker point with a fixed id,
would have to be filtered out of every search, count, scroll and delete, and would break as soon as
anyone else queried the collection; metadata cannot leak into results at all. A server too old to
keep metadata is detected when the collection is created (the read-back lacks it) and refused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from wafer.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from wafer.store.base import (
    CHUNK_KEY,
    FORMAT,
    FORMAT_KEY,
    MODEL_KEY,
    CollectionInfo,
    FloatMatrix,
    FloatVector,
    PayloadFilter,
    StoredPoint,
    VectorStore,
    all_point_ids,
    check_points,
    check_query,
    filter_conditions,
    payload_of,
    point_from,
    point_id,
    stale_point_ids,
)

# Points per upsert request: a server refuses requests over 32 MB by default, and 512 x 1536-d
# float vectors as JSON stay well under it.
UPSERT_BATCH = 512

T = TypeVar("T")


class QdrantStore(VectorStore):
    """A `VectorStore` on Qdrant. Give exactly one of `path` (embedded local mode) or `url` (a server).

    Local mode's folder can be opened by one client at a time (a file lock); `close()` releases it.
    Calls are serialised with a lock: the embedded client is not safe to enter from two threads.
    """

    def __init__(
        self,
        *,
        path: Path | str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        timeout: int | None = None,
        check_compatibility: bool = True,
    ) -> None:
        if (path is None) == (url is None):
            raise ValueError("QdrantStore needs exactly one of path= (embedded) or url= (a server)")
        self._where = f"Qdrant server {url}" if url is not None else f"vector store folder {path}"
        self._lock = threading.RLock()
        self._closed = False
        if path is not None:
            try:
                # The embedded store's SQLite connections are opened on this thread and used on the
                # caller's worker thread; the lock above keeps them single-entry.
                self._client = QdrantClient(path=str(path), force_disable_check_same_thread=True)
            except RuntimeError as exc:
                # qdrant-client raises a bare RuntimeError when the folder's lock is held.
                raise FailedPreconditionError(
                    f"the vector store folder {path} is in use by another process (another Wafer "
                    f"server?); stop it, or give this one another data directory: {exc}"
                ) from None
        else:
            # check_compatibility: qdrant-client asks the server's version on a background thread and
            # warns about a mismatch; tests without a server turn it off.
            self._client = QdrantClient(
                url=url, api_key=api_key, timeout=timeout, check_compatibility=check_compatibility
            )

    # -- collections -------------------------------------------------------------------------------

    def ensure_collection(self, name: str, *, dimensions: int, model: str) -> CollectionInfo:
        if dimensions <= 0:
            raise InvalidArgumentError(f"dimensions must be positive, not {dimensions}")
        if not model:
            raise InvalidArgumentError("a collection needs the name of the model that embeds it")
        with self._open() as client:
            if not client.collection_exists(name):
                try:
                    client.create_collection(
                        name,
                        vectors_config=models.VectorParams(size=dimensions, distance=models.Distance.COSINE),
                        metadata={MODEL_KEY: model, FORMAT_KEY: FORMAT},
                    )
                except ValueError as exc:
                    # Local mode's name checks; a name that already exists cannot get here.
                    raise InvalidArgumentError(f"cannot create collection {name!r}: {exc}") from None
                except UnexpectedResponse:
                    # Lost a race with another writer creating it: check theirs below instead.
                    if not client.collection_exists(name):
                        raise
                else:
                    info = self._describe(client, name)
                    if not info.model:
                        client.delete_collection(name)
                        raise FailedPreconditionError(
                            f"the {self._where} does not keep collection metadata, so it cannot "
                            "remember which model a collection belongs to; Qdrant 1.16 or newer is needed"
                        )
                    return info
            info = self._describe(client, name)
        if not info.model:
            raise FailedPreconditionError(
                f"collection {name!r} was not created by Wafer (it records no embedding model); "
                "use another collection name"
            )
        if info.model != model or info.dimensions != dimensions:
            raise FailedPreconditionError(
                f"collection {name!r} holds {info.dimensions}-d vectors of model {info.model!r}; "
                f"it cannot take {dimensions}-d vectors of model {model!r} (use another collection)"
            )
        return info

    def collection(self, name: str) -> CollectionInfo:
        with self._open() as client:
            return self._describe(client, name)

    def list_collections(self) -> list[CollectionInfo]:
        with self._open() as client:
            names = sorted(c.name for c in client.get_collections().collections)
            infos = []
            for name in names:
                try:
                    infos.append(self._describe(client, name))
                except NotFoundError:
                    continue  # deleted by someone else between the listing and now
            return infos

    # -- documents ---------------------------------------------------------------------------------

    def upsert(self, name: str, points: Sequence[StoredPoint], vectors: FloatMatrix) -> None:
        matrix = check_points(points, vectors)
        if not points:
            return
        structs = [
            models.PointStruct(id=point_id(name, p.id, p.chunk), vector=vector.tolist(), payload=payload_of(p))
            for p, vector in zip(points, matrix, strict=True)
        ]
        with self._open() as client:
            dimensions = self._dimensions(client, name)
            if matrix.shape[1] != dimensions:
                raise InvalidArgumentError(f"collection {name!r} holds {dimensions}-d vectors, not {matrix.shape[1]}-d")
            previous = self._chunk_counts(client, name, list(dict.fromkeys(p.id for p in points)))
            for start in range(0, len(structs), UPSERT_BATCH):
                batch = structs[start : start + UPSERT_BATCH]
                self._call(client, name, partial(client.upsert, name, points=batch, wait=True))
            stale = stale_point_ids(name, points, previous)
            if stale:
                selector = models.PointIdsList(points=list(stale))
                self._call(client, name, partial(client.delete, name, points_selector=selector, wait=True))

    def search(
        self,
        name: str,
        vector: FloatVector,
        *,
        top_k: int,
        filter: PayloadFilter | None = None,
        with_vectors: bool = False,
    ) -> list[StoredPoint]:
        query = check_query(vector, top_k)
        conditions = _conditions(filter)
        with self._open() as client:
            dimensions = self._dimensions(client, name)
            if query.shape[0] != dimensions:
                raise InvalidArgumentError(
                    f"collection {name!r} holds {dimensions}-d vectors; the query is {query.shape[0]}-d"
                )
            response = self._call(
                client,
                name,
                lambda: client.query_points(
                    name,
                    query=query.tolist(),
                    limit=top_k,
                    query_filter=conditions,
                    with_payload=True,
                    with_vectors=with_vectors,
                ),
            )
        return [point_from(p.payload, p.vector, score=p.score) for p in response.points]

    def retrieve(self, name: str, ids: Sequence[str], *, with_vectors: bool = False) -> list[StoredPoint]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        with self._open() as client:
            found = {p.id: p for p in self._first_chunks(client, name, wanted, with_vectors=with_vectors)}
        return [found[i] for i in wanted if i in found]

    def delete(self, name: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        with self._open() as client:
            counts = self._chunk_counts(client, name, list(dict.fromkeys(ids)))
            if counts:
                selector = models.PointIdsList(points=list(all_point_ids(name, counts)))
                self._call(client, name, lambda: client.delete(name, points_selector=selector, wait=True))

    def drop_collection(self, name: str) -> bool:
        with self._open() as client:
            if not client.collection_exists(name):
                return False
            client.delete_collection(name)
            return True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._client.close()

    # -- helpers -----------------------------------------------------------------------------------

    @contextmanager
    def _open(self) -> Iterator[QdrantClient]:
        with self._lock:
            if self._closed:
                raise UnavailableError("the vector store is closed (the server is shutting down)")
            try:
                yield self._client
            except ResponseHandlingException as exc:
                # The remote client's wrapper around transport failures (refused, timed out).
                raise UnavailableError(
                    f"the {self._where} cannot be reached: {exc.source}", retry_after_seconds=1.0
                ) from exc

    def _call(self, client: QdrantClient, name: str, call: Callable[[], T]) -> T:
        """Runs one data call; a collection that is gone becomes NotFoundError.

        Local mode reports an unknown collection with a ValueError and a server with HTTP 404; rather
        than read either message, ask whether the collection exists once the call has failed.
        """
        try:
            return call()
        except (ValueError, UnexpectedResponse):
            if not client.collection_exists(name):
                raise _not_found(name) from None
            raise

    def _dimensions(self, client: QdrantClient, name: str) -> int:
        params = self._call(client, name, lambda: client.get_collection(name)).config.params.vectors
        return params.size if isinstance(params, models.VectorParams) else 0

    def _first_chunks(
        self, client: QdrantClient, name: str, ids: list[str], *, with_vectors: bool = False
    ) -> list[StoredPoint]:
        records = self._call(
            client,
            name,
            lambda: client.retrieve(
                name, ids=[point_id(name, i) for i in ids], with_payload=True, with_vectors=with_vectors
            ),
        )
        return [point_from(r.payload, r.vector) for r in records]

    def _chunk_counts(self, client: QdrantClient, name: str, ids: list[str]) -> dict[str, int]:
        """How many chunks each stored document of `ids` has (documents not stored are left out)."""
        return {p.id: p.chunks for p in self._first_chunks(client, name, ids)}

    def _describe(self, client: QdrantClient, name: str) -> CollectionInfo:
        info = self._call(client, name, lambda: client.get_collection(name))
        # Documents are their chunk 0s; "not chunk >= 1" also counts points written before chunking.
        first_chunks = models.Filter(must_not=[models.FieldCondition(key=CHUNK_KEY, range=models.Range(gte=1))])
        count = self._call(client, name, lambda: client.count(name, count_filter=first_chunks, exact=True).count)
        params = info.config.params.vectors
        # A collection made elsewhere may use named vectors; it has no single dimension for Wafer.
        dimensions = params.size if isinstance(params, models.VectorParams) else 0
        metadata = info.config.metadata or {}
        model = metadata.get(MODEL_KEY)
        return CollectionInfo(
            name=name,
            model=model if isinstance(model, str) else "",
            dimensions=dimensions,
            documents=count,
        )


def _not_found(name: str) -> NotFoundError:
    return NotFoundError(f"collection {name!r} does not exist")


def _conditions(filter: PayloadFilter | None) -> models.Filter | None:
    conditions = filter_conditions(filter)
    if not conditions:
        return None
    must: list[models.Condition] = [
        models.FieldCondition(key=key, match=models.MatchValue(value=value)) for key, value in conditions
    ]
    return models.Filter(must=must)
