"""The scheduler: lanes, merged batches, bounded queues, cancellation, streams, the compute gate."""

from __future__ import annotations

import asyncio
import mmap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from tests.fakes.fake_backend import FakeBackend
from wafer.backends.base import ComputeInterrupted, Embeddings, InputTooLongError, Tokenized
from wafer.domain import Context, FloatMatrix, Priority
from wafer.errors import ResourceExhaustedError
from wafer.scheduler import ComputeGate, ModelScheduler, Scheduled
from wafer.specs import BatchingSpec, ModelSpec, Task

BATCH, INTERACTIVE = Priority.BATCH, Priority.INTERACTIVE


class RecordingBackend(FakeBackend):
    """The fake backend, with a record of every embed call and a gate of its own."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec, mmap.mmap(-1, 1))
        self.calls: list[list[str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        # Simulated compute time, for tests of how work is cut by time.
        self.seconds_per_text = 0.0

    def embed(self, texts: Sequence[str], *, truncate: bool, context: Context | None = None) -> Embeddings:
        self.calls.append(list(texts))
        self.entered.set()
        if not self.hold.wait(10):
            raise TimeoutError("the test never released the backend")
        time.sleep(self.seconds_per_text * len(texts))
        return super().embed(texts, truncate=truncate)


def spec(max_tokens: int = 12) -> ModelSpec:
    return ModelSpec(name="m", backend="fake", source="x", tasks=[Task.EMBED], dimensions=8, max_tokens=max_tokens)


@pytest.fixture
def backend(open_gate: None) -> RecordingBackend:
    return RecordingBackend(spec())


@pytest.fixture
async def make_scheduler(backend: RecordingBackend) -> AsyncIterator[Callable[..., ModelScheduler]]:
    made: list[ModelScheduler] = []

    def make(gate: ComputeGate | None = None, **batching: Any) -> ModelScheduler:
        scheduler = ModelScheduler(
            "m", backend, gate or ComputeGate(), batching=BatchingSpec(**batching), max_tokens=12
        )
        made.append(scheduler)
        return scheduler

    yield make
    backend.hold.set()
    for scheduler in made:
        await asyncio.to_thread(scheduler.close)


async def hold_backend(backend: RecordingBackend, scheduler: ModelScheduler) -> asyncio.Task[object]:
    """Start one call and keep it inside the backend, so that what follows queues up."""
    backend.hold.clear()
    backend.entered.clear()
    held: asyncio.Task[object] = asyncio.create_task(scheduler.embed(["holder"], truncate=False))
    await asyncio.to_thread(backend.entered.wait, 5)
    return held


def alone(backend: FakeBackend, text: str) -> FloatMatrix:
    """The row `text` gets when embedded on its own."""
    return FakeBackend.embed(backend, [text], truncate=False).vectors[:1]


# -- merged batches ----------------------------------------------------------------------------


async def test_concurrent_callers_are_merged_and_each_gets_its_own_rows(
    backend: RecordingBackend, make_scheduler: Callable[..., ModelScheduler]
) -> None:
    scheduler = make_scheduler()
    held = await hold_backend(backend, scheduler)
    requests = [[f"caller {i} text {j}" for j in range(i % 3 + 1)] for i in range(10)]
    tasks = [asyncio.create_task(scheduler.embed(texts, truncate=False)) for texts in requests]
    await asyncio.sleep(0.05)
    backend.hold.set()
    await held
    results = await asyncio.gather(*tasks)

    # Everything that queued behind the held call ran in one merged call.
    assert len(backend.calls) == 2
    assert sorted(backend.calls[1]) == sorted(t for texts in requests for t in texts)
    for texts, result in zip(requests, results, strict=True):
        expected = np.concatenate([alone(backend, t) for t in texts])
        np.testing.assert_array_equal(result.value.vectors, expected)
        assert result.value.token_counts == [backend.count_tokens(t) for t in texts]
        assert result.batch_size == len(backend.calls[1])
        assert result.queued_seconds > 0


async def test_a_merged_call_respects_the_size_and_token_budgets(
    backend: RecordingBackend, make_scheduler: Callable[..., ModelScheduler]
) -> None:
    scheduler = make_scheduler(max_batch_size=4, max_batch_tokens=1000)
    held = await hold_backend(backend, scheduler)
    tasks = [asyncio.create_task(scheduler.embed([f"text {i}"], truncate=False)) for i in range(10)]
    await asyncio.sleep(0.05)
    backend.hold.set()
    await asyncio.gather(held, *tasks)
    assert [len(call) for call in backend.calls[1:]] == [4, 4, 2]

    backend.calls.clear()
    # ~40 characters is ~12 estimated tokens: a 30-token budget holds two such texts.
    scheduler = make_scheduler(max_batch_size=32, max_batch_tokens=30)
    held = await hold_backend(backend, scheduler)
    long_text = "word " * 8
    tasks = [asyncio.create_task(scheduler.embed([long_text + str(i)], truncate=True)) for i in range(6)]
    await asyncio.sleep(0.05)
    backend.hold.set()
    await asyncio.gather(held, *tasks)
    assert [len(call) for call in backend.calls[1:]] == [2, 2, 2]


async def test_one_callers_bad_input_fails_only_that_caller(
    backend: RecordingBackend, make_scheduler: Callable[..., ModelScheduler]
) -> None:
    scheduler = make_scheduler()
    held = await hold_backend(backend, scheduler)
    good = asyncio.create_task(scheduler.embed(["fine", "also fine"], truncate=False))
    too_long = " ".join(["word"] * 20)  # 22 tokens, the window is 12
    bad = asyncio.create_task(scheduler.embed(["short", too_long], truncate=False))
    later = asyncio.create_task(scheduler.embed(["after"], truncate=False))
    await asyncio.sleep(0.05)
    backend.hold.set()
    await held
    with pytest.raises(InputTooLongError) as raised:
        await bad
    assert raised.value.index == 1, "the index is the caller's own, not the merged call's"
    assert "input 1" in raised.value.message
    assert (await good).value.vectors.shape == (2, 8)
    assert (await later).value.vectors.shape == (1, 8)


async def test_requests_with_and_without_truncation_are_not_merged(
    backend: RecordingBackend, make_scheduler: Callable[..., ModelScheduler]
) -> None:
    scheduler = make_scheduler()
    held = await hold_backend(backend, scheduler)
    cut = " ".join(["word"] * 20)
    tasks = [
        asyncio.create_task(scheduler.embed(["a"], truncate=False)),
        asyncio.create_task(scheduler.embed([cut], truncate=True)),
        asyncio.create_task(scheduler.embed(["b"], truncate=False)),
    ]
    await asyncio.sleep(0.05)
    backend.hold.set()
    await asyncio.gather(held, *tasks)
    assert backend.calls[1:] == [["a", "b"], [cut]]


# -- lanes -------------------------------------------------------------------------------------


async def test_interactive_requests_overtake_queued_batch_work(
    backend: RecordingBackend, make_scheduler: Callable[..., ModelScheduler]
) -> None:
    scheduler = make_scheduler()
    held = await hold_backend(backend, scheduler)
    bulk = asyncio.create_task(scheduler.embed([f"bulk {i}" for i in range(5)], truncate=False, lane=BATCH))
    await asyncio.sleep(0.02)
    search = asyncio.create_task(scheduler.embed(["search"], truncate=False, lane=INTERACTIVE))
    await asyncio.sleep(0.05)
    assert scheduler.waiting(BATCH) == 1
    assert scheduler.waiting(INTERACTIVE) == 1
    backend.hold.set()
    await asyncio.gather(held, bulk, search)
    assert backend.calls[1] == ["search"]
    assert all(text.startswith("bulk") for call in backend.calls[2:] for text in call)


async def test_batch_work_is_cut_into_micro_batches_sized_by_measured_speed(
    backend: RecordingBackend, make_scheduler: Callable[..., ModelScheduler]
) -> None:
    backend.seconds_per_text = 0.004  # so a 20 ms micro-batch holds about 5 texts
    scheduler = make_scheduler(batch_unit_ms=20)
    texts = [f"message number {i}" for i in range(40)]
    result = await scheduler.embed(texts, truncate=False, lane=BATCH)
    np.testing.assert_array_equal(result.value.vectors, np.concatenate([alone(backend, t) for t in texts]))
    sizes = [len(call) for call in backend.calls]
    assert sizes[0] == 1, "until the model's speed is known, batch work goes one input at a time"
    assert scheduler.tokens_per_second is not None
    assert 2 <= max(sizes) <= 10, sizes
    assert sum(sizes) == 40
    # The same 40 texts as interactive work run merged, in one call.
    backend.calls.clear()
    await scheduler.embed(texts, truncate=False)
    assert [len(call) for call in backend.calls] == [32, 8]


async def test_interactive_work_waits_behind_at_most_one_micro_batch(
    backend: RecordingBackend, make_scheduler: Callable[..., ModelScheduler]
) -> None:
    backend.seconds_per_text = 0.004
    scheduler = make_scheduler(batch_unit_ms=20)
    bulk = asyncio.create_task(scheduler.embed([f"bulk {i}" for i in range(100)], truncate=False, lane=BATCH))
    for _ in range(5000):
        if len(backend.calls) >= 4:
            break
        await asyncio.sleep(0.001)
    calls_when_asked = len(backend.calls)
    searched = await scheduler.embed(["search"], truncate=False)
    position = backend.calls.index(["search"])
    # The micro-batch running when the search came may finish, and at most one more had been taken.
    assert position <= calls_when_asked + 1
    assert searched.queued_seconds < 0.2
    await bulk
    assert len(backend.calls) > position + 1, "the bulk request should still have been running"


# -- backpressure and cancellation ------------------------------------------------------------


async def test_a_full_lane_answers_resource_exhausted_and_recovers(
    backend: RecordingBackend, make_scheduler: Callable[..., ModelScheduler]
) -> None:
    scheduler = make_scheduler(queue_capacity=8)
    held = await hold_backend(backend, scheduler)
    queued = [asyncio.create_task(scheduler.embed([f"t{i}", f"u{i}"], truncate=False)) for i in range(4)]
    await asyncio.sleep(0.02)
    with pytest.raises(ResourceExhaustedError) as refused:
        await scheduler.embed(["one too many"], truncate=False)
    assert refused.value.retry_after_seconds is not None and refused.value.retry_after_seconds > 0
    assert "8" in refused.value.message
    # The other lane has its own room: a batch flood never refuses interactive work, and back.
    batch = asyncio.create_task(scheduler.embed(["bulk"], truncate=False, lane=BATCH))
    backend.hold.set()
    await asyncio.gather(held, batch, *queued)
    assert (await scheduler.embed(["room again"], truncate=False)).value.vectors.shape == (1, 8)


async def test_cancelled_queued_requests_never_run_and_free_their_room(
    backend: RecordingBackend, make_scheduler: Callable[..., ModelScheduler]
) -> None:
    scheduler = make_scheduler(queue_capacity=4)
    held = await hold_backend(backend, scheduler)
    doomed = asyncio.create_task(scheduler.embed(["doomed 1", "doomed 2", "doomed 3"], truncate=False))
    expired = asyncio.create_task(asyncio.wait_for(scheduler.embed(["expired"], truncate=False), 0.02))
    await asyncio.sleep(0.05)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    with pytest.raises(TimeoutError):
        await expired
    assert scheduler.waiting(INTERACTIVE) == 0
    # Their room is free again: four inputs fit.
    kept = asyncio.create_task(scheduler.embed(["kept 1", "kept 2", "kept 3", "kept 4"], truncate=False))
    await asyncio.sleep(0.02)
    backend.hold.set()
    await asyncio.gather(held, kept)
    ran = {text for call in backend.calls for text in call}
    assert not ran & {"doomed 1", "doomed 2", "doomed 3", "expired"}
    assert {"kept 1", "kept 4"} <= ran


async def test_a_call_abandoned_while_waiting_for_the_gate_does_not_run(
    make_scheduler: Callable[..., ModelScheduler],
) -> None:
    gate = ComputeGate()
    scheduler = make_scheduler(gate)
    ran: list[str] = []
    release = threading.Event()
    holding = threading.Event()

    def hold_the_gate() -> None:
        with gate.turn():
            holding.set()
            release.wait(5)

    holder = threading.Thread(target=hold_the_gate)
    holder.start()
    await asyncio.to_thread(holding.wait, 5)
    queued = asyncio.create_task(scheduler.run(lambda: ran.append("ran")))
    await asyncio.sleep(0.05)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    release.set()
    holder.join(5)
    await scheduler.run(lambda: ran.append("later"))
    assert ran == ["later"]


async def test_errors_reach_the_caller(make_scheduler: Callable[..., ModelScheduler]) -> None:
    scheduler = make_scheduler()

    def fail() -> None:
        raise ValueError("boom")

    def broken(cancelled: Callable[[], bool]) -> Iterator[int]:
        yield 1
        raise ValueError("mid-stream")

    with pytest.raises(ValueError, match="boom"):
        await scheduler.run(fail)
    received = []
    with pytest.raises(ValueError, match="mid-stream"):
        async for item in scheduler.stream(broken):
            received.append(item)
    assert received == [1]


# -- streams -----------------------------------------------------------------------------------


async def test_a_consumer_that_stops_early_stops_the_producer(make_scheduler: Callable[..., ModelScheduler]) -> None:
    scheduler = make_scheduler()
    produced: list[int] = []

    def steps(cancelled: Callable[[], bool]) -> Iterator[int]:
        for i in range(1000):
            if cancelled():
                return
            time.sleep(0.002)
            produced.append(i)
            yield i

    stream = scheduler.stream(steps)
    async for item in stream:
        if item == 5:
            break
    await stream.aclose()
    assert len(produced) < 100, "the producer should stop soon after the consumer"
    # The model's thread is free again.
    assert (await scheduler.run(lambda: 42)).value == 42


async def test_streams_of_one_model_run_one_after_another_in_lane_order(
    make_scheduler: Callable[..., ModelScheduler],
) -> None:
    scheduler = make_scheduler()
    events: list[str] = []
    release = threading.Event()

    def steps(name: str, wait: bool = False) -> Callable[[Callable[[], bool]], Iterator[str]]:
        def run(cancelled: Callable[[], bool]) -> Iterator[str]:
            for i in range(3):
                if wait and i == 0:
                    release.wait(5)
                events.append(f"{name}{i}")
                yield name

        return run

    async def consume(name: str, lane: Priority, wait: bool = False) -> None:
        async for _ in scheduler.stream(steps(name, wait), lane=lane):
            pass

    first = asyncio.create_task(consume("a", INTERACTIVE, wait=True))
    await asyncio.sleep(0.05)
    batch = asyncio.create_task(consume("b", BATCH))
    await asyncio.sleep(0.01)
    interactive = asyncio.create_task(consume("c", INTERACTIVE))
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(first, batch, interactive)
    assert events == ["a0", "a1", "a2", "c0", "c1", "c2", "b0", "b1", "b2"]


# -- the compute gate --------------------------------------------------------------------------


def test_gate_grants_interactive_turns_before_batch_turns_and_fifo_within_a_lane() -> None:
    gate = ComputeGate()
    order: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def first() -> None:
        with gate.turn():
            holding.set()
            release.wait(5)

    def later(name: str, lane: Priority) -> None:
        with gate.turn(lane):
            order.append(name)

    threads = [threading.Thread(target=first)]
    threads[0].start()
    holding.wait(5)
    for name, lane in [("b1", BATCH), ("i1", INTERACTIVE), ("b2", BATCH), ("i2", INTERACTIVE)]:
        thread = threading.Thread(target=later, args=(name, lane))
        thread.start()
        threads.append(thread)
        time.sleep(0.02)  # let each one queue before the next
    assert gate.waiting(BATCH) == 2 and gate.waiting(INTERACTIVE) == 2
    release.set()
    for thread in threads:
        thread.join(5)
    assert order == ["i1", "i2", "b1", "b2"]


async def test_a_short_call_runs_between_two_steps_of_a_long_stream(backend: RecordingBackend) -> None:
    """Turns are one step long: another model's call does not wait for a whole generation."""
    gate = ComputeGate()
    generator = ModelScheduler("gen", backend, gate)
    embedder = ModelScheduler("emb", backend, gate)
    events: list[str] = []
    first_step = threading.Event()

    def steps(cancelled: Callable[[], bool]) -> Iterator[int]:
        for i in range(20):
            time.sleep(0.01)
            events.append(f"step {i}")
            first_step.set()
            yield i

    async def consume() -> list[int]:
        return [item async for item in generator.stream(steps, lane=BATCH)]

    streaming = asyncio.create_task(consume())
    await asyncio.to_thread(first_step.wait, 5)
    await embedder.run(lambda: events.append("embed"))
    assert await streaming == list(range(20))
    assert 0 < events.index("embed") < len(events) - 5
    generator.close()
    embedder.close()


