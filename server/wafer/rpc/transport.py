"""Binding the listening address: TLS credentials, and unix sockets that only their owner can use."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc

from wafer.config import Settings
from wafer.errors import FailedPreconditionError, InvalidArgumentError

# The socket is the on-device IPC endpoint: only the user running the server may connect.
SOCKET_MODE = 0o600


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FailedPreconditionError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def _no_password() -> bytes:
    # gRPC cannot use an encrypted key; answering "no password" makes ssl fail instead of prompting.
    return b""


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings, or None for plaintext. With a client CA, clients must
    present a certificate that chains to it (mutual TLS)."""
    cert_file, key_file, ca_file = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if cert_file is None or key_file is None:
        return None
    cert = _read(cert_file, "TLS certificate")
    key = _read(key_file, "TLS private key")
    ca = _read(ca_file, "TLS client CA file") if ca_file is not None else None
    # gRPC only says "Failed to bind" for a bad certificate or key; Python's ssl loads the same PEM
    # files and says what is wrong (not PEM, key does not match, encrypted key).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except (ssl.SSLError, ValueError) as exc:
        raise FailedPreconditionError(
            f"the TLS certificate {cert_file} and key {key_file} do not load together "
            f"(PEM files, the key unencrypted and matching the certificate): {exc}"
        ) from exc
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as exc:
            raise FailedPreconditionError(f"the TLS client CA file {ca_file} holds no PEM certificate: {exc}") from exc
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def unix_socket_path(address: str) -> Path | None:
    """The file of a `unix:` address (`unix:///abs/path` or `unix:relative`); None for TCP and for
    abstract sockets, which have no file."""
    if not address.startswith("unix:"):
        return None
    rest = address.removeprefix("unix:")
    return Path(rest.removeprefix("//") if rest.startswith("///") else rest)


def _someone_listens(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise FailedPreconditionError(f"cannot tell whether something listens on {path}: {exc}") from exc
    return True


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a server that died, but never one in use: gRPC would unlink it
    and silently take the address from a running server (seen with grpcio 1.85)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FailedPreconditionError(f"cannot listen on {path}: it exists and is not a socket")
    if _someone_listens(path):
        raise FailedPreconditionError(f"cannot listen on {path}: another server is listening on it")
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """gRPC creates the socket file during add_port with the process umask (0755 under the usual
    022), so between bind and our chmod another user could connect. A umask of 177 makes it 0600
    from birth. umask is process-wide: a file another thread creates in this instant gets owner-only
    permissions too, which is stricter, never looser."""
    previous = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(previous)


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind `address`; the TCP port bound (useful with port 0), or 0 for a unix socket."""
    path = unix_socket_path(address)
    try:
        if path is None:
            if credentials is not None:
                return server.add_secure_port(address, credentials)
            return server.add_insecure_port(address)
        remove_stale_socket(path)
        with _private_umask():
            if credentials is not None:
                server.add_secure_port(address, credentials)
            else:
                server.add_insecure_port(address)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"cannot listen on {address!r}: {exc}") from exc
    # Explicit as well: the umask is how it is born 0600, this is the guarantee it stays so.
    try:
        path.chmod(SOCKET_MODE)
    except OSError as exc:
        raise FailedPreconditionError(f"cannot restrict the socket {path} to its owner: {exc}") from exc
    return 0


def socket_warnings(address: str) -> list[str]:
    """What is unsafe about listening on a unix socket at `address` (nothing for TCP): an abstract
    socket has no file permissions, and a socket in a folder other users can write can be
    replaced by theirs, which then receives clients' calls and bearer tokens."""
    if address.startswith("unix-abstract:"):
        return [
            "an abstract unix socket has no permissions: every user on this machine can connect; "
            "use unix:///path, whose socket file only its owner can use"
        ]
    path = unix_socket_path(address)
    if path is None:
        return []
    try:
        mode = path.parent.stat().st_mode
    except OSError:
        return []
    if mode & stat.S_IWOTH:
        return [
            f"the socket's folder {path.parent} is writable by every user: another user could replace "
            "the socket and receive clients' calls (and their bearer token); put it in a folder only "
            "this user can write, e.g. $XDG_RUNTIME_DIR"
        ]
    return []
