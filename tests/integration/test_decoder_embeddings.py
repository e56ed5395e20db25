"""Decoder embedding models (gte-Qwen2, KaLM-embedding, stella) on the GGUF backend.

Their weights cannot be fetched here, so a tiny random-weight Qwen2 GGUF written by the test
stands in: same architecture and tokenizer kind, so llama.cpp runs the same graph and pooling.
The backend's vectors are checked against an independent reference: llama.cpp with pooling off
(one hidden state per token), with the last row or the mean taken here in numpy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from tests.fakes.tiny_qwen2 import TinyQwen2, write_tiny_qwen2
from tests.integration.gguf_engines import gguf_engine
from tests.llama_reference import TokenStates
from wafer.backends.base import InputTooLongError, LoadOptions, ModelFiles
from wafer.backends.gguf import GgufBackend
from wafer.domain import ChatMessage, EmbedRequest, InputType, RerankRequest, SamplingParams
from wafer.errors import FailedPreconditionError, InvalidArgumentError
from wafer.specs import Catalog, ModelSpec, Pooling

pytestmark = pytest.mark.integration

CONFIG = TinyQwen2()
N_EMBD = CONFIG.n_embd
GTE_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
LONG_TEXT = " ".join(f"part {i} of the text" for i in range(12))  # > 128 tokens: decoded in chunks
TEXTS = [
    "hi",
    "Are we still on for lunch tomorrow?",
    "the tiny test of the token t",
    "Ünïcödé façade naïve café, 日本語, emoji 🙂",
    LONG_TEXT,
]
Vector = NDArray[np.float64]


def cosine(a: NDArray[Any], b: NDArray[Any]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def spec_for(pooling: Pooling, **update: Any) -> ModelSpec:
    """An entry shaped like the user's gte-Qwen2 / KaLM ones."""
    fields: dict[str, Any] = {
        "name": f"tiny-qwen2-{pooling.value}",
        "backend": "gguf",
        "source": "tiny-qwen2.gguf",
        "tasks": ["embed", "rerank"],
        "rerank_method": "cosine",
        "dimensions": N_EMBD,
        "pooling": pooling,
        "query_prompt": GTE_QUERY_PROMPT,
        "normalize": True,
    }
    return ModelSpec.model_validate({**fields, **update})


# -- Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2") / "tiny-qwen2.gguf", CONFIG)


@pytest.fixture(scope="module")
def reference(weights: Path) -> Iterator[TokenStates]:
    states = TokenStates(weights, n_ctx=CONFIG.n_ctx)
    yield states
    states.close()


@pytest.fixture(scope="module", params=[Pooling.LAST, Pooling.MEAN], ids=lambda p: str(p.value))
def backend(request: pytest.FixtureRequest, weights: Path) -> Iterator[GgufBackend]:
    loaded = GgufBackend.load(spec_for(request.param), ModelFiles(weights=weights), LoadOptions(threads=1))
    loaded.health()
    yield loaded
    loaded.close()


# -- Backend -------------------------------------------------------------------------------------


def test_the_tokenizer_appends_eos_as_gte_qwen2_does(reference: TokenStates) -> None:
    # The state last-token pooling reads is the appended <|endoftext|>'s, as in gte-Qwen2.
    for text in TEXTS:
        tokens = reference.tokens(text)
        assert tokens[-1] == reference.eos
        assert reference.eos not in tokens[:-1]
    assert len(reference.tokens(LONG_TEXT)) > 128


def test_embed_pools_like_the_per_token_reference(backend: GgufBackend, reference: TokenStates) -> None:
    pooling = backend.spec.pooling
    output = backend.embed(TEXTS, truncate=False)
    assert output.vectors.shape == (len(TEXTS), N_EMBD)
    assert output.vectors.dtype == np.float32
    assert bool(np.isfinite(output.vectors).all())
    assert output.token_counts == [len(reference.tokens(t)) for t in TEXTS]
    assert output.token_counts == [backend.count_tokens(t) for t in TEXTS]
    for text, vector in zip(TEXTS, output.vectors, strict=True):
        expected = reference.pooled(reference.tokens(text), pooling)
        assert cosine(vector, expected) >= 0.999, text[:30]
    # The texts really give different vectors (the random model is not degenerate).
    assert max(cosine(output.vectors[0], v) for v in output.vectors[1:]) < 0.99


def test_last_and_mean_pooling_differ(weights: Path, reference: TokenStates) -> None:
    tokens = reference.tokens(TEXTS[1])
    assert cosine(reference.pooled(tokens, Pooling.LAST), reference.pooled(tokens, Pooling.MEAN)) < 0.99


