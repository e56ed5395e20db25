"""gRPC servicers: translate, call the domain service, translate back. Errors are raised as
WaferErrors and mapped in one place (rpc.interceptor)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

from wafer.engine import InferenceEngine
from wafer.errors import InvalidArgumentError
from wafer.indexing import IndexService
from wafer.jobs import JobManager
from wafer.pull import HubPuller, hub_sources, in_thread
from wafer.quantize import quantize_model
from wafer.registry import ModelRegistry
from wafer.rpc import convert, convert_jobs
from wafer.rpc.interceptor import report
from wafer_proto.v1 import (
    index_pb2,
    index_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

# An hour: longer than any request should hold a model, short enough to be a typo if exceeded.
MAX_DRAIN_TIMEOUT_SECONDS = 3600.0
# A models.yaml entry is a few hundred characters; this is room for long prompts and descriptions.
MAX_SPEC_CHARS = 64 * 1024
# A month: a keep-alive longer than that is "forever", which 0 says.
MAX_KEEP_ALIVE_SECONDS = 30 * 86400.0

Context = Any  # grpc.aio.ServicerContext; the servicers never touch it


def _name(value: str) -> str:
    if not value:
        raise InvalidArgumentError("name must not be empty")
    return value


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: InferenceEngine, *, default_max_new_tokens: int) -> None:
        """`default_max_new_tokens`: Generate's max_tokens when a request leaves it unset."""
        self._engine = engine
        self._default_max_new_tokens = default_max_new_tokens

    async def Embed(  # noqa: N802 - names come from the proto
        self, request: inference_pb2.EmbedRequest, context: Context
    ) -> inference_pb2.EmbedResponse:
        result = await self._engine.embed(convert.embed_request(request))
        report(result.model, result.timings)
        return convert.embed_response(result)

    async def Rerank(  # noqa: N802
        self, request: inference_pb2.RerankRequest, context: Context
    ) -> inference_pb2.RerankResponse:
        result = await self._engine.rerank(convert.rerank_request(request))
        report(result.model, result.timings)
        return convert.rerank_response(result)

    async def Generate(  # noqa: N802
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        async for chunk in self._engine.generate(
            convert.generate_request(request, default_max_new_tokens=self._default_max_new_tokens)
        ):
            report(chunk.model, chunk.timings)
            yield convert.generate_response(chunk)


class ModelsServicer(models_pb2_grpc.ModelsServicer):
    def __init__(self, registry: ModelRegistry, *, drain_timeout_seconds: float) -> None:
        self._registry = registry
        self._drain_timeout = drain_timeout_seconds

    async def ListModels(  # noqa: N802
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        return models_pb2.ListModelsResponse(models=[convert.model_info(s) for s in self._registry.statuses()])

    async def GetModel(  # noqa: N802
        self, request: models_pb2.GetModelRequest, context: Context
    ) -> models_pb2.ModelInfo:
        return convert.model_info(self._registry.status(_name(request.name)))

    async def LoadModel(  # noqa: N802
        self, request: models_pb2.LoadModelRequest, context: Context
    ) -> models_pb2.ModelInfo:
        name = _name(request.name)
        if len(request.spec) > MAX_SPEC_CHARS:
            raise InvalidArgumentError(
                f"spec is {len(request.spec)} characters; a models.yaml entry fits in {MAX_SPEC_CHARS}"
            )
        spec = self._registry.spec_from_api(name, request.spec) if request.spec else None
        keep_alive = request.keep_alive_seconds if request.HasField("keep_alive_seconds") else None
        if keep_alive is not None and not (math.isfinite(keep_alive) and 0 <= keep_alive <= MAX_KEEP_ALIVE_SECONDS):
            raise InvalidArgumentError(
                f"keep_alive_seconds must be between 0 (kept loaded) and {MAX_KEEP_ALIVE_SECONDS:g}, not {keep_alive!r}"
            )
        await self._registry.load(
            name,
            spec=spec,
            pinned=request.pinned if request.HasField("pinned") else None,
            keep_alive_seconds=keep_alive,
        )
        # A swap answers once the old instance is freed, so the memory shown is the new one's; a
        # request still holding the old one past the drain timeout leaves it to be freed later.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._drain_timeout):
                await self._registry.wait_retired(name)
        return convert.model_info(self._registry.status(name))

    async def QuantizeModel(  # noqa: N802
        self, request: models_pb2.QuantizeModelRequest, context: Context
    ) -> models_pb2.ModelInfo:
        status = await quantize_model(
            self._registry,
            _name(request.source_model),
            _name(request.name),
            per_channel=not request.per_tensor,
            static=request.method == models_pb2.QUANTIZATION_METHOD_STATIC,
        )
        return convert.model_info(status)

    async def PullModel(  # noqa: N802
        self, request: models_pb2.PullModelRequest, context: Context
    ) -> AsyncIterator[models_pb2.PullProgress]:
        spec = self._registry.spec(_name(request.name))
        resolver = self._registry.resolver
        puller = HubPuller(resolver.cache_dir, endpoint=resolver.hub_endpoint)
        for source in hub_sources(spec):
            async for progress in in_thread(puller.pull(source, model=spec.name)):
                yield convert.pull_progress(progress)
        yield models_pb2.PullProgress(done=True)

    async def UnloadModel(  # noqa: N802
        self, request: models_pb2.UnloadModelRequest, context: Context
    ) -> models_pb2.ModelInfo:
        drain = request.drain_timeout_seconds
        if not (math.isfinite(drain) and 0 <= drain <= MAX_DRAIN_TIMEOUT_SECONDS):
            raise InvalidArgumentError(
                f"drain_timeout_seconds must be between 0 and {MAX_DRAIN_TIMEOUT_SECONDS:g}, not {drain!r}"
            )
        status = await self._registry.unload(_name(request.name), request.drain_timeout_seconds or None)
        return convert.model_info(status)


class IndexServicer(index_pb2_grpc.IndexServicer):
    def __init__(self, index: IndexService) -> None:
        self._index = index

    async def Upsert(  # noqa: N802
        self, request: index_pb2.UpsertRequest, context: Context
    ) -> index_pb2.UpsertResponse:
        result = await self._index.upsert(
            request.collection,
            convert.documents_from_proto(request.documents),
            model=request.model,
            truncate=request.truncate,
            priority=convert.priority(request.priority),
        )
        report(result.model, result.timings)
        return convert.upsert_response(result)

    async def Search(  # noqa: N802
        self, request: index_pb2.SearchRequest, context: Context
    ) -> index_pb2.SearchResponse:
        if not request.query.strip():
            raise InvalidArgumentError("query must not be empty")
        result = await self._index.search(
            request.collection,
            request.query,
            top_k=request.top_k,
            filter=convert.filter_from_proto(request),
            with_vectors=request.with_vectors,
            rerank_model=request.rerank_model,
            rerank_top_n=request.rerank_top_n,
        )
        report(result.model, result.timings)
        return convert.search_response(result)

    async def GetDocuments(  # noqa: N802
        self, request: index_pb2.GetDocumentsRequest, context: Context
    ) -> index_pb2.GetDocumentsResponse:
        found = await self._index.get_documents(
            request.collection, list(request.ids), with_vectors=request.with_vectors
        )
        return index_pb2.GetDocumentsResponse(documents=[convert.stored_document(d) for d in found])

    async def DeleteDocuments(  # noqa: N802
        self, request: index_pb2.DeleteDocumentsRequest, context: Context
    ) -> index_pb2.DeleteDocumentsResponse:
        await self._index.delete_documents(request.collection, list(request.ids))
        return index_pb2.DeleteDocumentsResponse()

    async def ListCollections(  # noqa: N802
        self, request: index_pb2.ListCollectionsRequest, context: Context
    ) -> index_pb2.ListCollectionsResponse:
        collections = await self._index.list_collections()
        return index_pb2.ListCollectionsResponse(collections=[convert.collection_info(c) for c in collections])


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(self, jobs: JobManager) -> None:
        self._jobs = jobs

    async def SubmitJob(  # noqa: N802
        self, request: jobs_pb2.SubmitJobRequest, context: Context
    ) -> jobs_pb2.Job:
        return convert_jobs.job(await self._jobs.submit(convert_jobs.job_request(request)))

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Context) -> jobs_pb2.Job:  # noqa: N802
        return convert_jobs.job(self._jobs.get(convert_jobs.job_id(request.id)))

    async def WatchJob(  # noqa: N802
        self, request: jobs_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[jobs_pb2.Job]:
        async for status in self._jobs.watch(convert_jobs.job_id(request.id)):
            yield convert_jobs.job(status)

    async def PauseJob(self, request: jobs_pb2.PauseJobRequest, context: Context) -> jobs_pb2.Job:  # noqa: N802
        return convert_jobs.job(await self._jobs.pause(convert_jobs.job_id(request.id)))

    async def ResumeJob(self, request: jobs_pb2.ResumeJobRequest, context: Context) -> jobs_pb2.Job:  # noqa: N802
        return convert_jobs.job(await self._jobs.resume(convert_jobs.job_id(request.id)))

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: Context) -> jobs_pb2.Job:  # noqa: N802
        return convert_jobs.job(await self._jobs.cancel(convert_jobs.job_id(request.id)))

    async def ListJobs(  # noqa: N802
        self, request: jobs_pb2.ListJobsRequest, context: Context
    ) -> jobs_pb2.ListJobsResponse:
        return jobs_pb2.ListJobsResponse(jobs=[convert_jobs.job(s) for s in self._jobs.all()])
