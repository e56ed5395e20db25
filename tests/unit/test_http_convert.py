"""OpenAI-style JSON ⇄ domain translation (wafer.http.convert) and the HTTP error table."""

from __future__ import annotations

import base64
import inspect
from typing import Any

import grpc
import numpy as np
import pytest

import wafer.errors
from wafer.config import Settings
from wafer.domain import (
    EmbedResult,
    FinishReason,
    InputType,
    Priority,
    RankedDocument,
    RerankResult,
    Timings,
    Usage,
)
from wafer.errors import ResourceExhaustedError, UnavailableError, WaferError
from wafer.http import convert
from wafer.http.errors import (
    HTTP_STATUS_BY_ERROR,
    InvalidFieldError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    error_body,
    http_status_for,
    retry_headers,
    status_for,
)
from wafer.rpc.status import STATUS_BY_ERROR


@pytest.fixture
def settings() -> Settings:
    return Settings(default_max_new_tokens=77)


def embeddings(**body: Any) -> convert.EmbeddingsBody:
    return convert.parse(convert.EmbeddingsBody, body)


# -- Embeddings ------------------------------------------------------------------------------------


def test_embeddings_input_as_a_string_or_a_list() -> None:
    assert convert.embed_request(embeddings(input="one"), Priority.INTERACTIVE).inputs == ["one"]
    request = convert.embed_request(embeddings(input=["a", "b"], model="m", dimensions=8), Priority.BATCH)
    assert request.inputs == ["a", "b"]
    assert (request.model, request.dimensions, request.priority) == ("m", 8, Priority.BATCH)
    assert request.input_type is InputType.DOCUMENT
    assert not request.truncate


@pytest.mark.parametrize("tokens", [[1, 2, 3], [[1, 2], [3]]])
def test_token_arrays_are_refused_with_their_own_message(tokens: list[Any]) -> None:
    with pytest.raises(InvalidFieldError, match="token ids") as raised:
        convert.embed_request(embeddings(input=tokens), Priority.INTERACTIVE)
    assert raised.value.param == "input"


@pytest.mark.parametrize("value", [None, 5, {"text": "x"}, ["a", 1]])
def test_other_inputs_are_refused(value: Any) -> None:
    with pytest.raises(InvalidFieldError, match="string or a list of strings"):
        convert.embed_request(embeddings(input=value), Priority.INTERACTIVE)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("query", InputType.QUERY), ("search_query", InputType.QUERY), ("passage", InputType.DOCUMENT)],
)
def test_input_type_names_of_other_apis(name: str, expected: InputType) -> None:
    assert convert.embed_request(embeddings(input="x", input_type=name), Priority.INTERACTIVE).input_type is expected
    with pytest.raises(InvalidFieldError, match="input_type"):
        convert.embed_request(embeddings(input="x", input_type="title"), Priority.INTERACTIVE)


def test_a_field_of_the_wrong_type_is_named() -> None:
    with pytest.raises(InvalidFieldError, match=r"^dimensions: ") as raised:
        embeddings(input="x", dimensions="many")
    assert raised.value.param == "dimensions"
    with pytest.raises(InvalidFieldError) as nested:
        convert.parse(convert.ChatBody, {"messages": [{"role": "user", "content": 5}]})
    assert nested.value.param is not None
    assert nested.value.param.startswith("messages[0].content")


def test_embeddings_response_float_and_base64() -> None:
    vectors = np.array([[0.5, -1.25, 3.0], [1e-8, 0.0, -0.0]], dtype=np.float32)
    result = EmbedResult(model="m", vectors=vectors, usage=Usage(prompt_tokens=7), timings=Timings())
    floats = convert.embeddings_response(result, "float")
    assert floats["object"] == "list"
    assert floats["model"] == "m"
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["data"][0]["embedding"] == [0.5, -1.25, 3.0]
    assert convert.embeddings_response(result, None) == floats
    encoded = convert.embeddings_response(result, "base64")["data"]
    for row, item in zip(vectors, encoded, strict=True):
        decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, row)


# -- Lanes -----------------------------------------------------------------------------------------


def test_priority_from_the_field_or_the_header() -> None:
    assert convert.priority(None, None) is Priority.INTERACTIVE
    assert convert.priority("batch", None) is Priority.BATCH
    assert convert.priority(None, " Batch ") is Priority.BATCH
    assert convert.priority("batch", "batch") is Priority.BATCH
    with pytest.raises(InvalidFieldError, match="header says"):
        convert.priority("interactive", "batch")
    with pytest.raises(InvalidFieldError, match="interactive or batch"):
        convert.priority(None, "urgent")


# -- Rerank ----------------------------------------------------------------------------------------


