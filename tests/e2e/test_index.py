"""Index end to end: write, search (with filters, chunks and reranking) and read back through the
default store (qdrant-edge, on disk), with real MiniLM and SmolLM2."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import ServerProcess
from wafer_client import FailedPreconditionError, InvalidArgumentError, NotFoundError, WaferClient

pytestmark = pytest.mark.e2e

MESSAGES = [
    {"id": "m1", "text": "The meeting has been moved to 3pm on Thursday.", "payload": {"sender": "ann"}},
    {"id": "m2", "text": "Can you pick up milk and bread on the way home?", "payload": {"sender": "bob"}},
    {"id": "m3", "text": "Your parcel will be delivered tomorrow morning.", "payload": {"sender": "shop"}},
    {"id": "m4", "text": "Happy birthday! Have a wonderful day.", "payload": {"sender": "ann"}},
]


def test_upsert_then_read_back_and_search(server: ServerProcess, client: WaferClient) -> None:
    written = client.upsert("sms", MESSAGES)
    assert written.model == "minilm"
    assert written.ids == ["m1", "m2", "m3", "m4"]
    documents = client.get_documents("sms", ["m3", "m1", "missing"])
    assert [d.id for d in documents] == ["m3", "m1"]
    assert documents[1].text == MESSAGES[0]["text"]
    assert documents[1].payload == {"sender": "ann"}

    hits = client.search("sms", "when is the meeting?", top_k=2).hits
    assert hits[0].id == "m1"
    assert hits[0].score > hits[1].score
    filtered = client.search("sms", "groceries", filter={"sender": "ann"}).hits
    assert {h.id for h in filtered} == {"m1", "m4"}
    assert (server.data_dir / "edge" / "sms").is_dir()


def test_writing_twice_does_not_duplicate(client: WaferClient) -> None:
    client.upsert("twice", MESSAGES)
    client.upsert("twice", MESSAGES)
    derived = client.upsert("twice", ["a message without an id"]).ids
    assert client.upsert("twice", ["a message without an id"]).ids == derived
    (info,) = [c for c in client.list_collections() if c.name == "twice"]
    assert info.documents == len(MESSAGES) + 1
    assert (info.model, info.dimensions) == ("minilm", 384)


def test_delete_and_collection_errors(client: WaferClient) -> None:
    client.upsert("deleting", MESSAGES)
    client.delete_documents("deleting", ["m1", "m2"])
    assert [d.id for d in client.get_documents("deleting", ["m1", "m2", "m3"])] == ["m3"]
    with pytest.raises(NotFoundError):
        client.search("no-such-collection", "anything")
    with pytest.raises(InvalidArgumentError, match="collection name"):
        client.upsert("bad name!", MESSAGES)
    with pytest.raises(FailedPreconditionError, match="holds 'minilm' vectors"):
        client.upsert("deleting", MESSAGES, model="smollm2")


def generated_messages(count: int) -> list[dict[str, object]]:
    """Everyday messages from templates: near neighbours of each other, as a phone's SMS are."""
    people = ["Ann", "Bob", "Carla", "Dev", "Emil", "Fay", "Gus", "Hana", "Ivo", "Jun"]
    places = ["the station", "the office", "the gym", "the bakery", "school", "the clinic", "the park", "home"]
    times = ["at 7", "at noon", "tonight", "tomorrow", "on Monday", "after lunch", "in ten minutes", "at 5:30"]
    templates = [
        "{p} says meet at {l} {t}",
        "Running late, see you at {l} {t}",
        "Can you call {p} {t}? It's about {l}",
        "Don't forget the keys, {p} is waiting at {l}",
        "Reminder: {p} booked a table near {l} {t}",
        "Lost my phone at {l}, text {p} instead",
        "{p} will pick the kids up from {l} {t}",
    ]
    messages: list[dict[str, object]] = []
    for i in range(count):
        text = templates[i % len(templates)].format(
            p=people[i % len(people)], l=places[(i // 7) % len(places)], t=times[(i // 3) % len(times)]
        )
        messages.append({"id": f"g{i}", "text": f"{text} (#{i})", "payload": {"kind": "generated", "n": i % 4}})
    return messages


TARGET = {
    "id": "target",
    "text": "The vet called: our dog's vaccination appointment is moved to Friday morning.",
    "payload": {"kind": "real", "n": 0},
}
PARAPHRASE = "when is the puppy getting its shots at the animal doctor?"


def test_a_paraphrase_finds_its_message_first_with_and_without_rerank(client: WaferClient) -> None:
    written = client.upsert("phone", [*generated_messages(300), TARGET])
    assert written.chunks == 301

    plain = client.search("phone", PARAPHRASE, top_k=5)
    assert plain.hits[0].id == "target"
    assert plain.rerank_model == ""
    assert all(h.rerank_score is None for h in plain.hits)

    # A bi-encoder reranks by cosine of its own vectors: MiniLM keeps the target first.
    reranked = client.search("phone", PARAPHRASE, top_k=5, rerank_model="minilm")
    assert reranked.rerank_model == "minilm"
    assert reranked.hits[0].id == "target"
    assert reranked.hits[0].rerank_score == pytest.approx(reranked.hits[0].score, abs=1e-4)

    # An LLM judge (SmolLM2-135M, too small to judge well) reorders the 8 nearest by relevance.
    judged = client.search("phone", PARAPHRASE, top_k=5, rerank_model="smollm2", rerank_top_n=8)
    assert judged.rerank_model == "smollm2"
    nearest = {h.id for h in client.search("phone", PARAPHRASE, top_k=8).hits}
    assert {h.id for h in judged.hits} <= nearest
    scores = [h.rerank_score if h.rerank_score is not None else -1.0 for h in judged.hits]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)

    filtered = client.search("phone", PARAPHRASE, top_k=5, filter={"kind": "generated", "n": 2})
    assert "target" not in {h.id for h in filtered.hits}
    assert all(h.payload == {"kind": "generated", "n": 2} for h in filtered.hits)


def test_an_unknown_rerank_model_is_not_found(client: WaferClient) -> None:
    client.upsert("phone-refuse", MESSAGES)
    with pytest.raises(NotFoundError, match="unknown model"):
        client.search("phone-refuse", "meeting", rerank_model="no-such-model")


def test_a_long_document_is_chunked_and_found_by_its_middle(client: WaferClient) -> None:
    filler = " ".join(f"Paragraph {i} is about the weather in spring and the rivers of the north." for i in range(60))
    needle = "The secret recipe for the lemon cake needs three eggs and a spoon of honey."
    text = f"{filler} {needle} {filler}"
    written = client.upsert("long", [{"id": "book", "text": text}, *MESSAGES])
    assert written.chunks > len(MESSAGES) + 2

    hit = client.search("long", "how many eggs go into the lemon cake?", top_k=1).hits[0]
    assert hit.id == "book"
    assert hit.text == text  # the whole document comes back
    assert 0 < hit.chunk < hit.chunks - 1
    assert needle in hit.matched_text
    assert client.get_documents("long", ["book"])[0].text == text
    client.delete_documents("long", ["book"])
    assert [c.documents for c in client.list_collections() if c.name == "long"] == [len(MESSAGES)]


def test_cache_hits_skip_inference(client: WaferClient) -> None:
    texts = ["a message seen for the first time in this test", "and a second one, also new"]
    first = client.embed(texts)
    second = client.embed(texts)
    assert (first.cached, second.cached) == (0, 2)
    assert second.timings.batch_size == 0
    assert (second.vectors == first.vectors).all()
    rewritten = client.upsert("cached", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    assert rewritten.cached == 2
