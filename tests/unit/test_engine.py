from __future__ import annotations

import numpy as np
import pytest

from wafer.domain import (
    ChatMessage,
    EmbedRequest,
    FinishReason,
    GenerateRequest,
    InputType,
    RerankRequest,
    SamplingParams,
)
from wafer.engine import InferenceEngine
from wafer.errors import FailedPreconditionError, InvalidArgumentError


async def test_embed_normalizes_and_cuts_dimensions(engine: InferenceEngine) -> None:
    result = await engine.embed(EmbedRequest(inputs=["a b", "c d e"]))
    assert result.model == "embedder"
    assert result.vectors.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, rtol=1e-5)
    cut = await engine.embed(EmbedRequest(inputs=["a b"], dimensions=8))
    assert cut.vectors.shape == (1, 8)
    np.testing.assert_allclose(np.linalg.norm(cut.vectors), 1.0, rtol=1e-5)
    raw = await engine.embed(EmbedRequest(inputs=["a b"], normalize=False, dimensions=8))
    # The cut is a prefix of the raw vector, re-normalized.
    np.testing.assert_allclose(cut.vectors[0], raw.vectors[0] / np.linalg.norm(raw.vectors[0]), rtol=1e-5)
    assert result.usage.prompt_tokens == 4 + 5
    assert result.timings.batch_size == 2


async def test_query_prompt_applies_to_queries_only(engine: InferenceEngine) -> None:
    doc = await engine.embed(EmbedRequest(inputs=["hello"], input_type=InputType.DOCUMENT))
    query = await engine.embed(EmbedRequest(inputs=["hello"], input_type=InputType.QUERY))
    prefixed = await engine.embed(EmbedRequest(inputs=["query: hello"]))
    assert not np.allclose(doc.vectors, query.vectors)
    np.testing.assert_allclose(query.vectors, prefixed.vectors)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (EmbedRequest(inputs=[]), "inputs must not be empty"),
        (EmbedRequest(inputs=["ok", " "]), r"inputs\[1\] is empty"),
        (EmbedRequest(inputs=["x"] * 101), "101 inputs in one request; the limit is 100"),
        (EmbedRequest(inputs=["x" * 10_001]), "larger than the 10000-byte limit"),
        (EmbedRequest(inputs=["x"], dimensions=17), "more than model 'embedder' produces"),
        (EmbedRequest(inputs=["x"], dimensions=12), "supports dimensions 8, 16"),
        (EmbedRequest(inputs=["w " * 20]), "input 0 has 22 tokens.*set truncate=true"),
    ],
)
async def test_embed_rejects_bad_input(engine: InferenceEngine, request_: EmbedRequest, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        await engine.embed(request_)


async def test_embed_truncates_when_asked(engine: InferenceEngine) -> None:
    result = await engine.embed(EmbedRequest(inputs=["w " * 20], truncate=True))
    assert result.usage.prompt_tokens == 12


async def test_wrong_task_is_failed_precondition(engine: InferenceEngine) -> None:
    with pytest.raises(FailedPreconditionError, match="cannot embed"):
        await engine.embed(EmbedRequest(inputs=["x"], model="writer"))


async def test_cosine_rerank_orders_and_cuts(engine: InferenceEngine) -> None:
    docs = ["alpha", "beta", "query: gamma", "delta"]
    result = await engine.rerank(RerankRequest(query="gamma", documents=docs, top_n=2, return_documents=True))
    # The query is embedded with its prompt, so the document equal to the prompted query wins.
    assert result.results[0].index == 2
    assert result.results[0].score == pytest.approx(1.0, abs=1e-5)
    assert result.results[0].document == "query: gamma"
    assert len(result.results) == 2
    assert result.results[0].score >= result.results[1].score


async def test_relevance_rerank_uses_the_backend(engine: InferenceEngine) -> None:
    result = await engine.rerank(
        RerankRequest(query="red apple", documents=["blue sky", "red apple pie", "apple"], model="writer")
    )
    assert [r.index for r in result.results] == [1, 2, 0]
    assert result.results[2].document is None


async def test_rerank_rejects_bad_input(engine: InferenceEngine) -> None:
    with pytest.raises(InvalidArgumentError, match="query"):
        await engine.rerank(RerankRequest(query="", documents=["a"]))
    with pytest.raises(InvalidArgumentError, match="documents must not be empty"):
        await engine.rerank(RerankRequest(query="q", documents=[]))
    with pytest.raises(InvalidArgumentError, match="top_n"):
        await engine.rerank(RerankRequest(query="q", documents=["a"], top_n=-1))


async def test_generate_streams_and_reports_usage(engine: InferenceEngine) -> None:
    chunks = [
        c
        async for c in engine.generate(
            GenerateRequest(prompt="one two three four", sampling=SamplingParams(max_tokens=3))
        )
    ]
    assert "".join(c.text for c in chunks) == "one two three "
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.finish_reason is FinishReason.LENGTH
    assert last.usage is not None and last.usage.completion_tokens == 3
    assert last.timings is not None and last.timings.time_to_first_token_ms > 0


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GenerateRequest(sampling=SamplingParams(max_tokens=5)), "exactly one of"),
        (
            GenerateRequest(prompt="p", messages=(ChatMessage("user", "x"),), sampling=SamplingParams(max_tokens=5)),
            "exactly one of",
        ),
        (GenerateRequest(messages=(ChatMessage("robot", "x"),), sampling=SamplingParams(5)), "role"),
        (
            GenerateRequest(messages=(ChatMessage("user", ""),), sampling=SamplingParams(5)),
            r"messages\[0\] is empty",
        ),
        (GenerateRequest(prompt="p", sampling=SamplingParams(max_tokens=0)), "max_tokens"),
        (GenerateRequest(prompt="p", sampling=SamplingParams(5, temperature=-1)), "temperature"),
        (GenerateRequest(prompt="p", sampling=SamplingParams(5, temperature=1e9)), "temperature"),
        (GenerateRequest(prompt="p", sampling=SamplingParams(5, top_p=0)), "top_p"),
        (GenerateRequest(prompt="p", sampling=SamplingParams(5, top_k=-3)), "top_k"),
        (GenerateRequest(prompt="p", sampling=SamplingParams(5, stop=("",))), "stop"),
        (GenerateRequest(prompt="p", sampling=SamplingParams(5, stop=("x",) * 17)), "stop"),
    ],
)
async def test_generate_rejects_bad_parameters(
    engine: InferenceEngine, request_: GenerateRequest, message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        async for _ in engine.generate(request_):
            pass


async def test_rerank_names_the_document_that_is_too_long(engine: InferenceEngine) -> None:
    with pytest.raises(InvalidArgumentError, match=r"documents\[1\] has 22 tokens"):
        await engine.rerank(RerankRequest(query="q", documents=["short", "w " * 20]))
    with pytest.raises(InvalidArgumentError, match="the query has 23 tokens"):
        await engine.rerank(RerankRequest(query="w " * 20, documents=["short"]))


async def test_chat_messages_have_the_prompt_size_limit(engine: InferenceEngine) -> None:
    big = ChatMessage("user", "x" * 6_000)
    with pytest.raises(InvalidArgumentError, match="the messages hold 12000 bytes together"):
        async for _ in engine.generate(GenerateRequest(messages=(big, big), sampling=SamplingParams(5))):
            pass
    with pytest.raises(InvalidArgumentError, match=r"messages\[0\] is larger than the 10000-byte limit"):
        huge = ChatMessage("user", "x" * 10_001)
        async for _ in engine.generate(GenerateRequest(messages=(huge,), sampling=SamplingParams(5))):
            pass
