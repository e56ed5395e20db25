"""Token windows over a text, splitting with a model's own tokenizer, and Embed's pooled windows (the fake's: one token
per word, plus two special tokens around every text)."""

from __future__ import annotations

import mmap
import re

import numpy as np
import pytest

from tests.fakes.fake_backend import FakeBackend
from wafer.chunking import OVERLAP_FRACTION, split, token_windows
from wafer.domain import EmbedRequest, InputType
from wafer.engine import InferenceEngine
from wafer.errors import InvalidArgumentError
from wafer.specs import ModelSpec


def words(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def test_a_text_that_fits_is_one_span() -> None:
    assert token_windows(words("a b c"), 5, window=3, overlap=1) == [(0, 5)]


@pytest.mark.parametrize(("count", "window", "overlap"), [(10, 4, 1), (10, 4, 0), (11, 5, 2), (100, 7, 3)])
def test_windows_cover_the_text_overlap_and_never_exceed_the_window(count: int, window: int, overlap: int) -> None:
    text = " ".join(f"w{i}" for i in range(count))
    offsets = words(text)
    spans = token_windows(offsets, len(text), window=window, overlap=overlap)
    assert spans[0][0] == 0
    assert spans[-1][1] == len(text)
    covered: list[str] = []
    for start, end in spans:
        chunk = text[start:end].split()
        assert 0 < len(chunk) <= window
        if covered and overlap:
            assert chunk[:overlap] == covered[-overlap:]  # each window repeats the last one's tail
        covered.extend(chunk[overlap:] if covered else chunk)
    assert covered == text.split()


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        token_windows([], 0, window=0, overlap=0)
    with pytest.raises(ValueError, match="overlap"):
        token_windows([], 0, window=3, overlap=3)


def test_split_uses_the_models_window_less_its_special_tokens_and_prompt() -> None:
    spec = ModelSpec.model_validate(
        {"name": "m", "backend": "fake", "source": "x", "tasks": ["embed"], "dimensions": 4, "max_tokens": 12}
    )
    backend = FakeBackend(spec, mmap.mmap(-1, 1))
    long_text = " ".join(f"word{i}" for i in range(30))
    short, long = split(backend, ["tiny text", long_text], prompt="")
    assert short == [(0, 9)]
    window = 12 - 2  # two special tokens around every input
    for start, end in long:
        assert backend.count_tokens(long_text[start:end]) <= 12
        assert len(long_text[start:end].split()) <= window
    assert len(long) == 4  # 30 words in windows of 10 stepping by 10 - 10 // OVERLAP_FRACTION
    assert 10 // OVERLAP_FRACTION == 1
    # A prompt before every chunk takes its tokens from the window.
    prompted = split(backend, [long_text], prompt="search document: ")[0]
    assert all(backend.count_tokens("search document: " + long_text[a:b]) <= 12 for a, b in prompted)
    assert len(prompted) > len(long)


async def test_embed_pools_the_windows_of_a_long_input(engine: InferenceEngine) -> None:
    long_text = " ".join(f"word{i}" for i in range(30))  # three windows of the fake "embedder"
    pooled = await engine.embed(EmbedRequest(inputs=["short", long_text], pool_chunks=True))
    assert pooled.vectors.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(pooled.vectors, axis=1), 1.0, rtol=1e-5)
    # A short input is embedded as it is.
    alone = await engine.embed(EmbedRequest(inputs=["short"]))
    np.testing.assert_allclose(pooled.vectors[0], alone.vectors[0], rtol=1e-5)
    # A long one is the normalized mean of its windows' vectors.
    _, [spans] = await engine.split("embedder", [long_text], input_type=InputType.DOCUMENT)
    windows = await engine.embed(EmbedRequest(inputs=[long_text[a:b] for a, b in spans]))
    mean = windows.vectors.mean(axis=0)
    np.testing.assert_allclose(pooled.vectors[1], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    assert pooled.timings.batch_size == 1 + len(spans)
    # Without pooling the same input is refused as too long.
    with pytest.raises(InvalidArgumentError, match="input 1 has"):
        await engine.embed(EmbedRequest(inputs=["short", long_text]))
