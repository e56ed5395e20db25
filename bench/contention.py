"""Two models on one small CPU: SmolLM2 generation while MiniLM embeds in a loop, in one process,
with the compute gate (models take turns) and without it (both compute at once).

    .venv/bin/python -m bench.contention [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Iterator

from bench.common import header, in_process_engine, median, write_section
from wafer import scheduler
from wafer.domain import EmbedRequest, GenerateRequest, Priority, SamplingParams
from wafer.engine import InferenceEngine

TEXT = "Are we still on for lunch tomorrow? I can be there at noon."
TOKENS = 128


async def generate(engine: InferenceEngine) -> float:
    started = time.perf_counter()
    produced = 0
    request = GenerateRequest(
        prompt="1, 2, 3, 4,", sampling=SamplingParams(max_tokens=TOKENS, temperature=0), model="smollm2"
    )
    async for chunk in engine.generate(request):
        if chunk.usage is not None:
            produced = chunk.usage.completion_tokens
    return produced / (time.perf_counter() - started)


async def measure(gate: scheduler.ComputeGate) -> dict[str, float]:
    engine = in_process_engine(gate=gate)
    registry = engine.registry
    await registry.load("minilm")
    await registry.load("smollm2")
    alone = await generate(engine)
    stop = False
    embedded = 0
    latencies: list[float] = []

    async def embed_loop() -> None:
        nonlocal embedded
        while not stop:
            started = time.perf_counter()
            await engine.embed(EmbedRequest(inputs=[TEXT] * 4))
            latencies.append((time.perf_counter() - started) * 1000)
            embedded += 4

    loop = asyncio.create_task(embed_loop())
    started = time.perf_counter()
    beside = await generate(engine)
    stop = True
    await loop
    elapsed = time.perf_counter() - started
    await registry.close()
    return {
        "alone": alone,
        "beside": beside,
        "embeds_per_s": embedded / elapsed,
        "embed_p50_ms": median(latencies),
    }


class NoGate(scheduler.ComputeGate):
    """Every model computes whenever it likes (what the gate prevents)."""

    @contextlib.contextmanager
    def turn(self, lane: Priority = Priority.INTERACTIVE, *, owner: object | None = None) -> Iterator[None]:
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"gate (default)": [], "no gate": []}
    for _ in range(args.runs):
        results["gate (default)"].append(asyncio.run(measure(scheduler.ComputeGate())))
        results["no gate"].append(asyncio.run(measure(NoGate())))
    lines = [
        header("Two models on two cores: generation beside an embedding loop", f"a fixed {len(TEXT)}-char SMS"),
        f"- medians of {args.runs} runs; generation {TOKENS} tokens greedy; embeddings 4 texts per call",
        "",
        "| schedule | generate alone tok/s | generate beside embeds tok/s | embeds/s meanwhile | embed p50 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        row = {key: median([r[key] for r in runs]) for key in runs[0]}
        lines.append(
            f"| {name} | {row['alone']:.1f} | {row['beside']:.1f} | {row['embeds_per_s']:.0f} | "
            f"{row['embed_p50_ms']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section("contention", text)


if __name__ == "__main__":
    main()
