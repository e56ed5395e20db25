"""Access control: a bearer token on admin RPCs (or on all of them), and the rule that admin RPCs
never face the network unprotected by accident.

The token arrives as call metadata `authorization: Bearer <token>`. A missing (or non-Bearer)
header is UNAUTHENTICATED, a wrong token PERMISSION_DENIED (the error table in docs/architecture.md).
Health checking and reflection always stay open: load balancers and probes must reach them without
a secret.

A call that needs no token (Embed, Search... without auth_all_rpcs) may still carry it: then, and
only then, an on-demand load it causes may unload other models to make room under the memory budget
(an admin act); without it such a load is refused with PERMISSION_DENIED (wafer.registry).

The interceptor does not answer refused calls itself: it hands gRPC a handler that raises the
domain error, and the request interceptor (outermost) maps it like any other error, so a refusal
gets its request id and its one log line. The token is never logged nor echoed in messages.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Final

import grpc
import structlog

from wafer.config import Settings, read_token_file
from wafer.errors import FailedPreconditionError, PermissionDeniedError, UnauthenticatedError, WaferError
from wafer.registry import allow_on_demand_eviction
from wafer.rpc.policy import policy_for
from wafer.rpc.status import status_for

log = structlog.get_logger("wafer.auth")

AUTHORIZATION_KEY: Final = "authorization"
_BEARER = "bearer"


def load_token(settings: Settings) -> str | None:
    """The configured bearer token, or None when access is open. The file wins over the inline
    value: a file keeps the secret out of the environment and the process list."""
    if settings.auth_token_file is not None:
        path = settings.auth_token_file
        try:
            token = read_token_file(path)
        except ValueError as exc:
            # Settings already read it once; this is the file changing between then and now.
            raise FailedPreconditionError(str(exc)) from exc
        _warn_if_shared(path)
        return token
    if settings.auth_token is not None:
        return settings.auth_token.get_secret_value()
    return None


def _warn_if_shared(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the auth token file is readable by other users; chmod 600 it", path=str(path))


def needs_token(method: str, *, all_rpcs: bool) -> bool:
    """Whether a call to `method` (gRPC's full method path) must carry the token (the table in
    wafer.rpc.policy says which methods are admin and which are always open)."""
    policy = policy_for(method)
    if policy.open:
        return False
    # With auth_all_rpcs everything else needs it, including services added later: fail closed.
    return all_rpcs or policy.admin


def check_bearer(metadata: Iterable[tuple[str, str | bytes]] | None, token: str) -> None:
    """Raise UnauthenticatedError without a Bearer credential, PermissionDeniedError with a wrong one."""
    values = [value for key, value in metadata or () if key == AUTHORIZATION_KEY]
    if not values:
        raise UnauthenticatedError(
            "this call needs a bearer token: send the metadata 'authorization: Bearer <token>' "
            "(the wafer CLI: --token or WAFER_TOKEN)"
        )
    value = values[0]
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, presented = text.strip().partition(" ")
    if scheme.lower() != _BEARER or not presented.strip():
        raise UnauthenticatedError("the authorization metadata must be 'Bearer <token>'")
    # Constant time, so response timing does not reveal how much of a guess was right. Bytes,
    # because compare_digest refuses non-ASCII str and a client may send anything.
    if not hmac.compare_digest(presented.strip().encode("utf-8"), token.encode("utf-8")):
        raise PermissionDeniedError("the bearer token is not valid for this server")


def is_admin_call(metadata: Iterable[tuple[str, str | bytes]] | None, token: str) -> bool:
    """Whether a call carries the right bearer token (a call that needs none may still send it)."""
    try:
        check_bearer(metadata, token)
    except WaferError:
        return False
    return True


def _with_eviction_rule(handler: grpc.RpcMethodHandler[Any, Any], allowed: bool) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler`, run with on-demand evictions allowed or not (wafer.registry)."""
    if handler.unary_unary is not None:
        unary: Any = handler.unary_unary

        async def run_unary(request: Any, context: Any) -> Any:
            allow_on_demand_eviction(allowed)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            run_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
        stream: Any = handler.unary_stream

        async def run_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            allow_on_demand_eviction(allowed)
            async for response in stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            run_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _refusing(handler: grpc.RpcMethodHandler[Any, Any], error: WaferError) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that fails with `error` instead of running it."""
    if handler.unary_unary is not None:

        async def refuse_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            raise error

        return grpc.unary_unary_rpc_method_handler(
            refuse_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        # An async generator, like the servicers' own streams, so the request interceptor
        # iterates it and maps the error the same way.
        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            raise error
            yield  # pragma: no cover  # makes this an async generator

        return grpc.unary_stream_rpc_method_handler(
            refuse_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # Client or bidirectional streams pass the request interceptor untouched, so answer directly.
    async def refuse_streaming(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status_for(error), error.message)

    factory = (
        grpc.stream_unary_rpc_method_handler
        if handler.stream_unary is not None
        else grpc.stream_stream_rpc_method_handler
    )
    return factory(
        refuse_streaming,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks the bearer token on the calls that need it. Must sit inside the request interceptor
    (later in the server's interceptor list) so refusals are mapped and logged."""

    def __init__(self, token: str, *, all_rpcs: bool = False) -> None:
        self._token = token
        self._all_rpcs = all_rpcs

    def __repr__(self) -> str:
        # Never the token, even in a debugger or a crash report.
        return f"AuthInterceptor(all_rpcs={self._all_rpcs})"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        # No handler: gRPC answers UNIMPLEMENTED, which tells an unauthenticated caller nothing new.
        if handler is None:
            return handler
        method = handler_call_details.method
        if not needs_token(method, all_rpcs=self._all_rpcs):
            if policy_for(method).open:
                return handler
            # An open call, which may still carry the token: only then may it evict models.
            admin = is_admin_call(handler_call_details.invocation_metadata, self._token)
            return _with_eviction_rule(handler, admin)
        try:
            check_bearer(handler_call_details.invocation_metadata, self._token)
        except WaferError as error:
            return _refusing(handler, error)
        return handler


