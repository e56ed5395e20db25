"""cde-small-v1 (the cde backend): context build time, per-text throughput with a context against the
same backbone without one, load time and the memory a context holds.

    .venv/bin/python -m bench.cde [--corpus FILE.jsonl] [--texts 64] [--quick] [--write]

Runs on random weights in the real file layout (no machine here reaches the Hub), at two sizes: the
tests' tiny model (32-d, 2 layers) and cde-small-v1's real shape (768-d, 12 layers, 281M parameters,
1.1 GB of safetensors). Speed does not depend on the weights' values. In-process, on the backend
(`CdeBackend`) the server runs: the context is stage 1 on 512 corpus documents ("search_document: "
prefixed); "with context" is stage 2 (520 context positions before every text); "without" is stage 1
on the same texts, i.e. the same backbone size with no context. --quick: 16 texts, tiny model only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import MappingProxyType

import psutil

from bench.common import header, load_corpus, write_section
from tests.fakes.tiny_cde import CdeFiles, write_tiny_cde
from wafer.backends.base import LoadOptions, ModelFiles
from wafer.backends.cde import CdeBackend
from wafer.contexts import ContextStore, sample_corpus
from wafer.domain import Context
from wafer.specs import ModelSpec, Task

BATCH = 16
MIB = 2**20
TABLE_HEAD = (
    "| model | weights | load | context build (512 docs) | texts/s with context | texts/s without | ratio "
    "| a context | RSS growth in stage-2 calls |\n|---|---|---|---|---|---|---|---|---|\n"
)


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _load(files: CdeFiles, dimensions: int, threads: int) -> CdeBackend:
    spec = ModelSpec(
        name="cde-small-v1",
        backend="cde",
        source=str(files.weights),
        tokenizer=str(files.tokenizer),
        files={"config": str(files.config), "backbone_config": str(files.backbone_config)},
        tasks=[Task.EMBED],
        dimensions=dimensions,
        document_prompt="search_document: ",
    )
    model_files = ModelFiles(
        weights=files.weights,
        tokenizer=files.tokenizer,
        extra=MappingProxyType({"config": files.config, "backbone_config": files.backbone_config}),
    )
    return CdeBackend.load(spec, model_files, LoadOptions(threads=threads))


def _rate(backend: CdeBackend, texts: list[str], context: Context | None) -> float:
    started = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        backend.embed(texts[i : i + BATCH], truncate=True, context=context)
    return len(texts) / (time.perf_counter() - started)


def measure(size: str, corpus: list[str], texts: list[str], threads: int) -> list[str]:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        files = write_tiny_cde(Path(folder), size=size)
        written = time.perf_counter() - started
        weights_mb = files.weights.stat().st_size / MIB
        before = _rss()
        started = time.perf_counter()
        backend = _load(files, 768 if size == "real" else 32, threads)
        load_seconds = time.perf_counter() - started
        load_mib = (_rss() - before) / MIB
        sample = ["search_document: " + t for t in sample_corpus(corpus, backend.context_size)]
        started = time.perf_counter()
        context = Context.of(backend.build_context(sample))
        build_seconds = time.perf_counter() - started
        prompted = ["search_document: " + t for t in texts]
        _rate(backend, prompted[:BATCH], context)  # warm-up: onnxruntime sizes its arena
        _rate(backend, prompted[:BATCH], None)
        before = _rss()
        with_context = _rate(backend, prompted, context)
        stage2_mib = max(0, _rss() - before) / MIB
        without = _rate(backend, prompted, None)
        store = ContextStore(Path(folder) / "contexts")
        store.put("bench", "cde-small-v1", context)
        on_disk_kib = (Path(folder) / "contexts" / "bench.npz").stat().st_size / 1024
        held_kib = (context.vectors.nbytes + (backend.context_size + 8) * context.vectors.shape[1] * 4) / 1024
        backend.close()
    label = "tiny (32-d, 2 layers)" if size == "tiny" else "real shape (768-d, 12 layers)"
    return [
        f"| {label} | {weights_mb:.0f} MiB (written in {written:.1f} s) | {load_seconds:.2f} s, +{load_mib:.0f} MiB | "
        f"{build_seconds:.2f} s ({len(sample) / build_seconds:.0f} docs/s) | {with_context:.1f} | {without:.1f} | "
        f"{with_context / without:.3f} | {held_kib:.0f} KiB in memory, {on_disk_kib:.0f} KiB on disk | "
        f"+{stage2_mib:.0f} MiB |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="JSONL with a `text` field; default: the SMS data")
    parser.add_argument("--texts", type=int, default=64, help="texts embedded with and without a context")
    parser.add_argument("--real-texts", type=int, default=32, help="the same at the real size (slow: ~1 s a text)")
    parser.add_argument("--quick", action="store_true", help="16 texts, tiny model only: a smoke run")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    corpus, described = load_corpus(args.corpus)
    threads = os.cpu_count() or 1
    texts = corpus[: 16 if args.quick else args.texts]
    rows = measure("tiny", corpus, texts, threads)
    if not args.quick:
        rows += measure("real", corpus, corpus[: args.real_texts], threads)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    body = (
        f"""
- threads: {threads}; load average (1, 5, 15 min) at the end: {load}
- texts/s are per text, in calls of {BATCH}; "with context" is stage 2 (every text read after the 520
  context positions: 512 dataset embeddings and 8 soft tokens); "without" is stage 1 on the same texts
  (the same backbone, no context), which is also what Embed returns without a context.
- the context: stage 1 on {BATCH * 32} sampled corpus documents; "held" counts its matrix and the 520
  prefix rows the backend keeps for the last context used.

"""
        + TABLE_HEAD
        + "\n".join(rows)
    )
    text = header("cde-small-v1: contexts (cde backend)", described) + body + "\n"
    print(text)
    if args.write:
        write_section("cde", text)


if __name__ == "__main__":
    main()
