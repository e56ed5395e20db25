"""Search on 100k stored vectors per store engine: write time, search latency (embed the query +
vector search + top 10), filtered search, rerank of the top 20, and the embedding cache.

The vectors are real MiniLM vectors of the SMS corpus, repeated with noise up to the wanted count:
each copy is the message's vector plus Gaussian noise (sigma 0.02 per component, about a third of
a component's typical size), re-normalized, so the collection has the clusters and the spread of
real text rather than uniform random points. Searches use other SMS texts as queries, embedded
with the collection's model like a real Search. Everything runs in one process (no gRPC): the
engine and `IndexService` the server uses, over each `VectorStore`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from bench.common import header, in_process_engine, load_corpus, median, percentile, write_section
from wafer.app import engine_limits
from wafer.cache import EmbeddingCache
from wafer.config import Settings
from wafer.domain import EmbedRequest, InputType, RerankRequest
from wafer.engine import InferenceEngine
from wafer.indexing import IndexService
from wafer.store.base import StoredPoint, VectorStore
from wafer.store.edge import EdgeStore
from wafer.store.qdrant import QdrantStore

MODEL = "minilm"
NOISE = 0.02
WRITE_BATCH = 1024
SENDERS = 50


def open_store(kind: str, folder: Path) -> VectorStore:
    return EdgeStore(path=folder) if kind == "edge" else QdrantStore(path=folder)


async def corpus_vectors(engine: InferenceEngine, texts: list[str]) -> np.ndarray:
    rows = []
    for start in range(0, len(texts), 256):
        rows.append((await engine.embed(EmbedRequest(inputs=texts[start : start + 256], model=MODEL))).vectors)
    return np.concatenate(rows)


def noisy_copies(base: np.ndarray, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` vectors: base vectors in turn plus noise, re-normalized; and which base each came from."""
    rng = np.random.default_rng(seed)
    origin = np.arange(count) % len(base)
    vectors = base[origin] + rng.normal(scale=NOISE, size=(count, base.shape[1])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), origin


async def timed(fn: Callable[[], Awaitable[object]], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - started) * 1000.0)
    return samples


def row(name: str, samples: list[float]) -> str:
    return f"| {name} | {median(samples):.2f} | {percentile(samples, 95):.2f} | {len(samples)} |"


