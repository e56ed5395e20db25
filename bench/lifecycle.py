"""Model lifecycle: load times of the default models, load/unload cycles with requests running (memory
returned, no failed request), and a swap under 16 concurrent clients.

    .venv/bin/python -m bench.lifecycle [--cycles 200] [--loads 10] [--quick] [--write]

Everything runs in this process on the server's own registry and engine (no gRPC: the lifecycle is
the registry's; tests/e2e/test_lifecycle.py drives a swap over gRPC). Memory is this process's RSS.
--quick: 20 cycles and 3 loads, for a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from dataclasses import dataclass, field

import psutil

from bench.common import header, in_process_engine, load_corpus, median, percentile, write_section
from wafer.config import Settings
from wafer.domain import EmbedRequest
from wafer.engine import InferenceEngine
from wafer.errors import UnavailableError
from wafer.registry import limit_heap_arenas, trim_heap

MIB = 2**20


@dataclass
class CycleStats:
    cycles: int = 0
    taken: int = 0
    freed: int = 0
    load_seconds: list[float] = field(default_factory=list)
    answered: int = 0
    unavailable: int = 0
    failed: list[str] = field(default_factory=list)
    baseline_rss: int = 0
    final_rss: int = 0
    # RSS right after each cycle's unload.
    after_unload: list[int] = field(default_factory=list)

    def trajectory(self) -> str:
        """Median RSS after unload over windows of 10 cycles, at five points of the run, in MiB."""
        points = []
        count = len(self.after_unload)
        for start in sorted({min(max(0, round(f * count) - 5), max(0, count - 10)) for f in (0, 0.25, 0.5, 0.75, 1)}):
            window = self.after_unload[start : start + 10]
            points.append(f"cycles {start + 1}-{start + len(window)}: {median(window) / MIB:.0f}")
        return "; ".join(points)


async def load_times(engine: InferenceEngine, model: str, loads: int) -> list[float]:
    """Seconds per LoadModel of `model` with nothing else running (first load excluded: warm-up)."""
    registry = engine.registry
    await registry.unload(model)
    times = []
    for i in range(loads + 1):
        started = time.perf_counter()
        await registry.load(model)
        if i:
            times.append(time.perf_counter() - started)
        await registry.unload(model)
    return times


async def cycles(engine: InferenceEngine, model: str, count: int, texts: list[str]) -> CycleStats:
    registry = engine.registry
    process = psutil.Process()
    stats = CycleStats()
    stop = asyncio.Event()

    async def requester(offset: int) -> None:
        i = offset
        while not stop.is_set():
            batch = [texts[(i + k) % len(texts)] for k in range(4)]
            i += 4
            try:
                await engine.embed(EmbedRequest(inputs=batch, model=model))
                stats.answered += 1
            except UnavailableError:
                stats.unavailable += 1  # documented: a request that arrives during an admin's unload
                await asyncio.sleep(0.02)  # as the client SDK's retry would, not a busy loop
            except Exception as exc:
                stats.failed.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.002)

    # Warm-up cycles first: ONNX Runtime's one-time allocations are not a leak.
    for _ in range(3):
        await registry.load(model)
        await registry.unload(model)
    stats.baseline_rss = settled_rss(process)
    requesters = [asyncio.create_task(requester(i * 97)) for i in range(3)]
    for _ in range(count):
        before = process.memory_info().rss
        started = time.perf_counter()
        await registry.load(model)
        stats.load_seconds.append(time.perf_counter() - started)
        loaded = process.memory_info().rss
        await asyncio.sleep(0.02)
        await registry.unload(model)
        after = process.memory_info().rss
        stats.after_unload.append(after)
        stats.taken += max(0, loaded - before)
        stats.freed += max(0, loaded - after)
        stats.cycles += 1
    stop.set()
    await asyncio.gather(*requesters)
    await registry.unload(model)
    stats.final_rss = settled_rss(process)
    return stats


def settled_rss(process: psutil.Process) -> int:
    """RSS once garbage is collected and freed heap handed back, as the registry does after a free."""
    gc.collect()
    trim_heap()
    return int(process.memory_info().rss)


async def swap_under_load(engine: InferenceEngine, clients: int, swaps: int) -> tuple[int, int, list[float]]:
    """minilm swapped to paraphrase-MiniLM-L3's files and back while `clients` tasks embed."""
    registry = engine.registry
    await registry.load("minilm")
    paraphrase = registry.spec("paraphrase-minilm-l3")
    other = registry.spec_from_api(
        "minilm", f"source: {paraphrase.source}\ntokenizer: {paraphrase.tokenizer}\nmax_tokens: 128"
    )
    original = registry.spec("minilm")
    stop = asyncio.Event()
    answered = 0
    failed = 0

    async def client(i: int) -> None:
        nonlocal answered, failed
        while not stop.is_set():
            try:
                await engine.embed(EmbedRequest(inputs=[f"swap test {i}"], model="minilm"))
                answered += 1
            except Exception:
                failed += 1

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    swap_seconds = []
    for k in range(swaps):
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        await registry.load("minilm", spec=other if k % 2 == 0 else original)
        await registry.wait_retired("minilm")
        swap_seconds.append(time.perf_counter() - started)
    stop.set()
    await asyncio.gather(*tasks)
    return answered, failed, swap_seconds


