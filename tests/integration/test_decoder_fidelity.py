"""gte-Qwen2, stella and ember served as their authors serve them, proven without their weights.

Tiny random-weight Qwen2 GGUFs laid out like the public conversions (no causal flag, no
`add_eos_token`) and a tiny `2_Dense_<dims>` head are served by the fake Hub under the real
repositories' names; the entries are the repository's own models.yaml entries, with only the sizes
changed to the tiny model's. Every served vector is compared with an independent numpy forward pass
of the authors' architecture (tests/qwen2_reference.py): bidirectional attention, `<|endoftext|>`
appended before last-token pooling (gte-Qwen2), mean pooling then the Dense head (stella).
The same comparison fails for causal attention and for a missing end-of-text token. ember-v1 (BERT)
is checked the same way against a numpy BERT (tests/bert_reference.py), CLS pooling.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from safetensors.numpy import load_file

from tests.bert_reference import BertReference
from tests.conftest import MODELS_YAML
from tests.fakes.fake_hub import FakeHub, running_fake_hub
from tests.fakes.tiny_bert import write_tiny_bert
from tests.fakes.tiny_qwen2 import TinyQwen2, write_dense_head, write_tiny_qwen2
from tests.integration.gguf_engines import gguf_engine
from tests.qwen2_reference import Qwen2Reference, Tokenizer
from wafer.backends.base import LoadOptions, ModelFiles
from wafer.backends.gguf import GgufBackend
from wafer.domain import EmbedRequest, InputType
from wafer.engine import InferenceEngine
from wafer.errors import FailedPreconditionError, InvalidArgumentError
from wafer.sources import HubFile
from wafer.specs import Catalog, LoadPolicy, ModelSpec, Pooling

pytestmark = pytest.mark.integration

REPOSITORY = Catalog.from_yaml(MODELS_YAML)
GTE = "gte-qwen2-1.5b-instruct"
STELLA = "stella-en-1.5b-v5"
EMBER = "ember-v1"
# As the public conversions are: nothing says the model attends bidirectionally, and the tokenizer
# does not append <|endoftext|>.
GTE_CONFIG = TinyQwen2(add_eos=False, seed=11)
STELLA_CONFIG = TinyQwen2(add_eos=False, seed=12)
N_EMBD = GTE_CONFIG.n_embd
HEAD_DIMS = 1024  # the head's real output size; only its input side is tiny
LONG_TEXT = " ".join(f"part {i} of the text" for i in range(12))  # > 128 tokens, the causal decode size
TEXTS = [
    "hi",
    "Are we still on for lunch tomorrow?",
    "the tiny test of the token t",
    "Ünïcödé façade naïve café, 日本語, emoji 🙂",
]
FIDELITY = 0.9999

Vector = NDArray[np.float64]


def cosine(a: NDArray[Any], b: NDArray[Any]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def tiny(name: str, **update: Any) -> ModelSpec:
    """The repository's entry for `name`, sized for the tiny model (everything else as it is)."""
    spec = REPOSITORY.models[name]
    dimensions = N_EMBD if not spec.files else HEAD_DIMS
    fields = {
        **spec.model_dump(exclude_unset=True),
        "dimensions": dimensions,
        "max_tokens": min(spec.max_tokens, GTE_CONFIG.n_ctx),
        "load": LoadPolicy.ON_DEMAND,
    }
    return ModelSpec.model_validate({**fields, **update})


@dataclass(frozen=True)
class Served:
    """A tiny model as the fake Hub serves it, and its reference."""

    weights: Path
    reference: Qwen2Reference
    tokenize: Tokenizer


@dataclass(frozen=True)
class World:
    hub: FakeHub
    gte: Served
    stella: Served
    heads: dict[int, Path]  # stella's 2_Dense_<dims> files, by dims
    ember: Path


