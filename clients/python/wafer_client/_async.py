"""The asyncio client (grpc.aio). Same methods as the blocking client, awaited."""

# ASYNC109 prefers asyncio.timeout(), but a per-call `timeout` here is the gRPC deadline the server sees
# and uses to drop queued work; a client-side asyncio timeout could not tell the server anything.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any, TypeVar, Unpack

import grpc

from wafer_client import _convert
from wafer_client._base import USE_CLIENT_DEFAULT, ClientOptions, Timeout
from wafer_client._connection import AsyncConnection
from wafer_client._convert import DocumentInput, MessageInput, SourceInput
from wafer_client.errors import from_rpc_error
from wafer_client.types import (
    CollectionInfo,
    Completion,
    EmbedResult,
    GenerationChunk,
    InputType,
    Job,
    ModelInfo,
    Priority,
    PullProgress,
    RerankResult,
    SearchResult,
    StoredDocument,
    UpsertResult,
)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")


class AsyncWaferClient(AsyncConnection):
    """An asyncio Wafer client. One instance holds one channel, opened on first use and bound to that
    event loop; construct it anywhere, use and close it on one loop.

    ``address`` is ``host:port`` or ``unix:///path`` (default: ``$WAFER_ADDRESS``, else
    ``127.0.0.1:50051``). ``timeout`` is each call's deadline in seconds (None: no deadline) and can be
    overridden per call. ``retries`` is how many times a call failing with RESOURCE_EXHAUSTED or
    UNAVAILABLE is retried (so 2 means up to 3 attempts), or a :class:`RetryPolicy`. ``metadata`` is sent
    with every call (e.g. ``{"authorization": "Bearer ..."}``). TLS is used when ``tls`` is true or
    certificates are given; ``credentials`` overrides all of that.

    Every failed call raises a :class:`wafer_client.errors.WaferError` subclass.
    """

    def __init__(self, address: str | None = None, **options: Unpack[ClientOptions]) -> None:
        super().__init__(address, **options)

    # Calling

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        timeout: Timeout,
        *,
        retry: bool = True,
    ) -> Resp:
        deadline = self._deadline(timeout)
        attempt = 1
        while True:
            try:
                return await method(request, timeout=self._remaining(deadline), metadata=self._call_metadata())
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                delay = self._retry_delay(error, attempt, deadline) if retry else None
                if delay is None:
                    raise error from rpc_error
            await asyncio.sleep(delay)
            attempt += 1

    async def _stream(
        self,
        method: grpc.aio.UnaryStreamMultiCallable[Req, Resp],
        request: Req,
        timeout: Timeout,
        convert: Callable[[Resp], T],
    ) -> AsyncGenerator[T, None]:
        deadline = self._deadline(timeout)
        attempt = 1
        while True:
            call = method(request, timeout=self._remaining(deadline), metadata=self._call_metadata())
            started = False
            try:
                async for response in call:
                    started = True
                    yield convert(response)
                return
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                # Once text reached the caller a retry would repeat or contradict it: fail instead.
                delay = None if started else self._retry_delay(error, attempt, deadline)
                if delay is None:
                    raise error from rpc_error
            finally:
                # A caller that stops iterating early must not leave the server generating for nobody.
                call.cancel()
            await asyncio.sleep(delay)
            attempt += 1

    # Inference

    async def embed(
        self,
        inputs: str | Sequence[str],
        *,
        model: str = "",
        input_type: InputType = "document",
        dimensions: int = 0,
        truncate: bool = False,
        normalize: bool | None = None,
        priority: Priority = "interactive",
        pool_chunks: bool = False,
        context_collection: str = "",
        context_documents: Sequence[str] = (),
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> EmbedResult:
        """Embeds each input into one vector: ``result.vectors`` is float32 [len(inputs), dimensions].

        ``pool_chunks``: an input longer than the model's window is read whole, as the mean of its
        overlapping windows' vectors, instead of being refused (or cut, with ``truncate``).
        Contextual models (cde-small-v1) only: ``context_collection`` embeds in the context stored
        with that collection, ``context_documents`` in a context built from those corpus documents;
        ``result.context_id`` names the context used.
        """
        request = _convert.embed_request(
            inputs,
            model=model,
            input_type=input_type,
            dimensions=dimensions,
            truncate=truncate,
            normalize=normalize,
            priority=priority,
            pool_chunks=pool_chunks,
            context_collection=context_collection,
            context_documents=context_documents,
        )
        return _convert.embed_result(await self._unary(self._inference.Embed, request, timeout))

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        model: str = "",
        top_n: int = 0,
        return_documents: bool = False,
        truncate: bool = False,
        priority: Priority = "interactive",
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> RerankResult:
        """Scores documents against the query; results come best first (``top_n`` 0 returns all)."""
        request = _convert.rerank_request(
            query,
            documents,
            model=model,
            top_n=top_n,
            return_documents=return_documents,
            truncate=truncate,
            priority=priority,
        )
        return _convert.rerank_result(await self._unary(self._inference.Rerank, request, timeout))

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[MessageInput] | None = None,
        model: str = "",
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        priority: Priority = "interactive",
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> AsyncGenerator[GenerationChunk, None]:
        """Streams generated text from a raw ``prompt`` or a chat (``messages``), one delta per chunk; the
        last chunk carries ``finish_reason``, ``usage`` and ``timings``. To stop early, ``await
        stream.aclose()``: that cancels the call on the server at once, where merely leaving the loop
        waits for the garbage collector."""
        request = _convert.generate_request(
            prompt,
            messages=messages,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            priority=priority,
        )
        return self._stream(self._inference.Generate, request, timeout, _convert.generation_chunk)

    async def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[MessageInput] | None = None,
        model: str = "",
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        priority: Priority = "interactive",
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> Completion:
        """:meth:`generate`, joined into one :class:`Completion`."""
        chunks = self.generate(
            prompt,
            messages=messages,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            priority=priority,
            timeout=timeout,
        )
        return _convert.completion([chunk async for chunk in chunks])

    # Models

    async def list_models(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[ModelInfo]:
        response = await self._unary(self._models.ListModels, _convert.list_models_request(), timeout)
        return [_convert.model_info(m) for m in response.models]

    async def get_model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        request = _convert.get_model_request(name)
        return _convert.model_info(await self._unary(self._models.GetModel, request, timeout))

    async def load_model(
        self,
        name: str,
        *,
        spec: str | Mapping[str, Any] | None = None,
        pinned: bool | None = None,
        keep_alive_seconds: float | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ModelInfo:
        """Loads a model and returns once it is ready. ``spec`` (a mapping of models.yaml fields, or
        that as YAML/JSON text) swaps a serving model to it without failing a request, or registers a
        new model under ``name``; a spec that fails to load changes nothing and raises
        FailedPreconditionError. ``pinned`` and ``keep_alive_seconds`` (0: kept loaded) override
        models.yaml's until the server stops."""
        request = _convert.load_model_request(name, spec=spec, pinned=pinned, keep_alive_seconds=keep_alive_seconds)
        return _convert.model_info(await self._unary(self._models.LoadModel, request, timeout))

    async def quantize_model(
        self,
        source_model: str,
        name: str,
        *,
        per_tensor: bool = False,
        static: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ModelInfo:
        """Has the server quantize the fp32 ONNX model ``source_model`` to int8 and register it as
        ``name`` (loaded). Weights get one scale per output channel unless ``per_tensor``.
        ``static``: activations' ranges calibrated once on texts the server builds (QDQ, int8 end
        to end) instead of measured per call; faster, less faithful (bench/RESULTS.md)."""
        request = _convert.quantize_model_request(source_model, name, per_tensor=per_tensor, static=static)
        return _convert.model_info(await self._unary(self._models.QuantizeModel, request, timeout, retry=False))

    def pull_model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> AsyncGenerator[PullProgress, None]:
        """Has the server download the model's hf:// files into its cache, streaming progress. An
        interrupted pull resumes where it stopped when called again."""
        request = _convert.pull_model_request(name)
        return self._stream(self._models.PullModel, request, timeout, _convert.pull_progress)

    async def unload_model(
        self, name: str, drain_timeout_seconds: float = 0, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> ModelInfo:
        """Unloads a model once the requests holding it finish (``drain_timeout_seconds`` 0: the
        server's default wait)."""
        request = _convert.unload_model_request(name, drain_timeout_seconds=drain_timeout_seconds)
        return _convert.model_info(await self._unary(self._models.UnloadModel, request, timeout))

    # Index

    async def upsert(
        self,
        collection: str,
        documents: Sequence[DocumentInput],
        *,
        model: str = "",
        truncate: bool = False,
        priority: Priority = "interactive",
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> UpsertResult:
        """Embeds and writes documents (``Document``, ``{"id", "text", "payload"}`` dicts or bare
        texts); writing an id again replaces it, so retrying is safe."""
        request = _convert.upsert_request(collection, documents, model=model, truncate=truncate, priority=priority)
        return _convert.upsert_result(await self._unary(self._index.Upsert, request, timeout))

    async def search(
        self,
        collection: str,
        query: str,
        *,
        top_k: int = 10,
        filter: Mapping[str, Any] | None = None,
        with_vectors: bool = False,
        rerank_model: str = "",
        rerank_top_n: int = 0,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> SearchResult:
        """The ``top_k`` documents nearest the query, one hit per document (its best chunk).

        ``filter`` holds exact-match payload conditions. ``rerank_model`` reranks the nearest
        ``rerank_top_n`` chunks (0: max(top_k, 20)) with that model; hits then come in rerank order.
        """
        request = _convert.search_request(
            collection,
            query,
            top_k=top_k,
            filter=filter,
            with_vectors=with_vectors,
            rerank_model=rerank_model,
            rerank_top_n=rerank_top_n,
        )
        return _convert.search_result(await self._unary(self._index.Search, request, timeout))

    async def get_documents(
        self,
        collection: str,
        ids: Sequence[str],
        *,
        with_vectors: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[StoredDocument]:
        """Documents by id, in request order; unknown ids are left out."""
        request = _convert.get_documents_request(collection, ids, with_vectors=with_vectors)
        return _convert.stored_documents(await self._unary(self._index.GetDocuments, request, timeout))

    async def delete_documents(
        self, collection: str, ids: Sequence[str], *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        request = _convert.delete_documents_request(collection, ids)
        await self._unary(self._index.DeleteDocuments, request, timeout)

    async def list_collections(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[CollectionInfo]:
        response = await self._unary(self._index.ListCollections, _convert.list_collections_request(), timeout)
        return _convert.collections(response)

    # Jobs

    async def submit_job(
        self,
        collection: str,
        source: SourceInput,
        *,
        model: str = "",
        when_idle: bool = False,
        idle_seconds: float = 0,
        when_charging: bool = False,
        batch_size: int = 0,
        truncate: bool = False,
        fresh_context: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> Job:
        """Queues a background job that embeds ``source`` (a :class:`JsonlSource`, a :class:`SqliteSource`
        or documents as for :meth:`upsert`) into ``collection``. ``when_idle`` / ``when_charging`` hold it
        until the server has seen no interactive request for ``idle_seconds`` (0: the server's default) /
        the machine is on mains power. ``fresh_context`` (contextual models): empty the collection and
        re-index it with a context sampled afresh from ``source``. Not retried: a retry could queue the job
        twice."""
        request = _convert.submit_job_request(
            collection,
            source,
            model=model,
            when_idle=when_idle,
            idle_seconds=idle_seconds,
            when_charging=when_charging,
            batch_size=batch_size,
            truncate=truncate,
            fresh_context=fresh_context,
        )
        return _convert.job(await self._unary(self._jobs.SubmitJob, request, timeout, retry=False))

    async def get_job(self, job_id: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Job:
        return _convert.job(await self._unary(self._jobs.GetJob, _convert.get_job_request(job_id), timeout))

    async def list_jobs(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[Job]:
        """Every job the server knows, newest first."""
        response = await self._unary(self._jobs.ListJobs, _convert.list_jobs_request(), timeout)
        return [_convert.job(j) for j in response.jobs]

    def watch_job(self, job_id: str, *, timeout: Timeout = None) -> AsyncGenerator[Job, None]:
        """The job now, then whenever it changes (at least every second while it runs), until it ends;
        the last one yielded is its final state. No deadline unless ``timeout`` is given."""
        return self._stream(self._jobs.WatchJob, _convert.watch_job_request(job_id), timeout, _convert.job)

    async def wait_job(self, job_id: str, *, timeout: Timeout = None) -> Job:
        """Blocks until the job ends and returns its final state (check ``state`` and ``error``)."""
        final: Job | None = None
        async for job in self.watch_job(job_id, timeout=timeout):
            final = job
        assert final is not None, "WatchJob always sends the job's state first"
        return final

    async def pause_job(self, job_id: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Job:
        """Stops the job after its last written batch; :meth:`resume_job` continues it."""
        return _convert.job(await self._unary(self._jobs.PauseJob, _convert.pause_job_request(job_id), timeout))

    async def resume_job(self, job_id: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Job:
        """Queues a paused (or failed) job again; it continues from its checkpoint."""
        return _convert.job(await self._unary(self._jobs.ResumeJob, _convert.resume_job_request(job_id), timeout))

    async def cancel_job(self, job_id: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Job:
        """Ends the job for good; what it already wrote stays in the collection."""
        return _convert.job(await self._unary(self._jobs.CancelJob, _convert.cancel_job_request(job_id), timeout))

    # Health

    async def health(self, service: str = "", *, timeout: Timeout = USE_CLIENT_DEFAULT) -> str:
        """The server's serving status ("SERVING", "NOT_SERVING", ...) for ``service`` ("" is the whole
        server; e.g. "wafer.v1.Inference" for one service). Not retried: it answers "now"."""
        return await self._unary(self._health_check, service, timeout, retry=False)
