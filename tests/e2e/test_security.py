"""Transport security and access control against a real `wafer serve`: the bearer token on admin RPCs
(or on all of them), TLS and mutual TLS with certificates made here, the private unix socket, and
the refusal to expose open admin RPCs to the network. Each test starts its own small server."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Unpack

import grpc
import httpx
import pytest
import yaml
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.certs import TlsFiles, write_tls_files
from tests.conftest import MODELS_YAML
from tests.e2e.conftest import ServerProcess, start_server
from wafer_client import (
    ClientOptions,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    WaferClient,
    WaferError,
)

pytestmark = pytest.mark.e2e

TOKEN = "e2e-S3cret-token"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Only the small embedder: these tests are about the transport, and a small catalog starts fast.
    catalog = yaml.safe_load(MODELS_YAML.read_text())
    small = {"defaults": {"embed": "minilm", "rerank": "minilm"}, "models": {"minilm": catalog["models"]["minilm"]}}
    path = tmp_path_factory.mktemp("models") / "models.yaml"
    path.write_text(yaml.safe_dump(small))
    return path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return write_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def client(server: ServerProcess, **options: Unpack[ClientOptions]) -> WaferClient:
    given: ClientOptions = {"timeout": 10, "retries": 0, **options}
    return WaferClient(server.address, **given)


@pytest.fixture
def running() -> Iterator[list[ServerProcess]]:
    """Servers a test started; stopped (and checked to stop cleanly) whatever the test's outcome."""
    servers: list[ServerProcess] = []
    yield servers
    for server in servers:
        assert server.stop() == 0


def serve(
    running: list[ServerProcess],
    tmp_path: Path,
    models: Path,
    *args: str,
    address: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
    client_options: ClientOptions | None = None,
) -> ServerProcess:
    server = start_server(
        tmp_path / "data", address=address, models=models, env=env, extra_args=args, client_options=client_options
    )
    running.append(server)
    return server


def serve_expecting_failure(data_dir: Path, models: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wafer", "serve", "--models", str(models), "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WAFER_THREADS": "2"},
    )


