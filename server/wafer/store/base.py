"""The vector store contract: collections of document chunks with one vector each, bound to one model.

A document is stored as one or more points, one per chunk (see `wafer.chunking`). Chunk 0 carries
the document's whole text; every chunk carries the document's id, its own position (chunk number,
chunk count, character offsets into the text) and the user's payload, so filters apply to every
chunk alike. Readers ask for documents by id and get chunk 0 back.

Synchronous on purpose: the embedded engines do blocking file I/O, so callers run every store call
off the event loop (on one worker thread) anyway.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from wafer.errors import InvalidArgumentError

FloatVector = NDArray[np.float32]
FloatMatrix = NDArray[np.float32]
# What an exact-match filter may compare a payload field with.
FilterValue = str | int | bool | float
PayloadFilter = dict[str, FilterValue]

# A fixed namespace: point ids must come out the same in every process and every release, or
# re-running a job would write duplicates next to the old points instead of replacing them.
POINT_ID_NAMESPACE = uuid.UUID("6f1a2b3c-4d5e-5f60-8a7b-9c0d1e2f3a4b")

# Wafer's own payload keys. User keys may not start with "_", which keeps the two apart.
RESERVED_PREFIX = "_"
ID_KEY = "_id"
TEXT_KEY = "_text"
CHUNK_KEY = "_chunk"
CHUNKS_KEY = "_chunks"
START_KEY = "_start"
END_KEY = "_end"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# A filter key names a payload field; dots walk into nested objects (Qdrant's key syntax), so a
# literal dotted key cannot be filtered on. Parts are non-empty, without control characters or the
# characters Qdrant's path syntax gives a meaning ($ [ ] \ ").
FILTER_KEY = re.compile(r'[^\x00-\x1f\x7f$\[\]\\".]+(?:\.[^\x00-\x1f\x7f$\[\]\\".]+)*')
MAX_FILTER_KEY_CHARS = 256

# The one rule for collection names, checked by every layer that takes one (indexing, jobs, stores).
# Names become folder names (qdrant-edge, contexts): no separators, no dot-only names.
COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def is_collection_name(name: str) -> bool:
    # fullmatch: `$` would let a trailing newline through.
    return COLLECTION_NAME.fullmatch(name) is not None


def check_collection_name(name: str) -> None:
    """Raise InvalidArgumentError unless `name` is a valid collection name. The name is cut in the
    message, which travels in gRPC metadata (8 KB at most: a longer one turns the error into
    RESOURCE_EXHAUSTED)."""
    if not is_collection_name(name):
        raise InvalidArgumentError(
            f"collection name {name[:64]!r} must be 1-128 characters of letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )


# Collection metadata. The format number lets a later release recognise (and migrate) collections
# written by this one. Format 2: documents stored as chunks (format 1 had one point per document).
MODEL_KEY = "wafer_model"
FORMAT_KEY = "wafer_format"
FORMAT = 2


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    name: str
    # The embedding model whose vectors the collection holds ("" if Wafer did not create it).
    model: str
    dimensions: int
    # Documents, not points: a document split into chunks counts once.
    documents: int
    # The id of the collection's context, for contextual models (cde); "" otherwise. Filled by the
    # index service, which keeps contexts; stores leave it empty.
    context_id: str = ""


@dataclass(frozen=True, slots=True)
class StoredPoint:
    """One chunk of one document, as written to and read from a store.

    `text` is the whole document's text on chunk 0 and empty on the others (the chunk's own text is
    `text[start:end]` of chunk 0's). `start`/`end` are character offsets into the document's text.
    `score` is the cosine similarity to the query in search results, 0 elsewhere.
    """

    id: str
    text: str
    payload: dict[str, object] = field(default_factory=dict)
    chunk: int = 0
    chunks: int = 1
    start: int = 0
    end: int = 0
    score: float = 0.0
    vector: list[float] | None = None


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
    """Collections of `StoredPoint`s searchable by cosine similarity.

    Errors are Wafer's: `NotFoundError` for an unknown collection, `InvalidArgumentError` for bad input
    (wrong vector size, reserved payload keys, bad filters), `FailedPreconditionError` when a
    collection exists with another model or dimension.
    """

    def ensure_collection(self, name: str, *, dimensions: int, model: str) -> CollectionInfo:
        """Creates the collection (cosine distance) or checks that the existing one matches."""
        ...

    def collection(self, name: str) -> CollectionInfo: ...

    def list_collections(self) -> list[CollectionInfo]: ...

    def upsert(self, name: str, points: Sequence[StoredPoint], vectors: FloatMatrix) -> None:
        """Writes chunks with their vectors ([len(points), dimensions]); the same (id, chunk) replaces.

        A document written again with fewer chunks loses its old surplus chunks.
        """
        ...

    def search(
        self,
        name: str,
        vector: FloatVector,
        *,
        top_k: int,
        filter: PayloadFilter | None = None,
        with_vectors: bool = False,
    ) -> list[StoredPoint]:
        """The `top_k` nearest chunks, best first, each with its cosine similarity as `score`.

        `filter`: exact-match conditions on payload fields, all of which must hold.
        """
        ...

    def retrieve(self, name: str, ids: Sequence[str], *, with_vectors: bool = False) -> list[StoredPoint]:
        """Documents (their chunk 0) by id, in request order; unknown ids are left out."""
        ...

    def delete(self, name: str, ids: Sequence[str]) -> None:
        """Deletes documents (all their chunks) by id; unknown ids are ignored."""
        ...

    def drop_collection(self, name: str) -> bool:
        """Deletes the collection and everything in it; False if there was none."""
        ...

    def close(self) -> None:
        """Releases the store (for the embedded stores: their folder lock). Idempotent."""
        ...


# -- helpers shared by the implementations, so that they agree ----------------------------------------


def check_points(points: Sequence[StoredPoint], vectors: FloatMatrix) -> FloatMatrix:
    """The vectors as a float32 matrix, after checking they fit the points."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(points):
        raise InvalidArgumentError(
            f"expected one vector per point ({len(points)}), got an array of shape {matrix.shape}"
        )
    if not np.isfinite(matrix).all():
        raise InvalidArgumentError("vectors must be finite (no NaN or infinity)")
    for point in points:
        if not point.id:
            raise InvalidArgumentError("every document needs a non-empty id")
        if not 0 <= point.chunk < point.chunks:
            raise InvalidArgumentError(f"document {point.id!r}: chunk {point.chunk} of {point.chunks}")
    return matrix


