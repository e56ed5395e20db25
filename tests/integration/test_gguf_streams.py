"""Continuous batching on the real SmolLM2-135M-Instruct (Q4_1): several streams decoded together
give each caller exactly what it gets alone, free their cells when they end, and stop mid-decode."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import llama_cpp
import numpy as np
import pytest

from wafer.backends.base import ComputeInterrupted, LoadOptions, ModelFiles
from wafer.backends.gguf import GgufBackend
from wafer.backends.gguf.streams import MIN_CACHED_PREFIX, MIN_COPIED_PREFIX, PREFILL_CHUNK, Stream, StreamEngine
from wafer.domain import ChatMessage, GenerationDelta, Priority, SamplingParams
from wafer.errors import InvalidArgumentError
from wafer.metrics import Metrics
from wafer.scheduler import ComputeGate, ModelScheduler
from wafer.scheduler import model as model_scheduler
from wafer.sources import SourceResolver
from wafer.specs import ModelSpec

pytestmark = pytest.mark.integration

QUESTIONS = (
    "Tell me a story about a dragon.",
    "What is the capital of France? Explain its history.",
    "Write a poem about the sea.",
    "List ten fruits and describe each one.",
)
LONG_CONTEXT = " ".join(f"Note {i}: the train to the coast leaves at {i % 12 + 1} o'clock." for i in range(60))


@pytest.fixture(scope="module")
def backend(resolver: SourceResolver, smollm2_spec: ModelSpec) -> Iterator[GgufBackend]:
    files = ModelFiles(weights=resolver.resolve(smollm2_spec.source, model=smollm2_spec.name))
    # Two threads, and the engine follows the machine's load: a test's runs may decode at different
    # thread counts, which must not change a token (flash attention is off: see gguf.context.generation_params).
    loaded = GgufBackend.load(smollm2_spec, files, LoadOptions(threads=2))
    yield loaded
    loaded.close()


def pin_threads(engine: StreamEngine, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """Make the engine decode on `threads` threads from its next step: other processes that leave
    that many cores free."""
    monkeypatch.setattr(engine, "_outside_load", lambda: float(engine._cores - threads))
    engine._load_checked = float("-inf")  # adapt at the next step, not up to a second later
    engine.adapt_threads()
    assert engine.threads == threads


def engine_of(backend: GgufBackend) -> StreamEngine:
    streams = backend.streams()
    assert isinstance(streams, StreamEngine)
    return streams


def run_counting_reads(
    engine: StreamEngine,
    streams: tuple[Stream, ...],
    reader: Stream,
    out: dict[int, list[GenerationDelta]],
    monkeypatch: pytest.MonkeyPatch,
) -> int:
    """Step `engine` until every one of `streams` is closed, its deltas into `out`; the prompt
    tokens `reader` read in those steps (a copied prefix counts as none)."""
    read = 0
    prefill = engine._prefill

    def counting_prefill(chunks: list[tuple[Stream, int]]) -> list[tuple[object, GenerationDelta]]:
        nonlocal read
        read += sum(end - stream.prefilled for stream, end in chunks if stream is reader)
        return prefill(chunks)

    monkeypatch.setattr(engine, "_prefill", counting_prefill)
    while not all(stream.closed for stream in streams):
        for handle, delta in engine.step():
            out[id(handle)].append(delta)
    return read


def chat(question: str) -> tuple[ChatMessage, ...]:
    return (ChatMessage("user", question),)


def samplings() -> list[SamplingParams]:
    greedy = SamplingParams(max_tokens=40, temperature=0.0)
    seeded = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, top_k=40, seed=7)
    return [greedy, seeded, greedy, seeded]


def alone(backend: GgufBackend, messages: tuple[ChatMessage, ...], sampling: SamplingParams) -> list[GenerationDelta]:
    return list(backend.generate(prompt=None, messages=messages, sampling=sampling, cancelled=lambda: False))


def together(
    engine: StreamEngine, requests: list[tuple[tuple[ChatMessage, ...], SamplingParams]], joins: list[int]
) -> list[list[GenerationDelta]]:
    """Run the requests as streams of one engine; request i joins at step joins[i]."""
    streams = [engine.open(prompt=None, messages=m, sampling=s) for m, s in requests]
    out: dict[int, list[GenerationDelta]] = {id(s): [] for s in streams}
    step = 0
    while any(not s.closed for s in streams):
        for stream, join in zip(streams, joins, strict=True):
            if join == step:
                assert engine.admit(stream)
        for handle, delta in engine.step():
            out[id(handle)].append(delta)
        step += 1
    return [out[id(s)] for s in streams]


def texts(runs: list[list[GenerationDelta]]) -> list[str]:
    return ["".join(d.text for d in run) + f"|{run[-1].finish_reason}" for run in runs]


def assert_free(engine: StreamEngine, backend: GgufBackend) -> None:
    """No stream runs, and the sequences hold nothing but their cached prompt prefixes."""
    assert engine.active == 0
    memory = llama_cpp.llama_get_memory(backend._gen.ptr)  # type: ignore[union-attr]
    for seq in range(engine.slots + 1):
        held = llama_cpp.llama_memory_seq_pos_max(memory, seq) + 1
        assert held == engine.cached_prefix(seq), f"sequence {seq} holds {held} cells"


# -- the same tokens together as alone -------------------------------------------------------------


def test_four_streams_together_produce_what_each_produces_alone(backend: GgufBackend) -> None:
    engine = engine_of(backend)
    requests = list(zip([chat(q) for q in QUESTIONS], samplings(), strict=True))
    expected = texts([alone(backend, m, s) for m, s in requests])
    assert len(set(expected)) == 4

    assert texts(together(engine, requests, joins=[0, 0, 0, 0])) == expected
    # Joining while the others generate: each prompt is prefilled between their tokens.
    assert texts(together(engine, requests, joins=[0, 3, 4, 11])) == expected
    assert_free(engine, backend)


def test_streams_that_join_together_read_their_prompts_in_one_step(backend: GgufBackend) -> None:
    """The fourth of four callers who arrive at once waits for one prefill, not for four."""
    engine = engine_of(backend)
    sampling = SamplingParams(max_tokens=4, temperature=0.0)
    streams = [engine.open(prompt=None, messages=chat(q + " Briefly."), sampling=sampling) for q in QUESTIONS]
    for stream in streams:
        assert engine.admit(stream)
    engine.step()
    assert all(isinstance(s, Stream) and s.prefilled == len(s.tokens) and s.generated == 1 for s in streams)
    for stream in streams:
        engine.close(stream)
    assert_free(engine, backend)


def test_prompts_of_nearly_equal_length_are_padded_into_one_pass_with_the_same_tokens(
    backend: GgufBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp reads a step's chunks in micro-batches of equal length per sequence: prompts a few
    tokens apart are padded to the longest (one pass over the weights), the padding's cells dropped
    after the step, and every stream's tokens are those it gets alone."""
    engine = engine_of(backend)
    questions = ("Name a fruit.", "Name two fruits.", "Name three red fruits.", "Name a fruit, please.")
    requests = [(chat(q), s) for q, s in zip(questions, samplings(), strict=True)]
    expected = texts([alone(backend, m, s) for m, s in requests])
    padding_of = engine._padding
    chunk_lengths: list[list[int]] = []
    paddings: list[list[int]] = []

    def recording(chunks: list[tuple[Stream, int]]) -> list[int]:
        chunk_lengths.append([end - stream.prefilled for stream, end in chunks])
        paddings.append(padding_of(chunks))
        return paddings[-1]

    monkeypatch.setattr(engine, "_padding", recording)
    streams = [engine.open(prompt=None, messages=m, sampling=s) for m, s in requests]
    for stream in streams:
        assert engine.admit(stream)
    out: dict[int, list[GenerationDelta]] = {id(stream): [] for stream in streams}
    for handle, delta in engine.step():
        out[id(handle)].append(delta)
    (lengths,) = chunk_lengths
    assert len(set(lengths)) > 1
    assert sorted(stream.seq for stream in streams) == list(range(4))  # one run of consecutive ids
    assert paddings == [[max(lengths) - length for length in lengths]]
    memory = llama_cpp.llama_get_memory(backend._gen.ptr)  # type: ignore[union-attr]
    for stream in streams:  # the prompt's cells, not the padding's
        assert llama_cpp.llama_memory_seq_pos_max(memory, stream.seq) == len(stream.tokens) - 1
    while not all(stream.closed for stream in streams):
        for handle, delta in engine.step():
            out[id(handle)].append(delta)
    assert texts([out[id(stream)] for stream in streams]) == expected
    assert_free(engine, backend)


