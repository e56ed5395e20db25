"""A small in-process gRPC server with canned answers, so the client is tested without the real one.

Each servicer method first consults a `Script`: a test can make the next N calls of a method fail with
a chosen status, details and trailing metadata, and read back how many calls arrived.
"""

# Servicer methods must carry the RPC names the proto gives them.
# ruff: noqa: N802

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format

from wafer_proto.v1 import (
    common_pb2,
    index_pb2,
    index_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

REPLY = ["Hello", " from", " the", " fake", " model"]


@dataclass
class Failure:
    code: grpc.StatusCode
    details: str
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass
class Script:
    """What the fake server does next, and what it saw."""

    failures: dict[str, list[Failure]] = field(default_factory=lambda: defaultdict(list))
    calls: Counter[str] = field(default_factory=Counter)
    requests: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    metadata: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))
    generate_stopped: threading.Event = field(default_factory=threading.Event)
    generate_yielded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(
        self,
        method: str,
        code: grpc.StatusCode,
        details: str = "scripted failure",
        *,
        times: int = 1,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.failures[method].extend([Failure(code, details, metadata)] * times)

    def reset(self) -> None:
        with self.lock:
            self.failures.clear()
            self.calls.clear()
            self.requests.clear()
            self.metadata.clear()
            self.generate_stopped.clear()
            self.generate_yielded = 0

    def enter(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[method] += 1
            self.requests[method].append(request)
            self.metadata[method].append({k: str(v) for k, v in context.invocation_metadata()})
            failure = self.failures[method].pop(0) if self.failures[method] else None
        if failure is not None:
            context.set_trailing_metadata(failure.metadata)
            context.abort(failure.code, failure.details)


def _usage(prompt: int, completion: int = 0) -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class FakeInference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def Embed(self, request: inference_pb2.EmbedRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("Embed", request, context)
        if "slow" in request.inputs:
            time.sleep(1.0)
        dims = request.dimensions or 4
        embeddings = [
            inference_pb2.Embedding(values=[i + k / 10 for k in range(dims)]) for i in range(len(request.inputs))
        ]
        return inference_pb2.EmbedResponse(
            model=request.model or "fake-embed",
            embeddings=embeddings,
            usage=_usage(sum(len(t.split()) for t in request.inputs)),
            timings=common_pb2.Timings(queue_ms=0.5, inference_ms=1.5, batch_size=len(request.inputs)),
        )

    def Rerank(self, request: inference_pb2.RerankRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("Rerank", request, context)
        words = set(request.query.lower().split())
        scored = [
            (len(words & set(doc.lower().split())) / (len(words) or 1), i, doc)
            for i, doc in enumerate(request.documents)
        ]
        scored.sort(key=lambda item: (-item[0], item[1]))
        if request.top_n:
            scored = scored[: request.top_n]
        return inference_pb2.RerankResponse(
            model=request.model or "fake-rerank",
            results=[
                inference_pb2.RerankResult(index=i, score=score, document=doc if request.return_documents else "")
                for score, i, doc in scored
            ],
            usage=_usage(len(request.documents)),
        )

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateResponse]:
        self.script.enter("Generate", request, context)
        model = request.model or "fake-generate"
        try:
            if request.prompt == "endless":
                for _ in range(10_000):
                    self.script.generate_yielded += 1
                    yield inference_pb2.GenerateResponse(model=model, text=".")
                    time.sleep(0.005)
                return
            for n, piece in enumerate(REPLY):
                if request.prompt == "fail-midway" and n == 2:
                    context.set_trailing_metadata((("x-request-id", "req-midway"),))
                    context.abort(grpc.StatusCode.UNAVAILABLE, "model is being unloaded")
                self.script.generate_yielded += 1
                yield inference_pb2.GenerateResponse(model=model, text=piece)
            yield inference_pb2.GenerateResponse(
                model=model,
                finish_reason=inference_pb2.FINISH_REASON_STOP,
                usage=_usage(3, len(REPLY)),
                timings=common_pb2.Timings(inference_ms=50.0, time_to_first_token_ms=12.0),
            )
        finally:
            self.script.generate_stopped.set()


def _model(name: str, **fields: Any) -> models_pb2.ModelInfo:
    info = models_pb2.ModelInfo(name=name, **fields)
    return info


MODELS = {
    "fake-embed": _model(
        "fake-embed",
        backend="onnx",
        tasks=[common_pb2.TASK_EMBED, common_pb2.TASK_RERANK],
        state=models_pb2.MODEL_STATE_READY,
        dimensions=4,
        max_tokens=256,
        default_for=[common_pb2.TASK_EMBED],
        load_policy=models_pb2.LOAD_POLICY_STARTUP,
        memory_bytes=23_000_000,
        load_seconds=0.4,
        pooling="mean",
        normalize=True,
        query_prompt="query: ",
    ),
    "fake-generate": _model(
        "fake-generate",
        backend="gguf",
        tasks=[common_pb2.TASK_GENERATE],
        state=models_pb2.MODEL_STATE_UNLOADED,
        default_for=[common_pb2.TASK_GENERATE],
        load_policy=models_pb2.LOAD_POLICY_ON_DEMAND,
    ),
    "broken": _model(
        "broken",
        backend="gguf",
        tasks=[common_pb2.TASK_GENERATE],
        state=models_pb2.MODEL_STATE_FAILED,
        error="weights not found",
    ),
}


class FakeModels(models_pb2_grpc.ModelsServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def _find(self, name: str, context: grpc.ServicerContext) -> models_pb2.ModelInfo:
        if name not in MODELS:
            context.set_trailing_metadata((("x-request-id", "req-404"),))
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}")
        info = models_pb2.ModelInfo()
        info.CopyFrom(MODELS[name])
        return info

    def ListModels(self, request: models_pb2.ListModelsRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("ListModels", request, context)
        return models_pb2.ListModelsResponse(models=list(MODELS.values()))

    def GetModel(self, request: models_pb2.GetModelRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("GetModel", request, context)
        info = self._find(request.name, context)
        info.last_used.FromSeconds(1_700_000_000)
        return info

    def LoadModel(self, request: models_pb2.LoadModelRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("LoadModel", request, context)
        info = self._find(request.name, context)
        if info.state != models_pb2.MODEL_STATE_FAILED:
            info.state = models_pb2.MODEL_STATE_READY
            info.memory_bytes = 98_000_000
            info.load_seconds = 1.25
        return info

    def UnloadModel(self, request: models_pb2.UnloadModelRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("UnloadModel", request, context)
        info = self._find(request.name, context)
        info.state = models_pb2.MODEL_STATE_UNLOADED
        info.memory_bytes = 0
        return info

    def QuantizeModel(self, request: models_pb2.QuantizeModelRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("QuantizeModel", request, context)
        info = self._find(request.source_model, context)
        info.name = request.name
        info.state = models_pb2.MODEL_STATE_READY
        return info

    def PullModel(self, request: models_pb2.PullModelRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("PullModel", request, context)
        info = self._find(request.name, context)
        yield models_pb2.PullProgress(source=info.source, downloaded_bytes=0, total_bytes=10)
        yield models_pb2.PullProgress(source=info.source, downloaded_bytes=10, total_bytes=10, file_done=True)
        yield models_pb2.PullProgress(done=True)


class FakeIndex(index_pb2_grpc.IndexServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.collections: dict[str, dict[str, index_pb2.Document]] = {}

    def Upsert(self, request: index_pb2.UpsertRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("Upsert", request, context)
        store = self.collections.setdefault(request.collection, {})
        ids = []
        for doc in request.documents:
            stored = index_pb2.Document()
            stored.CopyFrom(doc)
            stored.id = doc.id or f"derived-{abs(hash(doc.text)) % 10_000}"
            store[stored.id] = stored
            ids.append(stored.id)
        return index_pb2.UpsertResponse(model=request.model or "fake-embed", ids=ids, usage=_usage(len(ids)))

    def _store(self, name: str, context: grpc.ServicerContext) -> dict[str, index_pb2.Document]:
        if name not in self.collections:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown collection {name!r}")
        return self.collections[name]

    def Search(self, request: index_pb2.SearchRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("Search", request, context)
        store = self._store(request.collection, context)
        conditions = json_format.MessageToDict(request.filter) if request.HasField("filter") else {}
        words = set(request.query.lower().split())
        results = []
        for doc in store.values():
            payload = json_format.MessageToDict(doc.payload)
            if any(payload.get(k) != v for k, v in conditions.items()):
                continue
            score = len(words & set(doc.text.lower().split())) / (len(words) or 1)
            vector = [0.5, 0.5] if request.with_vectors else []
            results.append(index_pb2.ScoredDocument(document=doc, score=score, vector=vector))
        results.sort(key=lambda r: -r.score)
        return index_pb2.SearchResponse(model="fake-embed", results=results[: request.top_k or 10])

    def GetDocuments(self, request: index_pb2.GetDocumentsRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("GetDocuments", request, context)
        store = self._store(request.collection, context)
        return index_pb2.GetDocumentsResponse(
            documents=[
                index_pb2.ScoredDocument(document=store[i], vector=[1.0, 0.0] if request.with_vectors else [])
                for i in request.ids
                if i in store
            ]
        )

    def DeleteDocuments(self, request: index_pb2.DeleteDocumentsRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("DeleteDocuments", request, context)
        store = self._store(request.collection, context)
        for i in request.ids:
            store.pop(i, None)
        return index_pb2.DeleteDocumentsResponse()

    def ListCollections(self, request: index_pb2.ListCollectionsRequest, context: grpc.ServicerContext) -> Any:
        self.script.enter("ListCollections", request, context)
        return index_pb2.ListCollectionsResponse(
            collections=[
                index_pb2.CollectionInfo(name=name, model="fake-embed", dimensions=4, documents=len(docs))
                for name, docs in sorted(self.collections.items())
            ]
        )


@dataclass
class FakeServer:
    address: str
    unix_address: str
    script: Script
    index: FakeIndex
