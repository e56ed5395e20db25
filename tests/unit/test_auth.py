"""Access control and transport security, without a real server: the token check, which methods
need it, loopback detection, settings validation, TLS and socket files, and the interceptor in an
in-process gRPC server."""

from __future__ import annotations

import socket
import stat
import sys
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
import structlog.testing
from pydantic import SecretStr, ValidationError
from typer.testing import CliRunner

from tests.certs import TlsFiles, write_tls_files
from wafer.config import Settings
from wafer.errors import FailedPreconditionError, PermissionDeniedError, UnauthenticatedError
from wafer.rpc.auth import (
    AuthInterceptor,
    check_bearer,
    check_exposure,
    is_local_address,
    is_loopback_host,
    load_token,
    needs_token,
    tcp_host,
)
from wafer.rpc.interceptor import REQUEST_ID_KEY, RequestInterceptor
from wafer.rpc.policy import policy_for
from wafer.rpc.server import MODELS
from wafer.rpc.transport import remove_stale_socket, server_credentials, unix_socket_path
from wafer_client.cli import app
from wafer_client.cli._common import Options, client_options

TOKEN = "t0ken-Secret"


@pytest.fixture(autouse=True)
def _no_security_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The settings read WAFER_*; a token or TLS path in the developer's shell must not leak in.
    for name in ("AUTH_TOKEN", "AUTH_TOKEN_FILE", "AUTH_ALL_RPCS", "ALLOW_REMOTE_ADMIN", "TLS_CERT_FILE"):
        monkeypatch.delenv(f"WAFER_{name}", raising=False)
    for name in ("TLS_KEY_FILE", "TLS_CLIENT_CA_FILE", "TOKEN", "TOKEN_FILE"):
        monkeypatch.delenv(f"WAFER_{name}", raising=False)


def token_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(0o600)
    return path


# The token check


def test_missing_header_is_unauthenticated() -> None:
    with pytest.raises(UnauthenticatedError, match="this call needs a bearer token"):
        check_bearer((("x-request-id", "r1"),), TOKEN)
    with pytest.raises(UnauthenticatedError):
        check_bearer(None, TOKEN)


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", TOKEN])
def test_not_a_bearer_credential_is_unauthenticated(value: str) -> None:
    with pytest.raises(UnauthenticatedError, match="must be 'Bearer <token>'"):
        check_bearer((("authorization", value),), TOKEN)


@pytest.mark.parametrize("value", ["Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer tök€n"])
def test_wrong_token_is_permission_denied(value: str) -> None:
    with pytest.raises(PermissionDeniedError) as raised:
        check_bearer((("authorization", value),), TOKEN)
    assert TOKEN not in raised.value.message and "wrong" not in raised.value.message


@pytest.mark.parametrize("value", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"  BEARER  {TOKEN} "])
def test_right_token_passes(value: str) -> None:
    check_bearer((("x-other", "1"), ("authorization", value)), TOKEN)
    check_bearer((("authorization", value.encode()),), TOKEN)


# Which methods need it


def test_the_models_service_is_admin() -> None:
    assert policy_for(f"/{MODELS}/ListModels").admin


@pytest.mark.parametrize(
    "method", ["/wafer.v1.Models/ListModels", "/wafer.v1.Models/LoadModel", "/wafer.v1.Jobs/Submit"]
)
def test_admin_methods_need_the_token(method: str) -> None:
    assert needs_token(method, all_rpcs=False)
    assert needs_token(method, all_rpcs=True)


@pytest.mark.parametrize("method", ["/wafer.v1.Inference/Embed", "/wafer.v1.Index/Search", "/wafer.v2.Future/X"])
def test_other_methods_need_it_only_with_auth_all_rpcs(method: str) -> None:
    assert not needs_token(method, all_rpcs=False)
    assert needs_token(method, all_rpcs=True)


@pytest.mark.parametrize(
    "method",
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ],
)
def test_health_and_reflection_stay_open(method: str) -> None:
    assert not needs_token(method, all_rpcs=True)