async def test_close_answers_queued_requests_with_unavailable(
    backend: RecordingBackend, make_scheduler: Callable[..., ModelScheduler]
) -> None:
    from wafer.errors import UnavailableError

    scheduler = make_scheduler()
    held = await hold_backend(backend, scheduler)
    queued = asyncio.create_task(scheduler.embed(["queued"], truncate=False))
    await asyncio.sleep(0.02)
    closing = asyncio.create_task(asyncio.to_thread(scheduler.close))
    await asyncio.sleep(0.02)
    backend.hold.set()
    await held
    with pytest.raises(UnavailableError):
        await queued
    await closing
    with pytest.raises(UnavailableError):
        await scheduler.embed(["after close"], truncate=False)


# -- pre-emption -------------------------------------------------------------------------------


class InterruptibleBackend(RecordingBackend):
    """Stops between texts when interrupted, as onnxruntime stops between operators."""

    interruptible = True

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._stop = threading.Event()
        self.interrupted_calls: list[list[str]] = []

    def embed(self, texts: Sequence[str], *, truncate: bool, context: Context | None = None) -> Embeddings:
        stop = self._stop
        try:
            self.entered.set()
            for _ in texts:
                if stop.is_set():
                    self.interrupted_calls.append(list(texts))
                    raise ComputeInterrupted
                time.sleep(self.seconds_per_text)
            self.calls.append(list(texts))
            return FakeBackend.embed(self, texts, truncate=truncate)
        finally:
            self._stop = threading.Event()

    def interrupt(self) -> None:
        self._stop.set()


