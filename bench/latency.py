"""Single-request latency of each RPC over gRPC against the same call in-process, and the load time
and memory of each default model; then one embed and one generate call over the OpenAI-compatible
HTTP endpoint against the same calls over gRPC.

    .venv/bin/python -m bench.latency [--corpus FILE.jsonl] [--runs 60] [--write] [--http-only]

In-process means the server's own engine called directly (no gRPC, no second process); the gRPC
numbers come from this process calling a `wafer serve` child over loopback TCP. The two phases run
one after the other so they never compete for the cores. The HTTP phase calls one server (started
with an HTTP address) over both doors, alternating gRPC and HTTP call by call, so both see the same
machine. Ratios are what to compare: these machines are noisy. `--http-only` runs (and writes) the
HTTP phase alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_against_grpc(texts: list[str], runs: int, threads: int) -> Samples:
    """One server, both doors, calls alternating: embed one text, and a streamed 32-token chat."""
    http_address = f"127.0.0.1:{_free_port()}"
    with (
        served(threads, settings={"WAFER_HTTP_ADDRESS": http_address}) as (address, process),
        # Generous timeouts: on a shared machine a 32-token generation has taken minutes.
        WaferClient(address, timeout=600, retries=0) as client,
        httpx.Client(base_url=f"http://{http_address}/v1", timeout=600) as http,
    ):
        while client.health("wafer.v1.Inference") != "SERVING":
            time.sleep(0.1)
        samples = Samples()
        rng = random.Random(11)
        picks = [rng.choice(texts) for _ in range(runs + 2)]

        def embed_grpc(text: str) -> None:
            client.embed(text, model="minilm", truncate=True)

        def embed_http(text: str) -> None:
            response = http.post("/embeddings", json={"model": "minilm", "input": text, "truncate": True})
            response.raise_for_status()
            assert len(response.json()["data"][0]["embedding"]) == 384

        doors: list[tuple[str, Callable[[str], None]]] = [("gRPC", embed_grpc), ("HTTP", embed_http)]
        for i, text in enumerate(picks):
            # Alternate which door goes first, so neither always follows the other.
            for door, call in doors[:: 1 if i % 2 else -1]:
                started = time.perf_counter()
                call(text)
                if i >= 2:  # two warm-up rounds
                    samples.add(f"embed 1 text (minilm) {door}", (time.perf_counter() - started) * 1000)
        # CPU time per call, each door in a block of its own: what a call costs, whatever the load.
        server = psutil.Process(process.pid)
        for door, call in doors:
            server_before, client_before = sum(server.cpu_times()[:2]), time.process_time()
            for text in picks[2:]:
                call(text)
            server_cpu = sum(server.cpu_times()[:2]) - server_before
            samples.note(f"server CPU ms per embed {door}", server_cpu * 1000 / runs)
            samples.note(f"client CPU ms per embed {door}", (time.process_time() - client_before) * 1000 / runs)
        for i in range(6):
            for door in ["gRPC", "HTTP"][:: 1 if i % 2 else -1]:
                first, total, tokens = _generate_grpc(client) if door == "gRPC" else _generate_http(http)
                if i >= 1:  # one warm-up round
                    samples.add(f"generate: time to first token {door}", first)
                    samples.add(f"generate {GENERATE_TOKENS} tokens (total) {door}", total)
                    samples.note(f"generate tokens/s {door}", tokens / (total / 1000))
        return samples


def _generate_grpc(client: WaferClient) -> tuple[float, float, int]:
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    for chunk in client.generate(
        messages=[{"role": "user", "content": PROMPT}], model="smollm2", max_tokens=GENERATE_TOKENS, temperature=0
    ):
        if first is None and chunk.text:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    done = time.perf_counter()
    return ((first or done) - started) * 1000, (done - started) * 1000, tokens


def _generate_http(http: httpx.Client) -> tuple[float, float, int]:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": GENERATE_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    with http.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    done = time.perf_counter()
    return ((first or done) - started) * 1000, (done - started) * 1000, tokens


def http_report(samples: Samples, corpus: str, runs: int, load: tuple[float, float, float]) -> str:
    lines = [
        header("Single-request latency: HTTP (OpenAI-compatible) against gRPC", corpus),
        f"- load average before the run (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}; "
        "the machine is shared with other work, so compare the ratios, which both doors share",
        f"- one server, both doors; {runs} embed calls per door and 5 generations per door, gRPC and HTTP "
        "alternating call by call, after warm-up calls; HTTP through httpx (a kept-alive connection), "
        "embeddings as JSON floats, the chat streamed as server-sent events",
        "- HTTP's extra time is HTTP/1.1 and JSON in pure Python on both ends (h11, Starlette and pydantic in "
        "the server, httpx in the client) where gRPC runs its C core; on a loaded machine each Python step "
        "costs several times its quiet-machine time, and generation, which the model dominates, hides it",
        "",
        "| call | gRPC p50 ms | HTTP p50 ms | HTTP - gRPC ms | ratio | gRPC p95 ms | HTTP p95 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in (
        "embed 1 text (minilm)",
        "generate: time to first token",
        f"generate {GENERATE_TOKENS} tokens (total)",
    ):
        grpc_values, http_values = samples.by_case[f"{case} gRPC"], samples.by_case[f"{case} HTTP"]
        there, here = median(http_values), median(grpc_values)
        lines.append(
            f"| {case} | {here:.2f} | {there:.2f} | {there - here:+.2f} | {there / here:.2f} | "
            f"{percentile(grpc_values, 95):.2f} | {percentile(http_values, 95):.2f} |"
        )
    tps_grpc, tps_http = (
        median(samples.extra["generate tokens/s gRPC"]),
        median(samples.extra["generate tokens/s HTTP"]),
    )
    lines.append(
        f"| generate tokens/s (higher is better) | {tps_grpc:.1f} | {tps_http:.1f} | | {tps_http / tps_grpc:.2f} | | |"
    )
    cpu = {key: values[0] for key, values in samples.extra.items() if "CPU" in key}
    lines += [
        "",
        f"CPU time per embed call, {runs} calls per door in a block (the model's compute included, the same for both):",
        "",
        "| | gRPC ms | HTTP ms | HTTP - gRPC ms |",
        "|---|---:|---:|---:|",
    ]
    for side in ("server", "client"):
        grpc_ms, http_ms = cpu[f"{side} CPU ms per embed gRPC"], cpu[f"{side} CPU ms per embed HTTP"]
        lines.append(f"| {side} CPU | {grpc_ms:.2f} | {http_ms:.2f} | {http_ms - grpc_ms:+.2f} |")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--http-only", action="store_true", help="only the HTTP against gRPC phase")
    args = parser.parse_args()
    texts, corpus = load_corpus(args.corpus)
    if not args.http_only:
        local, _ = asyncio.run(in_process(texts, args.runs, args.threads))
        remote, loads = over_grpc(texts, args.runs, args.threads)
        text = report(local, remote, loads, corpus, args.runs)
        print(text)
        if args.write:
            write_section("latency", text)
    load = os.getloadavg()
    doors = http_report(http_against_grpc(texts, args.runs, args.threads), corpus, args.runs, load)
    print(doors)
    if args.write:
        write_section("latency-http", doors)


if __name__ == "__main__":
    main()
