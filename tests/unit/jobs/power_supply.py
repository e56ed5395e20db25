"""A fake /sys/class/power_supply: folders and files laid out as Linux does, in a temp folder."""

from __future__ import annotations

from pathlib import Path


def add_supply(root: Path, name: str, **files: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in files.items():
        (folder / key).write_text(value + "\n")
    return folder


def laptop(root: Path, *, charging: bool) -> None:
    """A laptop: mains adapter AC and battery BAT0, plugged in (charging) or not (discharging)."""
    add_supply(root, "AC", type="Mains", online="1" if charging else "0")
    add_supply(root, "BAT0", type="Battery", scope="System", status="Charging" if charging else "Discharging")
