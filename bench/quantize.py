"""int8 dynamic quantization of the fp32 paraphrase-MiniLM-L3 ONNX model: fidelity, speed, size, memory.

    .venv/bin/python -m bench.quantize [--corpus FILE.jsonl] [--texts 2000] [--quick] [--write]

Quantizes with the server's own code path (wafer.quantize.quantize_model: registered and loaded like
`wafer models quantize`), per channel (the default) and per tensor, then embeds the same texts with
the fp32 model and each int8 one through the in-process engine. Fidelity is the cosine between the
fp32 and int8 vector of each text. --quick: 200 texts.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from bench.common import header, in_process_engine, load_corpus, median, percentile, write_section
from wafer.domain import EmbedRequest
from wafer.engine import InferenceEngine
from wafer.quantize import quantize_model

SOURCE = "paraphrase-minilm-l3"
BATCH = 32
MB = 1e6


async def embed_all(engine: InferenceEngine, model: str, texts: list[str]) -> tuple[np.ndarray, float]:
    """Unit vectors of every text, and texts per second (batches of 32, one call at a time)."""
    rows = []
    started = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        result = await engine.embed(EmbedRequest(inputs=texts[i : i + BATCH], model=model, truncate=True))
        rows.append(np.asarray(result.vectors, dtype=np.float64))
    elapsed = time.perf_counter() - started
    matrix = np.concatenate(rows)
    unit: np.ndarray = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return unit, len(texts) / elapsed


async def run(texts: list[str]) -> str:
    engine = in_process_engine()
    registry = engine.registry
    fp32_file = registry.resolver.resolve(registry.spec(SOURCE).source, model=SOURCE)
    fp32_status = await registry.load(SOURCE)
    await embed_all(engine, SOURCE, texts[:64])  # warm-up
    reference, fp32_speed = await embed_all(engine, SOURCE, texts)
    rows = [
        f"| fp32 (original) | {fp32_file.stat().st_size / MB:.1f} | {fp32_status.memory_bytes / MB:.0f} | "
        f"{fp32_speed:.0f} | 1.00 | | | | |"
    ]
    await registry.unload(SOURCE)
    for label, per_channel in (("int8 per channel (default)", True), ("int8 per tensor", False)):
        name = f"{SOURCE}-int8-{'channel' if per_channel else 'tensor'}"
        started = time.perf_counter()
        status = await quantize_model(registry, SOURCE, name, per_channel=per_channel)
        quantize_seconds = time.perf_counter() - started
        await embed_all(engine, name, texts[:64])
        vectors, speed = await embed_all(engine, name, texts)
        cosines = np.sum(vectors * reference, axis=1)
        size = registry.resolver.resolve(status.spec.source, model=name).stat().st_size
        rows.append(
            f"| {label} | {size / MB:.1f} | {status.memory_bytes / MB:.0f} | {speed:.0f} | {speed / fp32_speed:.2f} | "
            f"{cosines.min():.4f} | {percentile(cosines.tolist(), 1):.4f} | {median(cosines.tolist()):.4f} | "
            f"{quantize_seconds:.1f} |"
        )
        await registry.unload(name)
    await registry.close()
    return "\n".join(
        [
            f"- {len(texts)} texts, batches of {BATCH}, one call at a time, in-process engine; memory = RSS "
            "growth the registry measured over the load and its warm-up call",
            "",
            "| model | file MB | memory MB | texts/s | speed vs fp32 | min cosine | p1 cosine | median cosine "
            "| quantize s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="JSONL with a `text` field; default: the SMS data")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 texts: a smoke run")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    texts, corpus = load_corpus(args.corpus)
    texts = texts[: 200 if args.quick else args.texts]
    body = asyncio.run(run(texts))
    text = header("int8 quantization of paraphrase-MiniLM-L3 (ONNX)", f"{corpus}, first {len(texts)}") + "\n" + body
    print(text)
    if args.write:
        write_section("quantize", text)


if __name__ == "__main__":
    main()
