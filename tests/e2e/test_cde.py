"""cde-small-v1 through a real server: `wafer models pull` from the (fake) Hub under the real
repository names, then load, index (Upsert and a job), search and Embed with contexts, and the
errors a context can get."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import MODELS_YAML
from tests.e2e.conftest import ServerProcess, start_server
from tests.fakes.fake_hub import FakeHub, running_fake_hub
from tests.fakes.tiny_cde import put_on_hub, write_tiny_cde
from wafer_client import WaferClient
from wafer_client.errors import InvalidArgumentError, NotFoundError

pytestmark = pytest.mark.e2e

MODEL = "cde-small-v1"
NOTES = [
    "Remember to water the tomatoes on the balcony every morning.",
    "The plumber comes on Tuesday to fix the kitchen sink.",
    "Mum's birthday dinner is at the Italian place on Friday.",
]
INVOICES = [f"Invoice {i}: {n} boxes of screws and copper pipe." for i, n in enumerate([3, 7, 12, 20])]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    files = write_tiny_cde(tmp_path_factory.mktemp("cde-files"))
    with running_fake_hub() as hub:
        put_on_hub(hub, files)
        yield hub


@pytest.fixture(scope="module")
def cde_server(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[ServerProcess]:
    """The repository's catalog, cut to minilm (the default) and cde-small-v1 (32-d: the tiny model)."""
    folder = tmp_path_factory.mktemp("cde-server")
    catalog = yaml.safe_load(MODELS_YAML.read_text())
    models = {"minilm": catalog["models"]["minilm"], MODEL: {**catalog["models"][MODEL], "dimensions": 32}}
    models_file = folder / "models.yaml"
    models_file.write_text(yaml.safe_dump({"defaults": {"embed": "minilm"}, "models": models}))
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url}
    server = start_server(folder / "data", models=models_file, env=env)
    yield server
    assert server.stop() == 0


@pytest.fixture
def cde_client(cde_server: ServerProcess) -> Iterator[WaferClient]:
    with WaferClient(cde_server.address, timeout=120, retries=0) as client:
        yield client


def test_pull_then_index_search_and_embed_with_contexts(cde_client: WaferClient, hub: FakeHub) -> None:
    reports = list(cde_client.pull_model(MODEL))
    pulled = {Path(r.path).name for r in reports if r.file_done}
    assert pulled >= {"model.safetensors", "config.json", "tokenizer.json"}
    hub_files = {r.path.split("/resolve/")[0] for r in hub.requests if "/resolve/" in r.path}
    assert {"/jxm/cde-small-v1", "/nomic-ai/nomic-bert-2048", "/google-bert/bert-base-uncased"} <= hub_files

    cde_client.upsert("notes", [{"id": f"n{i}", "text": t} for i, t in enumerate(NOTES)], model=MODEL)
    cde_client.upsert("invoices", [{"id": f"i{i}", "text": t} for i, t in enumerate(INVOICES)], model=MODEL)
    contexts = {c.name: c.context_id for c in cde_client.list_collections()}
    assert contexts["notes"] and contexts["invoices"] and contexts["notes"] != contexts["invoices"]

    found = cde_client.search("notes", "when does the plumber come", top_k=3)
    assert {hit.id for hit in found.hits} == {"n0", "n1", "n2"}

    query = "the plumber"
    in_notes = cde_client.embed(query, model=MODEL, input_type="query", context_collection="notes")
    in_invoices = cde_client.embed(query, model=MODEL, input_type="query", context_collection="invoices")
    plain = cde_client.embed(query, model=MODEL, input_type="query")
    built = cde_client.embed(query, model=MODEL, input_type="query", context_documents=NOTES)
    assert in_notes.context_id == contexts["notes"] and in_invoices.context_id == contexts["invoices"]
    assert plain.context_id == "" and built.context_id
    # Vectors change with the context.
    assert float(in_notes.vectors[0] @ in_invoices.vectors[0]) < 0.999
    assert float(in_notes.vectors[0] @ plain.vectors[0]) < 0.999


def test_context_errors_leave_the_server_serving(cde_client: WaferClient) -> None:
    with pytest.raises(NotFoundError, match="no context is stored for collection 'nowhere'"):
        cde_client.embed("x", model=MODEL, context_collection="nowhere")
    with pytest.raises(InvalidArgumentError, match="takes no context"):
        cde_client.embed("x", model="minilm", context_documents=["a document"])
    assert cde_client.embed("still serving").vectors.shape == (1, 384)


def test_a_job_samples_its_source_and_reindexes_with_a_fresh_context(
    cde_client: WaferClient, cde_server: ServerProcess
) -> None:
    job = cde_client.wait_job(
        cde_client.submit_job("jobbed", [{"id": f"n{i}", "text": t} for i, t in enumerate(NOTES)], model=MODEL).id
    )
    assert job.state == "succeeded", job.error
    first = {c.name: c for c in cde_client.list_collections()}["jobbed"]
    assert first.context_id and first.documents == len(NOTES)
    # Another job into the same collection keeps its context.
    more = cde_client.submit_job("jobbed", [{"id": "extra", "text": "Book the dentist."}], model=MODEL)
    assert cde_client.wait_job(more.id).state == "succeeded"
    assert {c.name: c for c in cde_client.list_collections()}["jobbed"].context_id == first.context_id
    # Re-index with a fresh context: the collection holds the new source only, in a new context.
    fresh = cde_client.submit_job(
        "jobbed", [{"id": f"i{i}", "text": t} for i, t in enumerate(INVOICES)], model=MODEL, fresh_context=True
    )
    assert cde_client.wait_job(fresh.id).state == "succeeded"
    after = {c.name: c for c in cde_client.list_collections()}["jobbed"]
    assert after.context_id and after.context_id != first.context_id
    assert after.documents == len(INVOICES)
    assert (cde_server.data_dir / "contexts" / "jobbed.npz").is_file()
