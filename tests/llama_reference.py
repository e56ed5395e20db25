"""An independent reference for GGUF embeddings: llama.cpp's low-level API with pooling off, giving
the final-norm hidden state of every token; pooling is then written out in numpy. Tests compare
GgufBackend's pooled vectors against it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from numpy.typing import NDArray

from wafer.specs import Pooling

Vector = NDArray[np.float64]


class TokenStates:
    def __init__(self, path: Path, *, n_ctx: int = 1024, threads: int = 1) -> None:
        model_params = llama_cpp.llama_model_default_params()
        # The backend loads without extra buffer types too (AMX repacking crashes these VMs).
        model_params.use_extra_bufts = False
        self.model: Any = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        assert self.model
        self.vocab: Any = llama_cpp.llama_model_get_vocab(self.model)
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.model))
        self.eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_threads = params.n_threads_batch = threads
        self.ctx: Any = llama_cpp.llama_init_from_model(self.model, params)
        assert self.ctx
        self.batch: Any = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def tokens(self, text: str) -> list[int]:
        data = text.encode()
        buffer = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), True, False)
        return [int(t) for t in buffer[:n]]

    def rows(self, tokens: list[int]) -> NDArray[np.float64]:
        """One hidden state per token, [len(tokens), n_embd]."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            self.batch.token[i] = token
            self.batch.pos[i] = i
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
            self.batch.logits[i] = True
        assert llama_cpp.llama_decode(self.ctx, self.batch) == 0
        states = [
            np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(self.ctx, i), shape=(self.n_embd,))
            for i in range(len(tokens))
        ]
        return np.array(states, dtype=np.float64)

    def pooled(self, tokens: list[int], pooling: Pooling) -> Vector:
        rows = self.rows(tokens)
        if pooling is Pooling.LAST:
            last: Vector = rows[-1]
            return last
        mean: Vector = rows.mean(axis=0)
        return mean

    def mean(self, tokens: list[int]) -> Vector:
        return self.pooled(tokens, Pooling.MEAN)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)
