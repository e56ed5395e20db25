"""ONNX encoder models (BERT-style embedders) on onnxruntime, tokenized with `tokenizers`.

The graph returns token states (or already pooled vectors); tokenization, padding, truncation,
batching and pooling happen here, and normalization in the engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from tokenizers import Encoding, Tokenizer

from wafer.backends.base import (
    Backend,
    ComputeInterrupted,
    Embeddings,
    InputTooLongError,
    LoadOptions,
    ModelFiles,
    Tokenized,
)
from wafer.backends.pooling import pool
from wafer.domain import Context
from wafer.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from wafer.specs import ModelSpec, Pooling, RerankMethod, Task

# Padded tokens (rows x longest row) per onnxruntime call. Measured on MiniLM, 2 cores, 512 SMS
# texts in one call: 2048 ran at about 2x the texts/s of 16384 (activations that fit in cache, and
# onnxruntime's arena keeps what the largest call needed: 0.75 GB RSS at 16384), and small enough
# that one long text never pads hundreds of short ones to its length.
PADDED_TOKEN_BUDGET = 2048
# A sub-batch pads every row to its longest. Rows come longest first; in `sub_batches` (the cde
# backend's planner), a row that would be padded by more than this fraction starts a new sub-batch.
# Merged requests arrive in random length order: on 16 random SMS texts per call this ran at 1.4x
# the texts/s of padding them all together.
MAX_PADDING_FRACTION = 0.2
# What one onnxruntime call costs beyond its padded tokens, in tokens' worth of compute (the
# session's fixed work per run, and matrix products too thin to run at full speed). The ONNX
# backend plans its sub-batches with it (`planned_batches`): on int8 MiniLM, one thread, random
# SMS texts in calls of 4 and 8, 24 ran 7 % faster per text than MAX_PADDING_FRACTION's rule
# (8.57 against 9.18 and 7.98 against 8.62 ms of CPU per text), which splits a few random texts
# into as many runs; 64 padded too much.
RUN_OVERHEAD_TOKENS = 24
# Rows `planned_batches` considers for one run: bounds its planning on very large calls.
_MAX_PLANNED_ROWS = 128

# The inputs a BERT-style export declares; we know how to fill each one.
_INPUT_IDS = "input_ids"
_ATTENTION_MASK = "attention_mask"
_TOKEN_TYPE_IDS = "token_type_ids"
_KNOWN_INPUTS = (_INPUT_IDS, _ATTENTION_MASK, _TOKEN_TYPE_IDS)
_INPUT_DTYPES: dict[str, type[np.signedinteger[Any]]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
_PREFERRED_OUTPUT = "last_hidden_state"
_FLOAT_OUTPUTS = ("tensor(float)", "tensor(float16)", "tensor(double)")
_PROBE_TEXT = "wafer health check"

IntMatrix = NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Padding:
    """The tokenizer's own padding token, applied by us per sub-batch."""

    id: int
    type_id: int
    left: bool


@dataclass(frozen=True, slots=True)
class _Batch:
    input_ids: IntMatrix
    attention_mask: IntMatrix
    token_type_ids: IntMatrix


