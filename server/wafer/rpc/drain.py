"""Graceful shutdown: count the calls in flight, and once draining refuse new ones with UNAVAILABLE
while the accepted ones finish.

grpc's own `server.stop(grace)` also lets running calls finish, but it answers new calls CANCELLED
(seen here), which clients do not retry; UNAVAILABLE tells them to go to another replica or come
back. Health checks and reflection pass through untouched: health must keep answering NOT_SERVING
during the drain so load balancers see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from wafer.errors import UnavailableError
from wafer.rpc.policy import policy_for


class DrainInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, timeout_seconds: float) -> bool:
        """Refuse new calls from now on and wait for the running ones; False if some were still
        running when the timeout passed."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_seconds)
        except TimeoutError:
            return False
        return True

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Count one call in flight while the block runs; UnavailableError once draining. The HTTP
        door admits its requests here too, so one drain covers both doors."""
        if self._draining:
            raise UnavailableError("the server is shutting down; retry on another replica or after it restarts")
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or not policy_for(handler_call_details.method).drained:
            return handler
        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary

            async def admit_unary(request: Any, context: Any) -> Any:
                with self.admitted():
                    return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                admit_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            stream: Any = handler.unary_stream

            async def admit_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                with self.admitted():
                    async for response in stream(request, context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                admit_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
