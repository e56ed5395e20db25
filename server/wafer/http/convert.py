"""OpenAI-style JSON ⇄ domain translation. Pure functions: no I/O, no decisions beyond field
mapping, the dialect's own defaults, and refusing what Wafer would otherwise silently ignore.

Request bodies are read with pydantic models that ignore fields they do not know (OpenAI's API
grows, and clients send what their version knows), but a field that would change the answer if
honoured (`n`, `logprobs`, `tools`, penalties, ...) is refused rather than dropped.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wafer.domain import (
    ChatMessage,
    EmbedRequest,
    EmbedResult,
    FinishReason,
    GenerateRequest,
    InputType,
    Priority,
    RerankRequest,
    RerankResult,
    SamplingParams,
    Usage,
)
from wafer.http.errors import InvalidFieldError
from wafer.registry import ModelStatus

PRIORITY_HEADER: Final = "x-wafer-priority"
OWNER: Final = "wafer"

PriorityName = Literal["interactive", "batch"]
_PRIORITIES: Final = {"interactive": Priority.INTERACTIVE, "batch": Priority.BATCH}
# Cohere, Jina and NVIDIA name the two sides of retrieval differently; all mean one of Wafer's two.
_INPUT_TYPES: Final = {
    "query": InputType.QUERY,
    "search_query": InputType.QUERY,
    "document": InputType.DOCUMENT,
    "search_document": InputType.DOCUMENT,
    "passage": InputType.DOCUMENT,
}
# OpenAI's newer name for the system role.
_ROLE_ALIASES: Final = {"developer": "system"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class EmbeddingsBody(_Body):
    # Any: a string, a list of strings, or token arrays (refused with their own message).
    input: Any = None
    model: str = ""
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, gt=0)
    user: str | None = None
    # Beyond OpenAI: TEI's truncate, Cohere's and Jina's input_type, Wafer's normalize and lane.
    input_type: str | None = None
    truncate: bool = False
    normalize: bool | None = None
    priority: PriorityName | None = None


class RerankDocument(_Body):
    text: str


class RerankBody(_Body):
    query: str
    documents: list[str | RerankDocument]
    model: str = ""
    top_n: int | None = None
    return_documents: bool = False
    truncate: bool = False
    priority: PriorityName | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationBody(_Body):
    model: str = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # beyond OpenAI, as llama.cpp's server and vLLM take it
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    priority: PriorityName | None = None
    # Refused unless left at their neutral value: Wafer cannot honour them.
    n: int | None = None
    logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessageBody(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_GenerationBody):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None
    top_logprobs: Any = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    response_format: Any = None


class CompletionBody(_GenerationBody):
    prompt: Any = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


BodyT = TypeVar("BodyT", bound=_Body)


def parse(model: type[BodyT], body: Mapping[str, Any]) -> BodyT:
    """`body` read as `model`; a field of the wrong type is an InvalidFieldError naming it."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first["loc"]
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
        raise InvalidFieldError(f"{path or 'body'}: {first['msg']}", param=path or None) from None


def priority(field: PriorityName | None, header: str | None) -> Priority:
    """The lane: the body's `priority` or the X-Wafer-Priority header; both, they must agree."""
    named = header.strip().lower() if header is not None else None
    if named is not None and named not in _PRIORITIES:
        raise InvalidFieldError(f"{PRIORITY_HEADER} must be interactive or batch, not {header!r}", param=None)
    if field is not None and named is not None and field != named:
        raise InvalidFieldError(
            f"priority is {field!r} but the {PRIORITY_HEADER} header says {named!r}", param="priority"
        )
    return _PRIORITIES[field or named or "interactive"]


