"""The compute gate: the one place that decides which model uses the CPU next.

On a small machine each model's kernels already use every core; two models computing at once
oversubscribe them and both slow down badly (bench/RESULTS.md: SmolLM2 generation fell from 102
to 2.8 tokens/s while MiniLM embedded beside it). So models take turns. A turn is one unit of work:
one merged batch, one call, or one generated token. Interactive turns are granted before batch
turns; within a lane, in arrival order. Turns are short, so a search on one model slips in between
two tokens of another model's generation or two micro-batches of a bulk job.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator

from wafer.domain import Priority


class ComputeGate:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._lanes: dict[Priority, deque[object]] = {lane: deque() for lane in Priority}
        self._busy = False

    @contextlib.contextmanager
    def turn(self, lane: Priority = Priority.INTERACTIVE) -> Iterator[None]:
        ticket = object()
        with self._changed:
            queue = self._lanes[lane]
            queue.append(ticket)
            while self._busy or self._next() is not ticket:
                self._changed.wait()
            queue.popleft()
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()

    def waiting(self, lane: Priority) -> int:
        """Turns asked for in `lane` and not granted yet."""
        return len(self._lanes[lane])

    def _next(self) -> object | None:
        for lane in Priority:  # declared interactive first
            if self._lanes[lane]:
                return self._lanes[lane][0]
        return None
