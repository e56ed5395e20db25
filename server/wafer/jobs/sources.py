"""Where a job's documents come from: a JSONL file or a SQLite query, read a batch at a time.

A reader starts at a position (a JSONL byte offset, a SQLite row number) and reports the position
after each batch, so the job can checkpoint it once that batch is written and later start over from
there. Nothing reads the whole source into memory. Paths are the server's own files, so they are
confined to allowed folders, and SQLite databases are opened read-only with an authorizer that
lets a query read and nothing else (no ATTACH of a file outside those folders, no writes).

Confinement holds at every open, not only when a job is submitted: a resumed or restarted job
opens its stored path again, and the file there may since have become a link to somewhere else.
A JSONL file is opened first and the opened file's real path checked (so what is read is what was
checked); a SQLite path is resolved and checked again just before SQLite opens it.

Nothing a source holds may run for good: a SQLite statement is stopped by a progress handler when
it runs past `ReadLimits.query_seconds` for one call, or when the job is stopped (`ReadLimits`'
`stop` event, set by cancel, pause and shutdown from another thread); a query returns at most
`max_rows` rows and a JSONL line is at most `max_line_bytes` long.

Readers do blocking I/O: the job runner calls them on a worker thread, one call at a time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar
from urllib.parse import quote

from wafer.domain import StoredDocument
from wafer.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError

T = TypeVar("T")

DEFAULT_ID_FIELD = "id"
DEFAULT_TEXT_FIELD = "text"
# How many rows a resumed SQLite reader skips per fetch: the query is run again from its start.
_SKIP_CHUNK = 4096
# SQLite virtual-machine steps between two calls of the progress handler (a few microseconds).
_PROGRESS_STEPS = 10_000
# A JSON id longer than this is no id (and Python refuses to parse integers past 4300 digits).
MAX_ID_CHARS = 1024


@dataclass(frozen=True, slots=True)
class ReadLimits:
    """What a reader may open and how much work one call may do.

    `roots`: the folders a source must lie in, checked at every open. `stop`: set from another
    thread to end a reader's SQLite statement now (the call then raises `SourceStoppedError`)."""

    roots: tuple[Path, ...]
    query_seconds: float = 60.0
    max_rows: int = 100_000_000
    max_line_bytes: int = 16 * 1024 * 1024
    stop: threading.Event = field(default_factory=threading.Event, compare=False)


class SourceStoppedError(Exception):
    """A reader call ended because its job was stopped (cancel, pause, shutdown)."""


class TooManyRowsError(InvalidArgumentError):
    """A SQLite query returns more rows than `ReadLimits.max_rows`."""


@dataclass(frozen=True, slots=True)
class JsonlSource:
    path: Path
    id_field: str = DEFAULT_ID_FIELD
    text_field: str = DEFAULT_TEXT_FIELD

    def describe(self) -> str:
        return f"jsonl:{self.path}"


@dataclass(frozen=True, slots=True)
class SqliteSource:
    path: Path
    query: str
    id_column: str = DEFAULT_ID_FIELD
    text_column: str = DEFAULT_TEXT_FIELD

    def describe(self) -> str:
        return f"sqlite:{self.path}"


SourceSpec = JsonlSource | SqliteSource


@dataclass(frozen=True, slots=True)
class Cursor:
    """A place in a source: `position` is where reading resumes (a byte offset for JSONL, a row
    number for SQLite); `rows` counts the lines or rows consumed up to it, blank lines included."""

    position: int = 0
    rows: int = 0


@dataclass(frozen=True, slots=True)
class Batch:
    documents: list[StoredDocument]
    # Rows read but left out: their text was empty.
    skipped: int
    # Where the next batch starts.
    end: Cursor
    exhausted: bool = False
    # Ids that appeared twice in this batch; the last row won.
    replaced: int = 0


class SourceReader(Protocol):
    def read(self, limit: int) -> Batch:
        """Up to `limit` documents from the current place on; `exhausted` once the source ends."""
        ...

    def count(self) -> int:
        """Documents (non-blank lines, rows) in the whole source."""
        ...

    def close(self) -> None: ...


