"""Build the gRPC server: services, standard health checking, reflection, limits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # re-exported at run time
from grpc_reflection.v1alpha import reflection

from wafer.config import Settings
from wafer.engine import InferenceEngine
from wafer.errors import InvalidArgumentError
from wafer.indexing import IndexService
from wafer.registry import ModelRegistry
from wafer.rpc.drain import DrainInterceptor
from wafer.rpc.interceptor import RequestInterceptor
from wafer.rpc.servicers import IndexServicer, InferenceServicer, ModelsServicer
from wafer_proto.v1 import (
    index_pb2,
    index_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
MODELS = models_pb2.DESCRIPTOR.services_by_name["Models"].full_name
INDEX = index_pb2.DESCRIPTOR.services_by_name["Index"].full_name
OVERALL = ""

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    """Drives grpc.health.v1 from the registry: Inference (and the server as a whole, "") serve
    once every default model is ready; Models and Index serve as soon as the server listens."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.servicer = health_aio.HealthServicer()
        self._registry = registry
        self._draining = False
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for service in (MODELS, INDEX):
            await self.servicer.set(service, SERVING)
        await self._update()
        self._registry.subscribe(self._changed)

    async def drain(self) -> None:
        """Report NOT_SERVING everywhere, so load balancers stop routing before we stop."""
        self._draining = True
        for service in (OVERALL, INFERENCE, MODELS, INDEX):
            await self.servicer.set(service, NOT_SERVING)
        await self.servicer.enter_graceful_shutdown()

    def _changed(self) -> None:
        task = asyncio.get_running_loop().create_task(self._update())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _update(self) -> None:
        if self._draining:
            return
        status = SERVING if self._registry.defaults_ready() else NOT_SERVING
        await self.servicer.set(INFERENCE, status)
        await self.servicer.set(OVERALL, status)


@dataclass
class WaferServer:
    server: grpc.aio.Server
    port: int
    health: HealthReporter
    drain: DrainInterceptor


def create_server(
    settings: Settings,
    registry: ModelRegistry,
    engine: InferenceEngine,
    index: IndexService,
    address: str | None = None,
) -> WaferServer:
    """Build (not start) the server and bind it. `port` is the bound TCP port (useful with port 0),
    or 0 for a unix socket."""
    drain = DrainInterceptor()
    server = grpc.aio.server(
        # The request interceptor is outermost: a call the drain refuses is still logged and mapped.
        interceptors=[RequestInterceptor(), drain],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(engine, settings), server)
    models_pb2_grpc.add_ModelsServicer_to_server(ModelsServicer(registry), server)
    index_pb2_grpc.add_IndexServicer_to_server(IndexServicer(index), server)
    health = HealthReporter(registry)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (
            INFERENCE,
            MODELS,
            INDEX,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = address or settings.address
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"cannot listen on {address!r}: {exc}") from exc
    return WaferServer(server=server, port=0 if address.startswith("unix:") else port, health=health, drain=drain)