def _serve(hub: FakeHub, source: str, path: Path) -> None:
    hub_file = HubFile.parse(source)
    revision = hub_file.revision or "main"
    commit = revision if len(revision) == 40 else None
    hub.add_file(hub_file.repo_id, hub_file.filename, path.read_bytes(), revision=revision, commit=commit)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("decoders")
    gte = write_tiny_qwen2(folder / "gte.gguf", GTE_CONFIG)
    ember = write_tiny_bert(folder / "ember.gguf")
    stella = write_tiny_qwen2(folder / "stella.gguf", STELLA_CONFIG)
    head_source = REPOSITORY.models[STELLA].files["projection_head"]
    assert "/2_Dense_1024/" in head_source
    heads = {
        dims: write_dense_head(folder / f"2_Dense_{dims}" / "model.safetensors", inputs=N_EMBD, outputs=dims, seed=dims)
        for dims in (256, HEAD_DIMS)
    }
    tokenizers = [Tokenizer(gte), Tokenizer(stella)]
    with running_fake_hub() as hub:
        _serve(hub, REPOSITORY.models[GTE].source, gte)
        _serve(hub, REPOSITORY.models[STELLA].source, stella)
        _serve(hub, REPOSITORY.models[EMBER].source, ember)
        for dims, path in heads.items():
            _serve(hub, head_source.replace("/2_Dense_1024/", f"/2_Dense_{dims}/"), path)
        yield World(
            hub=hub,
            gte=Served(gte, Qwen2Reference(gte), tokenizers[0]),
            stella=Served(stella, Qwen2Reference(stella), tokenizers[1]),
            heads=heads,
            ember=ember,
        )
    for tokenizer in tokenizers:
        tokenizer.close()


@pytest.fixture
async def engine(world: World, tmp_path: Path) -> AsyncIterator[InferenceEngine]:
    catalog = Catalog(models={GTE: tiny(GTE), STELLA: tiny(STELLA), EMBER: tiny(EMBER)}, base_dir=tmp_path)
    registry, engine = gguf_engine(catalog, tmp_path, hub="hub-cache", hub_endpoint=world.hub.url)
    yield engine
    await registry.close()


def gte_reference(world: World, text: str, *, causal: bool = False) -> Vector:
    """gte-Qwen2 as its authors run it: the text, then <|endoftext|>, bidirectional, last token."""
    served = world.gte
    tokens = [*served.tokenize(text), served.tokenize.eos]
    return _unit(served.reference.embed(tokens, causal=causal, last_token=True))


def stella_reference(world: World, text: str, *, dims: int = HEAD_DIMS, causal: bool = False) -> Vector:
    """stella as its authors run it: bidirectional, mean of the token states, then the Dense head."""
    served = world.stella
    tensors = load_file(str(world.heads[dims]))
    head = (tensors["linear.weight"].astype(np.float64), tensors["linear.bias"].astype(np.float64))
    return _unit(served.reference.embed(served.tokenize(text), causal=causal, last_token=False, head=head))


def _unit(vector: Vector) -> Vector:
    unit: Vector = vector / np.linalg.norm(vector)
    return unit


# -- Served through the registry and the engine, from the fake Hub ---------------------------------


async def test_gte_qwen2_is_bidirectional_last_token_with_endoftext(engine: InferenceEngine, world: World) -> None:
    spec = REPOSITORY.models[GTE]
    for input_type, prompt in ((InputType.QUERY, spec.query_prompt), (InputType.DOCUMENT, spec.document_prompt)):
        result = await engine.embed(EmbedRequest(inputs=[*TEXTS, LONG_TEXT], model=GTE, input_type=input_type))
        assert result.vectors.shape == (len(TEXTS) + 1, N_EMBD)
        for text, vector in zip([*TEXTS, LONG_TEXT], result.vectors, strict=True):
            assert cosine(vector, gte_reference(world, prompt + text)) >= FIDELITY, (input_type, text[:30])
        # The appended token is counted: it is read like any other.
        expected_tokens = sum(len(world.gte.tokenize(prompt + t)) + 1 for t in [*TEXTS, LONG_TEXT])
        assert result.usage.prompt_tokens == expected_tokens


async def test_stella_is_bidirectional_mean_then_its_dense_head(engine: InferenceEngine, world: World) -> None:
    spec = REPOSITORY.models[STELLA]
    result = await engine.embed(EmbedRequest(inputs=[*TEXTS, LONG_TEXT], model=STELLA, input_type=InputType.QUERY))
    assert result.vectors.shape == (len(TEXTS) + 1, HEAD_DIMS)
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    for text, vector in zip([*TEXTS, LONG_TEXT], result.vectors, strict=True):
        assert cosine(vector, stella_reference(world, spec.query_prompt + text)) >= FIDELITY, text[:30]


async def test_the_dense_head_came_from_the_pinned_hub_revision(engine: InferenceEngine, world: World) -> None:
    await engine.embed(EmbedRequest(inputs=["hi"], model=STELLA))
    head = HubFile.parse(REPOSITORY.models[STELLA].files["projection_head"])
    assert head.revision is not None and len(head.revision) == 40
    asked = [r.path for r in world.hub.requests if "2_Dense_1024" in r.path]
    assert asked and all(f"/resolve/{head.revision}/2_Dense_1024/model.safetensors" in path for path in asked)


