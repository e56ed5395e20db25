"""`wafer models pull` (wafer.pull.HubPuller) against the local fake Hub: whole pulls, a pull cut short and
resumed with an HTTP Range request, a corrupted download caught by its checksum, and no network."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.fake_hub import FakeHub, running_fake_hub
from tests.integration.test_hub_source import closed_port_url
from wafer.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from wafer.pull import HubPuller, PullProgress, hub_sources, in_thread
from wafer.sources import SourceResolver
from wafer.specs import ModelSpec, Task

REPO = "org/model"
# Several pull chunks (1 MiB) and well over the fake's LFS threshold: served by the CDN, sha256 ETag.
WEIGHTS = hashlib.sha256(b"seed").digest() * (3 * 2**20 // 32 + 7)
TOKENIZER = b'{"model": {"type": "WordPiece"}}'  # small: kept in git, git blob sha1 ETag
SOURCE = f"hf://{REPO}/model.onnx"
TOKENIZER_SOURCE = f"hf://{REPO}/tokenizer.json"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with running_fake_hub() as hub:
        hub.add_file(REPO, "model.onnx", WEIGHTS)
        hub.add_file(REPO, "tokenizer.json", TOKENIZER)
        yield hub


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def puller(cache: Path, hub: FakeHub) -> HubPuller:
    return HubPuller(cache, endpoint=hub.url)


def pull_all(puller: HubPuller, source: str) -> list[PullProgress]:
    return list(puller.pull(source, model="m"))


def downloads(hub: FakeHub) -> list[str]:
    """Range headers (or "" for whole-file requests) of the GETs that fetched bytes from the CDN."""
    return [r.headers.get("Range", "") for r in hub.requests if r.method == "GET" and "/resolve/" not in r.path]


def test_pull_fetches_verifies_and_caches_where_the_resolver_finds_it(
    puller: HubPuller, hub: FakeHub, cache: Path, tmp_path: Path
) -> None:
    reports = pull_all(puller, SOURCE)
    last = reports[-1]
    assert last.file_done and last.downloaded_bytes == last.total_bytes == len(WEIGHTS)
    assert Path(last.path).read_bytes() == WEIGHTS
    assert [r.downloaded_bytes for r in reports] == sorted(r.downloaded_bytes for r in reports)
    tokenizer = pull_all(puller, TOKENIZER_SOURCE)[-1]
    assert Path(tokenizer.path).read_bytes() == TOKENIZER
    assert not list(cache.rglob("*.incomplete"))
    # The resolver loads both from the cache, offline: its endpoint has nothing listening.
    seen = len(hub.requests)
    offline = SourceResolver(tmp_path, cache, hub_endpoint=closed_port_url())
    assert offline.resolve(SOURCE, model="m").read_bytes() == WEIGHTS
    assert offline.resolve(TOKENIZER_SOURCE, model="m").read_bytes() == TOKENIZER
    # A second pull finds the file cached and asks the Hub nothing.
    again = pull_all(puller, SOURCE)
    assert len(again) == 1 and again[0].file_done
    assert len(hub.requests) == seen


def test_an_interrupted_pull_resumes_with_a_range_request(puller: HubPuller, hub: FakeHub, cache: Path) -> None:
    cut = 2**20 + 12345
    hub.cut_next_download_at = cut
    with pytest.raises(UnavailableError, match="run the pull again to resume it"):
        pull_all(puller, SOURCE)
    (partial,) = cache.rglob("*.incomplete")
    assert partial.stat().st_size == cut
    reports = pull_all(puller, SOURCE)
    assert downloads(hub) == ["", f"bytes={cut}-"]
    assert reports[0].resumed_from_bytes == cut
    assert Path(reports[-1].path).read_bytes() == WEIGHTS
    assert not list(cache.rglob("*.incomplete"))


def test_a_corrupted_download_is_detected_and_deleted(puller: HubPuller, hub: FakeHub, cache: Path) -> None:
    hub.corrupt_downloads = True
    with pytest.raises(FailedPreconditionError, match=r"arrived corrupted \(checksum .* instead of the Hub's"):
        pull_all(puller, SOURCE)
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing unverified stays in the cache
    hub.corrupt_downloads = False
    assert Path(pull_all(puller, SOURCE)[-1].path).read_bytes() == WEIGHTS


def test_offline_says_what_to_do(cache: Path) -> None:
    puller = HubPuller(cache, endpoint=closed_port_url())
    with pytest.raises(
        UnavailableError, match=r"cannot reach the Hub.*hf download org/model model.onnx.*wafer models pull m"
    ):
        pull_all(puller, SOURCE)


def test_what_the_hub_does_not_have_is_a_failed_precondition(puller: HubPuller) -> None:
    with pytest.raises(FailedPreconditionError, match=r"the Hub has no org/model/nope\.onnx"):
        pull_all(puller, f"hf://{REPO}/nope.onnx")


def test_the_token_goes_to_the_hub_not_to_the_cdn(
    puller: HubPuller, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    pull_all(puller, SOURCE)
    pull_all(puller, TOKENIZER_SOURCE)
    cdn = [r for r in hub.requests if r.method == "GET" and "/resolve/" not in r.path]
    hub_gets = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    assert cdn and all("Authorization" not in r.headers for r in cdn)
    assert hub_gets and all(r.headers.get("Authorization") == "Bearer hf_secret" for r in hub_gets)


def test_sources_cannot_climb_out_of_the_cache(puller: HubPuller) -> None:
    with pytest.raises(InvalidArgumentError, match=r"must not contain '\.' or '\.\.' segments"):
        pull_all(puller, "hf://org/model/../../../etc/x")


def test_only_hub_sources_are_pulled() -> None:
    spec = ModelSpec(
        name="m", backend="onnx", source=SOURCE, tokenizer=TOKENIZER_SOURCE, tasks=[Task.EMBED], dimensions=4
    )
    assert hub_sources(spec) == [SOURCE, TOKENIZER_SOURCE]
    local = spec.model_copy(update={"source": "pkg://dist/model.onnx", "tokenizer": None})
    with pytest.raises(FailedPreconditionError, match="nothing to pull"):
        hub_sources(local)


# -- on-demand loads take the same path -------------------------------------------------------------


def test_an_on_demand_load_resumes_what_an_interrupted_load_left(hub: FakeHub, cache: Path, tmp_path: Path) -> None:
    resolver = SourceResolver(tmp_path, cache, hub_endpoint=hub.url)
    cut = 2**20 + 777
    hub.cut_next_download_at = cut
    with pytest.raises(FailedPreconditionError, match="could not be downloaded"):
        resolver.resolve(SOURCE, model="m")
    (partial,) = cache.rglob("*.incomplete")
    assert partial.stat().st_size == cut
    assert resolver.resolve(SOURCE, model="m").read_bytes() == WEIGHTS
    assert downloads(hub) == ["", f"bytes={cut}-"]
    assert not list(cache.rglob("*.incomplete"))


def test_an_on_demand_load_refuses_a_corrupted_download(hub: FakeHub, cache: Path, tmp_path: Path) -> None:
    resolver = SourceResolver(tmp_path, cache, hub_endpoint=hub.url)
    hub.corrupt_downloads = True
    with pytest.raises(FailedPreconditionError, match=r"arrived corrupted \(checksum .* instead of the Hub's"):
        resolver.resolve(SOURCE, model="m")
    assert not [p for p in cache.rglob("*") if p.is_file()]


def _partial_sizes(cache: Path) -> list[int]:
    return [p.stat().st_size for p in cache.rglob("*.incomplete")]


async def test_a_pull_whose_caller_leaves_ends_cancelled_and_stops(
    puller: HubPuller, hub: FakeHub, cache: Path
) -> None:
    """A `wafer models pull` whose client goes away while a read runs on the worker thread: the
    stream ends as cancelled (not with the generator's "already executing"), the download stops at
    its next report, and what arrived stays to resume from."""
    hub.throttle_bytes_per_second = 256 << 10  # WEIGHTS take about 12 s

    async def follow() -> None:
        async for _ in in_thread(puller.pull(SOURCE, model="m")):
            pass

    following = asyncio.create_task(follow())
    deadline = time.monotonic() + 30
    while not any(await asyncio.to_thread(_partial_sizes, cache)):
        assert time.monotonic() < deadline, "the download did not start"
        await asyncio.sleep(0.05)
    following.cancel()
    with pytest.raises(asyncio.CancelledError):
        await following
    (size,) = await asyncio.to_thread(_partial_sizes, cache)
    await asyncio.sleep(1.0)
    assert await asyncio.to_thread(_partial_sizes, cache) == [size]
    assert size < len(WEIGHTS)
