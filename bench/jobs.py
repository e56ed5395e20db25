"""Indexing a corpus through a job (read, embed, write, checkpoint) against the in-process embedding
ceiling of the same model, and interactive Embed latency while a job runs.

    .venv/bin/python -m bench.jobs [--corpus FILE.jsonl] [--quick] [--write]

Three measurements, one after the other so they never share the cores:
1. ceiling: the server's engine, in this process, embedding the corpus in batches of the job's size
   (no reading, no store, no gRPC): the most a job could reach;
2. in-process job: the server's JobManager over the engine and an embedded Qdrant, in this process;
3. served job: a `wafer serve` child indexing the same JSONL file, submitted and watched over gRPC.
The ceiling is measured again at the end and the mean of both is the reference: on a shared machine
the load drifts. On the served job's server, Embed calls run one at a time while the server is
quiet and while a second job runs. `--quick` takes the first 500 messages for a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.common import SHARED_SMS, header, in_process_engine, median, percentile, served, write_section
from wafer.app import job_options
from wafer.config import Settings
from wafer.domain import EmbedRequest, Priority
from wafer.engine import InferenceEngine
from wafer.indexing import IndexService
from wafer.jobs import JobManager, JobRequest, JsonlSource, PolicyChecker, PowerProbe
from wafer.store.qdrant import QdrantStore
from wafer_client import JsonlSource as ClientJsonlSource
from wafer_client import WaferClient

MODEL = "minilm"
QUICK_MESSAGES = 500
LATENCY_CALLS = 30


def corpus_file(path: Path | None, limit: int | None, folder: Path) -> tuple[Path, list[str], str]:
    """The corpus as a JSONL file in `folder` (the job reads it), its texts, and where it came from."""
    source = path or (SHARED_SMS if SHARED_SMS.exists() else None)
    target = folder / "corpus.jsonl"
    if source is None:
        phrases = [
            "Are we still on for lunch tomorrow?",
            "Running late, be there in 10 minutes",
            "Your parcel has been delivered to the front door.",
            "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May. Text FA to 87121",
            "Can you pick up milk and bread on the way home?",
        ]
        records = [{"id": i, "text": f"{phrases[i % len(phrases)]} ({i})"} for i in range(5574)]
        described = "generated SMS-like messages (the SMS Spam Collection was not found)"
    else:
        records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        described = f"{source.name}"
    records = records[:limit] if limit else records
    texts = [str(r["text"]) for r in records]
    target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return target, texts, f"{described} ({len(records)} messages)"


@dataclass(frozen=True)
class Rate:
    """Documents done in `wall` seconds, using `cpu` seconds of CPU (every thread of the process)."""

    docs: int
    wall: float
    cpu: float

    @property
    def per_second(self) -> float:
        return self.docs / self.wall

    @property
    def per_cpu_second(self) -> float:
        return self.docs / self.cpu


class Stopwatch:
    """Wall and CPU time of one process (this one by default) from start to `rate()`."""

    def __init__(self, pid: int | None = None) -> None:
        self._process = psutil.Process(pid)
        self._wall = time.perf_counter()
        self._cpu = self._cpu_now()

    def _cpu_now(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def rate(self, docs: int) -> Rate:
        return Rate(docs=docs, wall=time.perf_counter() - self._wall, cpu=self._cpu_now() - self._cpu)


async def ceiling(engine: InferenceEngine, texts: list[str], batch_size: int) -> Rate:
    """The engine alone, in the job's batches."""
    await engine.embed(EmbedRequest(inputs=texts[:batch_size], model=MODEL, truncate=True))  # warm-up
    watch = Stopwatch()
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        await engine.embed(EmbedRequest(inputs=batch, model=MODEL, truncate=True, priority=Priority.BATCH))
    return watch.rate(len(texts))


async def in_process(texts: list[str], corpus: Path, batch_size: int, threads: int) -> tuple[Rate, Rate]:
    engine = in_process_engine(threads)
    await engine.registry.load(MODEL)
    top = await ceiling(engine, texts, batch_size)
    data = Path(tempfile.mkdtemp(prefix="wafer-bench-jobs-"))
    settings = Settings(data_dir=data, threads=threads, jobs_batch_size=batch_size)
    index = IndexService(engine, QdrantStore(path=settings.store_dir))
    checker = PolicyChecker(
        idle_for=engine.seconds_since_interactive, power=PowerProbe(settings.power_supply_root), default_idle_seconds=0
    )
    jobs = JobManager(job_options(settings), index, checker, known_model=engine.registry.status)
    await jobs.start()
    shutil.copy(corpus, data / corpus.name)
    watch = Stopwatch()
    job = await jobs.submit(JobRequest(collection="bench", source=JsonlSource(data / corpus.name), model=MODEL))
    async for status in jobs.watch(job.id):
        final = status
    rate = watch.rate(len(texts))
    assert final.state.value == "succeeded" and final.done == len(texts), final
    await jobs.close()
    await index.close()
    await engine.registry.close()
    shutil.rmtree(data, ignore_errors=True)
    return top, rate


