"""Continuous batching of GGUF generation: several streams decoded together in one llama.cpp context.

Each stream is a sequence (its own seq_id) of the model's generation context. A *step* is one
llama_decode: either the next token of every stream that is generating, or the next chunks of the
joining streams' prompts. Between two of their tokens the generating streams wait for at most
PREFILL_CHUNK prompt tokens: a new stream starts at once, short prompts that arrive one after
another are read back to back, and a long prompt takes turns with the tokens, delaying the others
by a chunk per step, never by its whole prefill. A stream that ends, or whose caller leaves, gives
its sequence back at once, and its cells but its prompt's (the prompt cache, below).

Streams that join together read their prompts together: a prompt step holds the next chunk of
every joining prompt that fits in PREFILL_CHUNK tokens (the first one always), so the fourth of four
callers who arrive at once waits for one prefill, not for three others and their token steps (the
scheduler holds an idle engine's first step for a few milliseconds, for callers who arrive
together: wafer.scheduler.model.ADMISSION_GAP). Chunks a few tokens apart are padded to the longest
(PADDING_PER_PASS), so that llama.cpp reads them in one pass over the weights.

A stream's tokens do not depend on who else is being served, on when it joined, on how its prompt
was cut into chunks, on the thread count or on the prompt cache: its logits are bit-for-bit those of
the stream alone (docs/architecture.md, "Generation", has the evidence and the limits). Three things
make that so on llama.cpp's CPU backend:
- Flash attention is off in the generation context (context.generation_params). Its CPU kernel splits
  a lone one-token decode's keys over the threads once 512 cells are in view and merges partial sums
  (`use_split_kv_path` in ggml-cpu/ops.cpp), and tiles chunks of 64 or more prompt tokens per
  sequence another way than shorter ones: measured on SmolLM2, a stream's greedy tokens then changed
  with the thread count and with the streams beside it. Without it every kernel computes each output
  of a sequence in an order fixed by that sequence alone (a matrix product's element is one dot
  product over the same inputs, whatever the batch; masked cells add exact zeros).
- Every sequence has cells of its own (llama.cpp's non-unified KV cache: a stream of cells per
  sequence), emptied when its stream ends, so a stream's keys sit at cells 0.. as when it is alone.
- The engine never puts two sequences' tokens in one cell or one sampler: each stream has its own
  seeded sampler chain.

`interrupt` stops a step in the middle of its llama_decode through llama.cpp's abort callback (the
CPU backend polls it after every graph node); the step leaves nothing behind and runs again.

Prompt (prefix) cache: a stream that ends leaves the cells of its prompt in its sequence. A new
stream takes the free sequence whose cached tokens share the longest prefix with its prompt, at
least MIN_CACHED_PREFIX tokens, and decodes only the rest (the same system prompt, the same chat
history, the chat template's own default system prompt); without such a match it takes the least
recently used free sequence, whose cache it replaces, among those that keep the running streams'
sequence ids consecutive (`_sequence_for`: llama.cpp decodes non-consecutive sequences in separate
micro-batches, each a pass over the weights). The cache is thus bounded by the free sequences' cells
and evicts least recently used first, where that costs no decoding speed. A prompt that shares a
longer prefix, of at least MIN_COPIED_PREFIX tokens, with a running stream (callers who arrive
together with the same system prompt) gets that stream's cells copied into its own sequence
(`llama_memory_seq_cp`: between sequences of a non-unified cache llama.cpp copies the source's whole
buffer at the next decode) and the copy's tail past the shared prefix dropped. A shorter shared
prefix, of at least MIN_COPIED_HELD tokens, is copied at once from a running stream that already
holds its cells (a prompt it has read, or a cached prefix it took: of callers who arrive together
with the chat template's system prompt, one finds it in a free sequence, the others copy it from
that one). A cached or copied prefix is the very cells a fresh prefill writes, and the rest of the
prompt is cut at the same positions (multiples of PREFILL_CHUNK) as without a cache; without flash
attention neither where a chunk starts nor its length changes a token, so the tokens are the same
with and without the cache.

The thread count follows the machine's load. llama.cpp's threads meet at a barrier after every graph
node; when another process keeps a core busy, one of them waits for a time slice at each barrier.
Measured on 2 cores: 2 threads fell to 12.9 tokens/s with one core busy elsewhere while 1 thread kept
52.8; with a load of 16, 32 tokens took 72 s on 2 threads and 2.8 s on 1. Before a step (at most once
a second) the engine counts the cores other processes kept busy since its last look (the machine's
busy CPU time less this whole process's own, `OutsideLoad`) and uses the cores left, at least one and
at most the model's `threads`. Not the load average: it trails by a minute, so the engine's own past
threads read as someone else's, and a step down to one thread kept itself there. The threads are the
context's persistent pool of the model's `threads` (wafer.backends.gguf.threadpool), which sleep
between graphs; `llama_set_n_threads` makes a step run on the first n of them.
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp
import psutil

from wafer.backends.base import ComputeInterrupted, GenerationStreams
from wafer.domain import ChatMessage, FinishReason, GenerationDelta, SamplingParams
from wafer.errors import InvalidArgumentError

# Prompt tokens decoded per step: a chunk takes ~0.7 s at ~360 tokens/s on 2 cores, which is what
# the other streams' next token waits at most.
PREFILL_CHUNK = 256
# The shortest common prefix a new stream takes a cached sequence for: longer than a chat template's
# opening, which every prompt shares (3 tokens for ChatML's "<|im_start|>system\n") and which is not
# worth another prompt's cached cells; as long as a one-line system prompt ("You are a helpful
# assistant." and its framing: 14 tokens with SmolLM2).
MIN_CACHED_PREFIX = 8
# The shortest prefix copied from a running stream's sequence. A copy moves the source's whole buffer
# (SmolLM2's 2,048 cells: 47 MB) and makes the new stream wait for the source's reading; measured,
# a 63-token shared prefix already halved a joiner's prompt time (0.12-0.15 s against 0.29-0.34 s),
# while the chat template's opening and a one-line system prompt stay below it.
MIN_COPIED_PREFIX = 32
# The shortest prefix copied at once from a running stream that already holds its cells (a prompt
# it has read, a cached prefix it took): the copy costs what reading ~10 tokens does. Measured on
# SmolLM2 (2,048 cells a sequence), 2 threads: a copy added 15-19 ms to a step when three were made
# together and 40 ms alone, and reading a prompt token in a step costs ~4 ms.
MIN_COPIED_HELD = 12

# Padding tokens worth one pass over the weights: llama.cpp decodes a step of a non-unified cache
# in micro-batches holding the same number of tokens of each sequence (split_equal), so joining
# prompts of 18, 19, 20 and 21 tokens take four passes. Measured on SmolLM2, 2 threads, four 20-token
# prompts: 280 ms; with one more token in one of them 294 ms (a pass of its own); with one more in
# each 293 ms (3 ms a token); 18, 19, 20 and 21 tokens 309 ms, padded to four of 21, 293 ms.
PADDING_PER_PASS = 4

# llama.cpp's abort callback is polled after every graph node (~700 per SmolLM2 decode) by a compute
# thread. A Python callback would take the GIL each time, and wait for it while the event loop holds
# it. libc's strlen reads the flag without Python: it returns the flag byte's string length, 0 or 1,
# in the register a `bool` result is read from (x86-64 and AArch64 calling conventions).
_libc = ctypes.CDLL(None)
ABORT_IF_FLAG_SET = ctypes.cast(_libc.strlen, llama_cpp.ggml_abort_callback)
# Seconds between two looks at what other processes keep busy.
_LOAD_CHECK_SECONDS = 1.0


def threads_for_load(configured: int, others: float, cores: int) -> int:
    """Threads to decode with when other processes keep `others` cores busy."""
    return max(1, min(configured, int(cores - max(0.0, others) + 0.5)))


class OutsideLoad:
    """Cores that other processes kept busy between two calls: the machine's busy CPU time less
    this process's own (every thread of it: decoding, gRPC, tokenizing), over the wall time."""

    def __init__(
        self,
        machine_busy: Callable[[], float] | None = None,
        own_busy: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_window: float = 3.0,
    ) -> None:
        self._machine_busy = machine_busy or machine_busy_seconds
        self._own_busy = own_busy or own_busy_seconds
        self._clock = clock
        self._max_window = max_window
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        return self._clock(), self._machine_busy(), self._own_busy()

    def __call__(self) -> float | None:
        """Cores others kept busy since the last call; None when that was more than `max_window`
        seconds ago (an idle engine): an average over a long past says nothing of now, and a
        burst of someone else's minutes ago must not slow the first tokens of a new answer."""
        now, busy, own = self._sample()
        then, busy_then, own_then = self._last
        self._last = (now, busy, own)
        if now <= then or now - then > self._max_window:
            return None
        return max(0.0, (busy - busy_then) - (own - own_then)) / (now - then)


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot."""
    times = psutil.cpu_times()
    # Idle and I/O wait are not busy; guest time is counted in user and nice already (Linux).
    idle = times.idle + getattr(times, "iowait", 0.0)
    guests = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    return float(sum(times)) - idle - guests


def own_busy_seconds() -> float:
    """CPU seconds this process (all its threads) has spent busy."""
    own = os.times()
    return own.user + own.system


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        pending = self._held + text
        hits = [i for i in (pending.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return pending[: min(hits)], True
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(pending)), keep, -1):
                if pending.endswith(stop[:k]):
                    keep = k
                    break
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def make_sampler(sampling: SamplingParams) -> Any:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if sampling.temperature <= 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    # Temperature first, then top-k and top-p on the tempered distribution, as transformers does.
    add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
    if sampling.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
    if sampling.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    # LLAMA_DEFAULT_SEED (2**32 - 1) asks llama.cpp for a random seed; a caller's seed must never be it.
    seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed % llama_cpp.LLAMA_DEFAULT_SEED
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


class Stream:
    """One Generate call's sequence: its prompt, where it is, and its text so far."""

    def __init__(self, tokens: list[int], budget: int, sampling: SamplingParams) -> None:
        self.tokens = tokens
        self.budget = budget
        self.sampling = sampling
        self.seq = -1  # -1 until admitted
        self.prefilled = 0  # prompt tokens in the cache
        self.pos = 0  # position of the next token decoded
        self.previous = -1  # the last sampled token, decoded at the next step
        self.generated = 0
        self.cached = 0  # prompt tokens whose cells were found in the cache
        # A running stream still reading the prompt prefix this one shares with it, and that
        # prefix's length: this one waits for those cells and copies them (`_take_copies`).
        self.follows: Stream | None = None
        self.follow_upto = 0
        self.sampler: Any = None
        self.closed = False
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(sampling.stop)