def test_short_prompts_arriving_one_after_another_are_read_back_to_back(backend: GgufBackend) -> None:
    """The second of two callers waits for the first's prompt, not for its second token too; a long
    prompt still takes turns with the tokens (at most PREFILL_CHUNK prompt tokens between two)."""
    engine = engine_of(backend)
    sampling = SamplingParams(max_tokens=40, temperature=0.0)
    first, second = (
        engine.open(prompt=None, messages=chat(q + " In a word."), sampling=sampling) for q in QUESTIONS[:2]
    )
    assert isinstance(first, Stream) and isinstance(second, Stream)
    assert engine.admit(first)
    engine.step()
    assert first.generated == 1
    assert engine.admit(second)
    engine.step()
    assert second.prefilled == len(second.tokens) and second.generated == 1
    assert first.generated == 1, "the second prompt waited for the first stream's next token"
    engine.step()
    assert first.generated == second.generated == 2

    # A system prompt of its own: nothing of it is cached, all of it is read.
    messages = (ChatMessage("system", "Read in turns."), ChatMessage("user", LONG_CONTEXT))
    long = engine.open(prompt=None, messages=messages, sampling=sampling)
    assert isinstance(long, Stream) and len(long.tokens) > 2 * PREFILL_CHUNK
    assert engine.admit(long) and long.cached == 0
    read = 0
    while long.prefilled < len(long.tokens):
        before, tokens = long.prefilled, first.generated
        engine.step()
        read = 0 if first.generated > tokens else read + long.prefilled - before
        assert read <= PREFILL_CHUNK, "the generating streams waited for more than a chunk"
    for stream in (first, second, long):
        engine.close(stream)
    assert_free(engine, backend)


def test_a_long_prompt_prefilled_in_chunks_beside_running_streams(backend: GgufBackend) -> None:
    engine = engine_of(backend)
    long = (chat(LONG_CONTEXT + "\nWhen does the train leave?"), SamplingParams(max_tokens=16, temperature=0.0))
    requests = [long, *zip([chat(q) for q in QUESTIONS[:3]], samplings()[:3], strict=True)]
    prompt = engine.open(prompt=None, messages=long[0], sampling=long[1])
    assert isinstance(prompt, Stream)
    assert len(prompt.tokens) > 2 * PREFILL_CHUNK
    engine.close(prompt)
    expected = texts([alone(backend, m, s) for m, s in requests])
    assert texts(together(engine, requests, joins=[2, 0, 0, 1])) == expected
    assert_free(engine, backend)