# Exposure


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped) and `localhost`. Any other name counts as
    remote: we do not resolve names, and a name can point anywhere."""
    host = host.strip().removeprefix("[").removesuffix("]").split("%", 1)[0]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def tcp_host(address: str) -> str | None:
    """The host part of a TCP listen address (`host:port`, `[v6]:port`), or None for a unix socket."""
    if address.startswith(("unix:", "unix-abstract:")):
        return None
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    # rsplit: `::1:50051` and `:::0` keep their IPv6 host. An empty host means every interface.
    return address.rsplit(":", 1)[0] if ":" in address else address


def is_local_address(address: str) -> bool:
    """Whether only this machine can connect: a unix socket (abstract ones included: they share the
    network namespace, like loopback) or a loopback TCP host. 0.0.0.0 and :: are every interface."""
    host = tcp_host(address)
    return host is None or is_loopback_host(host)


def check_exposure(
    address: str, *, token_configured: bool, client_certificates: bool, allow_remote_admin: bool
) -> None:
    """Refuse to serve open admin RPCs on an address other machines can reach, unless told to.
    Client certificates count as protection: with mutual TLS only holders of a certificate from
    the configured CA can connect at all."""
    if is_local_address(address) or token_configured or client_certificates or allow_remote_admin:
        return
    raise FailedPreconditionError(
        f"refusing to listen on {address}: other machines can reach it, and the admin RPCs (loading and "
        "unloading models) would be open to them. Set a token (--auth-token-file, or WAFER_AUTH_TOKEN), "
        "require client certificates (--tls-client-ca), listen on 127.0.0.1 or a unix socket, "
        "or pass --allow-remote-admin if the network is trusted"
    )
