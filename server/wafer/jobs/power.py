"""Is the machine on mains power? Read from Linux's power-supply class (`/sys/class/power_supply`).

Each supply is a folder with a `type` file: `Mains`, `USB` (chargers) report `online` (1 or 0),
a `Battery` reports `status` (Charging, Discharging, Full, Not charging, Unknown). Batteries with
`scope` `Device` belong to peripherals (a mouse) and say nothing about this machine. The root is a
setting, so tests fake a battery with a temporary folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# "Not charging": plugged in, but held below a charge threshold; the machine is on mains.
_ON_MAINS_STATUSES = frozenset({"charging", "full", "not charging"})


@dataclass(frozen=True, slots=True)
class PowerState:
    on_mains: bool
    # In words, for a waiting job's reason: "battery BAT0 discharging".
    detail: str


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


class PowerProbe:
    def __init__(self, root: Path) -> None:
        self._root = root

    def state(self) -> PowerState:
        try:
            supplies = sorted(p for p in self._root.iterdir() if p.is_dir())
        except OSError:
            # No power-supply class at all: a desktop, a server or a container.
            return PowerState(on_mains=True, detail="no battery")
        batteries: list[tuple[str, str]] = []
        for supply in supplies:
            kind = _read(supply / "type").lower()
            if kind == "battery":
                if _read(supply / "scope").lower() == "device":
                    continue
                batteries.append((supply.name, _read(supply / "status") or "Unknown"))
            elif _read(supply / "online") == "1":
                return PowerState(on_mains=True, detail=f"{supply.name} online")
        if not batteries:
            return PowerState(on_mains=True, detail="no battery")
        for name, status in batteries:
            if status.lower() in _ON_MAINS_STATUSES:
                return PowerState(on_mains=True, detail=f"battery {name} {status.lower()}")
        name, status = batteries[0]
        return PowerState(on_mains=False, detail=f"battery {name} {status.lower()}")
