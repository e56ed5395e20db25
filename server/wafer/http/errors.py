"""Wafer's errors as HTTP statuses and OpenAI's error body.

The gRPC table (`wafer.rpc.status.STATUS_BY_ERROR`) says what an error is; this one says which HTTP
status carries it. Both are looked up by class, never by message. Two refusals exist only over
HTTP (a body too large, a body that is not JSON by its content type); they are invalid arguments
to gRPC's eye, so logs and metrics count them as INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from typing import Any, Final

import grpc

from wafer.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    WaferError,
)
from wafer.rpc.status import status_for


class InvalidFieldError(InvalidArgumentError):
    """A bad request field; OpenAI's error body names it (`param`)."""

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class PayloadTooLargeError(InvalidArgumentError):
    """A request body over the size limit."""


class UnsupportedMediaTypeError(InvalidArgumentError):
    """A request body that is not declared as JSON."""


# 499: nginx's "client closed request"; the client is gone and will never read it, but the log
# and the metrics say what happened.
CLIENT_CLOSED_REQUEST: Final = 499

HTTP_STATUS_BY_ERROR: Final[dict[type[WaferError], int]] = {
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    NotFoundError: 404,
    InvalidArgumentError: 400,
    # A model that cannot do the task, or cannot load: the request names the wrong thing, as OpenAI
    # answers a chat request to an embedding model.
    FailedPreconditionError: 400,
    ResourceExhaustedError: 429,
    UnavailableError: 503,
    DeadlineExceededError: 504,
    CancelledError: CLIENT_CLOSED_REQUEST,
    UnauthenticatedError: 401,
    PermissionDeniedError: 403,
}

# OpenAI's `error.type` for each status its clients know.
_TYPE_BY_HTTP_STATUS: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def http_status_for(error: BaseException) -> int:
    """The HTTP status for an exception; anything that is not a WaferError is 500."""
    for cls in type(error).__mro__:
        status = HTTP_STATUS_BY_ERROR.get(cls)
        if status is not None:
            return status
    return 500


def error_body(message: str, status: int, code: grpc.StatusCode, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape. `code` is Wafer's status name (the gRPC one), lower case, so a
    client sees the same vocabulary over both doors."""
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_HTTP_STATUS.get(status, "server_error"),
            "param": param,
            "code": code.name.lower(),
        }
    }


def retry_headers(error: BaseException) -> dict[str, str]:
    """`Retry-After` (whole seconds, rounded up, as HTTP wants) and `retry-after-ms` (which the
    openai clients read first) from the retry hint a WaferError carries."""
    seconds = error.retry_after_seconds if isinstance(error, WaferError) else None
    if seconds is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(round(seconds * 1000))}


__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "HTTP_STATUS_BY_ERROR",
    "InvalidFieldError",
    "PayloadTooLargeError",
    "UnsupportedMediaTypeError",
    "error_body",
    "http_status_for",
    "retry_headers",
    "status_for",
]
