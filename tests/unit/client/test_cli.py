"""The `wafer` command, driven through typer's CliRunner against the fake server."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from tests.unit.client.fake_server import REPLY, FakeServer, Script
from wafer_client import WaferClient
from wafer_client.cli import app
from wafer_proto.v1 import models_pb2

runner = CliRunner()
# Wide enough that rich tables do not fold the cells the assertions look for.
WIDE = {"COLUMNS": "200"}


def wafer(server: FakeServer, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--address", server.address, *args], env=WIDE)
    return result.exit_code, result.stdout, result.stderr


def test_embed_json(fake_server: FakeServer, script: Script) -> None:
    code, out, _ = wafer(fake_server, "embed", "--json", "--query", "--dimensions", "3", "hello", "world")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "fake-embed" and data["dimensions"] == 3
    assert len(data["embeddings"]) == 2 and len(data["embeddings"][0]) == 3
    assert data["embeddings"][1][0] == pytest.approx(1.0)
    assert script.requests["Embed"][0].input_type == 1


def test_embed_preview(fake_server: FakeServer, script: Script) -> None:
    code, out, _ = wafer(fake_server, "embed", "hello", "[bold]not markup[/]")
    assert code == 0
    assert "fake-embed: 2 x 4" in out
    assert "+1.1000" in out and "[bold]not markup" in out


def test_models_list(fake_server: FakeServer, script: Script) -> None:
    code, out, _ = wafer(fake_server, "models", "list")
    assert code == 0
    for text in (
        "fake-embed",
        "fake-generate",
        "onnx",
        "embed, rerank",
        "ready",
        "23",
        "weights not found",
    ):
        assert text in out
    code, out, _ = wafer(fake_server, "models", "list", "--json")
    assert [m["name"] for m in json.loads(out)] == ["fake-embed", "fake-generate", "broken"]


def test_models_load_unload_get(fake_server: FakeServer, script: Script) -> None:
    code, out, _ = wafer(fake_server, "models", "load", "fake-generate")
    assert code == 0 and "fake-generate: loaded, now ready (98.0 MB, in 1.25 s)" in out
    code, out, _ = wafer(fake_server, "models", "unload", "fake-generate", "--drain-timeout", "3")
    assert code == 0 and "unloaded" in out
    assert script.requests["UnloadModel"][0].drain_timeout_seconds == 3
    code, out, _ = wafer(fake_server, "models", "get", "fake-embed", "--json")
    assert json.loads(out)["last_used"].startswith("2023-11-14T22:13:20")
    code, _, err = wafer(fake_server, "models", "load", "broken")
    assert code == 1 and "weights not found" in err


def test_models_load_with_a_spec_pin_and_keep_alive(fake_server: FakeServer, script: Script, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("source: models/other.onnx\nthreads: 1\n")
    code, out, _ = wafer(
        fake_server, "models", "load", "fake-embed", "--spec", str(spec), "--pin", "--keep-alive", "90"
    )
    assert code == 0 and "fake-embed: loaded" in out
    request = script.requests["LoadModel"][0]
    assert request.spec == "source: models/other.onnx\nthreads: 1\n"
    assert request.HasField("pinned") and request.pinned
    assert request.keep_alive_seconds == 90
    code, _, _ = wafer(fake_server, "models", "load", "fake-embed")
    plain = script.requests["LoadModel"][1]
    assert not plain.spec and not plain.HasField("pinned") and not plain.HasField("keep_alive_seconds")


def test_models_quantize_and_pull(fake_server: FakeServer, script: Script) -> None:
    code, out, _ = wafer(fake_server, "models", "quantize", "fake-embed", "--name", "fake-int8", "--per-tensor")
    assert code == 0 and "fake-int8: quantized, now ready" in out
    request = script.requests["QuantizeModel"][0]
    assert (request.source_model, request.name, request.per_tensor) == ("fake-embed", "fake-int8", True)
    assert request.method == models_pb2.QUANTIZATION_METHOD_DYNAMIC
    code, _, _ = wafer(fake_server, "models", "quantize", "fake-embed", "--name", "fake-static", "--static")
    assert code == 0
    assert script.requests["QuantizeModel"][1].method == models_pb2.QUANTIZATION_METHOD_STATIC
    code, out, err = wafer(fake_server, "models", "pull", "fake-embed")
    assert code == 0, err
    assert "verified" in err and "every file is in the server's model cache" in out


def test_generate_streams_to_stdout_and_usage_to_stderr(fake_server: FakeServer, script: Script) -> None:
    code, out, err = wafer(
        fake_server, "generate", "Say hi", "--raw", "--max-tokens", "5", "--seed", "1", "--stop", "\n", "--stop", "."
    )
    assert code == 0
    assert out == "".join(REPLY) + "\n"
    assert f"3 prompt + {len(REPLY)} completion tokens" in err and "finish: stop" in err
    request = script.requests["Generate"][0]
    assert request.prompt == "Say hi" and list(request.stop) == ["\n", "."] and request.seed == 1


def test_generate_uses_the_chat_template_by_default(fake_server: FakeServer, script: Script) -> None:
    code, _, _ = wafer(fake_server, "generate", "hi")
    assert code == 0
    request = script.requests["Generate"][0]
    assert request.prompt == "" and [(m.role, m.content) for m in request.messages] == [("user", "hi")]
    code, _, err = wafer(fake_server, "generate", "hi", "--raw", "--system", "be brief")
    assert code != 0 and "--system" in err


def test_generate_chat_with_system(fake_server: FakeServer, script: Script) -> None:
    code, _, _ = wafer(fake_server, "generate", "hi", "--system", "be brief")
    assert code == 0
    request = script.requests["Generate"][0]
    assert request.prompt == ""
    assert [(m.role, m.content) for m in request.messages] == [("system", "be brief"), ("user", "hi")]


def test_generate_error_midway_keeps_the_text_and_fails(fake_server: FakeServer, script: Script) -> None:
    code, out, err = wafer(fake_server, "generate", "fail-midway", "--raw")
    assert code == 1
    assert out == "".join(REPLY[:2]) + "\n"
    assert "error: UNAVAILABLE: model is being unloaded" in err


def test_error_exits_1_with_code_and_details(fake_server: FakeServer, script: Script) -> None:
    code, out, err = wafer(fake_server, "models", "get", "nope")
    assert code == 1
    assert err.splitlines()[0] == "error: NOT_FOUND: unknown model 'nope'"
    assert "request id: req-404" in err
    assert "Traceback" not in out + err


def test_scripted_error_on_rerank(fake_server: FakeServer, script: Script) -> None:
    script.fail("Rerank", grpc.StatusCode.FAILED_PRECONDITION, "model 'x' cannot rerank")
    code, _, err = wafer(fake_server, "rerank", "q", "d1", "d2")
    assert code == 1 and err.startswith("error: FAILED_PRECONDITION: model 'x' cannot rerank")


def test_rerank_table(fake_server: FakeServer, script: Script) -> None:
    code, out, _ = wafer(fake_server, "rerank", "cat mat", "dogs bark", "the cat on the mat", "--top-n", "1")
    assert code == 0 and "the cat on the mat" in out and "dogs bark" not in out
    code, out, _ = wafer(fake_server, "rerank", "cat mat", "dogs bark", "cat mat", "--json")
    assert [r["index"] for r in json.loads(out)["results"]] == [1, 0]


def test_search_collections_and_health(fake_server: FakeServer, script: Script) -> None:
    code, _, err = wafer(fake_server, "search", "q", "--collection", "nothing-here")
    assert code == 1 and err.startswith("error: NOT_FOUND: unknown collection")
    with WaferClient(fake_server.address) as client:
        client.upsert("docs", [{"id": "1", "text": "red apple pie"}, {"id": "2", "text": "green tea"}])
    code, out, _ = wafer(fake_server, "search", "red apple", "-c", "docs", "--top-k", "1")
    assert code == 0 and "red apple pie" in out and "green" not in out
    code, _, err = wafer(fake_server, "search", "tea", "-c", "docs", "--filter", "nokey")
    assert code != 0 and "KEY=VALUE" in err
    code, out, _ = wafer(fake_server, "collections", "--json")
    assert json.loads(out) == [
        {"name": "docs", "model": "fake-embed", "dimensions": 4, "documents": 2, "context_id": ""}
    ]
    code, out, _ = wafer(fake_server, "health")
    assert code == 0 and out.strip() == "SERVING"
    code, out, _ = wafer(fake_server, "health", "--service", "wafer.v1.Index")
    assert code == 1 and out.strip() == "NOT_SERVING"


def test_unreachable_server(script: Script) -> None:
    result = runner.invoke(app, ["--address", "127.0.0.1:1", "--timeout", "2", "models", "list"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ")


def test_headers_are_sent(fake_server: FakeServer, script: Script) -> None:
    code, _, _ = wafer(fake_server, "-H", "Authorization: Bearer abc", "--header", "x-team=ml:blue", "models", "list")
    assert code == 0
    assert script.metadata["ListModels"][0]["authorization"] == "Bearer abc"
    assert script.metadata["ListModels"][0]["x-team"] == "ml:blue"
    code, _, err = wafer(fake_server, "-H", "no separator", "models", "list")
    assert code == 2 and "--header" in err


def test_address_from_environment(fake_server: FakeServer, script: Script) -> None:
    result = runner.invoke(app, ["health"], env={"WAFER_ADDRESS": fake_server.unix_address})
    assert result.exit_code == 0 and result.stdout.strip() == "SERVING"


# serve


def test_serve_passes_only_given_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[dict[str, object]] = []
    fake = types.ModuleType("wafer.app")
    fake.main = seen.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wafer.app", fake)
    models = tmp_path / "models.yaml"
    result = runner.invoke(app, ["serve", "--threads", "2", "--log-format", "json", "--models", str(models)])
    assert result.exit_code == 0, result.output
    assert seen == [{"threads": 2, "log_format": "json", "models_file": models}]

    seen.clear()
    runner.invoke(app, ["--address", "unix:///tmp/w.sock", "serve", "--log-level", "debug"])
    assert seen == [{"address": "unix:///tmp/w.sock", "log_level": "debug"}]

    seen.clear()
    runner.invoke(app, ["serve"], env={"WAFER_ADDRESS": "0.0.0.0:1"})
    assert seen == [{}]  # the environment is the server's own business


def test_serve_without_the_server_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wafer.app", None)
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "install wafer[server]" in result.stderr


def test_serve_is_the_servers_command_found_by_entry_point() -> None:
    (serve,) = [c.callback for c in app.registered_commands if c.name == "serve"]
    assert serve is not None and serve.__module__ == "wafer.cli"
