"""The inference engine: what Embed, Rerank and Generate mean, independent of gRPC.

It validates requests against the model that will answer them, applies the model's prompts,
runs the backend on the model's worker, and post-processes (Matryoshka cuts, normalization,
ranking). The RPC layer only translates to and from these calls.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar, cast

import numpy as np

from wafer.backends.base import InputTooLongError
from wafer.config import Settings
from wafer.domain import (
    EmbedRequest,
    EmbedResult,
    FloatMatrix,
    GenerateChunk,
    GenerateRequest,
    GenerationDelta,
    InputType,
    Priority,
    RankedDocument,
    RerankRequest,
    RerankResult,
    Timings,
    Usage,
)
from wafer.errors import InvalidArgumentError
from wafer.metrics import Metrics
from wafer.registry import ModelRegistry
from wafer.specs import ModelSpec, RerankMethod, Task

CHAT_ROLES = frozenset({"system", "user", "assistant"})
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256


_Request = TypeVar("_Request", EmbedRequest, RerankRequest)
_Result = TypeVar("_Result")


def _interactive_call(
    method: Callable[[InferenceEngine, _Request], Coroutine[Any, Any, _Result]],
) -> Callable[[InferenceEngine, _Request], Coroutine[Any, Any, _Result]]:
    """Counts an interactive call from its start to its end, for `seconds_since_interactive`."""

    @functools.wraps(method)
    async def tracked(self: InferenceEngine, request: _Request) -> _Result:
        if request.priority is not Priority.INTERACTIVE:
            return await method(self, request)
        self._interactive_began()
        try:
            return await method(self, request)
        finally:
            self._interactive_ended()

    return tracked


def _interactive_stream(
    method: Callable[[InferenceEngine, GenerateRequest], AsyncIterator[GenerateChunk]],
) -> Callable[[InferenceEngine, GenerateRequest], AsyncIterator[GenerateChunk]]:
    """`_interactive_call` for a streamed call: it lasts until the stream ends or is closed."""

    @functools.wraps(method)
    async def tracked(self: InferenceEngine, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        # aclosing: a caller that stops early closes the inner stream now, not when it is collected.
        stream = cast(AsyncGenerator[GenerateChunk, None], method(self, request))  # an async generator function
        async with contextlib.aclosing(stream) as chunks:
            if request.priority is not Priority.INTERACTIVE:
                async for chunk in chunks:
                    yield chunk
                return
            self._interactive_began()
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                self._interactive_ended()

    return tracked


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def l2_normalize(vectors: FloatMatrix) -> FloatMatrix:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalized: FloatMatrix = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return normalized


class InferenceEngine:
    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics | None = None) -> None:
        self._registry = registry
        self._settings = settings
        self._metrics = metrics
        # Interactive calls running now, and when the last one ended: when_idle jobs read them.
        self._interactive_running = 0
        self._interactive_last = time.monotonic()

    def seconds_since_interactive(self) -> float:
        """Seconds since the last interactive Embed, Rerank or Generate ended; 0 while one runs.
        Counted from the engine's creation when none has run yet."""
        if self._interactive_running:
            return 0.0
        return time.monotonic() - self._interactive_last

    def _interactive_began(self) -> None:
        self._interactive_running += 1

    def _interactive_ended(self) -> None:
        self._interactive_running -= 1
        self._interactive_last = time.monotonic()

    @property
    def registry(self) -> ModelRegistry:
        return self._registry

    # -- Embed ---------------------------------------------------------------------------------

    @_interactive_call
    async def embed(self, request: EmbedRequest) -> EmbedResult:
        self._check_texts(request.inputs, what="inputs")
        arrived = time.perf_counter()
        async with self._registry.lease(request.model, Task.EMBED) as model:
            spec = model.spec
            dimensions = self._check_dimensions(spec, request.dimensions)
            prompt = spec.query_prompt if request.input_type is InputType.QUERY else spec.document_prompt
            texts = [prompt + text for text in request.inputs]
            started = time.perf_counter()
            output = await model.worker.run(lambda: model.backend.embed(texts, truncate=request.truncate))
            finished = time.perf_counter()
        if self._metrics is not None:
            self._metrics.record_batch(spec.name, Task.EMBED, len(texts), sum(output.token_counts))
        vectors = output.vectors[:, :dimensions]
        normalize = spec.normalize if request.normalize is None else request.normalize
        if normalize:
            vectors = l2_normalize(vectors)
        return EmbedResult(
            model=spec.name,
            vectors=np.ascontiguousarray(vectors, dtype=np.float32),
            usage=Usage(prompt_tokens=sum(output.token_counts)),
            timings=Timings(
                queue_ms=_ms(started - arrived),
                inference_ms=_ms(finished - started),
                batch_size=len(texts),
            ),
        )

    # -- Rerank --------------------------------------------------------------------------------

    @_interactive_call
    async def rerank(self, request: RerankRequest) -> RerankResult:
        self._check_texts([request.query], what="query")
        self._check_texts(request.documents, what="documents")
        if request.top_n < 0:
            raise InvalidArgumentError("top_n must not be negative")
        arrived = time.perf_counter()
        async with self._registry.lease(request.model, Task.RERANK) as model:
            spec, backend = model.spec, model.backend
            started = time.perf_counter()
            if spec.effective_rerank_method is RerankMethod.COSINE:
                texts = [spec.query_prompt + request.query]
                texts += [spec.document_prompt + doc for doc in request.documents]
                try:
                    output = await model.worker.run(lambda: backend.embed(texts, truncate=request.truncate))
                except InputTooLongError as error:
                    # Row 0 is the query; documents follow.
                    if error.index == 0:
                        raise error.renamed("the query", 0) from None
                    raise error.renamed(f"documents[{error.index - 1}]", error.index - 1) from None
                vectors = l2_normalize(output.vectors)
                scores = (vectors[1:] @ vectors[0]).tolist()
                token_counts = output.token_counts
            else:
                try:
                    relevance = await model.worker.run(
                        lambda: backend.score_relevance(
                            request.query,
                            request.documents,
                            instruction=spec.rerank_instruction,
                            truncate=request.truncate,
                        )
                    )
                except InputTooLongError as error:
                    raise error.renamed(f"documents[{error.index}]", error.index) from None
                scores, token_counts = relevance.scores, relevance.token_counts
            finished = time.perf_counter()
        if self._metrics is not None:
            self._metrics.record_batch(spec.name, Task.RERANK, len(token_counts), sum(token_counts))
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
            timings=Timings(
                queue_ms=_ms(started - arrived),
                inference_ms=_ms(finished - started),
                batch_size=len(request.documents),
            ),
        )

    # -- Generate ------------------------------------------------------------------------------

    @_interactive_stream
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self._check_generate(request)
        arrived = time.perf_counter()
        async with self._registry.lease(request.model, Task.GENERATE) as model:
            name, backend = model.spec.name, model.backend
            started: float | None = None
            first_token: float | None = None

            def start(cancelled: Callable[[], bool]) -> Iterator[GenerationDelta]:
                nonlocal started
                started = time.perf_counter()
                return backend.generate(
                    prompt=request.prompt,
                    messages=request.messages,
                    sampling=request.sampling,
                    cancelled=cancelled,
                )

            async for delta in model.worker.stream(start):
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

    # -- validation ----------------------------------------------------------------------------

    def _check_texts(self, texts: Sequence[str], *, what: str) -> None:
        if not texts:
            raise InvalidArgumentError(f"{what} must not be empty")
        limit = self._settings.max_inputs_per_request
        if len(texts) > limit:
            raise InvalidArgumentError(f"{len(texts)} {what} in one request; the limit is {limit}: split the request")
        max_bytes = self._settings.max_input_bytes
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
            if total > self._settings.max_input_bytes:
                raise InvalidArgumentError(
                    f"the messages hold {total} bytes together; the limit is {self._settings.max_input_bytes}"
                )
        for i, message in enumerate(request.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidArgumentError(
                    f"messages[{i}].role is {message.role!r}; use one of {', '.join(sorted(CHAT_ROLES))}"
                )
        sampling = request.sampling
        if not 0 < sampling.max_tokens <= self._settings.max_new_tokens_limit:
            raise InvalidArgumentError(
                f"max_tokens must be between 1 and {self._settings.max_new_tokens_limit}, not {sampling.max_tokens}"
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
