"""Protobuf ⇄ client types, shared by both clients. Requests are built (and checked) here, eagerly, so a
bad argument fails at the call site rather than inside a stream or a retry loop."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import EnumDescriptor

from wafer_client.errors import InternalError
from wafer_client.types import (
    ChatMessage,
    CollectionInfo,
    Completion,
    Document,
    EmbedResult,
    FinishReason,
    GenerationChunk,
    Job,
    JsonlSource,
    ModelInfo,
    PullProgress,
    RerankHit,
    RerankResult,
    SearchHit,
    SearchResult,
    SqliteSource,
    StoredDocument,
    Timings,
    UpsertResult,
    Usage,
    Vector,
)
from wafer_proto.v1 import common_pb2, index_pb2, inference_pb2, jobs_pb2, models_pb2

DocumentInput = Document | Mapping[str, Any] | str
MessageInput = ChatMessage | Mapping[str, str]
SourceInput = JsonlSource | SqliteSource | Sequence[DocumentInput]

_PRIORITY = {
    "interactive": common_pb2.PRIORITY_INTERACTIVE,
    "batch": common_pb2.PRIORITY_BATCH,
}
_INPUT_TYPE = {
    "document": inference_pb2.INPUT_TYPE_DOCUMENT,
    "query": inference_pb2.INPUT_TYPE_QUERY,
}
_FINISH_REASON: dict[int, FinishReason] = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
}
_DOCUMENT_KEYS = frozenset({"id", "text", "payload"})


def _choice(table: Mapping[str, int], value: str, what: str) -> Any:
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(table)}, not {value!r}") from None


def _strings(values: Sequence[str] | str, what: str) -> list[str]:
    # A str is itself a Sequence[str]: without this, rerank("q", "doc") would rank single letters.
    if isinstance(values, str):
        raise TypeError(f"{what} must be a sequence of strings, not a single string")
    return list(values)


def _struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    result = struct_pb2.Struct()
    result.update(dict(value))
    return result


def _label(enum: EnumDescriptor, prefix: str, number: int) -> str:
    value = enum.values_by_number.get(number)
    # A newer server may send enum values this client does not know; show the number, do not fail.
    return value.name.removeprefix(prefix).lower() if value is not None else str(number)


# Requests


def embed_request(
    inputs: str | Sequence[str],
    *,
    model: str,
    input_type: str,
    dimensions: int,
    truncate: bool,
    normalize: bool | None,
    priority: str,
    pool_chunks: bool = False,
    context_collection: str = "",
    context_documents: Sequence[str] = (),
) -> inference_pb2.EmbedRequest:
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if context_collection and context_documents:
        raise ValueError("set at most one of context_collection and context_documents")
    request = inference_pb2.EmbedRequest(
        model=model,
        inputs=texts,
        input_type=_choice(_INPUT_TYPE, input_type, "input_type"),
        dimensions=dimensions,
        truncate=truncate,
        priority=_choice(_PRIORITY, priority, "priority"),
        pool_chunks=pool_chunks,
        context_collection=context_collection,
        context_documents=list(context_documents),
    )
    if normalize is not None:
        request.normalize = normalize
    return request


def rerank_request(
    query: str,
    documents: Sequence[str],
    *,
    model: str,
    top_n: int,
    return_documents: bool,
    truncate: bool,
    priority: str,
) -> inference_pb2.RerankRequest:
    return inference_pb2.RerankRequest(
        model=model,
        query=query,
        documents=_strings(documents, "documents"),
        top_n=top_n,
        return_documents=return_documents,
        truncate=truncate,
        priority=_choice(_PRIORITY, priority, "priority"),
    )


def _message(message: MessageInput) -> inference_pb2.ChatMessage:
    if isinstance(message, ChatMessage):
        return inference_pb2.ChatMessage(role=message.role, content=message.content)
    return inference_pb2.ChatMessage(role=message["role"], content=message["content"])


def generate_request(
    prompt: str | None,
    *,
    messages: Sequence[MessageInput] | None,
    model: str,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int,
    seed: int | None,
    stop: Sequence[str],
    priority: str,
) -> inference_pb2.GenerateRequest:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    request = inference_pb2.GenerateRequest(
        model=model,
        prompt=prompt or "",
        messages=[_message(m) for m in messages or ()],
        max_tokens=max_tokens,
        top_k=top_k,
        stop=_strings(stop, "stop"),
        priority=_choice(_PRIORITY, priority, "priority"),
    )
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = seed
    return request


def _document(document: DocumentInput) -> index_pb2.Document:
    if isinstance(document, str):
        return index_pb2.Document(text=document)
    if isinstance(document, Document):
        return index_pb2.Document(id=document.id, text=document.text, payload=_struct(document.payload))
    unknown = set(document) - _DOCUMENT_KEYS
    if unknown:
        # Guessing that stray keys belong in the payload would silently index the wrong thing.
        raise ValueError(f"unknown document keys {sorted(unknown)}; put extra fields under 'payload'")
    return index_pb2.Document(
        id=str(document.get("id", "")),
        text=str(document.get("text", "")),
        payload=_struct(document.get("payload")),
    )


def upsert_request(
    collection: str,
    documents: Sequence[DocumentInput],
    *,
    model: str,
    truncate: bool,
    priority: str,
) -> index_pb2.UpsertRequest:
    if isinstance(documents, str | Mapping | Document):
        raise TypeError("documents must be a sequence of documents, not a single one")
    return index_pb2.UpsertRequest(
        collection=collection,
        model=model,
        documents=[_document(d) for d in documents],
        truncate=truncate,
        priority=_choice(_PRIORITY, priority, "priority"),
    )


def search_request(
    collection: str,
    query: str,
    *,
    top_k: int,
    filter: Mapping[str, Any] | None,
    with_vectors: bool,
    rerank_model: str = "",
    rerank_top_n: int = 0,
) -> index_pb2.SearchRequest:
    return index_pb2.SearchRequest(
        collection=collection,
        query=query,
        top_k=top_k,
        filter=_struct(filter),
        with_vectors=with_vectors,
        rerank_model=rerank_model,
        rerank_top_n=rerank_top_n,
    )


# Responses


def usage(message: common_pb2.Usage) -> Usage:
    return Usage(
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        total_tokens=message.total_tokens,
    )


def timings(message: common_pb2.Timings) -> Timings:
    return Timings(
        queue_ms=message.queue_ms,
        inference_ms=message.inference_ms,
        batch_size=message.batch_size,
        time_to_first_token_ms=message.time_to_first_token_ms,
        tokenize_ms=message.tokenize_ms,
    )


def _vector(values: Iterable[float]) -> Vector:
    return np.fromiter(values, dtype=np.float32)


def embed_result(response: inference_pb2.EmbedResponse) -> EmbedResult:
    rows = [_vector(e.values) for e in response.embeddings]
    if not rows:
        vectors = np.zeros((0, 0), dtype=np.float32)
    elif len({row.shape[0] for row in rows}) != 1:
        raise InternalError(f"server returned vectors of different lengths from model {response.model!r}")
    else:
        vectors = np.stack(rows)
    return EmbedResult(
        model=response.model,
        vectors=vectors,
        usage=usage(response.usage),
        timings=timings(response.timings),
        cached=response.cached,
        context_id=response.context_id,
    )


def rerank_result(response: inference_pb2.RerankResponse) -> RerankResult:
    return RerankResult(
        model=response.model,
        results=[RerankHit(index=r.index, score=r.score, document=r.document) for r in response.results],
        usage=usage(response.usage),
        timings=timings(response.timings),
    )


def generation_chunk(response: inference_pb2.GenerateResponse) -> GenerationChunk:
    finish = _FINISH_REASON.get(response.finish_reason)
    last = finish is not None
    return GenerationChunk(
        text=response.text,
        model=response.model,
        finish_reason=finish,
        usage=usage(response.usage) if last or response.HasField("usage") else None,
        timings=timings(response.timings) if last or response.HasField("timings") else None,
    )


def model_info(message: models_pb2.ModelInfo) -> ModelInfo:
    task = common_pb2.Task.DESCRIPTOR
    return ModelInfo(
        name=message.name,
        backend=message.backend,
        tasks=tuple(_label(task, "TASK_", t) for t in message.tasks),
        state=_label(models_pb2.ModelState.DESCRIPTOR, "MODEL_STATE_", message.state),
        dimensions=message.dimensions,
        max_tokens=message.max_tokens,
        source=message.source,
        description=message.description,
        default_for=tuple(_label(task, "TASK_", t) for t in message.default_for),
        load_policy=_label(models_pb2.LoadPolicy.DESCRIPTOR, "LOAD_POLICY_", message.load_policy),
        memory_bytes=message.memory_bytes,
        load_seconds=message.load_seconds,
        last_used=message.last_used.ToDatetime(tzinfo=UTC) if message.HasField("last_used") else None,
        active_requests=message.active_requests,
        error=message.error,
        pooling=message.pooling,
        normalize=message.normalize,
        query_prompt=message.query_prompt,
        document_prompt=message.document_prompt,
        pinned=message.pinned,
        keep_alive_seconds=message.keep_alive_seconds or None,
        not_loaded_reason=message.not_loaded_reason,
        tokenizer=message.tokenizer,
    )


def load_model_request(
    name: str,
    *,
    spec: str | Mapping[str, Any] | None,
    pinned: bool | None,
    keep_alive_seconds: float | None,
) -> models_pb2.LoadModelRequest:
    request = models_pb2.LoadModelRequest(name=name)
    if spec is not None:
        request.spec = spec if isinstance(spec, str) else json.dumps(dict(spec))
    if pinned is not None:
        request.pinned = pinned
    if keep_alive_seconds is not None:
        request.keep_alive_seconds = keep_alive_seconds
    return request


def pull_progress(message: models_pb2.PullProgress) -> PullProgress:
    return PullProgress(
        source=message.source,
        downloaded_bytes=message.downloaded_bytes,
        total_bytes=message.total_bytes,
        resumed_from_bytes=message.resumed_from_bytes,
        file_done=message.file_done,
        path=message.path,
        done=message.done,
    )


def _payload(document: index_pb2.Document) -> dict[str, Any]:
    return json_format.MessageToDict(document.payload) if document.HasField("payload") else {}


def upsert_result(response: index_pb2.UpsertResponse) -> UpsertResult:
    return UpsertResult(
        model=response.model,
        ids=list(response.ids),
        usage=usage(response.usage),
        timings=timings(response.timings),
        chunks=response.chunks,
        cached=response.cached,
    )


def search_result(response: index_pb2.SearchResponse) -> SearchResult:
    hits = [
        SearchHit(
            id=r.document.id,
            text=r.document.text,
            score=r.score,
            payload=_payload(r.document),
            vector=_vector(r.vector) if r.vector else None,
            rerank_score=r.rerank_score if r.HasField("rerank_score") else None,
            chunk=r.matched.chunk,
            chunks=r.matched.chunks or 1,
            start=r.matched.start,
            end=r.matched.end if r.HasField("matched") else len(r.document.text),
        )
        for r in response.results
    ]
    return SearchResult(
        model=response.model,
        hits=hits,
        usage=usage(response.usage),
        timings=timings(response.timings),
        rerank_model=response.rerank_model,
    )


def stored_documents(response: index_pb2.GetDocumentsResponse) -> list[StoredDocument]:
    return [
        StoredDocument(
            id=d.document.id,
            text=d.document.text,
            payload=_payload(d.document),
            vector=_vector(d.vector) if d.vector else None,
        )
        for d in response.documents
    ]


def collections(response: index_pb2.ListCollectionsResponse) -> list[CollectionInfo]:
    return [
        CollectionInfo(
            name=c.name, model=c.model, dimensions=c.dimensions, documents=c.documents, context_id=c.context_id
        )
        for c in response.collections
    ]


def completion(chunks: Sequence[GenerationChunk]) -> Completion:
    """A streamed generation joined: all the text, and the last chunk's reason, usage and timings."""
    last = chunks[-1] if chunks else GenerationChunk(text="")
    return Completion(
        text="".join(chunk.text for chunk in chunks),
        model=last.model,
        finish_reason=last.finish_reason,
        usage=last.usage or Usage(),
        timings=last.timings or Timings(),
    )