# Loopback and exposure


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST", "localhost.", "::ffff:127.0.0.1"]
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", "192.168.1.10", "10.0.0.1", "example.com", "fe80::1"])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("127.0.0.1:50051", "127.0.0.1"),
        ("[::1]:0", "::1"),
        (":::50051", "::"),
        ("0.0.0.0:0", "0.0.0.0"),
        (":50051", ""),
        ("localhost:1", "localhost"),
        ("unix:///tmp/w.sock", None),
        ("unix-abstract:wafer", None),
    ],
)
def test_tcp_host(address: str, host: str | None) -> None:
    assert tcp_host(address) == host


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1:0", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:///tmp/w.sock", True),
        ("unix:relative.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("wafer.example.com:50051", False),
    ],
)
def test_local_addresses(address: str, local: bool) -> None:
    assert is_local_address(address) is local


def test_open_admin_on_a_remote_address_is_refused() -> None:
    with pytest.raises(FailedPreconditionError, match=r"refusing to listen on 0\.0\.0\.0:50051") as raised:
        check_exposure("0.0.0.0:50051", token_configured=False, client_certificates=False, allow_remote_admin=False)
    assert "--allow-remote-admin" in raised.value.message and "--auth-token-file" in raised.value.message


@pytest.mark.parametrize(
    "protection",
    [
        {"token_configured": True},
        {"client_certificates": True},
        {"allow_remote_admin": True},
    ],
)
def test_remote_address_is_fine_when_protected_or_allowed(protection: dict[str, bool]) -> None:
    given = {"token_configured": False, "client_certificates": False, "allow_remote_admin": False, **protection}
    check_exposure("[::]:50051", **given)


@pytest.mark.parametrize("address", ["127.0.0.1:0", "unix:///tmp/w.sock"])
def test_local_address_needs_nothing(address: str) -> None:
    check_exposure(address, token_configured=False, client_certificates=False, allow_remote_admin=False)


# Settings


def test_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    settings = Settings(auth_token_file=token_file(tmp_path, f"  {TOKEN}\n\n"))
    assert load_token(settings) == TOKEN


def test_token_file_wins_over_the_inline_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAFER_AUTH_TOKEN", "from-the-environment")
    assert load_token(Settings()) == "from-the-environment"
    assert load_token(Settings(auth_token_file=token_file(tmp_path, TOKEN))) == TOKEN


def test_token_file_readable_by_others_gets_a_warning(tmp_path: Path) -> None:
    path = token_file(tmp_path, TOKEN)
    with structlog.testing.capture_logs() as private:
        load_token(Settings(auth_token_file=path))
    path.chmod(0o644)
    with structlog.testing.capture_logs() as shared:
        load_token(Settings(auth_token_file=path))
    assert private == []
    assert [e["event"] for e in shared] == ["the auth token file is readable by other users; chmod 600 it"]
    assert TOKEN not in str(shared)


def test_no_token_means_open() -> None:
    assert load_token(Settings()) is None


@pytest.mark.parametrize("text", ["", "  \n"])
def test_empty_token_file_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValidationError, match="is empty"):
        Settings(auth_token_file=token_file(tmp_path, text))


def test_missing_token_file_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"cannot read the auth token file .*nowhere"):
        Settings(auth_token_file=tmp_path / "nowhere")


def test_token_file_emptied_after_validation_fails_at_start(tmp_path: Path) -> None:
    path = token_file(tmp_path, TOKEN)
    settings = Settings(auth_token_file=path)
    path.write_text("")
    with pytest.raises(FailedPreconditionError, match="is empty"):
        load_token(settings)


@pytest.mark.parametrize("token", ["", "   ", "two words", "line\nbreak", "tök€n"])
def test_unusable_inline_tokens_are_refused_without_echoing_them(token: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(auth_token=SecretStr(token))
    if token.strip():
        assert token not in str(raised.value)


def test_a_settings_error_never_prints_the_token() -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(auth_token=SecretStr(TOKEN), tls_cert_file=Path("/x.pem"))  # a model-level error: sees every field
    assert TOKEN not in str(raised.value)


def test_inline_token_is_stripped() -> None:
    settings = Settings(auth_token=SecretStr(f" {TOKEN}\n"))
    assert settings.auth_token is not None and settings.auth_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_cert_file": "/c.pem"}, "go together"),
        ({"tls_key_file": "/k.pem"}, "go together"),
        ({"tls_client_ca_file": "/ca.pem"}, "needs TLS"),
        ({"auth_all_rpcs": True}, "auth_all_rpcs needs a token"),
    ],
)
def test_inconsistent_security_settings(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**fields)