@pytest.fixture
def interruptible(open_gate: None) -> InterruptibleBackend:
    backend = InterruptibleBackend(spec())
    backend.seconds_per_text = 0.005
    return backend


async def test_on_a_quiet_machine_batch_work_runs_in_full_batches(interruptible: InterruptibleBackend) -> None:
    scheduler = ModelScheduler("m", interruptible, ComputeGate(), batching=BatchingSpec(quiet_seconds=0.5))
    texts = [f"bulk {i}" for i in range(64)]
    try:
        await scheduler.embed(texts, truncate=False, lane=BATCH)
        assert [len(call) for call in interruptible.calls] == [32, 32]
        # Interactive work makes the machine busy: batch work goes back to short micro-batches.
        await scheduler.embed(["search"], truncate=False)
        interruptible.calls.clear()
        await scheduler.embed(texts[:8], truncate=False, lane=BATCH)
        assert max(len(call) for call in interruptible.calls) < 8
    finally:
        await asyncio.to_thread(scheduler.close)


async def test_interactive_work_interrupts_a_running_batch_call_which_runs_again(
    interruptible: InterruptibleBackend,
) -> None:
    scheduler = ModelScheduler("m", interruptible, ComputeGate(), batching=BatchingSpec(quiet_seconds=0))
    texts = [f"bulk {i}" for i in range(32)]
    try:
        interruptible.entered.clear()
        bulk = asyncio.create_task(scheduler.embed(texts, truncate=False, lane=BATCH))
        await asyncio.to_thread(interruptible.entered.wait, 5)
        await asyncio.sleep(0.02)  # a few texts into the 32-text call (0.16 s)
        searched = await scheduler.embed(["search"], truncate=False)
        assert searched.queued_seconds < 0.05, "the search waited for the batch call"
        result = await bulk
        assert scheduler.interrupted == 1
        assert interruptible.interrupted_calls == [texts]
        assert interruptible.calls[0] == ["search"]
        np.testing.assert_array_equal(result.value.vectors, np.concatenate([alone(interruptible, t) for t in texts]))
    finally:
        await asyncio.to_thread(scheduler.close)