def test_embedding_does_not_depend_on_the_rest_of_the_batch(backend: GgufBackend) -> None:
    batched = backend.embed(TEXTS + TEXTS[::-1], truncate=False).vectors
    single = [backend.embed([text], truncate=False).vectors[0] for text in TEXTS]
    for i, text in enumerate(TEXTS):
        assert cosine(batched[i], single[i]) >= 0.999, text[:30]
        assert cosine(batched[2 * len(TEXTS) - 1 - i], single[i]) >= 0.999, text[:30]


@pytest.mark.parametrize("pooling", [Pooling.LAST, Pooling.MEAN])
def test_too_long_input_raises_or_truncates(weights: Path, reference: TokenStates, pooling: Pooling) -> None:
    spec = spec_for(pooling, max_tokens=16)
    small = GgufBackend.load(spec, ModelFiles(weights=weights), LoadOptions(threads=1))
    try:
        tokens = reference.tokens(LONG_TEXT)
        with pytest.raises(InputTooLongError, match=f"input 1 has {len(tokens)} tokens, more than the 16") as info:
            small.embed(["short", LONG_TEXT], truncate=False)
        assert info.value.index == 1

        output = small.embed(["short", LONG_TEXT], truncate=True)
        assert output.token_counts == [small.count_tokens("short"), 16]
        # The text's first 15 tokens, then the <|endoftext|> the tokenizer puts after it.
        expected = reference.pooled([*tokens[:15], reference.eos], pooling)
        assert cosine(output.vectors[1], expected) >= 0.999
    finally:
        small.close()


def test_wrong_dimensions_fail_the_load(weights: Path) -> None:
    spec = spec_for(Pooling.LAST, dimensions=1536)
    with pytest.raises(FailedPreconditionError, match=rf"dimensions 1536.*{N_EMBD}"):
        GgufBackend.load(spec, ModelFiles(weights=weights), LoadOptions(threads=1))


# A template that fails on every render: the model's fault, whatever the caller sends.
BROKEN_TEMPLATE = "{% for m in messages %}{{ m.content.no_such_method() }}{% endfor %}"
# A template that refuses some conversations on purpose (as many published templates do).
STRICT_TEMPLATE = (
    "{% if messages[0].role != 'user' %}{{ raise_exception('the first message must be the user') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "error", "match"),
    [
        (BROKEN_TEMPLATE, FailedPreconditionError, "chat template of model 'tiny-chat' is broken"),
        (STRICT_TEMPLATE, InvalidArgumentError, "chat template of model 'tiny-chat' refused: the first message"),
    ],
)
def test_a_broken_chat_template_is_the_models_fault(
    tmp_path: Path, template: str, error: type[Exception], match: str
) -> None:
    weights = write_tiny_qwen2(tmp_path / "chat.gguf", TinyQwen2(chat_template=template))
    spec = ModelSpec.model_validate(
        {"name": "tiny-chat", "backend": "gguf", "source": "chat.gguf", "tasks": ["generate"]}
    )
    backend = GgufBackend.load(spec, ModelFiles(weights=weights), LoadOptions(threads=1))
    try:
        with pytest.raises(error, match=match):
            backend.generate(
                prompt=None,
                messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hi")),
                sampling=SamplingParams(max_tokens=2, temperature=0.0),
                cancelled=lambda: False,
            )
    finally:
        backend.close()


# -- Through the engine --------------------------------------------------------------------------


async def test_engine_applies_the_query_prompt_to_queries_only(weights: Path, tmp_path: Path) -> None:
    spec = spec_for(Pooling.LAST, name="gte-tiny", source=str(weights))
    catalog = Catalog(models={spec.name: spec}, base_dir=tmp_path)
    registry, engine = gguf_engine(catalog, tmp_path)
    try:
        question = "where do trains to the coast leave from?"
        documents = ["Trains to the coast leave from platform 4.", "The bakery opens at seven."]
        query = await engine.embed(EmbedRequest(inputs=[question], input_type=InputType.QUERY))
        prompted = await engine.embed(EmbedRequest(inputs=[GTE_QUERY_PROMPT + question]))
        bare = await engine.embed(EmbedRequest(inputs=[question], input_type=InputType.DOCUMENT))
        assert query.model == "gte-tiny"
        assert query.vectors.shape == (1, N_EMBD)
        assert np.linalg.norm(query.vectors[0]) == pytest.approx(1.0, abs=1e-5)
        assert cosine(query.vectors[0], prompted.vectors[0]) >= 0.999
        assert cosine(query.vectors[0], bare.vectors[0]) < 0.99
        assert query.usage.prompt_tokens == prompted.usage.prompt_tokens > bare.usage.prompt_tokens

        # Cosine reranking: the prompted query against bare documents.
        docs = await engine.embed(EmbedRequest(inputs=documents))
        ranked = await engine.rerank(RerankRequest(query=question, documents=documents))
        scores = {r.index: r.score for r in ranked.results}
        for i in range(len(documents)):
            assert scores[i] == pytest.approx(float(docs.vectors[i] @ query.vectors[0]), abs=1e-3)
    finally:
        await registry.close()
