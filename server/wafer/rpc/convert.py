"""Protobuf ⇄ domain translation. Pure functions: no I/O, no decisions beyond field mapping
and the protocol's own defaults (zero values meaning "unset")."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from numpy.typing import NDArray

from wafer.domain import (
    ChatMessage,
    ContextRequest,
    EmbedRequest,
    EmbedResult,
    FinishReason,
    FloatMatrix,
    GenerateChunk,
    GenerateRequest,
    InputType,
    Priority,
    RerankRequest,
    RerankResult,
    SamplingParams,
    StoredDocument,
    Timings,
    Usage,
)
from wafer.errors import InvalidArgumentError
from wafer.indexing import SearchHit, SearchResult, UpsertResult
from wafer.pull import PullProgress
from wafer.registry import ModelState, ModelStatus
from wafer.specs import LoadPolicy, Task
from wafer.store.base import CollectionInfo, StoredPoint
from wafer_proto.v1 import common_pb2, index_pb2, inference_pb2, models_pb2

_TASK_TO_PROTO = {
    Task.EMBED: common_pb2.TASK_EMBED,
    Task.RERANK: common_pb2.TASK_RERANK,
    Task.GENERATE: common_pb2.TASK_GENERATE,
}
_STATE_TO_PROTO = {
    ModelState.UNLOADED: models_pb2.MODEL_STATE_UNLOADED,
    ModelState.LOADING: models_pb2.MODEL_STATE_LOADING,
    ModelState.READY: models_pb2.MODEL_STATE_READY,
    ModelState.UNLOADING: models_pb2.MODEL_STATE_UNLOADING,
    ModelState.FAILED: models_pb2.MODEL_STATE_FAILED,
}
_LOAD_TO_PROTO = {
    LoadPolicy.STARTUP: models_pb2.LOAD_POLICY_STARTUP,
    LoadPolicy.ON_DEMAND: models_pb2.LOAD_POLICY_ON_DEMAND,
}
# Field tags (field number << 3 | 2, length-delimited) of EmbedResponse.embeddings and Embedding.values.
_EMBED_RESPONSE_EMBEDDINGS = bytes([2 << 3 | 2])
_EMBEDDING_VALUES = bytes([1 << 3 | 2])
_FINISH_TO_PROTO = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
}


def priority(value: int) -> Priority:
    if value == common_pb2.PRIORITY_BATCH:
        return Priority.BATCH
    if value in (common_pb2.PRIORITY_UNSPECIFIED, common_pb2.PRIORITY_INTERACTIVE):
        return Priority.INTERACTIVE
    raise InvalidArgumentError(f"unknown priority {value}")


def _input_type(value: int) -> InputType:
    if value == inference_pb2.INPUT_TYPE_QUERY:
        return InputType.QUERY
    if value in (inference_pb2.INPUT_TYPE_UNSPECIFIED, inference_pb2.INPUT_TYPE_DOCUMENT):
        return InputType.DOCUMENT
    raise InvalidArgumentError(f"unknown input_type {value}")


def usage_to_proto(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def timings_to_proto(timings: Timings) -> common_pb2.Timings:
    return common_pb2.Timings(
        queue_ms=timings.queue_ms,
        inference_ms=timings.inference_ms,
        batch_size=timings.batch_size,
        time_to_first_token_ms=timings.time_to_first_token_ms,
        tokenize_ms=timings.tokenize_ms,
    )


# -- Inference -------------------------------------------------------------------------------------


def embed_request(message: inference_pb2.EmbedRequest) -> EmbedRequest:
    return EmbedRequest(
        inputs=list(message.inputs),
        model=message.model,
        input_type=_input_type(message.input_type),
        dimensions=message.dimensions,
        truncate=message.truncate,
        normalize=message.normalize if message.HasField("normalize") else None,
        priority=priority(message.priority),
        pool_chunks=message.pool_chunks,
        context=_context_request(message),
    )


def _context_request(message: inference_pb2.EmbedRequest) -> ContextRequest | None:
    if not message.context_collection and not message.context_documents:
        return None
    return ContextRequest(collection=message.context_collection, documents=tuple(message.context_documents))


def embed_response(result: EmbedResult) -> inference_pb2.EmbedResponse:
    response = inference_pb2.EmbedResponse(
        model=result.model,
        usage=usage_to_proto(result.usage),
        timings=timings_to_proto(result.timings),
        cached=result.cached,
        context_id=result.context_id,
    )
    response.MergeFromString(embeddings_wire(result.vectors))
    return response


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def embeddings_wire(vectors: FloatMatrix) -> bytes:
    """EmbedResponse's `embeddings` field (2) for `vectors`, as protobuf encodes it: a row is an
    Embedding whose packed `values` (field 1) are the row's little-endian float32 bytes. Parsed
    into the response in C, it spares a Python float per value (`tolist`, then one conversion
    each): the same message, at a fraction of the event loop's time."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    count = rows.shape[0]
    width = rows.shape[1] * 4 if rows.ndim == 2 else 0
    header = _row_header(width)
    wire = np.empty((count, len(header) + width), dtype=np.uint8)
    wire[:, : len(header)] = header
    wire[:, len(header) :] = rows.view(np.uint8).reshape(count, width)
    return wire.tobytes()


