"""Job sources against real files: JSONL and SQLite, streamed, resumable, confined, read-only."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from wafer.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from wafer.jobs.sources import (
    Cursor,
    JsonlSource,
    ReadLimits,
    SourceStoppedError,
    SqliteSource,
    TooManyRowsError,
    confine,
    open_reader,
)

# Confinement has its own tests below; the rest read files anywhere.
ANYWHERE = ReadLimits(roots=(Path("/"),))


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_db(path: Path, n: int) -> Path:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE sms (id INTEGER PRIMARY KEY, body TEXT, sender TEXT, raw BLOB)")
        connection.executemany(
            "INSERT INTO sms (id, body, sender, raw) VALUES (?, ?, ?, ?)",
            [(i, f"message {i}", f"+44{i % 3}", b"\x00") for i in range(1, n + 1)],
        )
    connection.close()
    return path


# -- JSONL -----------------------------------------------------------------------------------------


def test_jsonl_reads_in_batches_with_payload_and_resumes_from_a_cursor(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "text": f"text {i}", "label": "ham"} for i in range(10)])
    reader = open_reader(JsonlSource(path), Cursor(), ANYWHERE)
    first = reader.read(4)
    assert [d.id for d in first.documents] == ["0", "1", "2", "3"]
    assert first.documents[0].payload == {"label": "ham"}
    assert not first.exhausted
    # The cursor is the byte offset just past the fourth line: nothing more was read.
    lines = path.read_bytes().splitlines(keepends=True)
    assert first.end == Cursor(position=sum(len(line) for line in lines[:4]), rows=4)
    reader.close()

    resumed = open_reader(JsonlSource(path), first.end, ANYWHERE)
    rest = resumed.read(100)
    assert [d.id for d in rest.documents] == [str(i) for i in range(4, 10)]
    assert rest.exhausted and rest.end.rows == 10 and rest.end.position == path.stat().st_size
    assert resumed.count() == 10
    resumed.close()


def test_jsonl_custom_fields_blank_lines_empty_texts_and_duplicate_ids(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"key": "a", "body": "first"}\n'
        "\n"
        '{"key": "b", "body": "   "}\n'
        '{"key": "a", "body": "first, edited"}\n'
        '{"body": "no id"}\n',
        encoding="utf-8",
    )
    reader = open_reader(JsonlSource(path, id_field="key", text_field="body"), Cursor(), ANYWHERE)
    batch = reader.read(10)
    # The later "a" wins, as writing them in order would; an empty text is skipped, not sent.
    assert [(d.id, d.text) for d in batch.documents] == [("a", "first, edited"), ("", "no id")]
    assert batch.skipped == 1 and batch.replaced == 1 and batch.exhausted
    assert batch.end.rows == 5
    reader.close()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2 is not valid JSON"),
        ("[1, 2]", "line 2 must be a JSON object"),
        ('{"id": 1}', "line 2 has no string field 'text'"),
        ('{"id": [1], "text": "x"}', "line 2: the id must be a string or an integer"),
    ],
)
def test_jsonl_bad_lines_are_invalid_argument_with_their_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": 0, "text": "ok"}\n' + line + "\n", encoding="utf-8")
    reader = open_reader(JsonlSource(path), Cursor(), ANYWHERE)
    with pytest.raises(InvalidArgumentError, match=message):
        reader.read(10)
    reader.close()


def test_jsonl_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        open_reader(JsonlSource(tmp_path / "nope.jsonl"), Cursor(), ANYWHERE)


# -- SQLite ----------------------------------------------------------------------------------------


def test_sqlite_reads_rows_with_payload_and_resumes_by_row(tmp_path: Path) -> None:
    db = make_db(tmp_path / "sms.db", 25)
    spec = SqliteSource(db, "SELECT id, body AS text, sender, raw FROM sms ORDER BY id")
    reader = open_reader(spec, Cursor(), ANYWHERE)
    first = reader.read(10)
    assert [d.id for d in first.documents] == [str(i) for i in range(1, 11)]
    # Blobs have no JSON form: they are left out of the payload.
    assert first.documents[0].payload == {"sender": "+441"}
    assert first.end == Cursor(position=10, rows=10) and not first.exhausted
    assert reader.count() == 25
    reader.close()

    resumed = open_reader(spec, first.end, ANYWHERE)
    rest = resumed.read(100)
    assert [d.id for d in rest.documents] == [str(i) for i in range(11, 26)]
    assert rest.exhausted and rest.end.rows == 25
    resumed.close()


def test_sqlite_streams_an_endless_query(tmp_path: Path) -> None:
    """A recursive query without end: only a reader that fetches a batch at a time ever returns."""
    db = make_db(tmp_path / "sms.db", 1)
    endless = (
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x AS id, 'text ' || x AS text FROM n"
    )
    reader = open_reader(SqliteSource(db, endless), Cursor(position=1000, rows=1000), ANYWHERE)
    batch = reader.read(5)
    assert [d.id for d in batch.documents] == ["1001", "1002", "1003", "1004", "1005"]
    reader.close()


def test_sqlite_custom_columns_and_null_texts(tmp_path: Path) -> None:
    db = make_db(tmp_path / "sms.db", 3)
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE sms SET body = NULL WHERE id = 2")
    connection.close()
    spec = SqliteSource(db, "SELECT id AS k, body FROM sms ORDER BY id", id_column="k", text_column="body")
    reader = open_reader(spec, Cursor(), ANYWHERE)
    batch = reader.read(10)
    assert [d.id for d in batch.documents] == ["1", "3"] and batch.skipped == 1
    reader.close()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT nope FROM sms", "no such column: nope"),
        ("SELEC id FROM sms", "syntax error"),
        ("SELECT id, sender FROM sms", r"needs \['text'\]"),
        ("DELETE FROM sms", "only a SELECT"),
        ("UPDATE sms SET body = 'x'", "only a SELECT"),
        ("ATTACH DATABASE '/tmp/elsewhere.db' AS other", "only a SELECT"),
        ("SELECT id, body AS text FROM sms; DELETE FROM sms", "one statement"),
        ("   ", "must not be empty"),
    ],
)
def test_sqlite_bad_queries_are_invalid_argument(tmp_path: Path, query: str, message: str) -> None:
    db = make_db(tmp_path / "sms.db", 3)
    with pytest.raises(InvalidArgumentError, match=message):
        open_reader(SqliteSource(db, query), Cursor(), ANYWHERE)
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT count(*) FROM sms WHERE body LIKE 'message %'").fetchone() == (3,)
    connection.close()


def test_sqlite_is_opened_read_only(tmp_path: Path) -> None:
    db = make_db(tmp_path / "sms.db", 3)
    before = db.read_bytes()
    reader = open_reader(SqliteSource(db, "SELECT id, body AS text FROM sms"), Cursor(), ANYWHERE)
    reader.read(10)
    reader.close()
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sms.db"], "no journal or WAL file was created"


def test_a_file_that_is_not_sqlite_is_invalid_argument(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("just some text, long enough to have a header's worth of bytes " * 4)
    with pytest.raises(InvalidArgumentError, match="not a database"):
        open_reader(SqliteSource(path, "SELECT id, body AS text FROM sms"), Cursor(), ANYWHERE)


# -- confinement -----------------------------------------------------------------------------------


def test_confine_allows_files_under_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    target = root / "sub" / "c.jsonl"
    target.write_text("{}\n")
    assert confine(target, [tmp_path / "elsewhere", root]) == target.resolve()


def test_confine_refuses_paths_outside_the_roots_even_through_links(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    secret = outside / "secret.jsonl"
    secret.write_text("{}\n")
    (root / "link.jsonl").symlink_to(secret)
    for path in (secret, root / "link.jsonl", root / ".." / "outside" / "secret.jsonl"):
        with pytest.raises(PermissionDeniedError, match="jobs_allowed_roots"):
            confine(path, [root])
    # Outside the roots, a missing file is refused the same way: existence does not leak.
    with pytest.raises(PermissionDeniedError):
        confine(outside / "missing.jsonl", [root])


def test_confine_missing_relative_and_folder(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        confine(tmp_path / "missing.jsonl", [tmp_path])
    with pytest.raises(InvalidArgumentError, match="absolute"):
        confine(Path("relative.jsonl"), [tmp_path])
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        confine(tmp_path, [tmp_path])


# -- limits: nothing a source holds runs for good (issue 13) -----------------------------------------

ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x AS id, 'a' AS text FROM c"


def test_a_query_that_never_returns_a_row_is_stopped_at_the_time_limit(tmp_path: Path) -> None:
    db = make_db(tmp_path / "sms.db", 1)
    limits = ReadLimits(roots=(tmp_path,), query_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="jobs_sqlite_query_seconds"):
        open_reader(SqliteSource(db, ENDLESS + " WHERE x < 0"), Cursor(), limits)
    assert time.monotonic() - started < 5


def test_counting_an_endless_query_stops_at_the_row_limit(tmp_path: Path) -> None:
    db = make_db(tmp_path / "sms.db", 1)
    limits = ReadLimits(roots=(tmp_path,), max_rows=1000)
    reader = open_reader(SqliteSource(db, ENDLESS), Cursor(), limits)
    with pytest.raises(TooManyRowsError, match="more than 1000 rows"):
        reader.count()
    # Reading stops there too, after exactly max_rows rows.
    assert len(reader.read(600).documents) == 600
    assert len(reader.read(600).documents) == 400
    with pytest.raises(TooManyRowsError):
        reader.read(600)
    reader.close()


def test_a_query_at_exactly_the_row_limit_ends_normally(tmp_path: Path) -> None:
    db = make_db(tmp_path / "sms.db", 10)
    reader = open_reader(
        SqliteSource(db, "SELECT id, body AS text FROM sms"), Cursor(), ReadLimits((tmp_path,), max_rows=10)
    )
    assert reader.count() == 10
    batch = reader.read(10)
    assert len(batch.documents) == 10 and not batch.exhausted
    last = reader.read(10)
    assert last.documents == [] and last.exhausted
    reader.close()


def test_stopping_reaches_a_query_running_on_another_thread(tmp_path: Path) -> None:
    """Cancel, pause and shutdown set the stop event from the event loop's thread."""
    db = make_db(tmp_path / "sms.db", 1)
    limits = ReadLimits(roots=(tmp_path,), query_seconds=3600)
    reader = open_reader(SqliteSource(db, ENDLESS), Cursor(), limits)
    outcome: list[BaseException] = []

    def count() -> None:
        try:
            reader.count()
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=count)
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive()
    limits.stop.set()
    worker.join(timeout=5)
    assert not worker.is_alive(), "the count went on after the stop"
    assert isinstance(outcome[0], SourceStoppedError)
    reader.close()


