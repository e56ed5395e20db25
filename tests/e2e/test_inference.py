"""Embed, Rerank and Generate over gRPC against the real server and the real default models."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from tests.conftest import MODELS_YAML
from tests.e2e.conftest import ServerProcess
from tests.reference import PlainReference, cosines
from wafer.sources import SourceResolver
from wafer.specs import Catalog
from wafer_client import WaferClient

pytestmark = pytest.mark.e2e

MIXED_LENGTHS = [
    "ok",
    "Are we still on for lunch tomorrow?",
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 to receive entry",
    "Ünïcödé café 🙂 日本語",
    " ".join(["A long message about the weekend plans, the weather and the train times."] * 30),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> PlainReference:
    catalog = Catalog.from_yaml(MODELS_YAML)
    spec = catalog.models["minilm"]
    resolver = SourceResolver(catalog.base_dir, tmp_path_factory.mktemp("hub"))
    assert spec.tokenizer is not None
    return PlainReference(
        resolver.resolve(spec.source, model=spec.name),
        resolver.resolve(spec.tokenizer, model=spec.name),
        max_tokens=spec.max_tokens,
    )


def test_served_embeddings_equal_in_process_onnxruntime(client: WaferClient, reference: PlainReference) -> None:
    # New texts each run: the server's embedding cache must not answer for the model.
    nonce = uuid.uuid4().hex[:8]
    texts = [f"{nonce} {text}" for text in MIXED_LENGTHS]
    expected = np.stack([reference.embed(text) for text in texts])
    batch = client.embed(texts, truncate=True)
    assert batch.vectors.dtype == np.float32
    assert cosines(batch.vectors, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(batch.vectors, axis=1), 1.0, rtol=1e-5)
    assert batch.usage.prompt_tokens > len(texts)
    assert batch.cached == 0
    assert batch.timings.inference_ms > 0
    for i, text in enumerate(texts):
        # Unnormalized: another cache entry than the batch's, so each text runs through the model alone.
        single = client.embed(text, truncate=True, normalize=False)
        assert single.model == "minilm"
        assert single.vectors.shape == (1, 384)
        assert cosines(single.vectors, expected[i : i + 1]).min() >= 0.9999


def test_embed_options(client: WaferClient) -> None:
    cut = client.embed("hello there", dimensions=128)
    assert cut.vectors.shape == (1, 128)
    raw = client.embed("hello there", normalize=False)
    assert abs(float(np.linalg.norm(raw.vectors[0])) - 1.0) > 1e-3
    decoder = client.embed(["hello there", "general kenobi"], model="smollm2")
    assert decoder.model == "smollm2"
    assert decoder.vectors.shape == (2, 576)


def test_rerank_puts_the_relevant_document_first(client: WaferClient) -> None:
    documents = [
        "The train to Edinburgh leaves at 9:15 from platform 4.",
        "Your parcel has been delivered to the front door.",
        "The meeting has been moved to 3pm on Thursday in room B.",
        "Happy birthday! Hope you have a great day.",
    ]
    result = client.rerank("what time is the meeting?", documents, return_documents=True)
    assert result.model == "minilm"
    assert result.results[0].index == 2
    assert result.results[0].document == documents[2]
    scores = [hit.score for hit in result.results]
    assert scores == sorted(scores, reverse=True)
    assert len(client.rerank("meeting time", documents, top_n=2).results) == 2


def test_llm_rerank_scores_relevance(client: WaferClient) -> None:
    documents = [
        "Pasta should be cooked in plenty of salted boiling water.",
        "Paris is the capital and largest city of France.",
        "The football match ended in a goalless draw.",
    ]
    result = client.rerank("What is the capital of France?", documents, model="smollm2")
    assert result.model == "smollm2"
    assert result.results[0].index == 1
    assert all(0.0 <= hit.score <= 1.0 for hit in result.results)


def test_generate_streams_tokens(client: WaferClient) -> None:
    chunks = list(
        client.generate(
            messages=[{"role": "user", "content": "Count from one to twenty."}], max_tokens=24, temperature=0
        )
    )
    # The first text comes at once; what follows travels in messages generation.stream_interval_ms apart,
    # so how many there are depends on the machine's speed.
    assert len(chunks) >= 2, "tokens should arrive as a stream, not one message"
    assert chunks[0].text and chunks[0].finish_reason is None
    text_chunks, last = chunks[:-1], chunks[-1]
    assert all(c.finish_reason is None for c in text_chunks)
    assert last.finish_reason == "length"
    assert last.usage is not None and last.usage.completion_tokens == 24
    assert last.usage.prompt_tokens > 0
    assert last.timings is not None
    total_ms = last.timings.queue_ms + last.timings.inference_ms
    assert 0 < last.timings.time_to_first_token_ms < total_ms


def test_generate_honours_stop_and_seed(client: WaferClient) -> None:
    prompt = "List the days of the week, separated by commas:"
    greedy = client.complete(prompt, max_tokens=30, temperature=0)
    assert greedy.text
    stop = greedy.text.strip().split(",")[1].strip() if "," in greedy.text else greedy.text.split()[1]
    stopped = client.complete(prompt, max_tokens=30, temperature=0, stop=[stop])
    assert stop not in stopped.text
    assert stopped.finish_reason == "stop"
    assert greedy.text.startswith(stopped.text)
    first = client.complete(prompt, max_tokens=20, temperature=0.9, seed=7)
    second = client.complete(prompt, max_tokens=20, temperature=0.9, seed=7)
    assert first.text == second.text


def test_every_response_names_its_model(server: ServerProcess, client: WaferClient) -> None:
    assert client.embed("x").model == "minilm"
    assert client.complete("Hi", max_tokens=2).model == "smollm2"