@functools.cache
def _row_header(width: int) -> NDArray[np.uint8]:
    """The bytes before each row's values in `embeddings_wire`, for rows of `width` bytes: one per
    model's dimensions, made once rather than per response."""
    embedding = _EMBEDDING_VALUES + _varint(width) if width else b""
    header = np.frombuffer(_EMBED_RESPONSE_EMBEDDINGS + _varint(len(embedding) + width) + embedding, dtype=np.uint8)
    header.flags.writeable = False
    return header


def rerank_request(message: inference_pb2.RerankRequest) -> RerankRequest:
    return RerankRequest(
        query=message.query,
        documents=list(message.documents),
        model=message.model,
        top_n=message.top_n,
        return_documents=message.return_documents,
        truncate=message.truncate,
        priority=priority(message.priority),
    )


def rerank_response(result: RerankResult) -> inference_pb2.RerankResponse:
    return inference_pb2.RerankResponse(
        model=result.model,
        results=[
            inference_pb2.RerankResult(index=r.index, score=r.score, document=r.document or "") for r in result.results
        ],
        usage=usage_to_proto(result.usage),
        timings=timings_to_proto(result.timings),
    )


def generate_request(message: inference_pb2.GenerateRequest, *, default_max_new_tokens: int) -> GenerateRequest:
    defaults = SamplingParams(max_tokens=default_max_new_tokens)
    sampling = SamplingParams(
        max_tokens=message.max_tokens or defaults.max_tokens,
        temperature=message.temperature if message.HasField("temperature") else defaults.temperature,
        top_p=message.top_p if message.HasField("top_p") else defaults.top_p,
        top_k=message.top_k or defaults.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
    )
    return GenerateRequest(
        sampling=sampling,
        model=message.model,
        prompt=message.prompt or None,
        messages=tuple(ChatMessage(role=m.role, content=m.content) for m in message.messages),
        priority=priority(message.priority),
    )


def generate_response(chunk: GenerateChunk) -> inference_pb2.GenerateResponse:
    response = inference_pb2.GenerateResponse(model=chunk.model, text=chunk.text)
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH_TO_PROTO[chunk.finish_reason]
    if chunk.usage is not None:
        response.usage.CopyFrom(usage_to_proto(chunk.usage))
    if chunk.timings is not None:
        response.timings.CopyFrom(timings_to_proto(chunk.timings))
    return response


# -- Models ----------------------------------------------------------------------------------------


