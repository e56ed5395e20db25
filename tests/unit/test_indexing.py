"""IndexService on the real engine (fake models) and a real qdrant-edge store in tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wafer.contexts import ContextStore
from wafer.domain import Priority, StoredDocument
from wafer.engine import InferenceEngine
from wafer.errors import FailedPreconditionError, InvalidArgumentError
from wafer.indexing import IndexService
from wafer.store.base import CollectionInfo
from wafer.store.edge import EdgeStore

LONG = " ".join(f"word{i}" for i in range(30))  # the fake "embedder" reads 10 words a chunk


@pytest.fixture
async def index(engine: InferenceEngine, tmp_path: Path) -> AsyncIterator[IndexService]:
    service = IndexService(engine, EdgeStore(path=tmp_path / "edge"))
    yield service
    await service.close()


async def test_long_documents_are_chunked_and_found_as_one_document(index: IndexService) -> None:
    result = await index.upsert(
        "c",
        [StoredDocument(id="long", text=LONG, payload={"kind": "essay"}), StoredDocument(id="s", text="short one")],
        priority=Priority.BATCH,
    )
    assert (result.model, result.ids, result.chunks) == ("embedder", ["long", "s"], 5)
    [listed] = await index.list_collections()
    assert listed.documents == 2

    found = await index.search("c", "word20 word21", top_k=5)
    hit = next(h for h in found.hits if h.document.id == "long")
    assert hit.document.text == LONG  # the whole document, not the chunk
    assert hit.document.payload == {"kind": "essay"}
    assert hit.chunks == 4
    assert LONG[hit.start : hit.end].split()[0].startswith("word")
    assert [h.document.id for h in found.hits].count("long") == 1


async def test_writing_again_replaces_all_chunks(index: IndexService) -> None:
    await index.upsert("c", [StoredDocument(id="d", text=LONG)])
    again = await index.upsert("c", [StoredDocument(id="d", text="now it is short")])
    assert again.chunks == 1
    found = await index.search("c", "word5 word6", top_k=10)
    assert [(h.document.id, h.chunk, h.chunks) for h in found.hits] == [("d", 0, 1)]
    await index.delete_documents("c", ["d"])
    assert (await index.list_collections())[0].documents == 0


async def test_truncate_keeps_one_window_instead_of_chunking(index: IndexService) -> None:
    result = await index.upsert("c", [StoredDocument(id="d", text=LONG)], truncate=True)
    assert result.chunks == 1


async def test_rerank_reorders_with_a_rerank_model(index: IndexService) -> None:
    texts = ["red apples are sweet", "green pears and apples", "blue sky today", "apples apples red sweet"]
    await index.upsert("fruit", [StoredDocument(id=f"t{i}", text=t) for i, t in enumerate(texts)])
    plain = await index.search("fruit", "red sweet apples", top_k=4)
    assert all(h.rerank_score is None for h in plain.hits)
    # "writer" reranks by word overlap with the query (the fake's relevance).
    reranked = await index.search("fruit", "red sweet apples", top_k=2, rerank_model="writer")
    assert reranked.rerank_model == "writer"
    assert {h.document.id for h in reranked.hits} == {"t0", "t3"}
    assert [h.rerank_score for h in reranked.hits] == [1.0, 1.0]
    assert reranked.usage.prompt_tokens > plain.usage.prompt_tokens


async def test_a_model_that_cannot_rerank_is_refused(index: IndexService) -> None:
    await index.upsert("c", [StoredDocument(id="a", text="a")])
    with pytest.raises(FailedPreconditionError, match="cannot rerank"):
        await index.search("c", "a", rerank_model="lazy")
    with pytest.raises(InvalidArgumentError, match="rerank_top_n needs rerank_model"):
        await index.search("c", "a", rerank_top_n=5)


async def test_filters_apply_to_every_chunk(index: IndexService) -> None:
    await index.upsert(
        "c",
        [
            StoredDocument(id="en", text=LONG, payload={"lang": "en"}),
            StoredDocument(id="fr", text="bonjour", payload={"lang": "fr"}),
        ],
    )
    found = await index.search("c", "word3", top_k=10, filter={"lang": "en"})
    assert [h.document.id for h in found.hits] == ["en"]


class CountingStore(EdgeStore):
    """The real store, counting the calls that describe a collection (each counts its documents)."""

    described = 0

    def collection(self, name: str) -> CollectionInfo:
        type(self).described += 1
        return super().collection(name)


async def test_upserts_do_not_count_the_collection_each_time(engine: InferenceEngine, tmp_path: Path) -> None:
    # Every job batch used to describe (and so count exactly) the whole collection before writing.
    CountingStore.described = 0
    service = IndexService(engine, CountingStore(path=tmp_path / "edge"))
    try:
        for batch in range(6):
            await service.upsert("c", [StoredDocument(id=f"d{batch}", text=f"text {batch}")], priority=Priority.BATCH)
        assert CountingStore.described <= 1
        with pytest.raises(FailedPreconditionError, match="holds 'embedder' vectors"):
            await service.upsert("c", [StoredDocument(id="x", text="x")], model="lazy")
        assert [(c.name, c.documents) for c in await service.list_collections()] == [("c", 6)]
    finally:
        await service.close()

    # A new service (a restart) learns the collection's model from the store, once.
    CountingStore.described = 0
    again = IndexService(engine, CountingStore(path=tmp_path / "edge"))
    try:
        with pytest.raises(FailedPreconditionError, match="holds 'embedder' vectors"):
            await again.upsert("c", [StoredDocument(id="x", text="x")], model="lazy")
        await again.upsert("c", [StoredDocument(id="y", text="y")])
        assert CountingStore.described == 1
    finally:
        await again.close()


async def test_one_unreadable_context_file_hides_no_collection(engine: InferenceEngine, tmp_path: Path) -> None:
    service = IndexService(engine, EdgeStore(path=tmp_path / "edge"), ContextStore(tmp_path / "contexts"))
    try:
        for name in ("a", "b"):
            await service.upsert(name, [StoredDocument(id="d", text="some words")])
        (tmp_path / "contexts").mkdir()
        (tmp_path / "contexts" / "a.npz").write_bytes(b"not a context")
        listed = await service.list_collections()
        assert sorted((c.name, c.context_id) for c in listed) == [("a", ""), ("b", "")]
        assert (tmp_path / "contexts" / "a.npz").read_bytes() == b"not a context"
    finally:
        await service.close()
