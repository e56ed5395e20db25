"""The edge store's threads stay bounded however many collections it holds (issue 13 #16): every
open qdrant-edge shard runs its own search pool (8 threads on this machine), and 400 collections
once ran 3,219 threads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import qdrant_edge as edge

from wafer.store.base import StoredPoint
from wafer.store.edge import SEARCH_THREADS, EdgeStore


def edge_threads() -> int:
    """qdrant-edge's threads in this process (named edge-search-N)."""
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        count += name.startswith("edge-")
    return count


def settled(bound: int, seconds: float = 5.0) -> int:
    """qdrant-edge's threads once a closed shard's have exited (they end shortly after `close()`
    returns), or after `seconds` if they stay above `bound`."""
    deadline = time.monotonic() + seconds
    while (count := edge_threads()) > bound and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


def fill(store: EdgeStore, name: str, i: int) -> None:
    store.ensure_collection(name, dimensions=4, model="m")
    vectors = np.asarray([[1.0, float(i), 0.5, 0.25]], dtype=np.float32)
    store.upsert(name, [StoredPoint(id="d", text=f"text of {name}", payload={"i": i})], vectors)


def test_threads_stay_bounded_over_many_collections(tmp_path: Path) -> None:
    before = settled(0)
    store = EdgeStore(path=tmp_path, max_open=4)
    try:
        for i in range(20):
            fill(store, f"c{i}", i)
            assert settled(before + 4 * SEARCH_THREADS) - before <= 4 * SEARCH_THREADS
        # Every collection still answers: closed shards open again on demand, with their data.
        for i in range(20):
            [found] = store.search(f"c{i}", np.asarray([1.0, float(i), 0.5, 0.25], dtype=np.float32), top_k=1)
            assert (found.id, found.text, found.payload) == ("d", f"text of c{i}", {"i": i})
        assert [c.documents for c in store.list_collections()] == [1] * 20
        assert settled(before + 4 * SEARCH_THREADS) - before <= 4 * SEARCH_THREADS
        # Writing to a collection that was closed keeps what it held.
        store.upsert("c0", [StoredPoint(id="e", text="more")], np.ones((1, 4), dtype=np.float32))
        assert store.collection("c0").documents == 2
        assert store.drop_collection("c0")
        assert len(store.list_collections()) == 19
    finally:
        store.close()
    assert settled(before) == before


def test_a_shard_of_an_earlier_version_opens_with_the_bounded_pool(tmp_path: Path) -> None:
    # As an earlier Wafer laid it out: float32 vectors, qdrant-edge's CPU-derived search pool.
    folder = tmp_path / "old"
    vectors = edge.EdgeVectorParams(size=4, distance=edge.Distance.Cosine)
    shard = edge.EdgeShard.create(str(folder / "shard"), edge.EdgeConfig(vectors=vectors))
    shard.update(edge.UpdateOperation.upsert_points([edge.Point(1, [1.0, 0.0, 0.0, 0.0], {"wafer_chunk": 0})]))
    shard.close()
    (folder / "collection.json").write_text(json.dumps({"wafer_model": "m", "dimensions": 4, "wafer_format": 2}))
    before = settled(0)
    store = EdgeStore(path=tmp_path)
    try:
        assert store.collection("old").documents == 1
        assert settled(before + SEARCH_THREADS) - before == SEARCH_THREADS
    finally:
        store.close()
