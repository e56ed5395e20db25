"""cde-small-v1 in plain numpy, written from its authors' code and nothing else: the reference the
cde backend's two onnxruntime graphs are compared with.

Sources (jxmorris12/cde; the cde-small-v1 repository on the Hub):
- `cde/hf_model.py` (commit 6a8c2f9, "add full huggingface model impl with fixed attn", the
  implementation the authors' `test/test_hf.py::test_model_local_hf` loads jxm/cde-small-v1 with):
  - `ContextualNomicBertEmbeddings.forward`: word embedding, plus the token-type-0 embedding, also
    when `inputs_embeds` are given; no position embeddings (rotary_emb_fraction > 0).
  - `ContextualNomicBertModel.forward`: embeddings -> `emb_ln` -> encoder; the mask becomes an
    additive mask (`get_extended_attention_mask`).
  - `ContextualNomicBertBlock.forward` (prenorm False): `norm1(attn(x) + x)`, `norm2(mlp(h) + h)`.
  - `ContextualNomicBertAttention.forward`: `Wqkv` -> "(three h d)"; rotary on q and k; tokens
    before `rotary_start_pos` keep their un-rotated q/k/v; softmax(q k^T / sqrt(d)) v; `out_proj`.
  - `apply_rotary_emb` / `rotate_half` (not interleaved): x * cos + cat(-x2, x1) * sin, cos and sin
    of position * inv_freq, inv_freq = 1 / base^(arange(0, dim, 2) / dim), positions from 0 over the
    whole sequence.
  - `NomciBertGatedMLP.forward` (activation swiglu): fc2(fc11(x) * silu(fc12(x))).
  - `BiEncoder.forward`: mean_pool(last_hidden_state, attention_mask), then `mlp` =
    Linear -> GELU (exact) -> Linear.
  - `ContextualModelMixin._prepare_dataset_embeddings`: soft prompt = prompt_projection(ones(d))
    reshaped to 8 tokens, appended after the dataset embeddings.
  - `DatasetConditionedBiencoder._shift_rotary_embedding`: rotary_start_pos = transductive_corpus_size
    x transductive_tokens_per_document (512).
  - `DatasetConditionedBiencoder.forward`: inputs_embeds = backbone.embeddings(input_ids), prefixed by
    the dataset embeddings and soft prompt; the backbone runs on them; pooling keeps only the text
    positions (`[:, n_soft_prompt_tokens:]`); `output_projection` = Linear -> ReLU -> Linear, no residual.
- `mean_pool`: sum(h * mask) / (sum(mask) + 1e-20).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import erf, sqrt
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import load_file

F = NDArray[np.float64]

N_SOFT_PROMPT = 8


@dataclass(frozen=True)
class Backbone:
    prefix: str
    n_head: int
    n_layer: int
    eps: float
    rotary_base: float


def _layer_norm(x: F, w: F, b: F, eps: float) -> F:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return np.asarray((x - mean) / np.sqrt(var + eps) * w + b, dtype=np.float64)


_erf = np.vectorize(erf)


def _gelu(x: F) -> F:
    return np.asarray(0.5 * x * (1.0 + _erf(x / sqrt(2.0))), dtype=np.float64)


def _silu(x: F) -> F:
    return np.asarray(x / (1.0 + np.exp(-x)), dtype=np.float64)


def _softmax(x: F) -> F:
    e = np.exp(x - x.max(-1, keepdims=True))
    return np.asarray(e / e.sum(-1, keepdims=True), dtype=np.float64)


class CdeReference:
    """Both stages of cde-small-v1 from `model.safetensors`, the model's `config.json` and its
    backbone's `config.json` (nomic-ai/nomic-bert-2048)."""

    def __init__(self, weights: Path, config: Path, backbone_config: Path) -> None:
        self.w = {k: v.astype(np.float64) for k, v in load_file(str(weights)).items()}
        cfg = json.loads(config.read_text())
        bb = json.loads(backbone_config.read_text())
        self.corpus_size = int(cfg["transductive_corpus_size"]) * int(cfg.get("transductive_tokens_per_document", 1))
        self.rotary_start = self.corpus_size if cfg.get("disable_transductive_rotary_embedding", True) else 0
        self.n_layer = int(bb["n_layer"])
        self.n_head = int(bb["n_head"])
        self.eps = float(bb["layer_norm_epsilon"])
        self.base = float(bb["rotary_emb_base"])

    # -- NomicBERT -----------------------------------------------------------------------------

    def _rope(self, x: F, start: int) -> F:
        """x: [b, h, s, d]; positions 0.. over the whole sequence; the first `start` left alone."""
        d = x.shape[-1]
        inv_freq = 1.0 / (self.base ** (np.arange(0, d, 2, dtype=np.float64) / d))
        pos = np.arange(x.shape[2], dtype=np.float64)
        freqs = np.outer(pos, inv_freq)
        cos = np.concatenate([np.cos(freqs), np.cos(freqs)], -1)
        sin = np.concatenate([np.sin(freqs), np.sin(freqs)], -1)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        rotated = x * cos + np.concatenate([-x2, x1], -1) * sin
        if start > 0:
            rotated[:, :, :start] = x[:, :, :start]
        return np.asarray(rotated, dtype=np.float64)

    def _encoder(self, prefix: str, hidden: F, mask: F, rotary_start: int) -> F:
        w = self.w
        h = _layer_norm(hidden, w[f"{prefix}.emb_ln.weight"], w[f"{prefix}.emb_ln.bias"], self.eps)
        b, s, dim = h.shape
        heads = self.n_head
        hd = dim // heads
        additive = (1.0 - mask)[:, None, None, :] * np.finfo(np.float32).min
        for i in range(self.n_layer):
            lp = f"{prefix}.encoder.layers.{i}"
            qkv = h @ w[f"{lp}.attn.Wqkv.weight"].T  # [b, s, 3*dim]
            qkv = qkv.reshape(b, s, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # [3, b, h, s, d]
            q = self._rope(qkv[0], rotary_start)
            k = self._rope(qkv[1], rotary_start)
            v = qkv[2]
            scores = q @ k.transpose(0, 1, 3, 2) / sqrt(hd) + additive
            attn = (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(b, s, dim)
            attn = attn @ w[f"{lp}.attn.out_proj.weight"].T
            h = _layer_norm(attn + h, w[f"{lp}.norm1.weight"], w[f"{lp}.norm1.bias"], self.eps)
            y = (h @ w[f"{lp}.mlp.fc11.weight"].T) * _silu(h @ w[f"{lp}.mlp.fc12.weight"].T)
            y = y @ w[f"{lp}.mlp.fc2.weight"].T
            h = _layer_norm(y + h, w[f"{lp}.norm2.weight"], w[f"{lp}.norm2.bias"], self.eps)
        return h

    def _embeddings(self, prefix: str, input_ids: NDArray[np.int64]) -> F:
        w = self.w
        return w[f"{prefix}.embeddings.word_embeddings.weight"][input_ids] + self._type0(prefix)

    def _type0(self, prefix: str) -> F:
        return np.asarray(self.w[f"{prefix}.embeddings.token_type_embeddings.weight"][0], dtype=np.float64)

    @staticmethod
    def _mean_pool(h: F, mask: F) -> F:
        return np.asarray((h * mask[..., None]).sum(1) / (mask.sum(1)[:, None] + 1e-20), dtype=np.float64)

    @staticmethod
    def _linear(x: F, w: dict[str, F], name: str) -> F:
        return np.asarray(x @ w[f"{name}.weight"].T + w[f"{name}.bias"], dtype=np.float64)

    # -- stages --------------------------------------------------------------------------------

    def first_stage(self, input_ids: NDArray[np.int64], attention_mask: NDArray[np.int64]) -> F:
        """BiEncoder: dataset embeddings (and what the model returns without them)."""
        prefix = "first_stage_model.embedder"
        mask = attention_mask.astype(np.float64)
        h = self._encoder(prefix, self._embeddings(prefix, input_ids), mask, rotary_start=0)
        pooled = self._mean_pool(h, mask)
        return self._linear(
            _gelu(self._linear(pooled, self.w, "first_stage_model.mlp.0")), self.w, "first_stage_model.mlp.2"
        )

    def soft_prompt(self) -> F:
        dim = self.w["second_stage_model.prompt_projection.0.weight"].shape[1]
        hidden = np.maximum(self._linear(np.ones((1, dim)), self.w, "second_stage_model.prompt_projection.0"), 0.0)
        return self._linear(hidden, self.w, "second_stage_model.prompt_projection.2").reshape(N_SOFT_PROMPT, dim)

    def second_stage(
        self,
        input_ids: NDArray[np.int64],
        attention_mask: NDArray[np.int64],
        dataset_embeddings: F,
        *,
        rotary_start: int | None = None,
        pool_from: int | None = None,
    ) -> F:
        """DatasetConditionedBiencoder. `rotary_start` and `pool_from` default to the model's own
        (the corpus size; the text positions) and exist so tests can show a wrong one is caught."""
        prefix = "second_stage_model.backbone"
        b = input_ids.shape[0]
        # More dataset embeddings than the corpus size: the first N are used (`_prepare_dataset_embeddings`).
        context = dataset_embeddings[: self.corpus_size]
        soft = np.concatenate([context, self.soft_prompt()], 0)
        n_soft = soft.shape[0]
        # backbone.embeddings(input_ids) already holds the type-0 embedding; the backbone's own
        # embeddings module adds it again to every inputs_embeds position.
        text = self._embeddings(prefix, input_ids)
        hidden = np.concatenate([np.broadcast_to(soft, (b, *soft.shape)), text], 1) + self._type0(prefix)
        mask = np.concatenate([np.ones((b, n_soft)), attention_mask.astype(np.float64)], 1)
        start = self.rotary_start if rotary_start is None else rotary_start
        h = self._encoder(prefix, hidden, mask, rotary_start=start)
        first = n_soft if pool_from is None else pool_from
        pooled = self._mean_pool(h[:, first:], mask[:, first:])
        hidden_proj = np.maximum(self._linear(pooled, self.w, "second_stage_model.output_projection.0"), 0.0)
        return self._linear(hidden_proj, self.w, "second_stage_model.output_projection.2")
