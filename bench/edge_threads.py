"""Threads and memory of many edge collections: qdrant-edge's own search pool per shard, every
shard open (as before issue 13 #16), against Wafer's bound (one search thread a shard, at most
`edge_max_open_collections` open, the rest reopened on demand), in the same run.

Each collection holds a few documents (4-d vectors: the cost measured is the shard's, not the
data's). For each setting: create the collections, then search each once in order (with the
bound, every search past the first `max_open` reopens a closed shard), counting the process's
threads (/proc/self/task) and its RSS. Each setting runs in a process of its own, so one's
memory does not count against the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

import wafer.store.edge as edge_store
from bench.common import header, write_section
from wafer.store.base import StoredPoint
from wafer.store.edge import DEFAULT_MAX_OPEN, EdgeStore


def threads() -> int:
    return sum(1 for _ in Path("/proc/self/task").iterdir())


def settle(before: int, seconds: float = 10.0) -> None:
    """Wait for closed shards' threads to exit (they end shortly after `close()`)."""
    deadline = time.monotonic() + seconds
    while threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)


def measure(collections: int, *, max_open: int, search_threads: int | None) -> dict[str, float]:
    edge_store.SEARCH_THREADS = search_threads  # type: ignore[assignment]  # None: qdrant-edge's own count
    process = psutil.Process()
    before_threads, before_rss = threads(), process.memory_info().rss
    with tempfile.TemporaryDirectory() as folder:
        store = EdgeStore(path=Path(folder), max_open=max_open)
        vectors = np.eye(3, 4, dtype=np.float32) + 0.1
        started = time.perf_counter()
        for i in range(collections):
            store.ensure_collection(f"c{i}", dimensions=4, model="m")
            store.upsert(f"c{i}", [StoredPoint(id=f"d{j}", text=f"text {j}") for j in range(3)], vectors)
        created = time.perf_counter() - started
        after_create = threads() - before_threads
        searches = []
        for i in range(collections):
            started = time.perf_counter()
            store.search(f"c{i}", vectors[0], top_k=3)
            searches.append(time.perf_counter() - started)
        searches.sort()
        result = {
            "threads": float(max(after_create, threads() - before_threads)),
            "rss_mb": (process.memory_info().rss - before_rss) / 2**20,
            "create_s": created,
            "search_p50_ms": searches[len(searches) // 2] * 1000,
            "search_max_ms": searches[-1] * 1000,
        }
        store.close()
    settle(before_threads)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collections", type=int, default=400)
    parser.add_argument("--max-open", type=int, default=DEFAULT_MAX_OPEN)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 collections, 8 open")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument("--measure", choices=["before", "now"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.collections, args.max_open = 40, 8
    bound = edge_store.SEARCH_THREADS
    if args.measure is not None:
        before = args.measure == "before"
        result = measure(
            args.collections,
            max_open=args.collections if before else args.max_open,
            search_threads=None if before else bound,
        )
        print(json.dumps(result))
        return
    load_before = os.getloadavg()
    unbounded, bounded = (
        json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.edge_threads",
                    "--collections",
                    str(args.collections),
                    "--max-open",
                    str(args.max_open),
                    "--measure",
                    which,
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        for which in ("before", "now")
    )
    load_after = os.getloadavg()
    rows = [
        ("every shard open, qdrant-edge's pool (before)", unbounded),
        (f"at most {args.max_open} open, {bound} search thread each (now)", bounded),
    ]
    lines = [
        header("Edge store: threads for many collections", f"{args.collections} collections of 3 documents"),
        f"- load average before / after: {' '.join(f'{x:.2f}' for x in load_before)} / "
        f"{' '.join(f'{x:.2f}' for x in load_after)}",
        "",
        "| setting | threads added | RSS added (MiB) | create all (s) | search each once: p50 / max (ms) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['threads']:.0f} | {r['rss_mb']:.0f} | {r['create_s']:.1f} | "
            f"{r['search_p50_ms']:.2f} / {r['search_max_ms']:.1f} |"
        )
    lines += [
        "",
        f"- threads: {unbounded['threads'] / max(1.0, bounded['threads']):.0f}x fewer; creating the collections "
        f"took {unbounded['create_s'] / bounded['create_s']:.1f}x the time without the bound",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section("edge_threads", text)


if __name__ == "__main__":
    main()
