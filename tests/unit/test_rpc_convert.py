"""The RPC layer's translation of Embed results: the hand-encoded embeddings field is the message
protobuf itself builds from Python floats."""

from __future__ import annotations

import numpy as np
import pytest

from wafer.domain import EmbedResult, Timings, Usage
from wafer.rpc import convert
from wafer_proto.v1 import inference_pb2


def reference(result: EmbedResult) -> inference_pb2.EmbedResponse:
    """The response built the plain way: a Python float per value."""
    return inference_pb2.EmbedResponse(
        model=result.model,
        embeddings=[inference_pb2.Embedding(values=row) for row in result.vectors.tolist()],
        usage=convert.usage_to_proto(result.usage),
        timings=convert.timings_to_proto(result.timings),
        cached=result.cached,
        context_id=result.context_id,
    )


@pytest.mark.parametrize(
    "shape",
    [(1, 384), (3, 384), (0, 384), (2, 0), (5, 31), (1, 1), (2, 40), (1, 4096)],
)
def test_embed_response_is_the_message_protobuf_builds_from_floats(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    vectors = rng.standard_normal(shape).astype(np.float32)
    if vectors.size:
        vectors.flat[0] = -0.0  # signs, extremes and subnormals survive byte for byte
        vectors.flat[-1] = np.finfo(np.float32).max
        vectors.flat[len(vectors.flat) // 2] = np.float32(1e-45)
    result = EmbedResult(
        model="minilm",
        vectors=vectors,
        usage=Usage(prompt_tokens=7),
        timings=Timings(queue_ms=1.5, inference_ms=2.5, batch_size=3, tokenize_ms=0.25),
        cached=1,
        context_id="ctx",
    )
    built = convert.embed_response(result)
    expected = reference(result)
    assert built == expected
    assert built.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    assert len(built.embeddings) == shape[0]
    for row, embedding in zip(vectors, built.embeddings, strict=True):
        np.testing.assert_array_equal(np.array(embedding.values, dtype=np.float32), row)


def test_embed_response_takes_non_contiguous_and_float64_vectors() -> None:
    wide = np.arange(24, dtype=np.float64).reshape(3, 8) / 7
    for vectors in (wide[:, ::2], wide.T[:4].T, wide):
        result = EmbedResult(model="m", vectors=vectors, usage=Usage(), timings=Timings())  # type: ignore[arg-type]
        assert convert.embed_response(result) == reference(result)
