"""The registry's lifecycle: model states, on-demand loads, leases, swaps and safe unloads (see
wafer.registry's docstring). What the memory budget allows is `memory.MemoryPolicy`'s to say."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

import structlog

from wafer.backends.base import Backend, LoadOptions, ModelFiles
from wafer.domain import Priority
from wafer.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    WaferError,
)
from wafer.registry.entries import Entry, Instance, LoadedModel, ModelState, ModelStatus, now
from wafer.registry.memory import MemoryPolicy, files_size, on_demand_eviction_allowed, rss, trim_heap
from wafer.scheduler import BatchObserver, ComputeGate, ModelHandle, ModelScheduler
from wafer.sources import SourceResolver
from wafer.specs import Catalog, LoadPolicy, ModelSpec, Task, spec_from_text

log = structlog.get_logger(__name__)

# Most instances of a model whose spec names no `instances` (backends that scale out): one per
# thread up to this. Past a few, the instances' Python work (padding, pooling, under one GIL) is
# what limits, and every instance costs its own session's memory (docs/models-yaml.md).
MAX_DEFAULT_INSTANCES = 4
# Names of models registered over the API: what a models.yaml key could reasonably be.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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
        memory_budget_bytes: int | None = None,
        memory_wait_seconds: float = 10.0,
        keep_alive_check_seconds: float = 1.0,
    ) -> None:
        self._catalog = catalog
        self._resolver = resolver
        self._backends = backends
        # Where the catalog meets the backend table: a spec's options and file roles are the
        # backend's to judge, and a mistake in models.yaml stops the start, not a later load.
        for spec in catalog.models.values():
            self._check_spec(spec)
        self._threads = threads
        self._drain_timeout = drain_timeout_seconds
        self._entries = {name: Entry(spec) for name, spec in catalog.models.items()}
        self._load_lock = asyncio.Lock()
        self._gate = gate or ComputeGate()
        self._batch_observer = batch_observer
        self._listeners: list[Listener] = []
        self._memory = MemoryPolicy(
            self._entries,
            self._evict,
            budget_bytes=memory_budget_bytes,
            wait_seconds=memory_wait_seconds,
            keep_alive_check_seconds=keep_alive_check_seconds,
        )
        self._reaper: asyncio.Task[None] | None = None

    # -- queries -------------------------------------------------------------------------------

    @property
    def memory_budget_bytes(self) -> int | None:
        return self._memory.budget_bytes

    @property
    def resolver(self) -> SourceResolver:
        return self._resolver

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

    def spec(self, name: str) -> ModelSpec:
        return self._entry(name).spec

    def backend_class(self, spec: ModelSpec) -> type[Backend] | None:
        """The backend class that runs `spec`, without loading it (None: not in this server)."""
        return self._backends.get(spec.backend)

    def knows(self, name: str) -> bool:
        return name in self._entries

    @staticmethod
    def check_new_name(name: str) -> None:
        """Refuse a name for a model registered over the API that could not be a models.yaml key."""
        if not _MODEL_NAME.fullmatch(name):
            raise InvalidArgumentError(
                f"model name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )

    def status(self, name: str) -> ModelStatus:
        entry = self._entry(name)
        defaults = tuple(t for t in Task if self._catalog.default_for(t) == name)
        current = entry.current  # read once: metrics scrapes call this from another thread
        return ModelStatus(
            spec=entry.spec,
            state=entry.state,
            default_for=defaults,
            memory_bytes=entry.memory_bytes,
            load_seconds=current.load_seconds if current is not None else 0.0,
            last_used=entry.last_used,
            active_requests=sum(i.active for i in entry.instances),
            error=entry.error,
            waiting_interactive=current.loaded.scheduler.waiting(Priority.INTERACTIVE) if current is not None else 0,
            waiting_batch=current.loaded.scheduler.waiting(Priority.BATCH) if current is not None else 0,
            pinned=entry.pinned,
            keep_alive_seconds=entry.keep_alive_seconds,
            not_loaded_reason="" if current is not None else entry.not_loaded_reason,
        )

    def statuses(self) -> list[ModelStatus]:
        return [self.status(name) for name in list(self._entries)]

    def memory_in_use(self) -> int:
        """Memory held by every loaded instance, retiring ones included, as measured at their load."""
        return self._memory.in_use()

    def defaults_ready(self) -> bool:
        """True when every task's default model is READY, or was unloaded by the registry itself
        (evicted, idle) and loads again on the next request: health must not drop a replica
        because the budget or a keep-alive did its job."""
        names = {self._catalog.default_for(task) for task in Task} - {None}
        return all(self._entries[n].serviceable() for n in names if n is not None)

    def spec_from_api(self, name: str, text: str) -> ModelSpec:
        """A spec sent with LoadModel: fields over the model's current spec (or a whole new entry),
        with local paths confined to the folders models may be read from."""
        entry = self._entries.get(name)
        if entry is None:
            self.check_new_name(name)
        base = entry.spec if entry is not None else None
        spec = spec_from_text(name, text, base=base)
        for field_name in ("source", "tokenizer"):
            value = getattr(spec, field_name)
            if value and (base is None or value != getattr(base, field_name)):
                self._resolver.check_confined(value, model=name)
        for role, value in spec.files.items():
            if base is None or value != base.files.get(role):
                self._resolver.check_confined(value, model=name)
        self._check_spec(spec)
        return spec

    def _check_spec(self, spec: ModelSpec) -> None:
        """Validate the spec's options and file roles against its backend (InvalidArgumentError).
        A backend this server lacks is left to the load, which says so."""
        backend_cls = self._backends.get(spec.backend)
        if backend_cls is not None:
            backend_cls.check_spec(spec)

    # -- use -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, name: str, task: Task) -> AsyncIterator[ModelHandle]:
        """Hold a ready model for the duration of one request, loading it first if need be. The
        handle is the only way to the model's backend: its work runs on the model's thread."""
        spec = self.resolve(name, task)
        entry = self._entries[spec.name]
        while entry.state is not ModelState.READY:
            if entry.state is ModelState.UNLOADING:
                if not entry.auto_unloading:
                    raise UnavailableError(f"model {spec.name!r} is being unloaded; retry once it is loaded again")
                await entry.settled.wait()
                continue
            await self.load(spec.name, evict=on_demand_eviction_allowed())
        instance = entry.current
        assert instance is not None
        instance.active += 1
        instance.idle.clear()
        try:
            yield instance.loaded.handle
        finally:
            instance.active -= 1
            entry.last_used = datetime.now(UTC)
            entry.last_active = time.monotonic()
            if instance.active == 0:
                instance.idle.set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin loading the startup models in the background, and watch for idle models."""
        for entry in self._entries.values():
            if entry.spec.load is LoadPolicy.STARTUP:
                self._start_loading(entry, entry.spec)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._memory.unload_idle_models(), name="keep-alive")

    async def load(
        self,
        name: str,
        *,
        spec: ModelSpec | None = None,
        pinned: bool | None = None,
        keep_alive_seconds: float | None = None,
        evict: bool = True,
    ) -> ModelStatus:
        """Load a model and wait for it. With `spec`, swap to it (or register it, for a new name);
        a model already ready with that spec is left as it is. `pinned` and `keep_alive_seconds`
        (0: never) override the spec's until the server stops. Without `evict`, a load that does not
        fit the memory budget as it is raises PermissionDeniedError instead of unloading others."""
        if spec is not None and spec.name != name:
            raise InvalidArgumentError(f"spec names {spec.name!r}, not {name!r}")
        entry = self._entries.get(name)
        registering = entry is None
        if entry is None:
            if spec is None:
                raise NotFoundError(f"unknown model {name!r}; known models: {', '.join(sorted(self._entries))}")
            entry = self._entries[name] = Entry(spec)
        while True:
            if entry.state is ModelState.UNLOADING and entry.loading is None:
                if not entry.auto_unloading:
                    raise UnavailableError(f"model {name!r} is being unloaded; load it again once that ends")
                await entry.settled.wait()
                continue
            task = entry.loading
            if task is None:
                wanted = spec or entry.spec
                if entry.state is ModelState.READY and wanted == entry.spec:
                    break
                task = self._start_loading(entry, wanted, evict=evict)
            joined = entry.loading_spec
            error = await asyncio.shield(task)
            if joined != (spec or entry.spec):
                continue  # someone else's swap finished, or failed; now ours
            if error is None:
                break
            if isinstance(error, PermissionDeniedError) and evict:
                continue  # joined a caller's load that could not make room; this one may
            if registering and entry.current is None and self._entries.get(name) is entry:
                del self._entries[name]
                self._notify()
            if isinstance(error, ResourceExhaustedError | UnavailableError | PermissionDeniedError):
                raise error
            keeps = "; the previous spec keeps serving" if entry.current is not None else ""
            raise FailedPreconditionError(f"model {name!r} failed to load: {error.message}{keeps}")
        if pinned is not None:
            entry.pinned_override = pinned
        if keep_alive_seconds is not None:
            entry.keep_alive_override = keep_alive_seconds
        return self.status(name)

    async def unload(self, name: str, drain_timeout_seconds: float | None = None) -> ModelStatus:
        """Stop new requests for the model, wait for the ones it holds, then free it."""
        entry = self._entry(name)
        while entry.loading is not None:
            await asyncio.shield(entry.loading)
        if entry.state is not ModelState.READY:
            return self.status(name)  # unloaded, failed, or another unload is under way
        timeout = drain_timeout_seconds or self._drain_timeout
        self._begin_unloading(entry, automatic=False)
        instance = entry.current
        assert instance is not None
        try:
            await asyncio.wait_for(instance.idle.wait(), timeout)
        except TimeoutError:
            self._end_unloading(entry, ModelState.READY)
            raise FailedPreconditionError(
                f"model {name!r} is still serving {instance.active} request(s) after {timeout:g} s; "
                "it stays loaded. Try again later or with a longer drain_timeout_seconds"
            ) from None
        except BaseException:
            # The caller gave up (cancelled, deadline): the model goes on serving, never stuck.
            self._end_unloading(entry, ModelState.READY)
            raise
        entry.current = None
        entry.auto_unloaded = False
        # Once out of the entry the model must be freed and marked so, even if the caller goes away.
        await asyncio.shield(self._free(entry, instance, f"unloaded by admin at {now()}"))
        return self.status(name)

    async def close(self) -> None:
        """Unload everything (used at shutdown, after requests have drained)."""
        # gather(return_exceptions=True) collects the tasks' own cancellations, while a cancellation
        # of close() itself still reaches its caller.
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        loading = [entry.loading for entry in self._entries.values() if entry.loading is not None]
        for task in loading:
            task.cancel()
        # Settled before unloading: a cancelled swap leaves its model's old instance to unload.
        await asyncio.gather(*loading, return_exceptions=True)
        for name in list(self._entries):
            try:
                await self.unload(name)
            except Exception as exc:  # one model failing to close must not keep the others loaded
                log.error("model failed to unload at shutdown", model=name, error=repr(exc))
        retiring = [task for entry in self._entries.values() for task in entry.retire_tasks]
        await asyncio.gather(*retiring, return_exceptions=True)

    # -- internals -----------------------------------------------------------------------------

    def _entry(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFoundError(f"unknown model {name!r}; known models: {', '.join(sorted(self._entries))}")
        return entry

    def _start_loading(self, entry: Entry, spec: ModelSpec, *, evict: bool = True) -> asyncio.Task[WaferError | None]:
        before = entry.state
        if entry.current is None:
            self._set_state(entry, ModelState.LOADING)
        entry.loading_spec = spec
        entry.loading = asyncio.create_task(self._load(entry, spec, before, evict=evict), name=f"load-{spec.name}")
        return entry.loading

    async def _load(self, entry: Entry, spec: ModelSpec, before: ModelState, *, evict: bool) -> WaferError | None:
        """Load `spec` for `entry` and put it in service; the error, if it fails, is returned to
        whoever waits (a background load has no caller to raise to)."""
        swap = spec != entry.spec
        try:
            instance = await self._load_instance(spec, entry, evict=evict)
        except asyncio.CancelledError:
            entry.loading = None
            if entry.current is None:
                entry.error = "the load was cancelled"
                entry.not_loaded_reason = "failed: the load was cancelled"
                self._set_state(entry, ModelState.FAILED)
            raise
        except Exception as exc:
            entry.loading = None
            error = exc if isinstance(exc, WaferError) else FailedPreconditionError(f"{type(exc).__name__}: {exc}")
            log.warning("model failed to load", model=spec.name, error=error.message, swap=swap)
            if entry.current is not None:
                self._notify()  # a failed swap: the old instance keeps serving, as it is
            elif isinstance(error, ResourceExhaustedError | PermissionDeniedError) and not swap:
                # Not a fault of the model: it stays loadable, and says why it is not loaded.
                entry.not_loaded_reason = f"load refused at {now()}: {error.message}"
                self._set_state(entry, before)
            elif swap:
                # All or nothing: the entry keeps its spec and its state from before the attempt.
                self._set_state(entry, before)
            else:
                entry.error = error.message
                entry.not_loaded_reason = f"failed: {error.message}"
                self._set_state(entry, ModelState.FAILED)
            return error
        entry.loading = None
        self._install(entry, spec, instance)
        return None

    def _install(self, entry: Entry, spec: ModelSpec, instance: Instance) -> None:
        old = entry.current
        entry.spec = spec
        entry.current = instance
        entry.measured_bytes = instance.memory_bytes
        entry.error = ""
        entry.not_loaded_reason = ""
        entry.auto_unloaded = False
        entry.last_active = time.monotonic()
        self._set_state(entry, ModelState.READY)
        log.info(
            "model loaded",
            model=spec.name,
            backend=spec.backend,
            load_seconds=round(instance.load_seconds, 3),
            memory_mb=round(instance.memory_bytes / 2**20, 1),
            swapped=old is not None,
        )
        if old is not None:
            entry.retiring.append(old)
            retire = asyncio.create_task(self._retire(entry, old), name=f"retire-{spec.name}")
            entry.retire_tasks.add(retire)
            retire.add_done_callback(entry.retire_tasks.discard)

    async def _retire(self, entry: Entry, old: Instance) -> None:
        """Free a swapped-out instance once the requests it still holds end."""
        await old.idle.wait()
        try:
            await asyncio.to_thread(_close, old.loaded)
        except Exception as exc:
            # Nothing serves from it any more and closing again would not go better: stop counting
            # it against the memory budget, and say so, rather than fail a task nobody awaits.
            log.error("swapped-out model failed to close", model=entry.spec.name, error=repr(exc))
        else:
            log.info("swapped-out model freed", model=entry.spec.name)
        finally:
            entry.retiring.remove(old)
            self._notify()

    async def wait_retired(self, name: str) -> None:
        """Wait until the instances a swap replaced are freed (bound it with asyncio.timeout)."""
        entry = self._entry(name)
        if entry.retire_tasks:
            await asyncio.shield(asyncio.gather(*entry.retire_tasks))

    async def _load_instance(self, spec: ModelSpec, entry: Entry, *, evict: bool) -> Instance:
        pending: asyncio.Future[LoadedModel] | None = None
        # Set when the load is cancelled: a Hub download for it stops at its next read. The thread
        # itself cannot be cancelled, and shutdown waits for it (asyncio.run joins the executor).
        stop = threading.Event()
        try:
            async with self._load_lock:
                backend_cls = self._backend_for(spec)
                files = await asyncio.to_thread(self._files, spec, stop.is_set)
                estimate = entry.measured_bytes if spec == entry.spec else 0
                await self._memory.make_room(max(estimate, files_size(files)), entry, for_spec=spec, evict=evict)
                started = time.perf_counter()
                # Memory freed earlier but still mapped would be reused by this load and hide it.
                await asyncio.to_thread(trim_heap)
                rss_before = rss()
                loop = asyncio.get_running_loop()
                pending = loop.run_in_executor(None, self._load_blocking, backend_cls, spec, files)
                loaded = await pending
                working = sum(backend.working_bytes for backend in loaded.backends)
                instance = Instance(
                    loaded=loaded,
                    memory_bytes=max(0, rss() - rss_before) + working,
                    load_seconds=time.perf_counter() - started,
                )
                if working:
                    # Memory the model's long inputs will touch is not spent yet: a model it does
                    # not fit beside the others is refused (and freed) now, not OOM-killed later.
                    try:
                        await self._memory.make_room(instance.memory_bytes, entry, for_spec=spec, evict=evict)
                    except Exception:
                        await asyncio.to_thread(_close, loaded)
                        raise
                elif evict:
                    # The estimate may have been low (a first load): make room for what it really
                    # took, as far as idle models allow; the model is loaded by now either way.
                    await self._memory.make_room(instance.memory_bytes, entry, for_spec=spec, strict=False)
        except asyncio.CancelledError:
            stop.set()
            # Shutdown while loading: the load thread cannot be interrupted; free what it returns.
            if pending is not None:
                pending.add_done_callback(_close_when_loaded)
            raise
        return instance

    def _backend_for(self, spec: ModelSpec) -> type[Backend]:
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
        backend_cls.check_spec(spec)
        return backend_cls

    def _files(self, spec: ModelSpec, cancelled: Callable[[], bool]) -> ModelFiles:
        def resolve(source: str) -> Path:
            return self._resolver.resolve(source, model=spec.name, cancelled=cancelled)

        return ModelFiles(
            weights=resolve(spec.source),
            tokenizer=resolve(spec.tokenizer) if spec.tokenizer else None,
            extra=MappingProxyType({role: resolve(source) for role, source in spec.files.items()}),
        )

    def _load_blocking(self, backend_cls: type[Backend], spec: ModelSpec, files: ModelFiles) -> LoadedModel:
        count, threads = instance_plan(backend_cls, spec, spec.threads or self._threads)
        instances = backend_cls.load_instances(spec, files, LoadOptions(threads=threads), count)
        try:
            # Also the warm-up: the first call sizes ONNX Runtime's arena, so the RSS measured
            # around the load counts it.
            for instance in instances:
                instance.health()
        except Exception:
            for instance in instances:
                instance.close()
            raise
        backend = instances[0]
        scheduler = ModelScheduler(
            spec.name,
            instances,
            self._gate,
            batching=spec.batching,
            max_tokens=spec.max_tokens,
            stream_interval=spec.generation.stream_interval_ms / 1000,
            observer=self._batch_observer,
        )
        handle = ModelHandle(spec, scheduler, backend, observer=self._batch_observer)
        return LoadedModel(spec=spec, backend=backend, scheduler=scheduler, handle=handle, instances=tuple(instances))

    async def _evict(self, entry: Entry, reason: str) -> None:
        """Unload a model that is idle now. The checks and the state change happen with no await
        between them, so no lease can slip in; leases arriving later wait and load it again."""
        instance = entry.current
        assert instance is not None and instance.active == 0
        self._begin_unloading(entry, automatic=True)
        entry.current = None
        entry.auto_unloaded = True
        await asyncio.shield(self._free(entry, instance, reason))

    async def _free(self, entry: Entry, instance: Instance, reason: str) -> None:
        try:
            await asyncio.to_thread(_close, instance.loaded)
        finally:
            entry.error = ""
            entry.not_loaded_reason = reason
            self._end_unloading(entry, ModelState.UNLOADED)
        log.info("model unloaded", model=entry.spec.name, reason=reason)

    def _begin_unloading(self, entry: Entry, *, automatic: bool) -> None:
        entry.auto_unloading = automatic
        entry.settled.clear()
        self._set_state(entry, ModelState.UNLOADING)

    def _end_unloading(self, entry: Entry, state: ModelState) -> None:
        entry.auto_unloading = False
        self._set_state(entry, state)
        entry.settled.set()

    def _set_state(self, entry: Entry, state: ModelState) -> None:
        entry.state = state
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()


def _close(loaded: LoadedModel) -> None:
    loaded.scheduler.close()
    for instance in loaded.backends:
        instance.close()
    trim_heap()


def default_instances(backend_cls: type[Backend], threads: int) -> int:
    """Instances of a model whose spec names none: one per thread, up to MAX_DEFAULT_INSTANCES, for
    a backend that scales out; one otherwise."""
    if not backend_cls.scales_out:
        return 1
    return max(1, min(MAX_DEFAULT_INSTANCES, threads))


def instance_plan(backend_cls: type[Backend], spec: ModelSpec, threads: int) -> tuple[int, int]:
    """How many instances of the model to load, and the threads each computes with: the model's
    threads shared out, at least one each."""
    count = spec.instances or default_instances(backend_cls, threads)
    return count, max(1, threads // count)


def _close_when_loaded(future: asyncio.Future[LoadedModel]) -> None:
    if not future.cancelled() and future.exception() is None:
        _close(future.result())
