"""The gguf backend: one llama.cpp model, a generation context (streams, reranking) and an
embedding context sharing its weights (see wafer.backends.gguf's docstring)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, cast

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
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
from wafer.backends.gguf.relevance import (
    NO,
    RERANK_EXAMPLES,
    RERANK_SYSTEM,
    SLOTS,
    YES,
    RerankFrame,
    rerank_user_turn,
    yes_probability,
)
from wafer.backends.gguf.streams import Stream, StreamEngine
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
    ) -> None:
        super().__init__(spec)
        self._projection = head
        self._model: Any = model
        self._vocab: Any = llama_cpp.llama_model_get_vocab(model)
        self._gen = gen
        self._emb = emb
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._n_embd = int(llama_cpp.llama_model_n_embd(model))
        self._piece_buf = ctypes.create_string_buffer(64)
        self._template: Any = None
        template = metadata.get("tokenizer.chat_template")
        if template:
            self._template = Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(int(llama_cpp.llama_vocab_eos(self._vocab))),
                bos_token=self._token_text(int(llama_cpp.llama_vocab_bos(self._vocab))),
                add_generation_prompt=True,
            )
        self._append = [self._special_token(text) for text in self.options.append_tokens]
        self._head, self._tail = self._special_framing()
        self._yes: list[int] = []
        self._no: list[int] = []
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
                piece=self._piece,
                is_end=lambda token: bool(llama_cpp.llama_vocab_is_eog(self._vocab, token)),
                model_name=spec.name,
                threads=int(gen.threads),
                prompt_cache=spec.generation.prompt_cache,
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
                gen = LlamaContext(model, params, what="generation")
            if embeds:
                params = embedding_params(spec, options.threads, n_ctx_train, attends_causally(settings, metadata))
                emb = LlamaContext(model, params, what="embedding")
            backend = cls(spec, model=model, gen=gen, emb=emb, metadata=metadata, head=head)
            if relevance:
                backend._prepare_relevance()
            return backend
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
        """Token spans from the byte length of each token's piece.

        Tokenizers that add a leading space (SentencePiece's "add prefix space") make the pieces one
        byte longer than the text; that byte is taken off the first token. Tokens that split a
        character's UTF-8 bytes get the whole character.
        """
        data = text.encode("utf-8")
        ends: list[int] = []
        total = 0
        for token in self._tokenize(text, special=False, parse=False):
            total += len(self._piece(token))
            ends.append(total)
        shift = max(0, total - len(data))
        # char_of[b]: the character that byte b belongs to; char_of[len] = len(text).
        char_of = [0] * (len(data) + 1)
        position = 0
        for index, char in enumerate(text):
            width = len(char.encode("utf-8"))
            char_of[position : position + width] = [index] * width
            position += width
        char_of[len(data)] = len(text)
        spans: list[tuple[int, int]] = []
        begin = 0
        for end in ends:
            end_byte = min(len(data), max(0, end - shift))
            start_char = char_of[begin]
            # An end inside a character extends to that character's end.
            inside = end_byte < len(data) and not _starts_char(data, end_byte)
            end_char = char_of[end_byte] + 1 if inside else char_of[end_byte]
            spans.append((start_char, max(start_char, end_char)))
            begin = end_byte
        return spans

    def interrupt(self) -> None:
        """Stop the decode in progress on the generation context: a stream step (the stream engine's
        own flag, cleared after each step) or a relevance call whose caller is gone (the context's
        flag, cleared when the next use claims the context). Embedding calls are not stopped."""
        if self._engine is not None:
            self._engine.interrupt()
        if self._gen is not None:
            self._gen.abort()

    def health(self) -> None:
        if self._gen is not None:
            ctx = self._gen
            owner = ctx.claim(self._call_seq)
            try:
                index = self._decode(ctx, self._tokenize("ok", special=True, parse=False), 0, output_last=True)
                assert index is not None  # nothing cancels it
                logits = ctx.logits(index, self._n_vocab)
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
        for ctx in (self._gen, self._emb):
            if ctx is not None:
                ctx.close()
        self._gen = self._emb = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            self._vocab = None

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
            return self._tokenize(self._render(messages), special=False, parse=True)
        return self._tokenize(prompt or "", special=True, parse=True)

    def _render(self, messages: Sequence[ChatMessage]) -> str:
        if self._template is None:
            raise InvalidArgumentError(
                f"model {self.spec.name!r} has no chat template in its GGUF file; send a plain prompt"
            )
        try:
            rendered = self._template(messages=[{"role": m.role, "content": m.content} for m in messages])
        except Exception as exc:
            # The template's own raise_exception (a plain ValueError) refuses these messages; any
            # other error is a broken template: the model's fault, not the caller's.
            if type(exc) is ValueError:
                raise InvalidArgumentError(f"the chat template of model {self.spec.name!r} refused: {exc}") from None
            raise FailedPreconditionError(f"the chat template of model {self.spec.name!r} is broken: {exc}") from None
        return str(rendered.prompt)

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
        """P(yes) against P(no) as the judge's next token, a document at a time.

        The prompt up to the document (system, examples, instruction, query) is evaluated once;
        each document then runs on top of those KV cells and is dropped from the cache after.
        Documents go one per decode: packing several into one decode (a sequence each, sharing
        the prefix cells) was 1.6x faster here, but moved a document's score by up to 0.04
        depending on its neighbours (the quantized model amplifies float-order differences),
        and a score should depend on the query and the document only.

        A document takes seconds on a long text, so the caller's absence (`cancelled()`) is
        checked between decodes: an abandoned rerank stops within one decode, not after every
        document.
        """
        ctx = self._context(self._gen if self._yes else None, Task.RERANK)
        if not documents:
            return
        frame = self._rerank_frame(query, instruction)
        prefix, suffix = frame.prefix, frame.suffix
        limit = min(self.spec.max_tokens, self._window)
        room = limit - len(prefix) - len(suffix)
        if room <= 0:
            raise InvalidArgumentError(
                f"the query and instruction take {len(prefix) + len(suffix)} tokens of the "
                f"{limit} that model {self.spec.name!r} reads per document: shorten the query"
            )
        bodies: list[list[int]] = []
        for i, document in enumerate(documents):
            body = self._tokenize(" " + document, special=False, parse=False)
            if len(body) > room:
                if not truncate:
                    raise InputTooLongError(i, len(prefix) + len(body) + len(suffix), limit, self.spec.name)
                body = body[:room]
            bodies.append(body + suffix)

        seq = self._call_seq
        owner = ctx.claim(seq)
        try:
            if self._decode(ctx, prefix, 0, output_last=False, cancelled=cancelled) is None:
                return
            for body in bodies:
                ctx.check(owner)
                index = self._decode(ctx, body, len(prefix), output_last=True, cancelled=cancelled)
                if index is None:
                    return
                score = yes_probability(ctx.logits(index, self._n_vocab), self._yes, self._no)
                llama_cpp.llama_memory_seq_rm(ctx.memory, seq, len(prefix), -1)
                yield score, len(prefix) + len(body)
        except ComputeInterrupted:
            return  # `interrupt`: the caller is gone
        finally:
            # A generator dropped late must not empty the cells of a use that took the context over.
            if ctx.ptr and ctx.owned_by(owner):
                ctx.clear(seq)

    def _decode(
        self,
        ctx: LlamaContext,
        tokens: list[int],
        start: int,
        *,
        output_last: bool,
        cancelled: Callable[[], bool] = bool,
    ) -> int | None:
        """Decode `tokens` at positions start.. in the calls' sequence (between the streams' steps,
        beside their cells), a batch at a time; returns the batch index of the last token (where
        its logits are read when `output_last`), or None if `cancelled()` turned true between two
        batches."""
        index = 0
        seq = self._call_seq
        if self._engine is not None:
            self._engine.adapt_threads()
        for offset in range(0, len(tokens), ctx.n_batch):
            if cancelled():
                return None
            for k in range(offset, min(offset + ctx.n_batch, len(tokens))):
                index = ctx.add(tokens[k], start + k, seq, output_last and k == len(tokens) - 1)
            ctx.decode()
        return index

    def _prepare_relevance(self) -> None:
        if self._template is None:
            raise FailedPreconditionError(
                f"model {self.spec.name!r} reranks by relevance, which needs a chat template, "
                "and its GGUF file has none; use rerank_method: cosine"
            )
        for words, ids in ((YES, self._yes), (NO, self._no)):
            for word in words:
                tokens = self._tokenize(word, special=False, parse=False)
                if len(tokens) == 1:
                    ids.append(tokens[0])
            if not ids:
                raise FailedPreconditionError(
                    f"model {self.spec.name!r}: its vocabulary has no single token for {words[0]!r}, "
                    "so it cannot judge relevance; use rerank_method: cosine"
                )
        self._rerank_frame("query", "instruction")  # fails now, not at the first request

    def _rerank_frame(self, query: str, instruction: str) -> RerankFrame:
        messages: list[ChatMessage] = [ChatMessage("system", RERANK_SYSTEM)]
        for example_query, example_document, answer in RERANK_EXAMPLES:
            content = rerank_user_turn(" " + instruction, " " + example_query, " " + example_document)
            messages += [ChatMessage("user", content), ChatMessage("assistant", answer)]
        messages.append(ChatMessage("user", rerank_user_turn(*SLOTS)))
        rendered = self._render(messages)
        pieces: list[str] = []
        rest = rendered
        for slot in SLOTS:
            before, found, rest = rest.partition(slot)
            if not found or slot in rest:
                raise FailedPreconditionError(
                    f"model {self.spec.name!r}: its chat template changes message text, "
                    "so relevance prompts cannot be built from it; use rerank_method: cosine"
                )
            pieces.append(before)
        prefix = self._tokenize(pieces[0], special=False, parse=True)
        prefix += self._tokenize(" " + instruction, special=False, parse=False)
        prefix += self._tokenize(pieces[1], special=False, parse=True)
        prefix += self._tokenize(" " + query, special=False, parse=False)
        prefix += self._tokenize(pieces[2], special=False, parse=True)
        return RerankFrame(prefix=prefix, suffix=self._tokenize(rest, special=False, parse=True))

    # -- Helpers -------------------------------------------------------------------------------

    def _context(self, ctx: LlamaContext | None, task: Task) -> LlamaContext:
        if self._model is None:
            raise UnavailableError(f"model {self.spec.name!r} has been unloaded")
        if ctx is None:
            raise self._unsupported(task)
        return ctx

    def _tokenize(self, text: str, *, special: bool, parse: bool) -> list[int]:
        """`special`: add the BOS/EOS the model's tokenizer adds; `parse`: read "<|...|>" as tokens."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        n = int(llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity, special, parse))
        if n < 0:
            capacity = -n
            buffer = (llama_cpp.llama_token * capacity)()
            n = int(llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity, special, parse))
            if n < 0:
                raise RuntimeError(f"llama_tokenize failed ({n})")
        return [int(t) for t in buffer[:n]]

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buf
        n = int(llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False))
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = int(llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False))
        return buf.raw[: max(n, 0)]

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return str(llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace"))

    def _input_tokens(self, text: str) -> list[int]:
        """The tokens embedding reads for `text`: the tokenizer's, special ones included, then the
        `append_tokens` the model must end with, unless the tokenizer already put them there."""
        tokens = self._tokenize(text, special=True, parse=False)
        append = self._append
        if append and tokens[len(tokens) - len(append) :] != append:
            tokens += append
        return tokens

    def _special_token(self, text: str) -> int:
        tokens = self._tokenize(text, special=False, parse=True)
        if len(tokens) != 1:
            raise FailedPreconditionError(
                f"model {self.spec.name!r}: options.append_tokens names {text!r}, which is not one token of "
                f"the model's vocabulary (it tokenizes to {len(tokens)})"
            )
        return tokens[0]

    def _special_framing(self) -> tuple[int, int]:
        """How many special tokens an input has before and after its text (appended ones included)."""
        plain = self._tokenize("a", special=False, parse=False)
        framed = self._input_tokens("a")
        for head in range(len(framed) - len(plain) + 1):
            if framed[head : head + len(plain)] == plain:
                return head, len(framed) - head - len(plain)
        return 0, 0


def _starts_char(data: bytes, index: int) -> bool:
    """Whether byte `index` of UTF-8 `data` begins a character (is not a continuation byte)."""
    return (data[index] & 0xC0) != 0x80