def test_a_jsonl_line_past_the_limit_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": 1, "text": "short"}\n{"id": 2, "text": "' + "x" * 5000 + '"}\n')
    reader = open_reader(JsonlSource(path), Cursor(), ReadLimits((tmp_path,), max_line_bytes=1000))
    with pytest.raises(InvalidArgumentError, match="line 2 is longer than 1000 bytes"):
        reader.read(10)
    reader.close()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": ' + "7" * 5000 + ', "text": "t"}', "cannot be read"),
        ('{"id": ' + "7" * 2000 + ', "text": "t"}', "longer than 1024 characters"),
        ('{"id": 1, "text": "t", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ],
)
def test_hostile_jsonl_lines_are_invalid_argument(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(line + "\n")
    reader = open_reader(JsonlSource(path), Cursor(), ANYWHERE)
    with pytest.raises(InvalidArgumentError, match=message):
        reader.read(10)
    reader.close()


def test_every_open_is_confined_even_after_the_file_became_a_link(tmp_path: Path) -> None:
    """Submit checks the path; a resumed or restarted job opens it again, maybe through a new link."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    write_jsonl(outside / "secret.jsonl", [{"id": "s", "text": "secret"}])
    make_db(outside / "secret.db", 1)
    limits = ReadLimits(roots=(root,))
    jsonl, db = root / "c.jsonl", root / "c.db"
    jsonl.symlink_to(outside / "secret.jsonl")
    db.symlink_to(outside / "secret.db")
    with pytest.raises(PermissionDeniedError):
        open_reader(JsonlSource(jsonl), Cursor(), limits)
    with pytest.raises(PermissionDeniedError):
        open_reader(SqliteSource(db, "SELECT id, body AS text FROM sms"), Cursor(), limits)


def test_a_link_inside_the_roots_still_opens(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "real.jsonl", [{"id": "a", "text": "inside"}])
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "real.jsonl")
    reader = open_reader(JsonlSource(tmp_path / "link.jsonl"), Cursor(), ReadLimits((tmp_path,)))
    assert [d.text for d in reader.read(5).documents] == ["inside"]
    assert reader.count() == 1
    reader.close()


def test_a_path_with_a_nul_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="NUL"):
        confine(Path(str(tmp_path) + "/a\x00b.jsonl"), [tmp_path])
