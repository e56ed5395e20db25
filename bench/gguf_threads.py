"""SmolLM2 (GGUF, llama.cpp) speed on the main thread against a worker thread, and what else costs.

An OpenMP build of llama-cpp-python was once measured here generating at 22-27 tokens/s on a worker
thread against 63 on the main thread, which is why the Makefile builds llama.cpp without OpenMP
(docs/architecture.md, "Threads"). This measures the project's own GgufBackend (OpenMP off):

- generation tokens/s (greedy, ~128 tokens, median of repeats): main thread, a worker thread, the
  main thread again; per thread count;
- the same on a worker thread while another process keeps one core busy (what a second model
  computing at the same time does to a 2-core machine);
- prompt evaluation and embedding throughput (texts/s, tokens/s on 64 SMS-like texts) on a worker;
- relevance scoring ms/document with the shared prefix evaluated once and once per document;
- load time, resident memory after load and after close.

Run: .venv/bin/python bench/gguf_threads.py [--repeats 3] [--threads 1 2]
Other processes on the machine skew every number here; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "server"))

from wafer.backends.base import LoadOptions, ModelFiles  # noqa: E402
from wafer.backends.gguf import GgufBackend  # noqa: E402
from wafer.domain import SamplingParams  # noqa: E402
from wafer.sources import SourceResolver  # noqa: E402
from wafer.specs import Catalog  # noqa: E402

T = TypeVar("T")

STORY = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker "
    "who had never left his workshop. One morning"
)
SMS = [
    "Hey, are we still on for dinner at 7? Let me know if you need me to pick anything up.",
    "Running 10 min late, traffic is terrible on the bridge again :(",
    "Can you send me the photos from Saturday? Mum wants to print a few.",
    "Your parcel will be delivered tomorrow between 9am and 1pm. Reply STOP to opt out.",
    "Don't forget the team meeting moved to 3pm, room B.",
    "Happy birthday!!! Hope you have an amazing day, see you tonight",
    "Got the tickets! Row F, seats 12 and 13. Doors open at 8.",
    "Reminder: dentist appointment on Thursday at 10:30. Call us to reschedule.",
]
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Paris is the capital and most populous city of France.",
    "To cook pasta, boil salted water and add the spaghetti for ten minutes.",
    "The football match ended two to one after extra time.",
    "Berlin is the capital of Germany and its largest city.",
    *SMS,
] * 2


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def median(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def on_worker(fn: Callable[[], T]) -> T:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-worker") as pool:
        return pool.submit(fn).result()


def generation_rate(backend: GgufBackend, max_tokens: int = 128) -> float:
    """Tokens/s after the first token: the decode loop, without prompt evaluation."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    first = last = 0.0
    completion = 0
    for delta in backend.generate(prompt=STORY, messages=(), sampling=sampling, cancelled=lambda: False):
        now = time.perf_counter()
        first = first or now
        last = now
        if delta.finish_reason is not None:
            completion = delta.completion_tokens
    return (completion - 1) / (last - first)


def prompt_rate(backend: GgufBackend, text: str) -> float:
    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    started = time.perf_counter()
    deltas = list(backend.generate(prompt=text, messages=(), sampling=sampling, cancelled=lambda: False))
    return deltas[-1].prompt_tokens / (time.perf_counter() - started)


def load(threads: int) -> tuple[GgufBackend, float, float]:
    catalog = Catalog.from_yaml(ROOT / "models.yaml")
    spec = catalog.models["smollm2"]
    resolver = SourceResolver(catalog.base_dir, ROOT / ".cache" / "hub")
    files = ModelFiles(weights=resolver.resolve(spec.source, model=spec.name))
    before = rss_mb()
    started = time.perf_counter()
    backend = GgufBackend.load(spec, files, LoadOptions(threads=threads))
    return backend, time.perf_counter() - started, rss_mb() - before


def busy_core() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def row(label: str, value: str) -> None:
    print(f"  {label:<58} {value:>14}", flush=True)


def measure_generation(backend: GgufBackend, repeats: int) -> None:
    def rate() -> float:
        return median(lambda: generation_rate(backend), repeats)

    generation_rate(backend, 16)  # warm-up
    row("generate tok/s, main thread", f"{rate():.1f}")
    row("generate tok/s, worker thread", f"{on_worker(rate):.1f}")
    row("generate tok/s, main thread again", f"{rate():.1f}")
    hog = busy_core()
    try:
        time.sleep(0.2)
        busy = on_worker(rate)
    finally:
        hog.kill()
        hog.wait()
    row("generate tok/s, worker thread, 1 core busy elsewhere", f"{busy:.1f}")
    long_prompt = " ".join([STORY] * 12)
    prompt = on_worker(lambda: median(lambda: prompt_rate(backend, long_prompt), repeats))
    row("prompt eval tok/s (~400 tokens), worker", f"{prompt:.0f}")


def measure_embedding(backend: GgufBackend, repeats: int) -> None:
    texts = [f"{SMS[i % len(SMS)]} ({i})" for i in range(64)]

    def batch() -> float:
        started = time.perf_counter()
        backend.embed(texts, truncate=False)
        return time.perf_counter() - started

    def single() -> float:
        started = time.perf_counter()
        for text in texts[:16]:
            backend.embed([text], truncate=False)
        return time.perf_counter() - started

    tokens = sum(backend.embed(texts, truncate=False).token_counts)
    seconds = on_worker(lambda: median(batch, repeats))
    row("embed 64 SMS in one call, worker: texts/s", f"{64 / seconds:.1f}")
    row("embed 64 SMS in one call, worker: tokens/s", f"{tokens / seconds:.0f}")
    row("embed one text per call, worker: texts/s", f"{16 / on_worker(single):.1f}")


def measure_relevance(backend: GgufBackend) -> None:
    instruction = backend.spec.rerank_instruction

    def shared() -> float:
        started = time.perf_counter()
        backend.score_relevance(QUERY, DOCUMENTS, instruction=instruction, truncate=False)
        return (time.perf_counter() - started) * 1000 / len(DOCUMENTS)

    def each() -> float:
        started = time.perf_counter()
        for document in DOCUMENTS[:8]:
            backend.score_relevance(QUERY, [document], instruction=instruction, truncate=False)
        return (time.perf_counter() - started) * 1000 / 8

    row(f"rerank ms/doc, prefix once ({len(DOCUMENTS)} docs/call), worker", f"{on_worker(shared):.0f}")
    row("rerank ms/doc, prefix per doc (1 doc/call), worker", f"{on_worker(each):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    print(f"cores: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.2f}")
    for threads in args.threads:
        backend, load_s, load_mb = load(threads)
        print(f"\nn_threads = n_threads_batch = {threads}")
        row("load time", f"{load_s * 1000:.0f} ms")
        row("RSS added by load", f"{load_mb:.0f} MB")
        backend.health()
        measure_generation(backend, args.repeats)
        measure_embedding(backend, args.repeats)
        measure_relevance(backend)
        before_close = rss_mb()
        backend.close()
        row("RSS freed by close", f"{before_close - rss_mb():.0f} MB")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
