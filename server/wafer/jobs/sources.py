"""Where a job's documents come from: a JSONL file or a SQLite query, read a batch at a time.

A reader starts at a position (a JSONL byte offset, a SQLite row number) and reports the position
after each batch, so the job can checkpoint it once that batch is written and later start over from
there. Nothing reads the whole source into memory. Paths are the server's own files, so they are
confined to allowed folders, and SQLite databases are opened read-only with an authorizer that
lets a query read and nothing else (no ATTACH of a file outside those folders, no writes).

Readers do blocking I/O: the job runner calls them on a worker thread, one call at a time.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote

from wafer.domain import StoredDocument
from wafer.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError

DEFAULT_ID_FIELD = "id"
DEFAULT_TEXT_FIELD = "text"
# How many rows a resumed SQLite reader skips per fetch: the query is run again from its start.
_SKIP_CHUNK = 4096


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
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root.expanduser().resolve()) for root in roots):
        raise PermissionDeniedError(
            f"jobs may not read {str(path)!r}: it is outside the data folder and the server's "
            "jobs_allowed_roots (WAFER_JOBS_ALLOWED_ROOTS)"
        )
    if not resolved.exists():
        raise NotFoundError(f"no file at {str(path)!r}")
    if not resolved.is_file():
        raise InvalidArgumentError(f"{str(path)!r} is not a regular file")
    return resolved


def open_reader(spec: SourceSpec, start: Cursor) -> SourceReader:
    """A reader over `spec` from `start`. Checks what can be checked before any batch runs: the
    file opens, the query is valid and returns the id and text columns."""
    if isinstance(spec, JsonlSource):
        return JsonlReader(spec, start)
    return SqliteReader(spec, start)


def _scalar_id(value: object, where: str) -> str:
    if value is None:
        return ""
    # bool is an int subclass, and an id of `true` is surely a mistake.
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
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
    def __init__(self, spec: JsonlSource, start: Cursor) -> None:
        self._spec = spec
        try:
            self._file: BinaryIO = spec.path.open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"no file at {str(spec.path)!r}") from None
        except OSError as exc:
            raise InvalidArgumentError(f"cannot open {str(spec.path)!r}: {exc.strerror or exc}") from None
        self._file.seek(start.position)
        self._cursor = start

    def read(self, limit: int) -> Batch:
        documents: list[StoredDocument] = []
        skipped = 0
        position, rows = self._cursor.position, self._cursor.rows
        exhausted = False
        while len(documents) < limit:
            line = self._file.readline()
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

    def _parse(self, line: bytes, number: int) -> StoredDocument | None:
        where = f"{self._spec.path} line {number}"
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgumentError(f"{where} is not valid JSON: {exc}") from None
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
        with self._spec.path.open("rb") as file:
            return sum(1 for line in file if line.strip())

    def close(self) -> None:
        self._file.close()


_READ_ONLY_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)


def _read_only(action: int, *_: object) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ONLY_ACTIONS else sqlite3.SQLITE_DENY


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that can only read `path`: the file is opened read-only (`mode=ro`, so even a
    crafted query cannot write it) and the authorizer refuses anything but reading (ATTACH would
    reach files outside the allowed folders)."""
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


class SqliteReader:
    def __init__(self, spec: SqliteSource, start: Cursor) -> None:
        self._spec = spec
        query = spec.query.strip()
        if not query:
            raise InvalidArgumentError("the SQLite query must not be empty")
        self._connection = connect_read_only(spec.path)
        try:
            self._rows = self._connection.execute(query)
        except (sqlite3.Error, sqlite3.Warning) as exc:
            # sqlite3.Warning: more than one statement.
            self._connection.close()
            if isinstance(exc, sqlite3.Warning):
                raise InvalidArgumentError("the SQLite query must be one statement") from None
            raise _query_error(spec.path, exc) from None
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
        self._skip(start.position)

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
        try:
            return self._rows.fetchmany(size)
        except sqlite3.Error as exc:
            raise _query_error(self._spec.path, exc) from None

    def read(self, limit: int) -> Batch:
        rows = self._fetch(limit)
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
            documents=unique, skipped=skipped, end=self._cursor, exhausted=len(rows) < limit, replaced=replaced
        )

    def count(self) -> int:
        connection = connect_read_only(self._spec.path)
        try:
            row = connection.execute(f"SELECT count(*) FROM ({self._spec.query.strip().rstrip(';')}\n)").fetchone()
        except sqlite3.Error as exc:
            raise _query_error(self._spec.path, exc) from None
        finally:
            connection.close()
        return int(row[0])

    def close(self) -> None:
        self._connection.close()