async def test_another_models_interactive_work_interrupts_batch_work_through_the_gate(
    interruptible: InterruptibleBackend, backend: RecordingBackend
) -> None:
    gate = ComputeGate()
    bulk_model = ModelScheduler("bulk", interruptible, gate, batching=BatchingSpec(quiet_seconds=0))
    search_model = ModelScheduler("search", backend, gate)
    try:
        interruptible.entered.clear()
        bulk = asyncio.create_task(bulk_model.embed([f"t{i}" for i in range(32)], truncate=False, lane=BATCH))
        await asyncio.to_thread(interruptible.entered.wait, 5)
        await asyncio.sleep(0.02)
        searched = await search_model.embed(["search"], truncate=False)
        assert searched.queued_seconds < 0.05
        result = await bulk
        # Once for the arrival; perhaps once more, just after starting again, when the search's
        # thread asks for its turn.
        assert bulk_model.interrupted >= 1
        assert result.value.vectors.shape == (32, 8)
    finally:
        await asyncio.to_thread(bulk_model.close)
        await asyncio.to_thread(search_model.close)


def test_a_turn_made_interruptible_after_interactive_work_arrived_is_interrupted_at_once() -> None:
    gate = ComputeGate()
    calls: list[str] = []
    with gate.turn(BATCH):
        gate.allow_interrupt(lambda: calls.append("quiet"))
        assert calls == []
    with gate.turn(BATCH):
        gate.interactive_arrived()  # came after the turn began, before the holder allowed it
        gate.allow_interrupt(lambda: calls.append("late"))
    assert calls == ["late"]
    assert gate.quiet_seconds() < 1


