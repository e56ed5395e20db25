"""Reranking by relevance: the judging prompt (Qwen3-Reranker's) a chat model answers "yes" or
"no" to, and the score read from its next token's odds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wafer.backends.gguf.context import Vector

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
