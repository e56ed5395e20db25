"""The cde backend on a tiny random-weight cde-small-v1 in the real file layout, against an
independent numpy reference written from the authors' code (tests/cde_reference.py).

Both stages must agree at cosine >= 0.9999; the reference run with a wrong rotary start or a wrong
pooling span must not, which shows the comparison can fail.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from numpy.typing import NDArray

from tests.cde_reference import CdeReference
from tests.fakes.tiny_cde import CdeFiles, write_tiny_cde
from wafer.backends.base import InputTooLongError, LoadOptions, ModelFiles
from wafer.backends.cde import CdeBackend
from wafer.domain import Context
from wafer.errors import FailedPreconditionError, InvalidArgumentError
from wafer.specs import ModelSpec, Task

pytestmark = pytest.mark.integration

THRESHOLD = 0.9999
TEXTS = [
    "search_document: The cat sat on the mat.",
    "search_query: where do rivers meet the sea",
    "search_document: " + " ".join(f"word{i}" for i in range(120)),
    "a",
]


def _cosines(a: NDArray[np.floating], b: NDArray[np.floating]) -> NDArray[np.float64]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.asarray((a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1))


def _spec(files: CdeFiles, **options: str) -> ModelSpec:
    return ModelSpec(
        name="cde-small-v1",
        backend="cde",
        source=str(files.weights),
        tokenizer=str(files.tokenizer),
        files={"config": str(files.config), "backbone_config": str(files.backbone_config)},
        options=dict(options),
        tasks=[Task.EMBED],
        dimensions=32,
        query_prompt="search_query: ",
        document_prompt="search_document: ",
    )


def _load(files: CdeFiles, **options: str) -> CdeBackend:
    model_files = ModelFiles(
        weights=files.weights,
        tokenizer=files.tokenizer,
        extra=MappingProxyType({"config": files.config, "backbone_config": files.backbone_config}),
    )
    return CdeBackend.load(_spec(files, **options), model_files, LoadOptions(threads=1))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> CdeFiles:
    return write_tiny_cde(tmp_path_factory.mktemp("cde"))


@pytest.fixture(scope="module")
def backend(files: CdeFiles) -> CdeBackend:
    return _load(files)


@pytest.fixture(scope="module")
def reference(files: CdeFiles) -> CdeReference:
    return CdeReference(files.weights, files.config, files.backbone_config)


def _ids(backend: CdeBackend, texts: list[str]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    return backend._pad([backend._truncating.encode(t) for t in texts])


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [f"search_document: note {i} about {'rivers' if i % 3 else 'cats'} and the weather" for i in range(512)]


@pytest.fixture(scope="module")
def dataset_embeddings(backend: CdeBackend, corpus: list[str]) -> NDArray[np.float32]:
    return backend.build_context(corpus)


def test_stage1_matches_the_reference(backend: CdeBackend, reference: CdeReference) -> None:
    ids, mask = _ids(backend, TEXTS)
    expected = reference.first_stage(ids, mask)
    got = backend.embed(TEXTS, truncate=True).vectors
    assert _cosines(expected, got).min() >= THRESHOLD


def test_dataset_embeddings_are_stage1_of_the_corpus(
    backend: CdeBackend, reference: CdeReference, corpus: list[str], dataset_embeddings: NDArray[np.float32]
) -> None:
    assert dataset_embeddings.shape == (512, 32)
    ids, mask = _ids(backend, corpus[:64])
    assert _cosines(reference.first_stage(ids, mask), dataset_embeddings[:64]).min() >= THRESHOLD


def test_stage2_matches_the_reference(
    backend: CdeBackend, reference: CdeReference, dataset_embeddings: NDArray[np.float32]
) -> None:
    ids, mask = _ids(backend, TEXTS)
    expected = reference.second_stage(ids, mask, dataset_embeddings.astype(np.float64))
    got = backend.embed(TEXTS, truncate=True, context=Context.of(dataset_embeddings)).vectors
    assert _cosines(expected, got).min() >= THRESHOLD


@pytest.mark.parametrize("wrong", [{"rotary_start": 0}, {"rotary_start": 520}, {"pool_from": 0}, {"pool_from": 512}])
def test_a_wrong_rotary_start_or_pooling_span_fails_the_comparison(
    backend: CdeBackend, reference: CdeReference, dataset_embeddings: NDArray[np.float32], wrong: dict[str, int]
) -> None:
    ids, mask = _ids(backend, TEXTS)
    expected = reference.second_stage(ids, mask, dataset_embeddings.astype(np.float64), **wrong)
    got = backend.embed(TEXTS, truncate=True, context=Context.of(dataset_embeddings)).vectors
    assert _cosines(expected, got).min() < THRESHOLD


def test_corpus_rope_apply_rotates_the_context_positions_too(
    files: CdeFiles, reference: CdeReference, dataset_embeddings: NDArray[np.float32]
) -> None:
    backend = _load(files, corpus_rope="apply")
    ids, mask = _ids(backend, TEXTS)
    expected = reference.second_stage(ids, mask, dataset_embeddings.astype(np.float64), rotary_start=0)
    got = backend.embed(TEXTS, truncate=True, context=Context.of(dataset_embeddings)).vectors
    assert _cosines(expected, got).min() >= THRESHOLD


def test_vectors_change_with_the_context(backend: CdeBackend, dataset_embeddings: NDArray[np.float32]) -> None:
    other = backend.build_context([f"search_document: invoice {i} for plumbing parts" for i in range(512)])
    first = backend.embed(TEXTS, truncate=True, context=Context.of(dataset_embeddings)).vectors
    second = backend.embed(TEXTS, truncate=True, context=Context.of(other)).vectors
    plain = backend.embed(TEXTS, truncate=True).vectors
    assert _cosines(first, second).max() < 0.999
    assert _cosines(first, plain).max() < 0.999


def test_batching_does_not_change_vectors(backend: CdeBackend, dataset_embeddings: NDArray[np.float32]) -> None:
    context = Context.of(dataset_embeddings)
    together = backend.embed(TEXTS, truncate=True, context=context).vectors
    alone = np.concatenate([backend.embed([t], truncate=True, context=context).vectors for t in TEXTS])
    assert _cosines(together, alone).min() >= THRESHOLD


def test_too_long_input_is_refused_unless_truncated(backend: CdeBackend) -> None:
    text = " ".join(["word"] * 600)
    with pytest.raises(InputTooLongError):
        backend.embed([text], truncate=False)
    assert backend.embed([text], truncate=True).token_counts == [512]


def test_a_context_of_the_wrong_shape_is_refused(backend: CdeBackend) -> None:
    with pytest.raises(InvalidArgumentError, match="512 x 32"):
        backend.embed(["x"], truncate=True, context=Context.of(np.zeros((10, 32), dtype=np.float32)))


def test_wrong_files_fail_the_load(files: CdeFiles, tmp_path: Path) -> None:
    bad = tmp_path / "backbone.json"
    bad.write_text(files.backbone_config.read_text().replace('"swiglu"', '"gelu"'))
    broken = CdeFiles(files.weights, files.config, bad, files.tokenizer)
    with pytest.raises(FailedPreconditionError, match="activation_function"):
        _load(broken)
    not_cde = tmp_path / "model.safetensors"
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, dtype=np.float32)}, str(not_cde))
    with pytest.raises(FailedPreconditionError, match=r"cde-small-v1.s model\.safetensors"):
        _load(CdeFiles(not_cde, files.config, files.backbone_config, files.tokenizer))
