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

A model may run as several instances, each on its own thread with its own share of the cores
(`instances:` in models.yaml). Their turns name the model as their `owner`: while one instance
holds a turn, another instance of the same model may join it, and they compute side by side on
their shares, unless another model waits in a lane at least as urgent (then the holders finish
and that model goes next). Every holder may make its turn interruptible.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from wafer.domain import Priority


@dataclass(eq=False, slots=True)
class _Ticket:
    owner: object | None


@dataclass(slots=True)
class _Holder:
    owner: object | None
    granted: float
    interrupt: Callable[[], None] | None = None


class ComputeGate:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._lanes: dict[Priority, deque[_Ticket]] = {lane: deque() for lane in Priority}
        # The turns being held, by the thread that holds each.
        self._holders: dict[int, _Holder] = {}
        self._interactive_seen = float("-inf")

    @contextlib.contextmanager
    def turn(self, lane: Priority = Priority.INTERACTIVE, *, owner: object | None = None) -> Iterator[None]:
        """Wait for a turn in `lane` and hold it for the block. Turns of the same `owner` (one
        model's instances) may be held at once; turns without an owner are always alone."""
        ticket = _Ticket(owner)
        holder = threading.get_ident()
        with self._changed:
            if lane is Priority.INTERACTIVE:
                self._note_interactive()
            queue = self._lanes[lane]
            queue.append(ticket)
            while not self._may_enter(ticket, lane):
                self._changed.wait()
            queue.remove(ticket)
            self._holders[holder] = _Holder(owner, time.monotonic())
            # Another instance of the same owner may now be free to join.
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                del self._holders[holder]
                self._changed.notify_all()

    def _may_enter(self, ticket: _Ticket, lane: Priority) -> bool:
        if not self._holders:
            return self._next() is ticket
        if ticket.owner is None or any(held.owner is not ticket.owner for held in self._holders.values()):
            return False
        # Joining the owner's turn must not pass another owner's ticket in a lane as urgent.
        for each in Priority:  # declared interactive first
            if any(waiting.owner is not ticket.owner for waiting in self._lanes[each]):
                return False
            if each is lane:
                break
        return True

    def allow_interrupt(self, interrupt: Callable[[], None]) -> None:
        """Make the turn the caller holds interruptible: `interrupt` is called, from another
        thread, if interactive work arrives before the turn ends; at once if some already has."""
        with self._changed:
            held = self._holders.get(threading.get_ident())
            if held is None:  # no turn held (a gate that grants none): nothing to cut short
                return
            if self._lanes[Priority.INTERACTIVE] or self._interactive_seen >= held.granted:
                interrupt()
            else:
                held.interrupt = interrupt

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
        for held in self._holders.values():
            if held.interrupt is not None:
                held.interrupt()
                held.interrupt = None  # once is enough

    @property
    def busy(self) -> bool:
        """Whether a turn is held or asked for now, so that a turn asked for next may wait: a hint,
        read without the lock."""
        return bool(self._holders) or any(self._lanes.values())

    def waiting(self, lane: Priority) -> int:
        """Turns asked for in `lane` and not granted yet."""
        return len(self._lanes[lane])

    def _next(self) -> _Ticket | None:
        for lane in Priority:  # declared interactive first
            if self._lanes[lane]:
                return self._lanes[lane][0]
        return None
