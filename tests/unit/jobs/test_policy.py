"""The power probe on fake power-supply folders, and run policies over it and the idle clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.jobs.power_supply import add_supply, laptop
from wafer.errors import InvalidArgumentError
from wafer.jobs.policy import PolicyChecker, RunPolicy
from wafer.jobs.power import PowerProbe


def test_no_power_supply_class_counts_as_mains(tmp_path: Path) -> None:
    state = PowerProbe(tmp_path / "absent").state()
    assert state.on_mains and state.detail == "no battery"
    # A desktop: the class exists but lists no battery.
    add_supply(tmp_path / "desktop", "ucsi-source-psy", type="USB", online="0")
    assert PowerProbe(tmp_path / "desktop").state().on_mains


def test_laptop_on_battery_and_on_charger(tmp_path: Path) -> None:
    laptop(tmp_path, charging=False)
    state = PowerProbe(tmp_path).state()
    assert not state.on_mains and state.detail == "battery BAT0 discharging"
    laptop(tmp_path, charging=True)
    assert PowerProbe(tmp_path).state().on_mains


@pytest.mark.parametrize(("status", "on_mains"), [("Full", True), ("Not charging", True), ("Unknown", False)])
def test_battery_status_without_an_adapter_file(tmp_path: Path, status: str, on_mains: bool) -> None:
    add_supply(tmp_path, "BAT1", type="Battery", status=status)
    assert PowerProbe(tmp_path).state().on_mains is on_mains


def test_usb_charger_online_means_mains(tmp_path: Path) -> None:
    add_supply(tmp_path, "BAT0", type="Battery", status="Discharging")
    add_supply(tmp_path, "usb", type="USB", online="1")
    assert PowerProbe(tmp_path).state().on_mains


def test_a_peripheral_battery_says_nothing_about_the_machine(tmp_path: Path) -> None:
    add_supply(tmp_path, "hidpp_battery_0", type="Battery", scope="Device", status="Discharging")
    assert PowerProbe(tmp_path).state().on_mains


class Clock:
    """Seconds since the last interactive request, as the engine would report them."""

    def __init__(self) -> None:
        self.idle = 0.0

    def __call__(self) -> float:
        return self.idle


def test_policies(tmp_path: Path) -> None:
    clock = Clock()
    laptop(tmp_path, charging=False)
    checker = PolicyChecker(idle_for=clock, power=PowerProbe(tmp_path), default_idle_seconds=30)
    assert checker.blocking_reason(RunPolicy()) is None
    assert checker.blocking_reason(RunPolicy(when_charging=True)) == "waiting for a charger (battery BAT0 discharging)"
    assert checker.blocking_reason(RunPolicy(when_idle=True)) == "waiting for 30s without interactive requests"
    assert checker.blocking_reason(RunPolicy(when_idle=True, idle_seconds=5)) is not None
    clock.idle = 10
    assert checker.blocking_reason(RunPolicy(when_idle=True, idle_seconds=5)) is None
    both = RunPolicy(when_idle=True, idle_seconds=5, when_charging=True)
    assert checker.blocking_reason(both) == "waiting for a charger (battery BAT0 discharging)"
    laptop(tmp_path, charging=True)
    assert checker.blocking_reason(both) is None
    clock.idle = 1
    assert checker.blocking_reason(both) == "waiting for 5s without interactive requests"


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf"), 1e9])
def test_idle_seconds_out_of_range(seconds: float) -> None:
    with pytest.raises(InvalidArgumentError):
        RunPolicy(when_idle=True, idle_seconds=seconds)


def test_describe() -> None:
    assert RunPolicy().describe() == "always"
    assert RunPolicy(when_idle=True, idle_seconds=5, when_charging=True).describe() == "when idle 5s and when charging"