def _texts(value: Any, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    if isinstance(value, list) and value and all(_is_tokens(item) for item in value):
        raise InvalidFieldError(
            f"{field} holds token ids; Wafer tokenizes itself, with each model's own tokenizer: send text",
            param=field,
        )
    raise InvalidFieldError(f"{field} must be a string or a list of strings", param=field)


def _is_tokens(item: Any) -> bool:
    if isinstance(item, list):
        return all(isinstance(token, int) for token in item)
    return isinstance(item, int) and not isinstance(item, bool)


# -- Embeddings ------------------------------------------------------------------------------------


def embed_request(body: EmbeddingsBody, lane: Priority) -> EmbedRequest:
    input_type = InputType.DOCUMENT
    if body.input_type is not None:
        try:
            input_type = _INPUT_TYPES[body.input_type.lower()]
        except KeyError:
            names = ", ".join(sorted(_INPUT_TYPES))
            raise InvalidFieldError(f"input_type must be one of {names}", param="input_type") from None
    return EmbedRequest(
        inputs=_texts(body.input, "input"),
        model=body.model,
        input_type=input_type,
        dimensions=body.dimensions or 0,
        truncate=body.truncate,
        normalize=body.normalize,
        priority=lane,
    )


def _encoded(row: np.ndarray[Any, Any], encoding: str) -> list[float] | str:
    if encoding == "base64":
        # OpenAI's layout: the raw little-endian float32 bytes.
        return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")
    values: list[float] = row.tolist()
    return values


def embeddings_response(result: EmbedResult, encoding_format: str | None) -> dict[str, Any]:
    encoding = encoding_format or "float"
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encoded(row, encoding)}
            for i, row in enumerate(result.vectors)
        ],
        "model": result.model,
        "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.total_tokens},
    }


# -- Rerank ----------------------------------------------------------------------------------------


def rerank_request(body: RerankBody, lane: Priority) -> RerankRequest:
    return RerankRequest(
        query=body.query,
        documents=[d if isinstance(d, str) else d.text for d in body.documents],
        model=body.model,
        top_n=body.top_n or 0,
        return_documents=body.return_documents,
        truncate=body.truncate,
        priority=lane,
    )


def rerank_response(result: RerankResult, request_id: str) -> dict[str, Any]:
    """Jina's and Cohere's shape: results best first, each with its index in the request."""
    results: list[dict[str, Any]] = []
    for ranked in result.results:
        item: dict[str, Any] = {"index": ranked.index, "relevance_score": ranked.score}
        if ranked.document is not None:
            item["document"] = {"text": ranked.document}
        results.append(item)
    return {
        "id": request_id,
        "object": "list",
        "model": result.model,
        "results": results,
        "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.total_tokens},
    }


# -- Chat and text completions ---------------------------------------------------------------------


def _refuse_unsupported(body: _GenerationBody, extra: Iterable[tuple[str, bool]] = ()) -> None:
    checks = [
        ("n", body.n not in (None, 1)),
        ("logprobs", body.logprobs not in (None, False, 0)),
        ("logit_bias", bool(body.logit_bias)),
        ("presence_penalty", body.presence_penalty not in (None, 0)),
        ("frequency_penalty", body.frequency_penalty not in (None, 0)),
        *extra,
    ]
    for name, refused in checks:
        if refused:
            raise InvalidFieldError(f"{name} is not supported by Wafer; leave it out", param=name)


def _sampling(body: _GenerationBody, max_tokens: int | None, default_max_tokens: int) -> SamplingParams:
    defaults = SamplingParams(max_tokens=default_max_tokens)
    stop = body.stop if body.stop is not None else []
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else defaults.max_tokens,
        temperature=body.temperature if body.temperature is not None else defaults.temperature,
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        top_k=body.top_k if body.top_k is not None else defaults.top_k,
        seed=body.seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
    )


def _message(index: int, message: ChatMessageBody) -> ChatMessage:
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise InvalidFieldError(
                    f"messages[{index}].content: only text parts are supported, not {part.type!r}",
                    param=f"messages[{index}].content",
                )
            texts.append(part.text)
        content = "".join(texts)
    role = _ROLE_ALIASES.get(message.role, message.role)
    return ChatMessage(role=role, content=content or "")