async def test_another_shipped_head_gives_its_dimension(engine: InferenceEngine, world: World) -> None:
    registry = engine.registry
    head = REPOSITORY.models[STELLA].files["projection_head"].replace("/2_Dense_1024/", "/2_Dense_256/")
    spec = registry.spec_from_api(STELLA, f"files: {{projection_head: '{head}'}}\ndimensions: 256")
    await registry.load(STELLA, spec=spec)
    result = await engine.embed(EmbedRequest(inputs=TEXTS, model=STELLA))
    assert result.vectors.shape == (len(TEXTS), 256)
    for text, vector in zip(TEXTS, result.vectors, strict=True):
        assert cosine(vector, stella_reference(world, text, dims=256)) >= FIDELITY, text[:30]


async def test_ember_is_bert_with_cls_pooling(engine: InferenceEngine, world: World) -> None:
    texts = ["hello there, you!", "are we still on for lunch tomorrow?", "the bakery opens at seven."]
    result = await engine.embed(EmbedRequest(inputs=texts, model=EMBER))
    assert result.vectors.shape == (len(texts), N_EMBD)
    tokenize, reference = Tokenizer(world.ember), BertReference(world.ember)
    try:
        for text, vector in zip(texts, result.vectors, strict=True):
            tokens = tokenize(text)  # [CLS] ... [SEP], as BERT's tokenizer frames a text
            assert cosine(vector, reference.cls(tokens)) >= FIDELITY, text
            # The pooling setting matters: the mean of the states is another vector.
            assert cosine(vector, reference.states(tokens).mean(axis=0)) < FIDELITY, text
    finally:
        tokenize.close()


async def test_pool_chunks_take_the_window_from_the_spec(engine: InferenceEngine, world: World) -> None:
    window = 48
    registry = engine.registry
    await registry.load(GTE, spec=registry.spec_from_api(GTE, f"max_tokens: {window}"))
    text = " ".join([LONG_TEXT] * 2)
    assert len(world.gte.tokenize(text)) > 3 * window
    _, (spans,) = await engine.split(GTE, [text], input_type=InputType.DOCUMENT)
    pieces = [text[start:end] for start, end in spans]
    assert len(pieces) >= 3
    # Each window is read whole: its tokens, the appended one included, fit the spec's window.
    assert all(len(world.gte.tokenize(piece)) + 1 <= window for piece in pieces)
    pooled = await engine.embed(EmbedRequest(inputs=[text], model=GTE, pool_chunks=True))
    expected = _unit(np.mean([gte_reference(world, piece) for piece in pieces], axis=0))
    assert cosine(pooled.vectors[0], expected) >= FIDELITY


# -- The check can fail ---------------------------------------------------------------------------


def _load(world: World, spec: ModelSpec, served: Served, head: Path | None = None) -> GgufBackend:
    extra = {"projection_head": head} if head is not None else {}
    return GgufBackend.load(spec, ModelFiles(weights=served.weights, extra=extra), LoadOptions(threads=1))


def _served_and_reference(world: World, spec: ModelSpec, name: str) -> list[float]:
    served = world.gte if name == GTE else world.stella
    head = world.heads[HEAD_DIMS] if name == STELLA else None
    backend = _load(world, spec, served, head)
    try:
        vectors = backend.embed(TEXTS, truncate=False).vectors
    finally:
        backend.close()
    reference = gte_reference if name == GTE else stella_reference
    return [cosine(v, reference(world, t)) for t, v in zip(TEXTS, vectors, strict=True)]


@pytest.mark.parametrize("name", [GTE, STELLA])
def test_the_entries_as_written_pass(world: World, name: str) -> None:
    assert min(_served_and_reference(world, tiny(name), name)) >= FIDELITY


@pytest.mark.parametrize("name", [GTE, STELLA])
def test_causal_attention_fails_the_comparison(world: World, name: str) -> None:
    spec = tiny(name, options={**REPOSITORY.models[name].options, "attention": "causal"})
    cosines = _served_and_reference(world, spec, name)
    assert max(cosines) < FIDELITY, cosines


def test_a_missing_endoftext_fails_the_comparison(world: World) -> None:
    spec = tiny(GTE, options={"attention": "bidirectional"})
    cosines = _served_and_reference(world, spec, GTE)
    assert max(cosines) < FIDELITY, cosines


