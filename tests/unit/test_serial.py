"""The serial executor: one named thread, calls in the order given, a close that queues behind a
running call."""

from __future__ import annotations

import asyncio
import threading
from functools import partial

from wafer.serial import SerialExecutor


async def test_calls_run_in_order_on_one_named_thread() -> None:
    serial = SerialExecutor("wafer-test-serial")
    try:
        seen: list[tuple[int, str]] = []

        def record(i: int) -> int:
            seen.append((i, threading.current_thread().name))
            return i

        results = await asyncio.gather(*(serial.run(partial(record, i)) for i in range(20)))
        assert results == list(range(20))
        assert [i for i, _ in seen] == list(range(20))
        assert {name for _, name in seen} == {"wafer-test-serial_0"}
        assert serial.call(lambda: threading.current_thread().name) == "wafer-test-serial_0"
    finally:
        serial.close()


async def test_close_without_wait_lets_a_queued_call_run_after_the_running_one() -> None:
    serial = SerialExecutor("wafer-test-serial")
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def running() -> None:
        started.set()
        release.wait(5)
        order.append("read")

    pending = serial.submit(running)
    assert await asyncio.to_thread(started.wait, 5)
    closed = serial.submit(lambda: order.append("close"))
    serial.close(wait=False)  # returns at once, with the read still under way
    assert order == []
    release.set()
    await asyncio.to_thread(closed.result, 5)
    assert pending.done()
    assert order == ["read", "close"]
