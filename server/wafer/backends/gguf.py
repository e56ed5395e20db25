"""GGUF models on llama.cpp: streamed generation, decoder embeddings, yes/no relevance scoring.

Built on llama-cpp-python's low-level bindings (llama.h mirrored in ctypes), not on its `Llama`
class, for three reasons measured on this project's machines (SmolLM2-135M, 2 cores):

- `Llama` always loads weights with llama.cpp's extra buffer types (AMX / repacked layouts). These
  CPUs advertise AMX but the VM does not run it: the first decode dies with SIGILL. The repacked
  copy is also anonymous memory (~95 MB here) on top of the mmapped file. `Llama` cannot turn it off.
- One model serves two contexts, one for generation and reranking and one for embeddings, and
  they share the weights; two `Llama` objects would load the file twice.
- The generation context caps its outputs per batch (`n_outputs_max`): its compute buffer is
  ~18 MB instead of ~100 MB spent on logits for every token of a 512-token prompt batch.

Generation streams share the generation context as separate sequences, decoded together
(wafer.backends.gguf_streams); reranking and health checks use one more sequence of it.

Everything llama.cpp hands back is untyped; it stays inside this module.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, cast

import llama_cpp
import numpy as np
import structlog
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

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
from wafer.backends.gguf_streams import ABORT_IF_FLAG_SET, Stream, StreamEngine
from wafer.domain import ChatMessage, Context, FloatMatrix, GenerationDelta, SamplingParams
from wafer.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from wafer.specs import ModelSpec, Pooling, RerankMethod, Task

_Vector = NDArray[np.float32]


class Attention(StrEnum):
    """How tokens attend to each other when the model embeds."""

    # Each token sees those before it: decoder LLMs, and embedders trained that way (KaLM).
    CAUSAL = "causal"
    # Every token sees the whole text: encoders, and decoders trained with the mask removed
    # (gte-Qwen2, stella). Public GGUF conversions of those do not record it.
    BIDIRECTIONAL = "bidirectional"


class GgufOptions(BaseModel):
    """The `options` of a gguf model in models.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    attention: Attention | None = Field(
        default=None,
        description="Attention when embedding: causal or bidirectional. Default: what the GGUF file records "
        "(`<arch>.attention.causal`; causal when it records nothing, as decoder conversions do).",
    )
    append_tokens: list[str] = Field(
        default_factory=list,
        description="Special tokens, by their text (e.g. '<|endoftext|>'), every input to embed must end with: "
        "added after the tokenizer's own unless the input already ends with them. Each must be one token of "
        "the model's vocabulary.",
    )


# Role of `files` holding a sentence-transformers Dense head (`2_Dense_<dims>/model.safetensors`).
PROJECTION_HEAD = "projection_head"


@dataclass(frozen=True, slots=True)
class _Head:
    """A Linear layer applied to pooled vectors: out = pooled @ weight.T + bias."""

    weight: NDArray[np.float32]
    bias: NDArray[np.float32]

    @property
    def inputs(self) -> int:
        return int(self.weight.shape[1])

    @property
    def outputs(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, vectors: FloatMatrix) -> FloatMatrix:
        projected = vectors.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias
        return projected.astype(np.float32)


_POOLING: dict[Pooling, int] = {
    Pooling.MEAN: llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    Pooling.CLS: llama_cpp.LLAMA_POOLING_TYPE_CLS,
    Pooling.LAST: llama_cpp.LLAMA_POOLING_TYPE_LAST,
}

# Tokens per llama_decode in the generation context: a prompt chunk and a token per stream.
_GEN_BATCH = 512
# Tokens per llama_decode in the embedding context of a causal model. In embedding mode llama.cpp
# computes logits for every token, so its output buffer is tokens x vocabulary floats (25 MB here
# at 128, 100 MB at 512) while throughput is flat from 128 up (~330 tokens/s on SMS texts).
# Longer texts are decoded in chunks and pooled across them, which is exact for causal attention.
_EMBED_BATCH = 128
# Texts per llama_decode in the embedding context.
_EMBED_SEQS = 64

# llama_decode's return code when the abort callback stopped it.
_DECODE_ABORTED = 2

