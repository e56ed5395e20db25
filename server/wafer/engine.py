"""The inference engine: what Embed, Rerank and Generate mean, independent of gRPC.

It validates requests against the model that will answer them, applies the model's prompts,
hands the work to the model's handle (which queues it on the model's own thread; the engine never
holds a backend), and post-processes (Matryoshka cuts, normalization,
ranking). The RPC layer only translates to and from these calls.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from wafer.backends.base import Embeddings, InputTooLongError
from wafer.cache import CachedEmbeddings, EmbeddingCache, Recipe, cached_embed
from wafer.chunking import Span
from wafer.contexts import ContextStore, sample_corpus
from wafer.domain import (
    Context,
    ContextRequest,
    EmbedRequest,
    EmbedResult,
    FloatMatrix,
    GenerateChunk,
    GenerateRequest,
    InputType,
    Priority,
    RankedDocument,
    RerankRequest,
    RerankResult,
    Timings,
    Usage,
)
from wafer.errors import InvalidArgumentError, NotFoundError
from wafer.registry import ModelRegistry
from wafer.scheduler import ModelHandle, Scheduled
from wafer.specs import ModelSpec, RerankMethod, Task

CHAT_ROLES = frozenset({"system", "user", "assistant"})
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def _timings(scheduled: Scheduled[Any], *, waited: float, batch_size: int | None = None) -> Timings:
    """`waited`: time before the scheduler saw the request (a model loading on demand)."""
    return Timings(
        queue_ms=_ms(waited + scheduled.queued_seconds),
        inference_ms=_ms(scheduled.inference_seconds),
        batch_size=batch_size or scheduled.batch_size,
        tokenize_ms=_ms(scheduled.tokenize_seconds),
    )


def _finish(vectors: FloatMatrix, dimensions: int, normalize: bool) -> FloatMatrix:
    """A backend's pooled vectors as Embed returns them: cut to `dimensions`, then normalized."""
    cut = vectors[:, :dimensions]
    return np.ascontiguousarray(l2_normalize(cut) if normalize else cut, dtype=np.float32)


def _takes_no_context(model: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"model {model!r} takes no context; a context (context_collection, context_documents) is for "
        "contextual models such as cde-small-v1"
    )


def l2_normalize(vectors: FloatMatrix) -> FloatMatrix:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalized: FloatMatrix = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return normalized


