"""One worker thread per loaded model.

A llama.cpp context must never be entered from two threads, and on two cores one model running
one batch at a time is also the fastest schedule; so every call into a backend goes through its
model's worker. Context variables (structlog's request context) are carried into the thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class ModelWorker:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wafer-{name}")

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker thread and wait for its result."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(self._executor, ctx.run, fn)

    async def stream(self, start: Callable[[Callable[[], bool]], Iterator[T]]) -> AsyncIterator[T]:
        """Drive the iterator `start(cancelled)` on the worker thread, yielding its items here.

        If the consumer stops early (the client cancelled), `cancelled()` turns true and the
        backend ends at its next step, freeing the worker for the next request.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()
        ctx = contextvars.copy_context()

        def produce() -> None:
            try:
                for item in start(stop.is_set):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                    if stop.is_set():
                        break
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
            await asyncio.shield(future)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
