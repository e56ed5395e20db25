"""The real gRPC server in-process, over the fake backend: defaults that only show on the wire."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.fakes.fake_backend import FakeBackend
from wafer.app import engine_limits
from wafer.config import Settings
from wafer.engine import InferenceEngine
from wafer.indexing import IndexService
from wafer.registry import ModelRegistry
from wafer.rpc.server import create_server
from wafer.store.qdrant import QdrantStore
from wafer_proto.v1 import inference_pb2, inference_pb2_grpc


@pytest.fixture
async def channel(tmp_path: Path, registry: ModelRegistry) -> AsyncIterator[grpc.aio.Channel]:
    settings = Settings(data_dir=tmp_path / "data", default_deadline_seconds=0.3)
    engine = InferenceEngine(registry, engine_limits(settings))
    index = IndexService(engine, QdrantStore(path=tmp_path / "qdrant", check_compatibility=False))
    wafer = create_server(settings, registry, engine, index, address="127.0.0.1:0")
    await wafer.server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{wafer.port}") as channel:
        yield channel
    FakeBackend.gate.set()
    await wafer.server.stop(0)
    await index.close()


async def test_a_call_without_a_deadline_gets_the_server_default(channel: grpc.aio.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    await stub.Embed(inference_pb2.EmbedRequest(inputs=["warm up"]))  # loads the model
    FakeBackend.gate.clear()  # the backend now hangs until the gate opens
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Embed(inference_pb2.EmbedRequest(inputs=["never answered"]))
    FakeBackend.gate.set()
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "default deadline of 0.3 s" in (raised.value.details() or "")


async def test_a_client_deadline_wins_over_the_default(channel: grpc.aio.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    await stub.Embed(inference_pb2.EmbedRequest(inputs=["warm up"]))
    FakeBackend.gate.clear()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Embed(inference_pb2.EmbedRequest(inputs=["never answered"]), timeout=0.1)
    FakeBackend.gate.set()
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "default deadline" not in (raised.value.details() or "")


@pytest.mark.parametrize("drain", [float("nan"), float("inf"), -1.0, 1e9])
async def test_unload_refuses_absurd_drain_timeouts(channel: grpc.aio.Channel, drain: float) -> None:
    from wafer_proto.v1 import models_pb2, models_pb2_grpc

    stub = models_pb2_grpc.ModelsStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.UnloadModel(models_pb2.UnloadModelRequest(name="embedder", drain_timeout_seconds=drain))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "drain_timeout_seconds must be between 0 and 3600" in (raised.value.details() or "")


def test_unsafe_unix_sockets_are_warned_about(tmp_path: Path) -> None:
    """Issue 13 #7: a socket in a world-writable folder can be swapped; an abstract one has no permissions."""
    from wafer.rpc.transport import socket_warnings

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert "writable by every user" in socket_warnings(f"unix://{shared}/w.sock")[0]
    assert socket_warnings(f"unix://{private}/w.sock") == []
    assert "every user on this machine" in socket_warnings("unix-abstract:wafer")[0]
    assert socket_warnings("127.0.0.1:50051") == []
