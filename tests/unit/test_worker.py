from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from wafer.worker import ComputeGate, ModelWorker


def test_gate_grants_turns_in_arrival_order() -> None:
    gate = ComputeGate()
    order: list[int] = []
    holding = threading.Event()
    release = threading.Event()

    def first() -> None:
        with gate.turn():
            holding.set()
            release.wait(5)
            order.append(0)

    def later(i: int) -> None:
        with gate.turn():
            order.append(i)

    threads = [threading.Thread(target=first)]
    threads[0].start()
    holding.wait(5)
    for i in range(1, 6):
        thread = threading.Thread(target=later, args=(i,))
        thread.start()
        threads.append(thread)
        time.sleep(0.02)  # let each one queue before the next
    release.set()
    for thread in threads:
        thread.join(5)
    assert order == [0, 1, 2, 3, 4, 5]


async def test_a_short_call_runs_between_two_steps_of_a_long_stream() -> None:
    """Turns are one step long: another model's call does not wait for a whole generation."""
    gate = ComputeGate()
    generator, embedder = ModelWorker("gen", gate), ModelWorker("emb", gate)
    events: list[str] = []
    first_step = threading.Event()

    def steps(cancelled: Callable[[], bool]) -> Iterator[int]:
        for i in range(20):
            time.sleep(0.01)
            events.append(f"step {i}")
            first_step.set()
            yield i

    async def consume() -> list[int]:
        return [item async for item in generator.stream(steps)]

    streaming = asyncio.create_task(consume())
    await asyncio.to_thread(first_step.wait, 5)
    await embedder.run(lambda: events.append("embed"))
    assert await streaming == list(range(20))
    assert 0 < events.index("embed") < len(events) - 5
    generator.close()
    embedder.close()


async def test_a_consumer_that_stops_early_stops_the_producer() -> None:
    worker = ModelWorker("gen", ComputeGate())
    produced: list[int] = []

    def steps(cancelled: Callable[[], bool]) -> Iterator[int]:
        for i in range(1000):
            if cancelled():
                return
            time.sleep(0.002)
            produced.append(i)
            yield i

    stream = worker.stream(steps)
    async for item in stream:
        if item == 3:
            break
    await stream.aclose()
    assert len(produced) < 100, "the producer should stop soon after the consumer"
    worker.close()


async def test_errors_reach_the_caller() -> None:
    worker = ModelWorker("m", ComputeGate())

    def fail() -> None:
        raise ValueError("boom")

    def broken(cancelled: Callable[[], bool]) -> Iterator[int]:
        yield 1
        raise ValueError("mid-stream")

    with pytest.raises(ValueError, match="boom"):
        await worker.run(fail)
    received = []
    with pytest.raises(ValueError, match="mid-stream"):
        async for item in worker.stream(broken):
            received.append(item)
    assert received == [1]
    worker.close()


async def test_a_call_abandoned_while_queued_does_not_run() -> None:
    gate = ComputeGate()
    worker = ModelWorker("m", gate)
    ran: list[str] = []
    release = threading.Event()

    def hold_the_gate() -> None:
        with gate.turn():
            release.wait(5)

    holder = threading.Thread(target=hold_the_gate)
    holder.start()
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(worker.run(lambda: ran.append("ran")))
    await asyncio.sleep(0.05)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    release.set()
    holder.join(5)
    await worker.run(lambda: ran.append("later"))
    assert ran == ["later"]
    worker.close()
