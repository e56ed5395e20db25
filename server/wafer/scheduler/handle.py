"""A model handle: a loaded model as its callers see it, and what a registry lease hands out.

Every method queues work on the model's own thread through its scheduler; none hands out the
backend. A llama.cpp context entered from two threads crashes the process, so "only the model's
thread calls the backend" is not left to callers to remember: the handle is the only way in, as
TEI's callers reach a model only through its command channel. The few facts a caller needs
(whether the model takes a context, its corpus size) are read once, at load, on the loading thread.

Batch metrics are recorded here and in the scheduler, never by callers: the scheduler reports each
merged embedding call, the handle each relevance judging (its documents are steps of one stream).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence

from wafer import chunking
from wafer.backends.base import Backend, Embeddings
from wafer.chunking import Span
from wafer.domain import ChatMessage, Context, FloatMatrix, GenerationDelta, Priority, SamplingParams
from wafer.scheduler.model import BatchObserver, ModelScheduler, Scheduled
from wafer.specs import ModelSpec, Task


class ModelHandle:
    """One loaded model: its spec, what callers may know of its backend, and the work it takes."""

    __slots__ = (
        "_backend",
        "_observer",
        "_scheduler",
        "context_rows_are_embeddings",
        "context_size",
        "contextual",
        "spec",
    )

    def __init__(
        self, spec: ModelSpec, scheduler: ModelScheduler, backend: Backend, *, observer: BatchObserver | None = None
    ) -> None:
        """`backend` is the scheduler's own instance (the one its calls and streams run on)."""
        self.spec = spec
        self._scheduler = scheduler
        self._backend = backend
        self._observer = observer
        # Whether the model's vectors depend on a context (cde), and how many corpus documents it
        # builds one from.
        self.contextual = backend.contextual
        self.context_size = backend.context_size
        self.context_rows_are_embeddings = backend.context_rows_are_embeddings

    async def embed(
        self,
        texts: Sequence[str],
        *,
        truncate: bool,
        lane: Priority = Priority.INTERACTIVE,
        task: Task = Task.EMBED,
        context: Context | None = None,
    ) -> Scheduled[Embeddings]:
        """Pooled, not normalized vectors, merged with other waiting requests (`ModelScheduler.embed`)."""
        return await self._scheduler.embed(texts, truncate=truncate, lane=lane, task=task, context=context)

    async def build_context(self, sample: Sequence[str], *, lane: Priority = Priority.INTERACTIVE) -> FloatMatrix:
        """A contextual model's context matrix from `context_size` corpus documents (prompts applied)."""
        if self.context_rows_are_embeddings:
            # Stage 1 of 512 documents is a minute of work at cde's real size: cut into the
            # scheduler's micro-batches, it never holds interactive requests back for long.
            rows = await self._scheduler.embed(sample, truncate=True, lane=lane)
            return rows.value.vectors
        backend = self._backend
        built = await self._scheduler.run(lambda: backend.build_context(sample), lane=lane)
        return built.value

    async def plan_chunks(
        self, texts: Sequence[str], *, prompt: str, lane: Priority = Priority.INTERACTIVE
    ) -> list[list[Span]]:
        """Each text's windows for this model (`wafer.chunking.split`), tokenized on the model's thread."""
        backend = self._backend
        planned = await self._scheduler.run(lambda: chunking.split(backend, texts, prompt=prompt), lane=lane)
        return planned.value

    async def relevance(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str,
        truncate: bool,
        lane: Priority = Priority.INTERACTIVE,
        on_start: Callable[[], None] = lambda: None,
    ) -> AsyncGenerator[tuple[float, int], None]:
        """(score, tokens) per document, in order: a document per turn of the compute gate, so
        other models' work runs between two documents, and a caller that stops reading stops the
        judging at the next document. `on_start` is called on the model's thread when it starts.
        The judging counts as one batch of its documents once every document is scored."""
        backend = self._backend

        def start(cancelled: Callable[[], bool]) -> Iterator[tuple[float, int]]:
            on_start()
            return backend.relevance_steps(
                query, documents, instruction=instruction, truncate=truncate, cancelled=cancelled
            )

        size = tokens = 0
        steps = self._scheduler.stream(start, lane=lane)
        async with contextlib.aclosing(steps):
            async for score, counted in steps:
                size += 1
                tokens += counted
                yield score, counted
        if self._observer is not None:
            self._observer.record_batch(self.spec.name, Task.RERANK, size, tokens)

    def generate(
        self,
        *,
        prompt: str | None,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        lane: Priority = Priority.INTERACTIVE,
        on_start: Callable[[], None] = lambda: None,
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Stream a generation, batched with the model's other streams where the backend can
        (`ModelScheduler.generate`)."""
        return self._scheduler.generate(
            prompt=prompt, messages=messages, sampling=sampling, lane=lane, on_start=on_start
        )
