"""How many threads a GGUF generation step uses under outside load."""

from __future__ import annotations

import pytest

from wafer.backends.gguf_streams import threads_for_load


@pytest.mark.parametrize(
    ("load", "current", "expected"),
    [
        (0.0, 2, 2),  # idle machine: every core
        (2.1, 2, 2),  # the load is our own two threads
        (3.0, 2, 1),  # one core busy elsewhere: the measurement, 1 thread kept 52.8 tokens/s
        (2.0, 1, 1),  # still one core busy elsewhere while we run one thread
        (1.0, 1, 2),  # the other process left: back to two
        (16.0, 1, 1),  # a crowded machine: never fewer than one
    ],
)
def test_threads_follow_the_cores_others_leave_free(load: float, current: int, expected: int) -> None:
    assert threads_for_load(2, current, load, cores=2) == expected


def test_never_more_than_the_models_threads() -> None:
    assert threads_for_load(2, 2, 0.0, cores=8) == 2
    assert threads_for_load(4, 1, 3.0, cores=8) == 4
    assert threads_for_load(4, 4, 9.0, cores=8) == 3
