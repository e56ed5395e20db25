"""Wafer's domain errors.

Everything below the RPC layer raises these; the doors map them to statuses by class
(`wafer.rpc.status` for gRPC, `wafer.http.errors` for HTTP) and never match on message text.
Messages are written for the person who reads them: what went wrong and what to do.
"""

from __future__ import annotations


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
