"""The one place where RPCs meet errors and logs.

Every call gets a request id (the caller's `x-request-id`, or a new one), returned in the
response's initial metadata and bound to the log context. WaferErrors become their status from
`wafer.rpc.status`' table; anything else becomes INTERNAL with the request id and is logged with its
stack trace, which never reaches the client. One JSON line per call records method, model,
status and durations; the servicers `report` the model that answered and where its time went from
the domain result, so nothing is read back out of response messages but the model's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc
import structlog

from wafer.domain import Timings
from wafer.errors import DeadlineExceededError, WaferError
from wafer.metrics import Metrics
from wafer.rpc.policy import policy_for
from wafer.rpc.status import status_for

log = structlog.get_logger("wafer.rpc")

REQUEST_ID_KEY = "x-request-id"
RETRY_AFTER_KEY = "retry-after-ms"


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)[:128]
    return uuid.uuid4().hex


class _Call:
    """Bookkeeping of one RPC: its context, its outcome, its log line."""

    def __init__(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        metrics: Metrics | None = None,
    ) -> None:
        self.method = method
        self.metrics = metrics
        self.context = context
        self.request_id = _request_id(context)
        self.model: str = getattr(request, "model", "") or getattr(request, "name", "") or ""
        self.code = grpc.StatusCode.OK
        self.extra: dict[str, Any] = {}
        self.started = time.perf_counter()

    async def begin(self) -> None:
        # Sent both ways: headers reach clients early, trailers also come with errors.
        await self.context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),))
        self.context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))

    def saw(self, response: Any) -> None:
        self.model = getattr(response, "model", "") or self.model

    def observe(self, model: str, timings: Timings | None) -> None:
        self.model = model or self.model
        if timings is not None:
            self.extra.update(
                queue_ms=round(timings.queue_ms, 3),
                inference_ms=round(timings.inference_ms, 3),
                batch_size=timings.batch_size,
            )

    async def settle(self, error: BaseException) -> None:
        """Record how a call that raised ended: aborts and cancellations propagate as they are,
        everything else becomes its status."""
        if isinstance(error, grpc.aio.AbortError):
            self.code = self.context.code() or grpc.StatusCode.UNKNOWN
            raise error
        if _is_cancellation(error):
            self.code = grpc.StatusCode.CANCELLED
            raise error
        await self.fail(error)

    async def fail(self, error: BaseException) -> None:
        self.code = status_for(error)
        if isinstance(error, WaferError):
            message = error.message
            trailing: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, self.request_id),)
            if error.retry_after_seconds is not None:
                trailing += ((RETRY_AFTER_KEY, str(round(error.retry_after_seconds * 1000))),)
            await self.context.abort(self.code, message, trailing_metadata=trailing)
        log.exception("unhandled error", request_id=self.request_id, method=self.method)
        await self.context.abort(
            self.code,
            f"internal error; request id {self.request_id}",
            trailing_metadata=((REQUEST_ID_KEY, self.request_id),),
        )

    def finish(self) -> None:
        seconds = time.perf_counter() - self.started
        quiet = not policy_for(self.method).logged
        getattr(log, "debug" if quiet else "info")(
            "rpc",
            request_id=self.request_id,
            method=self.method,
            model=self.model,
            status=self.code.name,
            duration_ms=round(seconds * 1000, 3),
            **self.extra,
        )
        # Health and reflection stay out too: a health Watch lasts as long as its client, and
        # polls would swamp the latency histograms of the calls that matter.
        if self.metrics is not None and not quiet:
            queue_ms, inference_ms = self.extra.get("queue_ms"), self.extra.get("inference_ms")
            self.metrics.record_call(
                self.method,
                self.model,
                self.code.name,
                seconds,
                queue_seconds=queue_ms / 1000 if queue_ms is not None else None,
                inference_seconds=inference_ms / 1000 if inference_ms is not None else None,
            )


# The call the running handler serves, for `report`.
_current: ContextVar[_Call | None] = ContextVar("wafer_rpc_call", default=None)


def report(model: str, timings: Timings | None) -> None:
    """Tell the call being served which model answered and where its time went (for its log line
    and the metrics), from the domain result. Servicers call it; outside a call it does nothing."""
    call = _current.get()
    if call is not None:
        call.observe(model, timings)


@contextlib.asynccontextmanager
async def _deadline(context: grpc.aio.ServicerContext[Any, Any], default_seconds: float | None) -> AsyncIterator[None]:
    """Give a call whose client set no deadline the server's default, so nothing runs forever.
    A client's own deadline is enforced by gRPC itself (the call is cancelled)."""
    budget = default_seconds if context.time_remaining() is None else None
    timeout = asyncio.timeout(budget)
    try:
        async with timeout:
            yield
    except TimeoutError:
        if not timeout.expired():
            raise
        raise DeadlineExceededError(
            f"the call ran past the server's default deadline of {default_seconds:g} s; "
            "set a deadline on the call, or raise default_deadline_seconds"
        ) from None


def _enter(call: _Call) -> None:
    """Make `call` the one this task serves, and bind its request id and method to the log context.
    Never reset: each RPC runs in its own task, whose context ends with it (a stream's generator
    may even be finalized from another context, where resetting would raise), and skipping the
    reset spares every call a context manager's set-up and tear-down on the event loop."""
    _current.set(call)
    structlog.contextvars.bind_contextvars(request_id=call.request_id, method=call.method)


UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


def _wrap_unary(
    method: str, behavior: UnaryBehavior, metrics: Metrics | None = None, default_deadline: float | None = None
) -> UnaryBehavior:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = _Call(method, request, context, metrics)
        _enter(call)
        try:
            await call.begin()
            async with _deadline(context, default_deadline):
                response = await behavior(request, context)
            call.saw(response)
            return response
        except BaseException as error:
            await call.settle(error)
        finally:
            call.finish()

    return handle


def _wrap_stream(
    method: str, behavior: StreamBehavior, metrics: Metrics | None = None, default_deadline: float | None = None
) -> StreamBehavior:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        call = _Call(method, request, context, metrics)
        _enter(call)
        try:
            await call.begin()
            messages = 0
            async with _deadline(context, default_deadline):
                async for response in behavior(request, context):
                    messages += 1
                    call.saw(response)
                    yield response
            call.extra["messages"] = messages
        except BaseException as error:
            await call.settle(error)
        finally:
            call.finish()

    return handle


def _is_cancellation(error: BaseException) -> bool:
    return isinstance(error, asyncio.CancelledError | GeneratorExit)


class RequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, metrics: Metrics | None = None, default_deadline_seconds: float | None = None) -> None:
        self._metrics = metrics
        self._default_deadline = default_deadline_seconds

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        deadline = self._default_deadline if policy_for(method).default_deadline else None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary, self._metrics, deadline),  # type: ignore[arg-type]
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            # A stream handler is either an async generator (ours) or a coroutine that writes with
            # context.write() (grpc's health Watch); only the first can be iterated.
            behavior: Any = handler.unary_stream
            wrapped: Any = (
                _wrap_stream(method, behavior, self._metrics, deadline)
                if inspect.isasyncgenfunction(behavior)
                else _wrap_unary(method, behavior, self._metrics, deadline)
            )
            return grpc.unary_stream_rpc_method_handler(
                wrapped,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client and bidirectional streams: reflection's, which handles itself
