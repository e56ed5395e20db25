"""The HTTP app: OpenAI-style routes onto the engine, each behind the one wrapper that does for HTTP
what the gRPC interceptors do: a request id (`x-request-id`), the bearer token where the gRPC
method it mirrors needs one, admission through the same drain as gRPC calls, the default deadline,
body checks (content type, size, JSON), errors mapped through `wafer.http.errors`, one JSON log
line and the request metrics.

Streams: the first chunk of a generation is awaited before the response starts, so a request that
fails at once (unknown model, bad parameter, full queue) gets its HTTP status; an error after that
arrives as an SSE `error` event. The generation itself runs in a task of its own, not in
Starlette's response task: a client that disconnects cancels that task once, and the engine's
cleanup (which waits for the model's thread to let go of the stream) runs to its end instead of
being cancelled again at each await by the response's cancel scope.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import grpc
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from wafer.domain import GenerateChunk, GenerateRequest, Priority, Timings, Usage
from wafer.engine import InferenceEngine
from wafer.errors import CancelledError, DeadlineExceededError, WaferError
from wafer.http import convert
from wafer.http.errors import (
    CLIENT_CLOSED_REQUEST,
    InvalidFieldError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    error_body,
    http_status_for,
    retry_headers,
    status_for,
)
from wafer.metrics import Metrics
from wafer.registry import ModelRegistry, allow_on_demand_eviction
from wafer.rpc.auth import check_bearer, is_admin_call, needs_token
from wafer.rpc.drain import DrainInterceptor
from wafer.rpc.interceptor import REQUEST_ID_KEY

log = structlog.get_logger("wafer.http")

# A body this much over the limit is still read (and thrown away) before the 413, so a client that
# sends its whole body before reading the answer sees the 413 instead of a reset connection.
DISCARD_LIMIT_BYTES: Final = 16 * 2**20
_MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True, slots=True)
class DoorOptions:
    """The settings the HTTP door uses, the same values the gRPC door applies (app.py builds them
    from Settings)."""

    default_deadline_seconds: float
    # Whether every call needs the token, or only the admin ones.
    auth_all_rpcs: bool
    max_message_bytes: int
    # Generate's max_tokens when a body sets none.
    default_max_new_tokens: int


@dataclass
class Door:
    """What the routes use: the engine and registry, and the state shared with the gRPC door."""

    engine: InferenceEngine
    registry: ModelRegistry
    options: DoorOptions
    drain: DrainInterceptor
    metrics: Metrics | None = None
    token: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    streams: set[asyncio.Task[None]] = field(default_factory=set)


class Exchange:
    """Bookkeeping of one HTTP request: its id, its outcome, its log line and metrics."""

    def __init__(self, method: str, request: Request, door: Door) -> None:
        self.method = method
        self.door = door
        given = request.headers.get(REQUEST_ID_KEY, "")
        self.request_id = given[:_MAX_REQUEST_ID_CHARS] if given else uuid.uuid4().hex
        self.model = ""
        self.user: str | None = None
        self.code = grpc.StatusCode.OK
        self.http_status = 200
        self.extra: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.deadline = asyncio.get_running_loop().time() + door.options.default_deadline_seconds
        self._held = contextlib.ExitStack()
        self._finished = False

    @property
    def headers(self) -> dict[str, str]:
        return {REQUEST_ID_KEY: self.request_id}

    def admit(self) -> None:
        """Count the request in flight for the drain (refused with UNAVAILABLE while draining)."""
        self._held.enter_context(self.door.drain.admitted())

    def saw(self, model: str, timings: Timings | None) -> None:
        self.model = model or self.model
        if timings is not None:
            self.extra.update(
                queue_ms=round(timings.queue_ms, 3),
                inference_ms=round(timings.inference_ms, 3),
                batch_size=timings.batch_size,
            )

    def failed(self, error: BaseException) -> dict[str, Any]:
        """Record `error` as the outcome and return the OpenAI error body for it. Call it while the
        error is being handled: an unexpected one is logged with its stack trace."""
        self.code, self.http_status = status_for(error), http_status_for(error)
        if isinstance(error, WaferError):
            message = error.message
        else:
            log.exception("unhandled error", request_id=self.request_id, method=self.method)
            message = f"internal error; request id {self.request_id}"
        return error_body(message, self.http_status, self.code, getattr(error, "param", None))

    def error_response(self, error: BaseException) -> JSONResponse:
        body = self.failed(error)
        return JSONResponse(body, status_code=self.http_status, headers={**self.headers, **retry_headers(error)})

    def cancelled(self) -> None:
        self.code, self.http_status = grpc.StatusCode.CANCELLED, CLIENT_CLOSED_REQUEST

    @contextlib.asynccontextmanager
    async def within_deadline(self) -> AsyncIterator[None]:
        timeout = asyncio.timeout_at(self.deadline)
        try:
            async with timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise
            seconds = self.door.options.default_deadline_seconds
            raise DeadlineExceededError(
                f"the request ran past the server's deadline of {seconds:g} s; raise default_deadline_seconds"
            ) from None

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._held.close()
        seconds = time.perf_counter() - self.started
        user = {"user": self.user[:_MAX_REQUEST_ID_CHARS]} if self.user else {}
        log.info(
            "http",
            request_id=self.request_id,
            method=self.method,
            model=self.model,
            status=self.code.name,
            http_status=self.http_status,
            duration_ms=round(seconds * 1000, 3),
            **user,
            **self.extra,
        )
        metrics = self.door.metrics
        if metrics is not None:
            queue_ms, inference_ms = self.extra.get("queue_ms"), self.extra.get("inference_ms")
            metrics.record_call(
                self.method,
                self.model,
                self.code.name,
                seconds,
                queue_seconds=queue_ms / 1000 if queue_ms is not None else None,
                inference_seconds=inference_ms / 1000 if inference_ms is not None else None,
            )


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, refusing another content type, more than `limit` bytes
    and anything that is not a JSON object."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaTypeError(
            f"send the body as JSON with 'Content-Type: application/json', not {content_type or 'no content type'!r}"
        )
    too_large = PayloadTooLargeError(f"the request body is larger than the {limit}-byte limit (max_message_bytes)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + DISCARD_LIMIT_BYTES:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit + DISCARD_LIMIT_BYTES:
            raise too_large
        if size <= limit:
            parts.append(part)
    if size > limit:
        raise too_large
    try:
        value = json.loads(b"".join(parts))
    except ValueError as exc:
        raise InvalidFieldError(f"the body is not valid JSON: {exc}", param=None) from None
    if not isinstance(value, dict):
        raise InvalidFieldError(f"the body must be a JSON object, not {type(value).__name__}", param=None)
    return value


Handler = Callable[[Door, Exchange, Request, dict[str, Any]], Coroutine[Any, Any, "dict[str, Any] | EventStream"]]


@dataclass(frozen=True)
class Endpoint:
    path: str
    verb: str
    # The gRPC method this one mirrors: its access policy is the one that applies.
    grpc_method: str
    handler: Handler

    @property
    def label(self) -> str:
        """The method in logs and metrics: the route's template, never the concrete path."""
        return f"{self.verb} {self.path}"


