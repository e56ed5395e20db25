"""Jobs against the real server process: kill -9 mid-job and resume, run policies on a fake
battery, interactive calls during a job, and the CLI."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess, start_server
from wafer_client import (
    AsyncWaferClient,
    JsonlSource,
    SqliteSource,
    UnauthenticatedError,
    UnavailableError,
    WaferClient,
)

pytestmark = pytest.mark.e2e

MESSAGES = 3000
SENDERS = ["+447700900001", "+447700900002", "+15550100", "Mum", "Bank"]
PHRASES = [
    "Are we still on for lunch tomorrow at the usual place?",
    "Running late, the train is stuck outside the station again",
    "Your parcel was delivered and left with a neighbour",
    "Can you pick up milk and bread on the way home please",
    "The meeting moved to 3pm on Thursday, room B",
    "Happy birthday! Hope you have a wonderful day",
    "Call me when you get this, it is about the car insurance",
    "WINNER! You have been selected for a free holiday, reply YES",
]


def sms_store(path: Path, n: int) -> Path:
    """An SMS-like SQLite store, shaped like a phone's: a table of messages with sender and date."""
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE sms (_id INTEGER PRIMARY KEY, address TEXT, body TEXT, date INTEGER)")
        connection.executemany(
            "INSERT INTO sms (_id, address, body, date) VALUES (?, ?, ?, ?)",
            [
                (i, SENDERS[i % len(SENDERS)], f"{PHRASES[i % len(PHRASES)]} (#{i})", 1_700_000_000 + i)
                for i in range(1, n + 1)
            ],
        )
    connection.close()
    return path


QUERY = "SELECT _id AS id, body AS text, address, date FROM sms ORDER BY _id"


