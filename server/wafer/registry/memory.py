"""The registry's memory policy: the budget, which models give way to a load (idle, unpinned, least
recently used first), who may make them give way, the keep-alive clock, and the heap trimming that
lets RSS, the budget's measure, come down after an unload.

The policy decides what to unload and when; the unloading itself (states, leases waiting) is the
lifecycle's (`lifecycle.py`), reached through the `evict` callable it is given.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import psutil
import structlog

from wafer.backends.base import ModelFiles
from wafer.errors import PermissionDeniedError, ResourceExhaustedError
from wafer.registry.entries import Entry, ModelState, mb, now
from wafer.specs import ModelSpec

log = structlog.get_logger(__name__)

# Whether the current call (its task, and the tasks it starts) may unload other models to make room
# for an on-demand load. A context variable, not a parameter: the engine between the RPC layer and
# the lease knows nothing of callers. True where nothing says otherwise (no token set, in-process use).
_ON_DEMAND_EVICTION: contextvars.ContextVar[bool] = contextvars.ContextVar("wafer_on_demand_eviction", default=True)


def allow_on_demand_eviction(allowed: bool) -> None:
    """Say, for the rest of the current task, whether an on-demand load may unload other models
    to make room under the memory budget (see wafer.registry's docstring)."""
    _ON_DEMAND_EVICTION.set(allowed)


def on_demand_eviction_allowed() -> bool:
    return _ON_DEMAND_EVICTION.get()


# Unload a model that is idle now, giving the reason it is no longer loaded.
Evict = Callable[[Entry, str], Awaitable[None]]


class MemoryPolicy:
    """The budget over the registry's entries (the registry's own mapping, read live)."""

    def __init__(
        self,
        entries: Mapping[str, Entry],
        evict: Evict,
        *,
        budget_bytes: int | None,
        wait_seconds: float,
        keep_alive_check_seconds: float,
    ) -> None:
        self._entries = entries
        self._evict = evict
        self._budget = budget_bytes
        self._wait = wait_seconds
        self._keep_alive_check = keep_alive_check_seconds

    @property
    def budget_bytes(self) -> int | None:
        return self._budget

    def in_use(self) -> int:
        """Memory held by every loaded instance, retiring ones included, as measured at their load."""
        return sum(entry.memory_bytes for entry in self._entries.values())

    async def make_room(
        self, needed: int, loading: Entry, *, for_spec: ModelSpec, strict: bool = True, evict: bool = True
    ) -> None:
        """Evict idle, unpinned models, least recently used first, until `needed` more bytes fit the
        budget. Models busy with requests soon are idle: wait up to `memory_wait_seconds` for them
        before refusing the load. Runs under the load lock, so no other load races it. Without
        `evict`, a load that does not fit as it is, where unloading others could make it fit, is
        refused (PermissionDeniedError)."""
        if self._budget is None:
            return
        if not evict and self.in_use() + needed > self._budget:
            others = [e for e in self._entries.values() if e is not loading and e.memory_bytes > 0 and not e.pinned]
            if others:
                raise PermissionDeniedError(
                    f"model {for_spec.name!r} is not loaded, and loading it needs about {mb(needed)} where the "
                    f"memory budget has {mb(max(0, self._budget - self.in_use()))} free: it would unload "
                    f"{', '.join(e.spec.name for e in others)}. Unloading models is an admin act: send the admin "
                    "token with this call, or have an admin load the model (LoadModel)"
                )
        deadline = time.monotonic() + self._wait
        while True:
            await self._evict_idle(needed, loading, for_spec)
            if not strict or self.in_use() + needed <= self._budget:
                return
            releases = self._pending_releases(loading)
            remaining = deadline - time.monotonic()
            if not releases or remaining <= 0:
                break
            # Also wakes on a timer: an admin's unload elsewhere frees memory without an event here.
            await asyncio.wait(releases, timeout=min(remaining, 0.1), return_when=asyncio.FIRST_COMPLETED)
            for waiter in releases:
                waiter.cancel()
        holders = [_holder(e) for e in self._entries.values() if e.memory_bytes > 0]
        raise ResourceExhaustedError(
            f"loading model {for_spec.name!r} needs about {mb(needed)} but the memory budget is "
            f"{mb(self._budget)} and {mb(self.in_use())} is held by models that cannot be "
            f"evicted: {', '.join(holders) or 'none'}. Unload one, unpin one, or raise WAFER_MEMORY_BUDGET_MB",
            retry_after_seconds=5.0,
        )

    async def _evict_idle(self, needed: int, loading: Entry, for_spec: ModelSpec) -> None:
        assert self._budget is not None
        candidates = sorted(
            (e for e in self._entries.values() if e is not loading and e.evictable()),
            key=lambda e: e.last_active,
        )
        for victim in candidates:
            if self.in_use() + needed <= self._budget:
                return
            if not victim.evictable():  # it was leased while an earlier victim was being freed
                continue
            freed = victim.memory_bytes
            await self._evict(victim, f"evicted at {now()} to make room for {for_spec.name!r}")
            log.info("model evicted", model=victim.spec.name, freed_mb=round(freed / 2**20, 1), for_model=for_spec.name)

    def _pending_releases(self, loading: Entry) -> list[asyncio.Future[Any]]:
        """Waiters for memory that will become evictable or free by itself: unpinned models busy with
        requests (idle soon), and swapped-out instances (freed once their requests end)."""
        waiters: list[asyncio.Future[Any]] = []
        for entry in self._entries.values():
            # Shielded: the caller cancels its waiters, never the retirement itself.
            waiters += [asyncio.shield(task) for task in entry.retire_tasks]
            current = entry.current
            if entry is not loading and not entry.pinned and current is not None and current.active:
                waiters.append(asyncio.ensure_future(current.idle.wait()))
        return waiters

    async def unload_idle_models(self) -> None:
        """The keep-alive clock: unload models idle longer than their keep_alive_seconds."""
        while True:
            await asyncio.sleep(self._keep_alive_check)
            clock = time.monotonic()
            for entry in list(self._entries.values()):
                keep_alive = entry.keep_alive_seconds
                if keep_alive is None or not entry.evictable():
                    continue
                idle = clock - entry.last_active
                if idle < keep_alive:
                    continue
                try:
                    await self._evict(
                        entry, f"unloaded at {now()} after {idle:.0f} s idle (keep_alive {keep_alive:g} s)"
                    )
                except Exception as exc:  # one model failing to close must not stop the clock for the others
                    log.warning("idle model failed to unload", model=entry.spec.name, error=repr(exc))
                else:
                    log.info("idle model unloaded", model=entry.spec.name, idle_seconds=round(idle, 1))


def _holder(entry: Entry) -> str:
    why = []
    if entry.pinned:
        why.append("pinned")
    if any(i.active for i in entry.instances):
        why.append("busy")
    if entry.retiring:
        why.append("swapping")
    if entry.state is not ModelState.READY:
        why.append(entry.state.value)
    return f"{entry.spec.name} ({mb(entry.memory_bytes)}{', ' + ', '.join(why) if why else ''})"


# -- measuring and returning memory ------------------------------------------------------------


def files_size(files: ModelFiles) -> int:
    """Bytes of the model's files: the first estimate of its memory, before a load has measured it."""
    paths = (files.weights, files.tokenizer, *files.extra.values())
    return sum(path.stat().st_size for path in paths if path is not None)


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """Hand freed heap pages back to the OS. glibc keeps a freed model's arenas mapped otherwise,
    and RSS, the budget's measure, would not come down after an unload."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# mallopt's parameter number for the arena cap (glibc malloc.h).
_M_ARENA_MAX = -8


def limit_heap_arenas(count: int) -> None:
    """Cap glibc's malloc arenas. By default each thread that allocates may get its own (up to 8 per
    core), and every load brings new threads (its worker, ONNX Runtime's pools): freed models then
    leave partly used arenas behind, and RSS drifts up over load/unload cycles (+50 MiB over 200
    minilm cycles with requests running; +7 MiB with 2 arenas, bench/RESULTS.md). Call it early,
    before the threads exist; no-op where the C library is not glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, count)
