"""The server's shutdown sequence (`wafer.app`)."""

from __future__ import annotations

import pytest

from wafer.app import close_in_order


async def test_a_failing_part_does_not_keep_the_others_open() -> None:
    closed: list[str] = []

    async def jobs() -> None:
        closed.append("jobs")
        raise RuntimeError("a job record could not be written")

    async def registry() -> None:
        closed.append("registry")

    async def store() -> None:
        closed.append("store")

    def cache() -> None:
        closed.append("cache")
        raise OSError("disk gone")

    def metrics() -> None:
        closed.append("metrics")

    steps = [("jobs", jobs), ("registry", registry), ("store", store), ("cache", cache), ("metrics", metrics)]
    # The first failure is the one raised, after every part had its turn.
    with pytest.raises(RuntimeError, match="job record"):
        await close_in_order(steps)
    assert closed == ["jobs", "registry", "store", "cache", "metrics"]


async def test_nothing_is_raised_when_every_part_closes() -> None:
    closed: list[str] = []

    async def registry() -> None:
        closed.append("registry")

    await close_in_order([("registry", registry), ("cache", lambda: closed.append("cache"))])
    assert closed == ["registry", "cache"]
