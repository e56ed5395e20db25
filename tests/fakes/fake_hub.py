"""A local stand-in for the Hugging Face Hub's file endpoints, enough for `hf_hub_download`.

It answers the requests huggingface_hub 2.x makes, with the headers it reads:

- `HEAD|GET {endpoint}/{repo_id}/resolve/{revision}/{filename}`:
  - a small ("git") file: 200 with `ETag` (the git blob sha1), `X-Repo-Commit`, `Content-Length`;
  - a large ("LFS") file: 302 to a second server playing the CDN, with `X-Linked-Etag` (sha256),
    `X-Linked-Size` and `X-Repo-Commit`. The CDN listens on another port on purpose: huggingface_hub
    follows redirects that stay on the Hub's origin and stops at the first one that leaves it, reading the
    metadata from that redirect, which is the path real LFS downloads take.
- `GET {cdn}/{sha256}`: the bytes, honouring `Range: bytes=N-` (resumed downloads); on request, a
  download cut short (`cut_next_download_at`), corrupted (`corrupt_downloads`) or sent at a slow,
  steady rate (`throttle_bytes_per_second`, a slow link: reads never time out, the end is far).
- errors as the Hub sends them: 404 with `X-Error-Code: RepoNotFound`, `RevisionNotFound` or
  `EntryNotFound` (the last with `X-Repo-Commit`, so the client can cache the file's absence).

No `X-Xet-Hash` header is ever sent, so clients take the plain HTTP path (no hf_xet, no CAS server).
Every request is recorded in `requests`, so tests can tell whether a call touched the network.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self
from urllib.parse import unquote, urlsplit

DEFAULT_BRANCH = "main"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]


@dataclass(slots=True)
class _Revision:
    commit: str
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)


def git_blob_sha1(content: bytes) -> str:
    """The id git gives a blob, which the Hub sends as the ETag of files stored in git."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """Repositories with branches of files, served over HTTP on 127.0.0.1 (ports chosen by the OS)."""

    def __init__(self, *, lfs_threshold: int = 1024) -> None:
        # Files at least this large are served as LFS (redirect to the CDN), as on the Hub.
        self.lfs_threshold = lfs_threshold
        self.requests: list[RecordedRequest] = []
        self._repos: dict[str, dict[str, _Revision]] = {}
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=False))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=True))
        self._threads: list[threading.Thread] = []
        self._running = False
        # Fault injection for downloads from the CDN: the next one stops after this many bytes of its
        # body (the connection closes early, as a dropped network does) ...
        self.cut_next_download_at: int | None = None
        # ... and while set, every one sends bytes that do not match the file's sha256.
        self.corrupt_downloads = False
        # ... and while set, every one sends its body at about this many bytes a second.
        self.throttle_bytes_per_second: int | None = None

    @property
    def url(self) -> str:
        """The endpoint to hand to huggingface_hub (`endpoint=` / HF_ENDPOINT)."""
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def add_file(
        self, repo_id: str, filename: str, content: bytes, *, revision: str = DEFAULT_BRANCH, commit: str | None = None
    ) -> str:
        """Adds a file to a branch (created on first use) and returns the branch's commit hash.
        `commit` gives a new branch that hash (a real repository's, for sources pinned to it)."""
        with self._lock:
            branches = self._repos.setdefault(repo_id, {})
            branch = branches.get(revision)
            if branch is None:
                commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
                branch = branches[revision] = _Revision(commit=commit)
            branch.files[filename] = content
            if len(content) >= self.lfs_threshold:
                branch.lfs.add(filename)
                self._blobs[hashlib.sha256(content).hexdigest()] = content
            return branch.commit

    def start(self) -> Self:
        for server in (self._hub, self._cdn):
            # A short poll interval: shutdown() waits up to one interval, and tests stop hubs often.
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-hub", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._running = True
        return self

    def stop(self) -> None:
        """Stops serving and frees the ports: afterwards, connections to `url` are refused."""
        if not self._running:
            return
        self._running = False
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _lookup(self, repo_id: str, revision: str) -> _Revision | None:
        branches = self._repos[repo_id]
        if revision in branches:
            return branches[revision]
        # Like the Hub, a full commit hash names a revision as well as a branch name does.
        return next((b for b in branches.values() if b.commit == revision), None)

    def _record(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(
                RecordedRequest(handler.command, handler.path, {k: v for k, v in handler.headers.items()})
            )


@contextmanager
def running_fake_hub(*, lfs_threshold: int = 1024) -> Iterator[FakeHub]:
    with FakeHub(lfs_threshold=lfs_threshold) as hub:
        yield hub


def _handler(hub: FakeHub, *, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so stopping the server never strands a kept-alive socket.
        protocol_version = "HTTP/1.0"

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def log_message(self, format: str, *args: object) -> None:
            # Quiet: pytest would show every request as captured stderr.
            pass

        def _serve(self, *, body: bool) -> None:
            hub._record(self)
            path = unquote(urlsplit(self.path).path)
            if cdn:
                self._serve_blob(path.strip("/"), body=body)
            else:
                self._serve_resolve(path, body=body)

        def _serve_resolve(self, path: str, *, body: bool) -> None:
            # /{org}/{repo}/resolve/{revision}/{filename...}
            parts = path.strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                self._error(404, "RepoNotFound", "Repository not found")
                return
            repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            with hub._lock:
                if repo_id not in hub._repos:
                    self._error(404, "RepoNotFound", "Repository not found")
                    return
                branch = hub._lookup(repo_id, revision)
                if branch is None:
                    self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
                    return
                content = branch.files.get(filename)
                is_lfs = filename in branch.lfs
            if content is None:
                self._error(404, "EntryNotFound", "Entry not found", commit=branch.commit)
                return
            if is_lfs:
                sha256 = hashlib.sha256(content).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn_url}/{sha256}")
                self.send_header("X-Repo-Commit", branch.commit)
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(len(content)))
                self.send_header("ETag", f'"{git_blob_sha1(content)}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", branch.commit)
            self.send_header("ETag", f'"{git_blob_sha1(content)}"')
            self._send_content(content, body=body, start=0)

        def _serve_blob(self, sha256: str, *, body: bool) -> None:
            with hub._lock:
                content = hub._blobs.get(sha256)
            if content is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            range_header = self.headers.get("Range")
            if range_header is not None and range_header.startswith("bytes="):
                first, _, _ = range_header.removeprefix("bytes=").partition("-")
                start = int(first or 0)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            else:
                self.send_response(200)
            self.send_header("ETag", f'"{sha256}"')
            if body and hub.corrupt_downloads:
                content = bytes([content[0] ^ 0xFF]) + content[1:]
            cut = None
            if body:
                with hub._lock:
                    cut, hub.cut_next_download_at = hub.cut_next_download_at, None
            self._send_content(content, body=body, start=start, stop=cut)

        def _send_content(self, content: bytes, *, body: bool, start: int, stop: int | None = None) -> None:
            # Content-Length is always the whole remainder: a `stop` short of it is a dropped connection.
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content) - start))
            self.end_headers()
            if not body:
                return
            rate = hub.throttle_bytes_per_second
            if rate is None:
                self.wfile.write(content[start:stop])
                return
            piece = max(1, rate // 20)
            end = len(content) if stop is None else stop
            try:
                for offset in range(start, end, piece):
                    self.wfile.write(content[offset : min(offset + piece, end)])
                    self.wfile.flush()
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away mid-download, as a stopped server does

        def _error(self, status: int, code: str, message: str, *, commit: str | None = None) -> None:
            payload = f'{{"error": "{message}"}}'.encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler
