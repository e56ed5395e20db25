"""The embedding cache: vectors already computed, found again by their content, kept on disk.

A key is the SHA-256 of everything that decides a vector: the model's name and identity (its
backend, source, tokenizer, pooling and window: a model entry that points at other weights gets
other keys), the exact text the model reads (the query/document prompt applied, so the input type
counts only where the model's prompts differ), the dimension cut and normalization, and for a
contextual model (cde) the id of the context the vector was computed in (a hash of its values): one
corpus's vectors never answer for another's, nor for the model's vectors without a context. A hit is served
without running the model; only misses reach the backend.

Truncation is not part of the key: a text that fits the window gets the same vector either way,
so Embed (truncate off by default) and Upsert (chunks, truncate on) share entries. An entry whose
token count reached the window may be a cut text; a request that did not ask for truncation treats
it as a miss, so the backend refuses the text as too long, as it would without a cache.

Weights replaced in place under the same source (a file overwritten at the same path) are not
noticed: delete the cache file, or disable the cache, when doing that.

Storage: one SQLite file in the data folder, WAL mode (readers never wait for the writer and a
crash loses at most the last commits, never the file). Bounded: past `max_entries` rows, the least
recently used go. Recency is tracked with a counter, not a clock, so it is exact and cheap; a hit
updates it. All SQLite work runs on the cache's own thread, off the event loop.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import structlog

from wafer.backends.base import Embeddings, InputTooLongError
from wafer.domain import FloatMatrix
from wafer.serial import SerialExecutor
from wafer.specs import ModelSpec

log = structlog.get_logger("wafer.cache")

SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    key BLOB PRIMARY KEY,
    vector BLOB NOT NULL,
    tokens INTEGER NOT NULL,
    used INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS embeddings_used ON embeddings(used);
"""
# Evict in steps of this share of the bound rather than one row per insert: one DELETE per step.
EVICT_FRACTION = 0.05
# SQLite's default limit on host parameters is 32766 on current builds; stay well under it.
LOOKUP_CHUNK = 500

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Recipe:
    """Everything but the text that decides a cached vector."""

    model: str
    identity: str
    dimensions: int
    normalize: bool
    # Not in the key (see the module's docstring): decides which entries may be served.
    truncate: bool
    window: int
    # The context's id for a contextual model's vectors; "" without a context.
    context: str = ""

    @classmethod
    def of(cls, spec: ModelSpec, *, dimensions: int, normalize: bool, truncate: bool, context: str = "") -> Recipe:
        fields = spec.model_dump(mode="json", include={"backend", "source", "tokenizer", "pooling", "max_tokens"})
        # A backend's files and options decide its vectors too; only set ones join the identity,
        # so the keys of models without them stay as they were.
        fields.update({k: v for k, v in spec.model_dump(mode="json", include={"files", "options"}).items() if v})
        identity = json.dumps(fields, sort_keys=True)
        return cls(
            model=spec.name,
            identity=identity,
            dimensions=dimensions,
            normalize=normalize,
            truncate=truncate,
            window=spec.max_tokens,
            context=context,
        )

    def key(self, text: str) -> bytes:
        parts: list[object] = [self.model, self.identity, self.dimensions, self.normalize, text]
        if self.context:
            # Appended only when set, so vectors without a context keep the keys they always had.
            parts.append(self.context)
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the cache had for a batch: `found[i]` is input i's (vector, tokens), or missing."""

    keys: list[bytes]
    found: dict[int, tuple[np.ndarray, int]]

    @property
    def missing(self) -> list[int]:
        return [i for i in range(len(self.keys)) if i not in self.found]


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    entries: int


@dataclass(frozen=True, slots=True)
class CachedEmbeddings:
    vectors: FloatMatrix
    # Every input's token count, cached or not; `computed_tokens` counts only what the model read.
    token_counts: list[int]
    cached: int
    computed_tokens: int


async def cached_embed(
    cache: EmbeddingCache,
    recipe: Recipe,
    texts: Sequence[str],
    compute: Callable[[list[str]], Awaitable[Embeddings]],
    finish: Callable[[FloatMatrix], FloatMatrix],
) -> CachedEmbeddings:
    """Embeds `texts` (prompts applied): hits from the cache, only the misses through `compute`.

    `finish` turns the backend's vectors into the final ones (cut, normalized); those are cached.
    """
    lookup = await cache.lookup(recipe, texts)
    missing = lookup.missing
    fresh: dict[int, tuple[np.ndarray, int]] = {}
    computed_tokens = 0
    if missing:
        try:
            output = await compute([texts[i] for i in missing])
        except InputTooLongError as error:
            # The backend saw only the misses; tell the caller which of its inputs it was.
            raise error.renamed(f"input {missing[error.index]}", missing[error.index]) from None
        vectors = finish(output.vectors)
        await cache.store([lookup.keys[i] for i in missing], vectors, output.token_counts)
        fresh = {i: (vectors[j], output.token_counts[j]) for j, i in enumerate(missing)}
        computed_tokens = sum(output.token_counts)
    rows = [lookup.found[i] if i in lookup.found else fresh[i] for i in range(len(texts))]
    return CachedEmbeddings(
        vectors=np.ascontiguousarray(np.stack([r[0] for r in rows]), dtype=np.float32),
        token_counts=[r[1] for r in rows],
        cached=len(lookup.found),
        computed_tokens=computed_tokens,
    )


