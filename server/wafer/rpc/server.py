"""Build the gRPC server: services, standard health checking, reflection, limits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # re-exported at run time
from grpc_reflection.v1alpha import reflection

from wafer.config import Settings
from wafer.engine import InferenceEngine
from wafer.indexing import IndexService
from wafer.jobs import JobManager
from wafer.metrics import Metrics
from wafer.registry import ModelRegistry
from wafer.rpc.auth import AuthInterceptor, check_exposure, is_local_address, load_token
from wafer.rpc.drain import DrainInterceptor
from wafer.rpc.interceptor import RequestInterceptor
from wafer.rpc.servicers import IndexServicer, InferenceServicer, JobsServicer, ModelsServicer
from wafer.rpc.transport import bind, server_credentials, socket_warnings
from wafer_proto.v1 import (
    index_pb2,
    index_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
MODELS = models_pb2.DESCRIPTOR.services_by_name["Models"].full_name
INDEX = index_pb2.DESCRIPTOR.services_by_name["Index"].full_name
JOBS = jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name
OVERALL = ""

log = structlog.get_logger("wafer")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    """Drives grpc.health.v1 from the registry: Inference (and the server as a whole, "") serve
    once every default model is ready; Models, Index and Jobs serve as soon as the server listens."""

    def __init__(self, registry: ModelRegistry, *, jobs: bool = False) -> None:
        self.servicer = health_aio.HealthServicer()
        self._registry = registry
        self._always = (MODELS, INDEX, JOBS) if jobs else (MODELS, INDEX)
        self._draining = False
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for service in self._always:
            await self.servicer.set(service, SERVING)
        await self._update()
        self._registry.subscribe(self._changed)

    async def drain(self) -> None:
        """Report NOT_SERVING everywhere, so load balancers stop routing before we stop."""
        self._draining = True
        for service in (OVERALL, INFERENCE, *self._always):
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
    *,
    metrics: Metrics | None = None,
    jobs: JobManager | None = None,
) -> WaferServer:
    """Build (not start) the server and bind it. `port` is the bound TCP port (useful with port 0),
    or 0 for a unix socket. Refuses (FailedPreconditionError) unreadable TLS or token files, and
    open admin RPCs on an address other machines can reach."""
    address = address or settings.address
    # Everything that can refuse the configuration runs before the server exists.
    token = load_token(settings)
    credentials = server_credentials(settings)
    mutual_tls = settings.tls_client_ca_file is not None
    check_exposure(
        address,
        token_configured=token is not None,
        client_certificates=mutual_tls,
        allow_remote_admin=settings.allow_remote_admin,
    )
    if token is not None and credentials is None and not is_local_address(address):
        log.warning(
            "the bearer token crosses the network in plain text; enable TLS unless a TLS proxy is in front",
            address=address,
        )
    for warning in socket_warnings(address):
        log.warning(warning, address=address)
    # No token, no auth interceptor: open servers pay nothing per call.
    auth = [AuthInterceptor(token, all_rpcs=settings.auth_all_rpcs)] if token is not None else []
    drain = DrainInterceptor()
    server = grpc.aio.server(
        # The request interceptor is outermost: a call that auth or the drain refuses is still logged
        # and mapped. Auth comes before the drain so refused calls never count as in flight.
        interceptors=[RequestInterceptor(metrics, settings.default_deadline_seconds), *auth, drain],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceServicer(engine, default_max_new_tokens=settings.default_max_new_tokens), server
    )
    models_pb2_grpc.add_ModelsServicer_to_server(
        ModelsServicer(registry, drain_timeout_seconds=settings.unload_drain_timeout_seconds), server
    )
    index_pb2_grpc.add_IndexServicer_to_server(IndexServicer(index), server)
    if jobs is not None:
        jobs_pb2_grpc.add_JobsServicer_to_server(JobsServicer(jobs), server)
    health = HealthReporter(registry, jobs=jobs is not None)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (
            INFERENCE,
            MODELS,
            INDEX,
            *((JOBS,) if jobs is not None else ()),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = bind(server, address, credentials)
    log.info(
        "access",
        tls=credentials is not None,
        client_certificates=mutual_tls,
        token_required="off" if token is None else ("all rpcs" if settings.auth_all_rpcs else "admin rpcs"),
    )
    return WaferServer(server=server, port=port, health=health, drain=drain)
