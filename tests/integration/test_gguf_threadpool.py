"""The generation context's persistent ggml thread pool on the real SmolLM2-135M-Instruct (Q4_1):
its threads live as long as the model, sleep while it is idle, run a step on as many threads as the
engine asks, and change no token."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psutil
import pytest

from wafer.backends.base import LoadOptions, ModelFiles
from wafer.backends.gguf import GgufBackend
from wafer.backends.gguf.streams import StreamEngine
from wafer.backends.gguf.threadpool import ThreadPool
from wafer.domain import ChatMessage, SamplingParams
from wafer.sources import SourceResolver
from wafer.specs import ModelSpec

pytestmark = pytest.mark.integration

THREADS = 2
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
MESSAGES = (ChatMessage("user", "Write a poem about the sea."),)


def load(resolver: SourceResolver, spec: ModelSpec) -> GgufBackend:
    files = ModelFiles(weights=resolver.resolve(spec.source, model=spec.name))
    return GgufBackend.load(spec, files, LoadOptions(threads=THREADS))


def thread_ids() -> set[int]:
    return {t.id for t in psutil.Process().threads()}


def cpu_seconds(ids: set[int]) -> float:
    """CPU time the threads `ids` of this process have used."""
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


def answer(backend: GgufBackend) -> str:
    return "".join(d.text for d in backend.generate(prompt=None, messages=MESSAGES, sampling=GREEDY, cancelled=bool))


def pin_threads(engine: StreamEngine, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """Make the engine decode on `threads` threads from its next step."""
    monkeypatch.setattr(engine, "_cores", max(engine._cores, THREADS))
    monkeypatch.setattr(engine, "_outside_load", lambda: float(engine._cores - threads))
    engine._load_checked = float("-inf")
    engine.adapt_threads()
    assert engine.threads == threads


@pytest.fixture
def loaded(resolver: SourceResolver, smollm2_spec: ModelSpec) -> Iterator[tuple[GgufBackend, set[int]]]:
    """The model, and the threads its loading left behind (the pool's workers)."""
    before = thread_ids()
    backend = load(resolver, smollm2_spec)
    try:
        yield backend, thread_ids() - before
    finally:
        backend.close()


def test_the_pool_starts_with_the_model_and_its_threads_end_with_it(
    resolver: SourceResolver, smollm2_spec: ModelSpec
) -> None:
    """Per-graph threads leave nothing running between decodes; the pool keeps threads - 1 workers
    (the decoding thread is the first) from load to close, and none survive a load/unload cycle."""
    baseline = thread_ids()
    for _ in range(3):
        backend = load(resolver, smollm2_spec)
        try:
            answer(backend)
            workers = thread_ids() - baseline
            assert len(workers) == THREADS - 1, f"threads beside the baseline: {workers}"
        finally:
            backend.close()
        assert thread_ids() <= baseline, "the pool's threads outlived the model"


def test_an_idle_loaded_model_burns_no_cpu(loaded: tuple[GgufBackend, set[int]]) -> None:
    """The pool polls at level 0: its threads sleep between graphs instead of spinning (polling at
    level 50 spins ~1e7 rounds after each graph)."""
    backend, workers = loaded
    assert workers
    answer(backend)
    start = cpu_seconds(workers)
    time.sleep(0.5)
    assert cpu_seconds(workers) - start < 0.02


def test_a_step_runs_on_the_threads_the_engine_asks_for(
    loaded: tuple[GgufBackend, set[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool of the model's threads decodes on fewer when the engine follows the machine's load:
    at one thread the worker sleeps through the answer, at two it computes; the tokens are the same."""
    backend, workers = loaded
    engine = backend.streams()
    assert isinstance(engine, StreamEngine)
    answers = {}
    for threads in (1, 2):
        pin_threads(engine, monkeypatch, threads)
        start = cpu_seconds(workers)
        answers[threads] = answer(backend)
        used = cpu_seconds(workers) - start
        if threads == 1:
            assert used < 0.02, f"the pool's worker computed {used:.3f} s at one thread"
        else:
            assert used > 0.0, "the pool's worker took no part at two threads"
    assert answers[1] == answers[2]


def test_the_pool_changes_no_token(loaded: tuple[GgufBackend, set[int]]) -> None:
    """The same answer with the pool and with llama.cpp's per-graph threads."""
    backend, _ = loaded
    ctx = backend._gen
    assert ctx is not None and ctx.pool is not None
    pooled = answer(backend)
    ThreadPool.detach(ctx.ptr)
    try:
        per_graph = answer(backend)
    finally:
        ctx.pool.attach(ctx.ptr)
    assert pooled == per_graph
