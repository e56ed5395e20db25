"""QdrantStore on a real embedded (local-mode) Qdrant folder in tmp_path.

Only local mode runs here: no Qdrant server binary is available to the tests (it is not on PyPI),
so the server path is covered only where it can be without one (an unreachable URL).
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

from wafer.domain import StoredDocument
from wafer.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from wafer.store.qdrant import QdrantStore

DIM = 8
MODEL = "minilm"


def unit_vectors(n: int, seed: int = 0) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((n, DIM)).astype(np.float32)
    return np.asarray(matrix / np.linalg.norm(matrix, axis=1, keepdims=True), dtype=np.float32)


def docs(n: int, *, prefix: str = "text") -> list[StoredDocument]:
    return [
        StoredDocument(
            id=f"doc-{i}",
            text=f"{prefix} {i}",
            payload={"lang": "en" if i % 2 == 0 else "fr", "year": 2020 + i, "draft": i == 1},
        )
        for i in range(n)
    ]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "qdrant"


@pytest.fixture
def store(folder: Path) -> Iterator[QdrantStore]:
    opened = QdrantStore(path=folder)
    yield opened
    opened.close()


@pytest.fixture
def filled(store: QdrantStore) -> tuple[QdrantStore, NDArray[np.float32]]:
    vectors = unit_vectors(4)
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    store.upsert("docs", docs(4), vectors)
    return store, vectors


def test_upsert_then_retrieve_round_trips_text_payload_and_vector(store: QdrantStore) -> None:
    vectors = unit_vectors(3)
    created = store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    assert (created.name, created.model, created.dimensions, created.documents) == ("docs", MODEL, DIM, 0)
    payload = {"lang": "en", "n": 3, "ok": True, "score": 0.25, "tags": ["a", "b"], "meta": {"k": "v"}}
    written = [StoredDocument(id="a", text="hello world", payload=payload), *docs(2)]

    store.upsert("docs", written, vectors)

    got = store.retrieve("docs", ["a", "doc-0", "doc-1"], with_vectors=True)
    assert [d.id for d in got] == ["a", "doc-0", "doc-1"]
    for document, original, vector in zip(got, written, vectors, strict=True):
        assert document.text == original.text
        assert document.payload == original.payload
        assert document.vector is not None
        np.testing.assert_allclose(document.vector, vector, rtol=1e-6, atol=1e-6)
    assert store.collection("docs").documents == 3


def test_retrieve_keeps_request_order_and_leaves_out_unknown_ids(
    filled: tuple[QdrantStore, NDArray[np.float32]],
) -> None:
    store, _ = filled
    got = store.retrieve("docs", ["doc-3", "nope", "doc-0", "doc-3"])
    assert [d.id for d in got] == ["doc-3", "doc-0"]
    assert all(d.vector is None for d in got)
    assert store.retrieve("docs", []) == []


def test_writing_the_same_ids_again_replaces_instead_of_duplicating(
    filled: tuple[QdrantStore, NDArray[np.float32]],
) -> None:
    store, _ = filled
    replacement = [StoredDocument(id=f"doc-{i}", text=f"new {i}", payload={"v": 2}) for i in range(4)]
    new_vectors = unit_vectors(4, seed=1)

    store.upsert("docs", replacement, new_vectors)

    assert store.collection("docs").documents == 4
    got = store.retrieve("docs", [d.id for d in replacement], with_vectors=True)
    assert [(d.text, d.payload) for d in got] == [(f"new {i}", {"v": 2}) for i in range(4)]
    for document, vector in zip(got, new_vectors, strict=True):
        assert document.vector is not None
        np.testing.assert_allclose(document.vector, vector, rtol=1e-6, atol=1e-6)


def test_search_ranks_the_exact_vector_first_with_score_one(
    filled: tuple[QdrantStore, NDArray[np.float32]],
) -> None:
    store, vectors = filled
    for i, vector in enumerate(vectors):
        found = store.search("docs", vector, top_k=4)
        assert found[0].id == f"doc-{i}"
        assert found[0].score == pytest.approx(1.0, abs=1e-5)
        assert found[0].text == f"text {i}"
        assert found[0].vector is None
        scores = [d.score for d in found]
        assert scores == sorted(scores, reverse=True)
        assert len(found) == 4


def test_search_honours_top_k_and_with_vectors(filled: tuple[QdrantStore, NDArray[np.float32]]) -> None:
    store, vectors = filled
    found = store.search("docs", vectors[2], top_k=2, with_vectors=True)
    assert len(found) == 2
    assert found[0].vector is not None
    np.testing.assert_allclose(found[0].vector, vectors[2], rtol=1e-6, atol=1e-6)


def test_search_scores_are_cosine_similarities(store: QdrantStore) -> None:
    store.ensure_collection("plane", dimensions=2, model=MODEL)
    store.upsert(
        "plane",
        [StoredDocument(id="x", text="x"), StoredDocument(id="diag", text="diag")],
        np.array([[1.0, 0.0], [3.0, 3.0]], dtype=np.float32),
    )
    found = store.search("plane", np.array([1.0, 0.0], dtype=np.float32), top_k=2)
    assert [d.id for d in found] == ["x", "diag"]
    assert found[1].score == pytest.approx(np.sqrt(0.5), abs=1e-5)


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
    filled: tuple[QdrantStore, NDArray[np.float32]],
    condition: dict[str, str | int | bool | float],
    expected: set[str],
) -> None:
    store, vectors = filled
    found = store.search("docs", vectors[0], top_k=10, filter=condition)
    assert {d.id for d in found} == expected


def test_whole_float_payload_numbers_match_int_filters(store: QdrantStore) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    store.upsert("docs", [StoredDocument(id="a", text="a", payload={"year": 2020.0})], unit_vectors(1))
    assert [d.id for d in store.search("docs", unit_vectors(1)[0], top_k=1, filter={"year": 2020})] == ["a"]
    assert store.retrieve("docs", ["a"])[0].payload == {"year": 2020}


@pytest.mark.parametrize(
    "condition",
    [{"score": 0.5}, {"_id": "doc-0"}, {"tags": ["a"]}, {"lang": None}, {"": "x"}],
)
def test_bad_filters_are_invalid_arguments(
    filled: tuple[QdrantStore, NDArray[np.float32]], condition: dict[str, object]
) -> None:
    store, vectors = filled
    with pytest.raises(InvalidArgumentError):
        store.search("docs", vectors[0], top_k=1, filter=condition)  # type: ignore[arg-type]


def test_delete_removes_documents_and_ignores_unknown_ids(
    filled: tuple[QdrantStore, NDArray[np.float32]],
) -> None:
    store, vectors = filled
    store.delete("docs", ["doc-0", "doc-2", "never-written"])

    assert store.collection("docs").documents == 2
    assert [d.id for d in store.retrieve("docs", ["doc-0", "doc-1", "doc-2"])] == ["doc-1"]
    assert {d.id for d in store.search("docs", vectors[0], top_k=10)} == {"doc-1", "doc-3"}
    store.delete("docs", [])


def test_data_and_model_survive_close_and_reopen(folder: Path) -> None:
    vectors = unit_vectors(4)
    first = QdrantStore(path=folder)
    first.ensure_collection("docs", dimensions=DIM, model=MODEL)
    first.upsert("docs", docs(4), vectors)
    first.close()
    first.close()  # idempotent

    second = QdrantStore(path=folder)
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


def test_the_folder_is_locked_while_open_and_released_by_close(folder: Path) -> None:
    first = QdrantStore(path=folder)
    with pytest.raises(FailedPreconditionError, match="in use"):
        QdrantStore(path=folder)
    first.close()
    QdrantStore(path=folder).close()


def test_a_closed_store_is_unavailable(store: QdrantStore) -> None:
    store.close()
    with pytest.raises(UnavailableError):
        store.list_collections()


def test_ensure_collection_refuses_another_dimension(store: QdrantStore) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    with pytest.raises(FailedPreconditionError) as caught:
        store.ensure_collection("docs", dimensions=DIM * 2, model=MODEL)
    assert f"{DIM}-d" in caught.value.message
    assert f"{DIM * 2}-d" in caught.value.message


def test_ensure_collection_refuses_another_model(store: QdrantStore) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    with pytest.raises(FailedPreconditionError) as caught:
        store.ensure_collection("docs", dimensions=DIM, model="smollm2")
    assert repr(MODEL) in caught.value.message
    assert repr("smollm2") in caught.value.message


def test_ensure_collection_is_idempotent(filled: tuple[QdrantStore, NDArray[np.float32]]) -> None:
    store, _ = filled
    info = store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    assert (info.model, info.dimensions, info.documents) == (MODEL, DIM, 4)


def test_list_collections(store: QdrantStore) -> None:
    assert store.list_collections() == []
    store.ensure_collection("b", dimensions=3, model="m1")
    store.ensure_collection("a", dimensions=DIM, model="m2")
    store.upsert("a", docs(2), unit_vectors(2))
    assert [(c.name, c.model, c.dimensions, c.documents) for c in store.list_collections()] == [
        ("a", "m2", DIM, 2),
        ("b", "m1", 3, 0),
    ]


def test_unknown_collection_is_not_found(store: QdrantStore) -> None:
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


@pytest.mark.parametrize("key", ["_id", "_text", "_anything"])
def test_reserved_payload_keys_are_refused(store: QdrantStore, key: str) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    with pytest.raises(InvalidArgumentError, match="reserved"):
        store.upsert("docs", [StoredDocument(id="a", text="a", payload={key: 1})], unit_vectors(1))
    assert store.collection("docs").documents == 0


def test_bad_documents_and_vectors_are_invalid_arguments(store: QdrantStore) -> None:
    store.ensure_collection("docs", dimensions=DIM, model=MODEL)
    with pytest.raises(InvalidArgumentError):  # one vector for two documents
        store.upsert("docs", docs(2), unit_vectors(1))
    with pytest.raises(InvalidArgumentError):  # wrong dimension
        store.upsert("docs", docs(1), np.ones((1, DIM + 1), dtype=np.float32))
    with pytest.raises(InvalidArgumentError):
        store.upsert("docs", docs(1), np.full((1, DIM), np.nan, dtype=np.float32))
    with pytest.raises(InvalidArgumentError):
        store.upsert("docs", [StoredDocument(id="", text="no id")], unit_vectors(1))
    with pytest.raises(InvalidArgumentError):
        store.upsert("docs", [StoredDocument(id="a", text="a", payload={"x": object()})], unit_vectors(1))
    with pytest.raises(InvalidArgumentError):
        store.search("docs", np.ones(DIM + 1, dtype=np.float32), top_k=1)
    with pytest.raises(InvalidArgumentError):
        store.search("docs", unit_vectors(1)[0], top_k=0)
    assert store.collection("docs").documents == 0
    store.upsert("docs", [], np.zeros((0, DIM), dtype=np.float32))


def test_calls_from_another_thread_work(store: QdrantStore) -> None:
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


def test_exactly_one_location_is_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        QdrantStore()
    with pytest.raises(ValueError, match="exactly one"):
        QdrantStore(path=tmp_path, url="http://127.0.0.1:9")
