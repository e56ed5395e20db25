"""int8 dynamic quantization of the fp32 paraphrase-MiniLM-L3 ONNX model: fidelity, speed, size, memory.

    .venv/bin/python -m bench.quantize [--corpus FILE.jsonl] [--texts 2000] [--quick] [--write]

Quantizes with the server's own code path (wafer.quantize.quantize_model: registered and loaded like
`wafer models quantize`), per channel (the default) and per tensor, then embeds the same texts with
the fp32 model and each int8 one through the in-process engine. Fidelity is the cosine between the
fp32 and int8 vector of each text. --quick: 200 texts.

    .venv/bin/python -m bench.quantize --static [--texts 2000] [--write]

measures instead the static (QDQ) int8 MiniLM of `wafer models quantize --static` against the
default (the shipped file: int8 weights, fp32 products), the dynamic int8 of the same fp32 graph,
and that fp32 graph itself (the shipped weights folded, the reference): texts/s (batches of 32,
one instance, best of two alternating rounds, load average printed), cosine per text against fp32
(median, p1, min), and the Spearman rank correlation of pair similarities against fp32's on an
STS-style pair set built here from the corpus (each text with a light edit of itself, a heavy edit,
and an unrelated text). The catalog would offer the static variant only at a median cosine of
0.999 and a minimum of 0.99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from pathlib import Path

import numpy as np

from bench.common import header, in_process_engine, load_corpus, median, percentile, write_section
from wafer.domain import EmbedRequest
from wafer.engine import InferenceEngine
from wafer.quantize import _folded, quantize_model, quantized_path
from wafer.specs import LoadPolicy, ModelSpec

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


def sts_pairs(texts: list[str], count: int) -> tuple[list[str], list[str]]:
    """Pairs of graded similarity: a text and a light edit (one word dropped), a heavy edit (half
    its words replaced by another text's), an unrelated text."""
    rng = random.Random(7)
    usable = [text for text in texts if len(text.split()) >= 6][:count]
    left: list[str] = []
    right: list[str] = []
    for text in usable:
        words = text.split()
        other = rng.choice(usable).split()
        light = words[: (drop := rng.randrange(len(words)))] + words[drop + 1 :]
        half = len(words) // 2
        heavy = words[:half] + other[: len(words) - half]
        for partner in (" ".join(light), " ".join(heavy), rng.choice(usable)):
            left.append(text)
            right.append(partner)
    return left, right


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


async def run_static(texts: list[str]) -> str:
    engine = in_process_engine()
    registry = engine.registry
    base = registry.spec("minilm")
    shipped = registry.resolver.resolve(base.source, model="minilm")
    folded = quantized_path(registry.resolver.cache_dir, "minilm-fp32")
    folded.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(_folded, shipped, folded)

    def variant(name: str, source: str, description: str) -> ModelSpec:
        update = {"name": name, "source": source, "description": description, "instances": 1}
        return base.model_copy(update={**update, "load": LoadPolicy.ON_DEMAND})

    await registry.load("minilm-fp32", spec=variant("minilm-fp32", str(folded), "shipped weights folded to fp32"))
    await registry.load("minilm-default", spec=variant("minilm-default", base.source, "the default"))
    started = time.perf_counter()
    await quantize_model(registry, "minilm-fp32", "minilm-dynamic", per_channel=True)
    dynamic_seconds = time.perf_counter() - started
    started = time.perf_counter()
    await quantize_model(registry, "minilm", "minilm-static", per_channel=True, static=True)
    static_seconds = time.perf_counter() - started
    names = ["minilm-fp32", "minilm-default", "minilm-dynamic", "minilm-static"]
    left, right = sts_pairs(texts, 300)
    load = [", ".join(f"{x:.2f}" for x in os.getloadavg())]
    speeds: dict[str, float] = dict.fromkeys(names, 0.0)
    vectors: dict[str, np.ndarray] = {}
    for _ in range(2):  # alternating rounds: the machine's load falls on every model alike
        for name in names:
            await embed_all(engine, name, texts[:64])
            vectors[name], speed = await embed_all(engine, name, texts)
            speeds[name] = max(speeds[name], speed)
    load.append(", ".join(f"{x:.2f}" for x in os.getloadavg()))
    pair_cosines = {}
    for name in names:
        a, _ = await embed_all(engine, name, left)
        b, _ = await embed_all(engine, name, right)
        pair_cosines[name] = np.sum(a * b, axis=1)
    await registry.close()
    reference = vectors["minilm-fp32"]
    rows = []
    labels = {
        "minilm-fp32": "fp32 (shipped weights folded; the reference)",
        "minilm-default": "default: shipped file (int8 weights, fp32 products)",
        "minilm-dynamic": f"dynamic int8 per channel (quantized in {dynamic_seconds:.0f} s)",
        "minilm-static": f"static QDQ int8 per channel, `--static` (quantized in {static_seconds:.0f} s)",
    }
    verdict = {}
    for name in names:
        cosines = np.sum(vectors[name] * reference, axis=1).tolist()
        rho = spearman(pair_cosines[name], pair_cosines["minilm-fp32"])
        verdict[name] = (median(cosines), min(cosines))
        rows.append(
            f"| {labels[name]} | {speeds[name]:.0f} | {speeds[name] / speeds['minilm-default']:.2f} | "
            f"{median(cosines):.4f} | {percentile(cosines, 1):.4f} | {min(cosines):.4f} | {rho:.4f} |"
        )
    static_median, static_min = verdict["minilm-static"]
    offered = static_median >= 0.999 and static_min >= 0.99
    return "\n".join(
        [
            f"- {len(texts)} texts, batches of {BATCH}, one call at a time, one instance (2 threads), in-process "
            "engine; texts/s: the better of two alternating rounds",
            f"- STS-style pairs: {len(left)} (each text with a light edit, a heavy edit and an unrelated text); "
            "Spearman of each model's pair cosines against fp32's",
            f"- load average (1, 5, 15 min): {load[0]} before, {load[1]} after",
            "",
            "| model | texts/s | x default | median cosine | p1 cosine | min cosine | Spearman vs fp32 |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"- static int8: median cosine {static_median:.4f}, min {static_min:.4f} against the bar of 0.999 and "
            f"0.99: {'offered as a catalog variant' if offered else 'not offered; the default stays'}.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="JSONL with a `text` field; default: the SMS data")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 texts: a smoke run")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument("--static", action="store_true", help="static int8 MiniLM instead (see above)")
    args = parser.parse_args()
    texts, corpus = load_corpus(args.corpus)
    texts = texts[: 200 if args.quick else args.texts]
    if args.static:
        body = asyncio.run(run_static(texts))
        text = header("Static int8 (QDQ) MiniLM against the default and fp32", f"{corpus}, first {len(texts)}")
        print(text + "\n" + body)
        if args.write:
            write_section("static_int8", text + "\n" + body)
        return
    body = asyncio.run(run(texts))
    text = header("int8 quantization of paraphrase-MiniLM-L3 (ONNX)", f"{corpus}, first {len(texts)}") + "\n" + body
    print(text)
    if args.write:
        write_section("quantize", text)


if __name__ == "__main__":
    main()
