"""Per-backend options and extra files: validated where the catalog meets the backend table, resolved
like `source`, handed to Backend.load."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.conftest import loaded
from tests.fakes.fake_backend import FakeBackend
from wafer.backends.base import Backend, LoadOptions, ModelFiles, NoOptions
from wafer.errors import InvalidArgumentError, PermissionDeniedError
from wafer.pull import hub_sources
from wafer.registry import ModelRegistry
from wafer.sources import SourceResolver
from wafer.specs import Catalog, ModelSpec, Task


class HeadOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    attention: Literal["causal", "bidirectional"] = Field(default="causal", description="How tokens attend.")
    scale: float = Field(default=1.0, gt=0, description="A factor.")


class HeadBackend(FakeBackend):
    """A fake backend that takes options and needs a `projection_head` file."""

    options_model: ClassVar[type[BaseModel]] = HeadOptions
    required_files: ClassVar[frozenset[str]] = frozenset({"projection_head"})
    optional_files: ClassVar[frozenset[str]] = frozenset({"vocab"})
    received: ClassVar[list[ModelFiles]] = []

    @classmethod
    def load(cls, spec: ModelSpec, files: ModelFiles, options: LoadOptions) -> FakeBackend:
        cls.received.append(files)
        return super().load(spec, files, options)


HEAD = {"projection_head": "head.safetensors"}


def _catalog(folder: Path, **fields: object) -> Catalog:
    (folder / "fake.bin").write_bytes(b"weights")
    (folder / "head.safetensors").write_bytes(b"head")
    model = {"backend": "head", "source": "fake.bin", "tasks": ["embed"], "dimensions": 4, **fields}
    return Catalog.model_validate({"base_dir": folder, "models": {"m": model}})


def _registry(folder: Path, catalog: Catalog) -> ModelRegistry:
    return ModelRegistry(
        catalog,
        SourceResolver(catalog.base_dir, folder / "hub"),
        {"fake": FakeBackend, "head": HeadBackend},
        threads=1,
        drain_timeout_seconds=5,
    )


@pytest.fixture
def head_registry(tmp_path: Path, open_gate: None) -> ModelRegistry:
    catalog = _catalog(tmp_path, files=HEAD, options={"attention": "bidirectional"})
    return _registry(tmp_path, catalog)


async def test_backend_receives_its_options_and_extra_files(head_registry: ModelRegistry, tmp_path: Path) -> None:
    HeadBackend.received.clear()
    try:
        async with head_registry.lease("m", Task.EMBED):
            assert loaded(head_registry, "m").backend.options == HeadOptions(attention="bidirectional")
        assert dict(HeadBackend.received[0].extra) == {"projection_head": tmp_path / "head.safetensors"}
    finally:
        await head_registry.close()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (
            {"files": HEAD, "options": {"attention": "sideways"}},
            r"model 'm': invalid options for backend 'head': options\.attention",
        ),
        ({"files": HEAD, "options": {"colour": "red"}}, r"options\.colour: Extra inputs are not permitted"),
        ({"files": HEAD, "options": {"scale": 0}}, r"options\.scale: Input should be greater than 0"),
        ({}, r"model 'm': backend 'head' needs `files` with the role\(s\) projection_head"),
        (
            {"files": {**HEAD, "lora": "x"}},
            r"no use for `files` role\(s\) lora \(it reads: projection_head, vocab\)",
        ),
    ],
)
def test_a_catalog_with_bad_options_or_files_does_not_start(
    tmp_path: Path, fields: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        _registry(tmp_path, _catalog(tmp_path, **fields))


def test_a_backend_without_options_refuses_any(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path, backend="fake", options={"attention": "bidirectional"})
    with pytest.raises(InvalidArgumentError, match=r"backend 'fake': options\.attention: Extra inputs"):
        _registry(tmp_path, catalog)
    catalog = _catalog(tmp_path, backend="fake", files=HEAD)
    with pytest.raises(InvalidArgumentError, match=r"no use for `files` role\(s\) projection_head \(it reads: none\)"):
        _registry(tmp_path, catalog)
    assert FakeBackend.options_model is NoOptions


def test_a_backend_the_server_lacks_is_left_to_the_load(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path, backend="cde", options={"anything": 1})
    _registry(tmp_path, catalog)  # the load says the backend is missing, with `requires`


def test_file_roles_must_be_identifiers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lower-case identifiers"):
        _catalog(tmp_path, files={"Head/../x": "x"})


async def test_api_specs_are_checked_against_the_backend(head_registry: ModelRegistry, tmp_path: Path) -> None:
    try:
        with pytest.raises(InvalidArgumentError, match=r"model 'm': invalid options.*options\.attention"):
            head_registry.spec_from_api("m", "options: {attention: upside-down}")
        with pytest.raises(InvalidArgumentError, match=r"model 'new': backend 'head' needs `files`"):
            head_registry.spec_from_api("new", "backend: head\nsource: fake.bin\ntasks: [embed]\ndimensions: 4")
        with pytest.raises(PermissionDeniedError, match="outside the folders"):
            head_registry.spec_from_api("m", "files: {projection_head: /etc/passwd}")
        # Options given over the API replace the mapping as a whole: fields not named take their defaults.
        spec = head_registry.spec_from_api("m", "options: {scale: 2}")
        assert spec.options == {"scale": 2}
        assert spec.files == {"projection_head": "head.safetensors"}
        (tmp_path / "other.safetensors").write_bytes(b"other head")
        swapped = head_registry.spec_from_api("m", "files: {projection_head: other.safetensors}")
        HeadBackend.received.clear()
        await head_registry.load("m", spec=swapped)
        assert HeadBackend.received[0].extra["projection_head"] == tmp_path / "other.safetensors"
    finally:
        await head_registry.close()


def test_extra_hub_files_are_pulled() -> None:
    head = "hf://NovaSearch/stella_en_1.5B_v5/2_Dense_1024/model.safetensors@main"
    spec = ModelSpec(
        name="m",
        backend="gguf",
        source="stella.gguf",
        files={"projection_head": head, "local": "x.bin"},
        tasks=[Task.EMBED],
        dimensions=4,
    )
    assert hub_sources(spec) == [head]


def test_the_base_contract_defaults() -> None:
    assert Backend.options_model is NoOptions
    assert Backend.required_files == Backend.optional_files == frozenset()
    assert dict(ModelFiles(weights=Path("w")).extra) == {}


async def test_the_server_does_not_start_with_bad_options(tmp_path: Path) -> None:
    from wafer.app import serve
    from wafer.config import Settings

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n  m: {backend: gguf, source: m.gguf, tasks: [embed], dimensions: 4, options: {colour: red}}\n"
    )
    # `main` turns this error into exit status 2 with the message logged.
    with pytest.raises(InvalidArgumentError, match=r"model 'm': invalid options for backend 'gguf': options\.colour"):
        await serve(Settings(models_file=models, data_dir=tmp_path / "data"))
