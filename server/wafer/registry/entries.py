"""What the registry keeps per model: its state, its loaded instances, and what a lease hands out.
Shared by the lifecycle (`lifecycle.py`) and the memory policy (`memory.py`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from wafer.backends.base import Backend
from wafer.errors import WaferError
from wafer.scheduler import ModelHandle, ModelScheduler
from wafer.specs import ModelSpec, Task

NEVER_LOADED = "never loaded"


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """One loaded copy of a model as the registry keeps it: the spec, the backend instances, the
    scheduler that owns them, and the handle a lease hands out (callers never see the rest).
    `backend` is the model's first instance, the one the scheduler's calls and streams run on;
    `instances` holds every instance, `backend` first."""

    spec: ModelSpec
    backend: Backend
    scheduler: ModelScheduler
    handle: ModelHandle
    instances: tuple[Backend, ...] = ()

    @property
    def backends(self) -> tuple[Backend, ...]:
        """Every instance; `backend` alone for a record made without the list."""
        return self.instances or (self.backend,)


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
    pinned: bool = False
    keep_alive_seconds: float | None = None
    # Why the model is not loaded; empty while it is.
    not_loaded_reason: str = ""


@dataclass(slots=True)
class Instance:
    """One loaded copy of a model. During a swap a name has two: the current one and a retiring one."""

    loaded: LoadedModel
    memory_bytes: int
    load_seconds: float
    active: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


class Entry:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.state = ModelState.UNLOADED
        self.current: Instance | None = None
        self.retiring: list[Instance] = []
        self.retire_tasks: set[asyncio.Task[None]] = set()
        self.error = spec.requires
        self.not_loaded_reason = NEVER_LOADED
        # What the last load of this spec measured; the estimate for its next load.
        self.measured_bytes = 0
        self.last_used: datetime | None = None
        # Monotonic time of the last lease's end (or of the load): the LRU and keep-alive clock.
        self.last_active = time.monotonic()
        self.loading: asyncio.Task[WaferError | None] | None = None
        self.loading_spec: ModelSpec | None = None
        # Set while the entry is not UNLOADING; automatic unloads make leases wait on it.
        self.settled = asyncio.Event()
        self.settled.set()
        self.auto_unloading = False
        # Unloaded by the registry (eviction, keep-alive) rather than by an admin or never loaded.
        self.auto_unloaded = False
        self.pinned_override: bool | None = None
        self.keep_alive_override: float | None = None

    @property
    def pinned(self) -> bool:
        return self.spec.pinned if self.pinned_override is None else self.pinned_override

    @property
    def keep_alive_seconds(self) -> float | None:
        if self.keep_alive_override is None:
            return self.spec.keep_alive_seconds
        return self.keep_alive_override or None

    @property
    def memory_bytes(self) -> int:
        return sum(i.memory_bytes for i in self.instances)

    @property
    def instances(self) -> list[Instance]:
        return ([self.current] if self.current is not None else []) + self.retiring

    def serviceable(self) -> bool:
        if self.state is ModelState.READY:
            return True
        return self.auto_unloaded and self.state is not ModelState.FAILED

    def evictable(self) -> bool:
        current = self.current
        return (
            self.state is ModelState.READY
            and current is not None
            and current.active == 0
            and self.loading is None
            and not self.pinned
        )


def now() -> str:
    """The wall-clock time, for the reasons a model gives for not being loaded."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def mb(value: int) -> str:
    return f"{value / 2**20:.0f} MB"
