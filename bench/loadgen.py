"""A load generator in its own process: N concurrent clients embedding texts over gRPC.

Run by bench/throughput.py so the clients' CPU is not the server's Python process. Each client
takes the next `batch` texts from a shared list and sends them in one Embed call, until the list
is used up (or, with --seconds, until the time is up: the texts are reused round-robin). Prints
one JSON object: texts/s, requests/s, latency percentiles, refusals (RESOURCE_EXHAUSTED).

    python -m bench.loadgen --address 127.0.0.1:50051 --texts texts.json --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import cast

import grpc

from bench.common import percentile
from wafer_client import AsyncWaferClient, WaferError
from wafer_client.types import Priority


async def run(
    address: str,
    texts: list[str],
    *,
    concurrency: int,
    batch: int,
    priority: Priority,
    seconds: float | None,
    gap_ms: float,
) -> dict[str, float]:
    latencies: list[float] = []
    refused = 0
    sent_texts = 0
    # The shared cursor: each request takes the next slice.
    if seconds is None:
        slices = iter([texts[i : i + batch] for i in range(0, len(texts), batch)])
    else:
        slices = (texts[i % len(texts) : i % len(texts) + batch] or texts[:batch] for i in itertools.count(0, batch))
    deadline = None if seconds is None else time.perf_counter() + seconds
    async with AsyncWaferClient(address, timeout=600, retries=0) as client:
        await client.embed("warm up", model="minilm", truncate=True)

        async def one_client() -> None:
            nonlocal refused, sent_texts
            for chunk in slices:
                if deadline is not None and time.perf_counter() > deadline:
                    return
                started = time.perf_counter()
                try:
                    await client.embed(chunk, model="minilm", truncate=True, priority=priority)
                except WaferError as error:
                    if error.code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    refused += 1
                    await asyncio.sleep(0.05)
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                sent_texts += len(chunk)
                if gap_ms:
                    await asyncio.sleep(gap_ms / 1000)

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "concurrency": concurrency,
        "batch": batch,
        "texts_per_s": sent_texts / elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "requests": len(latencies),
        "refused": refused,
        "seconds": elapsed,
        # Cores this client process kept busy: it shares the machine with the server.
        "client_cores": cpu / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--texts", type=Path, required=True, help="a JSON list of strings")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="texts per request")
    parser.add_argument("--priority", choices=["interactive", "batch"], default="interactive")
    parser.add_argument("--seconds", type=float, help="run this long, reusing texts (default: each text once)")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="pause between one client's requests")
    args = parser.parse_args()
    texts = json.loads(args.texts.read_text(encoding="utf-8"))
    result = asyncio.run(
        run(
            args.address,
            texts,
            concurrency=args.concurrency,
            batch=args.batch,
            priority=cast(Priority, args.priority),  # argparse's choices hold it to the two
            seconds=args.seconds,
            gap_ms=args.gap_ms,
        )
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
