"""SourceResolver: hf:// sources against a local fake Hub, pkg:// sources, and plain paths.

The fake Hub (tests/fakes/fake_hub.py) listens on 127.0.0.1 only; nothing here reaches the network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest

from tests.fakes.fake_hub import FakeHub, running_fake_hub
from wafer.errors import FailedPreconditionError, InvalidArgumentError
from wafer.sources import HubFile, SourceResolver

REPO = "org/repo"
# Over the fake's LFS threshold, so it takes the Hub's redirect-to-CDN path.
WEIGHTS = bytes(range(256)) * 64
CONFIG = b'{"hidden_size": 8}'
WEIGHTS_V2 = b"v2" * 2048


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    with running_fake_hub() as hub:
        hub.add_file(REPO, "file.gguf", WEIGHTS)
        hub.add_file(REPO, "config.json", CONFIG)
        hub.add_file(REPO, "sub/dir/tokenizer.json", CONFIG)
        hub.add_file(REPO, "file.gguf", WEIGHTS_V2, revision="v2")
        yield hub


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "hub-cache"


@pytest.fixture
def resolver(tmp_path: Path, cache_dir: Path, fake_hub: FakeHub) -> SourceResolver:
    return SourceResolver(tmp_path, cache_dir, hub_endpoint=fake_hub.url)


@pytest.fixture
def local_resolver(tmp_path: Path, cache_dir: Path) -> SourceResolver:
    """For sources that never reach the Hub: an endpoint nothing listens on, to prove it."""
    return SourceResolver(tmp_path, cache_dir, hub_endpoint=closed_port_url())


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there once the socket is closed: connections are refused at once.
    return f"http://127.0.0.1:{port}"


# -- hf:// -------------------------------------------------------------------------------------------


def test_downloads_an_lfs_file_into_the_cache(resolver: SourceResolver, cache_dir: Path, fake_hub: FakeHub) -> None:
    path = resolver.resolve(f"hf://{REPO}/file.gguf", model="x")

    assert path.read_bytes() == WEIGHTS
    assert path.is_relative_to(cache_dir)
    assert path.name == "file.gguf"
    # The CDN hop really happened (the plain-HTTP LFS path, not xet).
    sha256 = hashlib.sha256(WEIGHTS).hexdigest()
    assert ("GET", f"/{sha256}") in [(r.method, r.path) for r in fake_hub.requests]


def test_downloads_a_small_git_file_and_files_in_folders(resolver: SourceResolver) -> None:
    assert resolver.resolve(f"hf://{REPO}/config.json", model="x").read_bytes() == CONFIG
    nested = resolver.resolve(f"hf://{REPO}/sub/dir/tokenizer.json", model="x")
    assert nested.read_bytes() == CONFIG
    assert nested.parts[-3:] == ("sub", "dir", "tokenizer.json")


def test_a_cached_file_is_served_without_asking_the_hub(
    resolver: SourceResolver, tmp_path: Path, cache_dir: Path, fake_hub: FakeHub
) -> None:
    first = resolver.resolve(f"hf://{REPO}/file.gguf", model="x")
    requests = len(fake_hub.requests)

    again = resolver.resolve(f"hf://{REPO}/file.gguf", model="x")
    assert again == first
    assert len(fake_hub.requests) == requests

    fake_hub.stop()
    # A fresh resolver, as after a restart, on a machine that cannot reach the Hub any more.
    offline = SourceResolver(tmp_path, cache_dir, hub_endpoint=fake_hub.url)
    path = offline.resolve(f"hf://{REPO}/file.gguf", model="x")
    assert path == first
    assert path.read_bytes() == WEIGHTS


def test_revisions_are_separate_files(
    resolver: SourceResolver, tmp_path: Path, cache_dir: Path, fake_hub: FakeHub
) -> None:
    commit = fake_hub.add_file(REPO, "file.gguf", WEIGHTS_V2, revision="v2")

    v2 = resolver.resolve(f"hf://{REPO}/file.gguf@v2", model="x")
    main = resolver.resolve(f"hf://{REPO}/file.gguf", model="x")
    by_commit = resolver.resolve(f"hf://{REPO}/file.gguf@{commit}", model="x")

    assert v2.read_bytes() == WEIGHTS_V2
    assert main.read_bytes() == WEIGHTS
    assert by_commit.read_bytes() == WEIGHTS_V2
    fake_hub.stop()
    offline = SourceResolver(tmp_path, cache_dir, hub_endpoint=fake_hub.url)
    assert offline.resolve(f"hf://{REPO}/file.gguf@v2", model="x").read_bytes() == WEIGHTS_V2


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ("hf://org/missing/file.gguf", ["org/missing"]),
        (f"hf://{REPO}/missing.gguf", [REPO, "missing.gguf"]),
        (f"hf://{REPO}/file.gguf@no-such-branch", [REPO, "no-such-branch"]),
    ],
)
def test_what_the_hub_does_not_have_is_a_failed_precondition(
    resolver: SourceResolver, source: str, named: list[str]
) -> None:
    with pytest.raises(FailedPreconditionError) as caught:
        resolver.resolve(source, model="my-model")
    assert "my-model" in caught.value.message
    for part in named:
        assert part in caught.value.message


def test_unreachable_hub_with_nothing_cached_says_how_to_get_the_file(tmp_path: Path) -> None:
    resolver = SourceResolver(tmp_path, tmp_path / "cache", hub_endpoint=closed_port_url())
    started = time.monotonic()

    with pytest.raises(FailedPreconditionError) as caught:
        resolver.resolve(f"hf://{REPO}/file.gguf@v2", model="my-model")

    # huggingface_hub on its own retries an unreachable Hub with backoff for ~25 s.
    assert time.monotonic() - started < 5
    message = caught.value.message
    assert "my-model" in message
    assert f"{REPO}/file.gguf@v2" in message
    assert f"hf download {REPO} file.gguf --revision v2 --cache-dir" in message
    assert str(tmp_path / "cache") in message
    assert "point the model's `source` at a local file" in message


def test_offline_mode_never_touches_the_network(
    resolver: SourceResolver, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = resolver.resolve(f"hf://{REPO}/config.json", model="x")
    requests = len(fake_hub.requests)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: setting the variable now would change
    # nothing, so set what it read.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    assert resolver.resolve(f"hf://{REPO}/config.json", model="x") == cached
    with pytest.raises(FailedPreconditionError, match="hf download") as caught:
        resolver.resolve(f"hf://{REPO}/file.gguf", model="x")
    assert "Offline" in caught.value.message
    assert len(fake_hub.requests) == requests


@pytest.mark.parametrize("source", ["hf://org/repo", "hf://org", "hf://org//file", "hf://"])
def test_malformed_hub_sources_are_invalid(local_resolver: SourceResolver, source: str) -> None:
    with pytest.raises(InvalidArgumentError, match="hf://org/repo/file"):
        local_resolver.resolve(source, model="x")


def test_hub_file_parsing() -> None:
    assert HubFile.parse("hf://a/b/c/d.gguf@refs/pr/1") == HubFile("a/b", "c/d.gguf", "refs/pr/1")
    assert HubFile.parse("hf://a/b/c.gguf") == HubFile("a/b", "c.gguf", None)


# -- pkg:// ------------------------------------------------------------------------------------------


def test_a_file_of_an_installed_distribution(local_resolver: SourceResolver) -> None:
    expected = Path(str(importlib.metadata.distribution("pytest").locate_file("pytest/__init__.py")))
    assert local_resolver.resolve("pkg://pytest/pytest/__init__.py", model="x") == expected
    assert expected.is_file()


def test_a_missing_distribution_says_how_to_install_it(local_resolver: SourceResolver) -> None:
    with pytest.raises(FailedPreconditionError) as caught:
        local_resolver.resolve("pkg://wafer-no-such-dist/model.onnx", model="my-model")
    assert "my-model" in caught.value.message
    assert "pip install --no-deps wafer-no-such-dist" in caught.value.message


def test_a_missing_file_in_an_installed_distribution(local_resolver: SourceResolver) -> None:
    with pytest.raises(FailedPreconditionError, match=r"pytest.*no file 'pytest/missing\.onnx'"):
        local_resolver.resolve("pkg://pytest/pytest/missing.onnx", model="x")


@pytest.mark.parametrize("source", ["pkg://", "pkg://pytest", "pkg:///file"])
def test_malformed_package_sources_are_invalid(local_resolver: SourceResolver, source: str) -> None:
    with pytest.raises(InvalidArgumentError):
        local_resolver.resolve(source, model="x")


# -- paths -------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_base_dir(tmp_path: Path, cache_dir: Path) -> None:
    base = tmp_path / "catalog"
    (base / "models").mkdir(parents=True)
    (base / "models" / "m.onnx").write_bytes(b"onnx")
    resolver = SourceResolver(base, cache_dir)

    assert resolver.resolve("models/m.onnx", model="x") == base / "models" / "m.onnx"
    absolute = base / "models" / "m.onnx"
    assert resolver.resolve(str(absolute), model="x") == absolute


def test_a_missing_path_is_a_failed_precondition(tmp_path: Path, cache_dir: Path) -> None:
    resolver = SourceResolver(tmp_path, cache_dir)
    with pytest.raises(FailedPreconditionError, match=str(tmp_path / "nope.onnx")):
        resolver.resolve("nope.onnx", model="x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FailedPreconditionError):
        resolver.resolve("folder", model="x")


def test_an_unknown_scheme_is_invalid(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="s3://"):
        SourceResolver(tmp_path, cache_dir).resolve("s3://bucket/m.onnx", model="x")


def test_the_fake_cdn_resumes_from_a_byte_offset(fake_hub: FakeHub) -> None:
    # huggingface_hub resumes an interrupted download with `Range: bytes=N-`; the fake must honour it.
    sha256 = hashlib.sha256(WEIGHTS).hexdigest()
    request = urllib.request.Request(f"{fake_hub.cdn_url}/{sha256}", headers={"Range": "bytes=100-"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-{len(WEIGHTS) - 1}/{len(WEIGHTS)}"
        assert response.read() == WEIGHTS[100:]
