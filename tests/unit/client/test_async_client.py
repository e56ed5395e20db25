"""The asyncio client against the same fake server: the same contract, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from tests.unit.client.fake_server import REPLY, FakeServer, Script
from wafer_client import AsyncWaferClient, ChatMessage, RetryPolicy, errors

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)


@pytest.fixture
async def client(fake_server: FakeServer, script: Script) -> AsyncIterator[AsyncWaferClient]:
    async with AsyncWaferClient(fake_server.address, retries=FAST, timeout=5) as c:
        yield c


async def test_embed(client: AsyncWaferClient) -> None:
    result = await client.embed(["a", "b"], dimensions=3)
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (2, 3)
    np.testing.assert_allclose(result.vectors[1], [1.0, 1.1, 1.2], rtol=1e-6)


async def test_embed_sends_a_context(client: AsyncWaferClient, script: Script) -> None:
    await client.embed("x", context_documents=["a corpus document"])
    assert list(script.requests["Embed"][-1].context_documents) == ["a corpus document"]


async def test_rerank_and_models(client: AsyncWaferClient) -> None:
    result = await client.rerank("cat mat", ["dogs", "cat on mat", "cat"])
    assert [h.index for h in result.results] == [1, 2, 0]
    names = [m.name for m in await client.list_models()]
    assert "fake-embed" in names
    assert (await client.load_model("fake-generate")).state == "ready"


async def test_generate_streams_in_order(client: AsyncWaferClient, script: Script) -> None:
    texts = [chunk.text async for chunk in client.generate(messages=[ChatMessage("user", "hi")])]
    assert texts[:-1] == REPLY and texts[-1] == ""
    completion = await client.complete("hi", temperature=0.5)
    assert completion.text == "".join(REPLY) and completion.finish_reason == "stop"
    assert script.requests["Generate"][1].temperature == 0.5


async def test_generate_validates_eagerly(client: AsyncWaferClient) -> None:
    with pytest.raises(ValueError):
        client.generate()


async def test_breaking_out_cancels_the_stream(client: AsyncWaferClient, script: Script) -> None:
    stream = client.generate("endless")
    async for chunk in stream:
        assert chunk.text == "."
        break
    await stream.aclose()
    assert await asyncio.to_thread(script.generate_stopped.wait, 2.0)
    assert script.generate_yielded < 1000


async def test_index_and_health(client: AsyncWaferClient) -> None:
    upserted = await client.upsert("async-notes", ["alpha beta", {"id": "g", "text": "gamma"}])
    assert upserted.ids[1] == "g"
    hits = (await client.search("async-notes", "gamma", top_k=1)).hits
    assert [h.id for h in hits] == ["g"]
    assert [d.id for d in await client.get_documents("async-notes", ["g"])] == ["g"]
    await client.delete_documents("async-notes", ["g"])
    assert "async-notes" in [c.name for c in await client.list_collections()]
    assert await client.health() == "SERVING"
    assert await client.health("wafer.v1.Index") == "NOT_SERVING"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
        (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError),
        (grpc.StatusCode.INTERNAL, errors.InternalError),
    ],
)
async def test_status_codes_map_to_classes(
    fake_server: FakeServer, script: Script, code: grpc.StatusCode, cls: type[errors.WaferError]
) -> None:
    script.fail("Rerank", code, "scripted", metadata=(("x-request-id", "req-a"),))
    async with AsyncWaferClient(fake_server.address, retries=0) as client:
        with pytest.raises(cls) as caught:
            await client.rerank("q", ["d"])
    assert caught.value.code is code
    assert caught.value.details == "scripted" and caught.value.request_id == "req-a"


async def test_resource_exhausted_is_retried_with_hint(client: AsyncWaferClient, script: Script) -> None:
    script.fail("Embed", grpc.StatusCode.RESOURCE_EXHAUSTED, times=2, metadata=(("retry-after-ms", "60"),))
    started = time.monotonic()
    await client.embed("x")
    assert time.monotonic() - started >= 0.12
    assert script.calls["Embed"] == 3


async def test_non_retryable_is_not_retried(client: AsyncWaferClient, script: Script) -> None:
    script.fail("Embed", grpc.StatusCode.PERMISSION_DENIED, times=3)
    with pytest.raises(errors.PermissionDeniedError):
        await client.embed("x")
    assert script.calls["Embed"] == 1


async def test_generate_retry_rules(client: AsyncWaferClient, script: Script) -> None:
    script.fail("Generate", grpc.StatusCode.UNAVAILABLE)
    assert (await client.complete("hi")).text == "".join(REPLY)
    assert script.calls["Generate"] == 2

    received = []
    with pytest.raises(errors.UnavailableError):
        async for chunk in client.generate("fail-midway"):
            received.append(chunk.text)
    assert received == REPLY[:2]
    assert script.calls["Generate"] == 3


async def test_deadline(client: AsyncWaferClient) -> None:
    with pytest.raises(errors.DeadlineExceededError):
        await client.embed(["slow"], timeout=0.2)


async def test_unix_socket(fake_server: FakeServer, script: Script) -> None:
    async with AsyncWaferClient(fake_server.unix_address, metadata=[("authorization", "k")]) as client:
        assert (await client.embed("over a socket")).vectors.shape == (1, 4)
    assert script.metadata["Embed"][0]["authorization"] == "k"


def test_constructed_outside_any_loop(fake_server: FakeServer, script: Script) -> None:
    client = AsyncWaferClient(fake_server.address)

    async def use() -> str:
        status = await client.health()
        await client.close()
        return status

    assert asyncio.run(use()) == "SERVING"


def test_refuses_a_second_event_loop(fake_server: FakeServer, script: Script) -> None:
    client = AsyncWaferClient(fake_server.address)

    async def use() -> str:
        return await client.health()

    assert asyncio.run(use()) == "SERVING"
    with pytest.raises(RuntimeError, match="event loop"):
        asyncio.run(use())

    async def close() -> None:
        await client.close()

    asyncio.run(close())
