"""Single-request latency of each RPC over gRPC against the same call in-process, and the load time
and memory of each default model.

    .venv/bin/python -m bench.latency [--corpus FILE.jsonl] [--runs 60] [--write]

In-process means the server's own engine called directly (no gRPC, no second process); the gRPC
numbers come from this process calling a `wafer serve` child over loopback TCP. The two phases run
one after the other so they never compete for the cores. Ratios are what to compare: these machines
are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from pathlib import Path

from bench.common import header, in_process_engine, load_corpus, median, percentile, served, write_section
from wafer.domain import ChatMessage, EmbedRequest, GenerateRequest, RerankRequest, SamplingParams
from wafer.engine import InferenceEngine
from wafer_client import WaferClient

GENERATE_TOKENS = 32
PROMPT = "Write a short story about the sea."
MESSAGES = (ChatMessage("user", PROMPT),)


class Samples:
    """Milliseconds per call, by case."""

    def __init__(self) -> None:
        self.by_case: dict[str, list[float]] = {}
        self.extra: dict[str, list[float]] = {}

    def add(self, case: str, ms: float) -> None:
        self.by_case.setdefault(case, []).append(ms)

    def note(self, key: str, value: float) -> None:
        self.extra.setdefault(key, []).append(value)


def cases(texts: list[str], runs: int) -> dict[str, list[tuple[str, list[str]]]]:
    rng = random.Random(7)
    picks = [rng.choice(texts) for _ in range(runs)]
    docs = [[rng.choice(texts) for _ in range(10)] for _ in range(runs)]
    return {
        "embed 1 text (minilm)": [(t, []) for t in picks],
        "rerank 10 docs (minilm)": list(zip(picks, docs, strict=True)),
        "rerank 4 docs (smollm2, LLM)": [(t, d[:4]) for t, d in zip(picks[:8], docs[:8], strict=True)],
        "embed 1 text (smollm2)": [(t, []) for t in picks[:20]],
    }


async def in_process(texts: list[str], runs: int, threads: int) -> tuple[Samples, dict[str, tuple[float, int]]]:
    engine = in_process_engine(threads)
    registry = engine.registry
    loads = {}
    for name in ("minilm", "smollm2"):
        status = await registry.load(name)
        loads[name] = (status.load_seconds, status.memory_bytes)
    samples = Samples()

    for case, inputs in cases(texts, runs).items():
        for text, docs in inputs[:2]:  # warm-up
            await _engine_call(engine, case, text, docs)
        for text, docs in inputs:
            started = time.perf_counter()
            await _engine_call(engine, case, text, docs)
            samples.add(case, (time.perf_counter() - started) * 1000)
    for _ in range(5):
        await _generate_in_process(engine, samples)
    await registry.close()
    return samples, loads


async def _engine_call(engine: InferenceEngine, case: str, text: str, docs: list[str]) -> None:
    model = "smollm2" if "smollm2" in case else "minilm"
    if case.startswith("embed"):
        await engine.embed(EmbedRequest(inputs=[text], model=model, truncate=True))
    else:
        await engine.rerank(RerankRequest(query=text, documents=docs, model=model, truncate=True))


async def _generate_in_process(engine: InferenceEngine, samples: Samples) -> None:
    started = time.perf_counter()
    first = None
    request = GenerateRequest(
        messages=MESSAGES, sampling=SamplingParams(max_tokens=GENERATE_TOKENS, temperature=0), model="smollm2"
    )
    tokens = 0
    async for chunk in engine.generate(request):
        if first is None and chunk.text:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - started
    samples.add("generate: time to first token", ((first or started) - started) * 1000)
    samples.add(f"generate {GENERATE_TOKENS} tokens (total)", total * 1000)
    samples.note("generate tokens/s", tokens / total)


def over_grpc(texts: list[str], runs: int, threads: int) -> tuple[Samples, dict[str, tuple[float, int]]]:
    with served(threads) as (address, _):
        with WaferClient(address, timeout=120, retries=0) as client:
            while client.health("wafer.v1.Inference") != "SERVING":
                time.sleep(0.1)
            loads = {m.name: (m.load_seconds, m.memory_bytes) for m in client.list_models() if m.state == "ready"}
            samples = Samples()
            for case, inputs in cases(texts, runs).items():
                model = "smollm2" if "smollm2" in case else "minilm"
                call = (
                    (lambda t, d, m=model: client.embed(t, model=m, truncate=True))
                    if case.startswith("embed")
                    else (lambda t, d, m=model: client.rerank(t, d, model=m, truncate=True))
                )
                for text, docs in inputs[:2]:
                    call(text, docs)
                for text, docs in inputs:
                    started = time.perf_counter()
                    call(text, docs)
                    samples.add(case, (time.perf_counter() - started) * 1000)
            for _ in range(5):
                started = time.perf_counter()
                first = None
                tokens = 0
                for chunk in client.generate(
                    messages=[{"role": "user", "content": PROMPT}],
                    model="smollm2",
                    max_tokens=GENERATE_TOKENS,
                    temperature=0,
                ):
                    if first is None and chunk.text:
                        first = time.perf_counter()
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                total = time.perf_counter() - started
                samples.add("generate: time to first token", ((first or started) - started) * 1000)
                samples.add(f"generate {GENERATE_TOKENS} tokens (total)", total * 1000)
                samples.note("generate tokens/s", tokens / total)
        return samples, loads


def report(local: Samples, remote: Samples, loads: dict[str, tuple[float, int]], corpus: str, runs: int) -> str:
    lines = [
        header("Single-request latency: gRPC against in-process", corpus),
        f"- {runs} calls per case (LLM cases fewer), one at a time, after 2 warm-up calls; "
        "in-process = the server's engine called directly in one process",
        "",
        "| call | in-process p50 ms | gRPC p50 ms | gRPC - in-process ms | ratio | gRPC p95 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, values in local.by_case.items():
        here, there = median(values), median(remote.by_case[case])
        lines.append(
            f"| {case} | {here:.2f} | {there:.2f} | {there - here:+.2f} | {there / here:.2f} | "
            f"{percentile(remote.by_case[case], 95):.2f} |"
        )
    tps_local = median(local.extra["generate tokens/s"])
    tps_remote = median(remote.extra["generate tokens/s"])
    lines += [
        f"| generate tokens/s (higher is better) | {tps_local:.1f} | {tps_remote:.1f} | | "
        f"{tps_remote / tps_local:.2f} | |",
        "",
        "| model | load s (server) | memory MB at load (server RSS delta) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {seconds:.2f} | {memory / 2**20:.0f} |" for name, (seconds, memory) in loads.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="JSONL with a `text` field")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    texts, corpus = load_corpus(args.corpus)
    local, _ = asyncio.run(in_process(texts, args.runs, args.threads))
    remote, loads = over_grpc(texts, args.runs, args.threads)
    text = report(local, remote, loads, corpus, args.runs)
    print(text)
    if args.write:
        write_section("latency", text)


if __name__ == "__main__":
    main()
