"""Reranking by relevance: the judging prompt (Qwen3-Reranker's) a chat model answers "yes" or
"no" to, the score read from its next token's odds, and the judge that runs it on one sequence of
the generation context."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np

from wafer.backends.base import ComputeInterrupted, InputTooLongError
from wafer.backends.gguf.context import LlamaContext, Vector
from wafer.backends.gguf.vocab import ChatTemplate, Vocab
from wafer.domain import ChatMessage
from wafer.errors import FailedPreconditionError, InvalidArgumentError
from wafer.specs import ModelSpec

# Qwen3-Reranker's judging prompt. Two worked examples before the real question teach a small
# instruct model (SmolLM2-135M) to answer with a bare "yes"/"no" token; without them its next token
# is rarely either ("The", "To", ...), and on 8 queries x 8 documents the yes/no odds put the right
# document first for 1 query in 8 (chance), against 4 in 8 with them. Being part of the shared
# prefix, they are evaluated once per request.
RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
RERANK_EXAMPLES = (
    (
        "When was the Eiffel Tower built?",
        "The Eiffel Tower was built between 1887 and 1889 for the World's Fair.",
        "yes",
    ),
    ("When was the Eiffel Tower built?", "Bananas are rich in potassium and easy to digest.", "no"),
)
YES = ("yes", "Yes")
NO = ("no", "No")
# Private-use characters mark where data goes in the rendered template, so that data is tokenized
# as plain text (a document containing "<|im_end|>" must not close the turn).
SLOTS = ("\ue000", "\ue001", "\ue002")


def rerank_user_turn(instruction: str, query: str, document: str) -> str:
    return f"<Instruct>:{instruction}\n<Query>:{query}\n<Document>:{document}"


@dataclass(frozen=True, slots=True)
class RerankFrame:
    """Token ids of one rerank request's prompt around the document."""

    prefix: list[int]
    suffix: list[int]


def yes_probability(logits: Vector, yes: list[int], no: list[int]) -> float:
    """P(yes) against P(no), each summed over its tokens, from the judge's next-token logits."""
    p_yes = float(np.logaddexp.reduce(logits[yes].astype(np.float64)))
    p_no = float(np.logaddexp.reduce(logits[no].astype(np.float64)))
    return 1.0 / (1.0 + math.exp(p_no - p_yes))


