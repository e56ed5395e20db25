"""One llama.cpp context (its batch, its abort flag, one use at a time) and the parameters the
generation and embedding contexts are made with."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np
from numpy.typing import NDArray

from wafer.backends.base import ComputeInterrupted
from wafer.backends.gguf.streams import ABORT_IF_FLAG_SET
from wafer.backends.gguf.threadpool import ThreadPool
from wafer.errors import FailedPreconditionError
from wafer.specs import ModelSpec, Pooling, Task

Vector = NDArray[np.float32]

POOLING: dict[Pooling, int] = {
    Pooling.MEAN: llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    Pooling.CLS: llama_cpp.LLAMA_POOLING_TYPE_CLS,
    Pooling.LAST: llama_cpp.LLAMA_POOLING_TYPE_LAST,
}

# Tokens per llama_decode in the generation context: a prompt chunk and a token per stream.
GEN_BATCH = 512
# Tokens per llama_decode in the embedding context of a causal model. In embedding mode llama.cpp
# computes logits for every token, so its output buffer is tokens x vocabulary floats (25 MB here
# at 128, 100 MB at 512) while throughput is flat from 128 up (~330 tokens/s on SMS texts).
# Longer texts are decoded in chunks and pooled across them, which is exact for causal attention.
EMBED_BATCH = 128
# Texts per llama_decode in the embedding context.
EMBED_SEQS = 64

# llama_decode's return code when the abort callback stopped it.
DECODE_ABORTED = 2

# Bytes of one logit (llama.cpp keeps them as float32).
LOGIT_BYTES = 4


def logits_bytes(n_vocab: int, outputs: int) -> int:
    """Memory a context's logits take at its largest decode, `outputs` rows of `n_vocab` floats held
    twice: as the logits tensor of the compute buffer and in the output buffer (`output_reserve` in
    llama-context.cpp). Both are reserved when the context is made but touched only as rows are
    computed, so a warm-up of a few tokens leaves them out of the RSS it measures. An embedding
    context outputs every token (`output_all = cparams.embeddings` in `llama_context::decode`), and a
    decoder's graph computes logits over the whole vocabulary even when only the pooled vector is
    read (qwen2.cpp's `t_logits`): gte-Qwen2 at its 8192-token window, 2 x 151,646 x 4 B x 8192 is
    9.9 GB (measured on a random Qwen2 of that vocabulary: RSS 0.18 GB after the load, 9.76 GB after
    one full-window embed)."""
    return 2 * LOGIT_BYTES * n_vocab * outputs


def output_rows(params: Any) -> int:
    """Rows of logits one decode of a context made with `params` may output: `n_outputs_max`, which
    llama.cpp reads as n_batch when 0 (the embedding context: every token is an output)."""
    return int(params.n_outputs_max) or int(params.n_batch)


class LlamaContext:
    """One llama_context with a batch sized for it; used by one thread at a time.

    `pooled`: its graphs run on a persistent thread pool of its `n_threads` (wafer.backends.gguf.threadpool),
    freed after the context, instead of threads started and joined for each graph."""

    def __init__(self, model: Any, params: Any, *, what: str, pooled: bool = False) -> None:
        self.ptr: Any = llama_cpp.llama_init_from_model(model, params)
        if not self.ptr:
            raise FailedPreconditionError(f"llama.cpp could not create the {what} context")
        self.pool: ThreadPool | None = None
        if pooled:
            try:
                self.pool = ThreadPool(int(params.n_threads))
            except BaseException:
                llama_cpp.llama_free(self.ptr)
                self.ptr = None
                raise
            self.pool.attach(self.ptr)
        self.memory: Any = llama_cpp.llama_get_memory(self.ptr)
        # llama.cpp rounds the context up (to 256 at least); the limit is what was asked for.
        self.n_ctx = min(int(params.n_ctx), int(llama_cpp.llama_n_ctx(self.ptr)))
        self.n_batch = int(params.n_batch)
        self.outputs = output_rows(params)
        self.n_seq_max = int(params.n_seq_max)
        self.threads = int(params.n_threads)
        self.batch: Any = llama_cpp.llama_batch_init(self.n_batch, 0, self.n_seq_max)
        self._owner = object()
        # A non-empty C string while the use in progress is to stop (`abort`): `decode` hands it to
        # llama.cpp's abort callback, asked between graph nodes, which libc's strlen answers without
        # Python (a Python callback would take the GIL hundreds of times per decode). The stream
        # engine (streams.py) installs its own flag around its own decodes.
        self._abort = ctypes.create_string_buffer(2)
        # The flag llama.cpp's abort callback reads now. It stays installed between decodes and is
        # changed only when another flag's turn comes: llama_set_abort_callback logs each call, and
        # two log lines per token crossed into Python and structlog (2% of a token step, profiled).
        self._abort_installed: ctypes.Array[ctypes.c_char] | None = None

    def working_bytes(self, n_vocab: int) -> int:
        """What this context's largest decode touches beyond a warm-up's: its logits (`logits_bytes`)."""
        return logits_bytes(n_vocab, self.outputs)

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
        if rc == DECODE_ABORTED:
            raise ComputeInterrupted
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def decode_tokens(
        self,
        tokens: list[int],
        start: int,
        seq: int,
        *,
        output_last: bool,
        cancelled: Callable[[], bool] = bool,
    ) -> int | None:
        """Decode `tokens` at positions start.. of sequence `seq`, a batch at a time; returns the
        batch index of the last token (where its logits are read when `output_last`), or None if
        `cancelled()` turned true between two batches."""
        index = 0
        for offset in range(0, len(tokens), self.n_batch):
            if cancelled():
                return None
            for k in range(offset, min(offset + self.n_batch, len(tokens))):
                index = self.add(tokens[k], start + k, seq, output_last and k == len(tokens) - 1)
            self.decode()
        return index

    def logits(self, index: int, n_vocab: int) -> Vector:
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, index)
        if not ptr:
            raise RuntimeError(f"llama.cpp has no logits for batch index {index}")
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    def pooled(self, seq: int, n_embd: int) -> Vector:
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
        # After the context: a context never computes on a freed pool.
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def sequence_cells(spec: ModelSpec, n_ctx_train: int) -> int:
    """KV cells of each sequence of the generation context: a stream's prompt and reply."""
    window = spec.context_length or n_ctx_train
    return min(window, spec.generation.kv_cells or window)


def generation_params(spec: ModelSpec, threads: int, n_ctx_train: int) -> Any:
    params = context_params(threads)
    # One sequence per stream and one for the calls (reranking, health checks), each with cells of
    # its own (see wafer.backends.gguf.streams: outputs must not depend on the other streams).
    params.n_seq_max = spec.generation.parallel + 1 if Task.GENERATE in spec.tasks else 1
    params.kv_unified = False
    params.n_ctx = sequence_cells(spec, n_ctx_train) * params.n_seq_max
    params.n_batch = params.n_ubatch = GEN_BATCH
    # Without flash attention every kernel of a decode computes each output of a sequence in an order
    # fixed by that sequence alone, so its tokens do not depend on the other streams in the batch, on
    # the thread count or on how its prompt was cut into chunks (see docs/architecture.md,
    # "Generation"). With it, ggml's CPU kernel splits the keys of a lone one-token decode over the
    # threads once 512 cells are in view and merges the partial sums (`use_split_kv_path` in
    # ggml-cpu/ops.cpp), and tiles prompt chunks of 64 tokens or more differently from shorter ones:
    # measured on SmolLM2, a stream's greedy tokens changed with the company it was decoded in.
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if spec.generation.flash_attention
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    # A decode reads the logits of one token per stream at most (not of every prompt token).
    params.n_outputs_max = params.n_seq_max
    return params


def embedding_params(spec: ModelSpec, threads: int, n_ctx_train: int, causal: bool) -> Any:
    limit = min(spec.max_tokens, n_ctx_train)
    params = context_params(threads)
    params.embeddings = True
    params.pooling_type = POOLING[spec.pooling]
    # Set either way: llama.cpp would otherwise take the file's own flag, which conversions of
    # bidirectionally trained decoders leave out.
    params.attention_type = (
        llama_cpp.LLAMA_ATTENTION_TYPE_CAUSAL if causal else llama_cpp.LLAMA_ATTENTION_TYPE_NON_CAUSAL
    )
    params.n_ctx = limit
    # llama.cpp pools per micro-batch: a non-causal model must see each text whole in one.
    params.n_batch = params.n_ubatch = min(EMBED_BATCH, limit) if causal else limit
    # Every token is an output in embedding mode; llama.cpp asserts n_outputs_max >= n_seq_max.
    params.n_seq_max = min(EMBED_SEQS, params.n_batch)
    params.kv_unified = True
    return params


def context_params(threads: int) -> Any:
    params = llama_cpp.llama_context_default_params()
    params.n_threads = threads
    params.n_threads_batch = threads
    return params
