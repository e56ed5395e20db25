"""The edge store never loses data it does not understand, and one broken collection never hides
the others (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wafer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from wafer.store.base import StoredPoint, filter_conditions
from wafer.store.edge import MAX_PAYLOAD_INDEXES, META_FILE, EdgeStore


def filled(path: Path, name: str, n: int = 3) -> EdgeStore:
    store = EdgeStore(path=path)
    store.ensure_collection(name, dimensions=4, model="m")
    points = [StoredPoint(id=f"d{i}", text=f"text {i}", payload={"k": i}) for i in range(n)]
    store.upsert(name, points, np.eye(n, 4, dtype=np.float32) + 0.1)
    return store


def test_a_lost_metadata_file_never_deletes_the_shard(tmp_path: Path) -> None:
    filled(tmp_path, "docs").close()
    (tmp_path / "docs" / META_FILE).unlink()
    store = EdgeStore(path=tmp_path)
    with pytest.raises(FailedPreconditionError, match="holds 3 points"):
        store.collection("docs")
    # The next upsert to that name is refused instead of starting the collection over.
    with pytest.raises(FailedPreconditionError, match="holds 3 points"):
        store.ensure_collection("docs", dimensions=4, model="m")
    store.close()
    (tmp_path / "docs" / META_FILE).write_text(json.dumps({"wafer_model": "m", "dimensions": 4, "wafer_format": 2}))
    store = EdgeStore(path=tmp_path)
    assert store.collection("docs").documents == 3
    store.close()


def test_an_interrupted_creation_still_starts_over(tmp_path: Path) -> None:
    store = EdgeStore(path=tmp_path)
    store.ensure_collection("docs", dimensions=4, model="m")
    store.close()
    (tmp_path / "docs" / META_FILE).unlink()  # an empty shard: the creation never finished
    store = EdgeStore(path=tmp_path)
    with pytest.raises(NotFoundError):
        store.collection("docs")
    assert store.ensure_collection("docs", dimensions=4, model="m").documents == 0
    store.close()


def test_a_damaged_metadata_file_hides_only_its_own_collection(tmp_path: Path) -> None:
    store = filled(tmp_path, "good")
    store.ensure_collection("bad", dimensions=4, model="m")
    store.close()
    (tmp_path / "bad" / META_FILE).write_text("{not json")
    store = EdgeStore(path=tmp_path)
    assert [c.name for c in store.list_collections()] == ["good"]
    with pytest.raises(FailedPreconditionError, match="damaged"):
        store.collection("bad")
    store.close()
    assert (tmp_path / "bad").is_dir(), "nothing was deleted"


def test_the_metadata_file_is_written_atomically(tmp_path: Path) -> None:
    store = filled(tmp_path, "docs")
    store.close()
    assert json.loads((tmp_path / "docs" / META_FILE).read_text())["wafer_model"] == "m"
    assert not [p for p in (tmp_path / "docs").iterdir() if p.name.endswith(".tmp")]


def test_collection_names_with_a_newline_or_too_long_are_refused_briefly(tmp_path: Path) -> None:
    store = EdgeStore(path=tmp_path)
    with pytest.raises(InvalidArgumentError):
        store.ensure_collection("docs\n", dimensions=4, model="m")
    with pytest.raises(InvalidArgumentError) as refused:
        store.ensure_collection("x" * 10_000, dimensions=4, model="m")
    assert len(refused.value.message) < 400
    assert not list(tmp_path.iterdir())
    store.close()


def test_payload_indexes_are_bounded_per_collection(tmp_path: Path) -> None:
    store = filled(tmp_path, "docs")
    for i in range(MAX_PAYLOAD_INDEXES + 10):
        store.search("docs", np.ones(4, dtype=np.float32), top_k=1, filter={f"key{i}": "v"})
    _, shard = store._shard("docs")
    assert len(shard.info().payload_schema) == MAX_PAYLOAD_INDEXES
    # A filter on a field without an index still answers.
    found = store.search("docs", np.ones(4, dtype=np.float32), top_k=5, filter={"k": 1})
    assert [p.id for p in found] == ["d1"]
    store.close()


@pytest.mark.parametrize("key", ["$", "a..b", "a\x01b", ".a", "a."])
def test_malformed_filter_keys_are_invalid_argument(key: str) -> None:
    with pytest.raises(InvalidArgumentError, match="filter key"):
        filter_conditions({key: 1})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30, 2**63])
def test_filter_values_out_of_range_are_invalid_argument(value: object) -> None:
    with pytest.raises(InvalidArgumentError, match="64 bits"):
        filter_conditions({"a": value})  # type: ignore[dict-item]
