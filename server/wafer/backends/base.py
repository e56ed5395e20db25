"""The backend contract: load a model, run a batch, report health, close.

A backend knows nothing of gRPC, queues or other models. It is driven from one worker thread
at a time (the registry guarantees it), so it needs no locks of its own. The one exception is
`tokenize`, which touches only the tokenizer and may run on any thread at any time.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from wafer.domain import ChatMessage, Context, FloatMatrix, GenerationDelta, SamplingParams
from wafer.errors import FailedPreconditionError, InvalidArgumentError
from wafer.specs import ModelSpec, Task


class InputTooLongError(InvalidArgumentError):
    """An input exceeds the model's window and the caller did not ask for truncation."""

    def __init__(self, index: int, tokens: int, limit: int, model: str, *, what: str = "") -> None:
        what = what or f"input {index}"
        super().__init__(
            f"{what} has {tokens} tokens, more than the {limit} that model {model!r} reads; "
            "shorten it or set truncate=true"
        )
        self.index = index
        self.tokens = tokens
        self.limit = limit
        self.model = model

    def renamed(self, what: str, index: int) -> InputTooLongError:
        """The same error, told in the caller's terms (a rerank's `documents[3]`, not `input 4`)."""
        return InputTooLongError(index, self.tokens, self.limit, self.model, what=what)


class ComputeInterrupted(Exception):  # noqa: N818 - a signal between scheduler and backend, not an error
    """Raised by a backend call that `interrupt()` stopped; the scheduler runs the work again later."""


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """Local files a spec's sources resolved to; `extra` holds its `files`, by role."""

    weights: Path
    tokenizer: Path | None = None
    extra: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))


class NoOptions(BaseModel):
    """The options of a backend that has none: any key in a spec's `options` is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class LoadOptions:
    threads: int


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Pooled, not yet normalized vectors [n, dimensions] and each input's token count."""

    vectors: FloatMatrix
    token_counts: list[int]


@dataclass(frozen=True, slots=True)
class Tokenized:
    """Texts a backend tokenized ahead of its call (`Backend.tokenize`): one item per text, opaque to
    all but the backend (onnx: a `tokenizers.Encoding`), and each text's exact token count."""

    items: Sequence[object]
    token_counts: list[int]

    def rows(self, start: int, stop: int) -> Tokenized:
        return Tokenized(items=self.items[start:stop], token_counts=self.token_counts[start:stop])

    @staticmethod
    def joined(parts: Sequence[Tokenized]) -> Tokenized:
        return Tokenized(
            items=[item for part in parts for item in part.items],
            token_counts=[count for part in parts for count in part.token_counts],
        )


@dataclass(frozen=True, slots=True)
class RelevanceScores:
    scores: list[float]
    token_counts: list[int]


