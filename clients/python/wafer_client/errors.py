"""The exceptions the Wafer client raises.

Every failed RPC surfaces as a :class:`WaferError` subclass chosen by its gRPC status code, never as a
raw ``grpc.RpcError``; catch ``WaferError`` to handle them all. The tree::

    WaferError                      .code .details .request_id
    ├── NotFoundError               unknown model, collection or job
    ├── InvalidArgumentError        empty or malformed request, input too long, bad parameter
    ├── FailedPreconditionError     the model cannot do that task, or failed to load
    ├── ResourceExhaustedError      queue full or memory budget spent (.retry_after)
    ├── UnavailableError            server draining, model unloading, or unreachable
    ├── DeadlineExceededError       the call's deadline passed
    ├── CancelledError              the call was cancelled
    ├── UnauthenticatedError        missing credentials
    ├── PermissionDeniedError       credentials that do not allow the call
    ├── UnimplementedError          the server does not offer that RPC (older server, no health service)
    └── InternalError               a server-side bug (logged there under .request_id)

Codes outside that table (ALREADY_EXISTS, ABORTED, OUT_OF_RANGE) raise ``WaferError`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

__all__ = [
    "ERROR_BY_CODE",
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "WaferError",
    "from_rpc_error",
]

REQUEST_ID_KEY = "x-request-id"
RETRY_AFTER_KEY = "retry-after"
RETRY_AFTER_MS_KEY = "retry-after-ms"


class WaferError(Exception):
    """A failed call. ``code`` is the gRPC status, ``details`` the server's message, ``request_id`` the
    id the server logged the call under (quote it in bug reports) when it sent one, and ``metadata``
    the call's trailing and initial metadata as lower-cased (key, value) pairs."""

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        request_id: str | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(details)
        self.code = code if code is not None else _default_code(type(self))
        self.details = details
        self.request_id = request_id
        self.metadata = metadata

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.details}"
        return f"{text} (request id {self.request_id})" if self.request_id else text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, details={self.details!r})"


class NotFoundError(WaferError):
    """An unknown model, collection or job."""


class InvalidArgumentError(WaferError):
    """An empty or malformed request, too many inputs, an input too long with truncate off, a bad
    parameter."""


class FailedPreconditionError(WaferError):
    """The model cannot do that task, or failed to load."""


class ResourceExhaustedError(WaferError):
    """A queue is full or a memory budget is spent. ``retry_after`` is the server's hint in seconds, when
    it gave one; the client already retried before raising this."""

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        request_id: str | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(details, code=code, request_id=request_id, metadata=metadata)
        self.retry_after = retry_after_hint(metadata)


class UnavailableError(WaferError):
    """The server is draining, the model is being unloaded, or the server cannot be reached."""


class DeadlineExceededError(WaferError):
    """The call's deadline passed."""


class CancelledError(WaferError):
    """The call was cancelled (by this client or the server). Unrelated to ``asyncio.CancelledError``."""


class UnauthenticatedError(WaferError):
    """Missing or unreadable credentials."""


class PermissionDeniedError(WaferError):
    """Credentials that do not allow this call."""


class UnimplementedError(WaferError):
    """The server does not implement the RPC."""


class InternalError(WaferError):
    """A server-side failure; the server logged it under ``request_id``."""


# The one table: a status code's exception class. Codes missing here raise WaferError itself.
ERROR_BY_CODE: dict[grpc.StatusCode, type[WaferError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def _default_code(cls: type[WaferError]) -> grpc.StatusCode:
    # Lets callers (and tests) raise e.g. NotFoundError("...") without repeating the table.
    for klass in cls.__mro__:
        for code, error in ERROR_BY_CODE.items():
            if error is klass:
                return code
    return grpc.StatusCode.UNKNOWN


def _pairs(metadata: Any) -> tuple[tuple[str, str], ...]:
    # Sync errors give tuples of _Metadatum, aio errors a Metadata mapping; both iterate as (key, value).
    if not metadata:
        return ()
    items: Iterable[Any] = metadata
    pairs = []
    for key, value in items:
        # Binary (-bin) values are bytes; nothing here reads them, so keep them decodable for display.
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        pairs.append((str(key).lower(), text))
    return tuple(pairs)


def _lookup(metadata: tuple[tuple[str, str], ...], key: str) -> str | None:
    for name, value in metadata:
        if name == key:
            return value
    return None


def retry_after_hint(metadata: tuple[tuple[str, str], ...]) -> float | None:
    """The server's retry hint in seconds: ``retry-after-ms`` wins over ``retry-after``."""
    for key, scale in ((RETRY_AFTER_MS_KEY, 1e-3), (RETRY_AFTER_KEY, 1.0)):
        raw = _lookup(metadata, key)
        if raw is None:
            continue
        try:
            seconds = float(raw.strip()) * scale
        except ValueError:
            # An HTTP-date or garbage: ignore the hint rather than fail the call over it.
            continue
        if seconds >= 0:
            return seconds
    return None


def _call_value(err: grpc.RpcError, name: str) -> Any:
    # A bare RpcError (raised by some grpc paths) lacks the Call methods; treat those as UNKNOWN.
    method = getattr(err, name, None)
    if not callable(method):
        return None
    try:
        return method()
    except Exception:
        return None


def from_rpc_error(err: grpc.RpcError) -> WaferError:
    """The :class:`WaferError` for a gRPC error, with its details and request id."""
    code = _call_value(err, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = _call_value(err, "details") or code.name.lower().replace("_", " ")
    metadata = _pairs(_call_value(err, "trailing_metadata")) + _pairs(_call_value(err, "initial_metadata"))
    cls = ERROR_BY_CODE.get(code, WaferError)
    return cls(str(details), code=code, request_id=_lookup(metadata, REQUEST_ID_KEY), metadata=metadata)
