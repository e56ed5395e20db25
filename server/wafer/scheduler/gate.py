"""The compute gate: the one place that decides which model uses the CPU next.

On a small machine each model's kernels already use every core; two models computing at once
oversubscribe them and both slow down badly (bench/RESULTS.md: SmolLM2 generation fell from 102
to 2.8 tokens/s while MiniLM embedded beside it). So models take turns. A turn is one unit of work:
one merged batch, one call, or one generated token. Interactive turns are granted before batch
turns; within a lane, in arrival order. Turns are short, so a search on one model slips in between
two tokens of another model's generation or two micro-batches of a bulk job.

The holder of a batch turn may make it *interruptible*: it gives a callback that stops its backend
call (onnxruntime checks a flag between operators). Interactive work that arrives meanwhile calls it,
so it need not wait even for the batch work in progress; the holder runs that work again later. The
gate also remembers when interactive work last asked, so schedulers can tell a quiet machine
(large batch units) from a busy one (short units that waste little when interrupted).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from wafer.domain import Priority


class ComputeGate:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._lanes: dict[Priority, deque[object]] = {lane: deque() for lane in Priority}
        self._busy = False
        self._interrupt: Callable[[], None] | None = None
        self._interactive_seen = float("-inf")
        self._granted = float("-inf")

    @contextlib.contextmanager
    def turn(self, lane: Priority = Priority.INTERACTIVE) -> Iterator[None]:
        """Wait for a turn in `lane` and hold it for the block."""
        ticket = object()
        with self._changed:
            if lane is Priority.INTERACTIVE:
                self._note_interactive()
            queue = self._lanes[lane]
            queue.append(ticket)
            while self._busy or self._next() is not ticket:
                self._changed.wait()
            queue.popleft()
            self._busy = True
            self._granted = time.monotonic()
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._interrupt = None
                self._changed.notify_all()

    def allow_interrupt(self, interrupt: Callable[[], None]) -> None:
        """Make the turn the caller holds interruptible: `interrupt` is called, from another
        thread, if interactive work arrives before the turn ends; at once if some already has."""
        with self._changed:
            if self._lanes[Priority.INTERACTIVE] or self._interactive_seen >= self._granted:
                interrupt()
            else:
                self._interrupt = interrupt

    def interactive_arrived(self) -> None:
        """Interactive work arrived for a model (it may not need the gate yet: its model's thread
        may be the one computing batch work): interrupt an interruptible turn."""
        with self._changed:
            self._note_interactive()

    def quiet_seconds(self) -> float:
        """Seconds since interactive work last arrived."""
        return time.monotonic() - self._interactive_seen

    def _note_interactive(self) -> None:
        self._interactive_seen = time.monotonic()
        if self._interrupt is not None:
            self._interrupt()
            self._interrupt = None  # once is enough

    def waiting(self, lane: Priority) -> int:
        """Turns asked for in `lane` and not granted yet."""
        return len(self._lanes[lane])

    def _next(self) -> object | None:
        for lane in Priority:  # declared interactive first
            if self._lanes[lane]:
                return self._lanes[lane][0]
        return None