async def test_interruptions_are_counted_for_the_metrics(interruptible: InterruptibleBackend) -> None:
    from wafer.metrics import Metrics

    metrics = Metrics(models=["m"])
    scheduler = ModelScheduler(
        "m", interruptible, ComputeGate(), batching=BatchingSpec(quiet_seconds=0), observer=metrics
    )
    try:
        interruptible.entered.clear()
        bulk = asyncio.create_task(scheduler.embed([f"bulk {i}" for i in range(32)], truncate=False, lane=BATCH))
        await asyncio.to_thread(interruptible.entered.wait, 5)
        await asyncio.sleep(0.02)
        await scheduler.embed(["search"], truncate=False)
        await bulk
        assert metrics.registry.get_sample_value("wafer_batch_interruptions_total", {"model": "m"}) == 1
        assert metrics.registry.get_sample_value("wafer_batch_size_count", {"model": "m", "task": "embed"}) == 2
    finally:
        await asyncio.to_thread(scheduler.close)


async def test_while_interactive_work_keeps_coming_batch_work_moves_in_micro_batches(
    interruptible: InterruptibleBackend,
) -> None:
    """Micro-batches are not interrupted: a stream of searches slows a bulk request, never stalls it."""
    scheduler = ModelScheduler("m", interruptible, ComputeGate(), batching=BatchingSpec(quiet_seconds=60))
    try:
        await scheduler.embed(["first search"], truncate=False)  # the machine is busy from now on
        bulk = asyncio.create_task(scheduler.embed([f"bulk {i}" for i in range(24)], truncate=False, lane=BATCH))
        waits = []
        while not bulk.done():
            waits.append((await scheduler.embed(["search"], truncate=False)).queued_seconds)
        await bulk
        assert scheduler.interrupted == 0
        assert max(len(call) for call in interruptible.calls if call[0].startswith("bulk")) < 24
        # Each search waited for at most the micro-batch in progress (10 ms target; 5 ms per text).
        assert len(waits) > 3 and max(waits) < 0.1
    finally:
        await asyncio.to_thread(scheduler.close)