# Jobs


def submit_job_request(
    collection: str,
    source: SourceInput,
    *,
    model: str,
    when_idle: bool,
    idle_seconds: float,
    when_charging: bool,
    batch_size: int,
    truncate: bool,
    fresh_context: bool = False,
) -> jobs_pb2.SubmitJobRequest:
    if batch_size < 0:
        raise ValueError("batch_size must be >= 0")
    if idle_seconds < 0:
        raise ValueError("idle_seconds must be >= 0")
    request = jobs_pb2.SubmitJobRequest(
        collection=collection,
        model=model,
        policy=jobs_pb2.RunPolicy(when_idle=when_idle, idle_seconds=idle_seconds, when_charging=when_charging),
        batch_size=batch_size,
        truncate=truncate,
        fresh_context=fresh_context,
    )
    if isinstance(source, JsonlSource):
        request.jsonl.CopyFrom(
            jobs_pb2.JsonlSource(path=source.path, id_field=source.id_field, text_field=source.text_field)
        )
    elif isinstance(source, SqliteSource):
        request.sqlite.CopyFrom(
            jobs_pb2.SqliteSource(
                path=source.path, query=source.query, id_column=source.id_column, text_column=source.text_column
            )
        )
    else:
        if isinstance(source, str):
            raise TypeError("source must be a JsonlSource, a SqliteSource or a sequence of documents, not a str")
        request.inline.CopyFrom(jobs_pb2.InlineSource(documents=[_document(d) for d in source]))
    return request


