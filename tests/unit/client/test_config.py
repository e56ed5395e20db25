"""Pieces that need no server: addresses, the retry policy, the error table."""

from __future__ import annotations

import grpc
import pytest

from wafer_client import RetryPolicy, errors
from wafer_client._base import resolve_address


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("example.org:7000", "example.org:7000"),
        ("example.org", "example.org:50051"),
        ("grpc://example.org:7000", "example.org:7000"),
        ("unix:///tmp/wafer.sock", "unix:///tmp/wafer.sock"),
        ("/tmp/wafer.sock", "unix:///tmp/wafer.sock"),
        ("[::1]:50051", "[::1]:50051"),
        ("  localhost:1234 ", "localhost:1234"),
    ],
)
def test_resolve_address(given: str, target: str) -> None:
    assert resolve_address(given) == target


def test_resolve_address_default_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WAFER_ADDRESS", raising=False)
    assert resolve_address(None) == "127.0.0.1:50051"
    monkeypatch.setenv("WAFER_ADDRESS", "unix:///run/wafer.sock")
    assert resolve_address(None) == "unix:///run/wafer.sock"
    assert resolve_address("10.0.0.1:1") == "10.0.0.1:1"


def _error(code: grpc.StatusCode, *metadata: tuple[str, str]) -> errors.WaferError:
    return errors.ERROR_BY_CODE[code]("x", code=code, metadata=metadata)


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.1, max_backoff=0.5, jitter=0.0)
    busy = _error(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert [policy.delay(busy, n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert policy.delay(busy, 10) is None


def test_backoff_jitter_stays_in_bounds() -> None:
    policy = RetryPolicy(initial_backoff=1.0, jitter=0.2)
    delays = [policy.delay(_error(grpc.StatusCode.UNAVAILABLE), 1) for _ in range(200)]
    assert all(d is not None and 0.8 <= d <= 1.2 for d in delays)
    assert len(set(delays)) > 1


def test_hint_wins_and_is_never_shortened() -> None:
    policy = RetryPolicy(initial_backoff=5.0, jitter=0.5)
    for _ in range(50):
        delay = policy.delay(_error(grpc.StatusCode.RESOURCE_EXHAUSTED, ("retry-after-ms", "250")), 1)
        assert delay is not None and 0.25 <= delay <= 0.375


def test_only_listed_codes_are_retried() -> None:
    policy = RetryPolicy()
    assert policy.delay(_error(grpc.StatusCode.INVALID_ARGUMENT), 1) is None
    assert policy.delay(_error(grpc.StatusCode.UNAVAILABLE), 1) is not None
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


@pytest.mark.parametrize(
    ("metadata", "seconds"),
    [
        ((("retry-after", "2"),), 2.0),
        ((("retry-after-ms", "1500"),), 1.5),
        ((("retry-after", "9"), ("retry-after-ms", "100")), 0.1),
        ((("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),), None),
        ((("retry-after", "-1"),), None),
        ((), None),
    ],
)
def test_retry_after_hint(metadata: tuple[tuple[str, str], ...], seconds: float | None) -> None:
    assert errors.retry_after_hint(metadata) == seconds
    assert errors.ResourceExhaustedError("busy", metadata=metadata).retry_after == seconds


def test_errors_know_their_own_code() -> None:
    assert errors.NotFoundError("gone").code is grpc.StatusCode.NOT_FOUND
    assert errors.InternalError("bug").code is grpc.StatusCode.INTERNAL
    assert errors.WaferError("?").code is grpc.StatusCode.UNKNOWN
    assert all(issubclass(cls, errors.WaferError) for cls in errors.ERROR_BY_CODE.values())


def test_a_bare_rpc_error_still_becomes_a_wafer_error() -> None:
    error = errors.from_rpc_error(grpc.RpcError())
    assert isinstance(error, errors.InternalError)
    assert error.code is grpc.StatusCode.UNKNOWN and error.request_id is None
