"""End-to-end indexing of the SMS corpus per store: read, chunk, embed, write, against the
in-process embedding ceiling of the same model (embedding the same batches and writing nothing).

Documents go through `IndexService.upsert` in batches, with the batch priority, as a job sends
them. The embedding cache is off in both runs so that both compute every vector.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import header, in_process_engine, load_corpus, write_section
from wafer.domain import EmbedRequest, InputType, Priority, StoredDocument
from wafer.engine import InferenceEngine
from wafer.indexing import IndexService
from wafer.store.base import VectorStore
from wafer.store.edge import EdgeStore
from wafer.store.qdrant import QdrantStore

MODEL = "minilm"


def open_store(kind: str, folder: Path) -> VectorStore:
    return EdgeStore(path=folder) if kind == "edge" else QdrantStore(path=folder)


async def ceiling(engine: InferenceEngine, texts: list[str], batch: int) -> float:
    started = time.perf_counter()
    for first in range(0, len(texts), batch):
        request = EmbedRequest(
            inputs=texts[first : first + batch], model=MODEL, input_type=InputType.DOCUMENT, priority=Priority.BATCH
        )
        await engine.embed(request)
    return len(texts) / (time.perf_counter() - started)


async def indexed(engine: InferenceEngine, kind: str, texts: list[str], batch: int) -> tuple[float, int]:
    folder = Path(tempfile.mkdtemp(prefix=f"wafer-bench-index-{kind}-"))
    index = IndexService(engine, open_store(kind, folder))
    try:
        started = time.perf_counter()
        for first in range(0, len(texts), batch):
            documents = [
                StoredDocument(id=str(first + i), text=text, payload={"n": (first + i) % 10})
                for i, text in enumerate(texts[first : first + batch])
            ]
            await index.upsert("sms", documents, model=MODEL, priority=Priority.BATCH)
        rate = len(texts) / (time.perf_counter() - started)
        stored = (await index.list_collections())[0].documents
        return rate, stored
    finally:
        await index.close()
        shutil.rmtree(folder, ignore_errors=True)


async def run(args: argparse.Namespace) -> str:
    texts, corpus = load_corpus(args.corpus)
    texts = texts[: args.limit] if args.limit else texts
    engine = in_process_engine(threads=args.threads)
    try:
        await ceiling(engine, texts[:64], args.batch)  # warm-up: load the model
        lines = [
            header("Indexing the SMS corpus end to end, per store", corpus),
            f"- {len(texts)} messages in batches of {args.batch} through `IndexService.upsert` (batch priority, "
            "chunking on, embedding cache off), in process; ceiling = `engine.embed` of the same batches, no store",
            "",
            "| run | messages/s | ratio to ceiling | documents stored |",
            "|---|---:|---:|---:|",
        ]
        best = await ceiling(engine, texts, args.batch)
        lines.append(f"| in-process embedding ceiling ({MODEL}) | {best:.1f} | 1.00 | |")
        print("ceiling", best, flush=True)
        for kind in args.stores:
            rate, stored = await indexed(engine, kind, texts, args.batch)
            print(kind, rate, stored, flush=True)
            lines.append(f"| index into {kind} | {rate:.1f} | {rate / best:.2f} | {stored} |")
        return "\n".join(lines) + "\n"
    finally:
        await engine.registry.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="JSONL with a `text` field")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="index only the first N messages")
    parser.add_argument("--stores", type=lambda s: s.split(","), default=["edge", "local"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke run on 300 messages")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.limit = 300
    text = asyncio.run(run(args))
    print(text)
    if args.write:
        write_section("indexing", text)


if __name__ == "__main__":
    main()