# -- tokenizing on arrival -----------------------------------------------------------------------


class TokenizingBackend(RecordingBackend):
    """Tokenizes ahead, as the ONNX backend does: one token per word plus two, counted exactly."""

    tokenizes_ahead = True

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.tokenized_on: list[int] = []
        # (requests, truncate) of each joint tokenizer call.
        self.joint_calls: list[tuple[int, bool]] = []

    def tokenize(self, texts: Sequence[str], *, truncate: bool) -> Tokenized:
        self.tokenized_on.append(threading.get_ident())
        counts = []
        for i, text in enumerate(texts):
            tokens = self.count_tokens(text)
            if tokens > self.spec.max_tokens and not truncate:
                raise InputTooLongError(i, tokens, self.spec.max_tokens, self.spec.name)
            counts.append(min(tokens, self.spec.max_tokens))
        return Tokenized(items=list(texts), token_counts=counts)

    def tokenize_each(self, requests: Sequence[Sequence[str]], *, truncate: bool) -> list[Tokenized | Exception]:
        self.joint_calls.append((len(requests), truncate))
        return super().tokenize_each(requests, truncate=truncate)

    def embed_tokenized(self, tokenized: Tokenized) -> Embeddings:
        texts = [str(item) for item in tokenized.items]
        self.calls.append(texts)
        self.entered.set()
        if not self.hold.wait(10):
            raise TimeoutError("the test never released the backend")
        return FakeBackend._embed(self, texts, truncate=True)


class TokenizationObserver:
    def __init__(self) -> None:
        self.tokenized: list[float] = []

    def record_batch(self, model: str, task: Task, size: int, tokens: int) -> None:
        pass

    def record_instance_call(self, model: str, instance: int, size: int, seconds: float) -> None:
        pass

    def record_interruption(self, model: str) -> None:
        pass

    def record_tokenization(self, model: str, seconds: float) -> None:
        self.tokenized.append(seconds)

    def record_prompt_cache(self, model: str, cached_tokens: int) -> None:
        pass


async def test_requests_are_tokenized_off_the_event_loop_and_batched_by_exact_token_counts(
    open_gate: None,
) -> None:
    backend = TokenizingBackend(spec(max_tokens=100))
    observer = TokenizationObserver()
    scheduler = ModelScheduler(
        "m", backend, ComputeGate(), batching=BatchingSpec(max_batch_tokens=30), max_tokens=100, observer=observer
    )
    try:
        held = await hold_backend(backend, scheduler)
        # 10 one-letter words: 12 exact tokens, though 20 characters would estimate 7. Two fit 30.
        short_words = " ".join("a" * 10)
        tasks = [asyncio.create_task(scheduler.embed([short_words + f" {i}"], truncate=False)) for i in range(6)]
        await asyncio.sleep(0.05)
        backend.hold.set()
        results = await asyncio.gather(held, *tasks)
        assert [len(call) for call in backend.calls[1:]] == [2, 2, 2]
        assert threading.get_ident() not in backend.tokenized_on
        for result in results[1:]:
            assert isinstance(result, Scheduled)
            assert result.value.token_counts == [13]
            assert result.tokenize_seconds > 0
        assert len(observer.tokenized) == 7 and all(seconds > 0 for seconds in observer.tokenized)
        first = results[1]
        assert isinstance(first, Scheduled)
        np.testing.assert_array_equal(
            first.value.vectors, FakeBackend._embed(backend, [short_words + " 0"], truncate=True).vectors
        )
        # Bad input is refused on arrival: it never queues, and never reaches the model's thread.
        calls = len(backend.calls)
        with pytest.raises(InputTooLongError):
            await scheduler.embed(["word " * 200], truncate=False)
        assert len(backend.calls) == calls
    finally:
        backend.hold.set()
        await asyncio.to_thread(scheduler.close)


async def test_requests_arriving_together_are_tokenized_in_one_call_and_fail_alone(open_gate: None) -> None:
    backend = TokenizingBackend(spec(max_tokens=10))
    backend.hold.set()
    scheduler = ModelScheduler("m", backend, ComputeGate(), max_tokens=10)
    try:
        # Started in the same turn of the event loop, as a burst of RPCs is.
        calls = [scheduler.embed([f"word {i}"], truncate=False) for i in range(5)]
        calls.insert(2, scheduler.embed(["word " * 20], truncate=False))
        calls.append(scheduler.embed(["word " * 20], truncate=True))
        results = await asyncio.gather(*calls, return_exceptions=True)
        # One call per truncation setting, not one per request.
        assert sorted(backend.joint_calls) == [(1, True), (6, False)]
        assert isinstance(results[2], InputTooLongError)
        for i in (0, 1, 3, 4, 5):
            result = results[i]
            assert isinstance(result, Scheduled)
            assert result.value.token_counts == [4]
            assert result.tokenize_seconds > 0
        last = results[6]
        assert isinstance(last, Scheduled) and last.value.token_counts == [10]
        # Every request that passed ran; the refused one never reached the model.
        assert sum(len(call) for call in backend.calls) == 6
        # Requests that come later get a call of their own.
        await scheduler.embed(["later"], truncate=False)
        assert len(backend.joint_calls) == 3
    finally:
        await asyncio.to_thread(scheduler.close)


