"""A backend registered exactly like a real one, for fast tests of the registry and the engine.

Embeddings are a deterministic function of the text; generation echoes the prompt's words.
`gate` lets a test hold a call inside the backend to observe draining and cancellation.
"""

from __future__ import annotations

import hashlib
import mmap
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import numpy as np

from wafer.backends.base import (
    Backend,
    Embeddings,
    InputTooLongError,
    LoadOptions,
    ModelFiles,
    RelevanceScores,
)
from wafer.domain import ChatMessage, Context, FinishReason, FloatMatrix, GenerationDelta, SamplingParams
from wafer.errors import FailedPreconditionError
from wafer.specs import ModelSpec, Task


class FakeBackend(Backend):
    tasks: ClassVar[frozenset[Task]] = frozenset(Task)
    # Shared by every instance: tests open and close it around the calls they want to hold.
    gate: ClassVar[threading.Event] = threading.Event()
    loads: ClassVar[int] = 0
    closed: ClassVar[int] = 0
    # Texts embedded so far, by every instance: cache tests check what reached the model.
    embedded: ClassVar[list[str]] = []
    # Once this many texts are embedded (all instances), the next embed closes the gate and waits:
    # a test holds work mid-way at a known point, however fast the rest runs.
    hold_after: ClassVar[int | None] = None
    # Raised by close() (after freeing), for tests of what a failed close leaves behind.
    close_error: ClassVar[Exception | None] = None
    # What `working_bytes` reports: memory a long input would touch that the warm-up did not.
    working: ClassVar[int] = 0

    def __init__(self, spec: ModelSpec, weights: mmap.mmap) -> None:
        super().__init__(spec)
        self.weights = weights
        self.is_closed = False

    @classmethod
    def load(cls, spec: ModelSpec, files: ModelFiles, options: LoadOptions) -> FakeBackend:
        # The weights are read into anonymous memory of their own and held, as a real backend does,
        # so the RSS a load adds follows the file's size; mmap rather than bytes because the heap
        # would reuse freed blocks across loads and hide that from RSS.
        weights = mmap.mmap(-1, max(1, files.weights.stat().st_size))
        with files.weights.open("rb") as file:
            file.readinto(weights)
        if weights[:6] == b"broken":
            weights.close()
            raise FailedPreconditionError(f"model {spec.name!r}: weights are broken")
        cls.loads += 1
        return cls(spec, weights)

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 2

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        # One token per word, as count_tokens has it (less the two it adds around every text).
        return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]

    def _wait(self) -> None:
        if not self.gate.wait(timeout=30):
            raise TimeoutError("fake backend gate stayed closed")

    def embed(self, texts: Sequence[str], *, truncate: bool, context: Context | None = None) -> Embeddings:
        assert context is None, "a context reached a backend that takes none"
        assert not self.is_closed, "embed on a closed backend"
        if self.hold_after is not None and len(self.embedded) >= self.hold_after:
            self.gate.clear()
        self._wait()
        type(self).embedded.extend(texts)
        return self._embed(texts, truncate=truncate)

    def _embed(self, texts: Sequence[str], *, truncate: bool) -> Embeddings:
        counts = []
        for i, text in enumerate(texts):
            tokens = self.count_tokens(text)
            if tokens > self.spec.max_tokens and not truncate:
                raise InputTooLongError(i, tokens, self.spec.max_tokens, self.spec.name)
            counts.append(min(tokens, self.spec.max_tokens))
        dims = self.spec.dimensions or 8
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).normal(size=dims))
        return Embeddings(vectors=np.asarray(rows, dtype=np.float32), token_counts=counts)

    def score_relevance(
        self, query: str, documents: Sequence[str], *, instruction: str, truncate: bool
    ) -> RelevanceScores:
        self._wait()
        words = set(query.lower().split())
        scores = [len(words & set(d.lower().split())) / max(1, len(words)) for d in documents]
        return RelevanceScores(scores=scores, token_counts=[self.count_tokens(query + " " + d) for d in documents])

    def generate(
        self,
        *,
        prompt: str | None,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        cancelled: Callable[[], bool],
    ) -> Iterator[GenerationDelta]:
        text = prompt if prompt is not None else " ".join(m.content for m in messages)
        words = text.split()
        produced = 0
        for word in words[: sampling.max_tokens]:
            self._wait()
            if cancelled():
                return
            produced += 1
            yield GenerationDelta(text=word + " ")
        reason = FinishReason.LENGTH if len(words) > sampling.max_tokens else FinishReason.STOP
        yield GenerationDelta(text="", finish_reason=reason, prompt_tokens=len(words), completion_tokens=produced)

    @property
    def working_bytes(self) -> int:
        return self.working

    def health(self) -> None:
        self._wait()
        assert self._embed(["ok"], truncate=True).vectors.shape[0] == 1

    def close(self) -> None:
        type(self).closed += 1
        self.is_closed = True
        self.weights.close()
        if self.close_error is not None:
            raise self.close_error


class FakeContextualBackend(FakeBackend):
    """A fake whose vectors depend on a context (as cde's do): the text's fake vector plus the mean
    of the context's rows. Records the context id of every backend call."""

    contextual: ClassVar[bool] = True
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.EMBED})
    calls: ClassVar[list[tuple[str, list[str]]]] = []
    contexts_built: ClassVar[list[list[str]]] = []

    @property
    def context_size(self) -> int:
        return 4

    def build_context(self, documents: Sequence[str]) -> FloatMatrix:
        type(self).contexts_built.append(list(documents))
        return self._embed(documents, truncate=True).vectors

    def embed(self, texts: Sequence[str], *, truncate: bool, context: Context | None = None) -> Embeddings:
        assert not self.is_closed, "embed on a closed backend"
        self._wait()
        type(self).calls.append((context.id if context is not None else "", list(texts)))
        out = self._embed(texts, truncate=truncate)
        if context is None:
            return out
        return Embeddings(
            vectors=(out.vectors + context.vectors.mean(axis=0)).astype(np.float32), token_counts=out.token_counts
        )
