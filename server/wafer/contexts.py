"""Contexts of contextual models (cde), and the ones kept with collections.

A contextual model's vectors depend on a context as well as the text: for cde-small-v1, the
*dataset embeddings* of its corpus, stage 1 run on `transductive_corpus_size` (512) documents
sampled from it. A collection indexed with such a model gets its own context, built from the first
documents it is given (an Upsert into a new collection) or sampled from a job's whole source, and
every later upsert and search of the collection uses that context: vectors computed in two contexts
are not comparable.

Contexts are kept in the data folder, one file per collection (`<data_dir>/contexts/<collection>.npz`:
the matrix and the model that built it), written to a temporary file and renamed over the old one,
so a crash leaves the old context or the new one, never half of either. A file that cannot be read
is left as it is, never deleted or replaced on Wafer's own initiative: the collection it belongs to
answers FAILED_PRECONDITION until it is restored or the collection is indexed again with a fresh context.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wafer.domain import Context
from wafer.errors import FailedPreconditionError
from wafer.files import write_atomically


def sample_corpus(documents: Sequence[str], size: int) -> list[str]:
    """`size` documents of a corpus for its context, the authors' rule: a random sample without
    replacement when the corpus has that many, with replacement when it has fewer ("You must use
    exactly this many documents in the minicorpus. You can oversample if your corpus is smaller.").
    Seeded by the documents themselves, so the same corpus always gives the same context."""
    if not documents:
        raise ValueError("a context needs at least one document")
    seed = hashlib.sha256("\x00".join(documents).encode("utf-8")).digest()
    rng = random.Random(seed)
    if len(documents) >= size:
        return rng.sample(list(documents), size)
    return rng.choices(list(documents), k=size)


class Reservoir:
    """A uniform sample of up to `size` documents of a stream of unknown length (algorithm R),
    seeded so the same source gives the same sample."""

    def __init__(self, size: int, seed: str) -> None:
        self.size = size
        self.items: list[str] = []
        self.seen = 0
        self._rng = random.Random(hashlib.sha256(seed.encode("utf-8")).digest())

    def add(self, text: str) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(text)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.size:
            self.items[slot] = text


@dataclass(frozen=True, slots=True)
class StoredContext:
    model: str
    context: Context


class ContextStore:
    """The contexts kept with collections, in `folder`; read once, then served from memory."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._lock = threading.Lock()
        self._loaded: dict[str, StoredContext | None] = {}

    def _path(self, collection: str) -> Path:
        return self._folder / f"{collection}.npz"

    def get(self, collection: str) -> StoredContext | None:
        """The collection's context, None if it has none; FailedPreconditionError if its file cannot
        be read (not remembered: a file put back is read on the next call)."""
        with self._lock:
            if collection in self._loaded:
                return self._loaded[collection]
        path = self._path(collection)
        stored: StoredContext | None = None
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as data:
                    stored = StoredContext(model=str(data["model"]), context=Context.of(np.asarray(data["vectors"])))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                raise FailedPreconditionError(
                    f"the context of collection {collection!r} cannot be read from {path} "
                    f"({type(exc).__name__}: {exc}); the file is left as it is: restore it, or index the "
                    "collection again with a fresh context (docs/contextual.md)"
                ) from None
        with self._lock:
            self._loaded[collection] = stored
        return stored

    def put(self, collection: str, model: str, context: Context) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, vectors=context.vectors, model=np.array(model))
        write_atomically(self._path(collection), buffer.getvalue())
        with self._lock:
            self._loaded[collection] = StoredContext(model=model, context=context)

    def delete(self, collection: str) -> None:
        self._path(collection).unlink(missing_ok=True)
        with self._lock:
            self._loaded[collection] = None