_log = structlog.get_logger("wafer.llama_cpp")
_GGML_LOG_WARN = 3
_GGML_LOG_ERROR = 4
_GGUF_MAGIC = b"GGUF"

# Qwen3-Reranker's judging prompt. Two worked examples before the real question teach a small
# instruct model (SmolLM2-135M) to answer with a bare "yes"/"no" token; without them its next token
# is rarely either ("The", "To", ...), and on 8 queries x 8 documents the yes/no odds put the right
# document first for 1 query in 8 (chance), against 4 in 8 with them. Being part of the shared
# prefix, they are evaluated once per request.
_RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
_RERANK_EXAMPLES = (
    (
        "When was the Eiffel Tower built?",
        "The Eiffel Tower was built between 1887 and 1889 for the World's Fair.",
        "yes",
    ),
    ("When was the Eiffel Tower built?", "Bananas are rich in potassium and easy to digest.", "no"),
)
_YES = ("yes", "Yes")
_NO = ("no", "No")
# Private-use characters mark where data goes in the rendered template, so that data is tokenized
# as plain text (a document containing "<|im_end|>" must not close the turn).
_SLOTS = ("\ue000", "\ue001", "\ue002")


def _rerank_user_turn(instruction: str, query: str, document: str) -> str:
    return f"<Instruct>:{instruction}\n<Query>:{query}\n<Document>:{document}"


class _Context:
    """One llama_context with a batch sized for it; used by one thread at a time."""

    def __init__(self, model: Any, params: Any, *, what: str) -> None:
        self.ptr: Any = llama_cpp.llama_init_from_model(model, params)
        if not self.ptr:
            raise FailedPreconditionError(f"llama.cpp could not create the {what} context")
        self.memory: Any = llama_cpp.llama_get_memory(self.ptr)
        # llama.cpp rounds the context up (to 256 at least); the limit is what was asked for.
        self.n_ctx = min(int(params.n_ctx), int(llama_cpp.llama_n_ctx(self.ptr)))
        self.n_batch = int(params.n_batch)
        self.n_seq_max = int(params.n_seq_max)
        self.threads = int(params.n_threads)
        self.batch: Any = llama_cpp.llama_batch_init(self.n_batch, 0, self.n_seq_max)
        self._owner = object()
        # A non-empty C string while the use in progress is to stop (`abort`): `decode` hands it to
        # llama.cpp's abort callback, asked between graph nodes, which libc's strlen answers without
        # Python (a Python callback would take the GIL hundreds of times per decode). The stream
        # engine (gguf_streams) installs its own flag around its own decodes.
        self._abort = ctypes.create_string_buffer(2)
        # The flag llama.cpp's abort callback reads now. It stays installed between decodes and is
        # changed only when another flag's turn comes: llama_set_abort_callback logs each call, and
        # two log lines per token crossed into Python and structlog (2% of a token step, profiled).
        self._abort_installed: ctypes.Array[ctypes.c_char] | None = None

    def claim(self, seq: int = -1) -> object:
        """Start a new use of the context, emptying its cache (or sequence `seq` of it: the streams'
        cells stay); returns the use's token."""
        self._abort[0] = b"\x00"
        self.clear(seq)
        self._owner = object()
        return self._owner

    def abort(self) -> None:
        """Stop the decode in progress (it raises ComputeInterrupted), and any other of this use;
        from any thread. The next `claim` clears it."""
        self._abort[0] = b"\x01"

    def owned_by(self, owner: object) -> bool:
        return self._owner is owner

    def check(self, owner: object) -> None:
        """Refuse to go on with a use that another one (or close) has taken over: a generator
        left suspended must not write into the cache a later request is using."""
        if self._owner is not owner or not self.ptr:
            raise RuntimeError("this use of the context was abandoned and its context reused")

    def clear(self, seq: int = -1) -> None:
        """Empty the cache, or one sequence's cells of it."""
        if self.memory:
            if seq < 0:
                llama_cpp.llama_memory_clear(self.memory, True)
            else:
                llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def add(self, token: int, pos: int, seq: int, output: bool) -> int:
        """Append one token to the batch; returns its index (where its outputs are read)."""
        batch = self.batch
        i = int(batch.n_tokens)
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = output
        batch.n_tokens = i + 1
        return i

    def use_abort_flag(self, flag: ctypes.Array[ctypes.c_char]) -> None:
        """Have the next decodes stop when `flag` holds a non-empty C string."""
        if self._abort_installed is not flag:
            llama_cpp.llama_set_abort_callback(self.ptr, ABORT_IF_FLAG_SET, ctypes.cast(flag, ctypes.c_void_p))
            self._abort_installed = flag

    def decode(self) -> None:
        self.use_abort_flag(self._abort)
        try:
            rc = int(llama_cpp.llama_decode(self.ptr, self.batch))
        finally:
            self.batch.n_tokens = 0
        if rc == _DECODE_ABORTED:
            raise ComputeInterrupted
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def logits(self, index: int, n_vocab: int) -> _Vector:
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, index)
        if not ptr:
            raise RuntimeError(f"llama.cpp has no logits for batch index {index}")
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    def pooled(self, seq: int, n_embd: int) -> _Vector:
        ptr = llama_cpp.llama_get_embeddings_seq(self.ptr, seq)
        if not ptr:
            raise RuntimeError(f"llama.cpp has no pooled embedding for sequence {seq}")
        return np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float32)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None
            self.memory = None


