"""When a job may run: always, when the server is idle, when the machine is charging, or both."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from wafer.errors import InvalidArgumentError
from wafer.jobs.power import PowerProbe

# A day: an idle threshold beyond it would never be met on a server anyone uses.
MAX_IDLE_SECONDS = 86_400.0


@dataclass(frozen=True, slots=True)
class RunPolicy:
    when_idle: bool = False
    # None: the server's default (jobs_default_idle_seconds).
    idle_seconds: float | None = None
    when_charging: bool = False

    def __post_init__(self) -> None:
        if self.idle_seconds is not None and not (
            math.isfinite(self.idle_seconds) and 0 <= self.idle_seconds <= MAX_IDLE_SECONDS
        ):
            raise InvalidArgumentError(f"idle_seconds must be between 0 and {MAX_IDLE_SECONDS:g}")

    def describe(self) -> str:
        parts = []
        if self.when_idle:
            parts.append("when idle" if self.idle_seconds is None else f"when idle {self.idle_seconds:g}s")
        if self.when_charging:
            parts.append("when charging")
        return " and ".join(parts) or "always"


class PolicyChecker:
    """Says why a job must wait now, or None when it may run."""

    def __init__(self, *, idle_for: Callable[[], float], power: PowerProbe, default_idle_seconds: float) -> None:
        """`idle_for`: seconds since the last interactive request (the engine's clock)."""
        self._idle_for = idle_for
        self._power = power
        self._default_idle_seconds = default_idle_seconds

    def blocking_reason(self, policy: RunPolicy) -> str | None:
        reasons = []
        if policy.when_charging:
            power = self._power.state()
            if not power.on_mains:
                reasons.append(f"waiting for a charger ({power.detail})")
        if policy.when_idle:
            needed = self._default_idle_seconds if policy.idle_seconds is None else policy.idle_seconds
            if self._idle_for() < needed:
                # No running count in the text: the reason is saved whenever it changes.
                reasons.append(f"waiting for {needed:g}s without interactive requests")
        return "; ".join(reasons) or None
