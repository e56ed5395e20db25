"""How many threads a GGUF generation step uses under outside load."""

from __future__ import annotations

import time

import pytest

from wafer.backends.gguf.streams import OutsideLoad, machine_busy_seconds, own_busy_seconds, threads_for_load


@pytest.mark.parametrize(
    ("others", "expected"),
    [
        (0.0, 2),  # idle machine: every core
        (0.3, 2),  # a client reading its stream, a shell: not worth a core
        (1.0, 1),  # one core busy elsewhere: the measurement, 1 thread kept 52.8 tokens/s
        (0.6, 1),  # most of a core
        (14.0, 1),  # a crowded machine: never fewer than one
    ],
)
def test_threads_follow_the_cores_others_leave_free(others: float, expected: int) -> None:
    assert threads_for_load(2, others, cores=2) == expected


def test_never_more_than_the_models_threads() -> None:
    assert threads_for_load(2, 0.0, cores=8) == 2
    assert threads_for_load(4, 3.0, cores=8) == 4
    assert threads_for_load(4, 5.0, cores=8) == 3


class Clocks:
    """CPU and wall seconds a test moves by hand."""

    def __init__(self) -> None:
        self.wall = self.machine = self.own = 0.0

    def run(self, seconds: float, *, own_cores: float, other_cores: float) -> None:
        self.wall += seconds
        self.own += own_cores * seconds
        self.machine += (own_cores + other_cores) * seconds


def test_the_process_own_work_is_not_outside_load() -> None:
    """The engine's own threads never read as someone else's: the 1-minute load average counted
    them, and a step down to one thread kept itself there."""
    clocks = Clocks()
    outside = OutsideLoad(lambda: clocks.machine, lambda: clocks.own, lambda: clocks.wall)
    clocks.run(2.0, own_cores=2.0, other_cores=0.0)
    assert outside() == 0.0
    clocks.run(1.0, own_cores=1.0, other_cores=1.0)
    assert outside() == pytest.approx(1.0)
    clocks.run(1.0, own_cores=1.0, other_cores=0.0)  # the other process left: seen at once
    assert outside() == 0.0


def test_a_reading_over_an_idle_engines_past_says_nothing() -> None:
    """After a long idle time, a burst of someone else's minutes ago does not slow a new answer's
    first tokens: the reading is None, and the next one covers the last second only."""
    clocks = Clocks()
    outside = OutsideLoad(lambda: clocks.machine, lambda: clocks.own, lambda: clocks.wall, max_window=3.0)
    clocks.run(20.0, own_cores=0.0, other_cores=2.0)
    clocks.run(10.0, own_cores=0.0, other_cores=0.0)
    assert outside() is None
    clocks.run(1.0, own_cores=2.0, other_cores=0.0)
    assert outside() == 0.0


def test_the_readings_count_this_process() -> None:
    """The real readings: a process spinning on a core shows in its own time and the machine's."""
    own, machine = own_busy_seconds(), machine_busy_seconds()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        sum(range(1000))
    own_spent = own_busy_seconds() - own
    assert own_spent >= 0.15
    assert machine_busy_seconds() - machine >= 0.15
