"""Fixtures: the fake server (see fake_server.py), started once per session."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

CLIENT_SRC = Path(__file__).resolve().parents[3] / "clients" / "python"


def _prefer_source_tree() -> None:
    # An editable install made before wafer_client/__init__.py existed maps the package as a namespace
    # package, which hides the package's own exports; the source directory on sys.path wins over that.
    if str(CLIENT_SRC) not in sys.path:
        sys.path.insert(0, str(CLIENT_SRC))
    module = sys.modules.get("wafer_client")
    if module is not None and getattr(module, "__file__", None) is None:
        for name in [n for n in sys.modules if n == "wafer_client" or n.startswith("wafer_client.")]:
            del sys.modules[name]


_prefer_source_tree()

from tests.unit.client.fake_server import (  # noqa: E402
    FakeIndex,
    FakeInference,
    FakeModels,
    FakeServer,
    Script,
)
from wafer_proto.v1 import index_pb2_grpc, inference_pb2_grpc, models_pb2_grpc  # noqa: E402


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeServer]:
    script = Script()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    inference_pb2_grpc.add_InferenceServicer_to_server(FakeInference(script), server)
    models_pb2_grpc.add_ModelsServicer_to_server(FakeModels(script), server)
    index = FakeIndex(script)
    index_pb2_grpc.add_IndexServicer_to_server(index, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("wafer.v1.Inference", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("wafer.v1.Index", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    # Short and under /tmp: socket paths are limited to ~107 bytes, and pytest's tmp_path can exceed it.
    socket_dir = Path(tempfile.mkdtemp(prefix="wafer-", dir="/tmp"))
    socket_path = socket_dir / "fake.sock"
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    try:
        yield FakeServer(f"127.0.0.1:{port}", f"unix://{socket_path}", script, index)
    finally:
        server.stop(grace=None)
        socket_path.unlink(missing_ok=True)
        socket_dir.rmdir()


@pytest.fixture
def script(fake_server: FakeServer) -> Iterator[Script]:
    fake_server.script.reset()
    fake_server.index.collections.clear()
    yield fake_server.script
    fake_server.script.reset()