def wafer_cli(server: ServerProcess, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wafer", "--address", server.address, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


# Bearer token


def test_token_guards_admin_rpcs_only(
    running: list[ServerProcess], tmp_path: Path, models: Path, token_file: Path
) -> None:
    server = serve(running, tmp_path, models, "--auth-token-file", str(token_file))

    with client(server) as anonymous:
        with pytest.raises(UnauthenticatedError, match="this call needs a bearer token") as refused:
            anonymous.list_models()
        # Inference and health stay open: only admin RPCs need the token.
        assert anonymous.embed("no token needed").vectors.shape == (1, 384)
        assert anonymous.health() == "SERVING"
    with client(server, metadata=bearer("not-the-token")) as wrong, pytest.raises(PermissionDeniedError):
        wrong.get_model("minilm")
    with client(server, metadata=bearer(TOKEN)) as admin:
        assert [m.name for m in admin.list_models()] == ["minilm"]
        assert admin.get_model("minilm").state == "ready"

    # The refusal is logged like every call: one line, its request id, its status; never the token.
    records = [r for r in server.logs() if r.get("event") == "rpc" and r.get("request_id") == refused.value.request_id]
    assert len(records) == 1
    assert records[0]["status"] == "UNAUTHENTICATED" and records[0]["method"] == "/wafer.v1.Models/ListModels"
    assert all(TOKEN not in line for line in server.log_lines)

    # The CLI: --token / WAFER_TOKEN sends it, and without it the error is readable.
    denied = wafer_cli(server, "models", "list")
    assert denied.returncode == 1 and "error: UNAUTHENTICATED" in denied.stderr
    listed = wafer_cli(server, "models", "list", "--json", env={"WAFER_TOKEN": TOKEN})
    assert listed.returncode == 0, listed.stderr
    assert "minilm" in listed.stdout


@pytest.fixture(scope="module")
def two_embedders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    catalog = yaml.safe_load(MODELS_YAML.read_text())
    names = ("minilm", "paraphrase-minilm-l3")
    small = {
        "defaults": {"embed": "minilm", "rerank": "minilm"},
        "models": {name: catalog["models"][name] for name in names},
    }
    assert small["models"]["paraphrase-minilm-l3"]["load"] == "on_demand"
    path = tmp_path_factory.mktemp("two") / "models.yaml"
    path.write_text(yaml.safe_dump(small))
    return path


def test_an_on_demand_load_evicts_only_for_the_token(
    running: list[ServerProcess], tmp_path: Path, two_embedders: Path, token_file: Path
) -> None:
    """Issue 13 #6: with a token set, an Embed without it naming an unloaded model could make the
    server unload others (an admin act). A load that fits the budget still needs no token."""
    roomy = serve(
        running,
        tmp_path / "roomy",
        two_embedders,
        "--auth-token-file",
        str(token_file),
        env={"WAFER_MEMORY_BUDGET_MB": "20000"},
    )
    with client(roomy) as anonymous:
        assert anonymous.embed("fits", model="paraphrase-minilm-l3").vectors.shape == (1, 384)
    with client(roomy, metadata=bearer(TOKEN)) as admin:
        minilm_mib = admin.get_model("minilm").memory_bytes / 2**20
        assert admin.get_model("paraphrase-minilm-l3").state == "ready"

    # Room for MiniLM only: loading the other model means unloading MiniLM.
    tight = serve(
        running,
        tmp_path / "tight",
        two_embedders,
        "--auth-token-file",
        str(token_file),
        "--http-address",
        "127.0.0.1:0",
        env={"WAFER_MEMORY_BUDGET_MB": str(int(minilm_mib) + 8)},
    )
    with client(tight) as anonymous:
        with pytest.raises(PermissionDeniedError, match=r"it would unload minilm\. Unloading models is an admin act"):
            anonymous.embed("evicts", model="paraphrase-minilm-l3")
        assert anonymous.embed("still served").vectors.shape == (1, 384)
        assert anonymous.health() == "SERVING"
    with client(tight, metadata=bearer("not-the-token")) as wrong, pytest.raises(PermissionDeniedError):
        wrong.embed("evicts", model="paraphrase-minilm-l3")
    with client(tight, metadata=bearer(TOKEN)) as admin:
        assert admin.get_model("minilm").state == "ready"
        assert admin.get_model("paraphrase-minilm-l3").state == "unloaded"
        assert admin.embed("evicts", model="paraphrase-minilm-l3").vectors.shape == (1, 384)
        assert admin.get_model("minilm").state == "unloaded"
    # Loading MiniLM back would now evict the other: refused without the token, over HTTP too.
    with client(tight) as anonymous, pytest.raises(PermissionDeniedError, match="admin act"):
        anonymous.embed("evicts")
    embeddings = f"http://{tight.http_address}/v1/embeddings"
    body = {"model": "minilm", "input": "evicts"}
    refused = httpx.post(embeddings, json=body, timeout=60)
    assert refused.status_code == 403 and "admin act" in refused.text
    allowed = httpx.post(embeddings, json=body, headers=bearer(TOKEN), timeout=60)
    assert allowed.status_code == 200, allowed.text


def test_auth_all_rpcs_guards_inference_too(running: list[ServerProcess], tmp_path: Path, models: Path) -> None:
    # The token from the environment this time, the other way to configure it.
    server = serve(running, tmp_path, models, "--auth-all-rpcs", env={"WAFER_AUTH_TOKEN": TOKEN})

    with client(server) as anonymous:
        with pytest.raises(UnauthenticatedError):
            anonymous.embed("no token")
        # Health stays open (start_server's readiness wait already relied on it) for load balancers.
        assert anonymous.health("wafer.v1.Inference") == "SERVING"
    with client(server, metadata=bearer("nope")) as wrong, pytest.raises(PermissionDeniedError):
        wrong.embed("wrong token")
    with client(server, metadata=bearer(TOKEN)) as allowed:
        assert allowed.embed("with the token").vectors.shape == (1, 384)
        assert allowed.list_models()

    # Reflection stays open as well: it describes the API, nothing more.
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert "wafer.v1.Models" in {s.name for s in reply.list_services_response.service}


# TLS


def test_tls(running: list[ServerProcess], tmp_path: Path, models: Path, tls: TlsFiles) -> None:
    trusted: ClientOptions = {"root_certificates": tls.read("ca")}
    server = serve(
        running,
        tmp_path,
        models,
        "--tls-cert",
        str(tls.server_cert),
        "--tls-key",
        str(tls.server_key),
        client_options=trusted,
    )
    with client(server, root_certificates=tls.read("ca")) as right:
        assert right.embed("over TLS").vectors.shape == (1, 384)
    with client(server, root_certificates=tls.read("other_ca")) as wrong, pytest.raises(UnavailableError):
        wrong.embed("the server's certificate is not from this CA")
    with client(server) as plaintext, pytest.raises(UnavailableError):
        plaintext.embed("no TLS at all")
    # The CLI trusts the CA it is given.
    health = wafer_cli(server, "--tls-ca", str(tls.ca), "health")
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr


def test_mutual_tls(running: list[ServerProcess], tmp_path: Path, models: Path, tls: TlsFiles) -> None:
    with_certificate: ClientOptions = {
        "root_certificates": tls.read("ca"),
        "certificate_chain": tls.read("client_cert"),
        "private_key": tls.read("client_key"),
    }
    server = serve(
        running,
        tmp_path,
        models,
        "--tls-cert",
        str(tls.server_cert),
        "--tls-key",
        str(tls.server_key),
        "--tls-client-ca",
        str(tls.ca),
        client_options=with_certificate,
    )
    with client(server, **with_certificate) as holder:
        assert holder.embed("I have a certificate").vectors.shape == (1, 384)
    with client(server, root_certificates=tls.read("ca")) as anonymous, pytest.raises(WaferError) as raised:
        anonymous.embed("no client certificate")
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    stranger: ClientOptions = {
        "root_certificates": tls.read("ca"),
        "certificate_chain": tls.read("stranger_cert"),
        "private_key": tls.read("stranger_key"),
    }
    with client(server, **stranger) as outsider, pytest.raises(UnavailableError):
        outsider.embed("a certificate from another CA")
    cli = wafer_cli(
        server,
        "--tls-ca",
        str(tls.ca),
        "--tls-client-cert",
        str(tls.client_cert),
        "--tls-client-key",
        str(tls.client_key),
        "health",
    )
    assert cli.returncode == 0, cli.stderr


# Unix socket


def test_unix_socket_is_private_and_not_stolen(running: list[ServerProcess], tmp_path: Path, models: Path) -> None:
    # Short and under /tmp: unix socket paths are limited to about 100 bytes.
    path = Path(f"/tmp/wafer-sec-{os.getpid()}.sock")
    path.unlink(missing_ok=True)
    try:
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(str(path))  # what a killed server leaves behind: a socket file nobody listens on
        server = serve(running, tmp_path, models, address=f"unix://{path}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with client(server) as local:
            assert local.embed("over a private socket").vectors.shape == (1, 384)

        # A second server must not take the socket from the running one.
        second = serve_expecting_failure(tmp_path / "second", models, "--address", f"unix://{path}")
        assert second.returncode == 2, second.stderr
        assert "another server is listening" in second.stderr
        with client(server) as local:
            assert local.health() == "SERVING"
    finally:
        for server in running:
            server.stop()
        path.unlink(missing_ok=True)


# Exposure


def test_remote_address_without_token_is_refused(tmp_path: Path, models: Path) -> None:
    refused = serve_expecting_failure(tmp_path / "data", models, "--address", "0.0.0.0:0")
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0:0" in refused.stderr
    assert "--allow-remote-admin" in refused.stderr and "Traceback" not in refused.stderr


def test_remote_address_with_allow_remote_admin(running: list[ServerProcess], tmp_path: Path, models: Path) -> None:
    # Bound to every interface; start_server and this test connect through 127.0.0.1 only.
    server = serve(running, tmp_path, models, "--allow-remote-admin", address="0.0.0.0:0")
    assert server.address.startswith("127.0.0.1:")
    with client(server) as local:
        assert [m.name for m in local.list_models()] == ["minilm"]
