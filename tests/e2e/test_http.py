"""The OpenAI-compatible HTTP door on the real server and the real default models, driven by clients
nobody on the team wrote: the official `openai` package, LangChain's OpenAIEmbeddings, and raw
HTTP (httpx) where a client library would hide what is on the wire."""

from __future__ import annotations

import json
import signal
import ssl
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import yaml
from langchain_openai import OpenAIEmbeddings
from openai.types.chat import ChatCompletionMessageParam

from tests.certs import write_tls_files
from tests.conftest import MODELS_YAML
from tests.e2e.conftest import ServerProcess, start_server
from wafer_client import ClientOptions, WaferClient

pytestmark = pytest.mark.e2e

TOKEN = "http-door-token"
# Small, so the body-size test sends little; every other request here is far below it.
BODY_LIMIT = 1 << 20
MEETING_DOCUMENTS = [
    "The train to Edinburgh leaves at 9:15 from platform 4.",
    "Your parcel has been delivered to the front door.",
    "The meeting has been moved to 3pm on Thursday in room B.",
    "Happy birthday! Hope you have a great day.",
]


def fresh(*texts: str) -> list[str]:
    """New texts each run: the server's embedding cache must not answer for the model."""
    nonce = uuid.uuid4().hex[:8]
    return [f"{text} ({nonce})" for text in texts]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's models.yaml plus `minilm-q8`: minilm with lanes of 8 inputs, to fill."""
    catalog = yaml.safe_load(MODELS_YAML.read_text(encoding="utf-8"))
    catalog["models"]["minilm-q8"] = {
        **catalog["models"]["minilm"],
        "load": "on_demand",
        "batching": {"queue_capacity": 8},
    }
    path = tmp_path_factory.mktemp("http-models") / "models.yaml"
    path.write_text(yaml.safe_dump(catalog), encoding="utf-8")
    return path


def serve_http(
    data_dir: Path,
    catalog: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    client_options: ClientOptions | None = None,
) -> ServerProcess:
    token_file = data_dir.parent / f"{data_dir.name}.token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    return start_server(
        data_dir,
        models=catalog,
        metrics_address="127.0.0.1:0",
        env={"WAFER_MAX_MESSAGE_BYTES": str(BODY_LIMIT), **(env or {})},
        extra_args=["--http-address", "127.0.0.1:0", "--auth-token-file", str(token_file), *extra],
        client_options=client_options,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, catalog: Path) -> Iterator[ServerProcess]:
    running = serve_http(tmp_path_factory.mktemp("http-data"), catalog)
    yield running
    assert running.stop() == 0, "server did not exit cleanly on SIGTERM"


@pytest.fixture(scope="module")
def base_url(server: ServerProcess) -> str:
    assert server.http_address is not None
    return f"http://{server.http_address}/v1"


@pytest.fixture(scope="module")
def oai(base_url: str) -> Iterator[openai.OpenAI]:
    # No retries: a refusal must reach the test as the exception the client raises.
    with openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def raw(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server: ServerProcess) -> Iterator[WaferClient]:
    bearer = {"authorization": f"Bearer {TOKEN}"}  # the admin RPCs (unload) need it
    with WaferClient(server.address, timeout=120, retries=0, metadata=bearer) as client:
        yield client