def model_info(status: ModelStatus) -> models_pb2.ModelInfo:
    spec = status.spec
    info = models_pb2.ModelInfo(
        name=spec.name,
        backend=spec.backend,
        tasks=[_TASK_TO_PROTO[t] for t in spec.tasks],
        state=_STATE_TO_PROTO[status.state],
        dimensions=spec.dimensions or 0,
        max_tokens=spec.max_tokens,
        source=spec.source,
        description=spec.description,
        default_for=[_TASK_TO_PROTO[t] for t in status.default_for],
        load_policy=_LOAD_TO_PROTO[spec.load],
        memory_bytes=status.memory_bytes,
        load_seconds=status.load_seconds,
        active_requests=status.active_requests,
        error=status.error,
        pooling=spec.pooling.value,
        normalize=spec.normalize,
        query_prompt=spec.query_prompt,
        document_prompt=spec.document_prompt,
        pinned=status.pinned,
        keep_alive_seconds=status.keep_alive_seconds or 0.0,
        not_loaded_reason=status.not_loaded_reason,
        tokenizer=spec.tokenizer or "",
    )
    if status.last_used is not None:
        stamp = Timestamp()
        stamp.FromDatetime(status.last_used)
        info.last_used.CopyFrom(stamp)
    return info


def pull_progress(progress: PullProgress) -> models_pb2.PullProgress:
    return models_pb2.PullProgress(
        source=progress.source,
        downloaded_bytes=progress.downloaded_bytes,
        total_bytes=progress.total_bytes,
        file_done=progress.file_done,
        path=progress.path,
        resumed_from_bytes=progress.resumed_from_bytes,
        done=progress.done,
    )


# -- Index -----------------------------------------------------------------------------------------


def _struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    try:
        return MessageToDict(struct)
    except ValueError as exc:  # NaN or infinity: JSON has no such numbers
        raise InvalidArgumentError(f"payloads and filters hold JSON values: {exc}") from None


def _dict_to_struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def documents_from_proto(documents: Any) -> list[StoredDocument]:
    return [StoredDocument(id=d.id, text=d.text, payload=_struct_to_dict(d.payload)) for d in documents]


def filter_from_proto(message: index_pb2.SearchRequest) -> dict[str, Any] | None:
    if not message.HasField("filter"):
        return None
    return _struct_to_dict(message.filter) or None


def stored_document(point: StoredPoint) -> index_pb2.ScoredDocument:
    """A document read back by id (its chunk 0: the whole text)."""
    return index_pb2.ScoredDocument(
        document=index_pb2.Document(id=point.id, text=point.text, payload=_dict_to_struct(point.payload)),
        vector=point.vector or [],
    )


def search_hit(hit: SearchHit) -> index_pb2.ScoredDocument:
    document = hit.document
    return index_pb2.ScoredDocument(
        document=index_pb2.Document(id=document.id, text=document.text, payload=_dict_to_struct(document.payload)),
        score=hit.score,
        vector=hit.vector or [],
        rerank_score=hit.rerank_score,
        matched=index_pb2.ChunkSpan(chunk=hit.chunk, chunks=hit.chunks, start=hit.start, end=hit.end),
    )


def upsert_response(result: UpsertResult) -> index_pb2.UpsertResponse:
    return index_pb2.UpsertResponse(
        model=result.model,
        ids=result.ids,
        usage=usage_to_proto(result.usage),
        timings=timings_to_proto(result.timings),
        chunks=result.chunks,
        cached=result.cached,
    )


def search_response(result: SearchResult) -> index_pb2.SearchResponse:
    return index_pb2.SearchResponse(
        model=result.model,
        results=[search_hit(h) for h in result.hits],
        usage=usage_to_proto(result.usage),
        timings=timings_to_proto(result.timings),
        rerank_model=result.rerank_model,
    )


def collection_info(info: CollectionInfo) -> index_pb2.CollectionInfo:
    return index_pb2.CollectionInfo(
        name=info.name,
        model=info.model,
        dimensions=info.dimensions,
        documents=info.documents,
        context_id=info.context_id,
    )
