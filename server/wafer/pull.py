"""The one Hub download path: `wafer models pull` fetches a model's hf:// files into the server's
model cache ahead of its load, and `SourceResolver` runs the same download for an hf:// file a load
needs that is not cached yet.

It runs in the server (an admin RPC streaming progress) because the cache is the server's: a client
on another machine could not write it. huggingface_hub 2.x neither resumes a download across calls
(its partial files are unique per attempt and deleted on failure) nor checks what it received against
the Hub's checksum, so the transfer is done here, with huggingface_hub asked only for the file's
metadata (commit, ETag, size, where the bytes are). Files land in huggingface_hub's cache layout
(`models--org--repo/{blobs,snapshots,refs}`), where `SourceResolver` finds them offline.

- Resume: bytes arrive in `blobs/<etag>.incomplete`, which survives an interrupted pull; the next
  pull asks for the rest with `Range: bytes=N-` (and starts over if the server ignores the range).
- Checksum: the ETag of an LFS file is its sha256, that of a file kept in git its git blob id (sha1);
  the complete file is hashed and compared before it enters the cache. A mismatch deletes it.
- Stop: a download asked whether to go on (`cancelled`) after each read stops there, keeping what
  arrived: a load cancelled at shutdown must not keep the process alive until the last byte comes.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wafer.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from wafer.specs import ModelSpec

# Most bytes per read: a read returns what has arrived, up to this, so a slow link never holds one
# read (and the check for a cancelled download after it) for long.
CHUNK_BYTES = 1 << 20
# Progress reports at most this often (plus one at the end of each file).
REPORT_EVERY_SECONDS = 0.2
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


def never() -> bool:
    """A download nobody cancels."""
    return False


class DownloadCancelledError(UnavailableError):
    """The download was asked to stop (`cancelled`); what arrived is kept to resume from."""


PKG_SCHEME = "pkg://"
HF_SCHEME = "hf://"


@dataclass(frozen=True, slots=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str | None

    @classmethod
    def parse(cls, source: str) -> HubFile:
        rest = source.removeprefix(HF_SCHEME)
        rest, _, revision = rest.partition("@")
        parts = rest.split("/")
        if len(parts) < 3 or not all(parts):
            raise InvalidArgumentError(f"hub source {source!r} must look like hf://org/repo/file[@revision]")
        if any(part in {".", ".."} for part in parts):
            # The parts become folders of the model cache: none may climb out of it.
            raise InvalidArgumentError(f"hub source {source!r} must not contain '.' or '..' segments")
        return cls(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]), revision=revision or None)


@dataclass(frozen=True, slots=True)
class PullProgress:
    source: str
    downloaded_bytes: int
    total_bytes: int
    resumed_from_bytes: int = 0
    file_done: bool = False
    path: str = ""
    done: bool = False


async def in_thread(progress: Generator[PullProgress, None, None]) -> AsyncIterator[PullProgress]:
    """Drive a blocking pull from a worker thread, one report at a time; the event loop stays free."""
    step: asyncio.Future[PullProgress | None] | None = None
    try:
        while True:
            step = asyncio.ensure_future(asyncio.to_thread(next, progress, None))
            # Shielded: a caller that leaves does not stop the thread, which runs the step on.
            item = await asyncio.shield(step)
            if item is None:
                return
            yield item
    finally:
        # The caller went away: close the file being written (it stays, to resume from), once the
        # step in flight has returned (a generator running on another thread cannot be closed).
        if step is not None and not step.done():
            await asyncio.wait([step])
            if not step.cancelled():
                step.exception()  # what it raised has nobody to go to now: the caller left
        await asyncio.to_thread(progress.close)


def hub_sources(spec: ModelSpec) -> list[str]:
    """The spec's sources that come from the Hub; refuses a model that has none."""
    sources = [s for s in (spec.source, spec.tokenizer, *spec.files.values()) if s and s.startswith(HF_SCHEME)]
    if not sources:
        raise FailedPreconditionError(
            f"model {spec.name!r} has nothing to pull: its source is {spec.source!r}, not an hf:// source"
        )
    return sources