def test_the_thread_count_changes_no_token(backend: GgufBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine changes its thread count with the machine's load, between two steps of a stream.
    A prompt of more than 512 tokens: with flash attention, llama.cpp's CPU kernel splits a lone
    stream's keys over the threads from 512 cells on, and the greedy tokens changed."""
    engine = engine_of(backend)
    # llama.cpp runs two threads on one core too (slower): the test holds on any machine.
    monkeypatch.setattr(engine, "_cores", max(engine._cores, 2))
    messages = chat(LONG_CONTEXT + "\nWhich trains leave at noon?")
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    runs = []
    for threads in (1, 2):
        pin_threads(engine, monkeypatch, threads)
        runs.append(texts([alone(backend, messages, greedy)]))
    assert runs[0] == runs[1]
    pin_threads(engine, monkeypatch, 1)
    expected = texts([alone(backend, m, s) for m, s in zip([chat(q) for q in QUESTIONS], samplings(), strict=True)])
    pin_threads(engine, monkeypatch, 2)
    requests = list(zip([chat(q) for q in QUESTIONS], samplings(), strict=True))
    assert texts(together(engine, requests, joins=[0, 1, 2, 3])) == expected


def test_usage_and_finish_reasons_match_a_lone_stream(backend: GgufBackend) -> None:
    engine = engine_of(backend)
    sampling = SamplingParams(max_tokens=12, temperature=0.0)
    requests = [(chat(q), sampling) for q in QUESTIONS]
    lone = [alone(backend, m, s)[-1] for m, s in requests]
    last = [run[-1] for run in together(engine, requests, joins=[0, 1, 2, 3])]
    assert [(d.prompt_tokens, d.completion_tokens, d.finish_reason) for d in last] == [
        (d.prompt_tokens, d.completion_tokens, d.finish_reason) for d in lone
    ]


# -- room: sequences and cells ---------------------------------------------------------------------


def test_a_closed_stream_frees_its_cells_and_sequence_at_once(backend: GgufBackend) -> None:
    engine = engine_of(backend)
    streams = [
        engine.open(prompt=None, messages=chat(q), sampling=SamplingParams(max_tokens=200, temperature=0.0))
        for q in QUESTIONS
    ]
    for stream in streams:
        assert engine.admit(stream)
    extra = engine.open(prompt=None, messages=chat("hi"), sampling=SamplingParams(max_tokens=8, temperature=0.0))
    assert not engine.admit(extra), "all sequences are taken"
    for _ in range(3):
        engine.step()
    memory = llama_cpp.llama_get_memory(backend._gen.ptr)  # type: ignore[union-attr]
    first = streams[0]
    assert isinstance(first, Stream)
    # Its prompt and two tokens of its reply (the third is sampled, not yet decoded).
    assert llama_cpp.llama_memory_seq_pos_max(memory, first.seq) + 1 == len(first.tokens) + 2
    seq = first.seq
    engine.close(first)
    # The reply's cells go at once; the prompt's stay, as the free sequence's cached prefix.
    assert llama_cpp.llama_memory_seq_pos_max(memory, seq) + 1 == len(first.tokens) == engine.cached_prefix(seq)
    assert engine.admit(extra)
    assert isinstance(extra, Stream) and extra.seq == seq
    for stream in [*streams[1:], extra]:
        engine.close(stream)
    assert_free(engine, backend)


def test_a_new_stream_keeps_the_running_sequences_consecutive(
    resolver: SourceResolver, smollm2_spec: ModelSpec
) -> None:
    """llama.cpp decodes sequences 0 and 2 of a non-unified cache in two micro-batches (two passes
    over the weights per token step), 0 and 1 in one: a stream without a cached prefix takes the
    free sequence that fills a gap, even when another was used less recently."""
    fresh = load(resolver, smollm2_spec)  # four sequences, all empty
    try:
        engine = engine_of(fresh)
        sampling = SamplingParams(max_tokens=8, temperature=0.0)
        # Plain prompts of a few tokens, sharing no prefix: none is cached or hits a cache.
        a, b, c, d = (
            engine.open(prompt=p, messages=(), sampling=sampling) for p in ("Apples", "Boats", "Cats", "Dogs")
        )
        for stream in (a, b, c):
            assert isinstance(stream, Stream) and engine.admit(stream)
        assert isinstance(a, Stream) and isinstance(b, Stream) and isinstance(c, Stream)
        assert (a.seq, b.seq, c.seq) == (0, 1, 2)
        engine.close(b)  # sequence 1 was used last; 3 never
        assert engine.admit(d)
        assert isinstance(d, Stream) and d.seq == 1 and d.cached == 0
        for stream in (a, c, d):
            engine.close(stream)
        assert_free(engine, fresh)
    finally:
        fresh.close()


def test_each_stream_has_kv_cells_of_its_own(resolver: SourceResolver, smollm2_spec: ModelSpec) -> None:
    spec = smollm2_spec.model_copy(
        update={"generation": smollm2_spec.generation.model_copy(update={"parallel": 2, "kv_cells": 256})}
    )
    files = ModelFiles(weights=resolver.resolve(spec.source, model=spec.name))
    small = GgufBackend.load(spec, files, LoadOptions(threads=2))
    try:
        engine = engine_of(small)
        sampling = SamplingParams(max_tokens=1000, temperature=0.0)
        first, second, third = (engine.open(prompt=None, messages=chat(q), sampling=sampling) for q in QUESTIONS[:3])
        assert isinstance(first, Stream)
        assert len(first.tokens) + first.budget == 256, "a reply is capped by its sequence's cells"
        assert engine.admit(first) and engine.admit(second)
        assert not engine.admit(third), "two sequences, both taken"
        engine.close(first)
        assert engine.admit(third)
        with pytest.raises(InvalidArgumentError, match="context of 256 tokens"):
            engine.open(prompt=LONG_CONTEXT, messages=(), sampling=sampling)
        for stream in (second, third):
            engine.close(stream)
    finally:
        small.close()


# -- interruption -------------------------------------------------------------------------------


def test_interrupt_stops_a_long_prefill_within_50_ms_and_the_step_runs_again(backend: GgufBackend) -> None:
    engine = engine_of(backend)
    sampling = SamplingParams(max_tokens=4, temperature=0.0)
    # A prompt that shares no prefix with any earlier test's (a system prompt of its own, not the chat
    # template's default one): nothing of it is cached, the whole of it is prefilled.
    messages = (
        ChatMessage("system", "A timetable to interrupt."),
        ChatMessage("user", LONG_CONTEXT + "\nWhen does the train leave?"),
    )
    stream = engine.open(prompt=None, messages=messages, sampling=sampling)
    assert engine.admit(stream)
    assert engine.cached_tokens(stream) == 0
    # The machine is shared: the best of three attempts is held to 50 ms, every one to 500 ms.
    delays = []
    for _ in range(3):
        seen: list[float] = []

        def step(seen: list[float] = seen) -> None:
            try:
                engine.step()
            except ComputeInterrupted:
                seen.append(time.perf_counter())

        thread = threading.Thread(target=step)
        thread.start()
        time.sleep(0.05)  # well inside the chunk's decode (~0.7 s for 256 tokens)
        asked = time.perf_counter()
        engine.interrupt()
        thread.join(10)
        assert seen, "the decode was not interrupted"
        delays.append(seen[0] - asked)
    assert min(delays) < 0.05, delays
    assert max(delays) < 0.5, delays
    assert isinstance(stream, Stream) and stream.prefilled == 0, "an interrupted step leaves nothing behind"
    memory = llama_cpp.llama_get_memory(backend._gen.ptr)  # type: ignore[union-attr]
    assert llama_cpp.llama_memory_seq_pos_max(memory, stream.seq) == -1
    out: list[GenerationDelta] = []
    while not stream.closed:
        out += [delta for _, delta in engine.step()]
    assert texts([out]) == texts([alone(backend, messages, sampling)])
    assert_free(engine, backend)


def test_an_interrupted_step_of_several_micro_batches_leaves_nothing_behind(
    resolver: SourceResolver, smollm2_spec: ModelSpec
) -> None:
    """Prompts of unequal lengths read in one step are split into micro-batches (llama.cpp's
    non-unified cache takes as many tokens of each sequence); llama.cpp takes back only the cells
    of the one it stopped in. The engine cuts every sequence back, and the step runs again."""
    fresh = load(resolver, smollm2_spec, parallel=2)  # sequences 0 and 1, both empty
    try:
        engine = engine_of(fresh)
        sampling = SamplingParams(max_tokens=4, temperature=0.0)
        short = chat(QUESTIONS[0])
        expected = texts([alone(fresh, short, sampling)])  # cached in sequence 0 now, all but its last token reused
        long = (ChatMessage("system", "Cut back."), ChatMessage("user", LONG_CONTEXT[:600]))
        first = engine.open(prompt=None, messages=short, sampling=sampling)
        second = engine.open(prompt=None, messages=long, sampling=sampling)
        assert isinstance(first, Stream) and isinstance(second, Stream)
        assert engine.admit(first) and engine.admit(second)
        assert (first.seq, second.seq) == (0, 1)
        assert len(first.tokens) - first.cached == 1 and second.cached == 0
        assert len(second.tokens) + 1 <= PREFILL_CHUNK, "both are read in one step"
        seen: list[bool] = []

        def step() -> None:
            try:
                engine.step()
            except ComputeInterrupted:
                seen.append(True)

        thread = threading.Thread(target=step)
        thread.start()
        # The first micro-batch (a token of each) is as short as a token step; the second, the
        # rest of the long prompt, takes far longer.
        time.sleep(0.15)
        engine.interrupt()
        thread.join(10)
        assert seen, "the step was not interrupted"
        memory = llama_cpp.llama_get_memory(fresh._gen.ptr)  # type: ignore[union-attr]
        for stream in (first, second):
            held = llama_cpp.llama_memory_seq_pos_max(memory, stream.seq) + 1
            assert held == stream.prefilled == stream.cached, (stream.seq, held, stream.prefilled)
        out: dict[int, list[GenerationDelta]] = {id(first): [], id(second): []}
        while not (first.closed and second.closed):
            for handle, delta in engine.step():
                out[id(handle)].append(delta)
        assert texts([out[id(first)]]) == expected
        assert_free(engine, fresh)
    finally:
        fresh.close()


# -- through the scheduler ---------------------------------------------------------------------------


async def test_concurrent_generate_calls_are_decoded_together(backend: GgufBackend) -> None:
    requests = list(zip([chat(q) for q in QUESTIONS], samplings(), strict=True))
    expected = texts([alone(backend, m, s) for m, s in requests])
    scheduler = ModelScheduler("smollm2-test", backend, ComputeGate())
    try:
        first_token: list[float] = []
        finished: list[float] = []

        async def call(messages: tuple[ChatMessage, ...], sampling: SamplingParams) -> list[GenerationDelta]:
            out: list[GenerationDelta] = []
            async for delta in scheduler.generate(prompt=None, messages=messages, sampling=sampling):
                if not out:
                    first_token.append(time.perf_counter())
                out.append(delta)
            finished.append(time.perf_counter())
            return out

        runs = await asyncio.gather(*(call(m, s) for m, s in requests))
        assert texts(list(runs)) == expected
        # Nobody's first token waited for another's whole answer.
        assert max(first_token) < min(finished)
        assert_free(engine_of(backend), backend)
    finally:
        await asyncio.to_thread(scheduler.close)


async def test_callers_who_arrive_within_the_admission_window_read_their_prompts_in_one_step(
    backend: GgufBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four callers a few milliseconds apart on an idle engine: the first step waits for the others
    (while each comes within ADMISSION_GAP of the one before, widened here with the calls' spread so
    that a loaded test machine keeps them inside it), and their four prompts are read in it, with
    the same tokens."""
    monkeypatch.setattr(model_scheduler, "ADMISSION_GAP", 0.5)
    monkeypatch.setattr(model_scheduler, "ADMISSION_WINDOW", 5.0)
    requests = list(zip([chat(q) for q in QUESTIONS], samplings(), strict=True))
    expected = texts([alone(backend, m, s) for m, s in requests])
    engine = engine_of(backend)
    scheduler = ModelScheduler("smollm2-test", backend, ComputeGate())
    step = engine.step
    admitted_at_steps: list[int] = []

    def counting_step() -> list[tuple[object, GenerationDelta]]:
        admitted_at_steps.append(engine.active)
        return step()

    monkeypatch.setattr(engine, "step", counting_step)
    try:
        calls = []
        for messages, sampling in requests:
            calls.append(asyncio.create_task(_collect(scheduler, messages, sampling, Priority.INTERACTIVE)))
            await asyncio.sleep(0.02)
        runs = await asyncio.gather(*calls)
        assert texts(list(runs)) == expected
        assert admitted_at_steps[0] == 4, admitted_at_steps[:4]
        assert_free(engine, backend)
    finally:
        await asyncio.to_thread(scheduler.close)


async def test_a_caller_that_leaves_frees_its_sequence_and_the_others_go_on(backend: GgufBackend) -> None:
    sampling = SamplingParams(max_tokens=24, temperature=0.0)
    expected = texts([alone(backend, chat(QUESTIONS[1]), sampling)])
    scheduler = ModelScheduler("smollm2-test", backend, ComputeGate())
    try:

        async def leave_early() -> None:
            stream = scheduler.generate(
                prompt=None, messages=chat(QUESTIONS[0]), sampling=SamplingParams(max_tokens=400, temperature=0.0)
            )
            count = 0
            async for _ in stream:
                count += 1
                if count == 3:
                    break
            await stream.aclose()

        async def stay() -> list[GenerationDelta]:
            return [d async for d in scheduler.generate(prompt=None, messages=chat(QUESTIONS[1]), sampling=sampling)]

        started = time.perf_counter()
        _, kept = await asyncio.gather(leave_early(), stay())
        assert texts([kept]) == expected
        # 400 tokens would take many seconds; the one that left stopped.
        assert time.perf_counter() - started < 60
        assert_free(engine_of(backend), backend)
    finally:
        await asyncio.to_thread(scheduler.close)


async def test_text_within_the_stream_interval_travels_in_one_message(backend: GgufBackend) -> None:
    """A stream's first text goes at once; what follows within `stream_interval` waits for the next
    message (here: the end). The text is the same as one message per token."""
    sampling = SamplingParams(max_tokens=64, temperature=0.0)
    expected = texts([alone(backend, chat(QUESTIONS[0]), sampling)])
    engine = engine_of(backend)
    per_token = ModelScheduler("smollm2-test", backend, ComputeGate())
    try:
        one_each = await _collect(per_token, chat(QUESTIONS[0]), sampling, Priority.INTERACTIVE)
    finally:
        await asyncio.to_thread(per_token.close)
    assert texts([one_each]) == expected
    assert len(one_each) > 32

    held = ModelScheduler("smollm2-test", backend, ComputeGate(), stream_interval=600.0)
    try:
        messages: list[GenerationDelta] = []
        running_at_first: int | None = None
        async for delta in held.generate(prompt=None, messages=chat(QUESTIONS[0]), sampling=sampling):
            if not messages:
                running_at_first = engine.active  # the stream is still decoding: its first text was not held
            messages.append(delta)
    finally:
        await asyncio.to_thread(held.close)
    assert texts([messages]) == expected
    assert len(messages) == 2
    assert running_at_first == 1
    assert messages[0].finish_reason is None and messages[0].text
    assert messages[1].completion_tokens == 64
    assert_free(engine, backend)


async def test_text_held_for_the_next_message_reaches_the_caller_before_an_error(
    backend: GgufBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampling = SamplingParams(max_tokens=64, temperature=0.0)
    (expected,) = texts([alone(backend, chat(QUESTIONS[1]), sampling)])
    engine = engine_of(backend)
    step, steps = engine.step, 0

    def failing_step() -> list[tuple[object, GenerationDelta]]:
        nonlocal steps
        steps += 1
        if steps == 12:
            raise RuntimeError("llama_decode failed with code -3")
        return step()

    monkeypatch.setattr(engine, "step", failing_step)
    scheduler = ModelScheduler("smollm2-test", backend, ComputeGate(), stream_interval=600.0)
    received: list[GenerationDelta] = []
    try:
        with pytest.raises(RuntimeError, match="code -3"):
            async for delta in scheduler.generate(prompt=None, messages=chat(QUESTIONS[1]), sampling=sampling):
                received.append(delta)
    finally:
        await asyncio.to_thread(scheduler.close)
    # The first text at once, then the ten steps' text held since: none of it lost.
    assert len(received) == 2
    text = "".join(delta.text for delta in received)
    assert len(text) > len(received[0].text) and expected.startswith(text)
    assert_free(engine, backend)


async def second_message_arrives_during(
    backend: GgufBackend,
    monkeypatch: pytest.MonkeyPatch,
    gate: ComputeGate,
    occupy: Callable[[ModelScheduler, threading.Event], Awaitable[bool]],
    at_fourth_step: Callable[[], None] = lambda: None,
) -> bool:
    """Stream a 64-token answer whose text is held for 600 s. After its fourth step (the prompt's,
    whose first text is sent at once, then token steps whose text is held), and `at_fourth_step`
    within it, run `occupy`, which keeps the model's thread or the gate busy and answers whether the
    stream's second message arrived meanwhile (the event given to it is set when it does)."""
    engine = engine_of(backend)
    step, steps, stepped = engine.step, 0, threading.Event()

    def counting_step() -> list[tuple[object, GenerationDelta]]:
        nonlocal steps
        steps += 1
        if steps == 4:
            stepped.set()
            at_fourth_step()
        return step()

    monkeypatch.setattr(engine, "step", counting_step)
    scheduler = ModelScheduler("smollm2-test", backend, gate, stream_interval=600.0)
    second = threading.Event()
    received: list[GenerationDelta] = []

    async def consume() -> None:
        sampling = SamplingParams(max_tokens=64, temperature=0.0)
        async for delta in scheduler.generate(prompt=None, messages=chat(QUESTIONS[0]), sampling=sampling):
            received.append(delta)
            if len(received) == 2:
                second.set()

    try:
        consuming = asyncio.create_task(consume())
        assert await asyncio.to_thread(stepped.wait, 30.0)
        delivered = await occupy(scheduler, second)
        await consuming
    finally:
        await asyncio.to_thread(scheduler.close)
    assert_free(engine, backend)
    return delivered


async def test_held_text_reaches_the_caller_before_other_work_on_the_models_thread(
    backend: GgufBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text held for a stream's next message does not wait behind a call the model's thread runs
    between two steps (a rerank, an interrupted batch-lane step and the interactive work after it):
    that can take seconds, and the text was generated before it."""

    async def call(scheduler: ModelScheduler, second: threading.Event) -> bool:
        return (await scheduler.run(lambda: second.wait(timeout=5.0))).value

    assert await second_message_arrives_during(backend, monkeypatch, ComputeGate(), call)


async def test_held_text_reaches_the_caller_before_the_model_waits_for_another_models_turn(
    backend: GgufBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another model holds the compute gate (an embedding call, a rerank), this model's next
    step waits; the text its streams hold goes to their callers before that wait, not after it."""
    gate = ComputeGate()

    def let_the_other_model_queue() -> None:  # while this turn is held: its turn comes next
        deadline = time.monotonic() + 30
        while gate.waiting(Priority.INTERACTIVE) == 0 and time.monotonic() < deadline:
            time.sleep(0.001)

    def other_model(second: threading.Event) -> bool:
        with gate.turn(Priority.INTERACTIVE):
            return second.wait(timeout=5.0)

    async def turn(_: ModelScheduler, second: threading.Event) -> bool:
        return await asyncio.to_thread(other_model, second)

    assert await second_message_arrives_during(backend, monkeypatch, gate, turn, let_the_other_model_queue)


async def test_batch_lane_streams_leave_a_sequence_for_interactive_ones(backend: GgufBackend) -> None:
    scheduler = ModelScheduler("smollm2-test", backend, ComputeGate())
    engine = engine_of(backend)
    try:
        long = SamplingParams(max_tokens=60, temperature=0.0)
        batch = [asyncio.create_task(_collect(scheduler, chat(q), long, Priority.BATCH)) for q in QUESTIONS]
        for _ in range(1000):
            if engine.active == engine.slots - 1:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert engine.active == engine.slots - 1, "a batch-lane stream took the last sequence"
        started = time.perf_counter()
        quick = await _collect(
            scheduler, chat("hi"), SamplingParams(max_tokens=4, temperature=0.0), Priority.INTERACTIVE
        )
        assert quick[-1].completion_tokens >= 1
        assert not all(task.done() for task in batch), "the interactive call waited for batch-lane answers"
        assert time.perf_counter() - started < 60
        await asyncio.gather(*batch)
        assert_free(engine, backend)
    finally:
        await asyncio.to_thread(scheduler.close)


async def _collect(
    scheduler: ModelScheduler, messages: tuple[ChatMessage, ...], sampling: SamplingParams, lane: Priority
) -> list[GenerationDelta]:
    return [d async for d in scheduler.generate(prompt=None, messages=messages, sampling=sampling, lane=lane)]


def test_an_interrupt_between_steps_costs_a_retry_not_the_answer(backend: GgufBackend) -> None:
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    expected = texts([alone(backend, chat(QUESTIONS[2]), sampling)])
    engine_of(backend).interrupt()  # e.g. a caller that left just as its stream ended
    assert texts([alone(backend, chat(QUESTIONS[2]), sampling)]) == expected


# -- the prompt cache --------------------------------------------------------------------------------


def load(resolver: SourceResolver, spec: ModelSpec, **generation: object) -> GgufBackend:
    spec = spec.model_copy(update={"generation": spec.generation.model_copy(update=generation)})
    return GgufBackend.load(spec, ModelFiles(weights=resolver.resolve(spec.source, model=spec.name)), LoadOptions(2))


@pytest.mark.parametrize("flash_attention", [False, True])
def test_with_flash_attention_a_lone_tokens_logits_depend_on_the_thread_count(
    resolver: SourceResolver, smollm2_spec: ModelSpec, monkeypatch: pytest.MonkeyPatch, flash_attention: bool
) -> None:
    """Why `generation.flash_attention` is off by default: with it, ggml's CPU kernel splits the keys
    of a lone one-token decode over the threads once 512 cells are in view, so the thread count (which
    follows the machine's load) changes the logits; without it, it does not. With it on, this tests
    llama.cpp, not Wafer: a llama.cpp whose kernel no longer splits would fail here, and the docs'
    reason for the default (docs/architecture.md, "What is promised about a stream's tokens") would
    need a new look."""
    backend = load(resolver, smollm2_spec, flash_attention=flash_attention)
    try:
        engine, ctx = engine_of(backend), backend._gen
        assert ctx is not None
        prompt = backend._request_tokens(None, system_chat(QUESTIONS[0]))[:600]
        logits = []
        for threads in (1, 2):
            pin_threads(engine, monkeypatch, threads)
            ctx.clear(0)
            ctx.decode_tokens(prompt[:-1], 0, 0, output_last=False)
            index = ctx.decode_tokens(prompt[-1:], len(prompt) - 1, 0, output_last=True)  # a lone token
            assert index is not None
            logits.append(ctx.logits(index, backend._vocab.n_tokens))
        ctx.clear(0)
        assert np.array_equal(logits[0], logits[1]) is not flash_attention
    finally:
        backend.close()


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def texts_without_cache(
    resolver: SourceResolver, spec: ModelSpec, requests: Sequence[tuple[tuple[ChatMessage, ...], SamplingParams]]
) -> list[str]:
    """Each request's answer alone, from a backend with the prompt cache off: what the cache must not change."""
    uncached = load(resolver, spec, prompt_cache=False)
    try:
        expected = texts([alone(uncached, m, s) for m, s in requests])
        assert engine_of(uncached).cache_hits == 0
    finally:
        uncached.close()
    return expected


def system_chat(question: str) -> tuple[ChatMessage, ...]:
    return (ChatMessage("system", LONG_CONTEXT), ChatMessage("user", question))


def test_a_shared_system_prompt_is_decoded_once_and_changes_no_token(
    backend: GgufBackend, resolver: SourceResolver, smollm2_spec: ModelSpec
) -> None:
    engine = engine_of(backend)
    requests = [
        (system_chat("When does the first train leave?"), SamplingParams(max_tokens=16, temperature=0.0)),
        (system_chat("When does the last train leave?"), SamplingParams(max_tokens=16, temperature=0.0)),
        (system_chat("Which train is the fastest?"), SamplingParams(max_tokens=16, temperature=0.9, seed=3)),
    ]
    expected = texts_without_cache(resolver, smollm2_spec, requests)
    hits = engine.cache_hits
    got: list[list[GenerationDelta]] = []
    cached: list[int] = []
    for messages, sampling in requests:
        stream = engine.open(prompt=None, messages=messages, sampling=sampling)
        assert engine.admit(stream)
        cached.append(engine.cached_tokens(stream))
        out: list[GenerationDelta] = []
        while not stream.closed:
            out += [delta for _, delta in engine.step()]
        got.append(out)
    assert texts(got) == expected
    prompts = [engine.open(prompt=None, messages=m, sampling=s) for m, s in requests]
    shared = [common_prefix(prompts[0].tokens, p.tokens) for p in prompts[1:]]
    # The second reuses what it shares with the first; the third the longer of what it shares with each.
    assert cached[1] == shared[0] >= 2 * PREFILL_CHUNK, cached
    assert cached[2] == max(shared[1], common_prefix(prompts[1].tokens, prompts[2].tokens)), cached
    assert engine.cache_hits - hits == (2 if cached[0] == 0 else 3)
    assert_free(engine, backend)


def test_a_short_shared_prefix_is_reused_and_changes_no_token(
    backend: GgufBackend, resolver: SourceResolver, smollm2_spec: ModelSpec
) -> None:
    """Two chat calls share the chat template's default system prompt and the start of the question
    (a few dozen tokens, less than a chunk): the second decodes only the rest, with the same tokens."""
    requests = [(chat(q), SamplingParams(max_tokens=16, temperature=0.0)) for q in ("Name a colour.", "Name a fruit.")]
    expected = texts_without_cache(resolver, smollm2_spec, requests)
    engine = engine_of(backend)
    got: list[list[GenerationDelta]] = []
    streams: list[Stream] = []
    for messages, sampling in requests:
        stream = engine.open(prompt=None, messages=messages, sampling=sampling)
        assert isinstance(stream, Stream) and engine.admit(stream)
        streams.append(stream)
        out: list[GenerationDelta] = []
        while not stream.closed:
            out += [delta for _, delta in engine.step()]
        got.append(out)
    assert texts(got) == expected
    common = common_prefix(streams[0].tokens, streams[1].tokens)
    assert MIN_CACHED_PREFIX <= common < PREFILL_CHUNK
    assert streams[1].cached == common and streams[1].seq == streams[0].seq
    assert_free(engine, backend)


@pytest.mark.parametrize("joins", ["after the first read its prompt", "with the first"])
def test_a_caller_who_joins_a_running_stream_with_its_system_prompt_copies_those_cells(
    backend: GgufBackend,
    resolver: SourceResolver,
    smollm2_spec: ModelSpec,
    joins: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two callers with the same long system prompt at once: the second is not made to read it
    again; the first's cells are copied into its own sequence once the first has read them, and no
    token of either changes."""
    system = f"{joins.capitalize()}: a timetable seen by no other test. " + LONG_CONTEXT
    requests = [
        ((ChatMessage("system", system), ChatMessage("user", q)), SamplingParams(max_tokens=16, temperature=0.0))
        for q in ("When does the first train leave?", "Which train is the slowest?")
    ]
    expected = texts_without_cache(resolver, smollm2_spec, requests)
    engine = engine_of(backend)
    first, second = (engine.open(prompt=None, messages=m, sampling=s) for m, s in requests)
    assert isinstance(first, Stream) and isinstance(second, Stream)
    out: dict[int, list[GenerationDelta]] = {id(first): [], id(second): []}
    assert engine.admit(first) and first.cached == 0
    if joins == "after the first read its prompt":
        while first.prefilled < len(first.tokens):
            for handle, delta in engine.step():
                out[id(handle)].append(delta)
    assert engine.admit(second)
    shared = common_prefix(first.tokens, second.tokens)
    assert shared >= MIN_COPIED_PREFIX
    assert second.cached == shared and second.seq != first.seq, (second.cached, shared)
    read_by_second = run_counting_reads(engine, (first, second), second, out, monkeypatch)
    # The second read only what follows the shared prefix (its copy counts as no reading).
    assert read_by_second == len(second.tokens) - shared, (read_by_second, len(second.tokens), shared)
    assert texts([out[id(first)], out[id(second)]]) == expected
    assert_free(engine, backend)


@pytest.mark.parametrize("holds", ["a prompt it has read", "a cached prefix it took"])
def test_a_short_prefix_a_running_stream_holds_is_copied_at_once(
    backend: GgufBackend,
    resolver: SourceResolver,
    smollm2_spec: ModelSpec,
    holds: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Callers who share a one-line system prompt (shorter than MIN_COPIED_PREFIX): the second
    copies the cells the first already holds, without waiting, and reads only the rest; no token
    changes. The first holds them because it read its prompt, or because it took the free sequence
    that had them cached (then the second has no cached sequence left to take)."""
    system = f"Holding {holds}: say it short."
    requests = [
        ((ChatMessage("system", system), ChatMessage("user", q)), SamplingParams(max_tokens=12, temperature=0.0))
        for q in ("Name a colour.", "Name a fruit.", "Name a bird.")
    ]
    expected = texts_without_cache(resolver, smollm2_spec, requests[:2])
    engine = engine_of(backend)
    if holds == "a cached prefix it took":
        warm = engine.open(prompt=None, messages=requests[2][0], sampling=requests[2][1])
        assert engine.admit(warm)
        while not warm.closed:
            engine.step()
    first, second = (engine.open(prompt=None, messages=m, sampling=s) for m, s in requests[:2])
    assert isinstance(first, Stream) and isinstance(second, Stream)
    out: dict[int, list[GenerationDelta]] = {id(first): [], id(second): []}
    assert engine.admit(first)
    shared = common_prefix(first.tokens, second.tokens)
    assert MIN_CACHED_PREFIX <= shared < MIN_COPIED_PREFIX, shared
    if holds == "a prompt it has read":
        for handle, delta in engine.step():
            out[id(handle)].append(delta)
        assert first.prefilled == len(first.tokens)
    else:
        assert first.cached == first.prefilled == shared
    assert engine.admit(second)
    assert second.cached == second.prefilled == shared and second.follows is None and second.seq != first.seq
    read_by_second = run_counting_reads(engine, (first, second), second, out, monkeypatch)
    assert read_by_second == len(second.tokens) - shared
    assert texts([out[id(first)], out[id(second)]]) == expected
    assert_free(engine, backend)


def test_the_least_recently_used_prefix_is_evicted_first(resolver: SourceResolver, smollm2_spec: ModelSpec) -> None:
    small = load(resolver, smollm2_spec, parallel=2)
    try:
        engine = engine_of(small)
        sampling = SamplingParams(max_tokens=2, temperature=0.0)

        def finish(messages: tuple[ChatMessage, ...]) -> Stream:
            stream = engine.open(prompt=None, messages=messages, sampling=sampling)
            assert isinstance(stream, Stream) and engine.admit(stream)
            while not stream.closed:
                engine.step()
            return stream

        trains = (ChatMessage("system", LONG_CONTEXT), ChatMessage("user", "When?"))
        # Two system prompts that share no prefix (past the chat template's opening).
        boats = (ChatMessage("system", "Boats. " + LONG_CONTEXT.replace("train", "boat")), ChatMessage("user", "When?"))
        first = finish(trains)
        second = finish(boats)
        assert first.seq != second.seq
        assert engine.cached_prefix(first.seq) > 0 and engine.cached_prefix(second.seq) > 0
        # No match (the chat template's opening is shorter than MIN_CACHED_PREFIX): it takes the
        # sequence used least recently, and its prompt replaces the cached one there.
        other = finish(chat("Something else entirely."))
        assert other.cached == 0 and other.seq == first.seq
        assert engine.cached_prefix(first.seq) == len(other.tokens)
        assert engine.cached_prefix(second.seq) > 0
        assert finish(boats).cached >= PREFILL_CHUNK
    finally:
        small.close()


async def test_prompt_cache_hits_and_misses_are_counted(backend: GgufBackend) -> None:
    metrics = Metrics(models=["smollm2-test"])
    scheduler = ModelScheduler("smollm2-test", backend, ComputeGate(), observer=metrics)
    try:
        sampling = SamplingParams(max_tokens=2, temperature=0.0)
        unrelated = (ChatMessage("system", "Unrelated."), ChatMessage("user", "Question number one?"))
        for messages in (unrelated, system_chat("Which platform?"), system_chat("Which platform now?")):
            await _collect(scheduler, messages, sampling, Priority.INTERACTIVE)
        sample = metrics.registry.get_sample_value
        assert (sample("wafer_prompt_cache_hits_total", {"model": "smollm2-test"}) or 0) >= 1
        assert (sample("wafer_prompt_cache_misses_total", {"model": "smollm2-test"}) or 0) >= 1
        assert (sample("wafer_prompt_cache_tokens_total", {"model": "smollm2-test"}) or 0) >= PREFILL_CHUNK
    finally:
        await asyncio.to_thread(scheduler.close)