class GenerationStreams(abc.ABC):
    """Generation streams a backend decodes together (continuous batching), driven by the scheduler.

    Everything runs on the model's thread except `interrupt`. The scheduler `open`s a stream when
    a Generate call comes, `admit`s it when there is room, then calls `step` (a token for every
    admitted stream) until each stream has sent its last delta; a stream whose caller left is
    `close`d at once, which frees its memory.
    """

    # Streams decoded together at most; more wait in the scheduler's queue.
    slots: int = 1

    @abc.abstractmethod
    def open(self, *, prompt: str | None, messages: Sequence[ChatMessage], sampling: SamplingParams) -> object:
        """Check and tokenize a request (raising its InvalidArgumentError now); a handle for the others."""

    @abc.abstractmethod
    def admit(self, stream: object) -> bool:
        """Start decoding `stream` from the next step; False if there is no room for it yet."""

    @abc.abstractmethod
    def step(self) -> list[tuple[object, GenerationDelta]]:
        """One decode for every admitted stream: the deltas it produced, in order. A delta with a
        finish reason is its stream's last; that stream is closed. Raises ComputeInterrupted if
        `interrupt` stopped the decode: nothing moved, and the step may simply run again."""

    @abc.abstractmethod
    def close(self, stream: object) -> None:
        """Stop `stream` (admitted or not) and free what it holds; closing twice does nothing."""

    def cached_tokens(self, stream: object) -> int:
        """Prompt tokens of an admitted stream found in the backend's prompt cache (not decoded again)."""
        return 0

    @property
    def caches_prompts(self) -> bool:
        """Whether the backend keeps prompt prefixes between streams (for the hit/miss metrics)."""
        return False

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Stop the running `step` soon (it raises ComputeInterrupted); called from another thread."""


class Backend(abc.ABC):
    """Base of every backend. Subclasses override the tasks they list in `tasks`."""

    tasks: ClassVar[frozenset[Task]] = frozenset()
    # Whether `interrupt` can stop a running `embed` (the scheduler then pre-empts batch work).
    interruptible: ClassVar[bool] = False
    # What a spec's `options` mapping may hold: a frozen model with extra="forbid", every field
    # described and defaulted.
    options_model: ClassVar[type[BaseModel]] = NoOptions
    # Roles of a spec's `files` this backend cannot load without, and those it can use if given.
    required_files: ClassVar[frozenset[str]] = frozenset()
    optional_files: ClassVar[frozenset[str]] = frozenset()
    # Whether the model's vectors depend on a context as well as the text (cde's corpus). Only such a
    # backend is handed a context; the engine refuses one for the others (INVALID_ARGUMENT).
    contextual: ClassVar[bool] = False
    # A contextual backend whose context is one row per document, each row `embed(document)` without a
    # context (cde: stage 1). The engine then builds contexts through the scheduler's embed, in
    # micro-batches that interactive work can pass, instead of one long `build_context` call.
    context_rows_are_embeddings: ClassVar[bool] = False
    # Whether `tokenize` and `embed_tokenized` exist: the scheduler then tokenizes each request when
    # it arrives, on a thread beside the event loop, and budgets merged batches by exact token
    # counts; the model's thread only computes. Non-contextual backends only.
    tokenizes_ahead: ClassVar[bool] = False
    # Whether running several instances of the model side by side raises its throughput, so the
    # registry loads more than one by default (`instances` in models.yaml). Extra instances serve
    # embeddings only; `run` calls and streams go to the first.
    scales_out: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.options: BaseModel = self.check_spec(spec)

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> BaseModel:
        """The spec's options, validated; raises InvalidArgumentError naming the model and what is
        wrong with its options or its files' roles. Called when the catalog is loaded, when a spec
        arrives over the API, and by every load."""
        missing = sorted(cls.required_files - spec.files.keys())
        if missing:
            raise InvalidArgumentError(
                f"model {spec.name!r}: backend {spec.backend!r} needs `files` with the role(s) {', '.join(missing)}"
            )
        accepted = cls.required_files | cls.optional_files
        unknown = sorted(spec.files.keys() - accepted)
        if unknown:
            roles = ", ".join(sorted(accepted)) or "none"
            raise InvalidArgumentError(
                f"model {spec.name!r}: backend {spec.backend!r} has no use for `files` role(s) "
                f"{', '.join(unknown)} (it reads: {roles})"
            )
        try:
            return cls.options_model.model_validate(spec.options)
        except ValidationError as exc:
            problems = "; ".join(
                f"options.{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
            )
            raise InvalidArgumentError(
                f"model {spec.name!r}: invalid options for backend {spec.backend!r}: {problems}"
            ) from None

    @classmethod
    @abc.abstractmethod
    def load(cls, spec: ModelSpec, files: ModelFiles, options: LoadOptions) -> Backend:
        """Read the model into memory; raise FailedPreconditionError if it cannot be used."""

    @classmethod
    def load_instances(cls, spec: ModelSpec, files: ModelFiles, options: LoadOptions, count: int) -> list[Backend]:
        """`count` independent instances of the model, each for its own thread; a backend that can
        share memory between them (weights) overrides this."""
        instances: list[Backend] = []
        try:
            for _ in range(count):
                instances.append(cls.load(spec, files, options))
        except BaseException:
            for instance in instances:
                instance.close()
            raise
        return instances

    def embed(self, texts: Sequence[str], *, truncate: bool, context: Context | None = None) -> Embeddings:
        """Embed texts (prompts already applied). Too-long inputs raise InputTooLongError
        unless `truncate`, which keeps the first `spec.max_tokens` tokens. `context` is given to
        contextual backends only, and may be None (the model's vectors without a context)."""
        raise self._unsupported(Task.EMBED)

    def tokenize(self, texts: Sequence[str], *, truncate: bool) -> Tokenized:
        """What `embed(texts)` would compute on, without computing (backends with `tokenizes_ahead`).
        Raises what `embed` raises for bad input (InputTooLongError, an empty text). Thread-safe: it
        may run on any thread while the model's thread computes."""
        raise self._unsupported(Task.EMBED)

    def tokenize_each(self, requests: Sequence[Sequence[str]], *, truncate: bool) -> list[Tokenized | Exception]:
        """`tokenize` for several requests at once: each request's Tokenized, or the error
        `tokenize` would raise for it alone (a bad input fails its own request, not the others).
        Thread-safe, like `tokenize`. A backend whose tokenizer has a batch call overrides this
        with one call for all the texts."""
        results: list[Tokenized | Exception] = []
        for texts in requests:
            try:
                results.append(self.tokenize(texts, truncate=truncate))
            except Exception as exc:  # handed to the request it belongs to
                results.append(exc)
        return results

    def embed_tokenized(self, tokenized: Tokenized) -> Embeddings:
        """`embed` on texts `tokenize` prepared (possibly several requests' rows, joined)."""
        raise self._unsupported(Task.EMBED)

    @property
    def context_size(self) -> int:
        """How many corpus documents a context is built from (contextual backends)."""
        return 0

    def build_context(self, documents: Sequence[str]) -> FloatMatrix:
        """A contextual backend's context from `context_size` corpus documents (prompts applied)."""
        raise FailedPreconditionError(f"model {self.spec.name!r} ({self.spec.backend}) takes no context")

    def score_relevance(
        self, query: str, documents: Sequence[str], *, instruction: str, truncate: bool
    ) -> RelevanceScores:
        """Probability in [0, 1] that each document is relevant to the query."""
        raise self._unsupported(Task.RERANK)

    def relevance_steps(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str,
        truncate: bool,
        cancelled: Callable[[], bool],
    ) -> Iterator[tuple[float, int]]:
        """`score_relevance` a step at a time: (score, tokens) per document, in order. The
        scheduler runs each step in its own turn of the compute gate and stops once the caller is
        gone (`cancelled()` turns true). This default computes every document in one step; a
        backend whose documents are slow (an LLM judge) yields after each one."""
        scored = self.score_relevance(query, documents, instruction=instruction, truncate=truncate)
        yield from zip(scored.scores, scored.token_counts, strict=True)

    def generate(
        self,
        *,
        prompt: str | None,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        cancelled: Callable[[], bool],
    ) -> Iterator[GenerationDelta]:
        """Stream text. Stops early once `cancelled()` is true. The last delta has a finish reason
        and the token counts."""
        raise self._unsupported(Task.GENERATE)

    def streams(self) -> GenerationStreams | None:
        """The backend's batched generation, or None: the scheduler then drives `generate`, one
        stream at a time."""
        return None

    def interrupt(self) -> None:  # noqa: B027 - deliberately empty: most backends cannot stop a call
        """Ask the `embed` call running on the model's thread to stop soon and raise
        ComputeInterrupted; called from another thread. The scheduler calls it only when
        `interruptible` is true; a backend that cannot stop a call leaves this as it is, and the
        call runs to its end."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes with this model's tokenizer, special tokens included."""

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Where each token of `text` lies in it: (start, end) character offsets (Unicode code points,
        i.e. Python string indices), special tokens left out. Used to chunk long texts."""
        raise FailedPreconditionError(f"model {self.spec.name!r} ({self.spec.backend}) cannot split texts into tokens")

    @property
    def working_bytes(self) -> int:
        """Memory the backend's largest call touches that its load and a warm-up `health()` do not:
        buffers reserved at load but filled only by a long input (llama.cpp's logits, sized by the
        context's window). The registry adds it to the RSS it measures around the load, so the
        memory budget refuses a model that would outgrow it at its first long input. 0 for a
        backend whose warm-up already touches what its calls use (ONNX Runtime's arena grows per
        call, and is measured as it is)."""
        return 0

    @abc.abstractmethod
    def health(self) -> None:
        """Raise if the model cannot serve (a tiny real inference, not a flag)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the model's memory. The backend is not used afterwards."""

    def _unsupported(self, task: Task) -> FailedPreconditionError:
        return FailedPreconditionError(f"model {self.spec.name!r} ({self.spec.backend}) cannot {task.value}")
