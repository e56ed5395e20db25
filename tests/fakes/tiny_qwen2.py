"""A tiny random-weight Qwen2 GGUF, written by the tests themselves.

It has the architecture of gte-Qwen2, KaLM-embedding and stella (Qwen2 decoders: q/k/v biases,
grouped-query attention, SwiGLU, RMSNorm, tied output), at toy size, with a byte-level BPE
tokenizer ("gpt2" model, "qwen2" pre-tokenizer) whose vocabulary holds all 256 bytes, so any text
tokenizes. The weights are seeded: the same call writes the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np


@dataclass(frozen=True, slots=True)
class TinyQwen2:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 512
    seed: int = 0
    # Whether the file says the tokenizer appends <|endoftext|> (`add_eos_token`). gte-Qwen2 pools that
    # token's state; conversions of it do not record it, which `append_tokens` makes up for.
    add_eos: bool = True
    # Benchmarks write the real sizes: a vocabulary padded with unused tokens to `n_vocab` (0: bytes
    # and special tokens only), matrices stored as `weight_type` ("F32", "F16" or "Q8_0", as
    # published conversions store them), drawn with standard deviation `scale`.
    n_vocab: int = 0
    weight_type: str = "F32"
    scale: float = 0.2
    # A Jinja chat template for `tokenizer.chat_template` (None: the file has none).
    chat_template: str | None = None


ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, "<|im_start|>", "<|im_end|>")


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode table: printable stand-ins for all 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_qwen2(path: Path, config: TinyQwen2 = TinyQwen2()) -> Path:
    """Write the model to `path` and return it."""
    rng = np.random.default_rng(config.seed)
    head_dim = config.n_embd // config.n_head
    n_kv = config.n_head_kv * head_dim

    # Vocabulary: 256 bytes, one merge (" t" -> "Ġt", so merges are exercised), special tokens.
    tokens = [*_byte_tokens(), "Ġt", *SPECIAL_TOKENS]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS))
    types += [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    padding = max(0, config.n_vocab - len(tokens))
    tokens += [f"<|unused_{i}|>" for i in range(padding)]
    types += [gguf.TokenType.UNUSED] * padding
    n_vocab = len(tokens)
    matrix_type = gguf.GGMLQuantizationType[config.weight_type]

    writer = gguf.GGUFWriter(str(path), "qwen2")
    _write_metadata(writer, config, tokens, types)

    def weight(*shape: int, scale: float = config.scale) -> np.ndarray[tuple[int, ...], np.dtype[np.float32]]:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)

    def add(name: str, data: np.ndarray[tuple[int, ...], np.dtype[np.float32]]) -> None:
        # Vectors (norms, biases) stay F32, as llama.cpp's converter keeps them.
        if data.ndim == 1 or matrix_type is gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        elif matrix_type is gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            packed = gguf.quants.quantize(data, matrix_type)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=matrix_type)

    def norm() -> np.ndarray[tuple[int, ...], np.dtype[np.float32]]:
        return (1.0 + rng.standard_normal(config.n_embd) * 0.1).astype(np.float32)

    # numpy shapes are ggml's dimensions reversed: a [rows, n_embd] array multiplies n_embd inputs.
    add("token_embd.weight", weight(n_vocab, config.n_embd, scale=1.0 if config.scale >= 0.2 else config.scale))
    for i in range(config.n_layer):
        blk = f"blk.{i}"
        add(f"{blk}.attn_norm.weight", norm())
        add(f"{blk}.attn_q.weight", weight(config.n_embd, config.n_embd))
        add(f"{blk}.attn_q.bias", weight(config.n_embd))
        add(f"{blk}.attn_k.weight", weight(n_kv, config.n_embd))
        add(f"{blk}.attn_k.bias", weight(n_kv))
        add(f"{blk}.attn_v.weight", weight(n_kv, config.n_embd))
        add(f"{blk}.attn_v.bias", weight(n_kv))
        add(f"{blk}.attn_output.weight", weight(config.n_embd, config.n_embd))
        add(f"{blk}.ffn_norm.weight", norm())
        add(f"{blk}.ffn_gate.weight", weight(config.n_ff, config.n_embd))
        add(f"{blk}.ffn_up.weight", weight(config.n_ff, config.n_embd))
        add(f"{blk}.ffn_down.weight", weight(config.n_embd, config.n_ff))
    add("output_norm.weight", norm())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_metadata(writer: Any, config: TinyQwen2, tokens: list[str], types: list[Any]) -> None:
    eos = tokens.index(ENDOFTEXT)
    writer.add_name("tiny-qwen2")
    writer.add_context_length(config.n_ctx)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_ff)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head_kv)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    file_types = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_types.get(config.weight_type, gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(eos)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(config.add_eos)
    if config.chat_template is not None:
        writer.add_chat_template(config.chat_template)


def write_dense_head(path: Path, *, inputs: int, outputs: int, seed: int = 1) -> Path:
    """A sentence-transformers Dense module's weights, as stella ships in `2_Dense_<dims>/model.safetensors`:
    `linear.weight` [outputs, inputs] and `linear.bias` [outputs]."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "linear.weight": (rng.standard_normal((outputs, inputs)) / np.sqrt(inputs)).astype(np.float32),
            "linear.bias": (rng.standard_normal(outputs) * 0.1).astype(np.float32),
        },
        str(path),
    )
    return path
