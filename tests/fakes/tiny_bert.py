"""A tiny random-weight BERT GGUF (ember-v1's architecture at toy size), written by the tests.

Laid out as llama.cpp's converter writes BERT models: token, token-type and position embeddings with
a LayerNorm, post-LayerNorm encoder blocks with biases everywhere, GELU feed-forward; a WordPiece
("bert") vocabulary with llama.cpp's default special-token ids ([PAD] 0, [UNK] 100, [CLS] 101,
[SEP] 102, [MASK] 103), word-initial pieces stored with a leading "▁" as the converter stores them.
Every lower-case letter, digit and common punctuation mark is a piece, so plain lower-case ASCII
text tokenizes character by character.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True, slots=True)
class TinyBert:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_ff: int = 128
    n_ctx: int = 512
    seed: int = 0


CLS, SEP = 101, 102
_SPECIAL = {0: "[PAD]", 100: "[UNK]", CLS: "[CLS]", SEP: "[SEP]", 103: "[MASK]"}
_CHARACTERS = string.ascii_lowercase + string.digits + ".,!?'-:;"


def vocabulary() -> list[str]:
    tokens = [_SPECIAL.get(i, f"[unused{i}]") for i in range(104)]
    tokens += ["\u2581" + c for c in _CHARACTERS]  # a word's first piece
    tokens += list(_CHARACTERS)  # a continuation piece ("##c" in BERT's own vocabulary)
    return tokens


def write_tiny_bert(path: Path, config: TinyBert = TinyBert()) -> Path:
    rng = np.random.default_rng(config.seed)
    tokens = vocabulary()
    types = [gguf.TokenType.CONTROL if t.startswith("[") else gguf.TokenType.NORMAL for t in tokens]
    d = config.n_embd

    def weight(*shape: int, scale: float = 0.2) -> np.ndarray[tuple[int, ...], np.dtype[np.float32]]:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm() -> tuple[np.ndarray[tuple[int, ...], np.dtype[np.float32]], ...]:
        return (1.0 + weight(d, scale=0.1)), weight(d, scale=0.1)

    writer = gguf.GGUFWriter(str(path), "bert")
    _write_metadata(writer, config, tokens, types)

    writer.add_tensor("token_embd.weight", weight(len(tokens), d, scale=1.0))
    writer.add_tensor("token_types.weight", weight(2, d, scale=0.5))
    writer.add_tensor("position_embd.weight", weight(config.n_ctx, d, scale=0.5))
    norm_w, norm_b = norm()
    writer.add_tensor("token_embd_norm.weight", norm_w)
    writer.add_tensor("token_embd_norm.bias", norm_b)
    for i in range(config.n_layer):
        blk = f"blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{blk}.{name}.weight", weight(d, d))
            writer.add_tensor(f"{blk}.{name}.bias", weight(d))
        norm_w, norm_b = norm()
        writer.add_tensor(f"{blk}.attn_output_norm.weight", norm_w)
        writer.add_tensor(f"{blk}.attn_output_norm.bias", norm_b)
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(config.n_ff, d))
        writer.add_tensor(f"{blk}.ffn_up.bias", weight(config.n_ff))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(d, config.n_ff))
        writer.add_tensor(f"{blk}.ffn_down.bias", weight(d))
        norm_w, norm_b = norm()
        writer.add_tensor(f"{blk}.layer_output_norm.weight", norm_w)
        writer.add_tensor(f"{blk}.layer_output_norm.bias", norm_b)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_metadata(writer: gguf.GGUFWriter, config: TinyBert, tokens: list[str], types: list[gguf.TokenType]) -> None:
    writer.add_name("tiny-bert")
    writer.add_context_length(config.n_ctx)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_ff)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.CLS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(2)
    # The converter records [CLS] as the BOS token and [SEP] as the separator.
    writer.add_bos_token_id(CLS)
    writer.add_sep_token_id(SEP)
    writer.add_unk_token_id(100)
    writer.add_pad_token_id(0)
    writer.add_mask_token_id(103)
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