T = TypeVar("T")


async def _while_connected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work` unless the client disconnects first; then cancel it, as gRPC cancels the handler
    of a call whose client went away, so its queued work never runs."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise CancelledError("the client went away")
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body has been read: what is left to receive is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _endpoint(door: Door, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        call = Exchange(endpoint.label, request, door)
        streaming = False
        with structlog.contextvars.bound_contextvars(request_id=call.request_id, method=endpoint.label):
            try:
                if door.token is not None and needs_token(endpoint.grpc_method, all_rpcs=door.options.auth_all_rpcs):
                    check_bearer(request.headers.items(), door.token)
                elif door.token is not None:
                    # As over gRPC: only a call that carries the token may evict models (wafer.rpc.auth).
                    allow_on_demand_eviction(is_admin_call(request.headers.items(), door.token))
                call.admit()
                body = await read_json(request, door.options.max_message_bytes) if endpoint.verb == "POST" else {}
                async with call.within_deadline():
                    outcome = await _while_connected(request, endpoint.handler(door, call, request, body))
                if isinstance(outcome, EventStream):
                    streaming = True
                    return outcome
                return JSONResponse(outcome, headers=call.headers)
            except asyncio.CancelledError:
                call.cancelled()
                raise
            except Exception as error:
                return call.error_response(error)
            finally:
                if not streaming:
                    call.finish()

    return run


# -- Streams ---------------------------------------------------------------------------------------

_END: Final = object()


def _sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class EventStream(StreamingResponse):
    """Server-sent events of one generation, fed by a task that drives the engine's stream.

    The task owns the request's bookkeeping: it finishes the exchange (log line, metrics, drain
    admission) when the generation ends, however it ends."""

    def __init__(self, call: Exchange, events: AsyncGenerator[Mapping[str, Any], None]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._call = call
        self._pump = asyncio.get_running_loop().create_task(self._feed(events))
        call.door.streams.add(self._pump)
        self._pump.add_done_callback(call.door.streams.discard)
        super().__init__(
            self._frames(), media_type="text/event-stream", headers={**call.headers, "Cache-Control": "no-cache"}
        )

    async def _feed(self, events: AsyncGenerator[Mapping[str, Any], None]) -> None:
        call = self._call
        with structlog.contextvars.bound_contextvars(request_id=call.request_id, method=call.method):
            try:
                async for event in events:
                    self._queue.put_nowait(_sse(event))
                self._queue.put_nowait(_sse("[DONE]"))
            except asyncio.CancelledError:
                call.cancelled()
                raise
            except Exception as error:
                self._queue.put_nowait(_sse(call.failed(error)))
            finally:
                self._queue.put_nowait(_END)
                await events.aclose()
                call.finish()

    async def _frames(self) -> AsyncIterator[bytes]:
        while (frame := await self._queue.get()) is not _END:
            yield frame

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # The client left (or the response failed): stop generating for no one. One plain
            # cancellation; the task cleans up on its own.
            self._pump.cancel()


async def _events(
    call: Exchange,
    first: GenerateChunk,
    chunks: AsyncGenerator[GenerateChunk, None],
    *,
    chat: bool,
    include_usage: bool,
) -> AsyncGenerator[Mapping[str, Any], None]:
    """OpenAI's stream events for a generation whose first chunk is `first`."""
    head = convert.Completion(chat, _completion_id(call, chat=chat), int(time.time()), first.model)
    chunk: GenerateChunk | None = first
    opening = True
    async with contextlib.aclosing(chunks):
        while chunk is not None:
            if chunk.finish_reason is not None:
                call.saw(chunk.model, chunk.timings)
                if chunk.text or opening:
                    yield convert.completion_chunk(head, chunk.text, None, opening=opening, with_usage=include_usage)
                yield convert.completion_chunk(head, "", chunk.finish_reason, opening=False, with_usage=include_usage)
                if include_usage:
                    yield convert.usage_chunk(head, chunk.usage or Usage())
                return
            yield convert.completion_chunk(head, chunk.text, None, opening=opening, with_usage=include_usage)
            opening = False
            async with call.within_deadline():
                chunk = await anext(chunks, None)
    raise RuntimeError("the generation ended without a finish reason")


def _completion_id(call: Exchange, *, chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{call.request_id}"


# -- Routes ----------------------------------------------------------------------------------------


def _lane(request: Request, field: convert.PriorityName | None) -> Priority:
    return convert.priority(field, request.headers.get(convert.PRIORITY_HEADER))


async def embeddings(door: Door, call: Exchange, request: Request, body: dict[str, Any]) -> dict[str, Any]:
    parsed = convert.parse(convert.EmbeddingsBody, body)
    call.model, call.user = parsed.model, parsed.user
    result = await door.engine.embed(convert.embed_request(parsed, _lane(request, parsed.priority)))
    call.saw(result.model, result.timings)
    return convert.embeddings_response(result, parsed.encoding_format)


async def rerank(door: Door, call: Exchange, request: Request, body: dict[str, Any]) -> dict[str, Any]:
    parsed = convert.parse(convert.RerankBody, body)
    call.model = parsed.model
    result = await door.engine.rerank(convert.rerank_request(parsed, _lane(request, parsed.priority)))
    call.saw(result.model, result.timings)
    return convert.rerank_response(result, call.request_id)


async def _generate(
    door: Door, call: Exchange, generate: GenerateRequest, *, chat: bool, stream: bool, include_usage: bool
) -> dict[str, Any] | EventStream:
    call.model = generate.model
    chunks = door.engine.generate(generate)
    if stream:
        try:
            first = await anext(chunks)
        except BaseException:
            await chunks.aclose()
            raise
        call.model = first.model
        return EventStream(call, _events(call, first, chunks, chat=chat, include_usage=include_usage))
    texts: list[str] = []
    last: GenerateChunk | None = None
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            texts.append(chunk.text)
            last = chunk
    if last is None or last.finish_reason is None:
        raise RuntimeError("the generation ended without a finish reason")
    call.saw(last.model, last.timings)
    head = convert.Completion(chat, _completion_id(call, chat=chat), int(time.time()), last.model)
    return convert.completion(head, "".join(texts), last.finish_reason, last.usage or Usage())


async def chat_completions(
    door: Door, call: Exchange, request: Request, body: dict[str, Any]
) -> dict[str, Any] | EventStream:
    parsed = convert.parse(convert.ChatBody, body)
    call.user = parsed.user
    generate = convert.chat_request(
        parsed, _lane(request, parsed.priority), default_max_tokens=door.options.default_max_new_tokens
    )
    include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
    return await _generate(door, call, generate, chat=True, stream=parsed.stream, include_usage=include_usage)


async def completions(
    door: Door, call: Exchange, request: Request, body: dict[str, Any]
) -> dict[str, Any] | EventStream:
    parsed = convert.parse(convert.CompletionBody, body)
    call.user = parsed.user
    generate = convert.completion_request(
        parsed, _lane(request, parsed.priority), default_max_tokens=door.options.default_max_new_tokens
    )
    include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
    return await _generate(door, call, generate, chat=False, stream=parsed.stream, include_usage=include_usage)


async def list_models(door: Door, call: Exchange, request: Request, body: dict[str, Any]) -> dict[str, Any]:
    return convert.models_response(door.registry.statuses(), door.created)


async def get_model(door: Door, call: Exchange, request: Request, body: dict[str, Any]) -> dict[str, Any]:
    name = str(request.path_params["model"])
    call.model = name
    return convert.model_card(door.registry.status(name), door.created)


ENDPOINTS: Final = (
    Endpoint("/v1/embeddings", "POST", "/wafer.v1.Inference/Embed", embeddings),
    Endpoint("/v1/rerank", "POST", "/wafer.v1.Inference/Rerank", rerank),
    Endpoint("/v1/chat/completions", "POST", "/wafer.v1.Inference/Generate", chat_completions),
    Endpoint("/v1/completions", "POST", "/wafer.v1.Inference/Generate", completions),
    Endpoint("/v1/models", "GET", "/wafer.v1.Models/ListModels", list_models),
    Endpoint("/v1/models/{model:path}", "GET", "/wafer.v1.Models/GetModel", get_model),
)


async def _health(door: Door) -> Response:
    """For load balancers, like gRPC health: open, unlogged, 503 until the default models are
    ready and from the start of a drain."""
    serving = door.registry.defaults_ready() and not door.drain.draining
    return JSONResponse({"status": "serving" if serving else "not_serving"}, status_code=200 if serving else 503)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong verb) in OpenAI's error shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = grpc.StatusCode.NOT_FOUND if status == 404 else grpc.StatusCode.INVALID_ARGUMENT
    message = f"{request.method} {request.url.path}: {exc.detail if isinstance(exc, HTTPException) else 'error'}"
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    return JSONResponse(error_body(message, status, code), status_code=status, headers=headers)


def create_app(door: Door) -> Starlette:
    routes = [Route(e.path, _endpoint(door, e), methods=[e.verb]) for e in ENDPOINTS]

    async def health(request: Request) -> Response:
        return await _health(door)

    routes.append(Route("/health", health, methods=["GET"]))
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