async def ceiling_again(texts: list[str], batch_size: int, threads: int) -> Rate:
    engine = in_process_engine(threads)
    await engine.registry.load(MODEL)
    try:
        return await ceiling(engine, texts, batch_size)
    finally:
        await engine.registry.close()


def served_job(corpus: Path, count: int, batch_size: int, threads: int) -> tuple[Rate, list[float], list[float]]:
    data = Path(tempfile.mkdtemp(prefix="wafer-bench-jobs-"))
    shutil.copy(corpus, data / corpus.name)
    # The embedding cache off: the second job re-indexes the same corpus, and the latency probe
    # beside it should measure calls beside a job that computes, not one served from the cache.
    settings = {"WAFER_JOBS_BATCH_SIZE": str(batch_size)}
    try:
        with (
            served(threads, data_dir=data, settings=settings) as (address, server),
            WaferClient(address, timeout=120, retries=0) as client,
        ):
            while client.health("wafer.v1.Inference") != "SERVING":
                time.sleep(0.1)
            source = ClientJsonlSource(str(data / corpus.name))
            watch = Stopwatch(server.pid)
            job = client.submit_job("bench", source, model=MODEL)
            final = client.wait_job(job.id, timeout=3600)
            rate = watch.rate(count)
            assert final.state == "succeeded" and final.done == count, final

            def embed_latencies(phase: str) -> list[float]:
                # Texts new to the cache in each phase, so every call runs the model.
                measured = []
                for i in range(LATENCY_CALLS):
                    began = time.perf_counter()
                    client.embed([f"where is my parcel {i} ({phase})"], model=MODEL, input_type="query")
                    measured.append((time.perf_counter() - began) * 1000)
                return measured

            quiet = embed_latencies("quiet")
            busy_job = client.submit_job("bench-busy", source, model=MODEL)
            while client.get_job(busy_job.id).done == 0:
                time.sleep(0.02)
            busy = embed_latencies("busy")
            assert client.get_job(busy_job.id).state == "running", "the second job ended before the calls did"
            client.cancel_job(busy_job.id)
        return rate, quiet, busy
    finally:
        shutil.rmtree(data, ignore_errors=True)


def report(
    corpus: str,
    batch_size: int,
    *,
    tops: tuple[Rate, Rate],
    local: Rate,
    remote: Rate,
    quiet: list[float],
    busy: list[float],
) -> str:
    wall = sum(t.per_second for t in tops) / 2
    cpu = sum(t.per_cpu_second for t in tops) / 2

    def row(name: str, rate: Rate) -> str:
        return (
            f"| {name} | {rate.per_second:.0f} | {rate.per_second / wall:.2f} | "
            f"{rate.per_cpu_second:.0f} | {rate.per_cpu_second / cpu:.2f} |"
        )

    lines = [
        header("Indexing through a job against the in-process embedding ceiling", corpus),
        f"- model {MODEL}, batches of {batch_size}, store: qdrant-client embedded local mode; "
        "ceiling = the engine alone embedding the same batches in this process (no reading, no store)",
        "- docs per CPU-second counts the CPU time of every thread of the process doing the work (this "
        "one, or the server): it holds still when other processes load the machine, wall time does not",
        "",
        "| path | docs/s | ratio | docs per CPU-second | ratio |",
        "|---|---:|---:|---:|---:|",
        f"| ceiling: engine embed, in-process (mean of before: {tops[0].per_second:.0f} docs/s, "
        f"{tops[0].per_cpu_second:.0f}/CPU-s; after: {tops[1].per_second:.0f}, {tops[1].per_cpu_second:.0f}) "
        f"| {wall:.0f} | 1.00 | {cpu:.0f} | 1.00 |",
        row("job in-process (JobManager, Qdrant local)", local),
        row("job served (`wafer serve`, submitted and watched over gRPC)", remote),
        "",
        f"Embed (1 query) over gRPC, {LATENCY_CALLS} calls one at a time:",
        "",
        "| server | p50 ms | p95 ms |",
        "|---|---:|---:|",
        f"| quiet | {median(quiet):.1f} | {percentile(quiet, 95):.1f} |",
        f"| a job running | {median(busy):.1f} | {percentile(busy, 95):.1f} |",
        "",
        f"- p50 during a job / quiet: {median(busy) / median(quiet):.2f}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="JSONL with `id` and `text` fields")
    parser.add_argument("--quick", action="store_true", help=f"only the first {QUICK_MESSAGES} messages")
    parser.add_argument("--batch-size", type=int, default=Settings.model_fields["jobs_batch_size"].default)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="wafer-bench-corpus-"))
    try:
        corpus, texts, described = corpus_file(args.corpus, QUICK_MESSAGES if args.quick else None, folder)
        top, local = asyncio.run(in_process(texts, corpus, args.batch_size, args.threads))
        remote, quiet, busy = served_job(corpus, len(texts), args.batch_size, args.threads)
        # Measured again after the jobs: on a shared machine the load drifts during a run.
        top_after = asyncio.run(ceiling_again(texts, args.batch_size, args.threads))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = report(described, args.batch_size, tops=(top, top_after), local=local, remote=remote, quiet=quiet, busy=busy)
    print(text)
    if args.write:
        write_section("jobs", text)


if __name__ == "__main__":
    main()
