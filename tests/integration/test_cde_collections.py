"""cde-small-v1 end to end in-process: pulled from the (fake) Hub under its real repository names,
loaded offline from the model cache by the real registry, then collections in a real on-disk store,
each with its own context."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import loaded
from tests.fakes.fake_hub import running_fake_hub
from tests.fakes.tiny_cde import put_on_hub, write_tiny_cde
from tests.integration.test_hub_source import closed_port_url
from wafer.app import engine_limits
from wafer.backends import available_backends
from wafer.config import Settings
from wafer.contexts import ContextStore, sample_corpus
from wafer.domain import ContextRequest, EmbedRequest, InputType, StoredDocument
from wafer.engine import InferenceEngine
from wafer.errors import FailedPreconditionError
from wafer.indexing import IndexService
from wafer.pull import HubPuller, hub_sources
from wafer.registry import ModelRegistry
from wafer.sources import SourceResolver
from wafer.specs import Catalog, Task
from wafer.store.edge import EdgeStore

pytestmark = pytest.mark.integration

MODEL = "cde-small-v1"
NOTES = [
    "Remember to water the tomatoes on the balcony every morning.",
    "The plumber comes on Tuesday to fix the kitchen sink.",
    "Mum's birthday dinner is at the Italian place on Friday.",
    "Renew the car insurance before the end of the month.",
]
INVOICES = [f"Invoice {i}: {n} boxes of screws and {i} metres of copper pipe." for i, n in enumerate([3, 7, 12])]


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny model pulled from the fake Hub, as `wafer models pull cde-small-v1` does."""
    folder = tmp_path_factory.mktemp("cde-hub")
    files = write_tiny_cde(folder / "files")
    cache = folder / "models"
    spec = Catalog.from_yaml(Path("models.yaml")).models[MODEL]
    with running_fake_hub() as hub:
        put_on_hub(hub, files)
        puller = HubPuller(cache, endpoint=hub.url)
        for source in hub_sources(spec):
            assert list(puller.pull(source, model=MODEL))[-1].file_done
    yield cache


def _catalog() -> Catalog:
    real = Catalog.from_yaml(Path("models.yaml"))
    # The repository's own entry; only the size differs (the tiny model is 32-d).
    spec = real.models[MODEL].model_copy(update={"dimensions": 32, "load": "on_demand"})
    return real.model_copy(update={"models": {MODEL: spec}, "defaults": {}})


class Server:
    """The parts of a server that index: registry, engine, contexts, store, index service."""

    def __init__(self, data: Path, cache: Path) -> None:
        catalog = _catalog()
        # Offline: the model must load from what the pull put in the cache.
        resolver = SourceResolver(catalog.base_dir, cache, hub_endpoint=closed_port_url())
        self.registry = ModelRegistry(catalog, resolver, available_backends(), threads=1, drain_timeout_seconds=5)
        settings = Settings(data_dir=data, max_inputs_per_request=100)
        self.contexts = ContextStore(data / "contexts")
        self.engine = InferenceEngine(self.registry, engine_limits(settings), contexts=self.contexts)
        self.index = IndexService(self.engine, EdgeStore(path=data / "edge"), self.contexts)

    async def close(self) -> None:
        await self.index.close()
        await self.registry.close()


@pytest.fixture
async def server(tmp_path: Path, model_cache: Path) -> AsyncIterator[Server]:
    server = Server(tmp_path / "data", model_cache)
    yield server
    await server.close()


def _docs(texts: list[str], prefix: str) -> list[StoredDocument]:
    return [StoredDocument(id=f"{prefix}{i}", text=t) for i, t in enumerate(texts)]


async def _query_vector(engine: InferenceEngine, query: str, **context: Any) -> np.ndarray:
    request = EmbedRequest(inputs=[query], model=MODEL, input_type=InputType.QUERY, truncate=True, **context)
    return np.asarray((await engine.embed(request)).vectors[0])


