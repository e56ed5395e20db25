"""The Models service on the wire (real gRPC server in-process, fake backend, fake Hub): the status codes
and fields of swap, budget, keep-alive, pinning, pulls and quantization."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from tests.fakes.fake_backend import FakeBackend
from tests.fakes.fake_hub import FakeHub, running_fake_hub
from tests.unit.conftest import fake_catalog
from wafer.app import engine_limits
from wafer.config import Settings
from wafer.engine import InferenceEngine
from wafer.indexing import IndexService
from wafer.registry import ModelRegistry
from wafer.rpc.server import create_server
from wafer.sources import SourceResolver
from wafer.specs import Catalog
from wafer.store.qdrant import QdrantStore
from wafer_proto.v1 import models_pb2, models_pb2_grpc

MIB = 2**20
HUB_WEIGHTS = os.urandom(3 * MIB)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with running_fake_hub() as hub:
        hub.add_file("org/fake", "weights.bin", HUB_WEIGHTS)
        yield hub


def catalog_with_hub_model(folder: Path) -> Catalog:
    base = fake_catalog(folder)
    with (folder / "big.bin").open("wb") as file:
        for _ in range(24):
            file.write(os.urandom(MIB))
    models = {name: spec.model_dump(exclude_unset=True) for name, spec in base.models.items()}
    models["hubbed"] = {"backend": "fake", "source": "hf://org/fake/weights.bin", "tasks": ["embed"], "dimensions": 4}
    models["big"] = {"backend": "fake", "source": "big.bin", "tasks": ["embed"], "dimensions": 4}
    return Catalog.model_validate({"base_dir": folder, "defaults": base.defaults, "models": models})


@pytest.fixture
async def stub(tmp_path: Path, hub: FakeHub, open_gate: None) -> AsyncIterator[models_pb2_grpc.ModelsAsyncStub]:
    catalog = catalog_with_hub_model(tmp_path)
    settings = Settings(data_dir=tmp_path / "data")
    registry = ModelRegistry(
        catalog,
        SourceResolver(catalog.base_dir, settings.hub_cache_dir, hub_endpoint=hub.url),
        {"fake": FakeBackend},
        threads=1,
        drain_timeout_seconds=5,
        # Room for the small fake models, not for `big` (24 MiB) next to a pinned one.
        memory_budget_bytes=16 * MIB,
    )
    engine = InferenceEngine(registry, engine_limits(settings))
    index = IndexService(engine, QdrantStore(path=tmp_path / "qdrant", check_compatibility=False))
    wafer = create_server(settings, registry, engine, index, address="127.0.0.1:0")
    await wafer.server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{wafer.port}") as channel:
        yield models_pb2_grpc.ModelsStub(channel)
    await wafer.server.stop(0)
    await registry.close()
    await index.close()


async def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value.code(), raised.value.details() or ""


async def test_model_info_shows_lifecycle_fields(stub: models_pb2_grpc.ModelsAsyncStub) -> None:
    info = await stub.GetModel(models_pb2.GetModelRequest(name="lazy"))
    assert info.not_loaded_reason == "never loaded" and not info.pinned and info.keep_alive_seconds == 0
    info = await stub.LoadModel(models_pb2.LoadModelRequest(name="lazy", pinned=True, keep_alive_seconds=30))
    assert info.state == models_pb2.MODEL_STATE_READY
    assert info.pinned and info.keep_alive_seconds == 30 and info.not_loaded_reason == ""
    info = await stub.UnloadModel(models_pb2.UnloadModelRequest(name="lazy"))
    assert info.not_loaded_reason.startswith("unloaded by admin at ")


async def test_swap_over_the_wire_and_its_refusals(stub: models_pb2_grpc.ModelsAsyncStub, tmp_path: Path) -> None:
    (tmp_path / "other.bin").write_bytes(b"other")
    await stub.LoadModel(models_pb2.LoadModelRequest(name="lazy"))
    info = await stub.LoadModel(models_pb2.LoadModelRequest(name="lazy", spec="source: other.bin"))
    assert info.source == "other.bin" and info.state == models_pb2.MODEL_STATE_READY
    code, details = await code_of(stub.LoadModel(models_pb2.LoadModelRequest(name="lazy", spec="source: broken.bin")))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "previous spec keeps serving" in details
    code, details = await code_of(stub.LoadModel(models_pb2.LoadModelRequest(name="lazy", spec="source: /etc/hosts")))
    assert code is grpc.StatusCode.PERMISSION_DENIED and "outside the folders" in details
    code, _ = await code_of(stub.LoadModel(models_pb2.LoadModelRequest(name="lazy", keep_alive_seconds=-1)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    # Options and file roles are the backend's to judge; the fake backend has none of either.
    code, details = await code_of(stub.LoadModel(models_pb2.LoadModelRequest(name="lazy", spec="options: {x: 1}")))
    assert (
        code is grpc.StatusCode.INVALID_ARGUMENT
        and "model 'lazy': invalid options for backend 'fake': options.x" in details
    )
    code, details = await code_of(
        stub.LoadModel(models_pb2.LoadModelRequest(name="lazy", spec="files: {projection_head: other.bin}"))
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "no use for `files` role(s) projection_head" in details
    code, _ = await code_of(stub.LoadModel(models_pb2.LoadModelRequest(name="nope")))
    assert code is grpc.StatusCode.NOT_FOUND
    assert (await stub.GetModel(models_pb2.GetModelRequest(name="lazy"))).source == "other.bin"


async def test_a_load_over_the_budget_is_resource_exhausted(stub: models_pb2_grpc.ModelsAsyncStub) -> None:
    code, details = await code_of(stub.LoadModel(models_pb2.LoadModelRequest(name="big")))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'big' needs about 24 MB but the memory budget is 16 MB" in details


async def test_pull_streams_progress_then_the_model_loads_from_the_cache(
    stub: models_pb2_grpc.ModelsAsyncStub, hub: FakeHub
) -> None:
    reports = [r async for r in stub.PullModel(models_pb2.PullModelRequest(name="hubbed"))]
    assert reports[-1].done
    (finished,) = [r for r in reports if r.file_done]
    assert finished.source == "hf://org/fake/weights.bin"
    assert finished.downloaded_bytes == finished.total_bytes == len(HUB_WEIGHTS)
    assert read(Path(finished.path)) == HUB_WEIGHTS
    hub.stop()  # the load reads the cache, not the Hub
    info = await stub.LoadModel(models_pb2.LoadModelRequest(name="hubbed"))
    assert info.state == models_pb2.MODEL_STATE_READY


async def test_pull_errors(stub: models_pb2_grpc.ModelsAsyncStub, hub: FakeHub) -> None:
    code, details = await code_of(_drain(stub.PullModel(models_pb2.PullModelRequest(name="lazy"))))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "nothing to pull" in details
    hub.stop()
    code, details = await code_of(_drain(stub.PullModel(models_pb2.PullModelRequest(name="hubbed"))))
    assert code is grpc.StatusCode.UNAVAILABLE and "wafer models pull hubbed" in details


async def test_quantize_refuses_what_it_cannot_do(stub: models_pb2_grpc.ModelsAsyncStub) -> None:
    code, details = await code_of(stub.QuantizeModel(models_pb2.QuantizeModelRequest(source_model="lazy", name="q")))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "only ONNX models" in details
    code, _ = await code_of(stub.QuantizeModel(models_pb2.QuantizeModelRequest(source_model="nope", name="q")))
    assert code is grpc.StatusCode.NOT_FOUND


def read(path: Path) -> bytes:
    return path.read_bytes()


async def _drain(call: AsyncIterable[models_pb2.PullProgress]) -> None:
    async for _ in call:
        pass
