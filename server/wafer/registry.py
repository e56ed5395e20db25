"""The model registry: every model of the catalog, its state, and who is using it.

States: UNLOADED → LOADING → READY → UNLOADING → UNLOADED, and FAILED when a load fails.
- A request *leases* a model for its duration. Leasing an unloaded model loads it (on demand);
  leasing a loading model waits for it.
- Unloading refuses new leases (UNAVAILABLE), waits for the held ones to end, then frees the model.
  Freeing a llama.cpp model under a running call would crash the process; this never does.
- Loads run one at a time, so the memory a load adds is estimated as the change in RSS. Only an
  estimate: other models keep computing meanwhile, and ONNX arenas grow after the first batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import psutil
import structlog

from wafer.backends.base import Backend, LoadOptions, ModelFiles
from wafer.domain import Priority
from wafer.errors import (
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
    WaferError,
)
from wafer.scheduler import BatchObserver, ComputeGate, ModelScheduler
from wafer.sources import SourceResolver
from wafer.specs import Catalog, LoadPolicy, ModelSpec, Task

log = structlog.get_logger(__name__)


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """What a lease hands out: the spec, the backend, and the scheduler every call to it goes through."""

    spec: ModelSpec
    backend: Backend
    scheduler: ModelScheduler


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """A snapshot of one model, for listing."""

    spec: ModelSpec
    state: ModelState
    default_for: tuple[Task, ...]
    memory_bytes: int
    load_seconds: float
    last_used: datetime | None
    active_requests: int
    error: str
    # Requests queued for the model, per lane, not yet handed to the backend.
    waiting_interactive: int = 0
    waiting_batch: int = 0


class _Entry:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.state = ModelState.UNLOADED
        self.loaded: LoadedModel | None = None
        self.error = spec.requires
        self.active = 0
        self.memory_bytes = 0
        self.load_seconds = 0.0
        self.last_used: datetime | None = None
        self.loading: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()
        self.idle.set()


Listener = Callable[[], None]


class ModelRegistry:
    def __init__(
        self,
        catalog: Catalog,
        resolver: SourceResolver,
        backends: Mapping[str, type[Backend]],
        *,
        threads: int,
        drain_timeout_seconds: float,
        gate: ComputeGate | None = None,
        batch_observer: BatchObserver | None = None,
    ) -> None:
        self._catalog = catalog
        self._resolver = resolver
        self._backends = backends
        self._threads = threads
        self._drain_timeout = drain_timeout_seconds
        self._entries = {name: _Entry(spec) for name, spec in catalog.models.items()}
        self._load_lock = asyncio.Lock()
        self._gate = gate or ComputeGate()
        self._batch_observer = batch_observer
        self._listeners: list[Listener] = []

    # -- queries -------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` after every state change (health reporting hangs off this)."""
        self._listeners.append(listener)

    def resolve(self, name: str, task: Task) -> ModelSpec:
        """The spec that answers `task` for a request naming `name` (empty: the default)."""
        if not name:
            default = self._catalog.default_for(task)
            if default is None:
                raise FailedPreconditionError(f"no model in the catalog can {task.value}")
            name = default
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries))
            raise NotFoundError(f"unknown model {name!r}; known models: {known}")
        if task not in entry.spec.tasks:
            able = ", ".join(n for n, e in self._entries.items() if task in e.spec.tasks) or "none"
            raise FailedPreconditionError(
                f"model {name!r} cannot {task.value} "
                f"(it can: {', '.join(t.value for t in entry.spec.tasks)}); "
                f"models that can {task.value}: {able}"
            )
        return entry.spec

    def status(self, name: str) -> ModelStatus:
        entry = self._entry(name)
        defaults = tuple(t for t in Task if self._catalog.default_for(t) == name)
        loaded = entry.loaded  # read once: metrics scrapes call this from another thread
        return ModelStatus(
            spec=entry.spec,
            state=entry.state,
            default_for=defaults,
            memory_bytes=entry.memory_bytes,
            load_seconds=entry.load_seconds,
            last_used=entry.last_used,
            active_requests=entry.active,
            error=entry.error,
            waiting_interactive=loaded.scheduler.waiting(Priority.INTERACTIVE) if loaded is not None else 0,
            waiting_batch=loaded.scheduler.waiting(Priority.BATCH) if loaded is not None else 0,
        )

    def statuses(self) -> list[ModelStatus]:
        return [self.status(name) for name in self._entries]

    def defaults_ready(self) -> bool:
        """True when every task's default model is READY."""
        names = {self._catalog.default_for(task) for task in Task} - {None}
        return all(self._entries[n].state is ModelState.READY for n in names if n is not None)

    # -- use -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, name: str, task: Task) -> AsyncIterator[LoadedModel]:
        """Hold a ready model for the duration of one request, loading it first if need be."""
        spec = self.resolve(name, task)
        entry = self._entries[spec.name]
        while entry.state is not ModelState.READY:
            if entry.state is ModelState.UNLOADING:
                raise UnavailableError(f"model {spec.name!r} is being unloaded; retry once it is loaded again")
            await self.load(spec.name)
        assert entry.loaded is not None
        entry.active += 1
        entry.idle.clear()
        try:
            yield entry.loaded
        finally:
            entry.active -= 1
            entry.last_used = datetime.now(UTC)
            if entry.active == 0:
                entry.idle.set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin loading the startup models in the background; health follows their progress."""
        for entry in self._entries.values():
            if entry.spec.load is LoadPolicy.STARTUP:
                self._start_loading(entry)

    async def wait_startup(self) -> None:
        """Wait until every startup model has finished loading, successfully or not."""
        pending = [e.loading for e in self._entries.values() if e.loading is not None]
        await asyncio.gather(*pending, return_exceptions=True)

    async def load(self, name: str) -> ModelStatus:
        """Load a model and wait for it; a model that is already ready is left as it is."""
        entry = self._entry(name)
        if entry.state is ModelState.UNLOADING:
            raise UnavailableError(f"model {name!r} is being unloaded; load it again once that ends")
        if entry.state is not ModelState.READY:
            task = entry.loading or self._start_loading(entry)
            await asyncio.shield(task)
            if entry.state is ModelState.FAILED:
                raise FailedPreconditionError(f"model {name!r} failed to load: {entry.error}")
        return self.status(name)

    async def unload(self, name: str, drain_timeout_seconds: float | None = None) -> ModelStatus:
        """Stop new requests for the model, wait for the ones it holds, then free it."""
        entry = self._entry(name)
        if entry.loading is not None:
            await asyncio.shield(entry.loading)
        if entry.state is not ModelState.READY:
            return self.status(name)  # unloaded, failed, or another unload is under way
        timeout = drain_timeout_seconds or self._drain_timeout
        self._set_state(entry, ModelState.UNLOADING)
        try:
            await asyncio.wait_for(entry.idle.wait(), timeout)
        except TimeoutError:
            self._set_state(entry, ModelState.READY)
            raise FailedPreconditionError(
                f"model {name!r} is still serving {entry.active} request(s) after {timeout:g} s; "
                "it stays loaded. Try again later or with a longer drain_timeout_seconds"
            ) from None
        except BaseException:
            # The caller gave up (cancelled, deadline): the model goes on serving, never stuck.
            self._set_state(entry, ModelState.READY)
            raise
        loaded, entry.loaded = entry.loaded, None
        assert loaded is not None
        # Once out of the entry the model must be freed and marked so, even if the caller goes away.
        await asyncio.shield(self._free(entry, loaded))
        return self.status(name)

    async def _free(self, entry: _Entry, loaded: LoadedModel) -> None:
        await asyncio.to_thread(_close, loaded)
        entry.memory_bytes = 0
        entry.error = ""
        self._set_state(entry, ModelState.UNLOADED)
        log.info("model unloaded", model=entry.spec.name)

    async def close(self) -> None:
        """Unload everything (used at shutdown, after requests have drained)."""
        for entry in self._entries.values():
            if entry.loading is not None:
                entry.loading.cancel()
        for name in self._entries:
            with contextlib.suppress(WaferError, asyncio.CancelledError):
                await self.unload(name)

    # -- internals -----------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFoundError(f"unknown model {name!r}; known models: {', '.join(sorted(self._entries))}")
        return entry

    def _start_loading(self, entry: _Entry) -> asyncio.Task[None]:
        self._set_state(entry, ModelState.LOADING)
        entry.loading = asyncio.create_task(self._load(entry), name=f"load-{entry.spec.name}")
        return entry.loading

    async def _load(self, entry: _Entry) -> None:
        spec = entry.spec
        pending: asyncio.Future[LoadedModel] | None = None
        try:
            async with self._load_lock:
                started = time.perf_counter()
                rss_before = _rss()
                pending = asyncio.get_running_loop().run_in_executor(None, self._load_blocking, spec)
                loaded = await pending
                entry.memory_bytes = max(0, _rss() - rss_before)
                entry.load_seconds = time.perf_counter() - started
            entry.loaded = loaded
            entry.error = ""
            self._set_state(entry, ModelState.READY)
            log.info(
                "model loaded",
                model=spec.name,
                backend=spec.backend,
                load_seconds=round(entry.load_seconds, 3),
                memory_mb=round(entry.memory_bytes / 2**20, 1),
            )
        except Exception as exc:
            entry.error = exc.message if isinstance(exc, WaferError) else f"{type(exc).__name__}: {exc}"
            self._set_state(entry, ModelState.FAILED)
            log.warning("model failed to load", model=spec.name, error=entry.error)
        except asyncio.CancelledError:
            # Shutdown while loading: the load thread cannot be interrupted; free what it returns.
            if pending is not None:
                pending.add_done_callback(_close_when_loaded)
            entry.error = "the load was cancelled"
            self._set_state(entry, ModelState.FAILED)
            raise
        finally:
            entry.loading = None

    def _load_blocking(self, spec: ModelSpec) -> LoadedModel:
        backend_cls = self._backends.get(spec.backend)
        if backend_cls is None:
            available = ", ".join(sorted(self._backends))
            raise FailedPreconditionError(
                f"backend {spec.backend!r} is not available in this server (available: {available})"
                + (f"; {spec.requires}" if spec.requires else "")
            )
        unsupported = set(spec.tasks) - backend_cls.tasks
        if unsupported:
            raise FailedPreconditionError(
                f"backend {spec.backend!r} cannot {', '.join(sorted(t.value for t in unsupported))}"
            )
        files = ModelFiles(
            weights=self._resolver.resolve(spec.source, model=spec.name),
            tokenizer=self._resolver.resolve(spec.tokenizer, model=spec.name) if spec.tokenizer else None,
        )
        backend = backend_cls.load(spec, files, LoadOptions(threads=spec.threads or self._threads))
        try:
            backend.health()
        except Exception:
            backend.close()
            raise
        scheduler = ModelScheduler(
            spec.name,
            backend,
            self._gate,
            batching=spec.batching,
            max_tokens=spec.max_tokens,
            observer=self._batch_observer,
        )
        return LoadedModel(spec=spec, backend=backend, scheduler=scheduler)

    def _set_state(self, entry: _Entry, state: ModelState) -> None:
        entry.state = state
        for listener in self._listeners:
            listener()


def _close(loaded: LoadedModel) -> None:
    loaded.scheduler.close()
    loaded.backend.close()


def _close_when_loaded(future: asyncio.Future[LoadedModel]) -> None:
    if not future.cancelled() and future.exception() is None:
        _close(future.result())


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)