def confine(path: Path, roots: Sequence[Path]) -> Path:
    """`path`, resolved, if it lies under one of `roots`; PermissionDeniedError otherwise,
    NotFoundError if it is allowed but missing. Symbolic links are followed before the check, so a
    link inside a root cannot point outside it."""
    if not path.is_absolute():
        raise InvalidArgumentError(f"path {str(path)!r} must be absolute (it is a path on the server)")
    if "\x00" in str(path):
        raise InvalidArgumentError("a path must not contain a NUL character")
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root.expanduser().resolve()) for root in roots):
        raise _outside(path)
    if not resolved.exists():
        raise NotFoundError(f"no file at {str(path)!r}")
    if not resolved.is_file():
        raise InvalidArgumentError(f"{str(path)!r} is not a regular file")
    return resolved


def _outside(path: Path) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"jobs may not read {str(path)!r}: it is outside the data folder and the server's "
        "jobs_allowed_roots (WAFER_JOBS_ALLOWED_ROOTS)"
    )


def open_confined(path: Path, roots: Sequence[Path]) -> BinaryIO:
    """`path` opened for reading, after checking that the file actually opened (whatever links led
    to it) is a regular file under one of `roots`: a link swapped in after `confine` cannot lead
    outside them."""
    confine(path, roots)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFoundError(f"no file at {str(path)!r}") from None
    except OSError as exc:
        raise InvalidArgumentError(f"cannot open {str(path)!r}: {exc.strerror or exc}") from None
    try:
        real = Path(f"/proc/self/fd/{descriptor}").readlink()
        if not any(real.is_relative_to(root.expanduser().resolve()) for root in roots):
            raise _outside(path)
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise InvalidArgumentError(f"{str(path)!r} is not a regular file")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def open_reader(spec: SourceSpec, start: Cursor, limits: ReadLimits) -> SourceReader:
    """A reader over `spec` from `start`. Checks what can be checked before any batch runs: the
    file is still inside the roots and opens, the query is valid and returns the id and text
    columns."""
    if isinstance(spec, JsonlSource):
        return JsonlReader(spec, start, limits)
    return SqliteReader(spec, start, limits)


def _scalar_id(value: object, where: str) -> str:
    if value is None:
        return ""
    # bool is an int subclass, and an id of `true` is surely a mistake.
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        identifier = value if isinstance(value, str) else str(value)
        if len(identifier) > MAX_ID_CHARS:
            raise InvalidArgumentError(f"{where}: the id is longer than {MAX_ID_CHARS} characters")
        return identifier
    raise InvalidArgumentError(f"{where}: the id must be a string or an integer, not {type(value).__name__}")


def _unique(documents: Iterable[StoredDocument]) -> tuple[list[StoredDocument], int]:
    """One document per id, the last one winning (as writing them in order would): the index
    refuses a request with an id twice."""
    by_id: dict[str, StoredDocument] = {}
    anonymous: list[StoredDocument] = []
    total = 0
    for document in documents:
        total += 1
        if not document.id:
            anonymous.append(document)
            continue
        by_id.pop(document.id, None)
        by_id[document.id] = document
    unique = [*by_id.values(), *anonymous]
    return unique, total - len(unique)


