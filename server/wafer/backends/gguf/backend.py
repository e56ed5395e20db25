"""The gguf backend: one llama.cpp model, a generation context (streams, reranking) and an
embedding context sharing its weights (see wafer.backends.gguf's docstring). Streams live in
`streams.py`, the relevance judge in `relevance.py`, the tokenizer and chat template in `vocab.py`;
this module loads them, embeds, and answers the Backend contract."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, cast

import llama_cpp
import numpy as np
from pydantic import BaseModel

from wafer.backends.base import (
    Backend,
    ComputeInterrupted,
    Embeddings,
    GenerationStreams,
    InputTooLongError,
    LoadOptions,
    ModelFiles,
    RelevanceScores,
)
from wafer.backends.gguf.context import (
    POOLING,
    LlamaContext,
    Vector,
    embedding_params,
    generation_params,
    sequence_cells,
)
from wafer.backends.gguf.loading import (
    PROJECTION_HEAD,
    GgufOptions,
    Head,
    attends_causally,
    check_embedding_shape,
    check_gguf_file,
    read_head,
    read_metadata,
    route_llama_log,
)
from wafer.backends.gguf.relevance import RelevanceJudge
from wafer.backends.gguf.streams import Stream, StreamEngine
from wafer.backends.gguf.vocab import ChatTemplate, Vocab
from wafer.domain import ChatMessage, Context, FloatMatrix, GenerationDelta, SamplingParams
from wafer.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from wafer.specs import ModelSpec, Pooling, RerankMethod, Task


class GgufBackend(Backend):
    tasks = frozenset({Task.EMBED, Task.RERANK, Task.GENERATE})
    options_model: ClassVar[type[BaseModel]] = GgufOptions
    optional_files: ClassVar[frozenset[str]] = frozenset({PROJECTION_HEAD})
    options: GgufOptions

    def __init__(
        self,
        spec: ModelSpec,
        *,
        model: Any,
        gen: LlamaContext | None,
        emb: LlamaContext | None,
        metadata: dict[str, str],
        head: Head | None = None,
        judges: bool = False,
    ) -> None:
        """`judges`: the model reranks by relevance (on `gen`)."""
        super().__init__(spec)
        self._projection = head
        self._model: Any = model
        self._vocab = Vocab(model)
        self._gen = gen
        self._emb = emb
        self._n_embd = int(llama_cpp.llama_model_n_embd(model))
        self._template = ChatTemplate(spec.name, metadata, self._vocab)
        self._append = [self._special_token(text) for text in self.options.append_tokens]
        self._head, self._tail = self._special_framing()
        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        self._embed_limit = min(spec.max_tokens, n_ctx_train)
        self._dimensions = head.outputs if head is not None else self._n_embd
        # Positions one sequence of the generation context may use.
        self._window = sequence_cells(spec, n_ctx_train)
        # Reranking and health checks use the sequence after the streams' ones.
        self._call_seq = spec.generation.parallel if Task.GENERATE in spec.tasks else 0
        self._engine: StreamEngine | None = None
        if gen is not None and Task.GENERATE in spec.tasks:
            self._engine = StreamEngine(
                gen,
                slots=spec.generation.parallel,
                window=self._window,
                tokenize=self._request_tokens,
                piece=self._vocab.piece,
                is_end=self._vocab.is_end,
                model_name=spec.name,
                threads=int(gen.threads),
                prompt_cache=spec.generation.prompt_cache,
            )
        self._judge: RelevanceJudge | None = None
        if judges and gen is not None:
            self._judge = RelevanceJudge(
                spec,
                gen,
                self._vocab,
                self._template,
                seq=self._call_seq,
                window=self._window,
                before_decode=self._adapt_threads,
            )

    # -- Loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: ModelSpec, files: ModelFiles, options: LoadOptions) -> GgufBackend:
        path = files.weights
        check_gguf_file(spec.name, path)
        settings = cast(GgufOptions, cls.check_spec(spec))
        head_path = files.extra.get(PROJECTION_HEAD)
        head = read_head(spec.name, head_path) if head_path is not None else None
        # llama.cpp's own log lines become structured log events: llama-cpp-python's default
        # callback prints raw text into the server's JSON log stream.
        llama_cpp.llama_log_set(route_llama_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()

        embeds = Task.EMBED in spec.tasks
        relevance = Task.RERANK in spec.tasks and spec.effective_rerank_method is RerankMethod.RELEVANCE
        generates = Task.GENERATE in spec.tasks or relevance
        if embeds and spec.pooling not in POOLING:
            raise FailedPreconditionError(
                f"model {spec.name!r}: the gguf backend pools mean, cls or last, not {spec.pooling.value!r}"
            )

        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = False  # see the module docstring: AMX dies with SIGILL here
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not model:
            raise FailedPreconditionError(
                f"model {spec.name!r}: llama.cpp cannot load {path}: the file is corrupt or truncated, "
                "or its architecture is newer than this llama.cpp"
            )
        gen: LlamaContext | None = None
        emb: LlamaContext | None = None
        try:
            metadata = read_metadata(model)
            n_embd = int(llama_cpp.llama_model_n_embd(model))
            n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
            if embeds:
                check_embedding_shape(spec, n_embd, n_ctx_train, head, head_path)
            if generates:
                params = generation_params(spec, options.threads, n_ctx_train)
                gen = LlamaContext(model, params, what="generation", pooled=True)
            if embeds:
                params = embedding_params(spec, options.threads, n_ctx_train, attends_causally(settings, metadata))
                emb = LlamaContext(model, params, what="embedding")
            return cls(spec, model=model, gen=gen, emb=emb, metadata=metadata, head=head, judges=relevance)
        except BaseException:
            for ctx in (gen, emb):
                if ctx is not None:
                    ctx.close()
            llama_cpp.llama_model_free(model)
            raise

    # -- Backend contract ----------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self._input_tokens(text))

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return self._vocab.token_offsets(text)

    def interrupt(self) -> None:
        """Stop the decode in progress on the generation context: a stream step (the stream engine's
        own flag, cleared after each step) or a relevance call whose caller is gone (the context's
        flag, cleared when the next use claims the context). Embedding calls are not stopped."""
        if self._engine is not None:
            self._engine.interrupt()
        if self._gen is not None:
            self._gen.abort()

    @property
    def working_bytes(self) -> int:
        """The logits of both contexts at their largest decodes: the embedding context's are a row
        per token of its batch (the whole window for a bidirectional model), the generation
        context's a row per sequence."""
        return sum(ctx.working_bytes(self._vocab.n_tokens) for ctx in (self._gen, self._emb) if ctx is not None)

    def health(self) -> None:
        if self._gen is not None:
            ctx = self._gen
            owner = ctx.claim(self._call_seq)
            try:
                self._adapt_threads()
                tokens = self._vocab.tokenize("ok", special=True, parse=False)
                index = ctx.decode_tokens(tokens, 0, self._call_seq, output_last=True)
                assert index is not None  # nothing cancels it
                logits = ctx.logits(index, self._vocab.n_tokens)
            finally:
                if ctx.owned_by(owner):
                    ctx.clear(self._call_seq)
            if not bool(np.isfinite(logits).all()):
                raise FailedPreconditionError(f"model {self.spec.name!r} produced non-finite logits")
        if self._emb is not None:
            vectors = self.embed(["ok"], truncate=True).vectors
            if vectors.shape != (1, self._dimensions) or not bool(np.isfinite(vectors).all()):
                raise FailedPreconditionError(f"model {self.spec.name!r} produced an invalid embedding")

    def close(self) -> None:
        self._engine = None
        self._judge = None
        for ctx in (self._gen, self._emb):
            if ctx is not None:
                ctx.close()
        self._gen = self._emb = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            self._vocab.ptr = None

    # -- Generation ----------------------------------------------------------------------------

    def generate(
        self,
        *,
        prompt: str | None,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        cancelled: Callable[[], bool],
    ) -> Iterator[GenerationDelta]:
        """Completion tokens count every sampled token, the end-of-generation one included.

        One stream on its own, decoded as it would be among others (the scheduler uses `streams`)."""
        engine = self._stream_engine()
        stream = engine.open(prompt=prompt, messages=messages, sampling=sampling)
        if not engine.admit(stream):
            engine.close(stream)
            raise UnavailableError(
                f"model {self.spec.name!r} has no free sequence or KV cells for another stream; retry later"
            )
        return self._drive(engine, stream, cancelled)

    def _drive(self, engine: StreamEngine, stream: Stream, cancelled: Callable[[], bool]) -> Iterator[GenerationDelta]:
        try:
            while not stream.closed:
                if cancelled():
                    return
                if self._engine is not engine:
                    raise UnavailableError(f"model {self.spec.name!r} has been unloaded")
                try:
                    deltas = engine.step_streams([stream])
                except ComputeInterrupted:  # nothing moved: the step runs again
                    continue
                for _, delta in deltas:
                    yield delta
        finally:
            if self._engine is engine:
                engine.close(stream)

    def streams(self) -> GenerationStreams | None:
        return self._engine

    def _stream_engine(self) -> StreamEngine:
        self._context(self._gen if Task.GENERATE in self.spec.tasks else None, Task.GENERATE)
        assert self._engine is not None
        return self._engine

    def _request_tokens(self, prompt: str | None, messages: Sequence[ChatMessage]) -> list[int]:
        if messages:
            return self._vocab.tokenize(self._template.render(messages), special=False, parse=True)
        return self._vocab.tokenize(prompt or "", special=True, parse=True)

    # -- Embeddings ----------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], *, truncate: bool, context: Context | None = None) -> Embeddings:
        ctx = self._context(self._emb, Task.EMBED)
        limit = self._embed_limit
        inputs: list[list[int]] = []
        for i, text in enumerate(texts):
            tokens = self._input_tokens(text)
            if not tokens:
                raise InvalidArgumentError(f"input {i} is empty after tokenization")
            if len(tokens) > limit:
                if not truncate:
                    raise InputTooLongError(i, len(tokens), limit, self.spec.name)
                tokens = self._truncate(tokens, limit)
            inputs.append(tokens)
        vectors = np.zeros((len(inputs), self._n_embd), dtype=np.float32)
        group: list[int] = []
        used = 0
        for i, tokens in enumerate(inputs):
            if len(tokens) > ctx.n_batch:
                vectors[i] = self._embed_long(ctx, tokens)
                continue
            if group and (used + len(tokens) > ctx.n_batch or len(group) == ctx.n_seq_max):
                self._embed_group(ctx, inputs, group, vectors)
                group, used = [], 0
            group.append(i)
            used += len(tokens)
        if group:
            self._embed_group(ctx, inputs, group, vectors)
        if self._projection is not None:
            # After pooling, before normalization (which the engine applies), as sentence-transformers
            # runs its modules: Transformer, Pooling, Dense.
            vectors = self._projection(vectors)
        return Embeddings(vectors=vectors, token_counts=[len(t) for t in inputs])

    def _embed_group(self, ctx: LlamaContext, inputs: list[list[int]], rows: list[int], out: FloatMatrix) -> None:
        """Embed inputs[rows] in one decode, a sequence each, into out[rows]."""
        ctx.clear()
        for seq, row in enumerate(rows):
            for pos, token in enumerate(inputs[row]):
                ctx.add(token, pos, seq, True)
        ctx.decode()
        for seq, row in enumerate(rows):
            out[row] = ctx.pooled(seq, self._n_embd)
        ctx.clear()

    def _embed_long(self, ctx: LlamaContext, tokens: list[int]) -> Vector:
        """Pool a text longer than one decode: causal attention makes each chunk's states exact.
        Only causal contexts get here: a bidirectional one decodes its whole window at once."""
        pooling = self.spec.pooling
        if pooling is Pooling.CLS:
            tokens = tokens[: ctx.n_batch]  # the first token's state does not depend on later ones
        total = np.zeros(self._n_embd, dtype=np.float64)
        vector = total
        ctx.clear()
        for start in range(0, len(tokens), ctx.n_batch):
            chunk = tokens[start : start + ctx.n_batch]
            for offset, token in enumerate(chunk):
                ctx.add(token, start + offset, 0, True)
            ctx.decode()
            vector = ctx.pooled(0, self._n_embd).astype(np.float64)
            total += vector * len(chunk)
        ctx.clear()
        result = total / len(tokens) if pooling is Pooling.MEAN else vector
        return result.astype(np.float32)

    def _truncate(self, tokens: list[int], limit: int) -> list[int]:
        """Keep `limit` tokens: the text's first ones, and the special tokens the tokenizer adds
        around it (as a Hugging Face tokenizer truncates before adding them)."""
        head, tail = self._head, self._tail
        if head + tail >= limit:
            return tokens[:limit]
        body = tokens[head : len(tokens) - tail]
        return tokens[:head] + body[: limit - head - tail] + tokens[len(tokens) - tail :]

    # -- Relevance -----------------------------------------------------------------------------

    def score_relevance(
        self, query: str, documents: Sequence[str], *, instruction: str, truncate: bool
    ) -> RelevanceScores:
        """P(yes) against P(no) as the judge's next token, per document (`relevance_steps`)."""
        scores: list[float] = []
        token_counts: list[int] = []
        steps = self.relevance_steps(
            query, documents, instruction=instruction, truncate=truncate, cancelled=lambda: False
        )
        for score, tokens in steps:
            scores.append(score)
            token_counts.append(tokens)
        return RelevanceScores(scores=scores, token_counts=token_counts)

    def relevance_steps(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str,
        truncate: bool,
        cancelled: Callable[[], bool],
    ) -> Iterator[tuple[float, int]]:
        """P(yes) against P(no) as the judge's next token, a document at a time
        (`relevance.RelevanceJudge.steps`)."""
        judge = self._judge
        self._context(judge.ctx if judge is not None else None, Task.RERANK)
        assert judge is not None
        yield from judge.steps(query, documents, instruction=instruction, truncate=truncate, cancelled=cancelled)

    # -- Helpers -------------------------------------------------------------------------------

    def _context(self, ctx: LlamaContext | None, task: Task) -> LlamaContext:
        if self._model is None:
            raise UnavailableError(f"model {self.spec.name!r} has been unloaded")
        if ctx is None:
            raise self._unsupported(task)
        return ctx

    def _adapt_threads(self) -> None:
        """Before a decode of the calls' sequence: the stream engine's thread count follows the load."""
        if self._engine is not None:
            self._engine.adapt_threads()

    def _input_tokens(self, text: str) -> list[int]:
        """The tokens embedding reads for `text`: the tokenizer's, special ones included, then the
        `append_tokens` the model must end with, unless the tokenizer already put them there."""
        tokens = self._vocab.tokenize(text, special=True, parse=False)
        append = self._append
        if append and tokens[len(tokens) - len(append) :] != append:
            tokens += append
        return tokens

    def _special_token(self, text: str) -> int:
        tokens = self._vocab.tokenize(text, special=False, parse=True)
        if len(tokens) != 1:
            raise FailedPreconditionError(
                f"model {self.spec.name!r}: options.append_tokens names {text!r}, which is not one token of "
                f"the model's vocabulary (it tokenizes to {len(tokens)})"
            )
        return tokens[0]

    def _special_framing(self) -> tuple[int, int]:
        """How many special tokens an input has before and after its text (appended ones included)."""
        plain = self._vocab.tokenize("a", special=False, parse=False)
        framed = self._input_tokens("a")
        for head in range(len(framed) - len(plain) + 1):
            if framed[head : head + len(plain)] == plain:
                return head, len(framed) - head - len(plain)
        return 0, 0
