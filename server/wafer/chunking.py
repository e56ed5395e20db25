"""Automatic chunking: texts longer than a model's window become overlapping token windows.

The model's own tokenizer decides (through `Backend.token_offsets`), so a chunk never holds more
tokens than the model reads, and each chunk is a span of the original text given by character
offsets: `text[start:end]`. Windows overlap so that a sentence cut by one window's edge is read
whole by the next one.

Runs on the model's scheduler thread: a backend is driven by one thread at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

from wafer.backends.base import Backend

Span = tuple[int, int]
# A sixth of the window: 42 of MiniLM's 254 text tokens, enough for a sentence or two of context.
OVERLAP_FRACTION = 6


def token_windows(offsets: Sequence[Span], text_length: int, *, window: int, overlap: int) -> list[Span]:
    """Character spans of windows of at most `window` tokens, each starting `window - overlap`
    tokens after the last. The first span starts at 0 and the last ends at `text_length`, so the
    spans cover the whole text (whitespace at the edges included)."""
    if window <= 0:
        raise ValueError(f"window must be positive, not {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window), not {overlap}")
    count = len(offsets)
    if count <= window:
        return [(0, text_length)]
    spans: list[Span] = []
    step = window - overlap
    first = 0
    while True:
        last = min(first + window, count)
        start = 0 if first == 0 else offsets[first][0]
        end = text_length if last == count else offsets[last - 1][1]
        spans.append((start, end))
        if last == count:
            return spans
        first += step


def split(backend: Backend, texts: Sequence[str], *, prompt: str) -> list[list[Span]]:
    """Each text's chunks as character spans; a text that fits the window is one span.

    The window is the model's `max_tokens` less what the model adds around every input: its
    special tokens and the prompt put before each chunk.
    """
    limit = backend.spec.max_tokens
    overhead = backend.count_tokens(prompt + "a") - len(backend.token_offsets("a"))
    window = max(1, limit - overhead)
    overlap = window // OVERLAP_FRACTION
    result: list[list[Span]] = []
    for text in texts:
        # A token covers at least one byte of UTF-8, so a text with no more bytes than the window
        # needs no tokenizing at all (most short messages).
        if len(text.encode("utf-8")) <= window:
            result.append([(0, len(text))])
            continue
        result.append(token_windows(backend.token_offsets(text), len(text), window=window, overlap=overlap))
    return result
