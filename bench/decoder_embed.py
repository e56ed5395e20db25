"""Decoder-embedding throughput: Wafer's GGUF backend against raw llama.cpp, same file, same run.

    .venv/bin/python -m bench.decoder_embed [--corpus FILE.jsonl] [--texts 1000] [--big-texts 32]
                                            [--no-big] [--write]

Two random-weight Qwen2 models, run as models.yaml runs gte-Qwen2-1.5B-instruct (bidirectional
attention, `<|endoftext|>` appended, last-token pooling):

- tiny: the tests' model (tests/fakes/tiny_qwen2.py: 64-d, 2 layers, F32);
- real size: gte-Qwen2-1.5B-instruct's shape (1536-d, 28 layers, 12 query / 2 key-value heads, FFN
  8960, vocabulary 151,646) in Q8_0, about 1.7 GB, written once into the temporary folder and reused.

Both tokenize bytes (the tests' vocabulary: every byte a token), so a text has about 3-4 times the
tokens the real Qwen2 tokenizer gives it: tokens/s is the comparable figure, texts/s is per this
tokenizer.

- Wafer: `InferenceEngine.embed` in this process (registry, scheduler, GgufBackend), 32 texts per
  call (the scheduler's default max_batch_size), one call at a time.
- Raw llama.cpp: llama-cpp-python's low-level API with the same context (embeddings, last-token
  pooling, non-causal attention, one decode per window of packed texts, 64 sequences per decode,
  same threads), tokenizing and appending `<|endoftext|>` itself: what a hand-written client does.
  `Llama.embed` is not used: it loads weights with llama.cpp's extra buffer types, which die with
  SIGILL on these VMs (server/wafer/backends/gguf/).

Rounds alternate raw, Wafer, raw, ... on the same texts; the ratio is Wafer against the mean of the
raw rounds around it. The load average is printed: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from bench.common import ROOT, header, load_corpus, median, write_section
from tests.fakes.tiny_qwen2 import TinyQwen2, write_tiny_qwen2
from wafer.app import engine_limits
from wafer.backends.gguf import GgufBackend
from wafer.config import Settings
from wafer.domain import EmbedRequest
from wafer.engine import InferenceEngine
from wafer.registry import ModelRegistry
from wafer.sources import SourceResolver
from wafer.specs import Catalog, ModelSpec

BATCH = 32
SEQUENCES = 64
WINDOW = 512
BIG = TinyQwen2(
    n_embd=1536, n_layer=28, n_head=12, n_head_kv=2, n_ff=8960, n_ctx=32768, n_vocab=151_646,
    weight_type="Q8_0", scale=0.02, add_eos=False, seed=0,
)  # fmt: skip
TINY = TinyQwen2(add_eos=False)
BENCH_DIR = Path(tempfile.gettempdir()) / "wafer-bench"


@dataclass
class Round:
    seconds: float
    tokens: int


class RawLlama:
    """llama.cpp's embedding API driven directly, as gte-Qwen2 is served."""

    def __init__(self, path: Path, *, threads: int) -> None:
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = False
        self.model: Any = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        assert self.model, path
        self.vocab: Any = llama_cpp.llama_model_get_vocab(self.model)
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.model))
        self.eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_LAST
        params.attention_type = llama_cpp.LLAMA_ATTENTION_TYPE_NON_CAUSAL
        params.n_ctx = params.n_batch = params.n_ubatch = WINDOW
        params.n_seq_max = SEQUENCES
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        self.ctx: Any = llama_cpp.llama_init_from_model(self.model, params)
        assert self.ctx
        self.memory: Any = llama_cpp.llama_get_memory(self.ctx)
        self.batch: Any = llama_cpp.llama_batch_init(WINDOW, 0, SEQUENCES)

    def tokens(self, text: str) -> list[int]:
        data = text.encode()
        buffer = (llama_cpp.llama_token * (len(data) + 8))()
        n = int(llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), True, False))
        tokens = [int(t) for t in buffer[:n]][: WINDOW - 1]
        return tokens if tokens and tokens[-1] == self.eos else [*tokens, self.eos]

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        inputs = [self.tokens(t) for t in texts]
        out = np.zeros((len(texts), self.n_embd), dtype=np.float32)
        group: list[int] = []
        used = 0
        for i, tokens in enumerate(inputs):
            if group and (used + len(tokens) > WINDOW or len(group) == SEQUENCES):
                self._decode(inputs, group, out)
                group, used = [], 0
            group.append(i)
            used += len(tokens)
        if group:
            self._decode(inputs, group, out)
        return out, sum(len(t) for t in inputs)

    def _decode(self, inputs: list[list[int]], rows: list[int], out: np.ndarray) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)
        batch = self.batch
        n = 0
        for seq, row in enumerate(rows):
            for pos, token in enumerate(inputs[row]):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, True
                batch.seq_id[n][0] = seq
                n += 1
        batch.n_tokens = n
        assert llama_cpp.llama_decode(self.ctx, batch) == 0
        for seq, row in enumerate(rows):
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, seq)
            out[row] = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (self.n_embd,))

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def model_file(config: TinyQwen2, name: str) -> Path:
    path = BENCH_DIR / f"{name}.gguf"
    if not path.exists():
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        partial = path.with_suffix(".partial")
        write_tiny_qwen2(partial, config)
        partial.replace(path)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s")
    return path