class EngineObserver(Protocol):
    """Told about finished generations, which only the engine sees whole (the metrics implement
    it; batches are reported by the model's scheduler and handle)."""

    def record_generation(self, model: str, prompt_tokens: int, generated_tokens: int) -> None: ...


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The settings the engine checks requests against (app.py builds them from Settings)."""

    max_inputs_per_request: int
    max_input_bytes: int
    max_new_tokens_limit: int


class InferenceEngine:
    def __init__(
        self,
        registry: ModelRegistry,
        limits: EngineLimits,
        metrics: EngineObserver | None = None,
        cache: EmbeddingCache | None = None,
        contexts: ContextStore | None = None,
    ) -> None:
        self._registry = registry
        self._contexts = contexts
        self._limits = limits
        self._metrics = metrics
        self._interactive_running = 0
        self._interactive_seen = time.monotonic()
        self._cache = cache

    @property
    def registry(self) -> ModelRegistry:
        return self._registry

    @property
    def max_inputs_per_request(self) -> int:
        return self._limits.max_inputs_per_request

    def check_texts(self, texts: Sequence[str], *, what: str) -> None:
        """Refuses empty, too many or oversized texts, as Embed does."""
        self._check_texts(texts, what=what)

    # -- Embed ---------------------------------------------------------------------------------

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        self._check_texts(request.inputs, what="inputs")
        if isinstance(request.context, ContextRequest):
            # Resolved once, so the windows of pooled long inputs share it.
            request = replace(
                request, context=await self.resolve_context(request.model, request.context, request.priority)
            )
        if request.pool_chunks:
            return await self._embed_pooled(request)
        arrived = time.perf_counter()
        with self._activity(request.priority):
            async with self._registry.lease(request.model, Task.EMBED) as model:
                spec = model.spec
                context = request.context
                assert not isinstance(context, ContextRequest)
                if context is not None and not model.contextual:
                    raise _takes_no_context(spec.name)
                dimensions = self._check_dimensions(spec, request.dimensions)
                normalize = spec.normalize if request.normalize is None else request.normalize
                prompt = spec.query_prompt if request.input_type is InputType.QUERY else spec.document_prompt
                texts = [prompt + text for text in request.inputs]
                leased = time.perf_counter()
                # The scheduler's account of the call that computed the misses, for the timings.
                scheduled: Scheduled[Embeddings] | None = None

                async def compute(batch: list[str]) -> Embeddings:
                    nonlocal scheduled
                    scheduled = await model.embed(
                        batch, truncate=request.truncate, lane=request.priority, context=context
                    )
                    return scheduled.value

                if self._cache is None:
                    output = await compute(texts)
                    result = CachedEmbeddings(
                        vectors=_finish(output.vectors, dimensions, normalize),
                        token_counts=output.token_counts,
                        cached=0,
                        computed_tokens=sum(output.token_counts),
                    )
                else:
                    recipe = Recipe.of(
                        spec,
                        dimensions=dimensions,
                        normalize=normalize,
                        truncate=request.truncate,
                        context=context.id if context is not None else "",
                    )
                    result = await cached_embed(
                        self._cache, recipe, texts, compute, lambda v: _finish(v, dimensions, normalize)
                    )
        waited = leased - arrived
        return EmbedResult(
            model=spec.name,
            vectors=result.vectors,
            usage=Usage(prompt_tokens=sum(result.token_counts)),
            timings=_timings(scheduled, waited=waited) if scheduled is not None else Timings(queue_ms=_ms(waited)),
            cached=result.cached,
            context_id=context.id if context is not None else "",
        )

    # -- Contexts ------------------------------------------------------------------------------

    async def resolve_context(
        self, model_name: str, wanted: ContextRequest, priority: Priority = Priority.INTERACTIVE
    ) -> Context:
        """The context an Embed call asks for: a collection's stored one (NOT_FOUND if it has none),
        or one built from the documents given. INVALID_ARGUMENT for a model that takes no context."""
        if wanted.collection and wanted.documents:
            raise InvalidArgumentError("set at most one of context_collection and context_documents")
        if wanted.documents:
            return await self.build_context(model_name, wanted.documents, priority=priority)
        spec = self._registry.resolve(model_name, Task.EMBED)
        self._check_contextual(spec)
        stored = self._contexts.get(wanted.collection) if self._contexts is not None else None
        if stored is None:
            raise NotFoundError(f"no context is stored for collection {wanted.collection!r}")
        if stored.model != spec.name:
            raise InvalidArgumentError(
                f"the context of collection {wanted.collection!r} was built by model {stored.model!r}, "
                f"not {spec.name!r}"
            )
        return stored.context

    async def build_context(
        self, model_name: str, documents: Sequence[str], *, priority: Priority = Priority.INTERACTIVE
    ) -> Context:
        """A contextual model's context from documents of a corpus: sampled to the model's corpus
        size (with replacement when there are fewer), the document prompt applied, then the model's
        first stage (cde: the dataset embeddings)."""
        self._check_texts(documents, what="context_documents", limit=False)
        async with self._registry.lease(model_name, Task.EMBED) as model:
            self._check_contextual(model.spec, model.contextual)
            prompt = model.spec.document_prompt
            sample = [prompt + text for text in sample_corpus(documents, model.context_size)]
            built = await model.build_context(sample, lane=priority)
        return Context.of(built)

    async def context_size(self, model_name: str) -> int:
        """How many corpus documents the model builds a context from (loads the model)."""
        async with self._registry.lease(model_name, Task.EMBED) as model:
            self._check_contextual(model.spec, model.contextual)
            return model.context_size

    def is_contextual(self, model_name: str) -> bool:
        """Whether the model's vectors depend on a context (its backend is contextual)."""
        spec = self._registry.resolve(model_name, Task.EMBED)
        backend_cls = self._registry.backend_class(spec)
        return backend_cls is not None and backend_cls.contextual

    def _check_contextual(self, spec: ModelSpec, contextual: bool | None = None) -> None:
        if contextual is None:
            backend_cls = self._registry.backend_class(spec)
            contextual = backend_cls is not None and backend_cls.contextual
        if not contextual:
            raise _takes_no_context(spec.name)

    async def _embed_pooled(self, request: EmbedRequest) -> EmbedResult:
        """One vector per input from the mean of its windows' vectors (`EmbedRequest.pool_chunks`)."""
        model_name, spans = await self.split(
            request.model, request.inputs, input_type=request.input_type, priority=request.priority
        )
        pieces = [
            text[start:end] for text, text_spans in zip(request.inputs, spans, strict=True) for start, end in text_spans
        ]
        owners = np.array([i for i, text_spans in enumerate(spans) for _ in text_spans])
        parts: list[EmbedResult] = []
        limit = self._limits.max_inputs_per_request
        for first in range(0, len(pieces), limit):
            # Windows fit the model by construction; truncate only absorbs a token of rounding.
            part = replace(
                request, inputs=pieces[first : first + limit], model=model_name, truncate=True, pool_chunks=False
            )
            parts.append(await self.embed(part))
        vectors = np.concatenate([p.vectors for p in parts])
        pooled = np.zeros((len(request.inputs), vectors.shape[1]), dtype=np.float32)
        np.add.at(pooled, owners, vectors)
        pooled /= np.bincount(owners, minlength=len(request.inputs))[:, None].astype(np.float32)
        spec = self._registry.resolve(model_name, Task.EMBED)
        if spec.normalize if request.normalize is None else request.normalize:
            pooled = l2_normalize(pooled)
        return EmbedResult(
            model=parts[0].model,
            vectors=np.ascontiguousarray(pooled, dtype=np.float32),
            usage=Usage(prompt_tokens=sum(p.usage.prompt_tokens for p in parts)),
            timings=Timings(
                queue_ms=sum(p.timings.queue_ms for p in parts),
                inference_ms=sum(p.timings.inference_ms for p in parts),
                batch_size=sum(p.timings.batch_size for p in parts),
            ),
            cached=sum(p.cached for p in parts),
        )

    async def split(
        self,
        model_name: str,
        texts: Sequence[str],
        *,
        input_type: InputType,
        priority: Priority = Priority.INTERACTIVE,
    ) -> tuple[str, list[list[Span]]]:
        """The model that embeds `texts` (empty: the default) and each text's chunks for it
        (`wafer.chunking`): one span for a text that fits the model's window. Tokenizing runs on
        the model's thread, in the lane of the request it is for."""
        async with self._registry.lease(model_name, Task.EMBED) as model:
            spec = model.spec
            prompt = spec.query_prompt if input_type is InputType.QUERY else spec.document_prompt
            spans = await model.plan_chunks(texts, prompt=prompt, lane=priority)
        return spec.name, spans

    # -- Rerank --------------------------------------------------------------------------------

    async def rerank(self, request: RerankRequest) -> RerankResult:
        self._check_texts([request.query], what="query")
        self._check_texts(request.documents, what="documents")
        if request.top_n < 0:
            raise InvalidArgumentError("top_n must not be negative")
        arrived = time.perf_counter()
        with self._activity(request.priority):
            async with self._registry.lease(request.model, Task.RERANK) as model:
                spec, lane = model.spec, request.priority
                leased = time.perf_counter()
                if spec.effective_rerank_method is RerankMethod.COSINE:
                    texts = [spec.query_prompt + request.query]
                    texts += [spec.document_prompt + doc for doc in request.documents]
                    try:
                        embedded = await model.embed(texts, truncate=request.truncate, lane=lane, task=Task.RERANK)
                    except InputTooLongError as error:
                        # Row 0 is the query; documents follow.
                        if error.index == 0:
                            raise error.renamed("the query", 0) from None
                        raise error.renamed(f"documents[{error.index - 1}]", error.index - 1) from None
                    vectors = l2_normalize(embedded.value.vectors)
                    scores = (vectors[1:] @ vectors[0]).tolist()
                    token_counts = embedded.value.token_counts
                    timings = _timings(embedded, waited=leased - arrived)
                else:
                    try:
                        scores, token_counts, timings = await self._judge(model, request, arrived)
                    except InputTooLongError as error:
                        raise error.renamed(f"documents[{error.index}]", error.index) from None
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if request.top_n:
            order = order[: request.top_n]
        results = [
            RankedDocument(
                index=i,
                score=float(scores[i]),
                document=request.documents[i] if request.return_documents else None,
            )
            for i in order
        ]
        return RerankResult(
            model=spec.name,
            results=results,
            usage=Usage(prompt_tokens=sum(token_counts)),
            timings=timings,
        )

    async def _judge(
        self, model: ModelHandle, request: RerankRequest, arrived: float
    ) -> tuple[list[float], list[int], Timings]:
        """An LLM judge's scores, a document per turn of the compute gate: other models' work runs
        between two documents, and a caller that leaves (deadline, cancel, shutdown) stops the
        judging at the next document instead of leaving the model busy for minutes."""
        started: float | None = None

        def on_start() -> None:
            nonlocal started
            started = time.perf_counter()

        scores: list[float] = []
        token_counts: list[int] = []
        steps = model.relevance(
            request.query,
            request.documents,
            instruction=model.spec.rerank_instruction,
            truncate=request.truncate,
            lane=request.priority,
            on_start=on_start,
        )
        async with contextlib.aclosing(steps):
            async for score, tokens in steps:
                scores.append(score)
                token_counts.append(tokens)
        now = time.perf_counter()
        begun = started or now
        return (
            scores,
            token_counts,
            Timings(queue_ms=_ms(begun - arrived), inference_ms=_ms(now - begun), batch_size=len(request.documents)),
        )

    # -- Generate ------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]:
        self._check_generate(request)
        arrived = time.perf_counter()
        with self._activity(request.priority):
            async with self._registry.lease(request.model, Task.GENERATE) as model:
                # aclosing: a caller that stops early closes the stream now, before the lease ends,
                # not whenever the generator is collected.
                chunks = self._stream(model, request, arrived)
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        yield chunk

    async def _stream(
        self, model: ModelHandle, request: GenerateRequest, arrived: float
    ) -> AsyncGenerator[GenerateChunk, None]:
        name = model.spec.name
        started: float | None = None
        first_token: float | None = None

        def on_start() -> None:
            nonlocal started
            started = time.perf_counter()

        deltas = model.generate(
            prompt=request.prompt,
            messages=request.messages,
            sampling=request.sampling,
            lane=request.priority,
            on_start=on_start,
        )
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                now = time.perf_counter()
                if first_token is None and delta.text:
                    first_token = now
                if delta.finish_reason is None:
                    if delta.text:
                        yield GenerateChunk(model=name, text=delta.text)
                    continue
                begun = started or arrived
                if self._metrics is not None:
                    self._metrics.record_generation(name, delta.prompt_tokens, delta.completion_tokens)
                yield GenerateChunk(
                    model=name,
                    text=delta.text,
                    finish_reason=delta.finish_reason,
                    usage=Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens),
                    timings=Timings(
                        queue_ms=_ms(begun - arrived),
                        inference_ms=_ms(now - begun),
                        batch_size=1,
                        time_to_first_token_ms=_ms((first_token or now) - arrived),
                    ),
                )

    # -- activity --------------------------------------------------------------------------------

    def seconds_since_interactive(self) -> float:
        """Seconds since an interactive request last ran; 0 while one is running. Jobs with a
        `when_idle` policy wait on this."""
        if self._interactive_running:
            return 0.0
        return time.monotonic() - self._interactive_seen

    @contextlib.contextmanager
    def _activity(self, priority: Priority) -> Iterator[None]:
        if priority is not Priority.INTERACTIVE:
            yield
            return
        self._interactive_running += 1
        try:
            yield
        finally:
            self._interactive_running -= 1
            self._interactive_seen = time.monotonic()

    # -- validation ----------------------------------------------------------------------------

    def _check_texts(self, texts: Sequence[str], *, what: str, limit: bool = True) -> None:
        if not texts:
            raise InvalidArgumentError(f"{what} must not be empty")
        most = self._limits.max_inputs_per_request
        if limit and len(texts) > most:
            raise InvalidArgumentError(f"{len(texts)} {what} in one request; the limit is {most}: split the request")
        max_bytes = self._limits.max_input_bytes
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgumentError(f"{what}[{i}] is empty")
            if len(text) > max_bytes // 4 and len(text.encode("utf-8")) > max_bytes:
                raise InvalidArgumentError(f"{what}[{i}] is larger than the {max_bytes}-byte limit")

    @staticmethod
    def _check_dimensions(spec: ModelSpec, requested: int) -> int:
        full = spec.dimensions or 0
        if requested == 0:
            return full
        if requested > full:
            raise InvalidArgumentError(f"dimensions={requested} is more than model {spec.name!r} produces ({full})")
        if spec.matryoshka_dimensions and requested not in spec.matryoshka_dimensions:
            allowed = ", ".join(str(d) for d in sorted(spec.matryoshka_dimensions))
            raise InvalidArgumentError(f"model {spec.name!r} supports dimensions {allowed} (or 0 for {full})")
        return requested

    def _check_generate(self, request: GenerateRequest) -> None:
        if (request.prompt is None or request.prompt == "") == (not request.messages):
            raise InvalidArgumentError("set exactly one of `prompt` and `messages`")
        if request.prompt is not None:
            self._check_texts([request.prompt], what="prompt")
        if request.messages:
            # The same limits as a prompt: per message, and for the chat as a whole.
            self._check_texts([m.content for m in request.messages], what="messages")
            total = sum(len(m.content.encode("utf-8")) for m in request.messages)
            if total > self._limits.max_input_bytes:
                raise InvalidArgumentError(
                    f"the messages hold {total} bytes together; the limit is {self._limits.max_input_bytes}"
                )
        for i, message in enumerate(request.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidArgumentError(
                    f"messages[{i}].role is {message.role!r}; use one of {', '.join(sorted(CHAT_ROLES))}"
                )
        sampling = request.sampling
        if not 0 < sampling.max_tokens <= self._limits.max_new_tokens_limit:
            raise InvalidArgumentError(
                f"max_tokens must be between 1 and {self._limits.max_new_tokens_limit}, not {sampling.max_tokens}"
            )
        if not 0.0 <= sampling.temperature <= 2.0:
            raise InvalidArgumentError(f"temperature must be in [0, 2], not {sampling.temperature:g}")
        if not 0.0 < sampling.top_p <= 1.0:
            raise InvalidArgumentError(f"top_p must be in (0, 1], not {sampling.top_p:g}")
        if sampling.top_k < 0:
            raise InvalidArgumentError("top_k must not be negative")
        if len(sampling.stop) > MAX_STOP_SEQUENCES:
            raise InvalidArgumentError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        for i, stop in enumerate(sampling.stop):
            if not stop or len(stop) > MAX_STOP_LENGTH:
                raise InvalidArgumentError(f"stop[{i}] must be 1 to {MAX_STOP_LENGTH} characters")
