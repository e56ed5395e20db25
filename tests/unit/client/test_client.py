"""The blocking client against the fake server: results, streaming, errors, retries, transports."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import numpy as np
import pytest

from tests.unit.client.fake_server import REPLY, FakeServer, Script
from wafer_client import (
    ChatMessage,
    Document,
    RetryPolicy,
    WaferClient,
    errors,
)

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)


@pytest.fixture
def client(fake_server: FakeServer, script: Script) -> Iterator[WaferClient]:
    with WaferClient(fake_server.address, retries=FAST, timeout=5) as c:
        yield c


# Results


def test_embed_returns_float32_matrix(client: WaferClient, script: Script) -> None:
    result = client.embed(["one text", "two texts here", "three"], model="m", input_type="query")
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (3, 4)
    assert result.dimensions == 4 and len(result) == 3
    np.testing.assert_allclose(result.vectors[2], [2.0, 2.1, 2.2, 2.3], rtol=1e-6)
    assert result.model == "m"
    assert result.usage.prompt_tokens == 6
    assert result.timings.batch_size == 3
    request = script.requests["Embed"][0]
    assert request.input_type == 1  # INPUT_TYPE_QUERY
    assert not request.HasField("normalize")


def test_embed_single_string_dimensions_and_normalize(client: WaferClient, script: Script) -> None:
    result = client.embed("just one", dimensions=2, normalize=False, priority="batch", truncate=True)
    assert result.vectors.shape == (1, 2)
    request = script.requests["Embed"][0]
    assert request.HasField("normalize") and request.normalize is False
    assert request.priority == 2 and request.truncate


def test_embed_sends_a_context(client: WaferClient, script: Script) -> None:
    client.embed("x", context_collection="notes")
    client.embed("x", context_documents=["first", "second"])
    named, built = script.requests["Embed"]
    assert (named.context_collection, list(named.context_documents)) == ("notes", [])
    assert (built.context_collection, list(built.context_documents)) == ("", ["first", "second"])
    with pytest.raises(ValueError, match="at most one"):
        client.embed("x", context_collection="notes", context_documents=["a"])
    assert script.calls["Embed"] == 2


def test_submit_job_request_carries_fresh_context() -> None:
    from wafer_client import _convert

    request = _convert.submit_job_request(
        "notes",
        [{"text": "a"}],
        model="cde-small-v1",
        when_idle=False,
        idle_seconds=0,
        when_charging=False,
        batch_size=0,
        truncate=True,
        fresh_context=True,
    )
    assert request.fresh_context and request.collection == "notes"


def test_embed_rejects_bad_choice_locally(client: WaferClient, script: Script) -> None:
    with pytest.raises(ValueError, match="input_type"):
        client.embed("x", input_type="passage")  # type: ignore[arg-type]
    assert script.calls["Embed"] == 0


def test_rerank_keeps_server_order(client: WaferClient) -> None:
    docs = ["cats sleep", "the cat sat on the mat", "dogs bark", "a cat and a mat"]
    result = client.rerank("cat mat", docs, return_documents=True)
    assert [hit.index for hit in result.results] == [1, 3, 0, 2]
    assert result.results[0].document == docs[1]
    assert result.results[0].score >= result.results[1].score
    assert [h.index for h in client.rerank("cat mat", docs, top_n=2).results] == [1, 3]


def test_rerank_refuses_a_bare_string(client: WaferClient) -> None:
    with pytest.raises(TypeError):
        client.rerank("q", "not a list")


def test_generate_streams_chunks_in_order(client: WaferClient, script: Script) -> None:
    chunks = list(client.generate("Say hi", max_tokens=8, temperature=0.0, seed=7, stop=["\n"]))
    assert [c.text for c in chunks[:-1]] == REPLY
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.is_last and last.finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == len(REPLY)
    assert last.timings is not None and last.timings.time_to_first_token_ms == 12.0
    request = script.requests["Generate"][0]
    assert request.HasField("temperature") and request.temperature == 0.0
    assert request.seed == 7 and list(request.stop) == ["\n"]
    assert not request.HasField("top_p")


def test_complete_joins_the_stream_and_sends_chat(client: WaferClient, script: Script) -> None:
    completion = client.complete(
        messages=[ChatMessage("system", "be brief"), {"role": "user", "content": "hi"}], model="g"
    )
    assert completion.text == "".join(REPLY)
    assert completion.model == "g" and completion.finish_reason == "stop"
    assert completion.usage.total_tokens == 3 + len(REPLY)
    request = script.requests["Generate"][0]
    assert [(m.role, m.content) for m in request.messages] == [("system", "be brief"), ("user", "hi")]
    assert request.prompt == ""


def test_generate_needs_exactly_one_of_prompt_and_messages(client: WaferClient) -> None:
    with pytest.raises(ValueError):
        client.generate()
    with pytest.raises(ValueError):
        client.generate("p", messages=[ChatMessage("user", "m")])


def test_stopping_early_cancels_the_stream(client: WaferClient, script: Script) -> None:
    for n, _ in enumerate(client.generate("endless"), start=1):
        if n == 3:
            break
    assert script.generate_stopped.wait(2.0)
    assert script.generate_yielded < 1000


def test_models(client: WaferClient) -> None:
    models = {m.name: m for m in client.list_models()}
    embedder = models["fake-embed"]
    assert embedder.tasks == ("embed", "rerank") and embedder.default_for == ("embed",)
    assert embedder.state == "ready" and embedder.ready
    assert embedder.load_policy == "startup" and embedder.dimensions == 4
    assert embedder.pooling == "mean" and embedder.normalize and embedder.query_prompt == "query: "
    assert embedder.last_used is None
    assert models["broken"].state == "failed" and models["broken"].error == "weights not found"

    got = client.get_model("fake-generate")
    assert got.last_used == datetime.fromtimestamp(1_700_000_000, tz=UTC)
    loaded = client.load_model("fake-generate")
    assert loaded.state == "ready" and loaded.memory_bytes == 98_000_000
    assert client.unload_model("fake-generate", drain_timeout_seconds=2.5).state == "unloaded"


def test_index_round_trip(client: WaferClient, script: Script) -> None:
    result = client.upsert(
        "notes",
        [
            Document("the cat sat", id="a", payload={"lang": "en", "n": 3}),
            {"id": "b", "text": "le chat", "payload": {"lang": "fr"}},
            "a bare cat text",
        ],
    )
    assert result.ids[:2] == ["a", "b"] and result.ids[2].startswith("derived-")

    hits = client.search("notes", "cat sat", top_k=2).hits
    assert hits[0].id == "a" and hits[0].score == pytest.approx(1.0)
    assert hits[0].payload == {"lang": "en", "n": 3.0}  # Struct numbers are doubles
    assert hits[0].vector is None

    french = client.search("notes", "chat", filter={"lang": "fr"}, with_vectors=True).hits
    assert [h.id for h in french] == ["b"]
    assert french[0].vector is not None and french[0].vector.dtype == np.float32

    docs = client.get_documents("notes", ["b", "missing", "a"], with_vectors=True)
    assert [d.id for d in docs] == ["b", "a"] and docs[0].vector is not None

    client.delete_documents("notes", ["a"])
    assert [d.id for d in client.get_documents("notes", ["a", "b"])] == ["b"]
    assert [(c.name, c.documents) for c in client.list_collections()] == [("notes", 2)]


def test_upsert_refuses_unknown_document_keys(client: WaferClient) -> None:
    with pytest.raises(ValueError, match="payload"):
        client.upsert("notes", [{"text": "x", "lang": "en"}])


def test_health(client: WaferClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("wafer.v1.Index") == "NOT_SERVING"
    with pytest.raises(errors.NotFoundError):
        client.health("no.such.Service")


# Errors


@pytest.mark.parametrize(("code", "cls"), list(errors.ERROR_BY_CODE.items()))
def test_every_status_code_maps_to_its_class(
    fake_server: FakeServer, script: Script, code: grpc.StatusCode, cls: type[errors.WaferError]
) -> None:
    script.fail("Embed", code, f"scripted {code.name}", metadata=(("x-request-id", "req-42"),))
    with WaferClient(fake_server.address, retries=0) as client, pytest.raises(cls) as caught:
        client.embed("x")
    error = caught.value
    assert type(error) is cls
    assert error.code is code
    assert error.details == f"scripted {code.name}"
    assert error.request_id == "req-42"
    assert "req-42" in str(error) and code.name in str(error)


def test_unlisted_code_is_a_plain_wafer_error(client: WaferClient, script: Script) -> None:
    script.fail("Rerank", grpc.StatusCode.ALREADY_EXISTS, "already there")
    with pytest.raises(errors.WaferError) as caught:
        client.rerank("q", ["d"])
    assert type(caught.value) is errors.WaferError
    assert caught.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert caught.value.request_id is None


def test_not_found_carries_server_details(client: WaferClient) -> None:
    with pytest.raises(errors.NotFoundError) as caught:
        client.get_model("nope")
    assert caught.value.details == "unknown model 'nope'"
    assert caught.value.request_id == "req-404"


def test_deadline(fake_server: FakeServer, script: Script) -> None:
    with WaferClient(fake_server.address, timeout=0.2) as client, pytest.raises(errors.DeadlineExceededError):
        client.embed(["slow"])
    with WaferClient(fake_server.address) as client, pytest.raises(errors.DeadlineExceededError):
        client.embed(["slow"], timeout=0.2)


def test_unreachable_server_is_unavailable() -> None:
    with (
        WaferClient("127.0.0.1:1", retries=FAST, timeout=5) as client,
        pytest.raises(errors.UnavailableError),
    ):
        client.list_models()


# Retries


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE])
def test_retryable_codes_are_retried_then_succeed(client: WaferClient, script: Script, code: grpc.StatusCode) -> None:
    script.fail("Embed", code, times=2)
    assert client.embed("x").vectors.shape == (1, 4)
    assert script.calls["Embed"] == 3


def test_retries_give_up_after_max_attempts(client: WaferClient, script: Script) -> None:
    script.fail("Embed", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", times=5)
    with pytest.raises(errors.ResourceExhaustedError, match="queue full"):
        client.embed("x")
    assert script.calls["Embed"] == 3


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL],
)
def test_other_codes_are_not_retried(client: WaferClient, script: Script, code: grpc.StatusCode) -> None:
    script.fail("Search", code, times=3)
    with pytest.raises(errors.ERROR_BY_CODE[code]):
        client.search("anything", "q")
    assert script.calls["Search"] == 1


@pytest.mark.parametrize(
    ("metadata", "wait"),
    [((("retry-after-ms", "150"),), 0.15), ((("retry-after", "0.15"),), 0.15)],
)
def test_retry_honours_server_hint(
    client: WaferClient, script: Script, metadata: tuple[tuple[str, str], ...], wait: float
) -> None:
    script.fail("Embed", grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", metadata=metadata)
    started = time.monotonic()
    client.embed("x")
    assert time.monotonic() - started >= wait
    assert script.calls["Embed"] == 2


def test_hint_longer_than_allowed_raises_with_retry_after(fake_server: FakeServer, script: Script) -> None:
    script.fail("Embed", grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", metadata=(("retry-after", "60"),))
    with (
        WaferClient(fake_server.address, retries=FAST) as client,
        pytest.raises(errors.ResourceExhaustedError) as caught,
    ):
        client.embed("x")
    assert caught.value.retry_after == 60.0
    assert script.calls["Embed"] == 1


def test_no_retry_that_would_outlive_the_deadline(fake_server: FakeServer, script: Script) -> None:
    script.fail("Embed", grpc.StatusCode.UNAVAILABLE, metadata=(("retry-after-ms", "2000"),))
    started = time.monotonic()
    with WaferClient(fake_server.address, timeout=0.5) as client, pytest.raises(errors.UnavailableError):
        client.embed("x")
    assert time.monotonic() - started < 0.5
    assert script.calls["Embed"] == 1


def test_generate_retries_before_the_first_chunk(client: WaferClient, script: Script) -> None:
    script.fail("Generate", grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert client.complete("hi").text == "".join(REPLY)
    assert script.calls["Generate"] == 2


def test_generate_is_never_retried_once_streaming(client: WaferClient, script: Script) -> None:
    received = []
    with pytest.raises(errors.UnavailableError) as caught:
        for chunk in client.generate("fail-midway"):
            received.append(chunk.text)
    assert received == REPLY[:2]
    assert caught.value.request_id == "req-midway"
    assert script.calls["Generate"] == 1


# Transport and configuration


def test_unix_socket(fake_server: FakeServer, script: Script) -> None:
    with WaferClient(fake_server.unix_address) as client:
        assert client.embed(["a", "b"]).vectors.shape == (2, 4)
    bare_path = fake_server.unix_address.removeprefix("unix://")
    with WaferClient(bare_path) as client:
        assert client.health() == "SERVING"


def test_metadata_is_sent_with_every_call(fake_server: FakeServer, script: Script) -> None:
    with WaferClient(fake_server.address, metadata={"Authorization": "Bearer t0ken"}) as client:
        client.list_models()
        list(client.generate("x"))
    assert script.metadata["ListModels"][0]["authorization"] == "Bearer t0ken"
    assert script.metadata["Generate"][0]["authorization"] == "Bearer t0ken"


def test_address_from_environment(monkeypatch: pytest.MonkeyPatch, fake_server: FakeServer, script: Script) -> None:
    monkeypatch.setenv("WAFER_ADDRESS", fake_server.address)
    with WaferClient() as client:
        assert client.address == fake_server.address
        assert client.health() == "SERVING"
