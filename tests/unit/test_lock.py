"""The locks pin what `make install` installs: they must agree with `pyproject.toml`,
`requirements-models.in` and `requirements-build.in`, and pin every package exactly, with hashes."""

from __future__ import annotations

import importlib.util
import re
import shutil
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

HINT = "run `make lock` (tools/lock.py) and commit the locks"


def load_lock_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wafer_lock_tool", ROOT / "tools" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock_tool = load_lock_tool()


def pinned(lock: Path) -> list[tuple[Requirement, list[str]]]:
    """Each entry of a lock: the requirement (`name==version ; marker`) and its hashes."""
    text = re.sub(r"\\\n", " ", lock.read_text())
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        entries.append((Requirement(re.sub(r"\s*--hash=\S+", "", line)), hashes))
    return entries


def versions_here(locks: list[Path]) -> dict[str, str]:
    """The version each lock pins for this Python and platform."""
    chosen: dict[str, str] = {}
    for lock in locks:
        for requirement, _ in pinned(lock):
            if requirement.marker is None or requirement.marker.evaluate():
                (specifier,) = requirement.specifier
                chosen[canonicalize_name(requirement.name)] = specifier.version
    return chosen


@pytest.mark.parametrize("lock", [lock_tool.LOCK, lock_tool.BUILD_LOCK], ids=lambda p: p.name)
def test_lock_was_made_from_the_current_inputs(lock: Path) -> None:
    assert lock_tool.read_digest(lock) == lock_tool.inputs_digest(), f"{lock.name} is stale; {HINT}"


@pytest.mark.parametrize("lock", [lock_tool.LOCK, lock_tool.BUILD_LOCK], ids=lambda p: p.name)
def test_every_entry_is_an_exact_pin_with_hashes(lock: Path) -> None:
    entries = pinned(lock)
    assert entries
    for requirement, hashes in entries:
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", requirement
        assert hashes, f"{requirement} has no sha256 hash"


def test_every_declared_requirement_is_pinned_within_its_range() -> None:
    project = tomllib.loads(lock_tool.PYPROJECT.read_text())
    extras = project["project"]["optional-dependencies"]
    declared = [
        *project["project"]["dependencies"],
        *(requirement for name in lock_tool.EXTRAS for requirement in extras[name]),
        *project["build-system"]["requires"],
        *lock_tool.requirement_lines(lock_tool.BUILD_IN),
        *lock_tool.requirement_lines(lock_tool.MODELS_IN),
    ]
    versions = versions_here([lock_tool.LOCK, lock_tool.BUILD_LOCK])
    for text in declared:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = versions.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is declared but not locked; {HINT}"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{requirement.name} is locked at {version}, outside {requirement.specifier}; {HINT}"
        )


def test_model_packages_are_locked_without_their_dependencies() -> None:
    # Their declared dependencies (sentence-transformers, torch, CUDA) are gigabytes Wafer never uses.
    versions = versions_here([lock_tool.LOCK])
    for heavy in ("torch", "sentence-transformers", "transformers"):
        assert heavy not in versions


def test_the_digest_follows_every_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = lock_tool.inputs_digest()
    for attribute in ("PYPROJECT", "MODELS_IN", "BUILD_IN"):
        copy = tmp_path / Path(getattr(lock_tool, attribute)).name
        shutil.copy(getattr(lock_tool, attribute), copy)
        monkeypatch.setattr(lock_tool, attribute, copy)
    assert lock_tool.inputs_digest() == before

    text = lock_tool.PYPROJECT.read_text()
    lock_tool.PYPROJECT.write_text(text.replace('"rich>=13",', '"rich>=13",\n    "attrs>=23",'))
    assert lock_tool.inputs_digest() != before
    lock_tool.PYPROJECT.write_text(text)

    lock_tool.MODELS_IN.write_text(lock_tool.MODELS_IN.read_text() + "another-model-package==1.0\n")
    assert lock_tool.inputs_digest() != before
