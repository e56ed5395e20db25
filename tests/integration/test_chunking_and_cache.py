"""Chunking with the real tokenizers (MiniLM's WordPiece, SmolLM2's byte-level BPE) and the
embedding cache in front of real MiniLM."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from wafer.app import engine_limits
from wafer.backends import available_backends
from wafer.backends.base import Backend, LoadOptions, ModelFiles
from wafer.backends.gguf import GgufBackend
from wafer.backends.onnx import OnnxBackend
from wafer.cache import EmbeddingCache
from wafer.chunking import split
from wafer.config import Settings
from wafer.domain import EmbedRequest
from wafer.engine import InferenceEngine
from wafer.registry import ModelRegistry
from wafer.sources import SourceResolver
from wafer.specs import Catalog, ModelSpec

pytestmark = pytest.mark.integration

LONG_TEXT = " ".join(
    f"Message {i}: the train to Zürich leaves at {7 + i % 12}:15, café au lait 🙂 and naïve questions."
    for i in range(80)
)


@pytest.fixture(scope="module")
def minilm(resolver: SourceResolver, minilm_spec: ModelSpec) -> Iterator[OnnxBackend]:
    assert minilm_spec.tokenizer is not None
    files = ModelFiles(
        weights=resolver.resolve(minilm_spec.source, model=minilm_spec.name),
        tokenizer=resolver.resolve(minilm_spec.tokenizer, model=minilm_spec.name),
    )
    loaded = OnnxBackend.load(minilm_spec, files, LoadOptions(threads=2))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def smollm2(resolver: SourceResolver, smollm2_spec: ModelSpec) -> Iterator[GgufBackend]:
    files = ModelFiles(weights=resolver.resolve(smollm2_spec.source, model=smollm2_spec.name))
    loaded = GgufBackend.load(smollm2_spec, files, LoadOptions(threads=2))
    yield loaded
    loaded.close()


def check_offsets(backend: Backend, text: str) -> None:
    offsets = backend.token_offsets(text)
    assert len(offsets) == backend.count_tokens(text) - (backend.count_tokens("a") - len(backend.token_offsets("a")))
    previous_end = 0
    for start, end in offsets:
        assert 0 <= start < end <= len(text)
        assert start >= previous_end or start == previous_end - 1  # in order, never far back
        assert text[start:end].strip() != "" or text[start:end] == " "
        previous_end = end


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_token_offsets_point_into_the_text(name: str, request: pytest.FixtureRequest) -> None:
    backend: Backend = request.getfixturevalue(name)
    for text in ["hello world", "Ünïcödé façade 日本語 🙂🚀", LONG_TEXT[:500]]:
        check_offsets(backend, text)


def test_minilm_spans_are_exact_words(minilm: OnnxBackend) -> None:
    text = "The cat sat on the mat."
    assert [text[a:b] for a, b in minilm.token_offsets(text)] == ["The", "cat", "sat", "on", "the", "mat", "."]


def test_smollm2_pieces_reassemble_the_text(smollm2: GgufBackend) -> None:
    text = "Ünïcödé façade, 日本語 🙂 and spaces  twice"
    offsets = smollm2.token_offsets(text)
    assert offsets[0][0] == 0
    assert offsets[-1][1] == len(text)
    assert "".join(text[a:b] for a, b in _merged(offsets)) == text


def _merged(offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Tokens that split one character share it; keep each character once."""
    merged: list[tuple[int, int]] = []
    for start, end in offsets:
        begin = max(start, merged[-1][1]) if merged else start
        if begin < end:
            merged.append((begin, end))
    return merged


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_a_long_text_is_chunked_within_the_window(name: str, request: pytest.FixtureRequest) -> None:
    backend: Backend = request.getfixturevalue(name)
    spans = split(backend, [LONG_TEXT], prompt=backend.spec.document_prompt)[0]
    assert len(spans) > 1
    assert spans[0][0] == 0 and spans[-1][1] == len(LONG_TEXT)
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert next_start < end  # windows overlap
    for start, end in spans:
        assert backend.count_tokens(backend.spec.document_prompt + LONG_TEXT[start:end]) <= backend.spec.max_tokens
        assert LONG_TEXT[start:end] in LONG_TEXT  # offsets reproduce spans of the text itself
    # Every chunk embeds without truncation: it fits.
    if name == "minilm":
        vectors = backend.embed([LONG_TEXT[a:b] for a, b in spans], truncate=False).vectors
        assert vectors.shape == (len(spans), 384)


@pytest.fixture
async def engines(
    catalog: Catalog, resolver: SourceResolver, tmp_path: Path
) -> AsyncIterator[tuple[InferenceEngine, InferenceEngine, EmbeddingCache]]:
    registry = ModelRegistry(catalog, resolver, available_backends(), threads=2, drain_timeout_seconds=5)
    settings = Settings(data_dir=tmp_path)
    cache = EmbeddingCache(tmp_path / "cache.sqlite", max_entries=1000)
    try:
        yield (
            InferenceEngine(registry, engine_limits(settings), cache=cache),
            InferenceEngine(registry, engine_limits(settings)),
            cache,
        )
    finally:
        cache.close()
        await registry.close()


async def test_minilm_vectors_from_the_cache_equal_the_models(
    engines: tuple[InferenceEngine, InferenceEngine, EmbeddingCache],
) -> None:
    cached_engine, plain_engine, cache = engines
    texts = ["Free entry in a weekly competition to win cup final tickets", "Ok lar... joking wif u oni"]
    first = await cached_engine.embed(EmbedRequest(inputs=texts, model="minilm"))
    second = await cached_engine.embed(EmbedRequest(inputs=texts, model="minilm"))
    reference = await plain_engine.embed(EmbedRequest(inputs=texts, model="minilm"))
    assert (first.cached, second.cached) == (0, 2)
    np.testing.assert_array_equal(second.vectors, first.vectors)
    np.testing.assert_allclose(second.vectors, reference.vectors, atol=1e-6)
    assert cache.stats().hits == 2


async def test_minilm_pooled_embedding_of_a_long_text_reads_all_of_it(
    engines: tuple[InferenceEngine, InferenceEngine, EmbeddingCache],
) -> None:
    _, engine, _ = engines
    needle = "The secret recipe for the lemon cake needs three eggs and a spoon of honey."
    filler = " ".join(f"Paragraph {i} is about the weather and the rivers of the north." for i in range(40))
    text = f"{filler} {needle}"  # the needle lies past the first window
    pooled = await engine.embed(EmbedRequest(inputs=[text], model="minilm", pool_chunks=True))
    cut = await engine.embed(EmbedRequest(inputs=[text], model="minilm", truncate=True))
    query = await engine.embed(EmbedRequest(inputs=["lemon cake recipe with eggs"], model="minilm"))
    assert pooled.vectors.shape == (1, 384)
    assert pooled.timings.batch_size > 1  # several windows ran
    # Only the pooled vector has read the needle at the end.
    assert float(pooled.vectors[0] @ query.vectors[0]) > float(cut.vectors[0] @ query.vectors[0]) + 0.05