class JsonlReader:
    def __init__(self, spec: JsonlSource, start: Cursor, limits: ReadLimits) -> None:
        self._spec = spec
        self._limits = limits
        self._file = open_confined(spec.path, limits.roots)
        self._file.seek(start.position)
        self._cursor = start

    def read(self, limit: int) -> Batch:
        documents: list[StoredDocument] = []
        skipped = 0
        position, rows = self._cursor.position, self._cursor.rows
        exhausted = False
        while len(documents) < limit:
            line = self._line(rows + 1)
            if not line:
                exhausted = True
                break
            position += len(line)
            rows += 1
            if not line.strip():
                continue
            document = self._parse(line, rows)
            if document is None:
                skipped += 1
            else:
                documents.append(document)
        self._cursor = Cursor(position=position, rows=rows)
        unique, replaced = _unique(documents)
        return Batch(documents=unique, skipped=skipped, end=self._cursor, exhausted=exhausted, replaced=replaced)

    def _line(self, number: int) -> bytes:
        """The next line, refused past `max_line_bytes` (without reading the rest into memory)."""
        most = self._limits.max_line_bytes
        line = self._file.readline(most + 1)
        if len(line) > most:
            raise InvalidArgumentError(
                f"{self._spec.path} line {number} is longer than {most} bytes (jobs_max_line_bytes)"
            )
        return line

    def _parse(self, line: bytes, number: int) -> StoredDocument | None:
        where = f"{self._spec.path} line {number}"
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgumentError(f"{where} is not valid JSON: {exc}") from None
        except (ValueError, RecursionError) as exc:
            # An integer of thousands of digits, or arrays nested past the parser's depth.
            detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise InvalidArgumentError(f"{where} cannot be read: {detail}") from None
        if not isinstance(record, dict):
            raise InvalidArgumentError(f"{where} must be a JSON object, not {type(record).__name__}")
        text = record.pop(self._spec.text_field, None)
        if not isinstance(text, str):
            raise InvalidArgumentError(f"{where} has no string field {self._spec.text_field!r}")
        identifier = _scalar_id(record.pop(self._spec.id_field, None), where)
        if not text.strip():
            return None
        return StoredDocument(id=identifier, text=text, payload=record)

    def count(self) -> int:
        with open_confined(self._spec.path, self._limits.roots) as file:
            return sum(1 for line in file if line.strip())

    def close(self) -> None:
        self._file.close()


_READ_ONLY_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)


def _read_only(action: int, *_: object) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ONLY_ACTIONS else sqlite3.SQLITE_DENY


def connect_read_only(path: Path, limits: ReadLimits | None = None) -> sqlite3.Connection:
    """A connection that can only read `path`: the file is opened read-only (`mode=ro`, so even a
    crafted query cannot write it) and the authorizer refuses anything but reading (ATTACH would
    reach files outside the allowed folders). With `limits`, the path is confined again now (it
    may have become a link since it was submitted) and SQLite opens the resolved path."""
    if limits is not None:
        path = confine(path, limits.roots)
    try:
        connection = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise InvalidArgumentError(f"cannot open {str(path)!r} as SQLite: {exc}") from None
    connection.set_authorizer(_read_only)
    return connection


def _query_error(path: Path, exc: sqlite3.Error) -> InvalidArgumentError:
    detail = str(exc)
    if "not authorized" in detail:
        detail = "only a SELECT that reads the database is allowed"
    return InvalidArgumentError(f"the query over {str(path)!r} failed: {detail}")


