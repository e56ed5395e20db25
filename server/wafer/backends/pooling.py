"""Pooling: a batch of token states and its attention mask become one vector per text.

The strategy must be the one the model was trained with (its `1_Pooling/config.json`); a wrong
one still returns plausible-looking vectors, which is why every function here is exact and tested.
Functions never normalize: that is the engine's job, because callers may ask for raw vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wafer.domain import FloatMatrix
from wafer.specs import Pooling

# [batch, seq, dim] token states, or [batch, dim] for graphs that pool themselves.
FloatArray = NDArray[np.float32]
# [batch, seq], 1 for a real token and 0 for padding.
Mask = NDArray[np.integer[Any]]


def mean_pool(states: FloatArray, mask: Mask) -> FloatMatrix:
    """Average of the real tokens' states; padding does not count."""
    _check_token_states(states, mask)
    weights = mask.astype(np.float32)
    # [b, 1, s] @ [b, s, d]: one BLAS call instead of materializing states * mask.
    summed: FloatMatrix = np.matmul(weights[:, None, :], states.astype(np.float32, copy=False))[:, 0, :]
    counts: FloatMatrix = np.maximum(weights.sum(axis=1, keepdims=True), np.float32(1e-9))
    return np.divide(summed, counts, dtype=np.float32)


def cls_pool(states: FloatArray, mask: Mask) -> FloatMatrix:
    """State of the first real token (the [CLS] token of BERT-style models).

    Taken as the first unmasked position rather than position 0, so that a left-padded batch
    does not silently pool a padding state.
    """
    _check_token_states(states, mask)
    first = np.argmax(mask != 0, axis=1)
    return np.ascontiguousarray(states[np.arange(states.shape[0]), first], dtype=np.float32)


def last_pool(states: FloatArray, mask: Mask) -> FloatMatrix:
    """State of the last real token (decoder embedding models such as gte-Qwen2).

    Found from the mask, not from the sequence end, so it is right for right- and left-padding.
    """
    _check_token_states(states, mask)
    seq = mask.shape[1]
    last = seq - 1 - np.argmax((mask != 0)[:, ::-1], axis=1)
    return np.ascontiguousarray(states[np.arange(states.shape[0]), last], dtype=np.float32)


def no_pool(states: FloatArray, mask: Mask) -> FloatMatrix:
    """The graph already pooled: [batch, dim] comes back as it is."""
    if states.ndim != 2:
        raise ValueError(f"pooling 'none' expects [batch, dim] states, got shape {states.shape}")
    if mask.shape[0] != states.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} rows but states have {states.shape[0]}")
    return np.ascontiguousarray(states, dtype=np.float32)


POOLERS: dict[Pooling, Callable[[FloatArray, Mask], FloatMatrix]] = {
    Pooling.MEAN: mean_pool,
    Pooling.CLS: cls_pool,
    Pooling.LAST: last_pool,
    Pooling.NONE: no_pool,
}


def pool(states: FloatArray, mask: Mask, pooling: Pooling) -> FloatMatrix:
    """Pool with the named strategy."""
    return POOLERS[pooling](states, mask)


def _check_token_states(states: FloatArray, mask: Mask) -> None:
    if states.ndim != 3:
        raise ValueError(f"token pooling expects [batch, seq, dim] states, got shape {states.shape}")
    if mask.shape != states.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match states shape {states.shape[:2]}")
    # A row without a real token has no first/last token and no mean; a caller bug, not an input.
    if states.shape[0] and not bool(np.all(np.any(mask != 0, axis=1))):
        raise ValueError("every row of the mask needs at least one real token")
