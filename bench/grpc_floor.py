"""The floor under any Python gRPC server: CPU per call of a grpc.aio server that does nothing.

    .venv/bin/python -m bench.grpc_floor [--concurrency 16] [--seconds 5] [--payload 200]

A grpc.aio server in its own process answers each unary call with its request (a generic handler,
no proto, no interceptor, no logging); one client process keeps `--concurrency` calls in flight
over one channel, as bench.throughput's 16 single-text clients do. Prints calls/s and the CPU each
side spent per call. Whatever Wafer's Embed costs per request beyond these numbers is its own;
below them no Python gRPC server goes on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import grpc

METHOD = "/floor.Echo/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve() -> None:
    server = grpc.aio.server()
    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def load(port: int, concurrency: int, seconds: float, payload: int) -> int:
    """Calls made by `concurrency` clients in `seconds`."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        body = b"x" * payload
        deadline = time.perf_counter() + seconds
        done = 0

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await call(body)
                done += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return done


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--payload", type=int, default=200, help="request (and response) bytes")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
        return
    server = subprocess.Popen([sys.executable, "-m", "bench.grpc_floor", "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        asyncio.run(load(port, args.concurrency, 1.0, args.payload))  # warm up
        server_before, client_before = process_cpu_seconds(server.pid), resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        calls = asyncio.run(load(port, args.concurrency, args.seconds, args.payload))
        elapsed = time.perf_counter() - started
        server_cpu = process_cpu_seconds(server.pid) - server_before
        client_after = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu = (client_after.ru_utime + client_after.ru_stime) - (client_before.ru_utime + client_before.ru_stime)
    finally:
        server.terminate()
        server.wait(10)
    print(
        f"grpc.aio {grpc.__version__}, {args.concurrency} clients, {args.payload}-byte unary echo: "
        f"{calls / elapsed:.0f} calls/s; CPU per call: server {1000 * server_cpu / calls:.3f} ms, "
        f"client {1000 * client_cpu / calls:.3f} ms; load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