def test_the_file_alone_runs_causal(world: World) -> None:
    # What llama.cpp does with a public conversion when the entry says nothing: causal, the defect.
    spec = tiny(GTE, options={"append_tokens": ["<|endoftext|>"]})
    backend = _load(world, spec, world.gte)
    try:
        vector = backend.embed([TEXTS[1]], truncate=False).vectors[0]
    finally:
        backend.close()
    assert cosine(vector, gte_reference(world, TEXTS[1], causal=True)) >= FIDELITY
    assert cosine(vector, gte_reference(world, TEXTS[1])) < FIDELITY


# -- Load-time checks -----------------------------------------------------------------------------


def test_a_head_for_another_model_is_refused_at_load(world: World, tmp_path: Path) -> None:
    wrong = write_dense_head(tmp_path / "2_Dense_1024" / "model.safetensors", inputs=32, outputs=HEAD_DIMS)
    with pytest.raises(
        FailedPreconditionError, match=rf"head .* takes 32-d vectors, but the GGUF file's embedding size is {N_EMBD}"
    ):
        _load(world, tiny(STELLA), world.stella, wrong)


def test_dimensions_must_be_the_heads_output(world: World) -> None:
    with pytest.raises(FailedPreconditionError, match=r"dimensions 768, but the projection head .* outputs 1024"):
        _load(world, tiny(STELLA, dimensions=768), world.stella, world.heads[HEAD_DIMS])


def test_a_file_that_is_not_a_dense_head_is_refused(world: World, tmp_path: Path) -> None:
    not_head = tmp_path / "model.safetensors"
    not_head.write_bytes(b"not safetensors at all")
    with pytest.raises(FailedPreconditionError, match="cannot read the projection head"):
        _load(world, tiny(STELLA), world.stella, not_head)


def test_append_tokens_must_be_one_token_of_the_vocabulary(world: World) -> None:
    spec = tiny(GTE, options={"attention": "bidirectional", "append_tokens": ["<|nope|>"]})
    with pytest.raises(FailedPreconditionError, match=r"append_tokens names '<\|nope\|>', which is not one token"):
        _load(world, spec, world.gte)


def test_a_window_beyond_the_files_training_context_is_refused(world: World) -> None:
    spec = tiny(GTE, max_tokens=GTE_CONFIG.n_ctx + 1)
    with pytest.raises(FailedPreconditionError, match=rf"max_tokens {GTE_CONFIG.n_ctx + 1}, but .* trained for"):
        _load(world, spec, world.gte)


def test_an_invalid_attention_is_refused(world: World) -> None:
    with pytest.raises(InvalidArgumentError, match=r"options\.attention"):
        _load(world, tiny(GTE, options={"attention": "sideways"}), world.gte)


def test_a_tokenizer_that_appends_endoftext_itself_gets_no_second_one(tmp_path: Path) -> None:
    weights = write_tiny_qwen2(tmp_path / "eos.gguf", TinyQwen2(add_eos=True, seed=11))
    tokenize = Tokenizer(weights)
    try:
        backend = GgufBackend.load(tiny(GTE), ModelFiles(weights=weights), LoadOptions(threads=1))
        try:
            for text in TEXTS:
                assert tokenize(text)[-1] == tokenize.eos
                assert backend.count_tokens(text) == len(tokenize(text))
            vector = backend.embed([TEXTS[1]], truncate=False).vectors[0]
        finally:
            backend.close()
        expected = Qwen2Reference(weights).embed(tokenize(TEXTS[1]), causal=False, last_token=True)
        assert cosine(vector, expected) >= FIDELITY
    finally:
        tokenize.close()


def test_truncation_keeps_the_appended_token(world: World) -> None:
    backend = _load(world, tiny(GTE, max_tokens=16), world.gte)
    try:
        output = backend.embed([LONG_TEXT], truncate=True)
    finally:
        backend.close()
    assert output.token_counts == [16]
    tokens = [*world.gte.tokenize(LONG_TEXT)[:15], world.gte.tokenize.eos]
    expected = world.gte.reference.embed(tokens, causal=False, last_token=True)
    assert cosine(output.vectors[0], expected) >= FIDELITY


def test_pooling_of_the_entries(world: World) -> None:
    assert REPOSITORY.models[GTE].pooling is Pooling.LAST
    assert REPOSITORY.models[STELLA].pooling is Pooling.MEAN