# -- instances -----------------------------------------------------------------------------------


async def hold_both(
    first: RecordingBackend, second: RecordingBackend, scheduler: ModelScheduler
) -> list[asyncio.Task[object]]:
    """Keep both instances busy, one holder each (sent one after the other: together they would merge)."""
    holders: list[asyncio.Task[object]] = []
    for i in range(2):
        holders.append(asyncio.create_task(scheduler.embed([f"holder {i}"], truncate=False)))
        for _ in range(500):
            if first.entered.is_set() + second.entered.is_set() > i:
                break
            await asyncio.sleep(0.01)
    assert first.entered.is_set() and second.entered.is_set()
    return holders


async def test_merged_batches_go_to_a_free_instance_and_run_side_by_side(open_gate: None) -> None:
    first, second = RecordingBackend(spec()), RecordingBackend(spec())
    scheduler = ModelScheduler("m", [first, second], ComputeGate(), max_tokens=12)
    try:
        assert scheduler.instances == 2
        # Both threads are idle at first: hold whichever instance takes the first request.
        second.hold.clear()
        first.hold.clear()
        held = asyncio.create_task(scheduler.embed(["holder"], truncate=False))
        for _ in range(500):
            if first.entered.is_set() or second.entered.is_set():
                break
            await asyncio.sleep(0.01)
        if second.entered.is_set():
            first, second = second, first
        second.hold.set()
        # The first instance is busy: the second computes meanwhile, in the same gate turn's time.
        result = await asyncio.wait_for(scheduler.embed(["beside", "it"], truncate=False), 5)
        assert second.calls == [["beside", "it"]]
        np.testing.assert_array_equal(
            result.value.vectors, np.concatenate([alone(second, "beside"), alone(second, "it")])
        )
        assert not held.done()
        first.hold.set()
        await held
        assert first.calls == [["holder"]]
    finally:
        first.hold.set()
        await asyncio.to_thread(scheduler.close)


async def test_each_instance_reports_its_calls_and_busy_time_to_the_metrics(open_gate: None) -> None:
    from wafer.metrics import Metrics

    metrics = Metrics(models=["m"])
    first, second = RecordingBackend(spec()), RecordingBackend(spec())
    scheduler = ModelScheduler("m", [first, second], ComputeGate(), max_tokens=12, observer=metrics)
    try:
        first.hold.clear()
        second.hold.clear()
        holders = await hold_both(first, second, scheduler)
        # One more request waits for a free instance; it runs as a call of 3 texts.
        waiting = asyncio.create_task(scheduler.embed(["a", "b", "c"], truncate=False))
        await asyncio.sleep(0.05)
        first.hold.set()
        second.hold.set()
        await asyncio.gather(*holders, waiting)
    finally:
        first.hold.set()
        second.hold.set()
        await asyncio.to_thread(scheduler.close)

    def sample(name: str, instance: str, **labels: str) -> float:
        value = metrics.registry.get_sample_value(name, {"model": "m", "instance": instance, **labels})
        return 0.0 if value is None else value

    counts = [sample("wafer_instance_batch_size_count", str(i)) for i in range(2)]
    assert sorted(counts) == [1, 2]  # the holders, one each; the three texts on whichever was free first
    assert sum(sample("wafer_instance_batch_size_sum", str(i)) for i in range(2)) == 5
    threes = [sample("wafer_instance_batch_size_bucket", str(i), le="3.0") for i in range(2)]
    twos = [sample("wafer_instance_batch_size_bucket", str(i), le="2.0") for i in range(2)]
    assert sum(threes) - sum(twos) == 1  # sizes are counted exactly up to 16
    # The holders were held past 0.05 s on both instances.
    assert all(sample("wafer_instance_busy_seconds_total", str(i)) >= 0.04 for i in range(2))


async def test_calls_and_streams_run_only_on_the_models_own_instance(open_gate: None) -> None:
    first, second = RecordingBackend(spec()), RecordingBackend(spec())
    scheduler = ModelScheduler("m", [first, second], ComputeGate(), max_tokens=12)
    try:
        for instance in (first, second):
            instance.hold.clear()
            instance.entered.clear()
        holders = await hold_both(first, second, scheduler)
        second.hold.set()
        await asyncio.sleep(0.05)
        call = asyncio.create_task(scheduler.run(lambda: threading.current_thread().name))
        await asyncio.sleep(0.1)
        # The second instance is free, yet the call waits for the first: callers close over it.
        assert not call.done()
        first.hold.set()
        await asyncio.gather(*holders)
        assert (await call).value == "wafer-m"

        def steps(cancelled: Callable[[], bool]) -> Iterator[str]:
            yield threading.current_thread().name

        assert [item async for item in scheduler.stream(steps)] == ["wafer-m"]
    finally:
        first.hold.set()
        await asyncio.to_thread(scheduler.close)


