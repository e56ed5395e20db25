"""The vector store on qdrant-edge: Qdrant's storage engine embedded in the process (Rust, no server).

Layout of the store's folder: one folder per collection, holding `collection.json` (which model the
collection belongs to, its dimension and Wafer's format number) and `shard/`, one qdrant-edge shard.
A shard has no metadata of its own, so the JSON file beside it plays the part of qdrant-client's
collection metadata. Points are laid out exactly as in `QdrantStore` (`wafer.store.base.payload_of`),
so both stores answer the same calls the same way (the congruence tests check it).

Why it is the default: measured on this machine at 100k x 384 (bench/RESULTS.md), it writes and
searches one to two orders of magnitude faster than qdrant-client's local mode, which keeps every
point in Python objects and searches them with numpy.

The shard holds a lock on its write-ahead log while open, so a second process opening the same
folder fails instead of corrupting it; `close()` releases every shard.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import qdrant_edge as edge
import structlog

from wafer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnavailableError
from wafer.files import write_atomically
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

log = structlog.get_logger("wafer.store")

META_FILE = "collection.json"
SHARD_DIR = "shard"
DIMENSIONS_KEY = "dimensions"
# Collection names become folder names: no separators, no dot-only names.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Payload indexes one collection builds for filtered fields (its own chunk index included).
MAX_PAYLOAD_INDEXES = 16
# Points per update: bounds the memory one Python list of points takes, nothing more.
UPSERT_BATCH = 1024


@dataclass(frozen=True, slots=True)
class _Meta:
    model: str
    dimensions: int


class EdgeStore(VectorStore):
    """A `VectorStore` on qdrant-edge shards under `path`.

    Calls are serialised with a lock: a shard may be read concurrently, but opening shards and the
    read-then-write of an upsert (stale chunks) must not interleave.
    """

    def __init__(self, *, path: Path | str) -> None:
        self._root = Path(path)
        self._root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._closed = False
        self._shards: dict[str, tuple[_Meta, edge.EdgeShard]] = {}

    # -- collections -------------------------------------------------------------------------------

    def ensure_collection(self, name: str, *, dimensions: int, model: str) -> CollectionInfo:
        if dimensions <= 0:
            raise InvalidArgumentError(f"dimensions must be positive, not {dimensions}")
        if not model:
            raise InvalidArgumentError("a collection needs the name of the model that embeds it")
        _check_name(name)
        with self._open():
            folder = self._root / name
            if not (folder / META_FILE).exists():
                self._create(name, _Meta(model=model, dimensions=dimensions))
            meta, _ = self._shard(name)
            if meta.model != model or meta.dimensions != dimensions:
                raise FailedPreconditionError(
                    f"collection {name!r} holds {meta.dimensions}-d vectors of model {meta.model!r}; "
                    f"it cannot take {dimensions}-d vectors of model {model!r} (use another collection)"
                )
            return self._describe(name)

    def collection(self, name: str) -> CollectionInfo:
        with self._open():
            return self._describe(name)

    def list_collections(self) -> list[CollectionInfo]:
        with self._open():
            names = sorted(p.parent.name for p in self._root.glob(f"*/{META_FILE}"))
            listed = []
            for name in names:
                try:
                    listed.append(self._describe(name))
                except (FailedPreconditionError, NotFoundError) as error:
                    # One broken collection must not hide the others; it answers on its own.
                    log.error("collection left out of the list", collection=name, error=error.message)
            return listed

    # -- documents ---------------------------------------------------------------------------------

    def upsert(self, name: str, points: Sequence[StoredPoint], vectors: FloatMatrix) -> None:
        matrix = check_points(points, vectors)
        if not points:
            return
        built = [
            edge.Point(point_id(name, p.id, p.chunk), vector.tolist(), payload_of(p))
            for p, vector in zip(points, matrix, strict=True)
        ]
        with self._open():
            meta, shard = self._shard(name)
            if matrix.shape[1] != meta.dimensions:
                raise InvalidArgumentError(
                    f"collection {name!r} holds {meta.dimensions}-d vectors, not {matrix.shape[1]}-d"
                )
            previous = _chunk_counts(name, shard, list(dict.fromkeys(p.id for p in points)))
            for start in range(0, len(built), UPSERT_BATCH):
                shard.update(edge.UpdateOperation.upsert_points(built[start : start + UPSERT_BATCH]))
            stale = stale_point_ids(name, points, previous)
            if stale:
                shard.update(edge.UpdateOperation.delete_points(list(stale)))

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
        conditions = filter_conditions(filter)
        with self._open():
            meta, shard = self._shard(name)
            if query.shape[0] != meta.dimensions:
                raise InvalidArgumentError(
                    f"collection {name!r} holds {meta.dimensions}-d vectors; the query is {query.shape[0]}-d"
                )
            _index_filtered_fields(shard, conditions)
            found = shard.query(
                edge.QueryRequest(
                    limit=top_k,
                    query=edge.Query.Nearest(query.tolist()),
                    filter=_filter(conditions),
                    with_payload=True,
                    with_vector=with_vectors,
                )
            )
        return [point_from(p.payload, p.vector if with_vectors else None, score=p.score) for p in found]

    def retrieve(self, name: str, ids: Sequence[str], *, with_vectors: bool = False) -> list[StoredPoint]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        with self._open():
            _, shard = self._shard(name)
            found = {p.id: p for p in _first_chunks(name, shard, wanted, with_vectors=with_vectors)}
        return [found[i] for i in wanted if i in found]

    def delete(self, name: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        with self._open():
            _, shard = self._shard(name)
            counts = _chunk_counts(name, shard, list(dict.fromkeys(ids)))
            if counts:
                shard.update(edge.UpdateOperation.delete_points(list(all_point_ids(name, counts))))

    def drop_collection(self, name: str) -> bool:
        _check_name(name)
        with self._open():
            opened = self._shards.pop(name, None)
            if opened is not None:
                opened[1].close()
            folder = self._root / name
            existed = (folder / META_FILE).is_file()
            # The metadata goes first: a folder without it is an unfinished collection either way.
            (folder / META_FILE).unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            return existed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _, shard in self._shards.values():
                shard.close()
            self._shards.clear()

    # -- helpers -----------------------------------------------------------------------------------

    @contextmanager
    def _open(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise UnavailableError("the vector store is closed (the server is shutting down)")
            yield

    def _create(self, name: str, meta: _Meta) -> None:
        folder = self._root / name
        if (folder / SHARD_DIR).exists():
            # A folder without metadata is a creation that was interrupted, or a collection whose
            # metadata was lost: start it over only if its shard holds nothing.
            self._discard_empty_shard(name, folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        # float16 storage: an exact search reads every stored vector, so it is bound by memory
        # bandwidth; half the bytes made it 1.5x faster at 100k x 384 (14.8 -> 10.0 ms), the same
        # neighbours, scores within about 1e-3 of float32's.
        vectors = edge.EdgeVectorParams(
            size=meta.dimensions, distance=edge.Distance.Cosine, datatype=edge.VectorStorageDatatype.Float16
        )
        config = edge.EdgeConfig(vectors=vectors)
        shard = edge.EdgeShard.create(str(folder / SHARD_DIR), config)
        try:
            # Documents are counted by their chunk number; an index keeps that count cheap.
            shard.update(edge.UpdateOperation.create_field_index(CHUNK_KEY, edge.PayloadSchemaType.Integer))
        except BaseException:
            shard.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        # The metadata file is written last, atomically and synced: a folder without it is an
        # interrupted creation (an empty shard), which the next `_create` starts over.
        data = json.dumps({MODEL_KEY: meta.model, DIMENSIONS_KEY: meta.dimensions, FORMAT_KEY: FORMAT})
        write_atomically(folder / META_FILE, data.encode("utf-8"))
        self._shards[name] = (meta, shard)

    def _discard_empty_shard(self, name: str, folder: Path) -> None:
        """Refuse (FAILED_PRECONDITION) to replace a shard that holds points or cannot be read."""
        try:
            shard = edge.EdgeShard.load(str(folder / SHARD_DIR))
        except Exception as exc:  # qdrant-edge raises plain Exception
            raise self._unreadable(name, folder, f"its shard cannot be opened ({exc})") from None
        try:
            points = shard.count(edge.CountRequest(exact=True))
        finally:
            shard.close()
        if points:
            raise self._unreadable(name, folder, f"its shard holds {points} points but {META_FILE} is missing")

    @staticmethod
    def _unreadable(name: str, folder: Path, why: str) -> FailedPreconditionError:
        log.error("collection cannot be read; left as it is", collection=name, folder=str(folder), why=why)
        return FailedPreconditionError(
            f"collection {name!r} cannot be read: {why}. Nothing was changed; restore {folder / META_FILE} "
            f'(e.g. {{"{MODEL_KEY}": "<model>", "{DIMENSIONS_KEY}": <dimensions>, "{FORMAT_KEY}": {FORMAT}}}) '
            "or move the folder away"
        )

    def _shard(self, name: str) -> tuple[_Meta, edge.EdgeShard]:
        opened = self._shards.get(name)
        if opened is not None:
            return opened
        folder = self._root / name
        if not SAFE_NAME.fullmatch(name):
            raise NotFoundError(f"collection {name[:64]!r} does not exist")
        if not (folder / META_FILE).is_file():
            if (folder / SHARD_DIR).exists():
                # Not an interrupted creation if the shard holds points: say so instead of NOT_FOUND.
                self._discard_empty_shard(name, folder)
            raise NotFoundError(f"collection {name!r} does not exist")
        try:
            raw = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            meta = _Meta(model=str(raw[MODEL_KEY]), dimensions=int(raw[DIMENSIONS_KEY]))
            if not meta.model or meta.dimensions <= 0:
                raise ValueError("no model or no dimensions")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise self._unreadable(name, folder, f"{META_FILE} is damaged ({exc})") from None
        try:
            shard = edge.EdgeShard.load(str(folder / SHARD_DIR))
        except Exception as exc:  # qdrant-edge raises plain Exception; a held WAL lock is the usual cause
            raise FailedPreconditionError(
                f"cannot open collection {name!r} in {folder} (in use by another process, e.g. another "
                f"Wafer server? give this one another data directory): {exc}"
            ) from None
        self._shards[name] = (meta, shard)
        return meta, shard

    def _describe(self, name: str) -> CollectionInfo:
        meta, shard = self._shard(name)
        first_chunks = edge.Filter(must_not=[edge.FieldCondition(key=CHUNK_KEY, range=edge.RangeFloat(gte=1))])
        count = shard.count(edge.CountRequest(exact=True, filter=first_chunks))
        return CollectionInfo(name=name, model=meta.model, dimensions=meta.dimensions, documents=count)


def _check_name(name: str) -> None:
    if not SAFE_NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"collection name {name[:64]!r} must be 1-128 characters of letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )


def _filter(conditions: list[tuple[str, str | int | bool]]) -> edge.Filter | None:
    if not conditions:
        return None
    must: list[edge.FieldCondition | edge.Filter] = [
        edge.FieldCondition(key=key, match=edge.MatchValue(_match_value(value))) for key, value in conditions
    ]
    return edge.Filter(must=list(must))


def _index_filtered_fields(shard: edge.EdgeShard, conditions: list[tuple[str, str | int | bool]]) -> None:
    """Gives every payload field a filter names an index, the first time one does.

    Without one, a filtered search reads every point's payload: 120 ms at 100k points here, against
    0.5 ms with a keyword index, which took 1 s to build (bench/RESULTS.md). The index is kept in the
    shard, so it is built once per field. Its type follows the first value filtered on; a later
    filter with a value of another type still answers correctly, by reading payloads.
    """
    indexed = set(shard.info().payload_schema)
    for key, value in conditions:
        if key in indexed:
            continue
        if len(indexed) >= MAX_PAYLOAD_INDEXES:
            # Each index is kept for good (300 keys grew a shard from 1.6 to 15 MB): past the bound,
            # a filter on a new field still answers, by reading payloads.
            return
        schema = (
            edge.PayloadSchemaType.Bool
            if isinstance(value, bool)
            else edge.PayloadSchemaType.Integer
            if isinstance(value, int)
            else edge.PayloadSchemaType.Keyword
        )
        shard.update(edge.UpdateOperation.create_field_index(key, schema))
        indexed.add(key)


def _match_value(value: str | int | bool) -> str | int | bool:
    """The value as qdrant-edge must be given it to compare it as its own type.

    qdrant-edge-py 0.9.0 converts a Python bool to an integer (bool is a subclass of int, and the
    binding tries int first), so `MatchValue(True)` matches nothing stored as `true`. numpy's bool is
    no int subclass and arrives as a bool; the congruence tests catch a regression either way.
    """
    if isinstance(value, bool):
        return cast(bool, np.bool_(value))
    return value


def _first_chunks(name: str, shard: edge.EdgeShard, ids: list[str], *, with_vectors: bool = False) -> list[StoredPoint]:
    records = shard.retrieve([point_id(name, i) for i in ids], with_payload=True, with_vector=with_vectors)
    return [point_from(r.payload, r.vector if with_vectors else None) for r in records]


def _chunk_counts(name: str, shard: edge.EdgeShard, ids: list[str]) -> dict[str, int]:
    return {p.id: p.chunks for p in _first_chunks(name, shard, ids)}
