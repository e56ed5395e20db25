"""Plain request and result types shared by the engine, the backends and the RPC layer.

They carry no protobuf and no gRPC: the RPC layer translates to and from them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum

import numpy as np
from numpy.typing import NDArray

FloatMatrix = NDArray[np.float32]


class InputType(StrEnum):
    QUERY = "query"
    DOCUMENT = "document"


class Priority(Enum):
    INTERACTIVE = 0
    BATCH = 1


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Timings:
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 0
    time_to_first_token_ms: float = 0.0
    tokenize_ms: float = 0.0


@dataclass(frozen=True, slots=True, eq=False)
class Context:
    """What a contextual model's vectors depend on besides the text (cde: the dataset embeddings
    of a corpus, [corpus size, dimensions]). `id` is the SHA-256 of the values and shape: requests
    with different contexts are never merged into one backend call nor share cache entries."""

    id: str
    vectors: FloatMatrix

    @classmethod
    def of(cls, vectors: FloatMatrix) -> Context:
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        digest = hashlib.sha256(json.dumps(list(data.shape)).encode() + data.tobytes()).hexdigest()
        data.flags.writeable = False
        return cls(id=digest, vectors=data)


@dataclass(frozen=True, slots=True)
class ContextRequest:
    """A context an Embed call asks for: the one stored with a collection, or one built from
    documents of the corpus (sampled to the model's corpus size)."""

    collection: str = ""
    documents: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    inputs: list[str]
    model: str = ""
    input_type: InputType = InputType.DOCUMENT
    dimensions: int = 0
    truncate: bool = False
    normalize: bool | None = None
    priority: Priority = Priority.INTERACTIVE
    # Long inputs: embed overlapping windows and average them instead of refusing or cutting.
    pool_chunks: bool = False
    # For contextual models (cde): the context asked for, or one already resolved.
    context: ContextRequest | Context | None = None


@dataclass(frozen=True, slots=True)
class EmbedResult:
    model: str
    vectors: FloatMatrix
    usage: Usage
    timings: Timings
    # How many of the vectors came from the embedding cache instead of the model.
    cached: int = 0
    # The id of the context the vectors were computed in ("" without one).
    context_id: str = ""


@dataclass(frozen=True, slots=True)
class RerankRequest:
    query: str
    documents: list[str]
    model: str = ""
    top_n: int = 0
    return_documents: bool = False
    truncate: bool = False
    priority: Priority = Priority.INTERACTIVE


@dataclass(frozen=True, slots=True)
class RankedDocument:
    index: int
    score: float
    document: str | None = None


@dataclass(frozen=True, slots=True)
class RerankResult:
    model: str
    results: list[RankedDocument]
    usage: Usage
    timings: Timings


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Validated sampling settings; `None` fields take the backend's defaults."""

    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    sampling: SamplingParams
    model: str = ""
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    priority: Priority = Priority.INTERACTIVE


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """What a backend yields while generating: text since the last delta; the last one has a reason."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def joined(cls, deltas: Sequence[GenerationDelta]) -> GenerationDelta:
        """One delta for consecutive ones of a stream: their text, and the last one's end."""
        if len(deltas) == 1:
            return deltas[0]
        last = deltas[-1]
        return cls(
            text="".join(delta.text for delta in deltas),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
        )


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """One streamed message of a Generate call."""

    model: str
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None


@dataclass(frozen=True, slots=True)
class StoredDocument:
    id: str
    text: str
    payload: dict[str, object] = field(default_factory=dict)