class HubPuller:
    """Downloads hf:// files into `cache_dir` (huggingface_hub's cache layout)."""

    def __init__(self, cache_dir: Path, *, endpoint: str | None = None) -> None:
        self._cache_dir = cache_dir
        self._endpoint = endpoint

    def pull(self, source: str, *, model: str) -> Generator[PullProgress, None, None]:
        """Fetch one file, yielding progress; the last report has `file_done` and the cached path."""
        hub_file = HubFile.parse(source)
        cached = self.cached(hub_file)
        if cached is not None:
            size = cached.stat().st_size
            yield PullProgress(source, size, size, file_done=True, path=str(cached))
            return
        yield from self.fetch(source, hub_file, self._metadata(hub_file, model), model=model)

    def download(
        self, source: str, hub_file: HubFile, meta: HubMetadata, *, model: str, cancelled: Callable[[], bool] = never
    ) -> Path:
        """`fetch` to its end without reporting progress (an on-demand load); the cached path."""
        *_, last = self.fetch(source, hub_file, meta, model=model, cancelled=cancelled)
        assert last.file_done, "fetch ends with the file's report"
        return Path(last.path)

    def fetch(
        self,
        source: str,
        hub_file: HubFile,
        meta: HubMetadata,
        *,
        model: str,
        cancelled: Callable[[], bool] = never,
    ) -> Generator[PullProgress, None, None]:
        """Download the file `meta` (the Hub's answer for `hub_file`) describes into the cache:
        resumed from a partial file, checked against the Hub's checksum, then laid out as
        huggingface_hub lays out its cache. The last report has `file_done` and the cached path.
        Once `cancelled()` is true the download stops (DownloadCancelledError), its bytes kept."""
        etag = (meta.etag or "").strip('"')
        if not (_SHA256.fullmatch(etag) or _SHA1.fullmatch(etag)) or not meta.commit_hash:
            raise FailedPreconditionError(
                f"model {model!r}: the Hub sent no usable checksum (ETag {meta.etag!r}) for {source}; "
                "refusing to cache a file that cannot be verified"
            )
        repo_dir = self._cache_dir / f"models--{hub_file.repo_id.replace('/', '--')}"
        blob = repo_dir / "blobs" / etag
        partial = blob.with_name(etag + ".incomplete")
        blob.parent.mkdir(parents=True, exist_ok=True)
        total = int(meta.size or 0)
        if not blob.exists():
            yield from self._download(source, meta.location, partial, total, model, cancelled=cancelled)
            _verify(partial, etag, source, model)
            partial.replace(blob)
        snapshot = repo_dir / "snapshots" / meta.commit_hash / hub_file.filename
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        if not snapshot.exists():
            snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
        revision = hub_file.revision or "main"
        if revision != meta.commit_hash:
            ref = repo_dir / "refs" / revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(meta.commit_hash)
        size = blob.stat().st_size
        yield PullProgress(source, size, total or size, file_done=True, path=str(snapshot))

    def cached(self, hub_file: HubFile) -> Path | None:
        """The file from the cache, without a request; None if it is not there."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(
                hf_hub_download(
                    hub_file.repo_id,
                    hub_file.filename,
                    revision=hub_file.revision,
                    cache_dir=self._cache_dir,
                    local_files_only=True,
                )
            )
        except LocalEntryNotFoundError:
            return None

    def _metadata(self, hub_file: HubFile, model: str) -> HubMetadata:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        url = hf_hub_url(hub_file.repo_id, hub_file.filename, revision=hub_file.revision, endpoint=self._endpoint)
        try:
            meta = get_hf_file_metadata(url, endpoint=self._endpoint)
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
            raise FailedPreconditionError(
                f"model {model!r}: the Hub has no {hub_file.repo_id}/{hub_file.filename}"
                f"{'@' + hub_file.revision if hub_file.revision else ''} ({type(exc).__name__}); check its `source`"
            ) from None
        except Exception as exc:
            raise self._offline(hub_file, model, exc) from exc
        return HubMetadata.of(meta)

    def _download(
        self, source: str, url: str, partial: Path, total: int, model: str, *, cancelled: Callable[[], bool]
    ) -> Iterator[PullProgress]:
        # Public (documented) but exported lazily, which mypy cannot see.
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

        have = partial.stat().st_size if partial.exists() else 0
        if total and have > total:  # not a prefix of this file: start over
            partial.unlink()
            have = 0
        # The token goes to the Hub only, never to the CDN a large file redirects to.
        hub = urllib.parse.urlsplit(self._endpoint or constants.ENDPOINT).netloc
        headers = build_hf_headers() if urllib.parse.urlsplit(url).netloc == hub else {}
        if have:
            headers["Range"] = f"bytes={have}-"
        request = urllib.request.Request(url, headers=headers)
        resumed = have
        reported = 0.0
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                mode = "ab"
                if have and response.status != 206:
                    have = resumed = 0  # the server ignored the range: the whole file follows
                    mode = "wb"
                yield PullProgress(source, have, total, resumed_from_bytes=resumed)
                with partial.open(mode) as file:
                    while chunk := response.read1(CHUNK_BYTES):
                        file.write(chunk)
                        have += len(chunk)
                        if cancelled():
                            raise DownloadCancelledError(
                                f"model {model!r}: the download of {source} was stopped at {have} of "
                                f"{total or '?'} bytes (the load was cancelled); the next load or pull resumes it"
                            )
                        now = time.monotonic()
                        if now - reported >= REPORT_EVERY_SECONDS:
                            reported = now
                            yield PullProgress(source, have, total, resumed_from_bytes=resumed)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise UnavailableError(
                f"model {model!r}: the download of {source} stopped at {have} of {total or '?'} bytes "
                f"({type(exc).__name__}: {exc}); run the pull again to resume it"
            ) from exc
        if total and have != total:
            raise UnavailableError(
                f"model {model!r}: the download of {source} ended at {have} of {total} bytes; "
                "run the pull again to resume it"
            )

    def _offline(self, hub_file: HubFile, model: str, exc: Exception) -> UnavailableError:
        from huggingface_hub import constants

        endpoint = self._endpoint or constants.ENDPOINT
        revision = f" --revision {hub_file.revision}" if hub_file.revision else ""
        return UnavailableError(
            f"model {model!r}: cannot reach the Hub at {endpoint} to fetch {hub_file.repo_id}/{hub_file.filename} "
            f"({type(exc).__name__}). On a machine that is online, run `hf download {hub_file.repo_id} "
            f"{hub_file.filename}{revision} --cache-dir <folder>` and copy that folder's contents into "
            f"{self._cache_dir}; or run `wafer models pull {model}` again once this server is online"
        )


@dataclass(frozen=True, slots=True)
class HubMetadata:
    """What the Hub says of a file (huggingface_hub's `HfFileMetadata`): its commit, checksum (ETag),
    where its bytes are, and its size."""

    commit_hash: str | None
    etag: str | None
    location: str
    size: int | None

    @classmethod
    def of(cls, meta: Any) -> HubMetadata:
        return cls(meta.commit_hash, meta.etag, meta.location, meta.size)


def _verify(path: Path, etag: str, source: str, model: str) -> None:
    if len(etag) == 64:
        digest = hashlib.sha256()
    else:
        # Files kept in git are named by their git blob id: sha1 over a header and the content.
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    if digest.hexdigest() != etag:
        path.unlink()
        raise FailedPreconditionError(
            f"model {model!r}: {source} arrived corrupted (checksum {digest.hexdigest()} instead of the "
            f"Hub's {etag}); the download was deleted. Run the pull again"
        )