async def run(args: argparse.Namespace, texts: list[str]) -> str:
    engine = in_process_engine()
    registry = engine.registry
    load_average = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    onnx_loads = await load_times(engine, "minilm", args.loads)
    gguf_loads = await load_times(engine, "smollm2", args.loads)
    stats = await cycles(engine, "minilm", args.cycles, texts)
    answered, failed, swap_seconds = await swap_under_load(engine, 16, 6 if not args.quick else 2)
    await registry.close()

    def row(name: str, values: list[float], target: float) -> str:
        ok = "yes" if median(values) <= target else "no"
        return (
            f"| {name} | {median(values):.3f} | {percentile(values, 95):.3f} | {min(values):.3f} | {target:g} | {ok} |"
        )

    growth = (stats.final_rss - stats.baseline_rss) / MIB
    returned = stats.freed / stats.taken if stats.taken else float("nan")
    lines = [
        f"- {args.loads} loads per model after one warm-up load, nothing else of this benchmark running; the "
        f"machine is shared: load average {load_average} when the loads began",
        "",
        "| load | median s | p95 s | min s | target s | median within |",
        "|---|---:|---:|---:|---:|---|",
        row("minilm (ONNX, default)", onnx_loads, 0.5),
        row("smollm2 (GGUF, default)", gguf_loads, 1.0),
        "",
        f"- {stats.cycles} load/unload cycles of minilm while 3 tasks embed 4 texts per call with it "
        "(after 3 warm-up cycles)",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| RSS the loads took (sum) | {stats.taken / MIB:.0f} MiB |",
        f"| RSS the unloads gave back (sum) | {stats.freed / MIB:.0f} MiB |",
        f"| returned / taken | {returned:.3f} |",
        f"| malloc arenas (WAFER_MALLOC_ARENA_MAX; 0: glibc's default) | {args.malloc_arena_max} |",
        f"| RSS growth over all cycles (after warm-up, model unloaded, heap trimmed) | {growth:+.1f} MiB |",
        f"| RSS after unload, MiB (medians of 10 cycles) | {stats.trajectory()} |",
        f"| load s per cycle, median / p95 | {median(stats.load_seconds):.3f} / "
        f"{percentile(stats.load_seconds, 95):.3f} |",
        f"| requests answered | {stats.answered} |",
        f"| requests refused UNAVAILABLE (during an admin unload, documented) | {stats.unavailable} |",
        f"| requests failed otherwise | {len(stats.failed)} |",
        "",
        f"- swap under 16 concurrent clients: minilm ⇄ paraphrase-MiniLM-L3 files, {len(swap_seconds)} swaps: "
        f"{answered} requests answered, {failed} failed; swap (load new, move traffic, free old) median "
        f"{median(swap_seconds):.2f} s",
    ]
    if stats.failed:
        lines += ["", "Failures: " + "; ".join(sorted(set(stats.failed))[:5])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--loads", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="20 cycles, 3 loads: a smoke run")
    parser.add_argument(
        "--malloc-arena-max",
        type=int,
        default=Settings.model_fields["malloc_arena_max"].default,
        help="0: glibc's default",
    )
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.cycles, args.loads = min(args.cycles, 20), min(args.loads, 3)
    if args.malloc_arena_max:
        limit_heap_arenas(args.malloc_arena_max)  # as `wafer serve` does (WAFER_MALLOC_ARENA_MAX)
    texts, corpus = load_corpus(None)
    body = asyncio.run(run(args, texts))
    text = header("Model lifecycle: load times, load/unload cycles under requests, swap", corpus) + "\n" + body
    print(text)
    if args.write:
        write_section("lifecycle", text)


if __name__ == "__main__":
    main()
