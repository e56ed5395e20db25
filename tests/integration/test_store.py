"""The congruence suite: every test runs against each embedded store in a real folder in tmp_path,
qdrant-client's local mode (`QdrantStore(path=)`) and qdrant-edge (`EdgeStore`), and expects the
same answers from both; `test_both_stores_answer_alike` also compares them with each other directly.

No Qdrant server binary is available to the tests (it is not on PyPI), so the server path is
covered only where it can be without one (an unreachable URL).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from qdrant_client import QdrantClient, models

from wafer.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from wafer.store.base import StoredPoint, VectorStore
from wafer.store.edge import EdgeStore
from wafer.store.qdrant import QdrantStore

DIM = 8
MODEL = "minilm"


def precision(store: VectorStore) -> float:
    """How closely a store gives back vectors and scores: edge keeps float16 (3 significant digits)."""
    return 1e-3 if isinstance(store, EdgeStore) else 1e-6


def unit_vectors(n: int, seed: int = 0) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((n, DIM)).astype(np.float32)
    return np.asarray(matrix / np.linalg.norm(matrix, axis=1, keepdims=True), dtype=np.float32)


def docs(n: int, *, prefix: str = "text") -> list[StoredPoint]:
    return [
        StoredPoint(
            id=f"doc-{i}",
            text=f"{prefix} {i}",
            payload={"lang": "en" if i % 2 == 0 else "fr", "year": 2020 + i, "draft": i == 1},
        )
        for i in range(n)
    ]


STORES = ["local", "edge"]


def open_store(kind: str, folder: Path) -> VectorStore:
    return QdrantStore(path=folder) if kind == "local" else EdgeStore(path=folder)


@pytest.fixture(params=STORES)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(kind: str, folder: Path) -> Iterator[VectorStore]:
    opened = open_store(kind, folder)
    yield opened
    opened.close()


@pytest.fixture
def filled(store: VectorStore) -> tuple[VectorStore, NDArray[np.float32]]:
    vectors = unit_vectors(4)
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    store.upsert("docs", docs(4), vectors)
    return store, vectors


def test_upsert_then_retrieve_round_trips_text_payload_and_vector(store: VectorStore) -> None:
    vectors = unit_vectors(3)
    created = store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    assert (created.name, created.model, created.dimensions, created.documents) == ("docs", MODEL, DIM, 0)
    payload = {"lang": "en", "n": 3, "ok": True, "score": 0.25, "tags": ["a", "b"], "meta": {"k": "v"}}
    written = [StoredPoint(id="a", text="hello world", payload=payload), *docs(2)]

    store.upsert("docs", written, vectors)

    got = store.retrieve("docs", ["a", "doc-0", "doc-1"], with_vectors=True)
    assert [d.id for d in got] == ["a", "doc-0", "doc-1"]
    for document, original, vector in zip(got, written, vectors, strict=True):
        assert document.text == original.text
        assert document.payload == original.payload
        assert document.vector is not None
        np.testing.assert_allclose(document.vector, vector, rtol=precision(store), atol=precision(store))
    assert store.collection("docs").documents == 3


def test_retrieve_keeps_request_order_and_leaves_out_unknown_ids(
    filled: tuple[VectorStore, NDArray[np.float32]],
) -> None:
    store, _ = filled
    got = store.retrieve("docs", ["doc-3", "nope", "doc-0", "doc-3"])
    assert [d.id for d in got] == ["doc-3", "doc-0"]
    assert all(d.vector is None for d in got)
    assert store.retrieve("docs", []) == []


def test_writing_the_same_ids_again_replaces_instead_of_duplicating(
    filled: tuple[VectorStore, NDArray[np.float32]],
) -> None:
    store, _ = filled
    replacement = [StoredPoint(id=f"doc-{i}", text=f"new {i}", payload={"v": 2}) for i in range(4)]
    new_vectors = unit_vectors(4, seed=1)

    store.upsert("docs", replacement, new_vectors)

    assert store.collection("docs").documents == 4
    got = store.retrieve("docs", [d.id for d in replacement], with_vectors=True)
    assert [(d.text, d.payload) for d in got] == [(f"new {i}", {"v": 2}) for i in range(4)]
    for document, vector in zip(got, new_vectors, strict=True):
        assert document.vector is not None
        np.testing.assert_allclose(document.vector, vector, rtol=precision(store), atol=precision(store))


def test_search_ranks_the_exact_vector_first_with_score_one(
    filled: tuple[VectorStore, NDArray[np.float32]],
) -> None:
    store, vectors = filled
    for i, vector in enumerate(vectors):
        found = store.search("docs", vector, top_k=4)
        assert found[0].id == f"doc-{i}"
        assert found[0].score == pytest.approx(1.0, abs=max(1e-5, precision(store)))
        assert found[0].text == f"text {i}"
        assert found[0].vector is None
        scores = [d.score for d in found]
        assert scores == sorted(scores, reverse=True)
        assert len(found) == 4


def test_search_honours_top_k_and_with_vectors(filled: tuple[VectorStore, NDArray[np.float32]]) -> None:
    store, vectors = filled
    found = store.search("docs", vectors[2], top_k=2, with_vectors=True)
    assert len(found) == 2
    assert found[0].vector is not None
    np.testing.assert_allclose(found[0].vector, vectors[2], rtol=precision(store), atol=precision(store))


def test_search_scores_are_cosine_similarities(store: VectorStore) -> None:
    store.ensure_collection("plane", dimensions=2, model=MODEL)
    store.upsert(
        "plane",
        [StoredPoint(id="x", text="x"), StoredPoint(id="diag", text="diag")],
        np.array([[1.0, 0.0], [3.0, 3.0]], dtype=np.float32),
    )
    found = store.search("plane", np.array([1.0, 0.0], dtype=np.float32), top_k=2)
    assert [d.id for d in found] == ["x", "diag"]
    assert found[1].score == pytest.approx(np.sqrt(0.5), abs=max(1e-5, precision(store)))


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"lang": "en"}, {"doc-0", "doc-2"}),
        ({"year": 2023}, {"doc-3"}),
        # Numbers come through protobuf Struct as floats; whole ones must match int payloads.
        ({"year": 2021.0}, {"doc-1"}),
        ({"draft": True}, {"doc-1"}),
        ({"draft": False, "lang": "fr"}, {"doc-3"}),
        ({"lang": "de"}, set()),
        ({"missing": "x"}, set()),
    ],
)
def test_filters_are_exact_matches_that_all_must_hold(
    filled: tuple[VectorStore, NDArray[np.float32]],
    condition: dict[str, str | int | bool | float],
    expected: set[str],
) -> None:
    store, vectors = filled
    found = store.search("docs", vectors[0], top_k=10, filter=condition)
    assert {d.id for d in found} == expected


def test_whole_float_payload_numbers_match_int_filters(store: VectorStore) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    store.upsert("docs", [StoredPoint(id="a", text="a", payload={"year": 2020.0})], unit_vectors(1))
    assert [d.id for d in store.search("docs", unit_vectors(1)[0], top_k=1, filter={"year": 2020})] == ["a"]
    assert store.retrieve("docs", ["a"])[0].payload == {"year": 2020}


@pytest.mark.parametrize(
    "condition",
    [{"score": 0.5}, {"_id": "doc-0"}, {"tags": ["a"]}, {"lang": None}, {"": "x"}],
)
def test_bad_filters_are_invalid_arguments(
    filled: tuple[VectorStore, NDArray[np.float32]], condition: dict[str, object]
) -> None:
    store, vectors = filled
    with pytest.raises(InvalidArgumentError):
        store.search("docs", vectors[0], top_k=1, filter=condition)  # type: ignore[arg-type]


def test_delete_removes_documents_and_ignores_unknown_ids(
    filled: tuple[VectorStore, NDArray[np.float32]],
) -> None:
    store, vectors = filled
    store.delete("docs", ["doc-0", "doc-2", "never-written"])

    assert store.collection("docs").documents == 2
    assert [d.id for d in store.retrieve("docs", ["doc-0", "doc-1", "doc-2"])] == ["doc-1"]
    assert {d.id for d in store.search("docs", vectors[0], top_k=10)} == {"doc-1", "doc-3"}
    store.delete("docs", [])


def test_drop_collection_removes_it_and_a_new_one_starts_empty(
    filled: tuple[VectorStore, NDArray[np.float32]],
) -> None:
    store, vectors = filled
    assert store.drop_collection("docs") is True
    with pytest.raises(NotFoundError):
        store.collection("docs")
    assert [c.name for c in store.list_collections()] == []
    assert store.drop_collection("docs") is False
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    assert store.collection("docs").documents == 0
    assert store.search("docs", vectors[0], top_k=10) == []


def test_data_and_model_survive_close_and_reopen(kind: str, folder: Path) -> None:
    vectors = unit_vectors(4)
    first = open_store(kind, folder)
    first.ensure_collection("docs", dimensions=DIM, model=MODEL)
    first.upsert("docs", docs(4), vectors)
    first.close()
    first.close()  # idempotent

    second = open_store(kind, folder)
    try:
        info = second.collection("docs")
        assert (info.model, info.dimensions, info.documents) == (MODEL, DIM, 4)
        assert second.search("docs", vectors[3], top_k=1)[0].id == "doc-3"
        assert second.retrieve("docs", ["doc-1"])[0].payload == docs(4)[1].payload
        # The model is remembered, so a mismatch is caught after a restart too.
        with pytest.raises(FailedPreconditionError):
            second.ensure_collection("docs", dimensions=DIM, model="other-model")
    finally:
        second.close()


def test_the_folder_is_locked_while_open_and_released_by_close(kind: str, folder: Path) -> None:
    first = open_store(kind, folder)
    first.ensure_collection("docs", dimensions=DIM, model=MODEL)  # edge locks per collection
    with pytest.raises(FailedPreconditionError, match="in use"):
        open_store(kind, folder).collection("docs")
    first.close()
    again = open_store(kind, folder)
    assert again.collection("docs").model == MODEL
    again.close()


def test_a_closed_store_is_unavailable(store: VectorStore) -> None:
    store.close()
    with pytest.raises(UnavailableError):
        store.list_collections()


def test_ensure_collection_refuses_another_dimension(store: VectorStore) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    with pytest.raises(FailedPreconditionError) as caught:
        store.ensure_collection("docs", dimensions=DIM * 2, model=MODEL)
    assert f"{DIM}-d" in caught.value.message
    assert f"{DIM * 2}-d" in caught.value.message


def test_ensure_collection_refuses_another_model(store: VectorStore) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    with pytest.raises(FailedPreconditionError) as caught:
        store.ensure_collection("docs", dimensions=DIM, model="smollm2")
    assert repr(MODEL) in caught.value.message
    assert repr("smollm2") in caught.value.message


def test_ensure_collection_is_idempotent(filled: tuple[VectorStore, NDArray[np.float32]]) -> None:
    store, _ = filled
    info = store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    assert (info.model, info.dimensions, info.documents) == (MODEL, DIM, 4)


def test_list_collections(store: VectorStore) -> None:
    assert store.list_collections() == []
    store.ensure_collection("b", dimensions=3, model="m1")
    store.ensure_collection("a", dimensions=DIM, model="m2")
    store.upsert("a", docs(2), unit_vectors(2))
    assert [(c.name, c.model, c.dimensions, c.documents) for c in store.list_collections()] == [
        ("a", "m2", DIM, 2),
        ("b", "m1", 3, 0),
    ]


def test_unknown_collection_is_not_found(store: VectorStore) -> None:
    vector = unit_vectors(1)
    with pytest.raises(NotFoundError, match="nope"):
        store.collection("nope")
    with pytest.raises(NotFoundError):
        store.search("nope", vector[0], top_k=1)
    with pytest.raises(NotFoundError):
        store.upsert("nope", docs(1), vector)
    with pytest.raises(NotFoundError):
        store.retrieve("nope", ["a"])
    with pytest.raises(NotFoundError):
        store.delete("nope", ["a"])


def test_collections_made_outside_wafer_are_listed_but_not_written(folder: Path) -> None:
    # Local mode only: an edge store's folder holds only what Wafer wrote.
    raw = QdrantClient(path=str(folder))
    raw.create_collection("foreign", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
    raw.close()
    store = QdrantStore(path=folder)
    try:
        assert store.collection("foreign").model == ""
        with pytest.raises(FailedPreconditionError, match="not created by Wafer"):
            store.ensure_collection("foreign", dimensions=4, model=MODEL)
    finally:
        store.close()


@pytest.mark.parametrize("key", ["_id", "_text", "_chunk", "_anything"])
def test_reserved_payload_keys_are_refused(store: VectorStore, key: str) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    with pytest.raises(InvalidArgumentError, match="reserved"):
        store.upsert("docs", [StoredPoint(id="a", text="a", payload={key: 1})], unit_vectors(1))
    assert store.collection("docs").documents == 0


def test_bad_documents_and_vectors_are_invalid_arguments(store: VectorStore) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    with pytest.raises(InvalidArgumentError):  # one vector for two documents
        store.upsert("docs", docs(2), unit_vectors(1))
    with pytest.raises(InvalidArgumentError):  # wrong dimension
        store.upsert("docs", docs(1), np.ones((1, DIM + 1), dtype=np.float32))
    with pytest.raises(InvalidArgumentError):
        store.upsert("docs", docs(1), np.full((1, DIM), np.nan, dtype=np.float32))
    with pytest.raises(InvalidArgumentError):
        store.upsert("docs", [StoredPoint(id="", text="no id")], unit_vectors(1))
    with pytest.raises(InvalidArgumentError):
        store.upsert("docs", [StoredPoint(id="a", text="a", payload={"x": object()})], unit_vectors(1))
    with pytest.raises(InvalidArgumentError):
        store.search("docs", np.ones(DIM + 1, dtype=np.float32), top_k=1)
    with pytest.raises(InvalidArgumentError):
        store.search("docs", unit_vectors(1)[0], top_k=0)
    assert store.collection("docs").documents == 0
    store.upsert("docs", [], np.zeros((0, DIM), dtype=np.float32))


def test_calls_from_another_thread_work(store: VectorStore) -> None:
    # The index service calls the store from a worker thread, not the thread that opened it.
    vectors = unit_vectors(2)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(store.ensure_collection, "docs", dimensions=DIM, model=MODEL).result()
        pool.submit(store.upsert, "docs", docs(2), vectors).result()
    assert store.search("docs", vectors[1], top_k=1)[0].id == "doc-1"


def test_an_unreachable_server_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port once the socket is closed: connections are refused at once.
    store = QdrantStore(url=f"http://127.0.0.1:{port}", check_compatibility=False)
    try:
        with pytest.raises(UnavailableError, match="cannot be reached"):
            store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    finally:
        store.close()


def test_exactly_one_location_is_required(tmp_path: Path) -> None:  # QdrantStore only
    with pytest.raises(ValueError, match="exactly one"):
        QdrantStore()
    with pytest.raises(ValueError, match="exactly one"):
        QdrantStore(path=tmp_path, url="http://127.0.0.1:9")


# -- chunks -------------------------------------------------------------------------------------------


def chunked(doc_id: str, text: str, spans: list[tuple[int, int]], payload: dict[str, object]) -> list[StoredPoint]:
    return [
        StoredPoint(id=doc_id, text=text if i == 0 else "", payload=payload, chunk=i, chunks=len(spans), start=a, end=b)
        for i, (a, b) in enumerate(spans)
    ]


def test_a_document_in_chunks_counts_once_and_reads_back_whole(store: VectorStore) -> None:
    text = "one two three four five six"
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    points = chunked("long", text, [(0, 13), (8, 23), (19, 27)], {"lang": "en"})
    vectors = unit_vectors(3)
    store.upsert("docs", [*points, *docs(1)], np.concatenate([vectors, unit_vectors(1, seed=9)]))

    assert store.collection("docs").documents == 2
    [first] = store.retrieve("docs", ["long"])
    assert (first.text, first.chunk, first.chunks, first.start, first.end) == (text, 0, 3, 0, 13)
    hit = store.search("docs", vectors[2], top_k=1, filter={"lang": "en"})[0]
    assert (hit.id, hit.chunk, hit.chunks, hit.start, hit.end, hit.text) == ("long", 2, 3, 19, 27, "")
    assert hit.payload == {"lang": "en"}


def test_rewriting_a_document_with_fewer_chunks_drops_the_old_surplus(store: VectorStore) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    vectors = unit_vectors(3)
    store.upsert("docs", chunked("d", "a b c", [(0, 1), (2, 3), (4, 5)], {}), vectors)
    store.upsert("docs", chunked("d", "a", [(0, 1)], {}), unit_vectors(1, seed=5))

    found = store.search("docs", vectors[2], top_k=10)
    assert [(p.id, p.chunk) for p in found] == [("d", 0)]
    assert store.retrieve("docs", ["d"])[0].chunks == 1


def test_delete_removes_every_chunk(store: VectorStore) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    vectors = unit_vectors(4)
    store.upsert("docs", [*chunked("d", "a b c", [(0, 1), (2, 3), (4, 5)], {}), *docs(1)], vectors)
    store.delete("docs", ["d"])
    assert [p.id for p in store.search("docs", vectors[1], top_k=10)] == ["doc-0"]
    assert store.collection("docs").documents == 1


def test_both_stores_answer_alike(tmp_path: Path) -> None:
    """The same writes, searches (with and without filters), deletes and reopen on both stores give
    the same ids in the same order, the same payloads and the same scores (within edge's float16)."""
    rng = np.random.default_rng(7)
    n = 300
    vectors = unit_vectors(n, seed=3)
    points = [
        StoredPoint(id=f"m{i}", text=f"message {i}", payload={"sender": f"s{i % 7}", "spam": bool(i % 3 == 0)})
        for i in range(n)
    ]
    queries = rng.standard_normal((12, DIM)).astype(np.float32)
    filters: list[dict[str, str | int | bool | float] | None] = [None, {"sender": "s3"}, {"spam": True, "sender": "s1"}]

    def run(store: VectorStore) -> tuple[list[object], list[float]]:
        answers: list[object] = []
        scores: list[float] = []
        store.ensure_collection("c", dimensions=DIM, model=MODEL)
        store.upsert("c", points, vectors)
        store.delete("c", [f"m{i}" for i in range(0, n, 10)])
        for query in queries:
            for condition in filters:
                found = store.search("c", query, top_k=10, filter=condition)
                answers.append([(p.id, p.text, p.payload) for p in found])
                scores += [p.score for p in found]
        answers.append(store.collection("c"))
        answers.append([(p.id, p.payload) for p in store.retrieve("c", ["m0", "m1", "m299", "zz"])])
        return answers, scores

    results = {}
    for kind in STORES:
        opened = open_store(kind, tmp_path / kind)
        first = run(opened)
        opened.close()
        reopened = open_store(kind, tmp_path / kind)
        assert reopened.collection("c").documents == n - n // 10
        reopened.close()
        results[kind] = first
    (local, local_scores), (edge, edge_scores) = results["local"], results["edge"]
    assert local == edge
    np.testing.assert_allclose(edge_scores, local_scores, rtol=0, atol=2e-3)
