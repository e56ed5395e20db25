"""The memory a GGUF context's largest decode touches beyond its warm-up (its logits)."""

from __future__ import annotations

from typing import Any

import pytest

from wafer.backends.gguf.context import embedding_params, generation_params, logits_bytes, output_rows
from wafer.specs import ModelSpec

# gte-Qwen2's vocabulary (the GGUF's token list).
QWEN2_VOCAB = 151_646


def gte_spec(**update: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "name": "gte",
        "backend": "gguf",
        "source": "gte.gguf",
        "tasks": ["embed"],
        "dimensions": 1536,
        "max_tokens": 8192,
        "pooling": "last",
    }
    return ModelSpec.model_validate({**fields, **update})


@pytest.mark.parametrize(
    ("window", "expected_mb"),
    # A tiny random Qwen2 with gte-Qwen2's vocabulary, measured: RSS 182 MB after the load, then
    # 743 / 2,522 / 9,759 MB after one full-window embed. The formula is a bound a few percent above.
    [(512, 621), (2048, 2485), (8192, 9938)],
)
def test_logits_are_held_twice_per_output_row(window: int, expected_mb: int) -> None:
    assert logits_bytes(QWEN2_VOCAB, window) == 2 * 4 * QWEN2_VOCAB * window
    assert round(logits_bytes(QWEN2_VOCAB, window) / 1e6) == expected_mb


def test_a_bidirectional_embedding_context_outputs_its_whole_window() -> None:
    params = embedding_params(gte_spec(), threads=1, n_ctx_train=32768, causal=False)
    assert output_rows(params) == 8192
    assert logits_bytes(QWEN2_VOCAB, output_rows(params)) > 9.9e9


def test_a_causal_embedding_context_outputs_one_chunk() -> None:
    params = embedding_params(gte_spec(), threads=1, n_ctx_train=32768, causal=True)
    assert output_rows(params) == 128


def test_a_generation_context_outputs_a_row_per_sequence() -> None:
    spec = gte_spec(tasks=["generate"], generation={"parallel": 4})
    params = generation_params(spec, threads=1, n_ctx_train=32768)
    assert output_rows(params) == 5