def job(message: jobs_pb2.Job) -> Job:
    def stamp(name: Literal["created", "started", "finished"]) -> datetime | None:
        return getattr(message, name).ToDatetime(tzinfo=UTC) if message.HasField(name) else None

    return Job(
        id=message.id,
        state=_label(jobs_pb2.JobState.DESCRIPTOR, "JOB_STATE_", message.state),
        reason=message.reason,
        collection=message.collection,
        model=message.model,
        source=message.source,
        done=message.done,
        skipped=message.skipped,
        total=message.total if message.HasField("total") else None,
        docs_per_second=message.docs_per_second,
        eta_seconds=message.eta_seconds if message.HasField("eta_seconds") else None,
        error=message.error,
        when_idle=message.policy.when_idle,
        idle_seconds=message.policy.idle_seconds,
        when_charging=message.policy.when_charging,
        batch_size=message.batch_size,
        created=stamp("created"),
        started=stamp("started"),
        finished=stamp("finished"),
    )


# The requests of the calls that take no more than names and flags: built here too, so the clients
# hold no protobuf code and `_sync.py` stays a mechanical copy of `_async.py`.


def list_models_request() -> models_pb2.ListModelsRequest:
    return models_pb2.ListModelsRequest()


def get_model_request(name: str) -> models_pb2.GetModelRequest:
    return models_pb2.GetModelRequest(name=name)


