"""An independent numpy reference of a BERT encoder (transformers' `modeling_bert.py`, which ember-v1
is), reading the GGUF file's tensors with gguf-py: word + token-type (0) + position embeddings and a
LayerNorm; per block, bidirectional multi-head attention, residual and LayerNorm, then an exact-erf
GELU feed-forward, residual and LayerNorm. Pooling as sentence-transformers' CLS mode: the first
token's final state (BERT's pooler layer is not part of it)."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
from numpy.typing import NDArray

Matrix = NDArray[np.float64]
_erf = np.vectorize(math.erf)


class BertReference:
    def __init__(self, path: Path) -> None:
        reader = gguf.GGUFReader(str(path))
        self.t = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
        self.n_head = int(reader.fields["bert.attention.head_count"].parts[-1][0])
        self.n_layer = int(reader.fields["bert.block_count"].parts[-1][0])
        self.eps = float(reader.fields["bert.attention.layer_norm_epsilon"].parts[-1][0])

    def states(self, tokens: list[int]) -> Matrix:
        t, n = self.t, len(tokens)
        x = t["token_embd.weight"][tokens] + t["token_types.weight"][0] + t["position_embd.weight"][:n]
        x = self._norm(x, "token_embd_norm")
        d = x.shape[1]
        head = d // self.n_head
        for i in range(self.n_layer):
            blk = f"blk.{i}"

            def linear(h: Matrix, name: str, blk: str = blk) -> Matrix:
                out: Matrix = h @ t[f"{blk}.{name}.weight"].T + t[f"{blk}.{name}.bias"]
                return out

            q, k, v = (linear(x, name).reshape(n, self.n_head, head) for name in ("attn_q", "attn_k", "attn_v"))
            scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(head)
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            weights /= weights.sum(axis=-1, keepdims=True)
            attended = np.einsum("hqk,khd->qhd", weights, v).reshape(n, d)
            x = self._norm(x + linear(attended, "attn_output"), f"{blk}.attn_output_norm")
            up = linear(x, "ffn_up")
            x = self._norm(
                x + linear(0.5 * up * (1.0 + _erf(up / math.sqrt(2.0))), "ffn_down"), f"{blk}.layer_output_norm"
            )
        return x

    def cls(self, tokens: list[int]) -> Matrix:
        first: Matrix = self.states(tokens)[0]
        return first

    def _norm(self, x: Matrix, name: str) -> Matrix:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        out: Matrix = (x - mean) / np.sqrt(var + self.eps) * self.t[f"{name}.weight"] + self.t[f"{name}.bias"]
        return out