async def test_each_collection_gets_its_own_context_and_keeps_it(
    server: Server, tmp_path: Path, model_cache: Path
) -> None:
    await server.index.upsert("notes", _docs(NOTES, "n"), model=MODEL)
    await server.index.upsert("invoices", _docs([*INVOICES, NOTES[1]], "i"), model=MODEL)
    notes, invoices = server.contexts.get("notes"), server.contexts.get("invoices")
    assert notes is not None and invoices is not None
    # 512 dataset embeddings each, built from each collection's own documents.
    assert notes.context.vectors.shape == invoices.context.vectors.shape == (512, 32)
    assert notes.context.id != invoices.context.id
    # The context is stage 1 of the authors' sample: 512 drawn with replacement from the 4 documents,
    # each with the document prompt (built through the scheduler, in micro-batches).
    async with server.registry.lease(MODEL, Task.EMBED):
        backend = loaded(server.registry, MODEL).backend
        expected = backend.build_context(["search_document: " + t for t in sample_corpus(NOTES, 512)])
    np.testing.assert_allclose(notes.context.vectors, expected, rtol=1e-5, atol=1e-5)
    listed = {c.name: c.context_id for c in await server.index.list_collections()}
    assert listed == {"notes": notes.context.id, "invoices": invoices.context.id}

    # The same text is embedded differently in the two collections: vectors change with the context.
    (in_notes,) = await server.index.get_documents("notes", ["n1"], with_vectors=True)
    (in_invoices,) = await server.index.get_documents("invoices", ["i3"], with_vectors=True)
    assert in_notes.text == in_invoices.text == NOTES[1]
    assert in_notes.vector is not None and in_invoices.vector is not None
    assert float(np.dot(in_notes.vector, in_invoices.vector)) < 0.999
    # Embed naming a collection's context gives that collection's vectors.
    named = await server.engine.embed(
        EmbedRequest(inputs=[NOTES[1]], model=MODEL, context=ContextRequest(collection="notes"))
    )
    np.testing.assert_allclose(named.vectors[0], in_notes.vector, atol=2e-3)  # float16 storage
    assert named.context_id == notes.context.id

    # A search of "notes" embeds the query in notes' context, never in another collection's.
    query = "when is the plumber coming"
    own = await _query_vector(server.engine, query, context=ContextRequest(collection="notes"))
    foreign = await _query_vector(server.engine, query, context=ContextRequest(collection="invoices"))
    found = await server.index.search("notes", query, top_k=4, with_vectors=True)
    by_id = {hit.document.id: hit for hit in found.hits}
    for hit in found.hits:
        assert hit.vector is not None
        assert hit.score == pytest.approx(float(np.dot(own, hit.vector)), abs=2e-3)
    foreign_scores = sorted((float(np.dot(foreign, h.vector)) for h in found.hits if h.vector), reverse=True)
    assert foreign_scores != pytest.approx([h.score for h in found.hits], abs=2e-3)
    assert set(by_id) == {"n0", "n1", "n2", "n3"}

    # A later upsert into the collection reuses its context.
    await server.index.upsert("notes", [StoredDocument(id="n9", text="Book the dentist.")], model=MODEL)
    assert server.contexts.get("notes") == notes


async def test_a_collection_keeps_its_context_across_a_restart(tmp_path: Path, model_cache: Path) -> None:
    first = Server(tmp_path / "data", model_cache)
    try:
        await first.index.upsert("notes", _docs(NOTES, "n"), model=MODEL)
        before = await first.index.search("notes", "plumber on tuesday", top_k=4)
        stored = first.contexts.get("notes")
        assert stored is not None
    finally:
        await first.close()
    second = Server(tmp_path / "data", model_cache)
    try:
        reread = second.contexts.get("notes")
        assert reread is not None and reread.context.id == stored.context.id
        after = await second.index.search("notes", "plumber on tuesday", top_k=4)
        assert [(h.document.id, round(h.score, 4)) for h in after.hits] == [
            (h.document.id, round(h.score, 4)) for h in before.hits
        ]
    finally:
        await second.close()


async def test_a_collection_whose_context_is_lost_is_refused(server: Server) -> None:
    await server.index.upsert("notes", _docs(NOTES, "n"), model=MODEL)
    server.contexts.delete("notes")
    with pytest.raises(FailedPreconditionError, match="context is missing"):
        await server.index.search("notes", "plumber")
