"""Wire the server together and run it until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from pydantic import ValidationError

from wafer.backends import available_backends
from wafer.cache import EmbeddingCache
from wafer.config import Settings
from wafer.contexts import ContextStore
from wafer.engine import EngineLimits, InferenceEngine
from wafer.errors import InvalidArgumentError, WaferError
from wafer.http.app import Door, DoorOptions
from wafer.http.server import HttpServer
from wafer.indexing import IndexService
from wafer.jobs import JobManager, JobOptions, JobState, PolicyChecker, PowerProbe
from wafer.logging import configure_logging
from wafer.metrics import Metrics, MetricsServer
from wafer.registry import ModelRegistry, limit_heap_arenas
from wafer.rpc.auth import load_token
from wafer.rpc.server import create_server
from wafer.sources import SourceResolver
from wafer.specs import Catalog
from wafer.store import open_store

log = structlog.get_logger("wafer")


def listening_address(settings: Settings, port: int) -> str:
    if settings.address.startswith("unix:"):
        return settings.address
    host = settings.address.rsplit(":", 1)[0]
    return f"{host}:{port}"


def engine_limits(settings: Settings) -> EngineLimits:
    """The settings the engine checks requests against."""
    return EngineLimits(
        max_inputs_per_request=settings.max_inputs_per_request,
        max_input_bytes=settings.max_input_bytes,
        max_new_tokens_limit=settings.max_new_tokens_limit,
    )


def job_options(settings: Settings) -> JobOptions:
    """The settings the job manager uses."""
    return JobOptions(
        jobs_dir=settings.jobs_dir,
        allowed_roots=(settings.data_dir, *settings.jobs_allowed_roots),
        max_running=settings.jobs_max_running,
        default_batch_size=settings.jobs_batch_size,
        max_inputs_per_request=settings.max_inputs_per_request,
        policy_poll_seconds=settings.jobs_policy_poll_seconds,
        sqlite_query_seconds=settings.jobs_sqlite_query_seconds,
        sqlite_max_rows=settings.jobs_sqlite_max_rows,
        max_line_bytes=settings.jobs_max_line_bytes,
    )


def door_options(settings: Settings) -> DoorOptions:
    """The settings the HTTP door shares with the gRPC one."""
    return DoorOptions(
        default_deadline_seconds=settings.default_deadline_seconds,
        auth_all_rpcs=settings.auth_all_rpcs,
        max_message_bytes=settings.max_message_bytes,
        default_max_new_tokens=settings.default_max_new_tokens,
    )


def serve_metrics(metrics: Metrics, address: str) -> MetricsServer:
    """Serve /metrics on `address`; a bad or busy address is the operator's mistake (INVALID_ARGUMENT)."""
    try:
        return metrics.serve(address)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from exc


async def serve(settings: Settings) -> None:
    catalog = Catalog.from_yaml(settings.models_file)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(models=catalog.models)
    registry = ModelRegistry(
        catalog,
        SourceResolver(catalog.base_dir, settings.hub_cache_dir),
        available_backends(),
        threads=settings.threads,
        drain_timeout_seconds=settings.unload_drain_timeout_seconds,
        batch_observer=metrics,
        memory_budget_bytes=settings.memory_budget_mb * 2**20 if settings.memory_budget_mb else None,
        memory_wait_seconds=settings.memory_wait_seconds,
        keep_alive_check_seconds=settings.keep_alive_check_seconds,
    )
    metrics.watch(registry)
    cache = (
        EmbeddingCache(settings.embedding_cache_file, max_entries=settings.embedding_cache_max_entries, metrics=metrics)
        if settings.embedding_cache
        else None
    )
    contexts = ContextStore(settings.data_dir / "contexts")
    engine = InferenceEngine(registry, engine_limits(settings), metrics, cache, contexts)
    index = IndexService(engine, open_store(settings), contexts, max_payload_bytes=settings.max_payload_bytes)
    jobs = JobManager(
        job_options(settings),
        index,
        PolicyChecker(
            idle_for=engine.seconds_since_interactive,
            power=PowerProbe(settings.power_supply_root),
            default_idle_seconds=settings.jobs_default_idle_seconds,
        ),
        known_model=registry.status,
        metrics=metrics,
    )
    metrics.watch_jobs(jobs, states=JobState)
    wafer = create_server(settings, registry, engine, index, metrics=metrics, jobs=jobs)
    # The HTTP door shares the gRPC server's drain: one shutdown waits for the calls of both.
    http = (
        HttpServer(
            settings,
            Door(
                engine=engine,
                registry=registry,
                options=door_options(settings),
                drain=wafer.drain,
                metrics=metrics,
                token=load_token(settings),
            ),
        )
        if settings.http_address
        else None
    )
    # Started before the gRPC server so it can be scraped from the first call on; its thread is a
    # daemon, so a failed start below does not keep the process alive.
    exporter = serve_metrics(metrics, settings.metrics_address) if settings.metrics_address else None
    if exporter is not None:
        log.info("metrics listening", address=exporter.address, path="/metrics")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await wafer.server.start()
    await wafer.health.start()
    if http is not None:
        await http.start()
    log.info(
        "server listening",
        address=listening_address(settings, wafer.port),
        models_file=str(settings.models_file),
        data_dir=str(settings.data_dir),
    )
    await registry.start()
    # After the default models: a resumed job would otherwise wait for them at its first batch.
    await jobs.start()
    await stop.wait()

    log.info("shutting down", grace_seconds=settings.shutdown_grace_seconds)
    await wafer.health.drain()
    # Job watches last as long as their job: end them, or they would hold the drain to its limit.
    jobs.stop_watches()
    if not await wafer.drain.drain(settings.shutdown_grace_seconds):
        log.warning("grace period over; cancelling calls still running", calls=wafer.drain.in_flight)
    steps: list[tuple[str, Callable[[], Awaitable[None] | None]]] = [("grpc", lambda: wafer.server.stop(0))]
    if http is not None:
        steps.append(("http", http.stop))
    # Before the registry and the store go: a job stops between its checkpoints and resumes next time.
    steps += [("jobs", jobs.close), ("registry", registry.close), ("store", index.close)]
    if cache is not None:
        steps.append(("cache", cache.close))
    if exporter is not None:
        steps.append(("metrics", exporter.stop))
    await close_in_order(steps)
    log.info("stopped")


async def close_in_order(steps: Sequence[tuple[str, Callable[[], Awaitable[None] | None]]]) -> None:
    """Run every named closing step in order, even after one fails: a job that cannot close must
    not leave the models loaded, the store's files or the cache's database open. Each failure is
    logged; the first is raised once every step has run."""
    failure: Exception | None = None
    for name, step in steps:
        try:
            result = step()
            if result is not None:
                await result
        except Exception as exc:
            log.exception("closing failed", part=name)
            failure = failure or exc
    if failure is not None:
        raise failure


def main(overrides: dict[str, Any] | None = None) -> None:
    """Entry point of `wafer serve`: settings from flags (`overrides`), environment and defaults.
    A configuration mistake ends the process with status 2 and one readable message."""
    try:
        settings = Settings(**(overrides or {}))
    except ValidationError as exc:
        print(f"wafer: invalid settings:\n{exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings.log_level, settings.log_format)
    if settings.malloc_arena_max:
        limit_heap_arenas(settings.malloc_arena_max)
    try:
        asyncio.run(serve(settings))
    except WaferError as exc:
        log.error("cannot start", error=exc.message)
        sys.exit(2)