class _Watchdog:
    """Interrupts a connection's statement when its job is stopped or the call runs too long.

    SQLite calls the progress handler every few thousand steps of any statement, on the thread
    running it, so this reaches work (a recursive query that never returns a row, a count of an
    endless query) that nothing else can stop short of killing the process."""

    def __init__(self, connection: sqlite3.Connection, path: Path, limits: ReadLimits) -> None:
        self._path = path
        self._limits = limits
        self._deadline = float("inf")
        connection.set_progress_handler(self._check, _PROGRESS_STEPS)

    def _check(self) -> int:
        return int(self._limits.stop.is_set() or time.monotonic() > self._deadline)

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()`, stopped at the limit; sqlite3 errors become InvalidArgumentError."""
        if self._limits.stop.is_set():
            raise SourceStoppedError
        self._deadline = time.monotonic() + self._limits.query_seconds
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if self._limits.stop.is_set():
                raise SourceStoppedError from None
            if "interrupted" in str(exc):
                raise InvalidArgumentError(
                    f"the query over {str(self._path)!r} ran for more than {self._limits.query_seconds:g} s "
                    "in one step (jobs_sqlite_query_seconds): simplify it or index what it filters on"
                ) from None
            raise _query_error(self._path, exc) from None
        except sqlite3.Error as exc:
            raise _query_error(self._path, exc) from None
        finally:
            self._deadline = float("inf")


class SqliteReader:
    def __init__(self, spec: SqliteSource, start: Cursor, limits: ReadLimits) -> None:
        self._spec = spec
        self._limits = limits
        query = spec.query.strip()
        if not query:
            raise InvalidArgumentError("the SQLite query must not be empty")
        self._connection = connect_read_only(spec.path, limits)
        self._watchdog = _Watchdog(self._connection, spec.path, limits)
        try:
            self._rows = self._watchdog.call(lambda: self._connection.execute(query))
        except sqlite3.Warning:
            # More than one statement.
            self._connection.close()
            raise InvalidArgumentError("the SQLite query must be one statement") from None
        except BaseException:
            self._connection.close()
            raise
        description = self._rows.description
        columns = [column[0] for column in description] if description else []
        missing = [name for name in (spec.id_column, spec.text_column) if name not in columns]
        if missing:
            self._connection.close()
            raise InvalidArgumentError(
                f"the query returns the columns {columns}; it needs {missing} "
                "(alias them, e.g. SELECT rowid AS id, body AS text ..., or set id_column/text_column)"
            )
        self._columns = columns
        self._id_index = columns.index(spec.id_column)
        self._text_index = columns.index(spec.text_column)
        self._cursor = Cursor(position=0, rows=0)
        try:
            self._skip(start.position)
        except BaseException:
            self._connection.close()
            raise

    def _skip(self, rows: int) -> None:
        """Re-run queries cannot seek: skip the rows a previous run already wrote."""
        left = rows
        while left > 0:
            fetched = self._fetch(min(left, _SKIP_CHUNK))
            if not fetched:
                break
            left -= len(fetched)
        self._cursor = Cursor(position=rows - left, rows=rows - left)

    def _fetch(self, size: int) -> list[Any]:
        return self._watchdog.call(lambda: self._rows.fetchmany(size))

    def read(self, limit: int) -> Batch:
        most = self._limits.max_rows
        if self._cursor.rows >= most:
            # One row past the limit tells an exact fit from a query with more.
            if self._fetch(1):
                raise self._too_many()
            return Batch(documents=[], skipped=0, end=self._cursor, exhausted=True)
        wanted = min(limit, most - self._cursor.rows)
        rows = self._fetch(wanted)
        documents: list[StoredDocument] = []
        skipped = 0
        for offset, row in enumerate(rows):
            number = self._cursor.rows + offset + 1
            text = row[self._text_index]
            if text is None or (isinstance(text, str) and not text.strip()):
                skipped += 1
                continue
            if not isinstance(text, str):
                raise InvalidArgumentError(
                    f"row {number}: column {self._spec.text_column!r} holds {type(text).__name__}, not text"
                )
            identifier = _scalar_id(row[self._id_index], f"row {number}")
            payload = {
                name: value
                for index, (name, value) in enumerate(zip(self._columns, row, strict=True))
                if index not in (self._id_index, self._text_index) and not isinstance(value, bytes)
            }
            documents.append(StoredDocument(id=identifier, text=text, payload=payload))
        count = self._cursor.rows + len(rows)
        self._cursor = Cursor(position=count, rows=count)
        unique, replaced = _unique(documents)
        return Batch(
            documents=unique, skipped=skipped, end=self._cursor, exhausted=len(rows) < wanted, replaced=replaced
        )

    def _too_many(self) -> TooManyRowsError:
        return TooManyRowsError(
            f"the query over {str(self._spec.path)!r} returns more than {self._limits.max_rows} rows "
            "(jobs_sqlite_max_rows): add a LIMIT or a WHERE, or split it into several jobs"
        )

    def count(self) -> int:
        connection = connect_read_only(self._spec.path, self._limits)
        try:
            watchdog = _Watchdog(connection, self._spec.path, self._limits)
            # Counted up to one past the limit: an endless query still has an answer.
            query = self._spec.query.strip().rstrip(";")
            row = watchdog.call(
                lambda: connection.execute(
                    f"SELECT count(*) FROM (SELECT 1 FROM ({query}\n) LIMIT {self._limits.max_rows + 1})"
                ).fetchone()
            )
        finally:
            connection.close()
        total = int(row[0])
        if total > self._limits.max_rows:
            raise self._too_many()
        return total

    def close(self) -> None:
        self._connection.close()