def log_line(server: ServerProcess, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for record in server.logs():
            if record.get("event") == "http" and record.get("request_id") == request_id:
                return record
        time.sleep(0.05)
    raise AssertionError(f"no log line for request {request_id}")


# -- Embeddings ------------------------------------------------------------------------------------


def test_openai_embeddings_float_and_base64_equal_grpc_embed(oai: openai.OpenAI, grpc_client: WaferClient) -> None:
    texts = fresh("Are we still on for lunch tomorrow?", "Ünïcödé café 🙂", "Running late, 10 minutes")
    as_floats = oai.embeddings.create(model="minilm", input=texts, encoding_format="float")
    # The openai package asks for base64 when given no format, and decodes it itself.
    as_base64 = oai.embeddings.create(model="minilm", input=texts)
    expected = grpc_client.embed(texts, model="minilm").vectors
    floats = np.array([d.embedding for d in as_floats.data], dtype=np.float32)
    decoded = np.array([d.embedding for d in as_base64.data], dtype=np.float32)
    assert [d.index for d in as_floats.data] == [0, 1, 2]
    assert as_floats.model == "minilm"
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens > len(texts)
    np.testing.assert_allclose(floats, expected, atol=1e-6)
    np.testing.assert_array_equal(decoded, floats)


def test_openai_embeddings_dimensions_user_and_a_single_string(oai: openai.OpenAI, server: ServerProcess) -> None:
    result = oai.embeddings.with_raw_response.create(
        model="minilm", input="hello there", dimensions=128, user="user-42", encoding_format="float"
    )
    parsed = result.parse()
    assert len(parsed.data) == 1
    vector = np.array(parsed.data[0].embedding)
    assert vector.shape == (128,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5  # cut, then normalized, as gRPC Embed does
    record = log_line(server, result.headers["x-request-id"])
    assert record["user"] == "user-42"
    assert record["method"] == "POST /v1/embeddings"


def test_langchain_openai_embeddings_match_grpc(base_url: str, grpc_client: WaferClient) -> None:
    embeddings = OpenAIEmbeddings(
        model="minilm",
        base_url=base_url,
        api_key=TOKEN,  # type: ignore[arg-type]  # langchain wants a SecretStr and takes a str
        max_retries=0,
        # LangChain otherwise counts tokens with tiktoken, which downloads its encodings from the
        # internet on first use (tests never touch the network), and sends token ids, which Wafer
        # refuses: it tokenizes with each model's own tokenizer.
        check_embedding_ctx_length=False,
    )
    documents = fresh("The meeting moved to 3pm.", "Your parcel was delivered.", "Happy birthday!")
    query = fresh("when is the meeting?")[0]
    vectors = np.array(embeddings.embed_documents(documents), dtype=np.float32)
    query_vector = np.array(embeddings.embed_query(query), dtype=np.float32)
    np.testing.assert_allclose(vectors, grpc_client.embed(documents, model="minilm").vectors, atol=1e-6)
    np.testing.assert_allclose(query_vector, grpc_client.embed(query, model="minilm").vectors[0], atol=1e-6)
    assert int(np.argmax(vectors @ query_vector)) == 0


# -- Rerank ----------------------------------------------------------------------------------------


def test_rerank_over_raw_http(raw: httpx.Client, grpc_client: WaferClient) -> None:
    body = {
        "model": "minilm",
        "query": "what time is the meeting?",
        "documents": MEETING_DOCUMENTS,
        "top_n": 2,
        "return_documents": True,
    }
    response = raw.post("/rerank", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == "minilm"
    assert answer["results"][0]["index"] == 2
    assert len(answer["results"]) == 2
    assert answer["results"][0]["document"] == {"text": MEETING_DOCUMENTS[2]}
    expected = grpc_client.rerank("what time is the meeting?", MEETING_DOCUMENTS, model="minilm", top_n=2)
    for got, want in zip(answer["results"], expected.results, strict=True):
        assert got["index"] == want.index
        assert got["relevance_score"] == pytest.approx(want.score, abs=1e-6)
    # Jina's document objects are accepted too; without return_documents none come back.
    objects = raw.post("/rerank", json={"query": "birthday", "documents": [{"text": d} for d in MEETING_DOCUMENTS]})
    assert objects.status_code == 200, objects.text
    assert objects.json()["results"][0]["index"] == 3
    assert all("document" not in r for r in objects.json()["results"])


# -- Generation ------------------------------------------------------------------------------------

CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Name three colours."},
]
# The same chat for the gRPC client.
CHAT_MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three colours."}]


def test_chat_completion_equals_grpc_generate(oai: openai.OpenAI, grpc_client: WaferClient) -> None:
    answer = oai.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0, seed=7)
    expected = "".join(
        c.text
        for c in grpc_client.generate(messages=CHAT_MESSAGES, model="smollm2", max_tokens=12, temperature=0, seed=7)
    )
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.finish_reason == "length"
    assert answer.model == "smollm2"
    assert answer.object == "chat.completion"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12


def test_streamed_chat_completion_with_usage(oai: openai.OpenAI, server: ServerProcess) -> None:
    whole = oai.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0)
    with oai.chat.completions.with_streaming_response.create(
        model="smollm2",
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(deltas) == whole.choices[0].message.content
    assert finishes == ["length"]
    # OpenAI's layout: usage null on every chunk but the last, which has no choices.
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    record = log_line(server, request_id)
    assert record["method"] == "POST /v1/chat/completions"
    assert record["status"] == "OK"
    assert record["http_status"] == 200
    assert record["model"] == "smollm2"


def test_sse_stream_ends_with_done(raw: httpx.Client) -> None:
    body = {"model": "smollm2", "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
    with raw.stream("POST", "/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert "usage" not in json.loads(lines[-2].removeprefix("data: "))  # not asked for


def test_completions_with_a_stop_sequence_streamed_and_not(oai: openai.OpenAI, grpc_client: WaferClient) -> None:
    prompt = "Monday, Tuesday, Wednesday,"
    free = "".join(c.text for c in grpc_client.generate(prompt, model="smollm2", max_tokens=16, temperature=0))
    stop = free.strip()[4:8]  # something the model writes a few tokens in
    assert stop.strip(), free
    cut = free[: free.index(stop)]
    answer = oai.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert answer.choices[0].text == cut
    assert answer.choices[0].finish_reason == "stop"
    assert answer.object == "text_completion"
    streamed = list(
        oai.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(oai: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        answer = oai.completions.create(
            model="smollm2", prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=seed
        )
        return answer.choices[0].text

    assert sample(1234) == sample(1234)


# -- Models and access -----------------------------------------------------------------------------


def test_models_need_the_token_like_the_admin_rpcs(base_url: str, oai: openai.OpenAI, raw: httpx.Client) -> None:
    names = {m.id for m in oai.models.list()}
    assert {"minilm", "smollm2", "minilm-q8"} <= names
    minilm = oai.models.retrieve("minilm")
    assert minilm.owned_by == "wafer"
    with pytest.raises(openai.NotFoundError) as unknown:
        oai.models.retrieve("nope")
    assert unknown.value.request_id
    missing = raw.get("/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    with openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.PermissionDeniedError):
            wrong.models.list()
        # Inference stays open without auth_all_rpcs, as over gRPC.
        assert wrong.embeddings.create(model="minilm", input="open").data


def test_auth_errors_as_openai_exceptions(base_url: str) -> None:
    # Credentials that are not a bearer token are no credentials: 401, openai's AuthenticationError.
    with (
        openai.OpenAI(
            base_url=base_url, api_key="unused", max_retries=0, default_headers={"Authorization": "Basic d2FmZXI="}
        ) as basic,
        pytest.raises(openai.AuthenticationError) as raised,
    ):
        basic.models.list()
    assert raised.value.status_code == 401
    assert "Bearer" in raised.value.message


# -- Errors ----------------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("empty input", {"model": "minilm", "input": ""}, "inputs[0] is empty", None),
    ("token ids", {"model": "minilm", "input": [[101, 2023]]}, "token ids", "input"),
    ("dimensions", {"model": "minilm", "input": "x", "dimensions": 999}, "more than model", None),
    ("wrong type", {"model": "minilm", "input": "x", "dimensions": "many"}, "dimensions", "dimensions"),
    ("too long", {"model": "minilm", "input": "word " * 2000}, "truncate", None),
]


@pytest.mark.parametrize(("what", "body", "message", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_embeddings_are_bad_request_errors(
    oai: openai.OpenAI, what: str, body: dict[str, Any], message: str, param: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        oai.post("/embeddings", body=body, cast_to=httpx.Response)
    error = raised.value
    assert error.status_code == 400
    assert message in error.message
    assert error.param == param
    assert error.code in {"invalid_argument", "failed_precondition"}
    assert error.request_id
    assert oai.embeddings.create(model="minilm", input="still serving").data


def test_generation_errors_as_openai_exceptions(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'") as unknown:
        oai.chat.completions.create(model="nope", messages=CHAT)
    assert unknown.value.code == "not_found"
    with pytest.raises(openai.BadRequestError, match="cannot generate"):  # an embedding model
        oai.chat.completions.create(model="minilm", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.completions.create(model="smollm2", prompt="x", max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.completions.create(model="smollm2", prompt="x", temperature=7)
    with pytest.raises(openai.BadRequestError) as several:
        oai.chat.completions.create(model="smollm2", messages=CHAT, n=2)
    assert several.value.param == "n"
    # A stream that fails before its first token fails with its status, not inside the stream.
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=CHAT, stream=True)


def test_unknown_embedding_model_is_not_found(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        oai.embeddings.create(model="text-embedding-3-small", input="x")
    assert raised.value.status_code == 404
    assert "known models" in raised.value.message


def test_malformed_requests_get_a_clear_4xx_and_the_server_keeps_serving(raw: httpx.Client) -> None:
    cases = [
        (raw.post("/embeddings", content=b'{"input": "x",', headers={"content-type": "application/json"}), 400),
        (raw.post("/embeddings", content=b'["x"]', headers={"content-type": "application/json"}), 400),
        (raw.post("/embeddings", content=b'{"input": "x"}', headers={"content-type": "text/plain"}), 415),
        (raw.post("/embeddings", data={"input": "x"}), 415),  # a form, as curl -d sends
        (raw.post("/embeddings", json={"input": "x" * (BODY_LIMIT + 10)}), 413),
        (raw.post("/nowhere", json={}), 404),
        (raw.get("/embeddings"), 405),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"]
        assert set(error) == {"message", "type", "param", "code"}
    assert "not valid JSON" in cases[0][0].json()["error"]["message"]
    assert "Content-Type: application/json" in cases[2][0].json()["error"]["message"]
    assert "byte limit" in cases[4][0].json()["error"]["message"]
    assert raw.post("/embeddings", json={"input": "still serving"}).status_code == 200


def test_request_ids_logs_and_metrics(raw: httpx.Client, server: ServerProcess) -> None:
    request_id = f"http-{uuid.uuid4().hex}"
    response = raw.post("/embeddings", json={"model": "minilm", "input": "hi"}, headers={"x-request-id": request_id})
    assert response.headers["x-request-id"] == request_id
    record = log_line(server, request_id)
    assert record["status"] == "OK"
    assert record["model"] == "minilm"
    assert record["duration_ms"] >= record["inference_ms"] > 0
    refused = raw.post("/embeddings", json={"model": "nope", "input": "hi"})
    assert refused.status_code == 404
    assert log_line(server, refused.headers["x-request-id"])["status"] == "NOT_FOUND"
    metrics_address = next(r["address"] for r in server.logs() if r.get("event") == "metrics listening")
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as scraped:
        text = scraped.read().decode("utf-8")
    assert 'wafer_requests_total{code="OK",method="POST /v1/embeddings",model="minilm"}' in text
    assert 'wafer_requests_total{code="NOT_FOUND",method="POST /v1/embeddings",model=""}' in text


def test_a_full_batch_lane_is_a_rate_limit_error_with_retry_after(base_url: str, raw: httpx.Client) -> None:
    """`X-Wafer-Priority: batch` puts the requests in the batch lane (the refusal names it), whose
    8 places fill; a refusal is openai's RateLimitError with Retry-After from the scheduler's hint."""
    refused: list[openai.RateLimitError] = []
    served = 0
    lock = threading.Lock()

    def bulk(i: int) -> None:
        nonlocal served
        with openai.OpenAI(
            base_url=base_url, api_key="unused", max_retries=0, default_headers={"X-Wafer-Priority": "batch"}
        ) as client:
            try:
                client.embeddings.create(model="minilm-q8", input=fresh(*[f"bulk text {i} {j}" for j in range(4)]))
            except openai.RateLimitError as error:
                with lock:
                    refused.append(error)
                return
        with lock:
            served += 1

    raw.post("/embeddings", json={"model": "minilm-q8", "input": "load it"}).raise_for_status()
    with ThreadPoolExecutor(24) as pool:
        list(pool.map(bulk, range(48)))
    assert refused, "48 simultaneous 4-input requests never filled an 8-input lane"
    assert served > 0
    error = refused[0]
    assert error.status_code == 429
    assert "batch lane" in error.message
    assert int(error.response.headers["Retry-After"]) >= 1
    assert int(error.response.headers["retry-after-ms"]) >= 0
    # The interactive lane was never full, and the model serves again once the flood is over.
    assert raw.post("/embeddings", json={"model": "minilm-q8", "input": "after"}).status_code == 200


def test_priority_header_and_field_must_agree(raw: httpx.Client) -> None:
    body = {"model": "minilm", "input": "x", "priority": "interactive"}
    response = raw.post("/embeddings", json=body, headers={"X-Wafer-Priority": "batch"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "priority"
    assert raw.post("/embeddings", json={**body, "priority": "batch"}, headers={"X-Wafer-Priority": "batch"}).is_success
    assert raw.post("/embeddings", json={"input": "x"}, headers={"X-Wafer-Priority": "urgent"}).status_code == 400


def test_a_model_being_unloaded_is_service_unavailable(
    oai: openai.OpenAI, raw: httpx.Client, grpc_client: WaferClient, server: ServerProcess
) -> None:
    """While an admin unload waits for a running generation, new requests for the model get 503
    (openai's InternalServerError). The client of the running stream then hangs up: that ends the
    generation, and with it the unload's wait. Last here: smollm2 loads again after."""
    with oai.chat.completions.with_streaming_response.create(
        model="smollm2", messages=CHAT, max_tokens=400, temperature=0, stream=True
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = iter(response.parse())
        next(chunks)  # the generation holds the model
        unloaded: list[str] = []
        unloader = threading.Thread(
            target=lambda: unloaded.append(grpc_client.unload_model("smollm2", drain_timeout_seconds=120).state)
        )
        unloader.start()
        deadline = time.monotonic() + 30
        while grpc_client.get_model("smollm2").state != "unloading" and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.InternalServerError) as raised:
            oai.completions.create(model="smollm2", prompt="x", max_tokens=2)
        assert raised.value.status_code == 503
        assert "being unloaded" in raised.value.message
        refused = raw.post("/completions", json={"model": "smollm2", "prompt": "x"})
        assert refused.json()["error"]["code"] == "unavailable"
        next(chunks)  # the accepted stream still runs
    unloader.join(120)
    assert unloaded == ["unloaded"]
    record = log_line(server, request_id)
    assert (record["status"], record["http_status"]) == ("CANCELLED", 499)
    # Loaded again on demand.
    assert oai.completions.create(model="smollm2", prompt="Hello", max_tokens=2).choices[0].text is not None


def test_sigterm_drains_http_too(tmp_path: Path, catalog: Path) -> None:
    """After SIGTERM a stream accepted before it keeps running, a new request gets 503 and /health
    503; the stream's client hanging up ends its generation, and the process exits 0."""
    server = serve_http(tmp_path / "data", catalog, env={"WAFER_SHUTDOWN_GRACE_SECONDS": "120"})
    assert server.http_address is not None
    url = f"http://{server.http_address}"
    try:
        with httpx.Client(base_url=url, timeout=120) as raw:
            assert raw.get("/health").status_code == 200
            body = {"model": "smollm2", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 400, "temperature": 0, "stream": True}
            with raw.stream("POST", "/v1/completions", json=body) as stream:
                request_id = stream.headers["x-request-id"]
                lines = (line for line in stream.iter_lines() if line)
                assert next(lines).startswith("data: ")
                server.process.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while raw.get("/health").status_code != 503 and time.monotonic() < deadline:
                    time.sleep(0.02)
                late = raw.post("/v1/embeddings", json={"input": "too late"})
                assert late.status_code == 503, late.text
                assert "shutting down" in late.json()["error"]["message"]
                assert '"finish_reason":null' in next(lines)  # still generating
        assert server.process.wait(60) == 0
        record = log_line(server, request_id)
        assert (record["status"], record["http_status"]) == ("CANCELLED", 499)
        assert any(r.get("event") == "stopped" for r in server.logs())
    finally:
        server.stop()


def test_https_with_the_servers_certificate_and_client_certificates(tmp_path: Path, catalog: Path) -> None:
    """With --tls-cert/--tls-key the HTTP door serves HTTPS with the gRPC certificate; with
    --tls-client-ca it wants a client certificate from that CA, as gRPC does."""
    tls = write_tls_files(tmp_path / "tls")
    holder: ClientOptions = {
        "root_certificates": tls.read("ca"),
        "certificate_chain": tls.read("client_cert"),
        "private_key": tls.read("client_key"),
    }
    server = serve_http(
        tmp_path / "data",
        catalog,
        "--tls-cert",
        str(tls.server_cert),
        "--tls-key",
        str(tls.server_key),
        "--tls-client-ca",
        str(tls.ca),
        client_options=holder,
    )
    try:
        assert server.http_address is not None
        url = f"https://{server.http_address}/v1"
        trusted = ssl.create_default_context(cafile=str(tls.ca))
        trusted.load_cert_chain(str(tls.client_cert), str(tls.client_key))
        with openai.OpenAI(
            base_url=url, api_key=TOKEN, max_retries=0, http_client=openai.DefaultHttpxClient(verify=trusted)
        ) as client:
            assert len(client.embeddings.create(model="minilm", input="over TLS").data[0].embedding) == 384
        anonymous = ssl.create_default_context(cafile=str(tls.ca))
        with httpx.Client(verify=anonymous) as no_certificate, pytest.raises(httpx.TransportError):
            no_certificate.post(f"{url}/embeddings", json={"input": "no client certificate"})
        with httpx.Client() as plain, pytest.raises(httpx.TransportError):
            plain.post(f"http://{server.http_address}/v1/embeddings", json={"input": "plain text"})
    finally:
        assert server.stop() == 0