def wafer_engine(path: Path, config: TinyQwen2, threads: int) -> tuple[InferenceEngine, str]:
    """The repository's gte-Qwen2 entry, pointed at `path` and sized for it."""
    entry = Catalog.from_yaml(ROOT / "models.yaml").models["gte-qwen2-1.5b-instruct"]
    fields = entry.model_dump(exclude_unset=True)
    fields.update(source=str(path), dimensions=config.n_embd, max_tokens=WINDOW, threads=threads)
    spec = ModelSpec.model_validate(fields)
    settings = Settings(data_dir=Path(tempfile.mkdtemp()))
    catalog = Catalog(models={spec.name: spec}, base_dir=path.parent)
    registry = ModelRegistry(
        catalog,
        SourceResolver(catalog.base_dir, settings.hub_cache_dir),
        {"gguf": GgufBackend},
        threads=threads,
        drain_timeout_seconds=30,
    )
    return InferenceEngine(registry, engine_limits(settings)), spec.name


async def wafer_round(engine: InferenceEngine, name: str, texts: list[str]) -> tuple[Round, np.ndarray]:
    rows = []
    tokens = 0
    started = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        result = await engine.embed(EmbedRequest(inputs=texts[i : i + BATCH], model=name, normalize=False))
        rows.append(result.vectors)
        tokens += result.usage.prompt_tokens
    return Round(time.perf_counter() - started, tokens), np.concatenate(rows)


def raw_round(raw: RawLlama, texts: list[str]) -> tuple[Round, np.ndarray]:
    started = time.perf_counter()
    vectors = []
    tokens = 0
    for i in range(0, len(texts), BATCH):
        part, count = raw.embed(texts[i : i + BATCH])
        vectors.append(part)
        tokens += count
    return Round(time.perf_counter() - started, tokens), np.concatenate(vectors)


async def compare(label: str, path: Path, config: TinyQwen2, texts: list[str], *, rounds: int, threads: int) -> str:
    size_mb = path.stat().st_size / 1e6  # noqa: ASYNC240 - one stat of a local file
    engine, name = wafer_engine(path, config, threads)
    await engine.registry.load(name)
    raw = RawLlama(path, threads=threads)
    try:
        raw_round(raw, texts[:BATCH])  # warm-up, both
        await wafer_round(engine, name, texts[:BATCH])
        raws: list[Round] = []
        wafers: list[Round] = []
        raw_vectors = wafer_vectors = np.zeros(0)
        first, raw_vectors = raw_round(raw, texts)
        raws.append(first)
        for _ in range(rounds):
            measured, wafer_vectors = await wafer_round(engine, name, texts)
            wafers.append(measured)
            measured, raw_vectors = raw_round(raw, texts)
            raws.append(measured)
    finally:
        raw.close()
        await engine.registry.close()
    agreement = float(np.min(np.sum(_unit_rows(raw_vectors) * _unit_rows(wafer_vectors), axis=1)))
    raw_tps = median([r.tokens / r.seconds for r in raws])
    wafer_tps = median([w.tokens / w.seconds for w in wafers])
    raw_texts = median([len(texts) / r.seconds for r in raws])
    wafer_texts = median([len(texts) / w.seconds for w in wafers])
    tokens = raws[0].tokens
    line = (
        f"| {label} | {size_mb:,.1f} | {len(texts)} | {tokens / len(texts):.0f} | "
        f"{raw_texts:.3g} | {raw_tps:,.3g} | {wafer_texts:.3g} | {wafer_tps:,.3g} | {wafer_tps / raw_tps:.2f} | "
        f"{agreement:.5f} | {os.getloadavg()[0]:.1f} |"
    )
    print(line, flush=True)
    return line


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    unit: np.ndarray = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return unit


async def run(args: argparse.Namespace) -> str:
    texts, corpus = load_corpus(args.corpus)
    threads = os.cpu_count() or 1
    lines = [f"load average at start: {os.getloadavg()[0]:.1f}"]
    rows = [
        await compare(
            "tiny (64-d, 2 layers, F32)",
            model_file(TINY, "tiny-qwen2"),
            TINY,
            texts[: args.texts],
            rounds=3,
            threads=threads,
        )
    ]
    if not args.no_big:
        path = model_file(BIG, "gte-qwen2-1.5b-shape-q8_0")
        rows.append(
            await compare("gte-Qwen2-1.5B shape, Q8_0", path, BIG, texts[: args.big_texts], rounds=1, threads=threads)
        )
    return "\n".join(
        [
            header("Decoder embeddings: Wafer against raw llama.cpp", corpus),
            f"- {lines[0]}; threads: {threads}; texts as documents (no prompt), {BATCH} per call, one call "
            "at a time; gte-Qwen2's entry: bidirectional, `<|endoftext|>` appended, last-token pooling",
            "- tokens are byte-level (the test vocabulary), about 3-4x what Qwen2's tokenizer gives the same "
            "text: compare tokens/s; agreement = lowest cosine between Wafer's and raw llama.cpp's vector "
            "of a text",
            "",
            "| model | file MB | texts | tokens/text | raw texts/s | raw tokens/s | Wafer texts/s | Wafer tokens/s "
            "| Wafer / raw | agreement | load avg at end |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=None, help="JSONL with a `text` field per line")
    parser.add_argument("--texts", type=int, default=1000, help="texts for the tiny model")
    parser.add_argument("--big-texts", type=int, default=32, help="texts for the real-size model")
    parser.add_argument("--no-big", action="store_true", help="skip the real-size model (1.7 GB file)")
    parser.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
    args = parser.parse_args()
    body = asyncio.run(run(args))
    print(body)
    if args.write:
        write_section("decoder-embed", body)


if __name__ == "__main__":
    main()