async def test_across_instances_interactive_work_is_taken_before_batch_work(open_gate: None) -> None:
    first, second = RecordingBackend(spec()), RecordingBackend(spec())
    scheduler = ModelScheduler("m", [first, second], ComputeGate(), max_tokens=12)
    try:
        # Both instances busy (which holder lands on which instance is up to the threads).
        for instance in (first, second):
            instance.hold.clear()
            instance.entered.clear()
        holders = await hold_both(first, second, scheduler)
        batch = asyncio.create_task(scheduler.embed(["bulk"], truncate=False, lane=BATCH))
        await asyncio.sleep(0.05)
        interactive = asyncio.create_task(scheduler.embed(["search"], truncate=False))
        await asyncio.sleep(0.05)
        second.hold.set()  # one instance frees up: it takes the later, interactive request first
        await interactive
        assert second.calls[1] == ["search"]
        first.hold.set()
        await asyncio.gather(*holders, batch)
        assert ["bulk"] in first.calls[1:] + second.calls[2:]
    finally:
        first.hold.set()
        second.hold.set()
        await asyncio.to_thread(scheduler.close)


async def test_interactive_work_interrupts_full_batches_on_every_instance(open_gate: None) -> None:
    first, second = InterruptibleBackend(spec()), InterruptibleBackend(spec())
    for instance in (first, second):
        instance.seconds_per_text = 0.01
    scheduler = ModelScheduler(
        "m", [first, second], ComputeGate(), batching=BatchingSpec(quiet_seconds=0, max_batch_size=32)
    )
    try:
        texts = [f"bulk {i}" for i in range(64)]
        bulk = [
            asyncio.create_task(scheduler.embed(texts[:32], truncate=False, lane=BATCH)),
            asyncio.create_task(scheduler.embed(texts[32:], truncate=False, lane=BATCH)),
        ]
        await asyncio.to_thread(first.entered.wait, 5)
        await asyncio.to_thread(second.entered.wait, 5)
        await asyncio.sleep(0.03)
        searched = await scheduler.embed(["search"], truncate=False)
        assert searched.queued_seconds < 0.2
        results = await asyncio.gather(*bulk)
        assert first.interrupted_calls and second.interrupted_calls
        assert scheduler.interrupted >= 2
        for part, result in zip((texts[:32], texts[32:]), results, strict=True):
            np.testing.assert_array_equal(result.value.vectors, np.concatenate([alone(first, t) for t in part]))
    finally:
        await asyncio.to_thread(scheduler.close)


def test_one_owners_turns_are_held_together_until_another_owner_waits() -> None:
    gate = ComputeGate()
    model, other = object(), object()
    inside = threading.Barrier(2, timeout=5)
    order: list[str] = []
    release = threading.Event()

    def instance(name: str) -> None:
        with gate.turn(BATCH, owner=model):
            order.append(name)
            inside.wait()  # both instances hold a turn at once, or this times out
            release.wait(5)

    def another(name: str, owner: object | None) -> None:
        with gate.turn(BATCH, owner=owner):
            order.append(name)

    threads = [threading.Thread(target=instance, args=(name,)) for name in ("a1", "a2")]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    assert sorted(order) == ["a1", "a2"]
    # Another model waits: a third instance of the first one may not join ahead of it.
    waiter = threading.Thread(target=another, args=("b", other))
    waiter.start()
    time.sleep(0.05)
    late = threading.Thread(target=another, args=("a3", model))
    late.start()
    time.sleep(0.05)
    assert sorted(order) == ["a1", "a2"]
    release.set()
    for thread in (*threads, waiter, late):
        thread.join(5)
    assert order[2:] == ["b", "a3"]


async def test_tokenization_time_reaches_the_prometheus_histogram(open_gate: None) -> None:
    from wafer.metrics import Metrics

    metrics = Metrics(models=["m"])
    backend = TokenizingBackend(spec())
    scheduler = ModelScheduler("m", backend, ComputeGate(), observer=metrics)
    try:
        await scheduler.embed(["one text", "and another"], truncate=True)
        await scheduler.embed(["a third"], truncate=True)
    finally:
        await asyncio.to_thread(scheduler.close)
    assert metrics.registry.get_sample_value("wafer_tokenization_seconds_count", {"model": "m"}) == 2
    total = metrics.registry.get_sample_value("wafer_tokenization_seconds_sum", {"model": "m"})
    assert total is not None and total > 0
