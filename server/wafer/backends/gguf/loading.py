"""What a GGUF model is loaded from: the file and its metadata, the `options` of its models.yaml
entry, an optional projection head, and llama.cpp's log lines routed into the server's log."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import structlog
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from wafer.domain import FloatMatrix
from wafer.errors import FailedPreconditionError
from wafer.specs import ModelSpec


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
class Head:
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


_log = structlog.get_logger("wafer.llama_cpp")
_GGML_LOG_WARN = 3
_GGML_LOG_ERROR = 4
_GGUF_MAGIC = b"GGUF"


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def route_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", "replace").strip()
    if not message or message == ".":
        return
    # ggml.h's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Warnings and errors stay
    # visible; the rest (metadata dumps at every load) only at debug.
    if level in (_GGML_LOG_WARN, _GGML_LOG_ERROR):
        _log.warning("llama.cpp", message=message)
    else:
        _log.debug("llama.cpp", message=message)


def check_gguf_file(name: str, path: Path) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise FailedPreconditionError(f"model {name!r}: cannot read {path}: {exc.strerror}") from None
    if magic != _GGUF_MAGIC:
        raise FailedPreconditionError(
            f"model {name!r}: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
        )


def attends_causally(options: GgufOptions, metadata: dict[str, str]) -> bool:
    """Whether embedding attends causally: the spec's `attention`, else what the file records."""
    if options.attention is not None:
        return options.attention is Attention.CAUSAL
    arch = metadata.get("general.architecture", "")
    return metadata.get(f"{arch}.attention.causal", "true") != "false"


def check_embedding_shape(
    spec: ModelSpec, n_embd: int, n_ctx_train: int, head: Head | None, head_path: Path | None
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


def read_head(name: str, path: Path) -> Head:
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
    return Head(weight=weight.astype(np.float32), bias=bias.astype(np.float32))


def read_metadata(model: Any) -> dict[str, str]:
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