class CacheObserver(Protocol):
    """Told how each lookup went (the metrics implement it)."""

    def record_cache(self, model: str, *, hits: int, misses: int) -> None: ...


class EmbeddingCache:
    def __init__(self, path: Path, *, max_entries: int, metrics: CacheObserver | None = None) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, not {max_entries}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._max_entries = max_entries
        self._metrics = metrics
        self._thread = SerialExecutor("wafer-cache")
        self._lock = threading.Lock()  # guards the counters, read from any thread
        self._hits = 0
        self._misses = 0
        # Opened on the cache thread: every use of the connection happens there.
        self._db, (self._clock, self._count) = self._thread.call(lambda: self._open(path))

    def _open(self, path: Path) -> tuple[sqlite3.Connection, tuple[int, int]]:
        """The cache at `path`; one that cannot be read (truncated, not SQLite, a folder) is moved
        aside and started over: a cache is disposable, and must never keep the server from starting."""
        try:
            db = self._connect(path)
        except sqlite3.Error as exc:
            kept = _quarantine(path)
            log.warning(
                "embedding cache unreadable; moved aside and started empty",
                path=str(path),
                moved_to=str(kept),
                error=str(exc),
            )
            db = self._connect(path)
        self._db = db
        return db, self._totals()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL syncs at checkpoints only: a power cut may drop the newest entries,
            # which are recomputed on their next miss; the file itself stays consistent.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            # Reads every page of the table's tree: a truncated file fails here, not at a lookup.
            db.execute("SELECT COALESCE(MAX(used), 0), COUNT(*) FROM embeddings").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def _totals(self) -> tuple[int, int]:
        row = self._db.execute("SELECT COALESCE(MAX(used), 0), COUNT(*) FROM embeddings").fetchone()
        return int(row[0]), int(row[1])

    # -- the engine's calls ------------------------------------------------------------------------

    async def lookup(self, recipe: Recipe, texts: Sequence[str]) -> Lookup:
        keys = [recipe.key(t) for t in texts]
        found = await self._run(lambda: self._get(keys))
        if not recipe.truncate:
            found = {i: entry for i, entry in found.items() if entry[1] < recipe.window}
        # A row of the wrong size is damage (the file was edited or mixed up): recompute it, the
        # new vector replaces it.
        found = {i: entry for i, entry in found.items() if entry[0].shape == (recipe.dimensions,)}
        hits = len(found)
        with self._lock:
            self._hits += hits
            self._misses += len(keys) - hits
        if self._metrics is not None:
            self._metrics.record_cache(recipe.model, hits=hits, misses=len(keys) - hits)
        return Lookup(keys=keys, found=found)

    async def store(self, keys: Sequence[bytes], vectors: FloatMatrix, tokens: Sequence[int]) -> None:
        rows = [
            (key, np.ascontiguousarray(vector, dtype=np.float32).tobytes(), int(count))
            for key, vector, count in zip(keys, vectors, tokens, strict=True)
        ]
        if rows:
            await self._run(lambda: self._put(rows))

    def stats(self) -> CacheStats:
        with self._lock:
            hits, misses = self._hits, self._misses
        entries = self._thread.call(lambda: int(self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]))
        return CacheStats(hits=hits, misses=misses, entries=entries)

    def close(self) -> None:
        def shut() -> None:
            self._db.close()

        self._thread.call(shut)
        self._thread.close()

    # -- on the cache thread -----------------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        return await self._thread.run(fn)

    def _get(self, keys: list[bytes]) -> dict[int, tuple[np.ndarray, int]]:
        positions: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            positions.setdefault(key, []).append(i)
        found: dict[int, tuple[np.ndarray, int]] = {}
        unique = list(positions)
        for start in range(0, len(unique), LOOKUP_CHUNK):
            part = unique[start : start + LOOKUP_CHUNK]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(f"SELECT key, vector, tokens FROM embeddings WHERE key IN ({marks})", part)
            hit_keys = []
            for key, blob, tokens in rows:
                vector = np.frombuffer(blob, dtype=np.float32)
                for i in positions[key]:
                    found[i] = (vector, int(tokens))
                hit_keys.append(key)
            if hit_keys:
                self._clock += 1
                touched = [(self._clock, k) for k in hit_keys]
                self._db.executemany("UPDATE embeddings SET used = ? WHERE key = ?", touched)
        return found

    def _put(self, rows: list[tuple[bytes, bytes, int]]) -> None:
        self._clock += 1
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO embeddings (key, vector, tokens, used) VALUES (?, ?, ?, ?)",
                [(key, blob, tokens, self._clock) for key, blob, tokens in rows],
            )
            # Rows stored are misses, so new keys but for the odd race: counting them all as new
            # may only make the exact count below run a little early.
            self._count += len(rows)
            if self._count > self._max_entries:
                self._count = int(self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])
            if self._count > self._max_entries:
                target = int(self._max_entries * (1 - EVICT_FRACTION))
                self._db.execute(
                    "DELETE FROM embeddings WHERE key IN (SELECT key FROM embeddings ORDER BY used LIMIT ?)",
                    (self._count - target,),
                )
                self._count = target


def _quarantine(path: Path) -> Path:
    """Move the cache file (with its WAL and shared-memory files), or whatever is at its path,
    out of the way; returns where the main one went."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    kept = path.with_name(f"{path.name}.broken-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists() or source.is_symlink():
            source.rename(kept.with_name(kept.name + suffix))
    return kept