def all_ids(client: WaferClient, collection: str, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        found |= {d.id for d in client.get_documents(collection, ids[start : start + 500])}
    return found


def test_a_job_survives_kill_9_and_writes_every_message_exactly_once(tmp_path: Path) -> None:
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    store = sms_store(corpora / "mmssms.db", MESSAGES)
    data = tmp_path / "data"
    env = {"WAFER_JOBS_ALLOWED_ROOTS": json.dumps([str(corpora)])}
    server = start_server(data, env=env)
    try:
        with WaferClient(server.address, timeout=30) as client:
            job = client.submit_job("sms", SqliteSource(str(store), QUERY), batch_size=32)
            for seen in client.watch_job(job.id, timeout=300):
                if seen.done >= 600 or seen.ended:
                    break
            assert not seen.ended, "the job finished before the kill: make the corpus larger"
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(timeout=30) == -signal.SIGKILL
    finally:
        server.stop()
    record = json.loads((data / "jobs" / f"{job.id}.job.json").read_text())
    assert record["state"] == "running" and 600 <= record["done"] < MESSAGES
    checkpoint = record["done"]

    restarted = start_server(data, env=env)
    try:
        with WaferClient(restarted.address, timeout=60) as client:
            resumed = client.get_job(job.id)
            # It continues from its checkpoint: nothing it had written is counted again.
            assert resumed.done >= checkpoint
            final = client.wait_job(job.id, timeout=300)
            assert final.state == "succeeded", final.error
            assert (final.done, final.total, final.skipped) == (MESSAGES, MESSAGES, 0)
            [info] = [c for c in client.list_collections() if c.name == "sms"]
            assert info.documents == MESSAGES
            expected = [str(i) for i in range(1, MESSAGES + 1)]
            assert all_ids(client, "sms", expected) == set(expected)
            [message] = client.get_documents("sms", ["42"])
            assert message.text.endswith("(#42)")
            assert message.payload["address"] == SENDERS[42 % len(SENDERS)]
            assert any('"jobs loaded"' in line and '"resumed": 1' in line for line in restarted.log_lines)
    finally:
        assert restarted.stop() == 0


@pytest.fixture(scope="module")
def power(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("power_supply")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpora")


def set_battery(root: Path, *, charging: bool) -> None:
    for name, files in (
        ("AC", {"type": "Mains", "online": "1" if charging else "0"}),
        ("BAT0", {"type": "Battery", "scope": "System", "status": "Charging" if charging else "Discharging"}),
    ):
        (root / name).mkdir(exist_ok=True)
        for key, value in files.items():
            (root / name / key).write_text(value + "\n")


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory, power: Path, corpora: Path) -> Iterator[ServerProcess]:
    set_battery(power, charging=False)
    env = {
        "WAFER_POWER_SUPPLY_ROOT": str(power),
        "WAFER_JOBS_POLICY_POLL_SECONDS": "0.1",
        "WAFER_JOBS_ALLOWED_ROOTS": json.dumps([str(corpora)]),
    }
    running = start_server(tmp_path_factory.mktemp("jobs-data"), env=env)
    yield running
    assert running.stop() == 0


def write_jsonl(path: Path, n: int) -> Path:
    lines = (
        json.dumps({"id": f"m{i}", "text": f"{PHRASES[i % len(PHRASES)]} ({i})", "label": "ham"}) for i in range(n)
    )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_when_charging_job_waits_on_battery_and_runs_on_the_charger(
    jobs_server: ServerProcess, power: Path, corpora: Path
) -> None:
    source = write_jsonl(corpora / "charging.jsonl", 200)
    set_battery(power, charging=False)
    with WaferClient(jobs_server.address, timeout=30) as client:
        job = client.submit_job("charging", JsonlSource(str(source)), when_charging=True)
        deadline = time.monotonic() + 30
        while (job := client.get_job(job.id)).state != "waiting":
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job.reason == "waiting for a charger (battery BAT0 discharging)"
        time.sleep(1.0)
        assert client.get_job(job.id).done == 0, "a waiting job does not write"
        set_battery(power, charging=True)
        final = client.wait_job(job.id, timeout=120)
        assert final.state == "succeeded" and final.done == 200


def test_interactive_embeds_stay_fast_while_a_job_runs(jobs_server: ServerProcess, corpora: Path) -> None:
    source = write_jsonl(corpora / "busy.jsonl", 4000)
    with WaferClient(jobs_server.address, timeout=30) as client:
        client.embed(["warm up"])

        def latencies(n: int) -> list[float]:
            measured = []
            for i in range(n):
                started = time.perf_counter()
                client.embed([f"where is my parcel {i}"], input_type="query")
                measured.append(time.perf_counter() - started)
            return measured

        quiet = latencies(10)
        job = client.submit_job("busy", JsonlSource(str(source)))
        while (job := client.get_job(job.id)).state != "running" or job.done == 0:
            time.sleep(0.05)
        busy = latencies(20)
        during = client.get_job(job.id)
        assert during.state == "running" and during.done < 4000, "the job must still run during the calls"
        client.cancel_job(job.id)
    quiet_p50, busy_p50 = sorted(quiet)[len(quiet) // 2], sorted(busy)[len(busy) // 2]
    print(f"embed latency p50: quiet {quiet_p50 * 1000:.1f} ms, during a job {busy_p50 * 1000:.1f} ms")
    # Generous: the ratio itself is measured by bench/jobs.py. A call waits for at most one batch.
    assert busy_p50 < 2.0 and max(busy) < 5.0


def wafer(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wafer", "--address", server.address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_indexes_and_controls_jobs(jobs_server: ServerProcess, power: Path, corpora: Path) -> None:
    source = write_jsonl(corpora / "cli.jsonl", 100)
    indexed = wafer(jobs_server, "index", str(source), "--collection", "cli", "--wait")
    assert indexed.returncode == 0, indexed.stderr
    assert "succeeded, 100/100 documents into cli" in indexed.stdout

    store = sms_store(corpora / "cli.db", 50)
    url = f"sqlite:{store}?query=SELECT%20_id%20AS%20id,%20body%20AS%20text%20FROM%20sms%20ORDER%20BY%20_id"
    set_battery(power, charging=False)
    submitted = wafer(jobs_server, "index", url, "--collection", "cli-sms", "--policy", "charging", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    assert "paused" in wafer(jobs_server, "jobs", "pause", job_id).stdout
    listed = json.loads(wafer(jobs_server, "jobs", "list", "--json").stdout)
    assert {j["id"]: j["state"] for j in listed}[job_id] == "paused"
    set_battery(power, charging=True)
    assert wafer(jobs_server, "jobs", "resume", job_id).returncode == 0
    watched = wafer(jobs_server, "jobs", "watch", job_id)
    assert watched.returncode == 0, watched.stderr
    assert "succeeded, 50/50 documents" in watched.stdout
    got = json.loads(wafer(jobs_server, "jobs", "get", job_id).stdout)
    assert got["done"] == 50 and got["when_charging"] is True

    refused = wafer(jobs_server, "index", "/etc/hostname", "--collection", "nope")
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    missing = wafer(jobs_server, "jobs", "cancel", "nope")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_jobs_need_the_token_when_the_server_has_one(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    server = start_server(tmp_path / "data", extra_args=["--auth-token-file", str(token)])
    try:
        with WaferClient(server.address, timeout=10) as client, pytest.raises(UnauthenticatedError):
            client.list_jobs()
        with WaferClient(server.address, timeout=10, metadata={"authorization": "Bearer s3cret-token"}) as client:
            assert client.list_jobs() == []
    finally:
        assert server.stop() == 0


async def test_the_async_client_submits_and_watches_inline_jobs(jobs_server: ServerProcess) -> None:
    documents = [{"id": f"a{i}", "text": f"{PHRASES[i % len(PHRASES)]} [{i}]", "payload": {"i": i}} for i in range(40)]
    async with AsyncWaferClient(jobs_server.address, timeout=30) as client:
        job = await client.submit_job("async-inline", documents, batch_size=16)
        assert job.source == "inline (40 documents)" and job.total == 40
        seen = [update async for update in client.watch_job(job.id, timeout=120)]
        assert seen[-1].state == "succeeded" and seen[-1].done == 40
        assert [s.done for s in seen] == sorted(s.done for s in seen), "progress never goes back"
        assert (await client.get_job(job.id)).ended
        stored = await client.get_documents("async-inline", ["a7"])
        assert stored[0].payload == {"i": 7.0}
        assert job.id in {j.id for j in await client.list_jobs()}


def test_a_watch_outlives_the_default_deadline_and_ends_on_sigterm(tmp_path: Path) -> None:
    power = tmp_path / "power"
    power.mkdir()
    set_battery(power, charging=False)
    env = {"WAFER_POWER_SUPPLY_ROOT": str(power), "WAFER_DEFAULT_DEADLINE_SECONDS": "1"}
    server = start_server(tmp_path / "data", env=env)
    try:
        with WaferClient(server.address, timeout=None, retries=0) as client:
            job = client.submit_job("held", ["a message that waits for a charger"], when_charging=True)
            updates = client.watch_job(job.id)
            started = time.monotonic()
            while time.monotonic() - started < 2.5:  # past the 1 s default deadline
                assert next(updates).state in ("queued", "waiting")
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(UnavailableError, match="shutting down"):
                for _ in updates:
                    pass
        # The watch did not hold the drain to its 10 s grace period.
        assert server.process.wait(timeout=8) == 0
        assert time.monotonic() - started < 2.5 + 8
    finally:
        server.stop()
    record = json.loads((tmp_path / "data" / "jobs" / f"{job.id}.job.json").read_text())
    assert record["state"] == "waiting", "a graceful stop leaves the job to resume at the next start"


def test_an_id_twice_in_a_source_keeps_its_last_text(tmp_path: Path) -> None:
    """Issue 13 #10: with two batches in flight, a short batch embedded while a long one was still
    being embedded (in several calls, past max_inputs_per_request) was written first, then
    overwritten by the older text of the same id."""
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    long_text = " ".join(f"{PHRASES[i % len(PHRASES)]} ({i})" for i in range(60))
    lines: list[dict[str, str]] = []
    pairs = 12
    for k in range(pairs):
        # One batch: long documents and the old text of x{k}; the next: the new text of x{k}.
        lines += [{"id": f"long{k}-{j}", "text": f"{long_text} [{k} {j}]"} for j in range(7)]
        lines.append({"id": f"x{k}", "text": f"old text {k}"})
        lines += [{"id": f"x{k}", "text": f"new text {k}"}] + [
            {"id": f"s{k}-{j}", "text": f"short {j}"} for j in range(7)
        ]
    source = corpora / "twice.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = {"WAFER_JOBS_ALLOWED_ROOTS": json.dumps([str(corpora)]), "WAFER_MAX_INPUTS_PER_REQUEST": "8"}
    server = start_server(tmp_path / "data", env=env)
    try:
        with WaferClient(server.address, timeout=30) as client:
            job = client.submit_job("twice", JsonlSource(str(source)), batch_size=8)
            final = client.wait_job(job.id, timeout=300)
            assert final.state == "succeeded", final.error
            stored = {d.id: d.text for d in client.get_documents("twice", [f"x{k}" for k in range(pairs)])}
            assert stored == {f"x{k}": f"new text {k}" for k in range(pairs)}
    finally:
        assert server.stop() == 0
