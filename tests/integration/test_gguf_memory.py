"""The memory budget sees what a GGUF embedding model's long inputs will touch.

A tiny random Qwen2 with a wide vocabulary stands in for gte-Qwen2: llama.cpp keeps logits over the
whole vocabulary for every token of an embedding batch, in buffers a warm-up on "ok" barely touches,
so the RSS measured around the load misses most of what the first full-window input takes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes.tiny_qwen2 import TinyQwen2, write_tiny_qwen2
from tests.integration.gguf_engines import gguf_engine
from wafer.backends.gguf.context import logits_bytes
from wafer.domain import EmbedRequest
from wafer.registry import trim_heap
from wafer.registry.memory import rss
from wafer.specs import Catalog, ModelSpec

pytestmark = pytest.mark.integration

# Wide enough that the logits of a full window (2 x 32768 x 4 B x 512 = 134 MB) stand far above the
# noise of RSS, small enough that the file (9 MB) writes in a moment.
CONFIG = TinyQwen2(n_vocab=32768)
MIB = 2**20
# Allowance for what RSS picks up besides the model (the test's own allocations, heap growth).
SLACK = 32 * MIB


async def test_reported_memory_covers_a_full_window_embed(tmp_path: Path) -> None:
    write_tiny_qwen2(tmp_path / "wide.gguf", CONFIG)
    spec = ModelSpec.model_validate(
        {
            "name": "wide-qwen2",
            "backend": "gguf",
            "source": "wide.gguf",
            "tasks": ["embed"],
            "dimensions": CONFIG.n_embd,
            "max_tokens": CONFIG.n_ctx,
            "pooling": "last",
            # Bidirectional, as gte-Qwen2 runs: the whole window is one micro-batch.
            "options": {"attention": "bidirectional"},
        }
    )
    catalog = Catalog(models={spec.name: spec}, base_dir=tmp_path)
    registry, engine = gguf_engine(catalog, tmp_path)
    try:
        trim_heap()
        before = rss()
        status = await registry.load(spec.name)
        working = logits_bytes(CONFIG.n_vocab, CONFIG.n_ctx)
        assert status.memory_bytes >= working
        assert registry.memory_in_use() == status.memory_bytes

        # A text longer than the window, cut to it: every one of the 512 tokens is an output.
        text = " ".join(f"word{i}" for i in range(400))
        result = await engine.embed(EmbedRequest(inputs=[text], truncate=True))
        assert result.usage.prompt_tokens == CONFIG.n_ctx
        grown = rss() - before
        # Without the working set the budget would have counted a small part of this.
        assert grown > working * 0.8
        assert grown <= status.memory_bytes + SLACK
    finally:
        await registry.close()
