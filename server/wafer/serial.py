"""One thread that runs calls one at a time, in the order they were given.

For what must never be entered from two threads at once, or whose writes must land in the order
the event loop took them: the embedding cache's SQLite connection, the embedded Qdrant client, the
job records on disk, one run of a job's source reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class SerialExecutor:
    """A single worker thread, named `name` (with the `_0` suffix ThreadPoolExecutor adds). Calls
    run in the order they were submitted, never two at once; a call submitted while one runs queues
    behind it."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the thread and wait for it without holding up the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the thread and block until it returns (for callers off the event loop)."""
        return self._pool.submit(fn).result()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Queue `fn` behind what is running and return at once."""
        return self._pool.submit(fn)

    def close(self, *, wait: bool = True) -> None:
        """Take no more calls; queued ones still run. With `wait`, block until they have; without,
        the thread ends by itself once they have (a call under way cannot be interrupted)."""
        self._pool.shutdown(wait=wait)
