"""An independent in-process reference for ONNX sentence embeddings: the obvious way to run the
model, one text at a time, no padding, the mean pooling written out as a loop. Tests compare what
Wafer serves against it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from tokenizers import Tokenizer

Vectors = NDArray[np.float32]


def cosines(a: Vectors, b: Vectors) -> NDArray[np.float64]:
    """Row-wise cosine similarity, in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms: NDArray[np.float64] = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    dots: NDArray[np.float64] = np.sum(a64 * b64, axis=1)
    return dots / norms


class PlainReference:
    """Mean-pooled, L2-normalized embeddings of a BERT-style ONNX graph."""

    def __init__(self, weights: Path, tokenizer: Path, *, max_tokens: int = 256) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.session = ort.InferenceSession(str(weights), providers=["CPUExecutionProvider"])

    def embed(self, text: str) -> Vectors:
        encoding = self.tokenizer.encode(text)
        feeds = {
            "input_ids": np.array([encoding.ids], dtype=np.int64),
            "attention_mask": np.array([encoding.attention_mask], dtype=np.int64),
            "token_type_ids": np.array([encoding.type_ids], dtype=np.int64),
        }
        (states,) = self.session.run(["last_hidden_state"], feeds)
        total = np.zeros(states.shape[-1], dtype=np.float64)
        count = 0
        for position, attended in enumerate(encoding.attention_mask):
            if attended:
                total += states[0, position]
                count += 1
        mean = total / count
        return (mean / np.linalg.norm(mean)).astype(np.float32)
