"""Store and read back through Qdrant (embedded local mode, on disk)."""

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
    assert (server.data_dir / "qdrant").is_dir()


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
