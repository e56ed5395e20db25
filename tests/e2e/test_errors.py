"""Bad input gets the status of the error table (docs/architecture.md, "Errors: one table") and a
message a person can act on; the server keeps serving everyone else; every call leaves one JSON log
line."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from tests.e2e.conftest import ServerProcess
from wafer_client import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    WaferClient,
    WaferError,
)

pytestmark = pytest.mark.e2e

MEGABYTE = "lorem ipsum dolor sit amet " * (1024 * 1024 // 27)

BAD_CALLS: list[tuple[str, Callable[[WaferClient], Any], type[WaferError], str]] = [
    ("unknown model", lambda c: c.embed("x", model="nope"), NotFoundError, "unknown model 'nope'"),
    ("wrong task", lambda c: c.complete("x", model="minilm"), FailedPreconditionError, "cannot generate"),
    ("empty inputs", lambda c: c.embed([]), InvalidArgumentError, "inputs must not be empty"),
    ("empty string", lambda c: c.embed(["fine", ""]), InvalidArgumentError, r"inputs\[1\] is empty"),
    (
        "10,000 inputs",
        lambda c: c.embed(["x"] * 10_000),
        InvalidArgumentError,
        "10000 inputs .* limit is 1024",
    ),
    ("1 MB, no truncate", lambda c: c.embed(MEGABYTE), InvalidArgumentError, "set truncate=true"),
    ("empty query", lambda c: c.rerank("", ["a"]), InvalidArgumentError, "query"),
    ("no documents", lambda c: c.rerank("q", []), InvalidArgumentError, "documents must not be empty"),
    ("dimensions", lambda c: c.embed("x", dimensions=999), InvalidArgumentError, "more than model"),
    ("temperature<0", lambda c: c.complete("x", temperature=-1), InvalidArgumentError, "temperature"),
    ("temperature=1e9", lambda c: c.complete("x", temperature=1e9), InvalidArgumentError, "temperature"),
    ("top_p", lambda c: c.complete("x", top_p=7), InvalidArgumentError, "top_p"),
    ("max_tokens", lambda c: c.complete("x", max_tokens=10**9), InvalidArgumentError, "max_tokens"),
    (
        "bad role",
        lambda c: c.complete(messages=[{"role": "robot", "content": "x"}]),
        InvalidArgumentError,
        "role",
    ),
]


@pytest.mark.parametrize(("what", "call", "error", "message"), BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_gets_a_clear_status(
    client: WaferClient, what: str, call: Callable[[WaferClient], Any], error: type[WaferError], message: str
) -> None:
    with pytest.raises(error, match=message) as raised:
        call(client)
    assert raised.value.request_id, "every error carries the request id"
    # The server keeps serving.
    assert client.embed("still serving").vectors.shape == (1, 384)


def test_a_megabyte_input_is_cut_when_truncate_is_on(client: WaferClient) -> None:
    result = client.embed(MEGABYTE, truncate=True)
    assert result.vectors.shape == (1, 384)
    assert result.usage.prompt_tokens == 256


def test_a_raw_stub_sees_the_documented_status(server: ServerProcess) -> None:
    """What a client in another language sees: the status code and a message, no stack trace."""
    from wafer_proto.v1 import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Embed(inference_pb2.EmbedRequest(model="nope", inputs=["x"]))
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
        assert "Traceback" not in (raised.value.details() or "")


def test_one_json_log_line_per_request(server: ServerProcess, client: WaferClient) -> None:
    client.embed("log me")
    with pytest.raises(NotFoundError) as raised:
        client.embed("x", model="nope")
    time.sleep(0.2)
    lines = [r for r in server.logs() if r.get("event") == "rpc" and r.get("method") == "/wafer.v1.Inference/Embed"]
    failure = [r for r in lines if r["request_id"] == raised.value.request_id]
    assert len(failure) == 1
    assert failure[0]["status"] == "NOT_FOUND" and failure[0]["model"] == "nope"
    ok = [r for r in lines if r["status"] == "OK"][-1]
    assert ok["model"] == "minilm"
    assert {"request_id", "duration_ms", "queue_ms", "inference_ms"} <= set(ok)
    assert all("log me" not in str(r) for r in server.logs()), "inputs stay out of the logs"
