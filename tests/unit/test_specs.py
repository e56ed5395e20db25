from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import MODELS_YAML
from wafer.errors import InvalidArgumentError
from wafer.specs import Catalog, LoadPolicy, Pooling, RerankMethod, Task


def test_repository_catalog_declares_the_default_and_user_models(catalog: Catalog) -> None:
    assert catalog.default_for(Task.EMBED) == "minilm"
    assert catalog.default_for(Task.GENERATE) == "smollm2"
    minilm = catalog.models["minilm"]
    assert (minilm.dimensions, minilm.max_tokens, minilm.pooling) == (384, 256, Pooling.MEAN)
    assert minilm.load is LoadPolicy.STARTUP
    assert catalog.models["smollm2"].effective_rerank_method is RerankMethod.RELEVANCE
    gte = catalog.models["gte-qwen2-1.5b-instruct"]
    assert (gte.dimensions, gte.pooling) == (1536, Pooling.LAST)
    assert gte.query_prompt.startswith("Instruct: ") and gte.document_prompt == ""
    cde = catalog.models["cde-small-v1"]
    assert (cde.backend, cde.dimensions, cde.query_prompt) == ("cde", 768, "search_query: ")
    assert cde.files == {
        "config": "hf://jxm/cde-small-v1/config.json",
        "backbone_config": "hf://nomic-ai/nomic-bert-2048/config.json",
    }
    for name in ("kalm-embedding-multilingual-mini-v1", "ember-v1", "stella-en-1.5b-v5"):
        assert catalog.models[name].source.startswith("hf://")
        assert catalog.models[name].load is LoadPolicy.ON_DEMAND


def test_decoder_entries_state_how_their_authors_run_them(catalog: Catalog) -> None:
    gte = catalog.models["gte-qwen2-1.5b-instruct"]
    assert gte.options == {"attention": "bidirectional", "append_tokens": ["<|endoftext|>"]}
    stella = catalog.models["stella-en-1.5b-v5"]
    assert (stella.pooling, stella.dimensions, stella.options) == (Pooling.MEAN, 1024, {"attention": "bidirectional"})
    head = stella.files["projection_head"]
    assert re.fullmatch(r"hf://NovaSearch/stella_en_1\.5B_v5/2_Dense_1024/model\.safetensors@[0-9a-f]{40}", head)
    kalm = catalog.models["kalm-embedding-multilingual-mini-v1"]
    assert (kalm.pooling, kalm.dimensions, kalm.max_tokens, kalm.options) == (
        Pooling.MEAN,
        896,
        512,
        {"attention": "causal", "append_tokens": []},
    )
    ember = catalog.models["ember-v1"]
    assert (ember.pooling, ember.dimensions, ember.max_tokens) == (Pooling.CLS, 1024, 512)
    assert ember.options == {"attention": "bidirectional", "append_tokens": []}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_relative_sources_resolve_against_the_file(tmp_path: Path) -> None:
    assert Catalog.from_yaml(MODELS_YAML).base_dir == MODELS_YAML.parent
    catalog = Catalog.from_yaml(
        _write(tmp_path, "models:\n  m: {backend: onnx, source: m.onnx, tasks: [embed], dimensions: 4}\n")
    )
    assert catalog.base_dir == tmp_path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [", "cannot read"),
        ("- 1\n", "must be a mapping"),
        ("models:\n  m: {backend: onnx, source: x, tasks: [embed]}\n", "needs `dimensions`"),
        ("models:\n  m: {backend: onnx, source: x, tasks: [fly], dimensions: 3}\n", "tasks"),
        ("models:\n  m: {backend: onnx, source: x, tasks: [embed], dimensions: 3, colour: red}\n", "colour"),
        (
            "defaults: {generate: m}\nmodels:\n  m: {backend: onnx, source: x, tasks: [embed], dimensions: 3}\n",
            "does not do generate",
        ),
        (
            "defaults: {embed: z}\nmodels:\n  m: {backend: onnx, source: x, tasks: [embed], dimensions: 3}\n",
            "'z' for embed is not in",
        ),
        (
            "models:\n  m: {backend: onnx, source: x, tasks: [embed], dimensions: 3, matryoshka_dimensions: [4]}\n",
            "must not exceed",
        ),
    ],
)
def test_invalid_catalogs_are_refused_with_a_reason(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        Catalog.from_yaml(_write(tmp_path, text))