class StreamEngine(GenerationStreams):
    """The streams of one llama.cpp generation context. `ctx` is gguf's _Context."""

    def __init__(
        self,
        ctx: Any,
        *,
        slots: int,
        window: int,
        tokenize: Callable[[str | None, Sequence[ChatMessage]], list[int]],
        piece: Callable[[int], bytes],
        is_end: Callable[[int], bool],
        model_name: str,
        threads: int,
        prompt_cache: bool = True,
    ) -> None:
        self._ctx = ctx
        self._threads_max = threads
        self.threads = threads
        self._cores = os.cpu_count() or 1
        self._outside_load: Callable[[], float | None] = OutsideLoad()
        self._load_checked = float("-inf")
        self.slots = slots
        self._window = window
        self._tokenize = tokenize
        self._piece = piece
        self._is_end = is_end
        self._model_name = model_name
        self._prompt_cache = prompt_cache
        # Free sequences: the prompt tokens whose cells each still holds, and when it was last used.
        self._free: dict[int, tuple[list[int], float]] = {seq: ([], float("-inf")) for seq in range(slots)}
        self.cache_hits = 0
        self.cache_misses = 0
        self._active: list[Stream] = []
        self._abort_flag = ctypes.create_string_buffer(2)
        # Prompt tokens read since the last token step: the generating streams wait for at most
        # PREFILL_CHUNK of them between two of their tokens.
        self._read_since_tokens = 0

    # -- GenerationStreams ---------------------------------------------------------------------

    def open(self, *, prompt: str | None, messages: Sequence[ChatMessage], sampling: SamplingParams) -> Stream:
        tokens = self._tokenize(prompt, messages)
        if not tokens:
            raise InvalidArgumentError("the prompt is empty after tokenization")
        limit = self._window
        if len(tokens) >= limit:
            raise InvalidArgumentError(
                f"the prompt has {len(tokens)} tokens; model {self._model_name!r} has a context of "
                f"{limit} tokens, which must also hold the reply: shorten the prompt"
            )
        return Stream(tokens, min(sampling.max_tokens, limit - len(tokens)), sampling)

    def admit(self, stream: object) -> bool:
        assert isinstance(stream, Stream)
        if stream.closed or stream.seq >= 0:
            return stream.seq >= 0
        if not self._free:
            return False
        seq, reuse, source = self._sequence_for(stream.tokens)
        del self._free[seq]
        if self._ctx.memory:
            llama_cpp.llama_memory_seq_rm(self._ctx.memory, seq, reuse, -1)
        stream.seq = seq
        stream.prefilled = stream.pos = stream.cached = reuse
        if source is not None:
            stream.follows, stream.follow_upto = source
            stream.cached = stream.follow_upto
            self._take_copies([stream])
        if self._prompt_cache:
            if stream.cached:
                self.cache_hits += 1
            else:
                self.cache_misses += 1
        stream.sampler = make_sampler(stream.sampling)
        self._active.append(stream)
        return True

    def step(self) -> list[tuple[object, GenerationDelta]]:
        return self.step_streams(self._active)

    def close(self, stream: object) -> None:
        assert isinstance(stream, Stream)
        if stream.closed:
            return
        stream.closed = True
        if stream.seq < 0:
            return
        # The prompt's cells stay, as a cached prefix; the reply's go.
        keep = min(stream.prefilled, len(stream.tokens)) if self._prompt_cache else 0
        if keep < MIN_CACHED_PREFIX:
            keep = 0
        if self._ctx.memory:
            llama_cpp.llama_memory_seq_rm(self._ctx.memory, stream.seq, keep, -1)
        llama_cpp.llama_sampler_free(stream.sampler)
        stream.sampler = None
        self._active.remove(stream)
        self._free[stream.seq] = (stream.tokens[:keep], time.monotonic())

    @property
    def caches_prompts(self) -> bool:
        return self._prompt_cache

    def cached_tokens(self, stream: object) -> int:
        assert isinstance(stream, Stream)
        return stream.cached

    def cached_prefix(self, seq: int) -> int:
        """Tokens cached in free sequence `seq` (0 if it is not free)."""
        return len(self._free.get(seq, ([], 0.0))[0])

    def _sequence_for(self, tokens: list[int]) -> tuple[int, int, tuple[Stream, int] | None]:
        """The free sequence for a prompt, and how many of its tokens' cells it already holds: the
        longest reusable prefix; else, of the sequences that keep the running streams' ids in the
        fewest runs of consecutive ids, the least recently used. llama.cpp decodes only consecutive
        sequences of a non-unified cache in one micro-batch, so a token step of sequences 0 and 2
        passes over the weights twice, and one of 0 and 1 once. The third value is a running stream
        whose prompt shares a longer prefix than any free sequence holds, and that prefix's length:
        at least MIN_COPIED_PREFIX tokens, copied once the stream has read them (callers who arrive
        together with one system prompt read it once), or at least MIN_COPIED_HELD tokens it holds
        already, copied at once; None otherwise."""
        running = {stream.seq for stream in self._active}

        def runs(seq: int) -> int:
            ids = running | {seq}
            return sum(1 for each in ids if each - 1 not in ids)

        def usable(cached: Sequence[int]) -> int:
            common = 0
            for a, b in zip(cached, tokens, strict=False):
                if a != b:
                    break
                common += 1
            # Never the whole prompt: its last token's logits are needed.
            return min(common, len(tokens) - 1)

        fresh = min(self._free, key=lambda seq: (runs(seq), self._free[seq][1]))
        best, reuse = fresh, 0
        for seq, (cached, _) in self._free.items():
            shared = usable(cached)
            if shared >= MIN_CACHED_PREFIX and shared > reuse:
                best, reuse = seq, shared
        source: tuple[Stream, int] | None = None
        for running_stream in self._active:
            # Its prompt's cells, read or to be read (its reply's lie past them and are not copied).
            shared = usable(running_stream.tokens)
            if shared < MIN_COPIED_PREFIX:
                # Too short to wait for, but worth copying if the stream holds those cells already
                # (a prompt it has read, or a cached prefix it took).
                shared = min(shared, running_stream.prefilled if running_stream.follows is None else 0)
                if shared < MIN_COPIED_HELD:
                    continue
            if shared > max(reuse, source[1] if source else 0):
                source = (running_stream, shared)
        if source is not None:
            return fresh, 0, source
        return best, reuse, None

    def interrupt(self) -> None:
        self._abort_flag[0] = b"\x01"

    # -- stepping ------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._active)

    def step_streams(self, streams: Sequence[Stream]) -> list[tuple[object, GenerationDelta]]:
        """One decode for `streams` (admitted ones): the next prompt chunk of the streams still
        reading their prompts, unless the generating streams have waited for PREFILL_CHUNK prompt
        tokens since their last token; otherwise every generating stream's next token. Short prompts
        that arrive one after another are thus read back to back (the first of four callers does not
        make the other three wait for its second token), and a long one takes turns with the tokens."""
        ctx = self._ctx
        self._take_copies(streams)
        # In sequence order: llama.cpp puts only consecutive sequence ids in one micro-batch of a
        # non-unified cache (llama_batch_allocr::split_equal), so an unordered step costs more graphs.
        reading = sorted((s for s in streams if s.prefilled < len(s.tokens) and s.follows is None), key=lambda s: s.seq)
        generating = sorted((s for s in streams if s.prefilled == len(s.tokens)), key=lambda s: s.seq)
        if reading:
            chunks = self._chunks(reading)
            size = sum(end - stream.prefilled for stream, end in chunks)
            if not generating or self._read_since_tokens == 0 or self._read_since_tokens + size <= PREFILL_CHUNK:
                firsts = self._prefill(chunks)
                # Tokens read while no stream was generating kept nobody waiting.
                self._read_since_tokens = (self._read_since_tokens if generating else 0) + size
                return firsts
        self._read_since_tokens = 0
        if not generating:
            return []
        outputs = [(s, ctx.add(s.previous, s.pos, s.seq, True)) for s in generating]
        self._decode([(s.seq, s.pos) for s in generating])
        deltas: list[tuple[object, GenerationDelta]] = []
        for stream, index in outputs:
            stream.pos += 1
            deltas += [(stream, delta) for delta in self._sample(stream, index)]
        return deltas

    def _take_copies(self, streams: Sequence[Stream]) -> None:
        """Copy into each following stream the shared prefix its source has now read. A source
        that ended first leaves its follower to read the prompt itself."""
        for stream in streams:
            source = stream.follows
            if source is None:
                continue
            if source.closed or source.seq < 0:
                stream.follows, stream.cached = None, stream.prefilled
            elif source.prefilled >= stream.follow_upto:
                if self._ctx.memory:
                    # Between sequences of a non-unified cache llama.cpp copies the source's whole
                    # buffer, at the start of the next decode; the tail past the prefix is dropped.
                    llama_cpp.llama_memory_seq_cp(self._ctx.memory, source.seq, stream.seq, -1, -1)
                    llama_cpp.llama_memory_seq_rm(self._ctx.memory, stream.seq, stream.follow_upto, -1)
                stream.prefilled = stream.pos = stream.follow_upto
                stream.follows = None

    @staticmethod
    def _chunks(reading: list[Stream]) -> list[tuple[Stream, int]]:
        """The next chunk of the first reading stream's prompt, and of the others' while the step
        holds at most PREFILL_CHUNK tokens: streams that join together read their prompts together.
        Each stream's chunk ends at a multiple of PREFILL_CHUNK or its prompt's end (the stream, and
        where its chunk ends)."""
        chunks: list[tuple[Stream, int]] = []
        total = 0
        for stream in reading:
            end = min((stream.prefilled // PREFILL_CHUNK + 1) * PREFILL_CHUNK, len(stream.tokens))
            if chunks and total + end - stream.prefilled > PREFILL_CHUNK:
                continue
            total += end - stream.prefilled
            chunks.append((stream, end))
        return chunks

    def _prefill(self, chunks: list[tuple[Stream, int]]) -> list[tuple[object, GenerationDelta]]:
        """Decode `chunks` (from `_chunks`) in one step; the deltas of the streams whose prompt it ends."""
        ctx = self._ctx
        outputs: list[tuple[Stream, int]] = []
        padding = self._padding(chunks)
        for (stream, end), pad in zip(chunks, padding, strict=True):
            for k in range(stream.prefilled, end):
                index = ctx.add(stream.tokens[k], k, stream.seq, k == len(stream.tokens) - 1)
            if end == len(stream.tokens):
                outputs.append((stream, index))
            for k in range(end, end + pad):  # any token: no output is read, and its cells are dropped
                ctx.add(stream.tokens[end - 1], k, stream.seq, False)
        self._decode([(stream.seq, stream.prefilled) for stream, _ in chunks])
        for (stream, end), pad in zip(chunks, padding, strict=True):
            if pad and ctx.memory:
                llama_cpp.llama_memory_seq_rm(ctx.memory, stream.seq, end, -1)
            stream.prefilled = stream.pos = end
        deltas: list[tuple[object, GenerationDelta]] = []
        for stream, index in outputs:
            deltas += [(stream, delta) for delta in self._sample(stream, index)]
        return deltas

    def _padding(self, chunks: list[tuple[Stream, int]]) -> list[int]:
        """Tokens to decode after each chunk, and drop, so that the chunks of each run of consecutive
        sequence ids are as long as the run's longest and llama.cpp reads them in one pass over the
        weights, not one per length (it puts only consecutive ids in one micro-batch); none in a run
        where that costs more than the passes it saves (PADDING_PER_PASS). The padding sits at
        positions after the chunk's tokens, which attend only to earlier ones (masked cells add exact
        zeros), so no output of the chunk changes. `chunks` are in sequence order."""
        padding: list[int] = []
        # Consecutive ids keep the same difference to their place in `chunks`.
        for _, run in itertools.groupby(enumerate(chunks), key=lambda item: item[1][0].seq - item[0]):
            members = [chunk for _, chunk in run]
            lengths = [end - stream.prefilled for stream, end in members]
            longest, passes = max(lengths), len(set(lengths))
            pads = [longest - length for length in lengths]
            fits = all(end + pad <= self._window for (_, end), pad in zip(members, pads, strict=True))
            worth = passes > 1 and fits and sum(pads) <= PADDING_PER_PASS * (passes - 1)
            padding += pads if worth else [0] * len(members)
        tokens = sum(end - stream.prefilled for stream, end in chunks)
        return padding if tokens + sum(padding) <= self._ctx.n_batch else [0] * len(chunks)

    def adapt_threads(self) -> None:
        """Use the cores other processes leave free (see the module docstring)."""
        now = time.monotonic()
        if now - self._load_checked < _LOAD_CHECK_SECONDS:
            return
        self._load_checked = now
        others = self._outside_load()
        if others is None:  # the engine was idle: judge from the next second, not the idle time
            return
        threads = threads_for_load(self._threads_max, others, self._cores)
        if threads != self.threads:
            llama_cpp.llama_set_n_threads(self._ctx.ptr, threads, threads)
            self.threads = threads

    def _decode(self, starts: list[tuple[int, int]]) -> None:
        """Decode the batch; `starts` holds each of its sequences and the first position it writes.

        An interrupted decode leaves nothing behind: llama.cpp takes back the cells of the micro-batch
        it stopped in, but not those of the micro-batches before it in the same decode (a step
        whose sequences are not consecutive ids, or read unequal chunks, is split into several),
        so every sequence of the step is cut back to where the step began."""
        self.adapt_threads()
        ctx = self._ctx
        flag = self._abort_flag
        ctx.use_abort_flag(flag)
        try:
            rc = int(llama_cpp.llama_decode(ctx.ptr, ctx.batch))
        finally:
            ctx.batch.n_tokens = 0
            # Cleared after the decode, not before: an interrupt that came before it started (interactive
            # work that arrived as the turn began) must stop it, not be forgotten.
            flag[0] = b"\x00"
        if rc == 2:  # aborted
            if ctx.memory:
                for seq, start in starts:
                    llama_cpp.llama_memory_seq_rm(ctx.memory, seq, start, -1)
            raise ComputeInterrupted
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def _sample(self, stream: Stream, index: int) -> list[GenerationDelta]:
        """Sample `stream`'s next token from the logits at batch `index`; its deltas, and closes it
        when that was its last token. Completion tokens count the end-of-generation one."""
        token = int(llama_cpp.llama_sampler_sample(stream.sampler, self._ctx.ptr, index))
        stream.generated += 1
        deltas: list[GenerationDelta] = []
        finish: FinishReason | None = None
        tail, hit = "", False
        if self._is_end(token):
            finish = FinishReason.STOP
        else:
            text, hit = stream.stops.feed(stream.utf8.decode(self._piece(token)))
            if hit:
                finish, tail = FinishReason.STOP, text
            else:
                if text:
                    deltas.append(GenerationDelta(text=text))
                stream.previous = token
                if stream.generated >= stream.budget:
                    finish = FinishReason.LENGTH
        if finish is None:
            return deltas
        if not hit:
            tail, hit = stream.stops.feed(stream.utf8.decode(b"", final=True))
            if hit:
                finish = FinishReason.STOP
            else:
                tail += stream.stops.flush()
        deltas.append(
            GenerationDelta(
                text=tail,
                finish_reason=finish,
                prompt_tokens=len(stream.tokens),
                completion_tokens=stream.generated,
            )
        )
        self.close(stream)
        return deltas