@dataclass(frozen=True, slots=True)
class _RerankFrame:
    """Token ids of one rerank request's prompt around the document."""

    prefix: list[int]
    suffix: list[int]


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
        gen: _Context | None,
        emb: _Context | None,
        metadata: dict[str, str],
        head: _Head | None = None,
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
        self._window = _sequence_cells(spec, n_ctx_train)
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
        _check_gguf_file(spec.name, path)
        settings = cast(GgufOptions, cls.check_spec(spec))
        head_path = files.extra.get(PROJECTION_HEAD)
        head = _read_head(spec.name, head_path) if head_path is not None else None
        # llama.cpp's own log lines become structured log events: llama-cpp-python's default
        # callback prints raw text into the server's JSON log stream.
        llama_cpp.llama_log_set(_route_llama_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()

        embeds = Task.EMBED in spec.tasks
        relevance = Task.RERANK in spec.tasks and spec.effective_rerank_method is RerankMethod.RELEVANCE
        generates = Task.GENERATE in spec.tasks or relevance
        if embeds and spec.pooling not in _POOLING:
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
        gen: _Context | None = None
        emb: _Context | None = None
        try:
            metadata = _metadata(model)
            n_embd = int(llama_cpp.llama_model_n_embd(model))
            n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
            if embeds:
                _check_embedding_shape(spec, n_embd, n_ctx_train, head, head_path)
            if generates:
                params = _generation_params(spec, options.threads, n_ctx_train)
                gen = _Context(model, params, what="generation")
            if embeds:
                params = _embedding_params(spec, options.threads, n_ctx_train, _causal(settings, metadata))
                emb = _Context(model, params, what="embedding")
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

    def _embed_group(self, ctx: _Context, inputs: list[list[int]], rows: list[int], out: FloatMatrix) -> None:
        """Embed inputs[rows] in one decode, a sequence each, into out[rows]."""
        ctx.clear()
        for seq, row in enumerate(rows):
            for pos, token in enumerate(inputs[row]):
                ctx.add(token, pos, seq, True)
        ctx.decode()
        for seq, row in enumerate(rows):
            out[row] = ctx.pooled(seq, self._n_embd)
        ctx.clear()

    def _embed_long(self, ctx: _Context, tokens: list[int]) -> _Vector:
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
        steps = self.relevance_steps(query, documents, instruction=instruction, truncate=truncate, cancelled=bool)
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
                score = self._yes_probability(ctx.logits(index, self._n_vocab))
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
        ctx: _Context,
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

    def _yes_probability(self, logits: _Vector) -> float:
        yes = float(np.logaddexp.reduce(logits[self._yes].astype(np.float64)))
        no = float(np.logaddexp.reduce(logits[self._no].astype(np.float64)))
        return 1.0 / (1.0 + math.exp(no - yes))

    def _prepare_relevance(self) -> None:
        if self._template is None:
            raise FailedPreconditionError(
                f"model {self.spec.name!r} reranks by relevance, which needs a chat template, "
                "and its GGUF file has none; use rerank_method: cosine"
            )
        for words, ids in ((_YES, self._yes), (_NO, self._no)):
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

    def _rerank_frame(self, query: str, instruction: str) -> _RerankFrame:
        messages: list[ChatMessage] = [ChatMessage("system", _RERANK_SYSTEM)]
        for example_query, example_document, answer in _RERANK_EXAMPLES:
            content = _rerank_user_turn(" " + instruction, " " + example_query, " " + example_document)
            messages += [ChatMessage("user", content), ChatMessage("assistant", answer)]
        messages.append(ChatMessage("user", _rerank_user_turn(*_SLOTS)))
        rendered = self._render(messages)
        pieces: list[str] = []
        rest = rendered
        for slot in _SLOTS:
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
        return _RerankFrame(prefix=prefix, suffix=self._tokenize(rest, special=False, parse=True))

    # -- Helpers -------------------------------------------------------------------------------

    def _context(self, ctx: _Context | None, task: Task) -> _Context:
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


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _route_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", "replace").strip()
    if not message or message == ".":
        return
    # ggml.h's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Warnings and errors stay
    # visible; the rest (metadata dumps at every load) only at debug.
    if level in (_GGML_LOG_WARN, _GGML_LOG_ERROR):
        _log.warning("llama.cpp", message=message)
    else:
        _log.debug("llama.cpp", message=message)


def _check_gguf_file(name: str, path: Path) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise FailedPreconditionError(f"model {name!r}: cannot read {path}: {exc.strerror}") from None
    if magic != _GGUF_MAGIC:
        raise FailedPreconditionError(
            f"model {name!r}: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
        )


def _sequence_cells(spec: ModelSpec, n_ctx_train: int) -> int:
    """KV cells of each sequence of the generation context: a stream's prompt and reply."""
    window = spec.context_length or n_ctx_train
    return min(window, spec.generation.kv_cells or window)


def _generation_params(spec: ModelSpec, threads: int, n_ctx_train: int) -> Any:
    params = _context_params(threads)
    # One sequence per stream and one for the calls (reranking, health checks), each with cells of
    # its own (see wafer.backends.gguf_streams: outputs must not depend on the other streams).
    params.n_seq_max = spec.generation.parallel + 1 if Task.GENERATE in spec.tasks else 1
    params.kv_unified = False
    params.n_ctx = _sequence_cells(spec, n_ctx_train) * params.n_seq_max
    params.n_batch = params.n_ubatch = _GEN_BATCH
    # Without flash attention every kernel of a decode computes each output of a sequence in an order
    # fixed by that sequence alone, so its tokens do not depend on the other streams in the batch, on
    # the thread count or on how its prompt was cut into chunks (see docs/architecture.md,
    # "Generation"). With it, ggml's CPU kernel splits the keys of a lone one-token decode over the
    # threads once 512 cells are in view and merges the partial sums (`use_split_kv_path` in
    # ggml-cpu/ops.cpp), and tiles prompt chunks of 64 tokens or more differently from shorter ones:
    # measured on SmolLM2, a stream's greedy tokens changed with the company it was decoded in.
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    # A decode reads the logits of one token per stream at most (not of every prompt token).
    params.n_outputs_max = params.n_seq_max
    return params


def _causal(options: GgufOptions, metadata: dict[str, str]) -> bool:
    """Whether embedding attends causally: the spec's `attention`, else what the file records."""
    if options.attention is not None:
        return options.attention is Attention.CAUSAL
    arch = metadata.get("general.architecture", "")
    return metadata.get(f"{arch}.attention.causal", "true") != "false"


def _embedding_params(spec: ModelSpec, threads: int, n_ctx_train: int, causal: bool) -> Any:
    limit = min(spec.max_tokens, n_ctx_train)
    params = _context_params(threads)
    params.embeddings = True
    params.pooling_type = _POOLING[spec.pooling]
    # Set either way: llama.cpp would otherwise take the file's own flag, which conversions of
    # bidirectionally trained decoders leave out.
    params.attention_type = (
        llama_cpp.LLAMA_ATTENTION_TYPE_CAUSAL if causal else llama_cpp.LLAMA_ATTENTION_TYPE_NON_CAUSAL
    )
    params.n_ctx = limit
    # llama.cpp pools per micro-batch: a non-causal model must see each text whole in one.
    params.n_batch = params.n_ubatch = min(_EMBED_BATCH, limit) if causal else limit
    # Every token is an output in embedding mode; llama.cpp asserts n_outputs_max >= n_seq_max.
    params.n_seq_max = min(_EMBED_SEQS, params.n_batch)
    params.kv_unified = True
    return params


def _check_embedding_shape(
    spec: ModelSpec, n_embd: int, n_ctx_train: int, head: _Head | None, head_path: Path | None
) -> None:
    if head is not None and head.inputs != n_embd:
        raise FailedPreconditionError(
            f"model {spec.name!r}: the projection head {head_path} takes {head.inputs}-d vectors, but the GGUF "
            f"file's embedding size is {n_embd}: it is another model's head"
        )
    out = head.outputs if head is not None else n_embd
    if spec.dimensions != out:
        what = f"the projection head {head_path} outputs" if head is not None else "the GGUF file's embedding size is"
        raise FailedPreconditionError(
            f"model {spec.name!r}: models.yaml says dimensions {spec.dimensions}, but {what} {out}"
        )
    if spec.max_tokens > n_ctx_train:
        # Chunking and pool_chunks cut texts to `max_tokens`: a smaller real window would cut them again.
        raise FailedPreconditionError(
            f"model {spec.name!r}: models.yaml says max_tokens {spec.max_tokens}, but the GGUF file's model was "
            f"trained for {n_ctx_train} tokens; set max_tokens to at most {n_ctx_train}"
        )


def _read_head(name: str, path: Path) -> _Head:
    """A sentence-transformers Dense module's weights (`linear.weight` [out, in], `linear.bias` [out])."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise FailedPreconditionError(f"model {name!r}: cannot read the projection head {path}: {exc}") from None
    weight, bias = tensors.get("linear.weight"), tensors.get("linear.bias")
    if weight is None or weight.ndim != 2:
        raise FailedPreconditionError(
            f"model {name!r}: {path} is not a Dense head: it has no 2-d `linear.weight` "
            f"(tensors: {', '.join(sorted(tensors)) or 'none'})"
        )
    if bias is None:
        bias = np.zeros(weight.shape[0], dtype=np.float32)
    if bias.shape != (weight.shape[0],):
        raise FailedPreconditionError(
            f"model {name!r}: {path}: `linear.bias` has shape {bias.shape}, not ({weight.shape[0]},)"
        )
    return _Head(weight=weight.astype(np.float32), bias=bias.astype(np.float32))


def _context_params(threads: int) -> Any:
    params = llama_cpp.llama_context_default_params()
    params.n_threads = threads
    params.n_threads_batch = threads
    return params


def _metadata(model: Any) -> dict[str, str]:
    metadata: dict[str, str] = {}
    buffer = ctypes.create_string_buffer(256)
    for i in range(int(llama_cpp.llama_model_meta_count(model))):
        key = _meta_string(llama_cpp.llama_model_meta_key_by_index, model, i, buffer)
        metadata[key] = _meta_string(llama_cpp.llama_model_meta_val_str_by_index, model, i, buffer)
    return metadata


def _meta_string(read: Any, model: Any, index: int, buffer: Any) -> str:
    n = int(read(model, index, buffer, len(buffer)))
    if n >= len(buffer):
        buffer = ctypes.create_string_buffer(n + 1)
        n = int(read(model, index, buffer, len(buffer)))
    return str(buffer.raw[: max(n, 0)].decode("utf-8", errors="replace"))


def _starts_char(data: bytes, index: int) -> bool:
    """Whether byte `index` of UTF-8 `data` begins a character (is not a continuation byte)."""
    return (data[index] & 0xC0) != 0x80
