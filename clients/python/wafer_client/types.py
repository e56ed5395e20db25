"""Typed results and inputs of the Wafer client: frozen dataclasses, no protobuf in sight."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "ChatMessage",
    "CollectionInfo",
    "Completion",
    "Document",
    "EmbedResult",
    "FinishReason",
    "GenerationChunk",
    "InputType",
    "Job",
    "JobState",
    "JsonlSource",
    "ModelInfo",
    "Priority",
    "RerankHit",
    "RerankResult",
    "SearchHit",
    "SearchResult",
    "SqliteSource",
    "StoredDocument",
    "Timings",
    "UpsertResult",
    "Usage",
]

InputType = Literal["document", "query"]
Priority = Literal["interactive", "batch"]
FinishReason = Literal["stop", "length"]
JobState = Literal["queued", "running", "waiting", "paused", "succeeded", "failed", "cancelled"]
Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Usage:
    """Token counts of one call, counted with the answering model's tokenizer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    """Where the server spent the call's time, in milliseconds."""

    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 0
    time_to_first_token_ms: float = 0.0
    # Tokenizing the inputs on arrival (ONNX embeddings); not part of inference_ms then.
    tokenize_ms: float = 0.0


# eq=False: comparing numpy arrays element-wise has no single truth value, so identity is the only
# equality that does not raise.
@dataclass(frozen=True, eq=False)
class EmbedResult:
    """One vector per input, in input order: ``vectors`` is float32 with shape [len(inputs), dimensions]."""

    model: str
    vectors: Vector
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    # How many vectors the server's embedding cache supplied instead of the model.
    cached: int = 0
    # Contextual models (cde): the identity of the context the vectors were computed in; "" without one.
    context_id: str = ""

    @property
    def dimensions(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


@dataclass(frozen=True)
class RerankHit:
    """``index`` is the document's position in the request; ``document`` is empty unless asked for."""

    index: int
    score: float
    document: str = ""


@dataclass(frozen=True)
class RerankResult:
    """Hits best first, as the server sorted them."""

    model: str
    results: list[RerankHit]
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"] | str
    content: str


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed delta. Only the last chunk has ``finish_reason``, ``usage`` and ``timings``."""

    text: str
    model: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A whole generation: the joined stream."""

    text: str
    model: str
    finish_reason: FinishReason | None
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class ModelInfo:
    """A model the server knows. ``tasks``/``default_for`` hold "embed", "rerank", "generate";
    ``state`` is "unloaded", "loading", "ready", "unloading" or "failed"; ``load_policy`` is "startup"
    or "on_demand"; ``last_used`` is None if unused since the server started."""

    name: str
    backend: str = ""
    tasks: tuple[str, ...] = ()
    state: str = "unspecified"
    dimensions: int = 0
    max_tokens: int = 0
    source: str = ""
    description: str = ""
    default_for: tuple[str, ...] = ()
    load_policy: str = "unspecified"
    memory_bytes: int = 0
    load_seconds: float = 0.0
    last_used: datetime | None = None
    active_requests: int = 0
    error: str = ""
    pooling: str = ""
    normalize: bool = False
    query_prompt: str = ""
    document_prompt: str = ""
    pinned: bool = False
    # None: kept loaded however long it is idle.
    keep_alive_seconds: float | None = None
    # Why it is not loaded ("never loaded", "evicted at ...", "unloaded at ... after N s idle",
    # "unloaded by admin at ...", "failed: ..."); empty while loaded.
    not_loaded_reason: str = ""
    tokenizer: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "ready"


@dataclass(frozen=True)
class PullProgress:
    """One report of :meth:`WaferClient.pull_model`. ``total_bytes`` is 0 while unknown;
    ``resumed_from_bytes`` is what an earlier, interrupted pull had already fetched; ``file_done``
    marks a file complete and verified (``path`` is where it is on the server); ``done``, the last
    report, marks every file of the model in the cache."""

    source: str = ""
    downloaded_bytes: int = 0
    total_bytes: int = 0
    resumed_from_bytes: int = 0
    file_done: bool = False
    path: str = ""
    done: bool = False


@dataclass(frozen=True)
class Document:
    """A document to index. An empty ``id`` lets the server derive one from the text. ``payload`` is any
    JSON object; note that JSON numbers come back as floats (protobuf Struct has no integers)."""

    text: str
    id: str = ""
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpsertResult:
    """``ids`` are the documents' ids in request order, derived ones included."""

    model: str
    ids: list[str]
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    # Vectors written (one per chunk of a long document) and how many came from the embedding cache.
    chunks: int = 0
    cached: int = 0


@dataclass(frozen=True, eq=False)
class SearchHit:
    """A document near the query: ``score`` is the cosine similarity of its best chunk,
    ``rerank_score`` that chunk's rerank score (when the search reranked). ``chunk`` of ``chunks``
    is the chunk that matched, ``text[start:end]``; ``vector`` only if asked for."""

    id: str
    text: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)
    vector: Vector | None = None
    rerank_score: float | None = None
    chunk: int = 0
    chunks: int = 1
    start: int = 0
    end: int = 0

    @property
    def matched_text(self) -> str:
        return self.text[self.start : self.end]


@dataclass(frozen=True)
class SearchResult:
    model: str
    hits: list[SearchHit]
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    # The model that reranked ("" when the search did not).
    rerank_model: str = ""


@dataclass(frozen=True, eq=False)
class StoredDocument:
    """A document read back by id; ``vector`` only if asked for."""

    id: str
    text: str
    payload: dict[str, Any] = field(default_factory=dict)
    vector: Vector | None = None


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    model: str
    dimensions: int
    documents: int
    # Collections of contextual models (cde): the identity of the collection's context; "" otherwise.
    context_id: str = ""


@dataclass(frozen=True)
class JsonlSource:
    """A JSON Lines file on the server, one object per line. ``path`` is absolute and under the
    server's allowed folders; empty field names mean ``id`` and ``text``. Other fields go to the payload."""

    path: str
    id_field: str = ""
    text_field: str = ""


@dataclass(frozen=True)
class SqliteSource:
    """A SQLite database on the server (opened read-only) and one SELECT over it, returning an id
    and a text column (empty names mean ``id`` and ``text``); other columns go to the payload.
    Give the query an ORDER BY: a resumed job skips rows by position."""

    path: str
    query: str
    id_column: str = ""
    text_column: str = ""


@dataclass(frozen=True)
class Job:
    """A background indexing job. ``total`` is None until the server has counted the source;
    ``eta_seconds`` is None without a total or a rate. ``reason`` says why it is not running."""

    id: str
    state: JobState | str
    collection: str
    model: str
    source: str
    done: int
    reason: str = ""
    skipped: int = 0
    total: int | None = None
    docs_per_second: float = 0.0
    eta_seconds: float | None = None
    error: str = ""
    when_idle: bool = False
    idle_seconds: float = 0.0
    when_charging: bool = False
    batch_size: int = 0
    created: datetime | None = None
    started: datetime | None = None
    finished: datetime | None = None

    @property
    def ended(self) -> bool:
        """True once the job succeeded, failed or was cancelled: it will not change again."""
        return self.state in ("succeeded", "failed", "cancelled")
