"""The HTTP door in-process over the fake backend: what only shows with a server running (deadlines,
a client hanging up mid-stream, the drain, auth on every call, binding and exposure)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from starlette.requests import Request

from tests.fakes.fake_backend import FakeBackend
from tests.unit.conftest import startup_settled
from wafer.app import door_options, engine_limits
from wafer.config import Settings
from wafer.engine import InferenceEngine
from wafer.errors import FailedPreconditionError
from wafer.http.app import Door, Exchange
from wafer.http.server import HttpServer
from wafer.registry import ModelRegistry
from wafer.rpc.drain import DrainInterceptor

TOKEN = "unit-token"

Serve = Callable[..., Awaitable[tuple[httpx.AsyncClient, Door]]]


@pytest.fixture
async def serve(tmp_path: Path, registry: ModelRegistry) -> AsyncIterator[Serve]:
    """Start HTTP doors on 127.0.0.1:0 with the given settings; all stopped at the end."""
    running: list[tuple[HttpServer, httpx.AsyncClient]] = []
    await registry.start()
    await startup_settled(registry)  # the default models, which /health waits for

    async def start(token: str | None = None, **overrides: Any) -> tuple[httpx.AsyncClient, Door]:
        settings = Settings(data_dir=tmp_path / "data", **overrides)
        door = Door(
            engine=InferenceEngine(registry, engine_limits(settings)),
            registry=registry,
            options=door_options(settings),
            drain=DrainInterceptor(),
            token=token,
        )
        server = HttpServer(settings, door, address="127.0.0.1:0")
        await server.start()
        client = httpx.AsyncClient(base_url=f"http://{server.address}", timeout=30)
        running.append((server, client))
        return client, door

    yield start
    FakeBackend.gate.set()
    for server, client in running:
        await client.aclose()
        await server.stop()


async def test_a_request_past_the_default_deadline_is_a_gateway_timeout(serve: Serve) -> None:
    client, _ = await serve(default_deadline_seconds=0.3)
    assert (await client.post("/v1/embeddings", json={"input": "warm up"})).status_code == 200
    FakeBackend.gate.clear()  # the backend now hangs until the gate opens
    response = await client.post("/v1/embeddings", json={"input": "never answered"})
    FakeBackend.gate.set()
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert "deadline of 0.3 s" in response.json()["error"]["message"]


@contextlib.asynccontextmanager
async def trickle() -> AsyncIterator[None]:
    """Let the fake backend generate a token now and then (it waits on the gate before each) until
    the block ends; the gate stays closed after it."""
    running = True

    async def pulse() -> None:
        while running:
            # Set and cleared at once: a thread waiting on the gate wakes (threading.Event's wait
            # returns once notified), so at most one token passes per pulse.
            FakeBackend.gate.set()
            FakeBackend.gate.clear()
            await asyncio.sleep(0.02)

    FakeBackend.gate.clear()
    task = asyncio.get_running_loop().create_task(pulse())
    try:
        yield
    finally:
        running = False
        await task


LONG_PROMPT = " ".join(f"w{i}" for i in range(2000))


async def test_a_client_hanging_up_ends_the_generation_and_its_admission(serve: Serve) -> None:
    client, door = await serve()
    body = {"prompt": LONG_PROMPT, "max_tokens": 2000, "stream": True}
    with structlog.testing.capture_logs() as logs:
        async with trickle():
            response = await client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
            assert response.status_code == 200
            # Held in a name: a dropped line iterator is finalized by the loop at some later point,
            # and its finalization closes the response, a hang-up before the one this test makes.
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
        assert door.drain.in_flight == 1  # held between two tokens
        await response.aclose()
        del lines
        # Hung up: the task driving the generation is cancelled; it lets go of its admission once
        # the model's thread has let go of the stream (at its next token: open the gate for it).
        FakeBackend.gate.set()
        for _ in range(500):
            if door.drain.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert door.drain.in_flight == 0
    lines_logged = [r for r in logs if r.get("event") == "http"]
    assert [(r["status"], r["http_status"]) for r in lines_logged] == [("CANCELLED", 499)]
    # The model is free again for the next caller.
    answer = await client.post("/v1/completions", json={"prompt": "one two", "max_tokens": 5})
    assert answer.json()["choices"][0]["text"] == "one two "


async def test_a_client_hanging_up_before_the_answer_withdraws_its_queued_work(serve: Serve) -> None:
    """Like a cancelled gRPC call: the request's work leaves the model's queue and never runs."""
    client, door = await serve()
    assert (await client.post("/v1/embeddings", json={"input": "warm up"})).status_code == 200
    FakeBackend.gate.clear()
    FakeBackend.embedded.clear()
    with structlog.testing.capture_logs() as logs:
        holder = asyncio.get_running_loop().create_task(
            client.post("/v1/embeddings", json={"input": "holds the model"})
        )

        def held() -> bool:  # admitted, and out of the queue: the model's thread waits on the gate with it
            return door.drain.in_flight == 1 and door.registry.status("embedder").waiting_interactive == 0

        for _ in range(500):
            if held():
                break
            await asyncio.sleep(0.01)
        # Admission comes before the queue: give the request time to reach the thread, so the next
        # one is not merged into its batch.
        await asyncio.sleep(0.3)
        assert held()
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/embeddings", json={"input": "queued then abandoned"}, timeout=0.3)
        for _ in range(200):
            if any(r.get("event") == "http" for r in logs):
                break
            await asyncio.sleep(0.01)
        abandoned = [r for r in logs if r.get("event") == "http"]
        # Logged while the gate is still closed: the call ended without waiting for the model.
        assert [(r["status"], r["http_status"]) for r in abandoned] == [("CANCELLED", 499)], logs
        assert door.drain.in_flight == 1
        FakeBackend.gate.set()
        assert (await holder).status_code == 200
    assert FakeBackend.embedded == ["holds the model"]


async def test_an_error_after_the_first_token_arrives_as_an_sse_error_event(serve: Serve) -> None:
    client, _ = await serve(default_deadline_seconds=1.0)
    body = {"prompt": LONG_PROMPT, "max_tokens": 2000, "stream": True}
    async with trickle():
        response = await client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
        lines = response.aiter_lines()
        assert '"text":"w0 "' in await anext(lines)
    # The gate stays closed past the deadline, so the next token does not come in time. It opens
    # later: the stream's cleanup waits for the model's thread to let go (after one more token).
    asyncio.get_running_loop().call_later(1.5, FakeBackend.gate.set)
    events = [line async for line in lines if line]
    await response.aclose()
    assert response.status_code == 200
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == "deadline_exceeded"
    assert "data: [DONE]" not in events


async def test_draining_refuses_new_requests_and_health_reports_it(serve: Serve) -> None:
    client, door = await serve()
    assert (await client.get("/health")).status_code == 200
    assert await door.drain.drain(1.0)
    refused = await client.post("/v1/embeddings", json={"input": "late"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "unavailable"
    health = await client.get("/health")
    assert (health.status_code, health.json()) == (503, {"status": "not_serving"})


async def test_auth_all_rpcs_guards_inference_too_but_not_health(serve: Serve) -> None:
    client, _ = await serve(token=TOKEN, auth_all_rpcs=True, auth_token=TOKEN)
    body = {"input": "x"}
    assert (await client.post("/v1/embeddings", json=body)).status_code == 401
    wrong = await client.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()["error"]["type"]) == (403, "permission_error")
    right = await client.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    assert (await client.get("/health")).status_code == 200
    # A refusal comes before the body is read: nothing about the request leaks to the unauthenticated.
    bad = await client.post("/v1/embeddings", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 401


async def test_without_auth_all_rpcs_only_models_need_the_token(serve: Serve) -> None:
    client, _ = await serve(token=TOKEN)
    assert (await client.post("/v1/embeddings", json={"input": "x"})).status_code == 200
    assert (await client.get("/v1/models")).status_code == 401
    listed = await client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
    assert {m["id"] for m in listed.json()["data"]} >= {"embedder", "writer"}


async def test_a_body_without_content_length_is_still_limited(serve: Serve) -> None:
    client, _ = await serve(max_message_bytes=1000)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"input": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    response = await client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert (await client.post("/v1/embeddings", json={"input": "small"})).status_code == 200


def test_an_unexpected_error_is_a_500_with_the_request_id(registry: ModelRegistry, tmp_path: Path) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def exchange() -> tuple[Exchange, dict[str, Any]]:
        settings = Settings(data_dir=tmp_path / "data")
        door = Door(
            engine=InferenceEngine(registry, engine_limits(settings)),
            registry=registry,
            options=door_options(settings),
            drain=DrainInterceptor(),
        )
        request = Request(
            {"type": "http", "method": "POST", "path": "/", "headers": [(b"x-request-id", b"rid-1")]}, receive
        )
        call = Exchange("POST /v1/embeddings", request, door)
        try:
            raise RuntimeError("secret internals")
        except RuntimeError as error:
            return call, call.failed(error)

    call, body = asyncio.run(exchange())
    assert call.http_status == 500
    assert body["error"]["message"] == "internal error; request id rid-1"
    assert body["error"]["type"] == "server_error"
    assert "secret" not in json.dumps(body)


async def test_open_inference_on_a_reachable_address_is_refused(tmp_path: Path, registry: ModelRegistry) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    door = Door(
        engine=InferenceEngine(registry, engine_limits(settings)),
        registry=registry,
        options=door_options(settings),
        drain=DrainInterceptor(),
    )
    with pytest.raises(FailedPreconditionError, match="other machines can reach it"):
        HttpServer(settings, door, address="0.0.0.0:0")
    allowed = Settings(data_dir=tmp_path / "data", allow_remote_admin=True)
    server = HttpServer(
        allowed,
        Door(engine=door.engine, registry=registry, options=door_options(allowed), drain=door.drain),
        "0.0.0.0:0",
    )
    await server.stop()


async def test_a_taken_port_fails_the_start(tmp_path: Path, registry: ModelRegistry) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    door = Door(
        engine=InferenceEngine(registry, engine_limits(settings)),
        registry=registry,
        options=door_options(settings),
        drain=DrainInterceptor(),
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FailedPreconditionError, match="cannot listen for HTTP"):
            HttpServer(settings, door, address=f"127.0.0.1:{port}")
