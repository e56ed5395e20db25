"""One worker thread per loaded model, and the gate that lets one model compute at a time.

A llama.cpp context must never be entered from two threads, so every call into a backend goes
through its model's worker. Context variables (structlog's request context) are carried into the
thread.

Models take turns on the CPU through one `ComputeGate`. On a small machine each model's kernels
already use every core; two models computing at once oversubscribe them and both slow down badly
(bench/RESULTS.md: SmolLM2 generation fell from 102 to 2.8 tokens/s while MiniLM embedded beside it).
Turns are one backend call or one generated token long and are granted in arrival order, so a
short embedding on another model slips in between two tokens of a long generation instead of
waiting for all of it. Calls to the same model still run one after another on its one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _AbandonedError(Exception):
    """Raised on the worker thread for a call nobody waits for any more; never seen by a caller."""


class ComputeGate:
    """A FIFO lock: whoever asked first computes next."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._waiting: deque[object] = deque()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            while self._waiting[0] is not ticket:
                self._changed.wait()
        try:
            yield
        finally:
            with self._changed:
                self._waiting.popleft()
                self._changed.notify_all()


class ModelWorker:
    def __init__(self, name: str, gate: ComputeGate) -> None:
        self._gate = gate
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wafer-{name}")
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Calls submitted here that have not started computing: queued for this worker's thread or
        waiting for their first turn of the gate (the queue depth metrics report)."""
        return self._waiting

    def _start_waiting(self) -> Callable[[], None]:
        """Count one call as waiting; the returned function ends its wait, once, from any thread.
        Both the worker thread (the turn came) and the caller (cancelled while queued, so the
        thread never ran it) call it, and only the first one counts."""
        with self._waiting_lock:
            self._waiting += 1
        waiting = True

        def stop_waiting() -> None:
            nonlocal waiting
            with self._waiting_lock:
                if waiting:
                    waiting = False
                    self._waiting -= 1

        return stop_waiting

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker thread, in one turn of the compute gate, and wait for its result."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()

        stop_waiting = self._start_waiting()
        abandoned = threading.Event()

        def in_turn() -> T:
            with self._gate.turn():
                stop_waiting()
                if abandoned.is_set():
                    # The caller went away while queued (cancelled, deadline): skip the work.
                    raise _AbandonedError
                return fn()

        try:
            return await loop.run_in_executor(self._executor, ctx.run, in_turn)
        except asyncio.CancelledError:
            abandoned.set()
            raise
        finally:
            stop_waiting()

    async def stream(self, start: Callable[[Callable[[], bool]], Iterator[T]]) -> AsyncGenerator[T, None]:
        """Drive the iterator `start(cancelled)` on the worker thread, yielding its items here.

        Each item, the first with whatever `start` prepares, is computed in its own turn of the
        gate. If the consumer stops early (the client
        cancelled), `cancelled()` turns true and the backend ends at its next step, freeing the
        worker for the next request.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()
        ctx = contextvars.copy_context()
        # A stream waits until its first turn; between tokens it is running, not queued.
        stop_waiting = self._start_waiting()

        def produce() -> None:
            try:
                items: Iterator[T] | None = None
                while not stop.is_set():
                    with self._gate.turn():
                        stop_waiting()
                        if items is None:
                            items = start(stop.is_set)
                        item = next(items, _DONE)
                    if item is _DONE:
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
            except BaseException as exc:  # handed to the consumer, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        future = loop.run_in_executor(self._executor, ctx.run, produce)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            stop.set()
            stop_waiting()  # stopped before its first turn: it will not take one
            await asyncio.shield(future)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
