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


# -- bad input gets INVALID_ARGUMENT, and the server keeps serving ---------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("hostile")
    (root / "corpora").mkdir()
    server = start_server(
        root / "data",
        env={"WAFER_JOBS_ALLOWED_ROOTS": f'["{root / "corpora"}"]', "WAFER_MAX_PAYLOAD_BYTES": "100000"},
    )
    with WaferClient(server.address, timeout=60, retries=0) as client:
        client.upsert("base", [{"id": "a", "text": "hello there", "payload": {"n": 1}}])
    yield server, root
    server.stop()


def refused(address: str, call: Callable[[WaferClient], object], code: str = "INVALID_ARGUMENT") -> str:
    with WaferClient(address, timeout=30, retries=0) as client, pytest.raises(WaferError) as error:
        call(client)
    assert error.value.code.name == code, str(error.value)
    assert_still_serving(address)
    return str(error.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30, 2**63])
def test_filter_values_out_of_range(shared: tuple[ServerProcess, Path], value: float) -> None:
    refused(shared[0].address, lambda c: c.search("base", "hello", filter={"n": value}))


@pytest.mark.parametrize("key", ["$", "a..b", "a\x01b"])
def test_malformed_filter_keys(shared: tuple[ServerProcess, Path], key: str) -> None:
    refused(shared[0].address, lambda c: c.search("base", "hello", filter={key: 1}))


def test_a_nan_payload_value_creates_no_collection(shared: tuple[ServerProcess, Path]) -> None:
    address = shared[0].address
    refused(address, lambda c: c.upsert("nan-new", [{"id": "x", "text": "t", "payload": {"v": float("nan")}}]))
    with WaferClient(address, timeout=30, retries=0) as client:
        assert "nan-new" not in [c.name for c in client.list_collections()]


def test_a_payload_over_the_limit_creates_no_collection(shared: tuple[ServerProcess, Path]) -> None:
    address = shared[0].address
    message = refused(
        address, lambda c: c.upsert("big-new", [{"id": "x", "text": "t", "payload": {"v": "x" * 200_000}}])
    )
    assert "max_payload_bytes" in message
    with WaferClient(address, timeout=30, retries=0) as client:
        assert "big-new" not in [c.name for c in client.list_collections()]


@pytest.mark.parametrize("name", ["bad\nname", "x" * 10_000])
def test_bad_collection_names(shared: tuple[ServerProcess, Path], name: str) -> None:
    message = refused(shared[0].address, lambda c: c.upsert(name, [{"id": "x", "text": "t"}]))
    assert len(message) < 1000
    assert not (shared[0].data_dir / "edge" / name[:200]).exists()


def test_a_job_path_with_a_nul(shared: tuple[ServerProcess, Path]) -> None:
    path = str(shared[1] / "corpora" / "a\x00b.jsonl")
    refused(shared[0].address, lambda c: c.submit_job("nul", JsonlSource(path=path)))


@pytest.mark.parametrize(
    "line",
    [
        '{"id": ' + "7" * 5000 + ', "text": "t"}',
        '{"id": 1, "text": "t", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
)
def test_hostile_jsonl_lines_fail_the_job_clearly(shared: tuple[ServerProcess, Path], line: str) -> None:
    server, root = shared
    path = root / "corpora" / f"hostile-{len(line)}.jsonl"
    path.write_text(line + "\n")
    with WaferClient(server.address, timeout=30, retries=0) as client:
        job = client.submit_job("hostile", JsonlSource(path=str(path)))
        deadline = time.monotonic() + 60
        while (status := client.get_job(job.id)).state not in ("failed", "succeeded") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status.state == "failed"
        assert "line 1" in status.error
    assert_still_serving(server.address)


def test_resume_does_not_follow_a_link_out_of_the_roots(shared: tuple[ServerProcess, Path], tmp_path: Path) -> None:
    server, root = shared
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"id": "s", "text": "the secret"}\n')
    path = root / "corpora" / "swapped.jsonl"
    path.write_text('{"id": "ok", "text": "fine"}\nnot json\n')
    with WaferClient(server.address, timeout=30, retries=0) as client:
        job = client.submit_job("swapped", JsonlSource(path=str(path)))
        deadline = time.monotonic() + 60
        while client.get_job(job.id).state != "failed" and time.monotonic() < deadline:
            time.sleep(0.2)
        path.unlink()
        path.symlink_to(secret)
        client.resume_job(job.id)
        while (status := client.get_job(job.id)).state not in ("failed", "succeeded") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status.state == "failed" and "jobs_allowed_roots" in status.error
        assert "swapped" not in [c.name for c in client.list_collections()], "nothing of the secret was indexed"
    assert_still_serving(server.address)


def server_threads(server: ServerProcess) -> int:
    return sum(1 for _ in Path(f"/proc/{server.process.pid}/task").iterdir())


def test_many_collections_do_not_multiply_threads(shared: tuple[ServerProcess, Path]) -> None:
    """#16: every collection ran qdrant-edge's own search pool (8 threads here): 400 collections,
    3,219 threads. Now one thread a collection, at most WAFER_EDGE_MAX_OPEN_COLLECTIONS (32) open."""
    server, _ = shared
    before = server_threads(server)
    with WaferClient(server.address, timeout=60, retries=0) as client:
        for i in range(40):
            client.upsert(f"many-{i}", [{"id": "d", "text": f"document {i}"}])
        # Every one still answers, the closed ones opened again on demand.
        for i in range(40):
            assert [d.text for d in client.get_documents(f"many-{i}", ["d"])] == [f"document {i}"]
    # Generous: gRPC and the thread pools may grow a little under the calls.
    assert server_threads(server) - before <= 32 + 16, (before, server_threads(server))
    assert_still_serving(server.address)