def chat_request(body: ChatBody, lane: Priority, *, default_max_tokens: int) -> GenerateRequest:
    """`default_max_tokens`: the server's default_max_new_tokens, for a body that sets none."""
    _refuse_unsupported(
        body,
        [
            ("top_logprobs", body.top_logprobs is not None),
            ("tools", bool(body.tools)),
            ("functions", bool(body.functions)),
            ("tool_choice", body.tool_choice not in (None, "none")),
            ("response_format", _structured(body.response_format)),
        ],
    )
    if not body.messages:
        raise InvalidFieldError("messages must not be empty", param="messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return GenerateRequest(
        sampling=_sampling(body, max_tokens, default_max_tokens),
        model=body.model,
        messages=tuple(_message(i, m) for i, m in enumerate(body.messages)),
        priority=lane,
    )


def _structured(response_format: Any) -> bool:
    return response_format is not None and not (
        isinstance(response_format, Mapping) and response_format.get("type") == "text"
    )


def completion_request(body: CompletionBody, lane: Priority, *, default_max_tokens: int) -> GenerateRequest:
    """`default_max_tokens`: the server's default_max_new_tokens, for a body that sets none."""
    _refuse_unsupported(
        body,
        [("echo", bool(body.echo)), ("best_of", body.best_of not in (None, 1)), ("suffix", bool(body.suffix))],
    )
    prompts = _texts(body.prompt, "prompt")
    if len(prompts) != 1:
        raise InvalidFieldError(f"one prompt per request, not {len(prompts)}", param="prompt")
    return GenerateRequest(
        sampling=_sampling(body, body.max_tokens, default_max_tokens),
        model=body.model,
        prompt=prompts[0],
        priority=lane,
    )


def usage(value: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": value.prompt_tokens,
        "completion_tokens": value.completion_tokens,
        "total_tokens": value.total_tokens,
    }


@dataclass(frozen=True, slots=True)
class Completion:
    """What every object of one completion repeats: OpenAI's chat or text flavour, id, time, model."""

    chat: bool
    id: str
    created: int
    model: str

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def completion(head: Completion, text: str, finish: FinishReason, used: Usage) -> dict[str, Any]:
    """The whole answer of a call without `stream`."""
    choice: dict[str, Any] = (
        {"index": 0, "message": {"role": "assistant", "content": text}} if head.chat else {"index": 0, "text": text}
    )
    choice.update(logprobs=None, finish_reason=finish.value)
    return {
        "id": head.id,
        "object": head.object,
        "created": head.created,
        "model": head.model,
        "choices": [choice],
        "usage": usage(used),
    }


def completion_chunk(
    head: Completion, text: str, finish: FinishReason | None, *, opening: bool, with_usage: bool
) -> dict[str, Any]:
    """One streamed event. A chat stream's first delta names the assistant role, as OpenAI's do;
    with `with_usage` every event carries `usage: null` until the usage event."""
    choice: dict[str, Any] = {"index": 0}
    if head.chat:
        choice["delta"] = {"role": "assistant", "content": text} if opening else ({"content": text} if text else {})
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason=finish.value if finish is not None else None)
    chunk: dict[str, Any] = {
        "id": head.id,
        "object": head.chunk_object,
        "created": head.created,
        "model": head.model,
        "choices": [choice],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(head: Completion, used: Usage) -> dict[str, Any]:
    """The last event of a stream that asked for usage (`stream_options.include_usage`): no choices."""
    return {
        "id": head.id,
        "object": head.chunk_object,
        "created": head.created,
        "model": head.model,
        "choices": [],
        "usage": usage(used),
    }


# -- Models ----------------------------------------------------------------------------------------


def model_card(status: ModelStatus, created: int) -> dict[str, Any]:
    """OpenAI's model object; what Wafer knows beyond it sits under `wafer`."""
    spec = status.spec
    return {
        "id": spec.name,
        "object": "model",
        "created": created,
        "owned_by": OWNER,
        "wafer": {
            "tasks": [t.value for t in spec.tasks],
            "state": status.state.value,
            "dimensions": spec.dimensions or 0,
            "max_tokens": spec.max_tokens,
            "default_for": [t.value for t in status.default_for],
        },
    }


def models_response(statuses: Iterable[ModelStatus], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(s, created) for s in statuses]}
