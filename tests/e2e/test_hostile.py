"""Hostile and clumsy clients (issue 13), against a real server: every case gets its answer, and
afterwards the server still answers health and a small Embed within a second."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess, start_server
from wafer_client import JsonlSource, SqliteSource, WaferClient, WaferError

pytestmark = pytest.mark.e2e

GRACE_SECONDS = 3
# A recursive query that never ends: rows forever, or with `WHERE x < 0` no row, ever.
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x AS id, 'a' AS text FROM c"
LONG_DOCUMENT = " ".join(f"word{i % 97} of a long document about nothing" for i in range(300))  # ~1,500 words


def assert_still_serving(address: str) -> None:
    """Health and a one-text Embed each answer within a second."""
    with WaferClient(address, timeout=5, retries=0) as client:
        started = time.monotonic()
        assert client.health() == "SERVING"
        assert time.monotonic() - started < 1, "health took over a second"
        started = time.monotonic()
        assert client.embed("still there?").vectors.shape == (1, 384)
        assert time.monotonic() - started < 1, "a small Embed took over a second"


def one_table_db(folder: Path) -> Path:
    db = folder / "one.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()
    return db


def exits_within(server: ServerProcess, seconds: float) -> float:
    """Sends SIGTERM; returns how long the process took to exit (fails past `seconds`)."""
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        assert server.process.wait(seconds) == 0
    except Exception:
        server.process.kill()
        server.process.wait()
        raise AssertionError(f"the server did not exit within {seconds} s of SIGTERM") from None
    return time.monotonic() - started


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    (tmp_path / "corpora").mkdir()
    server = start_server(
        tmp_path / "data",
        env={
            "WAFER_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
            "WAFER_JOBS_ALLOWED_ROOTS": f'["{tmp_path / "corpora"}"]',
            "WAFER_JOBS_SQLITE_QUERY_SECONDS": "2",
        },
    )
    yield server
    server.stop()


# -- SIGTERM during each kind of long work: exit within the grace period plus 5 s ----------------------


def in_background(call: Callable[[], object]) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(WaferError):  # the server went away under it: expected
            call()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigterm_during_a_sqlite_count_that_never_ends(fresh_server: ServerProcess, tmp_path: Path) -> None:
    db = one_table_db(tmp_path / "corpora")
    with WaferClient(fresh_server.address, timeout=30, retries=0) as client:
        job = client.submit_job("endless", SqliteSource(path=str(db), query=ENDLESS))
        time.sleep(1.5)
        assert client.get_job(job.id).total is None, "still counting"
    exits_within(fresh_server, GRACE_SECONDS + 5)


def test_sigterm_during_an_llm_rerank(fresh_server: ServerProcess) -> None:
    def rerank() -> None:
        with WaferClient(fresh_server.address, timeout=600, retries=0) as client:
            client.rerank("what is it about?", [LONG_DOCUMENT] * 40, model="smollm2", truncate=True)

    thread = in_background(rerank)
    time.sleep(3)  # the judge is on its first documents
    assert thread.is_alive()
    exits_within(fresh_server, GRACE_SECONDS + 5)


def test_sigterm_during_a_pooled_long_input(fresh_server: ServerProcess) -> None:
    text = LONG_DOCUMENT * 200  # ~2 MB: thousands of windows

    def pooled() -> None:
        with WaferClient(fresh_server.address, timeout=600, retries=0) as client:
            client.embed(text, pool_chunks=True)

    thread = in_background(pooled)
    time.sleep(3)
    assert thread.is_alive()
    exits_within(fresh_server, GRACE_SECONDS + 5)


# -- work nobody waits for stops ---------------------------------------------------------------------


def test_an_abandoned_llm_rerank_frees_the_models(fresh_server: ServerProcess) -> None:
    with WaferClient(fresh_server.address, timeout=2, retries=0) as client:
        with pytest.raises(WaferError) as refused:
            client.rerank("what is it about?", [LONG_DOCUMENT] * 40, model="smollm2", truncate=True)
        assert refused.value.code.name == "DEADLINE_EXCEEDED"
    # The judge stops within one decode of the deadline; then other models and the judge's own
    # model are free again.
    started = time.monotonic()
    with WaferClient(fresh_server.address, timeout=30, retries=0) as client:
        client.embed("right after")
        assert time.monotonic() - started < 5
        chunks = list(client.generate("Hello", model="smollm2", max_tokens=4, temperature=0))
        assert chunks[-1].finish_reason is not None
        assert time.monotonic() - started < 10, "Generate waited for the abandoned rerank"
    assert_still_serving(fresh_server.address)


def test_an_abandoned_pooled_embed_stops(fresh_server: ServerProcess) -> None:
    with WaferClient(fresh_server.address, timeout=2, retries=0) as client:
        with pytest.raises(WaferError) as refused:
            client.embed(LONG_DOCUMENT * 200, pool_chunks=True)
        assert refused.value.code.name == "DEADLINE_EXCEEDED"
    time.sleep(1.5)
    assert_still_serving(fresh_server.address)


def test_submit_jobs_with_a_query_that_returns_no_row(fresh_server: ServerProcess, tmp_path: Path) -> None:
    db = one_table_db(tmp_path / "corpora")
    with WaferClient(fresh_server.address, timeout=30, retries=0) as client:
        for _ in range(3):
            with pytest.raises(WaferError) as refused:
                client.submit_job("never", SqliteSource(path=str(db), query=ENDLESS + " WHERE x < 0"))
            assert refused.value.code.name == "INVALID_ARGUMENT"
            assert "jobs_sqlite_query_seconds" in str(refused.value)
    assert_still_serving(fresh_server.address)


def test_cancelling_a_job_stuck_in_its_count_frees_the_slot(fresh_server: ServerProcess, tmp_path: Path) -> None:
    db = one_table_db(tmp_path / "corpora")
    (tmp_path / "corpora" / "small.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    with WaferClient(fresh_server.address, timeout=30, retries=0) as client:
        stuck = client.submit_job("endless", SqliteSource(path=str(db), query=ENDLESS))
        time.sleep(1)
        assert client.cancel_job(stuck.id).state == "cancelled"
        small = client.submit_job("small", JsonlSource(path=str(tmp_path / "corpora" / "small.jsonl")))
        deadline = time.monotonic() + 30
        while client.get_job(small.id).state != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get_job(small.id).state == "succeeded"
    assert_still_serving(fresh_server.address)