async def bench_store(
    kind: str,
    *,
    engine: InferenceEngine,
    vectors: np.ndarray,
    origin: np.ndarray,
    texts: list[str],
    queries: list[str],
    runs: int,
) -> tuple[float, list[str]]:
    folder = Path(tempfile.mkdtemp(prefix=f"wafer-bench-{kind}-"))
    store = open_store(kind, folder)
    try:
        store.ensure_collection("bench", dimensions=vectors.shape[1], model=MODEL)
        points = [
            StoredPoint(
                id=f"d{i}", text=texts[origin[i]], payload={"sender": f"s{i % SENDERS}", "copy": int(i // len(texts))}
            )
            for i in range(len(vectors))
        ]
        started = time.perf_counter()
        for first in range(0, len(points), WRITE_BATCH):
            store.upsert("bench", points[first : first + WRITE_BATCH], vectors[first : first + WRITE_BATCH])
        write_seconds = time.perf_counter() - started
        index = IndexService(engine, store)
        try:
            cycle = iter(range(10**9))

            async def search() -> None:
                await index.search("bench", queries[next(cycle) % len(queries)], top_k=10)

            async def filtered() -> None:
                await index.search("bench", queries[next(cycle) % len(queries)], top_k=10, filter={"sender": "s7"})

            request = EmbedRequest(inputs=queries[:runs], model=MODEL, input_type=InputType.QUERY)
            query_vectors = (await engine.embed(request)).vectors

            async def vector_only() -> None:
                vector = query_vectors[next(cycle) % len(query_vectors)]
                store.search("bench", vector, top_k=10)

            await timed(search, 3)  # warm-up: first searches open segments and load the model
            rows = [
                row("search (embed query + vector search + top 10)", await timed(search, runs)),
                row("filtered search (sender = one of 50)", await timed(filtered, max(5, runs // 2))),
                row("vector search only (top 10)", await timed(vector_only, runs)),
            ]
        finally:
            # The service closes the store with it.
            await index.close()
        return write_seconds, rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def bench_rerank(engine: InferenceEngine, texts: list[str], queries: list[str], runs: int) -> list[str]:
    rows = []
    cycle = iter(range(10**9))
    for model, n_runs in (("minilm", runs), ("smollm2", max(2, runs // 20))):

        async def rerank(model: str = model) -> None:
            i = next(cycle)
            documents = [texts[(i * 20 + j) % len(texts)] for j in range(20)]
            await engine.rerank(RerankRequest(query=queries[i % len(queries)], documents=documents, model=model))

        await timed(rerank, 1)
        rows.append(row(f"rerank top 20 ({model})", await timed(rerank, n_runs)))
    return rows


async def bench_cache(engine: InferenceEngine, texts: list[str], runs: int) -> tuple[list[float], list[float]]:
    folder = Path(tempfile.mkdtemp(prefix="wafer-bench-cache-"))
    cache = EmbeddingCache(folder / "cache.sqlite", max_entries=100_000)
    cached = InferenceEngine(engine.registry, engine_limits(Settings(data_dir=folder)), cache=cache)
    try:
        cycle = iter(range(10**9))
        misses: list[float] = []
        hits: list[float] = []
        for _ in range(runs):
            text = f"{texts[next(cycle) % len(texts)]} [{time.perf_counter_ns()}]"  # never seen before
            for samples in (misses, hits):
                started = time.perf_counter()
                result = await cached.embed(EmbedRequest(inputs=[text], model=MODEL))
                samples.append((time.perf_counter() - started) * 1000.0)
                assert result.cached == (1 if samples is hits else 0)
        return misses, hits
    finally:
        cache.close()
        shutil.rmtree(folder, ignore_errors=True)


async def run(args: argparse.Namespace) -> str:
    texts, corpus = load_corpus(args.corpus)
    engine = in_process_engine(threads=args.threads)
    try:
        queries = texts[::-97][: max(args.runs, 20)]
        started = time.perf_counter()
        base = await corpus_vectors(engine, texts)
        embed_seconds = time.perf_counter() - started
        vectors, origin = noisy_copies(base, args.vectors)
        lines = [
            header(f"Search on {args.vectors:,} stored vectors, per store", corpus),
            f"- vectors: {args.vectors:,} x {vectors.shape[1]}: MiniLM vectors of the {len(texts)} messages "
            f"(embedded in {embed_seconds:.0f} s) repeated with Gaussian noise (sigma {NOISE}), re-normalized; "
            f"payload `sender` (one of {SENDERS}) and `copy`",
            f"- {args.runs} searches per case after 3 warm-up searches; queries are other SMS texts; "
            "in-process `IndexService.search` (no gRPC), embedding cache off",
            "",
            "- local mode commits every point to SQLite on its own; at this machine's disk speed 100k points "
            f"would take over ten minutes, so it holds {args.local_vectors:,} (`--local-vectors`)",
            "",
            "| store | write s | points/s |",
            "|---|---:|---:|",
        ]
        tables = []
        for kind in args.stores:
            count = args.vectors if kind == "edge" else min(args.vectors, args.local_vectors)
            write_seconds, rows = await bench_store(
                kind,
                engine=engine,
                vectors=vectors[:count],
                origin=origin[:count],
                texts=texts,
                queries=queries,
                runs=args.runs,
            )
            label = f"{kind} ({count:,} vectors)" if count != args.vectors else kind
            lines.append(f"| {label} | {write_seconds:.1f} | {count / write_seconds:,.0f} |")
            tables.append((label, rows))
            print(label, f"write {write_seconds:.1f} s", *rows, sep="\n", flush=True)
        lines += ["", "| store: case | p50 ms | p95 ms | runs |", "|---|---:|---:|---:|"]
        for kind, rows in tables:
            lines += [r.replace("| ", f"| {kind}: ", 1) for r in rows]
        rerank_rows = await bench_rerank(engine, texts, queries, args.runs)
        misses, hits = await bench_cache(engine, texts, args.runs)
        lines += ["", "| case | p50 ms | p95 ms | runs |", "|---|---:|---:|---:|", *rerank_rows]
        lines += [row("embed 1 text, cache miss (minilm)", misses), row("embed 1 text, cache hit (minilm)", hits)]
        lines += ["", f"- cache hit speed-up (p50 miss / p50 hit): {median(misses) / median(hits):.0f} x"]
        return "\n".join(lines) + "\n"
    finally:
        await engine.registry.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="JSONL with a `text` field")
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--stores", type=lambda s: s.split(","), default=["edge", "local"])
    parser.add_argument("--local-vectors", type=int, default=10_000, help="vectors in the local-mode store")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5,000 vectors, 10 runs")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.vectors, args.runs, args.local_vectors = 5_000, 10, 2_000
    text = asyncio.run(run(args))
    print(text)
    if args.write:
        write_section("search", text)


if __name__ == "__main__":
    main()
