"""Shared benchmark helpers: the corpus, the machine description, percentiles, RESULTS.md sections."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from wafer.app import engine_limits
from wafer.backends import available_backends
from wafer.config import Settings
from wafer.engine import InferenceEngine
from wafer.registry import ModelRegistry
from wafer.scheduler import ComputeGate
from wafer.sources import SourceResolver
from wafer.specs import Catalog

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
SHARED_SMS = ROOT.parent / "shared" / "data" / "sms_spam_collection.jsonl"

_FALLBACK = [
    "Are we still on for lunch tomorrow?",
    "Running late, be there in 10 minutes",
    "Your parcel has been delivered to the front door.",
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May. Text FA to 87121",
    "Can you pick up milk and bread on the way home?",
    "The meeting moved to 3pm on Thursday in room B.",
    "Happy birthday! Hope you have a wonderful day.",
    "Call me when you get this, it is about the car.",
]


def in_process_engine(
    threads: int | None = None, gate: ComputeGate | None = None, models: Path | None = None
) -> InferenceEngine:
    """The server's engine and registry over the repository's models.yaml (or `models`), in this
    process, with no gRPC: the baseline the served numbers are compared with."""
    catalog = Catalog.from_yaml(models or ROOT / "models.yaml")
    settings = Settings(data_dir=Path(tempfile.mkdtemp()))
    if threads is not None:
        settings = settings.model_copy(update={"threads": threads})
    registry = ModelRegistry(
        catalog,
        SourceResolver(catalog.base_dir, settings.hub_cache_dir),
        available_backends(),
        threads=settings.threads,
        drain_timeout_seconds=settings.unload_drain_timeout_seconds,
        gate=gate,
    )
    return InferenceEngine(registry, engine_limits(settings))


@contextlib.contextmanager
def served(
    threads: int | None = None,
    *,
    cache: bool = False,
    data_dir: Path | None = None,
    settings: dict[str, str] | None = None,
    models: Path | None = None,
    cores: str | None = None,
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A real `wafer serve` on a free port over the repository's models.yaml, in its own process,
    offline, with a fresh data folder unless given one and extra `WAFER_*` settings: yields its
    address and process once it is listening.

    The embedding cache is off unless asked for: benchmarks that send the same texts again would
    otherwise measure cache hits, not the model. `models`: another models.yaml; `cores`: a CPU list
    (`taskset -c`) the server is pinned to."""
    data_dir = data_dir or Path(tempfile.mkdtemp())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WAFER_EMBEDDING_CACHE": "true" if cache else "false"}
    env.update(settings or {})
    command = [sys.executable, "-m", "wafer", "serve", "--address", "127.0.0.1:0", "--data-dir", str(data_dir)]
    command += ["--models", str(models or ROOT / "models.yaml")]
    if cores is not None:
        command = ["taskset", "-c", cores, *command]
    if threads is not None:
        command += ["--threads", str(threads)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        yield _wait_listening(server), server
    finally:
        server.terminate()
        server.wait(30)


def _wait_listening(server: subprocess.Popen[str]) -> str:
    """The address from the server's "server listening" log line; then keep draining its log so a
    full pipe never blocks it."""
    assert server.stderr is not None
    stream = server.stderr
    for line in stream:
        if '"server listening"' in line:
            threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()
            return str(json.loads(line)["address"])
    raise RuntimeError("server exited before listening")


def load_corpus(path: Path | None) -> tuple[list[str], str]:
    """Texts to benchmark on and a description of where they came from."""
    path = path or (SHARED_SMS if SHARED_SMS.exists() else None)
    if path is None:
        texts = [f"{t} ({i})" for i in range(700) for t in _FALLBACK][:5000]
        return texts, f"built-in synthetic SMS-like texts ({len(texts)})"
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    return texts, f"{path.name} ({len(texts)} messages)"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Python {platform.python_version()}, {platform.system()}"


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def header(title: str, corpus: str) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    script = Path(sys.argv[0])
    runner = f"-m bench.{script.stem}" if script.parent.name == "bench" else str(script)
    command = " ".join([".venv/bin/python", runner, *sys.argv[1:]])
    return (
        f"## {title}\n\n"
        f"- date: {now}; revision: {git_revision()}\n"
        f"- machine: {machine()}\n"
        f"- command: `{command}`\n"
        f"- corpus: {corpus}\n"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers in RESULTS.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text, encoding="utf-8")
