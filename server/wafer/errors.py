"""Wafer's domain errors and the one table that maps them to gRPC status codes.

Everything below the RPC layer raises these; the RPC layer never matches on message text.
Messages are written for the person who reads them: what went wrong and what to do.
"""

from __future__ import annotations

import grpc


class WaferError(Exception):
    """Base of every error Wafer reports to a caller."""

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_seconds = retry_after_seconds


class NotFoundError(WaferError):
    """An unknown model, collection or job."""


class InvalidArgumentError(WaferError):
    """An empty or malformed request, too many inputs, an input too long, a bad parameter."""


class FailedPreconditionError(WaferError):
    """The model cannot do that task, or cannot be loaded (weights missing, load failed)."""


class ResourceExhaustedError(WaferError):
    """A queue is full or a memory budget is spent; the caller may retry later."""


class UnavailableError(WaferError):
    """The server is draining, or the model is being unloaded."""


class DeadlineExceededError(WaferError):
    """The caller's deadline passed before the work ran."""


class CancelledError(WaferError):
    """The caller went away."""


class UnauthenticatedError(WaferError):
    """Missing credentials."""


class PermissionDeniedError(WaferError):
    """Credentials that do not allow this call."""


STATUS_BY_ERROR: dict[type[WaferError], grpc.StatusCode] = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    CancelledError: grpc.StatusCode.CANCELLED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for an exception; anything that is not a WaferError is INTERNAL."""
    for cls in type(error).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
