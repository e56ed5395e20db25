"""Exact tests of the pooling functions on small hand-made batches."""

from __future__ import annotations

import numpy as np
import pytest

from wafer.backends.pooling import cls_pool, last_pool, mean_pool, no_pool, pool
from wafer.specs import Pooling


def _states(batch: int, seq: int, dim: int) -> np.ndarray:
    # Distinct, exactly representable values: state[b, s, d] = 100 b + 10 s + d.
    b, s, d = np.meshgrid(np.arange(batch), np.arange(seq), np.arange(dim), indexing="ij")
    return (100 * b + 10 * s + d).astype(np.float32)


RIGHT_PADDED = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=np.int64)
LEFT_PADDED = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=np.int64)


def test_mean_ignores_padding() -> None:
    states = _states(3, 4, 2)
    got = mean_pool(states, RIGHT_PADDED)
    want = np.array(
        [
            [np.mean([0, 10, 20]), np.mean([1, 11, 21])],
            [100 + np.mean([0, 10, 20, 30]), 101 + np.mean([0, 10, 20, 30])],
            [200, 201],
        ],
        dtype=np.float32,
    )
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_mean_with_left_padding() -> None:
    got = mean_pool(_states(3, 4, 1), LEFT_PADDED)
    np.testing.assert_allclose(got[:, 0], [20.0, 115.0, 230.0], rtol=0, atol=1e-5)


def test_mean_is_unaffected_by_what_padding_holds() -> None:
    states = _states(3, 4, 3)
    noisy = states.copy()
    noisy[RIGHT_PADDED == 0] = 1e6
    np.testing.assert_array_equal(mean_pool(states, RIGHT_PADDED), mean_pool(noisy, RIGHT_PADDED))


def test_cls_takes_the_first_real_token() -> None:
    states = _states(3, 4, 2)
    np.testing.assert_array_equal(cls_pool(states, RIGHT_PADDED), [[0, 1], [100, 101], [200, 201]])
    np.testing.assert_array_equal(cls_pool(states, LEFT_PADDED), [[10, 11], [100, 101], [230, 231]])


def test_last_takes_the_last_real_token_with_right_padding() -> None:
    states = _states(3, 4, 2)
    np.testing.assert_array_equal(last_pool(states, RIGHT_PADDED), [[20, 21], [130, 131], [200, 201]])


def test_last_takes_the_last_real_token_with_left_padding() -> None:
    states = _states(3, 4, 2)
    np.testing.assert_array_equal(last_pool(states, LEFT_PADDED), [[30, 31], [130, 131], [230, 231]])


def test_left_and_right_padding_give_the_same_vectors() -> None:
    # The same three texts (lengths 3, 4, 1), padded on either side.
    lengths = [3, 4, 1]
    rng = np.random.default_rng(0)
    tokens = [rng.standard_normal((n, 5)).astype(np.float32) for n in lengths]
    right = np.zeros((3, 4, 5), dtype=np.float32)
    left = np.zeros((3, 4, 5), dtype=np.float32)
    for row, values in enumerate(tokens):
        right[row, : len(values)] = values
        left[row, 4 - len(values) :] = values
    for pooling in (Pooling.MEAN, Pooling.CLS, Pooling.LAST):
        np.testing.assert_allclose(
            pool(right, RIGHT_PADDED, pooling), pool(left, LEFT_PADDED, pooling), rtol=1e-6, atol=1e-6
        )


def test_none_passes_pooled_vectors_through() -> None:
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(no_pool(vectors, RIGHT_PADDED), vectors)
    np.testing.assert_array_equal(pool(vectors, RIGHT_PADDED, Pooling.NONE), vectors)


def test_dispatch_covers_every_strategy() -> None:
    states = _states(3, 4, 2)
    np.testing.assert_array_equal(pool(states, RIGHT_PADDED, Pooling.MEAN), mean_pool(states, RIGHT_PADDED))
    np.testing.assert_array_equal(pool(states, RIGHT_PADDED, Pooling.CLS), cls_pool(states, RIGHT_PADDED))
    np.testing.assert_array_equal(pool(states, RIGHT_PADDED, Pooling.LAST), last_pool(states, RIGHT_PADDED))


def test_empty_batch() -> None:
    states = np.zeros((0, 4, 3), dtype=np.float32)
    mask = np.zeros((0, 4), dtype=np.int64)
    for pooling in (Pooling.MEAN, Pooling.CLS, Pooling.LAST):
        assert pool(states, mask, pooling).shape == (0, 3)


@pytest.mark.parametrize("pooling", [Pooling.MEAN, Pooling.CLS, Pooling.LAST])
def test_shape_errors(pooling: Pooling) -> None:
    with pytest.raises(ValueError, match="expects"):
        pool(np.zeros((3, 2), dtype=np.float32), RIGHT_PADDED, pooling)
    with pytest.raises(ValueError, match="does not match"):
        pool(_states(3, 5, 2), RIGHT_PADDED, pooling)
    with pytest.raises(ValueError, match="at least one real token"):
        pool(_states(3, 4, 2), np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]), pooling)


def test_none_rejects_token_states() -> None:
    with pytest.raises(ValueError, match="expects"):
        no_pool(_states(3, 4, 2), RIGHT_PADDED)