def check_query(vector: FloatVector, top_k: int) -> FloatVector:
    if top_k <= 0:
        raise InvalidArgumentError(f"top_k must be positive, not {top_k}")
    query = np.asarray(vector, dtype=np.float32).reshape(-1)
    if not np.isfinite(query).all():
        raise InvalidArgumentError("the query vector must be finite (no NaN or infinity)")
    return query


def payload_of(point: StoredPoint) -> dict[str, Any]:
    """What a store writes as the point's payload: the user's fields plus Wafer's reserved keys."""
    payload = user_payload(point.id, point.payload)
    payload.update(
        {ID_KEY: point.id, CHUNK_KEY: point.chunk, CHUNKS_KEY: point.chunks, START_KEY: point.start, END_KEY: point.end}
    )
    if point.chunk == 0:
        payload[TEXT_KEY] = point.text
    return payload


def point_from(payload: Mapping[str, Any] | None, vector: object, *, score: float = 0.0) -> StoredPoint:
    fields = dict(payload or {})
    return StoredPoint(
        id=str(fields.pop(ID_KEY, "")),
        text=str(fields.pop(TEXT_KEY, "")),
        chunk=int(fields.pop(CHUNK_KEY, 0)),
        chunks=int(fields.pop(CHUNKS_KEY, 1)),
        start=int(fields.pop(START_KEY, 0)),
        end=int(fields.pop(END_KEY, 0)),
        payload=fields,
        score=float(score),
        vector=[float(x) for x in vector] if isinstance(vector, list) else None,
    )


def user_payload(document_id: str, payload: Mapping[str, object]) -> dict[str, Any]:
    for key in payload:
        if not isinstance(key, str) or not key:
            raise InvalidArgumentError(f"document {document_id!r}: payload keys must be non-empty strings")
        if key.startswith(RESERVED_PREFIX):
            raise InvalidArgumentError(
                f"document {document_id!r}: payload key {key!r} is reserved (keys starting with "
                f"{RESERVED_PREFIX!r} are Wafer's own); rename it"
            )
    return {key: _json_value(value, f"document {document_id!r}: payload[{key!r}]") for key, value in payload.items()}


def _json_value(value: object, where: str) -> Any:
    """A payload value as JSON holds it; whole floats become ints.

    Every number that arrives through protobuf's Struct is a float (2020 comes as 2020.0). Stored as a
    float, an integer exact-match filter would match it in local mode but not on a Qdrant server,
    which matches integers only against integer values; storing whole numbers as ints makes all agree.
    """
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidArgumentError(f"{where}: integers must fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"{where}: numbers must be finite")
        # A whole float too large for an integer (1e30) stays a float.
        return int(value) if value.is_integer() and INT64_MIN <= value <= INT64_MAX else value
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise InvalidArgumentError(f"{where}: {type(value).__name__} is not a JSON value")


def filter_conditions(filter: PayloadFilter | None) -> list[tuple[str, str | int | bool]]:
    """The filter as (key, exact value) pairs, checked; whole floats become ints (see _json_value)."""
    conditions: list[tuple[str, str | int | bool]] = []
    for key, value in (filter or {}).items():
        if not isinstance(key, str) or not key or key.startswith(RESERVED_PREFIX):
            raise InvalidArgumentError(f"filter key {key!r} must be a payload field name (not starting with '_')")
        if len(key) > MAX_FILTER_KEY_CHARS or not FILTER_KEY.fullmatch(key):
            raise InvalidArgumentError(
                f"filter key {key[:64]!r} must be a payload field name, or a dotted path into nested objects "
                "(a.b): no empty parts, no control characters, none of $ [ ] \\ or a double quote"
            )
        if isinstance(value, bool | str) or (isinstance(value, int) and INT64_MIN <= value <= INT64_MAX):
            conditions.append((key, value))
        elif isinstance(value, float) and value.is_integer() and INT64_MIN <= value <= INT64_MAX:
            conditions.append((key, int(value)))
        else:
            raise InvalidArgumentError(
                f"filter[{key[:64]!r}] must be a string, a whole number of at most 64 bits or a boolean, not {value!r}"
            )
    return conditions


def stale_point_ids(name: str, written: Iterable[StoredPoint], previous: Mapping[str, int]) -> list[str]:
    """Point ids of chunks a document had before (`previous`: id -> chunk count) and no longer has."""
    now = {p.id: p.chunks for p in written}
    return [point_id(name, doc, chunk) for doc, count in previous.items() for chunk in range(now.get(doc, 0), count)]


def all_point_ids(name: str, counts: Mapping[str, int]) -> list[str]:
    return [point_id(name, doc, chunk) for doc, count in counts.items() for chunk in range(count)]