def quantize_model_request(
    source_model: str, name: str, *, per_tensor: bool, static: bool
) -> models_pb2.QuantizeModelRequest:
    method = models_pb2.QUANTIZATION_METHOD_STATIC if static else models_pb2.QUANTIZATION_METHOD_DYNAMIC
    return models_pb2.QuantizeModelRequest(source_model=source_model, name=name, per_tensor=per_tensor, method=method)


def pull_model_request(name: str) -> models_pb2.PullModelRequest:
    return models_pb2.PullModelRequest(name=name)


def unload_model_request(name: str, *, drain_timeout_seconds: float) -> models_pb2.UnloadModelRequest:
    return models_pb2.UnloadModelRequest(name=name, drain_timeout_seconds=drain_timeout_seconds)


def get_documents_request(collection: str, ids: Sequence[str], *, with_vectors: bool) -> index_pb2.GetDocumentsRequest:
    return index_pb2.GetDocumentsRequest(collection=collection, ids=_strings(ids, "ids"), with_vectors=with_vectors)


def delete_documents_request(collection: str, ids: Sequence[str]) -> index_pb2.DeleteDocumentsRequest:
    return index_pb2.DeleteDocumentsRequest(collection=collection, ids=_strings(ids, "ids"))


def list_collections_request() -> index_pb2.ListCollectionsRequest:
    return index_pb2.ListCollectionsRequest()


def list_jobs_request() -> jobs_pb2.ListJobsRequest:
    return jobs_pb2.ListJobsRequest()


def get_job_request(job_id: str) -> jobs_pb2.GetJobRequest:
    return jobs_pb2.GetJobRequest(id=job_id)


def watch_job_request(job_id: str) -> jobs_pb2.WatchJobRequest:
    return jobs_pb2.WatchJobRequest(id=job_id)


def pause_job_request(job_id: str) -> jobs_pb2.PauseJobRequest:
    return jobs_pb2.PauseJobRequest(id=job_id)


def resume_job_request(job_id: str) -> jobs_pb2.ResumeJobRequest:
    return jobs_pb2.ResumeJobRequest(id=job_id)


def cancel_job_request(job_id: str) -> jobs_pb2.CancelJobRequest:
    return jobs_pb2.CancelJobRequest(id=job_id)
