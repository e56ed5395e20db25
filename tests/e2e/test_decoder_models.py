"""gte-Qwen2 through a real server: the repository's entry, its weights from the (fake) Hub under the
real repository's name, vectors equal to the authors' architecture computed in numpy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import MODELS_YAML
from tests.e2e.conftest import ServerProcess, start_server
from tests.fakes.fake_hub import running_fake_hub
from tests.fakes.tiny_qwen2 import TinyQwen2, write_tiny_qwen2
from tests.qwen2_reference import Qwen2Reference, Tokenizer
from wafer.sources import HubFile
from wafer.specs import Catalog
from wafer_client import WaferClient

pytestmark = pytest.mark.e2e

GTE = "gte-qwen2-1.5b-instruct"
CONFIG = TinyQwen2(add_eos=False, seed=21)
TEXTS = ["where do trains to the coast leave from?", "Are we still on for lunch tomorrow?"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("gte") / "gte.gguf", CONFIG)


@pytest.fixture(scope="module")
def server(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    entry = Catalog.from_yaml(MODELS_YAML).models[GTE]
    source = HubFile.parse(entry.source)
    fields = entry.model_dump(mode="json", exclude_unset=True, exclude={"name"})
    fields.update(dimensions=CONFIG.n_embd, max_tokens=CONFIG.n_ctx, load="startup")
    folder = tmp_path_factory.mktemp("catalog")
    models = folder / "models.yaml"
    models.write_text(yaml.safe_dump({"defaults": {"embed": GTE}, "models": {GTE: fields}}))
    with running_fake_hub() as hub:
        hub.add_file(source.repo_id, source.filename, weights.read_bytes())
        running = start_server(folder / "data", models=models, env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
        yield running
        assert running.stop() == 0


def test_served_gte_qwen2_vectors_equal_the_authors_architecture(server: ServerProcess, weights: Path) -> None:
    entry = Catalog.from_yaml(MODELS_YAML).models[GTE]
    tokenize = Tokenizer(weights)
    reference = Qwen2Reference(weights)
    try:
        with WaferClient(server.address, timeout=60) as client:
            result = client.embed(TEXTS, model=GTE, input_type="query")
            info = client.get_model(GTE)
        assert info.state == "ready" and result.vectors.shape == (len(TEXTS), CONFIG.n_embd)
        for text, vector in zip(TEXTS, result.vectors, strict=True):
            tokens = [*tokenize(entry.query_prompt + text), tokenize.eos]
            expected = reference.embed(tokens, causal=False, last_token=True)
            cosine = float(vector @ expected / (np.linalg.norm(vector) * np.linalg.norm(expected)))
            assert cosine >= 0.9999, text
    finally:
        tokenize.close()
