"""The contract for contextual models: an embed call may carry a context; the scheduler never merges
requests of different contexts; the cache key holds the context; models without one refuse it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from tests.fakes.fake_backend import FakeBackend, FakeContextualBackend
from wafer.app import engine_limits
from wafer.cache import EmbeddingCache
from wafer.config import Settings
from wafer.contexts import ContextStore, Reservoir, sample_corpus
from wafer.domain import Context, ContextRequest, EmbedRequest, InputType
from wafer.engine import InferenceEngine
from wafer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from wafer.registry import ModelRegistry
from wafer.sources import SourceResolver
from wafer.specs import Catalog


@pytest.fixture
async def registry(tmp_path: Path, open_gate: None) -> AsyncIterator[ModelRegistry]:
    (tmp_path / "w.bin").write_bytes(b"weights")
    catalog = Catalog.model_validate(
        {
            "base_dir": tmp_path,
            "models": {
                "ctx": {
                    "backend": "fakectx",
                    "source": "w.bin",
                    "tasks": ["embed"],
                    "dimensions": 8,
                    "document_prompt": "doc: ",
                },
                "plain": {"backend": "fake", "source": "w.bin", "tasks": ["embed"], "dimensions": 8},
            },
        }
    )
    registry = ModelRegistry(
        catalog,
        SourceResolver(tmp_path, tmp_path / "hub"),
        {"fake": FakeBackend, "fakectx": FakeContextualBackend},
        threads=1,
        drain_timeout_seconds=5,
    )
    FakeContextualBackend.calls.clear()
    FakeContextualBackend.contexts_built.clear()
    yield registry
    FakeBackend.gate.set()
    await registry.close()


@pytest.fixture
def store(tmp_path: Path) -> ContextStore:
    return ContextStore(tmp_path / "contexts")


@pytest.fixture
def engine(registry: ModelRegistry, tmp_path: Path, store: ContextStore) -> InferenceEngine:
    settings = Settings(data_dir=tmp_path / "data", max_inputs_per_request=100, max_input_bytes=10_000)
    return InferenceEngine(registry, engine_limits(settings), contexts=store)


def _context(seed: int) -> Context:
    return Context.of(np.random.default_rng(seed).normal(size=(4, 8)).astype(np.float32))


async def test_a_model_without_context_refuses_one(engine: InferenceEngine, store: ContextStore) -> None:
    store.put("notes", "plain", _context(0))
    for context in (_context(0), ContextRequest(documents=("a", "b")), ContextRequest(collection="notes")):
        with pytest.raises(InvalidArgumentError, match="takes no context"):
            await engine.embed(EmbedRequest(inputs=["x"], model="plain", context=context))
    # The model still serves requests without one.
    assert (await engine.embed(EmbedRequest(inputs=["x"], model="plain"))).vectors.shape == (1, 8)


async def test_an_unknown_stored_context_is_not_found(engine: InferenceEngine) -> None:
    with pytest.raises(NotFoundError, match="no context is stored for collection 'nowhere'"):
        await engine.embed(EmbedRequest(inputs=["x"], model="ctx", context=ContextRequest(collection="nowhere")))


async def test_a_context_of_another_model_is_refused(engine: InferenceEngine, store: ContextStore) -> None:
    store.put("theirs", "plain", _context(0))
    with pytest.raises(InvalidArgumentError, match="built by model 'plain'"):
        await engine.embed(EmbedRequest(inputs=["x"], model="ctx", context=ContextRequest(collection="theirs")))


async def test_setting_both_kinds_of_context_is_refused(engine: InferenceEngine) -> None:
    both = ContextRequest(collection="a", documents=("b",))
    with pytest.raises(InvalidArgumentError, match="at most one"):
        await engine.embed(EmbedRequest(inputs=["x"], model="ctx", context=both))


async def test_context_documents_are_sampled_prompted_and_change_the_vectors(engine: InferenceEngine) -> None:
    plain = await engine.embed(EmbedRequest(inputs=["x"], model="ctx", normalize=False))
    built = await engine.embed(
        EmbedRequest(inputs=["x"], model="ctx", normalize=False, context=ContextRequest(documents=("one", "two")))
    )
    (sample,) = FakeContextualBackend.contexts_built
    # Four (the model's corpus size) drawn with replacement from two, each with the document prompt.
    assert len(sample) == 4 and set(sample) <= {"doc: one", "doc: two"}
    assert built.context_id and not plain.context_id
    assert not np.allclose(plain.vectors, built.vectors)


async def test_a_stored_context_is_used(engine: InferenceEngine, store: ContextStore) -> None:
    context = _context(1)
    store.put("notes", "ctx", context)
    named = await engine.embed(EmbedRequest(inputs=["x"], model="ctx", context=ContextRequest(collection="notes")))
    direct = await engine.embed(EmbedRequest(inputs=["x"], model="ctx", context=context))
    assert named.context_id == direct.context_id == context.id
    np.testing.assert_allclose(named.vectors, direct.vectors)


async def test_requests_of_different_contexts_are_never_merged(engine: InferenceEngine) -> None:
    a, b = _context(1), _context(2)
    FakeBackend.gate.clear()  # hold the model so all the requests queue up together
    calls = [
        asyncio.create_task(
            engine.embed(EmbedRequest(inputs=[f"t{i}"], model="ctx", input_type=InputType.QUERY, context=c))
        )
        for i, c in enumerate([a, b, a, None, b])
    ]
    await asyncio.sleep(0.2)
    FakeBackend.gate.set()
    results = await asyncio.gather(*calls)
    for context_id, _texts in FakeContextualBackend.calls:
        assert context_id in {a.id, b.id, ""}
    # Each backend call saw one context, and every request got its own context's vector.
    texts_by_context: dict[str, set[str]] = {}
    for context_id, texts in FakeContextualBackend.calls:
        texts_by_context.setdefault(context_id, set()).update(texts)
    assert texts_by_context[a.id] >= {"t0", "t2"} and not texts_by_context[a.id] & {"t1", "t3", "t4"}
    assert texts_by_context[b.id] >= {"t1", "t4"} and not texts_by_context[b.id] & {"t0", "t2", "t3"}
    assert [r.context_id for r in results] == [a.id, b.id, a.id, "", b.id]
    # Requests of one context still merge: a's two requests rode one call.
    assert any(set(texts) == {"t0", "t2"} for cid, texts in FakeContextualBackend.calls if cid == a.id)


async def test_the_cache_key_holds_the_context(registry: ModelRegistry, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache.sqlite", max_entries=1000)
    settings = Settings(data_dir=tmp_path / "data", max_inputs_per_request=100, max_input_bytes=10_000)
    engine = InferenceEngine(registry, engine_limits(settings), cache=cache)
    try:
        a, b = _context(1), _context(2)
        first = await engine.embed(EmbedRequest(inputs=["same text"], model="ctx", context=a))
        other = await engine.embed(EmbedRequest(inputs=["same text"], model="ctx", context=b))
        none = await engine.embed(EmbedRequest(inputs=["same text"], model="ctx"))
        again = await engine.embed(EmbedRequest(inputs=["same text"], model="ctx", context=a))
        assert (first.cached, other.cached, none.cached, again.cached) == (0, 0, 0, 1)
        assert [cid for cid, _ in FakeContextualBackend.calls] == [a.id, b.id, ""]
        np.testing.assert_allclose(first.vectors, again.vectors)
        assert not np.allclose(first.vectors, other.vectors)
    finally:
        cache.close()


def test_sample_corpus_follows_the_authors_rule() -> None:
    many = [f"d{i}" for i in range(1000)]
    sample = sample_corpus(many, 512)
    assert len(sample) == 512 and len(set(sample)) == 512  # no replacement when there are enough
    few = ["a", "b", "c"]
    oversampled = sample_corpus(few, 512)
    assert len(oversampled) == 512 and set(oversampled) == {"a", "b", "c"}
    assert sample_corpus(few, 512) == oversampled  # the same corpus gives the same sample


def test_reservoir_samples_uniformly_and_reproducibly() -> None:
    def run() -> list[str]:
        reservoir = Reservoir(10, seed="job")
        for i in range(1000):
            reservoir.add(str(i))
        return reservoir.items

    first = run()
    assert first == run() and len(set(first)) == 10
    assert max(int(x) for x in first) > 100  # not just the first ten


def test_context_store_survives_a_new_instance(tmp_path: Path) -> None:
    context = _context(3)
    ContextStore(tmp_path).put("notes", "ctx", context)
    reopened = ContextStore(tmp_path).get("notes")
    assert reopened is not None and reopened.model == "ctx" and reopened.context.id == context.id
    assert not list(tmp_path.glob("*.tmp"))
    ContextStore(tmp_path).delete("notes")
    assert ContextStore(tmp_path).get("notes") is None


@pytest.mark.parametrize("garbage", [b"", b"not a zip file", b"PK\x03\x04truncated"])
def test_an_unreadable_context_file_is_refused_by_name_and_kept(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "notes.npz"
    path.write_bytes(garbage)
    store = ContextStore(tmp_path)
    with pytest.raises(FailedPreconditionError, match=r"collection 'notes' cannot be read from .*notes\.npz"):
        store.get("notes")
    assert path.read_bytes() == garbage, "a file Wafer cannot read is never deleted or replaced by a read"
    # Put back in place, it is read: the failure was not remembered.
    context = _context(4)
    ContextStore(tmp_path).put("notes", "ctx", context)
    restored = store.get("notes")
    assert restored is not None and restored.context.id == context.id


async def test_an_unreadable_stored_context_is_a_failed_precondition(engine: InferenceEngine, tmp_path: Path) -> None:
    folder = tmp_path / "contexts"
    folder.mkdir()
    (folder / "notes.npz").write_bytes(b"garbage")
    with pytest.raises(FailedPreconditionError, match="context of collection 'notes' cannot be read"):
        await engine.embed(EmbedRequest(inputs=["x"], model="ctx", context=ContextRequest(collection="notes")))
