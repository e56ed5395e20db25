from __future__ import annotations

import grpc
import pytest

from wafer import errors
from wafer.backends.base import InputTooLongError
from wafer.rpc.status import STATUS_BY_ERROR, status_for


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (errors.InvalidArgumentError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (InputTooLongError(0, 10, 5, "m"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.FailedPreconditionError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ResourceExhaustedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.UnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceededError("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.CancelledError("x"), grpc.StatusCode.CANCELLED),
        (errors.UnauthenticatedError("x"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDeniedError("x"), grpc.StatusCode.PERMISSION_DENIED),
        (ValueError("x"), grpc.StatusCode.INTERNAL),
        (KeyError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_one_table_maps_every_error(error: BaseException, code: grpc.StatusCode) -> None:
    assert status_for(error) is code


def test_every_wafer_error_has_a_row() -> None:
    subclasses = set(errors.WaferError.__subclasses__())
    assert subclasses == set(STATUS_BY_ERROR)


def test_the_domain_errors_know_nothing_of_grpc() -> None:
    assert "grpc" not in vars(errors)