def test_rerank_documents_as_strings_or_objects() -> None:
    body = convert.parse(
        convert.RerankBody,
        {"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1, "return_documents": True},
    )
    request = convert.rerank_request(body, Priority.INTERACTIVE)
    assert request.documents == ["a", "b"]
    assert (request.top_n, request.return_documents) == (1, True)


def test_rerank_response_is_jina_and_cohere_shaped() -> None:
    result = RerankResult(
        model="m",
        results=[RankedDocument(index=1, score=0.9, document="b"), RankedDocument(index=0, score=0.1)],
        usage=Usage(prompt_tokens=5),
        timings=Timings(),
    )
    answer = convert.rerank_response(result, "rid")
    assert answer["id"] == "rid"
    assert answer["results"] == [
        {"index": 1, "relevance_score": 0.9, "document": {"text": "b"}},
        {"index": 0, "relevance_score": 0.1},
    ]
    assert answer["usage"]["total_tokens"] == 5


# -- Generation ------------------------------------------------------------------------------------


def chat(**body: Any) -> convert.ChatBody:
    return convert.parse(convert.ChatBody, {"messages": [{"role": "user", "content": "hi"}], **body})


def test_chat_request_defaults_come_from_the_settings(settings: Settings) -> None:
    request = convert.chat_request(chat(), Priority.INTERACTIVE, default_max_tokens=settings.default_max_new_tokens)
    assert request.sampling.max_tokens == 77
    assert request.sampling.stop == ()
    assert request.sampling.seed is None
    assert request.prompt is None
    assert [(m.role, m.content) for m in request.messages] == [("user", "hi")]


def test_chat_request_sampling(settings: Settings) -> None:
    body = chat(max_tokens=5, temperature=0, top_p=0.5, top_k=3, seed=9, stop="END")
    sampling = convert.chat_request(
        body, Priority.INTERACTIVE, default_max_tokens=settings.default_max_new_tokens
    ).sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (5, 0.0, 0.5, 3)
    assert (sampling.seed, sampling.stop) == (9, ("END",))
    # The newer name wins over the older one.
    newer = convert.chat_request(
        chat(max_tokens=5, max_completion_tokens=6),
        Priority.INTERACTIVE,
        default_max_tokens=settings.default_max_new_tokens,
    )
    assert newer.sampling.max_tokens == 6
    assert convert.chat_request(
        chat(stop=["a", "b"]), Priority.INTERACTIVE, default_max_tokens=settings.default_max_new_tokens
    ).sampling.stop == ("a", "b")


def test_chat_content_parts_and_the_developer_role(settings: Settings) -> None:
    body = convert.parse(
        convert.ChatBody,
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]},
            ]
        },
    )
    messages = convert.chat_request(
        body, Priority.INTERACTIVE, default_max_tokens=settings.default_max_new_tokens
    ).messages
    assert [(m.role, m.content) for m in messages] == [("system", "be brief"), ("user", "one two")]
    image = convert.parse(
        convert.ChatBody, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    )
    with pytest.raises(InvalidFieldError, match="only text parts") as raised:
        convert.chat_request(image, Priority.INTERACTIVE, default_max_tokens=settings.default_max_new_tokens)
    assert raised.value.param == "messages[0].content"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 2),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("tools", [{"type": "function"}]),
        ("tool_choice", "auto"),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"1": 5}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
    ],
)
def test_what_wafer_cannot_honour_is_refused(settings: Settings, field: str, value: Any) -> None:
    with pytest.raises(InvalidFieldError, match="not supported") as raised:
        convert.chat_request(
            chat(**{field: value}), Priority.INTERACTIVE, default_max_tokens=settings.default_max_new_tokens
        )
    assert raised.value.param == field


def test_neutral_values_of_unsupported_fields_pass(settings: Settings) -> None:
    neutral = chat(n=1, logprobs=False, presence_penalty=0, tool_choice="none", response_format={"type": "text"})
    assert convert.chat_request(
        neutral, Priority.INTERACTIVE, default_max_tokens=settings.default_max_new_tokens
    ).messages


def test_completion_request(settings: Settings) -> None:
    body = convert.parse(convert.CompletionBody, {"prompt": ["once"], "max_tokens": 3})
    request = convert.completion_request(body, Priority.BATCH, default_max_tokens=settings.default_max_new_tokens)
    assert (request.prompt, request.sampling.max_tokens, request.priority) == ("once", 3, Priority.BATCH)
    with pytest.raises(InvalidFieldError, match="one prompt"):
        convert.completion_request(
            convert.parse(convert.CompletionBody, {"prompt": ["a", "b"]}),
            Priority.INTERACTIVE,
            default_max_tokens=settings.default_max_new_tokens,
        )
    with pytest.raises(InvalidFieldError, match="token ids"):
        convert.completion_request(
            convert.parse(convert.CompletionBody, {"prompt": [1, 2]}),
            Priority.INTERACTIVE,
            default_max_tokens=settings.default_max_new_tokens,
        )
    for field, value in (("echo", True), ("best_of", 2), ("suffix", "x")):
        refused = convert.parse(convert.CompletionBody, {"prompt": "a", field: value})
        with pytest.raises(InvalidFieldError, match="not supported"):
            convert.completion_request(
                refused, Priority.INTERACTIVE, default_max_tokens=settings.default_max_new_tokens
            )


