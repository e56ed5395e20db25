"""A client in another language, built only from protos/: the Node.js client (clients/node) calls
every RPC of the real server through `node clients/node/smoke.mjs ADDRESS`, which prints one JSON
summary of what it got back."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import ServerProcess

pytestmark = pytest.mark.e2e

NODE_CLIENT = ROOT / "clients" / "node"
SMOKE_SCRIPT = NODE_CLIENT / "smoke.mjs"
SMOKE_TIMEOUT_SECONDS = 120
WAFER_RPCS = {
    "wafer.v1.Inference/Embed",
    "wafer.v1.Inference/Rerank",
    "wafer.v1.Inference/Generate",
    "wafer.v1.Models/ListModels",
    "wafer.v1.Models/GetModel",
    "wafer.v1.Models/LoadModel",
    "wafer.v1.Models/UnloadModel",
    "wafer.v1.Models/QuantizeModel",
    "wafer.v1.Models/PullModel",
    "wafer.v1.Index/Upsert",
    "wafer.v1.Index/Search",
    "wafer.v1.Index/GetDocuments",
    "wafer.v1.Index/DeleteDocuments",
    "wafer.v1.Index/ListCollections",
}


@pytest.fixture(scope="module")
def smoke(server: ServerProcess) -> dict[str, Any]:
    """Run the Node smoke test once against the session's server; its parsed JSON summary."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("`node` is not on PATH: the Node.js client needs Node.js 18 or newer")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("clients/node/node_modules is missing: run `make install` (it runs `npm ci --prefix clients/node`)")
    completed = subprocess.run(
        [node, str(SMOKE_SCRIPT), server.address],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_SECONDS,
        check=False,
        cwd=ROOT,
    )
    assert completed.returncode == 0, (
        f"smoke.mjs exited {completed.returncode}\nstderr:\n{completed.stderr}\nstdout:\n{completed.stdout}"
    )
    summary: dict[str, Any] = json.loads(completed.stdout)
    return summary


def test_every_rpc_is_called(smoke: dict[str, Any]) -> None:
    assert set(smoke["rpcs"]) >= WAFER_RPCS | {"grpc.health.v1.Health/Check"}
    assert smoke["not_called"] == []


def test_health(smoke: dict[str, Any]) -> None:
    assert smoke["health"]["inference"] == "SERVING"
    assert smoke["health"]["server"] == "SERVING"


def test_health_watch_streams_the_status(smoke: dict[str, Any]) -> None:
    assert smoke["health"]["watch"] == {"status": "SERVING"}


def test_embed_and_rerank(smoke: dict[str, Any]) -> None:
    embed = smoke["embed"]
    assert embed["model"] == "minilm"
    assert embed["dims"] == [384, 384]
    assert embed["norm"] == pytest.approx(1.0, abs=1e-4)
    assert embed["usage"]["prompt_tokens"] > 2
    rerank = smoke["rerank"]
    assert rerank["model"] == "minilm"
    assert rerank["top_index"] == 2
    assert rerank["top_document"] == "The meeting has been moved to 3pm on Thursday in room B."
    assert rerank["sorted"] and rerank["count"] == 4


def test_generate_streams(smoke: dict[str, Any]) -> None:
    generate = smoke["generate"]
    assert generate["model"] == "smollm2"
    assert generate["chunks"] > 1, "tokens should arrive as a stream, not one message"
    assert generate["text"].strip()
    assert generate["unfinished_before_last"]
    assert generate["finish_reason"] in {"FINISH_REASON_LENGTH", "FINISH_REASON_STOP"}
    usage = generate["usage"]
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert generate["time_to_first_token_ms"] > 0
    assert generate["early_break_chunks"] == 1


def test_models(smoke: dict[str, Any]) -> None:
    states = smoke["list_models"]
    assert states["minilm"] == "MODEL_STATE_READY"
    assert states["smollm2"] == "MODEL_STATE_READY"
    assert "paraphrase-minilm-l3" in states
    minilm = smoke["minilm"]
    assert set(minilm["tasks"]) == {"TASK_EMBED", "TASK_RERANK"}
    assert "TASK_EMBED" in minilm["default_for"]
    assert minilm["dimensions"] == 384
    assert int(minilm["memory_bytes"]) > 0, "uint64 arrives as a decimal string"
    on_demand = smoke["on_demand"]
    assert on_demand["load_policy"] == "LOAD_POLICY_ON_DEMAND"
    assert on_demand["load_state"] == "MODEL_STATE_READY"
    assert int(on_demand["load_memory_bytes"]) > 0
    assert (on_demand["embed_model"], on_demand["embed_dims"]) == ("paraphrase-minilm-l3", 384)
    assert on_demand["last_used"] is not None
    assert on_demand["unload_state"] == "MODEL_STATE_UNLOADED"
    assert on_demand["state_after"] == "MODEL_STATE_UNLOADED"
    assert on_demand["memory_bytes_after"] == "0"
    assert on_demand["not_loaded_reason_after"].startswith("unloaded by admin at ")
    assert smoke["quantize_error"]["code_name"] == "FAILED_PRECONDITION"
    assert "only ONNX models can be quantized" in smoke["quantize_error"]["details"]
    assert smoke["pull_error"]["code_name"] == "FAILED_PRECONDITION"
    assert "nothing to pull" in smoke["pull_error"]["details"]


def test_index(smoke: dict[str, Any]) -> None:
    index = smoke["index"]
    assert index["upsert_model"] == "minilm"
    assert index["upsert_ids"] == ["n1", "n2", "n3"]
    assert index["search_top_id"] == "n1"
    assert len(index["search_ids"]) == 2
    assert index["search_scores"][0] > index["search_scores"][1]
    assert index["search_top_payload"] == {"sender": "ann", "urgent": True}
    assert index["filtered_ids"] == ["n2"]
    assert index["get_ids"] == ["n3", "n1"]
    assert index["get_payloads"]["n3"] == {"sender": "shop", "tags": ["a", "b"]}
    assert index["after_delete_ids"] == ["n1", "n3"]
    collection = index["collection"]
    assert (collection["name"], collection["model"], collection["dimensions"]) == ("node-smoke", "minilm", 384)
    assert collection["documents"] == "2"


def test_errors_carry_the_grpc_status(smoke: dict[str, Any]) -> None:
    # The default embedder takes no context: refused, and the vectors it returns name none.
    assert smoke["context_error"]["code_name"] == "INVALID_ARGUMENT"
    assert "takes no context" in smoke["context_error"]["details"]
    assert smoke["embed"]["context_id"] == ""
    for error in (smoke["error"], smoke["stream_error"]):
        assert (error["code"], error["code_name"]) == (5, "NOT_FOUND")
        assert "unknown model 'nope'" in error["details"]
        assert error["request_id"]