class RelevanceJudge:
    """A chat model judging documents against a query, a document per decode, on sequence `seq`
    of the generation context (the one after the streams'). Built at load: a model whose template
    or vocabulary cannot judge fails its load, not its first request."""

    def __init__(
        self,
        spec: ModelSpec,
        ctx: LlamaContext,
        vocab: Vocab,
        template: ChatTemplate,
        *,
        seq: int,
        window: int,
        before_decode: Callable[[], None],
    ) -> None:
        """`window`: the sequence's cells; `before_decode` runs before each decode (the stream
        engine's thread count follows the machine's load)."""
        self._spec = spec
        self.ctx = ctx
        self._vocab = vocab
        self._template = template
        self._seq = seq
        self._limit = min(spec.max_tokens, window)
        self._before_decode = before_decode
        if not template.present:
            raise FailedPreconditionError(
                f"model {spec.name!r} reranks by relevance, which needs a chat template, "
                "and its GGUF file has none; use rerank_method: cosine"
            )
        self._yes: list[int] = []
        self._no: list[int] = []
        for words, ids in ((YES, self._yes), (NO, self._no)):
            for word in words:
                tokens = vocab.tokenize(word, special=False, parse=False)
                if len(tokens) == 1:
                    ids.append(tokens[0])
            if not ids:
                raise FailedPreconditionError(
                    f"model {spec.name!r}: its vocabulary has no single token for {words[0]!r}, "
                    "so it cannot judge relevance; use rerank_method: cosine"
                )
        self._frame("query", "instruction")  # fails now, not at the first request

    def steps(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str,
        truncate: bool,
        cancelled: Callable[[], bool],
    ) -> Iterator[tuple[float, int]]:
        """P(yes) against P(no) as the judge's next token, a document at a time.

        The prompt up to the document (system, examples, instruction, query) is evaluated once;
        each document then runs on top of those KV cells and is dropped from the cache after.
        Documents go one per decode: packing several into one decode (a sequence each, sharing
        the prefix cells) was 1.6x faster here, but moved a document's score by up to 0.04
        depending on its neighbours (the quantized model amplifies float-order differences),
        and a score should depend on the query and the document only.

        A document takes seconds on a long text, so the caller's absence (`cancelled()`) is
        checked between decodes: an abandoned rerank stops within one decode, not after every
        document.
        """
        if not documents:
            return
        name, limit, ctx = self._spec.name, self._limit, self.ctx
        frame = self._frame(query, instruction)
        prefix, suffix = frame.prefix, frame.suffix
        room = limit - len(prefix) - len(suffix)
        if room <= 0:
            raise InvalidArgumentError(
                f"the query and instruction take {len(prefix) + len(suffix)} tokens of the "
                f"{limit} that model {name!r} reads per document: shorten the query"
            )
        bodies: list[list[int]] = []
        for i, document in enumerate(documents):
            body = self._vocab.tokenize(" " + document, special=False, parse=False)
            if len(body) > room:
                if not truncate:
                    raise InputTooLongError(i, len(prefix) + len(body) + len(suffix), limit, name)
                body = body[:room]
            bodies.append(body + suffix)

        seq = self._seq
        owner = ctx.claim(seq)
        try:
            if self._decode(prefix, 0, output_last=False, cancelled=cancelled) is None:
                return
            for body in bodies:
                ctx.check(owner)
                index = self._decode(body, len(prefix), output_last=True, cancelled=cancelled)
                if index is None:
                    return
                score = yes_probability(ctx.logits(index, self._vocab.n_tokens), self._yes, self._no)
                llama_cpp.llama_memory_seq_rm(ctx.memory, seq, len(prefix), -1)
                yield score, len(prefix) + len(body)
        except ComputeInterrupted:
            return  # the backend's `interrupt`: the caller is gone
        finally:
            # A generator dropped late must not empty the cells of a use that took the context over.
            if ctx.ptr and ctx.owned_by(owner):
                ctx.clear(seq)

    def _decode(self, tokens: list[int], start: int, *, output_last: bool, cancelled: Callable[[], bool]) -> int | None:
        self._before_decode()
        return self.ctx.decode_tokens(tokens, start, self._seq, output_last=output_last, cancelled=cancelled)

    def _frame(self, query: str, instruction: str) -> RerankFrame:
        messages: list[ChatMessage] = [ChatMessage("system", RERANK_SYSTEM)]
        for example_query, example_document, answer in RERANK_EXAMPLES:
            content = rerank_user_turn(" " + instruction, " " + example_query, " " + example_document)
            messages += [ChatMessage("user", content), ChatMessage("assistant", answer)]
        messages.append(ChatMessage("user", rerank_user_turn(*SLOTS)))
        rendered = self._template.render(messages)
        pieces: list[str] = []
        rest = rendered
        for slot in SLOTS:
            before, found, rest = rest.partition(slot)
            if not found or slot in rest:
                raise FailedPreconditionError(
                    f"model {self._spec.name!r}: its chat template changes message text, "
                    "so relevance prompts cannot be built from it; use rerank_method: cosine"
                )
            pieces.append(before)
        tokenize = self._vocab.tokenize
        prefix = tokenize(pieces[0], special=False, parse=True)
        prefix += tokenize(" " + instruction, special=False, parse=False)
        prefix += tokenize(pieces[1], special=False, parse=True)
        prefix += tokenize(" " + query, special=False, parse=False)
        prefix += tokenize(pieces[2], special=False, parse=True)
        return RerankFrame(prefix=prefix, suffix=tokenize(rest, special=False, parse=True))