def test_auth_all_rpcs_with_a_token_is_fine() -> None:
    assert Settings(auth_all_rpcs=True, auth_token=SecretStr(TOKEN)).auth_all_rpcs


# TLS files


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return write_tls_files(tmp_path_factory.mktemp("tls"))


def test_tls_credentials(tls: TlsFiles) -> None:
    assert server_credentials(Settings()) is None
    plain = Settings(tls_cert_file=tls.server_cert, tls_key_file=tls.server_key)
    assert isinstance(server_credentials(plain), grpc.ServerCredentials)
    mutual = Settings(tls_cert_file=tls.server_cert, tls_key_file=tls.server_key, tls_client_ca_file=tls.ca)
    assert isinstance(server_credentials(mutual), grpc.ServerCredentials)


def test_unreadable_tls_file_names_its_path(tls: TlsFiles, tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(FailedPreconditionError, match=f"cannot read the TLS private key {missing}"):
        server_credentials(Settings(tls_cert_file=tls.server_cert, tls_key_file=missing))
    with pytest.raises(FailedPreconditionError, match="cannot read the TLS client CA file"):
        server_credentials(
            Settings(tls_cert_file=tls.server_cert, tls_key_file=tls.server_key, tls_client_ca_file=missing)
        )


def test_mismatched_or_garbage_tls_files_are_refused(tls: TlsFiles, tmp_path: Path) -> None:
    with pytest.raises(FailedPreconditionError, match="do not load together"):
        server_credentials(Settings(tls_cert_file=tls.server_cert, tls_key_file=tls.client_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(FailedPreconditionError, match="do not load together"):
        server_credentials(Settings(tls_cert_file=garbage, tls_key_file=tls.server_key))
    with pytest.raises(FailedPreconditionError, match="holds no PEM certificate"):
        server_credentials(
            Settings(tls_cert_file=tls.server_cert, tls_key_file=tls.server_key, tls_client_ca_file=garbage)
        )


# Unix socket files


@pytest.mark.parametrize(
    ("address", "path"),
    [
        ("unix:///tmp/w.sock", Path("/tmp/w.sock")),
        ("unix:/tmp/w.sock", Path("/tmp/w.sock")),
        ("unix:w.sock", Path("w.sock")),
        ("unix-abstract:w", None),
        ("127.0.0.1:0", None),
    ],
)
def test_unix_socket_path(address: str, path: Path | None) -> None:
    assert unix_socket_path(address) == path


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Under /tmp and short: unix socket paths are limited to about 100 bytes.
    path = Path(f"/tmp/wafer-unit-{id(object())}.sock")
    yield path
    path.unlink(missing_ok=True)


def test_stale_socket_is_removed(socket_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(socket_path))  # bound, never listening, closed: what a killed server leaves
    assert stat.S_ISSOCK(socket_path.lstat().st_mode)
    remove_stale_socket(socket_path)
    assert not socket_path.exists()
    remove_stale_socket(socket_path)  # nothing there: nothing to do


def test_live_socket_is_kept(socket_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(socket_path))
        live.listen()
        with pytest.raises(FailedPreconditionError, match="another server is listening"):
            remove_stale_socket(socket_path)
    assert socket_path.exists()


def test_other_files_are_never_removed(socket_path: Path) -> None:
    socket_path.write_text("precious")
    with pytest.raises(FailedPreconditionError, match="not a socket"):
        remove_stale_socket(socket_path)
    assert socket_path.read_text() == "precious"


# The interceptor in a real (in-process) gRPC server


async def _reply(request: bytes, context: Any) -> bytes:
    return b"ok:" + request


async def _replies(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"one"
    yield b"two"


def _handlers(service: str) -> grpc.GenericRpcHandler[Any, Any]:
    return grpc.method_handlers_generic_handler(
        service,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_reply),
            "Stream": grpc.unary_stream_rpc_method_handler(_replies),
        },
    )


@pytest.fixture
async def guarded() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[RequestInterceptor(), AuthInterceptor(TOKEN)])
    for service in ("wafer.v1.Models", "wafer.v1.Inference", "grpc.health.v1.Health"):
        server.add_generic_rpc_handlers((_handlers(service),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_interceptor_guards_admin_calls(guarded: grpc.aio.Channel) -> None:
    channel = guarded
    unary = channel.unary_unary("/wafer.v1.Models/Unary", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await unary(b"x")
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in (raised.value.details() or "")
    # Mapped by the request interceptor: the refusal carries its request id like any other error.
    trailing: Any = raised.value.trailing_metadata() or ()  # pairs at run time, typed as _Metadatum
    assert REQUEST_ID_KEY in dict(trailing)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await unary(b"x", metadata=_bearer("wrong"))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await unary(b"x", metadata=_bearer(TOKEN)) == b"ok:x"


async def test_interceptor_guards_admin_streams(guarded: grpc.aio.Channel) -> None:
    channel = guarded
    stream = channel.unary_stream("/wafer.v1.Models/Stream", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [m async for m in stream(b"x")]
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [m async for m in stream(b"x", metadata=_bearer(TOKEN))] == [b"one", b"two"]


async def test_interceptor_leaves_other_calls_alone(guarded: grpc.aio.Channel) -> None:
    channel = guarded
    assert await channel.unary_unary("/wafer.v1.Inference/Unary", None, None)(b"y") == b"ok:y"
    assert await channel.unary_unary("/grpc.health.v1.Health/Unary", None, None)(b"z") == b"ok:z"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary("/wafer.v1.Models/Nope", None, None)(b"x")
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_interceptor_repr_hides_the_token() -> None:
    assert TOKEN not in repr(AuthInterceptor(TOKEN, all_rpcs=True))


# The CLI


runner = CliRunner()


def test_serve_maps_security_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[dict[str, object]] = []
    fake = types.ModuleType("wafer.app")
    fake.main = seen.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wafer.app", fake)
    files = {name: tmp_path / name for name in ("c.pem", "k.pem", "ca.pem", "token")}
    result = runner.invoke(
        app,
        [
            "serve",
            "--tls-cert",
            str(files["c.pem"]),
            "--tls-key",
            str(files["k.pem"]),
            "--tls-client-ca",
            str(files["ca.pem"]),
            "--auth-token-file",
            str(files["token"]),
            "--auth-all-rpcs",
            "--allow-remote-admin",
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen == [
        {
            "tls_cert_file": files["c.pem"],
            "tls_key_file": files["k.pem"],
            "tls_client_ca_file": files["ca.pem"],
            "auth_token_file": files["token"],
            "auth_all_rpcs": True,
            "allow_remote_admin": True,
        }
    ]
    seen.clear()
    runner.invoke(app, ["serve"])
    assert seen == [{}]  # switches left off leave the environment in charge


def test_client_token_becomes_the_authorization_header(tmp_path: Path) -> None:
    options = client_options(Options(token=f"{TOKEN}\n"))
    assert options["metadata"] == [("authorization", f"Bearer {TOKEN}")]
    options = client_options(Options(token="ignored", token_file=token_file(tmp_path, f"{TOKEN}\n")))
    assert options["metadata"] == [("authorization", f"Bearer {TOKEN}")]
    assert "tls" not in options


def test_client_token_and_authorization_header_conflict() -> None:
    result = runner.invoke(app, ["--token", TOKEN, "-H", "Authorization: Bearer x", "models", "list"])
    assert result.exit_code == 2 and "not both" in result.output


def test_client_tls_options(tls: TlsFiles) -> None:
    options = client_options(Options(tls_ca=tls.ca, tls_client_cert=tls.client_cert, tls_client_key=tls.client_key))
    assert options["tls"] is True
    assert options["root_certificates"] == tls.read("ca")
    assert options["certificate_chain"] == tls.read("client_cert")
    assert options["private_key"] == tls.read("client_key")
    assert client_options(Options(tls=True)) == {"metadata": [], "tls": True}


def test_client_certificate_needs_its_key(tls: TlsFiles) -> None:
    result = runner.invoke(app, ["--tls-client-cert", str(tls.client_cert), "health"])
    assert result.exit_code == 2 and "go together" in result.output