def test_completion_objects() -> None:
    used = Usage(prompt_tokens=3, completion_tokens=2)
    chat_head = convert.Completion(chat=True, id="chatcmpl-1", created=5, model="m")
    whole = convert.completion(chat_head, "hi", FinishReason.STOP, used)
    assert whole["object"] == "chat.completion"
    assert whole["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    text_head = convert.Completion(chat=False, id="cmpl-1", created=5, model="m")
    assert convert.completion(text_head, "hi", FinishReason.LENGTH, used)["choices"][0] == {
        "index": 0,
        "text": "hi",
        "logprobs": None,
        "finish_reason": "length",
    }


def test_stream_chunks() -> None:
    head = convert.Completion(chat=True, id="chatcmpl-1", created=5, model="m")
    opening = convert.completion_chunk(head, "Hel", None, opening=True, with_usage=False)
    assert opening["object"] == "chat.completion.chunk"
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert "usage" not in opening
    later = convert.completion_chunk(head, "lo", None, opening=False, with_usage=True)
    assert later["choices"][0]["delta"] == {"content": "lo"}
    assert later["usage"] is None
    last = convert.completion_chunk(head, "", FinishReason.STOP, opening=False, with_usage=True)
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    usage = convert.usage_chunk(head, Usage(prompt_tokens=1, completion_tokens=2))
    assert usage["choices"] == []
    assert usage["usage"]["total_tokens"] == 3
    text = convert.completion_chunk(
        convert.Completion(chat=False, id="c", created=5, model="m"), "x", None, opening=True, with_usage=False
    )
    assert text["object"] == "text_completion"
    assert text["choices"][0]["text"] == "x"


# -- Errors ----------------------------------------------------------------------------------------


def test_every_wafer_error_has_an_http_status() -> None:
    """The two tables cannot drift: each error gRPC knows has its HTTP status."""
    errors = [
        cls
        for _, cls in inspect.getmembers(wafer.errors, inspect.isclass)
        if issubclass(cls, WaferError) and cls is not WaferError
    ]
    assert set(errors) == set(STATUS_BY_ERROR)
    assert set(STATUS_BY_ERROR) <= set(HTTP_STATUS_BY_ERROR)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (wafer.errors.NotFoundError("x"), 404, grpc.StatusCode.NOT_FOUND),
        (wafer.errors.InvalidArgumentError("x"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (wafer.errors.FailedPreconditionError("x"), 400, grpc.StatusCode.FAILED_PRECONDITION),
        (ResourceExhaustedError("x"), 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (UnavailableError("x"), 503, grpc.StatusCode.UNAVAILABLE),
        (wafer.errors.UnauthenticatedError("x"), 401, grpc.StatusCode.UNAUTHENTICATED),
        (wafer.errors.PermissionDeniedError("x"), 403, grpc.StatusCode.PERMISSION_DENIED),
        (wafer.errors.DeadlineExceededError("x"), 504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (PayloadTooLargeError("x"), 413, grpc.StatusCode.INVALID_ARGUMENT),
        (UnsupportedMediaTypeError("x"), 415, grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidFieldError("x", param="p"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (RuntimeError("x"), 500, grpc.StatusCode.INTERNAL),
    ],
)
def test_http_status_and_grpc_code(error: BaseException, status: int, code: grpc.StatusCode) -> None:
    assert http_status_for(error) == status
    assert status_for(error) == code


def test_error_body_is_openais_shape() -> None:
    assert error_body("no such model", 404, grpc.StatusCode.NOT_FOUND) == {
        "error": {"message": "no such model", "type": "not_found_error", "param": None, "code": "not_found"}
    }
    assert error_body("x", 429, grpc.StatusCode.RESOURCE_EXHAUSTED, "input")["error"]["type"] == "rate_limit_error"
    assert error_body("x", 503, grpc.StatusCode.UNAVAILABLE)["error"]["type"] == "server_error"


@pytest.mark.parametrize(("seconds", "header", "ms"), [(0.2, "1", "200"), (1.0, "1", "1000"), (2.01, "3", "2010")])
def test_retry_after_rounds_up_to_whole_seconds(seconds: float, header: str, ms: str) -> None:
    assert retry_headers(ResourceExhaustedError("full", retry_after_seconds=seconds)) == {
        "Retry-After": header,
        "retry-after-ms": ms,
    }
    assert retry_headers(ResourceExhaustedError("full")) == {}
    assert retry_headers(RuntimeError("x")) == {}