class OnnxBackend(Backend):
    tasks = frozenset({Task.EMBED, Task.RERANK})
    interruptible = True
    tokenizes_ahead = True
    scales_out = True

    def __init__(
        self,
        spec: ModelSpec,
        *,
        session: Any,
        truncating: Tokenizer,
        counting: Tokenizer,
        padding: Padding,
        inputs: dict[str, type[np.signedinteger[Any]]],
        output: str,
    ) -> None:
        super().__init__(spec)
        self._session: Any | None = session
        # Two tokenizers rather than one toggled: `truncating` cuts at max_tokens, `counting` never
        # cuts, so counts and too-long checks are exact without mutating shared state per call.
        self._truncating = truncating
        self._counting = counting
        self._padding = padding
        self._inputs = inputs
        self._output = output
        self._dimensions = spec.dimensions or 0
        self.padded_token_budget = PADDED_TOKEN_BUDGET
        # The run options of the embed call in progress, or of the next one: `interrupt` sets their
        # terminate flag, which onnxruntime checks between operators. Made before the call starts,
        # so an interrupt that comes just before it is not lost.
        self._options = ort.RunOptions()

    # -- Loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: ModelSpec, files: ModelFiles, options: LoadOptions) -> OnnxBackend:
        if Task.RERANK in spec.tasks and spec.effective_rerank_method is not RerankMethod.COSINE:
            raise FailedPreconditionError(
                f"model {spec.name!r}: the onnx backend reranks by cosine only; "
                "set rerank_method: cosine or drop the rerank task"
            )
        if spec.dimensions is None:
            raise FailedPreconditionError(f"model {spec.name!r}: an onnx model needs `dimensions`")
        if files.tokenizer is None:
            raise FailedPreconditionError(
                f"model {spec.name!r}: the onnx backend needs a `tokenizer` (a tokenizer.json)"
            )
        truncating, counting, padding = load_tokenizers(spec, files.tokenizer)
        session = _load_session(spec, files.weights, options.threads)
        inputs = _declared_inputs(spec, session)
        output = _choose_output(spec, session)
        backend = cls(
            spec,
            session=session,
            truncating=truncating,
            counting=counting,
            padding=padding,
            inputs=inputs,
            output=output,
        )
        backend._check_output_shape()
        return backend

    def _check_output_shape(self) -> None:
        """Run the graph once: the real output says whether the spec's pooling and size fit it."""
        spec = self.spec
        encoding = self._truncating.encode(_PROBE_TEXT)
        states = self._forward(self._pad([encoding]))
        where = f"model {spec.name!r}: output {self._output!r} has shape {list(states.shape)}"
        if states.ndim == 2 and spec.pooling is not Pooling.NONE:
            raise FailedPreconditionError(
                f"{where}, already pooled, but models.yaml says pooling: {spec.pooling.value}; "
                "set pooling: none, or export the graph with token states (last_hidden_state)"
            )
        if states.ndim == 3 and spec.pooling is Pooling.NONE:
            raise FailedPreconditionError(
                f"{where}, token states, but models.yaml says pooling: none; set the pooling the "
                "model was trained with (its 1_Pooling/config.json: mean, cls or last)"
            )
        if states.ndim not in (2, 3):
            raise FailedPreconditionError(f"{where}; expected [batch, seq, dim] or [batch, dim]")
        if states.shape[-1] != spec.dimensions:
            raise FailedPreconditionError(
                f"{where}: vectors of {states.shape[-1]} dimensions, but models.yaml says dimensions: {spec.dimensions}"
            )

    # -- Backend -------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], *, truncate: bool, context: Context | None = None) -> Embeddings:
        return self.embed_tokenized(self.tokenize(texts, truncate=truncate))

    def tokenize(self, texts: Sequence[str], *, truncate: bool) -> Tokenized:
        encodings = self._encode(texts, truncate=truncate)
        return Tokenized(items=encodings, token_counts=[len(encoding.ids) for encoding in encodings])

    def tokenize_each(self, requests: Sequence[Sequence[str]], *, truncate: bool) -> list[Tokenized | Exception]:
        # One batch call for every request's texts: tokenizers encodes them in parallel without the
        # GIL, and a single-text call costs about ten times a text's share of a batch call.
        tokenizer = self._truncating if truncate else self._counting
        encodings: list[Encoding] = tokenizer.encode_batch_fast([text for texts in requests for text in texts])
        results: list[Tokenized | Exception] = []
        start = 0
        for texts in requests:
            own = encodings[start : start + len(texts)]
            start += len(texts)
            try:
                self._check(own)
            except InvalidArgumentError as exc:
                results.append(exc)
                continue
            results.append(Tokenized(items=own, token_counts=[len(encoding.ids) for encoding in own]))
        return results

    def embed_tokenized(self, tokenized: Tokenized) -> Embeddings:
        encodings: Sequence[Encoding] = tokenized.items  # type: ignore[assignment]
        token_counts = tokenized.token_counts
        vectors = np.empty((len(encodings), self._dimensions), dtype=np.float32)
        # Longest first: each sub-batch pads to its own longest row, so similar lengths share one.
        order = sorted(range(len(encodings)), key=token_counts.__getitem__, reverse=True)
        options = self._options
        try:
            for rows in planned_batches(order, token_counts, self.padded_token_budget):
                batch = self._pad([encodings[row] for row in rows])
                states = self._forward(batch, options)
                vectors[rows] = pool(states, batch.attention_mask, self.spec.pooling)
        finally:
            self._options = ort.RunOptions()
        return Embeddings(vectors=vectors, token_counts=list(token_counts))

    def interrupt(self) -> None:
        self._options.terminate = True

    def count_tokens(self, text: str) -> int:
        return len(self._counting.encode(text).ids)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        # tokenizers reports offsets into the original string (before lowercasing or accent
        # stripping), in characters.
        return [(int(a), int(b)) for a, b in self._counting.encode(text, add_special_tokens=False).offsets]

    def health(self) -> None:
        vectors = self.embed([_PROBE_TEXT], truncate=True).vectors
        if vectors.shape != (1, self._dimensions) or not bool(np.isfinite(vectors).all()):
            raise FailedPreconditionError(
                f"model {self.spec.name!r} returned an unusable vector of shape {vectors.shape}"
            )

    def close(self) -> None:
        self._session = None

    # -- Internals -----------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str], *, truncate: bool) -> list[Encoding]:
        # Without truncation the untruncated encoding is needed anyway (its length is the exact
        # count the error reports), so one pass with the counting tokenizer does both jobs.
        tokenizer = self._truncating if truncate else self._counting
        encodings: list[Encoding] = tokenizer.encode_batch_fast(list(texts))
        self._check(encodings)
        return encodings

    def _check(self, encodings: Sequence[Encoding]) -> None:
        """Refuse a request whose input is over the window (not truncated) or has no tokens."""
        spec = self.spec
        for index, encoding in enumerate(encodings):
            length = len(encoding.ids)
            if length > spec.max_tokens:
                raise InputTooLongError(index, length, spec.max_tokens, spec.name)
            if length == 0:
                raise InvalidArgumentError(f"input {index} has no tokens for model {spec.name!r}")

    def _pad(self, encodings: Sequence[Encoding]) -> _Batch:
        width = max(len(encoding.ids) for encoding in encodings)
        shape = (len(encodings), width)
        input_ids = np.full(shape, self._padding.id, dtype=np.int64)
        attention_mask = np.zeros(shape, dtype=np.int64)
        token_type_ids = np.full(shape, self._padding.type_id, dtype=np.int64)
        for row, encoding in enumerate(encodings):
            length = len(encoding.ids)
            span = slice(width - length, width) if self._padding.left else slice(0, length)
            input_ids[row, span] = encoding.ids
            attention_mask[row, span] = encoding.attention_mask
            token_type_ids[row, span] = encoding.type_ids
        return _Batch(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    def _forward(self, batch: _Batch, options: Any | None = None) -> NDArray[np.float32]:
        session = self._session
        if session is None:
            raise UnavailableError(f"model {self.spec.name!r} has been unloaded")
        arrays = {
            _INPUT_IDS: batch.input_ids,
            _ATTENTION_MASK: batch.attention_mask,
            _TOKEN_TYPE_IDS: batch.token_type_ids,
        }
        feeds = {name: arrays[name].astype(dtype, copy=False) for name, dtype in self._inputs.items()}
        try:
            (states,) = session.run([self._output], feeds, options)
        except Exception as exc:
            if options is not None and options.terminate:
                raise ComputeInterrupted from exc
            raise
        return np.asarray(states, dtype=np.float32)


def sub_batches(order: Sequence[int], lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Split `order` (longest first) into consecutive runs whose padded size (rows x longest) fits
    `budget` and in which no row is padded by more than MAX_PADDING_FRACTION of its width.

    A single row longer than the budget still forms a batch of its own.
    """
    rows: list[int] = []
    width = 0
    for index in order:
        grown = max(width, lengths[index])
        wasteful = lengths[index] < (1 - MAX_PADDING_FRACTION) * width
        if rows and (grown * (len(rows) + 1) > budget or wasteful):
            yield rows
            rows, grown = [], lengths[index]
        rows.append(index)
        width = grown
    if rows:
        yield rows


def planned_batches(
    order: Sequence[int], lengths: Sequence[int], budget: int, run_tokens: int = RUN_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Split `order` (longest first) into consecutive runs that cost the least compute in all: a
    run costs `run_tokens` plus its padded size (rows x longest), and fits `budget` (a single row
    longer than the budget still forms a run of its own). Planned exactly, by dynamic programming
    over where each run starts (a run holds at most _MAX_PLANNED_ROWS rows)."""
    count = len(order)
    # cost[end]: the cheapest plan of order[:end]; start[end]: where its last run starts.
    cost = [0] * (count + 1)
    start = [0] * (count + 1)
    for end in range(1, count + 1):
        best = -1
        for first in range(end - 1, max(-1, end - 1 - _MAX_PLANNED_ROWS), -1):
            rows = end - first
            padded = lengths[order[first]] * rows
            if rows > 1 and padded > budget:
                break  # starting earlier only widens and lengthens the run
            total = cost[first] + run_tokens + padded
            if best < 0 or total < best:
                best, start[end] = total, first
        cost[end] = best
    runs: list[list[int]] = []
    end = count
    while end:
        runs.append(list(order[start[end] : end]))
        end = start[end]
    runs.reverse()
    return runs


def load_tokenizers(spec: ModelSpec, path: Path) -> tuple[Tokenizer, Tokenizer, Padding]:
    try:
        truncating = Tokenizer.from_file(str(path))
        counting = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise FailedPreconditionError(
            f"model {spec.name!r}: cannot read tokenizer {path}: {type(exc).__name__}: {exc}"
        ) from exc
    # Some shipped tokenizer.json files (MiniLM's among them) pad every input to a fixed length;
    # keep their pad token and side, but pad each sub-batch only to its own longest row.
    saved: dict[str, Any] = dict(truncating.padding or {})
    pad_id = saved.get("pad_id")
    if pad_id is None:
        pad_token = saved.get("pad_token") or "[PAD]"
        pad_id = truncating.token_to_id(pad_token)
    padding = Padding(
        # Padding positions are masked out, so any valid id works when the tokenizer names none.
        id=int(pad_id) if pad_id is not None else 0,
        type_id=int(saved.get("pad_type_id") or 0),
        left=str(saved.get("direction", "right")).lower() == "left",
    )
    for tokenizer in (truncating, counting):
        tokenizer.no_padding()
    # Special tokens count against max_tokens: tokenizers reserves room for them when cutting.
    truncating.enable_truncation(max_length=spec.max_tokens, strategy="longest_first", direction="right")
    counting.no_truncation()
    return truncating, counting, padding


def _load_session(spec: ModelSpec, path: Path, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One request runs at a time per model (its worker); parallelism is inside each operator.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning workers burn the cores between operators; with another model (llama.cpp) or the
    # tokenizer in the same process they cost more than they save: 2 threads ran at 0.6x the
    # texts/s of 1 thread with spinning on, and on par with it off.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise FailedPreconditionError(
            f"model {spec.name!r}: onnxruntime cannot load {path}: {type(exc).__name__}: {exc}"
        ) from exc


def _choose_output(spec: ModelSpec, session: Any) -> str:
    """`last_hidden_state` if the graph has it, else the first float output of the rank the spec's
    pooling needs, else the first output (which the load-time probe then explains).

    Some exports list pass-through outputs first: paraphrase-MiniLM-L3-v2's outputs are input_ids,
    the mask, the token states and the pooled vector, in that order.
    """
    outputs = session.get_outputs()
    if any(node.name == _PREFERRED_OUTPUT for node in outputs):
        return _PREFERRED_OUTPUT
    rank = 2 if spec.pooling is Pooling.NONE else 3
    for node in outputs:
        if node.type in _FLOAT_OUTPUTS and isinstance(node.shape, list) and len(node.shape) == rank:
            return str(node.name)
    first = outputs[0]
    if first.type not in _FLOAT_OUTPUTS:
        raise FailedPreconditionError(
            f"model {spec.name!r}: the graph has no float output of rank {rank} for pooling "
            f"{spec.pooling.value}, and its first output {first.name!r} is {first.type}"
        )
    return str(first.name)


def _declared_inputs(spec: ModelSpec, session: Any) -> dict[str, type[np.signedinteger[Any]]]:
    inputs: dict[str, type[np.signedinteger[Any]]] = {}
    for node in session.get_inputs():
        if node.name not in _KNOWN_INPUTS:
            raise FailedPreconditionError(
                f"model {spec.name!r}: the graph wants input {node.name!r}; the onnx backend "
                f"feeds only {', '.join(_KNOWN_INPUTS)}"
            )
        dtype = _INPUT_DTYPES.get(node.type)
        if dtype is None:
            raise FailedPreconditionError(
                f"model {spec.name!r}: input {node.name!r} has type {node.type}; expected int64 or int32"
            )
        inputs[node.name] = dtype
    if _INPUT_IDS not in inputs:
        raise FailedPreconditionError(f"model {spec.name!r}: the graph declares no {_INPUT_IDS!r} input")
    return inputs
