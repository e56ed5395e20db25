"""The embedding cache around the real engine and registry, with the fake backend counting what
reaches the model."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.fakes.fake_backend import FakeBackend
from wafer.app import engine_limits
from wafer.cache import EmbeddingCache, Recipe
from wafer.config import Settings
from wafer.domain import EmbedRequest, InputType
from wafer.engine import InferenceEngine
from wafer.errors import InvalidArgumentError
from wafer.metrics import Metrics
from wafer.registry import ModelRegistry


@pytest.fixture
def reached_model() -> Iterator[list[str]]:
    FakeBackend.embedded.clear()
    yield FakeBackend.embedded
    FakeBackend.embedded.clear()


@pytest.fixture
def cache_file(tmp_path: Path) -> Path:
    return tmp_path / "data" / "embedding-cache.sqlite"


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def cache(cache_file: Path, metrics: Metrics) -> Iterator[EmbeddingCache]:
    opened = EmbeddingCache(cache_file, max_entries=1000, metrics=metrics)
    yield opened
    opened.close()


@pytest.fixture
def cached_engine(
    registry: ModelRegistry, settings: Settings, metrics: Metrics, cache: EmbeddingCache
) -> InferenceEngine:
    return InferenceEngine(registry, engine_limits(settings), metrics, cache)


async def test_a_hit_skips_the_model_and_says_so(
    cached_engine: InferenceEngine, engine: InferenceEngine, reached_model: list[str], metrics: Metrics
) -> None:
    first = await cached_engine.embed(EmbedRequest(inputs=["a b", "c d e"]))
    assert first.cached == 0
    assert reached_model == ["a b", "c d e"]

    second = await cached_engine.embed(EmbedRequest(inputs=["c d e", "new one", "a b"]))
    assert reached_model == ["a b", "c d e", "new one"]  # only the miss ran
    assert second.cached == 2
    assert second.timings.batch_size == 1
    np.testing.assert_array_equal(second.vectors[0], first.vectors[1])
    np.testing.assert_array_equal(second.vectors[2], first.vectors[0])
    # Cached and computed vectors are the model's: the same as an engine without a cache gives.
    plain = await engine.embed(EmbedRequest(inputs=["c d e", "new one", "a b"]))
    np.testing.assert_allclose(second.vectors, plain.vectors, rtol=1e-6)
    assert second.usage.prompt_tokens == plain.usage.prompt_tokens
    assert metrics.cache_lookups.labels("embedder", "hit")._value.get() == 2
    assert metrics.cache_lookups.labels("embedder", "miss")._value.get() == 3


async def test_prompt_dimensions_and_normalization_do_not_collide(
    cached_engine: InferenceEngine, reached_model: list[str]
) -> None:
    document = await cached_engine.embed(EmbedRequest(inputs=["hello"]))
    query = await cached_engine.embed(EmbedRequest(inputs=["hello"], input_type=InputType.QUERY))
    cut = await cached_engine.embed(EmbedRequest(inputs=["hello"], dimensions=8))
    raw = await cached_engine.embed(EmbedRequest(inputs=["hello"], normalize=False))
    assert [r.cached for r in (document, query, cut, raw)] == [0, 0, 0, 0]
    assert reached_model == ["hello", "query: hello", "hello", "hello"]
    assert cut.vectors.shape == (1, 8)
    assert not np.allclose(document.vectors, query.vectors)
    assert not np.allclose(document.vectors, raw.vectors)
    # The text the model reads is what counts: a document that is the prompted query is a hit.
    prompted = await cached_engine.embed(EmbedRequest(inputs=["query: hello"]))
    assert prompted.cached == 1
    np.testing.assert_array_equal(prompted.vectors, query.vectors)


async def test_entries_survive_a_restart(
    registry: ModelRegistry, settings: Settings, cache_file: Path, reached_model: list[str]
) -> None:
    first_cache = EmbeddingCache(cache_file, max_entries=1000)
    first = await InferenceEngine(registry, engine_limits(settings), cache=first_cache).embed(
        EmbedRequest(inputs=["kept"])
    )
    first_cache.close()
    second_cache = EmbeddingCache(cache_file, max_entries=1000)
    try:
        again = await InferenceEngine(registry, engine_limits(settings), cache=second_cache).embed(
            EmbedRequest(inputs=["kept"])
        )
        assert again.cached == 1
        assert reached_model == ["kept"]
        np.testing.assert_array_equal(again.vectors, first.vectors)
        assert second_cache.stats().entries == 1
    finally:
        second_cache.close()


async def test_too_long_input_is_named_by_its_place_in_the_request(
    cached_engine: InferenceEngine,
) -> None:
    await cached_engine.embed(EmbedRequest(inputs=["short"]))
    # The backend sees only the miss (its input 0); the error names the caller's input 1.
    with pytest.raises(InvalidArgumentError, match="input 1 has 22 tokens"):
        await cached_engine.embed(EmbedRequest(inputs=["short", "w " * 20]))


async def test_the_cache_is_bounded_and_keeps_what_was_used_last(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "c.sqlite", max_entries=20)
    recipe = Recipe(model="m", identity="x", dimensions=2, normalize=True, truncate=False, window=512)
    try:
        for batch in range(5):
            texts = [f"t{batch}-{i}" for i in range(10)]
            lookup = await cache.lookup(recipe, texts)
            await cache.store(lookup.keys, np.ones((10, 2), dtype=np.float32) * batch, [1] * 10)
            # Keep batch 0 in use: it must outlive the batches written after it.
            assert len((await cache.lookup(recipe, ["t0-0"])).found) == 1
        assert cache.stats().entries <= 20
        assert len((await cache.lookup(recipe, ["t0-0", "t4-9"])).found) == 2
        assert len((await cache.lookup(recipe, ["t1-5"])).found) == 0
    finally:
        cache.close()


async def test_truncation_shares_entries_but_never_serves_a_cut_text_uncut(
    cached_engine: InferenceEngine, reached_model: list[str]
) -> None:
    fits = await cached_engine.embed(EmbedRequest(inputs=["a b c"]))
    again = await cached_engine.embed(EmbedRequest(inputs=["a b c"], truncate=True))
    assert again.cached == 1  # a text that fits has one vector, truncated or not
    np.testing.assert_array_equal(again.vectors, fits.vectors)

    cut = await cached_engine.embed(EmbedRequest(inputs=["w " * 20], truncate=True))
    assert cut.cached == 0
    assert (await cached_engine.embed(EmbedRequest(inputs=["w " * 20], truncate=True))).cached == 1
    # Without truncate the text is too long: the cut vector is not an answer to that.
    with pytest.raises(InvalidArgumentError, match="input 0 has 22 tokens"):
        await cached_engine.embed(EmbedRequest(inputs=["w " * 20]))
    assert reached_model == ["a b c", "w " * 20, "w " * 20]


# -- a cache is disposable (issue 13) -------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated", "folder"])
def test_an_unreadable_cache_is_moved_aside_and_started_over(
    cache_file: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_file.parent.mkdir(parents=True)
    if damage == "folder":
        cache_file.mkdir()
    elif damage == "garbage":
        cache_file.write_bytes(b"this is not a database at all " * 100)
    else:
        healthy = EmbeddingCache(cache_file, max_entries=10)
        healthy.close()
        data = cache_file.read_bytes()
        cache_file.write_bytes(data[:100])
    opened = EmbeddingCache(cache_file, max_entries=10)
    try:
        assert opened.stats().entries == 0
    finally:
        opened.close()
    moved = [p for p in cache_file.parent.iterdir() if ".broken-" in p.name]
    assert len(moved) >= 1, "the damaged file is kept for whoever wants to look at it"
    logged = capsys.readouterr().out
    assert logged.count("embedding cache unreadable") == 1 and str(cache_file) in logged


async def test_cache_rows_of_the_wrong_size_are_recomputed(
    cached_engine: InferenceEngine, cache_file: Path, reached_model: list[str]
) -> None:
    first = await cached_engine.embed(EmbedRequest(inputs=["hello"]))
    with sqlite3.connect(cache_file) as db:
        db.execute("UPDATE embeddings SET vector = ?", (np.zeros(3, dtype=np.float32).tobytes(),))
    db.close()
    again = await cached_engine.embed(EmbedRequest(inputs=["hello"]))
    assert again.cached == 0 and reached_model == ["hello", "hello"]
    np.testing.assert_array_equal(again.vectors, first.vectors)
