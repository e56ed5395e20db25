"""An independent numpy reference of a Qwen2 embedding model, written from the authors' architecture
(transformers' `modeling_qwen2.py`, which gte-Qwen2's and stella's `modeling_qwen.py` extend), not
from llama.cpp: it reads the GGUF file's tensors with gguf-py and computes the forward pass here.

- RMSNorm before attention and before the MLP, and on the output (eps from the file);
- attention with q/k/v biases, grouped-query (each key/value head serves n_head / n_head_kv query
  heads), rotary position embeddings in the "rotate half" layout (NEOX), base from the file;
- a causal mask, or none for bidirectional models (gte-Qwen2 `is_causal: false`, stella);
- SwiGLU MLP: down(silu(gate(x)) * up(x));
- pooling as sentence-transformers does: the last token's state, or the mean of all states; then an
  optional Dense head (Linear with bias, Identity activation: stella's `2_Dense_<dims>`).

Token ids come from the caller (tokenization is not what this checks); appending `<|endoftext|>`
before last-token pooling is the caller's too, as gte-Qwen2's own code does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from numpy.typing import NDArray

Matrix = NDArray[np.float64]


@dataclass(frozen=True)
class _Layer:
    attn_norm: Matrix
    q: Matrix
    q_bias: Matrix
    k: Matrix
    k_bias: Matrix
    v: Matrix
    v_bias: Matrix
    out: Matrix
    ffn_norm: Matrix
    gate: Matrix
    up: Matrix
    down: Matrix


class Qwen2Reference:
    def __init__(self, path: Path) -> None:
        reader = gguf.GGUFReader(str(path))
        tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}

        def scalar(key: str) -> float:
            return float(reader.fields[key].parts[-1][0])

        self.n_head = int(scalar("qwen2.attention.head_count"))
        self.n_head_kv = int(scalar("qwen2.attention.head_count_kv"))
        self.eps = scalar("qwen2.attention.layer_norm_rms_epsilon")
        self.rope_base = scalar("qwen2.rope.freq_base")
        self.embedding = tensors["token_embd.weight"]
        self.n_embd = self.embedding.shape[1]
        self.head_dim = self.n_embd // self.n_head
        self.output_norm = tensors["output_norm.weight"]
        self.layers = [
            _Layer(*(tensors[f"blk.{i}.{name}"] for name in _LAYER_TENSORS))
            for i in range(int(scalar("qwen2.block_count")))
        ]

    def states(self, tokens: list[int], *, causal: bool) -> Matrix:
        """The final-norm hidden state of every token, [len(tokens), n_embd]."""
        x = self.embedding[tokens]
        n = len(tokens)
        cos, sin = self._rotary(n)
        mask = np.triu(np.full((n, n), -np.inf), k=1) if causal else np.zeros((n, n))
        group = self.n_head // self.n_head_kv
        for layer in self.layers:
            h = self._rms_norm(x, layer.attn_norm)
            q = (h @ layer.q.T + layer.q_bias).reshape(n, self.n_head, self.head_dim)
            k = (h @ layer.k.T + layer.k_bias).reshape(n, self.n_head_kv, self.head_dim)
            v = (h @ layer.v.T + layer.v_bias).reshape(n, self.n_head_kv, self.head_dim)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(self.head_dim) + mask
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            weights /= weights.sum(axis=-1, keepdims=True)
            attended = np.einsum("hqk,khd->qhd", weights, v).reshape(n, self.n_embd)
            x = x + attended @ layer.out.T
            h = self._rms_norm(x, layer.ffn_norm)
            gate = h @ layer.gate.T
            x = x + ((gate / (1.0 + np.exp(-gate))) * (h @ layer.up.T)) @ layer.down.T
        return self._rms_norm(x, self.output_norm)

    def embed(
        self, tokens: list[int], *, causal: bool, last_token: bool, head: tuple[Matrix, Matrix] | None = None
    ) -> Matrix:
        states = self.states(tokens, causal=causal)
        pooled: Matrix = states[-1] if last_token else states.mean(axis=0)
        if head is not None:
            weight, bias = head
            pooled = weight @ pooled + bias
        return pooled

    def _rms_norm(self, x: Matrix, weight: Matrix) -> Matrix:
        normed: Matrix = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + self.eps) * weight
        return normed

    def _rotary(self, n: int) -> tuple[Matrix, Matrix]:
        inv_freq = 1.0 / self.rope_base ** (np.arange(0, self.head_dim, 2) / self.head_dim)
        angles = np.outer(np.arange(n), inv_freq)
        angles = np.concatenate([angles, angles], axis=-1)  # [n, head_dim]
        return np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]


def _rotate(x: Matrix, cos: Matrix, sin: Matrix) -> Matrix:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    result: Matrix = x * cos + rotated * sin
    return result


_LAYER_TENSORS = (
    "attn_norm.weight",
    "attn_q.weight",
    "attn_q.bias",
    "attn_k.weight",
    "attn_k.bias",
    "attn_v.weight",
    "attn_v.bias",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)


class Tokenizer:
    """The GGUF file's tokenizer through llama.cpp (vocabulary only, no weights): the token ids the
    reference is fed. With the tokenizer's own special tokens, none appended."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._llama = llama_cpp
        self._model: Any = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self._model
        self._vocab: Any = llama_cpp.llama_model_get_vocab(self._model)
        self.eos = int(llama_cpp.llama_vocab_eos(self._vocab))

    def __call__(self, text: str) -> list[int]:
        data = text.encode()
        buffer = (self._llama.llama_token * (len(data) + 8))()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buffer, len(buffer), True, False)
        assert n >= 0
        return [int(t) for t in buffer[:n]]

    def close(self) -> None:
        self._llama.llama_model_free(self._model)
