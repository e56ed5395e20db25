"""What the sync and async clients share: address, channel options, credentials, deadlines, retries.

Only the act of calling (blocking vs awaiting, time.sleep vs asyncio.sleep) differs between the two
clients; every decision lives here so they cannot drift apart.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, TypedDict

import grpc

from wafer_client.errors import WaferError, retry_after_hint

__all__ = ["DEFAULT_ADDRESS", "USE_CLIENT_DEFAULT", "ClientOptions", "RetryPolicy", "UseClientDefault"]

DEFAULT_ADDRESS: Final = "127.0.0.1:50051"
DEFAULT_PORT: Final = 50051
ADDRESS_ENV: Final = "WAFER_ADDRESS"
# gRPC's 4 MiB receive limit is only ~700 vectors of 1536 floats; a batch embed must not trip on it.
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
USER_AGENT: Final = "wafer-client/0.1"


class UseClientDefault(Enum):
    """Marks a per-call ``timeout`` left unset, since ``None`` already means "no deadline"."""

    USE_CLIENT_DEFAULT = "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT: Final = UseClientDefault.USE_CLIENT_DEFAULT
Timeout = float | None | UseClientDefault
MetadataInput = Mapping[str, str] | Sequence[tuple[str, str]]


@dataclass(frozen=True)
class RetryPolicy:
    """How failed calls are retried.

    A call is retried when its status is in ``retry_on``, up to ``max_attempts`` attempts in all, and
    never past its deadline. Between attempts the client waits for the server's ``retry-after-ms`` /
    ``retry-after`` hint when there is one (giving up at once if the hint exceeds ``max_retry_after``),
    else an exponential backoff; both get up to ``jitter`` (a fraction) of random spread so clients
    that failed together do not come back together.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_retry_after: float = 30.0
    retry_on: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")

    def delay(self, error: WaferError, attempt: int) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up and raise ``error``."""
        if error.code not in self.retry_on or attempt >= self.max_attempts:
            return None
        hint = retry_after_hint(error.metadata)
        if hint is not None:
            if hint > self.max_retry_after:
                return None
            # Never earlier than the server asked: spread only upwards.
            return hint * (1 + random.uniform(0, self.jitter))
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


def resolve_address(address: str | None) -> str:
    """A gRPC target from what a person typed: ``host:port``, ``unix:///path``, a bare socket path."""
    raw = (address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS).strip()
    if raw.startswith(("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")):
        return raw
    if raw.startswith("/"):
        return f"unix://{raw}"
    raw = raw.removeprefix("grpc://")
    # Without a port gRPC would dial 443; the server's own default is far more likely meant.
    if ":" not in raw:
        return f"{raw}:{DEFAULT_PORT}"
    return raw


def _metadata_pairs(metadata: MetadataInput | None) -> tuple[tuple[str, str], ...]:
    if metadata is None:
        return ()
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    # gRPC rejects upper-case keys with an opaque error; HTTP/2 header names are case-insensitive anyway.
    return tuple((str(key).lower(), str(value)) for key, value in items)


class ClientOptions(TypedDict, total=False):
    """The keyword options of both clients (see :class:`BaseClient`)."""

    timeout: float | None
    retries: int | RetryPolicy
    metadata: MetadataInput | None
    tls: bool | None
    root_certificates: bytes | None
    private_key: bytes | None
    certificate_chain: bytes | None
    credentials: grpc.ChannelCredentials | None
    max_send_message_length: int
    max_receive_message_length: int
    options: Sequence[tuple[str, str | int]]


class BaseClient:
    """Configuration shared by :class:`WaferClient` and :class:`AsyncWaferClient`."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = 60.0,
        retries: int | RetryPolicy = 2,
        metadata: MetadataInput | None = None,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_send_message_length: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_receive_message_length: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, str | int]] = (),
    ) -> None:
        self.address = resolve_address(address)
        self.timeout = timeout
        if isinstance(retries, RetryPolicy):
            self.retry_policy = retries
        else:
            if retries < 0:
                raise ValueError("retries must be >= 0")
            self.retry_policy = RetryPolicy(max_attempts=retries + 1)
        self.metadata = _metadata_pairs(metadata)
        if credentials is None and (tls or (tls is None and (root_certificates or certificate_chain))):
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
        self._credentials = credentials
        self._options: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", max_send_message_length),
            ("grpc.max_receive_message_length", max_receive_message_length),
            ("grpc.primary_user_agent", USER_AGENT),
            *options,
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(address={self.address!r})"

    def _call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        return self.metadata or None

    def _deadline(self, timeout: Timeout) -> float | None:
        """The monotonic instant by which every attempt of a call must be over."""
        seconds = self.timeout if isinstance(timeout, UseClientDefault) else timeout
        return None if seconds is None else time.monotonic() + seconds

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        # A zero or negative timeout is refused by gRPC; a tiny one fails as DEADLINE_EXCEEDED, as it should.
        return max(deadline - time.monotonic(), 1e-3)

    def _retry_delay(self, error: WaferError, attempt: int, deadline: float | None) -> float | None:
        delay = self.retry_policy.delay(error, attempt)
        if delay is None:
            return None
        # Sleeping past the deadline only to fail with DEADLINE_EXCEEDED would hide the real cause.
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay
