"""Point ids: deterministic, so writing a document again replaces it instead of duplicating it."""

from __future__ import annotations

import uuid

import pytest

from wafer.errors import InvalidArgumentError
from wafer.store.base import check_collection_name, is_collection_name, point_id


def test_point_id_is_a_stable_uuid5() -> None:
    value = point_id("docs", "a")
    assert uuid.UUID(value).version == 5
    assert point_id("docs", "a") == value
    # Pinned: a change here would make every existing collection grow duplicates on the next write.
    assert value == "3a241894-5dd1-56c3-87f5-dd4bd5568ce1"
    assert point_id("docs", "a", 1) == "9ee35232-c0a6-56bd-8476-e55fdaa8d576"


def test_chunk_zero_is_the_default() -> None:
    assert point_id("docs", "a") == point_id("docs", "a", 0)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("docs", "a", 0), ("docs", "b", 0)),
        (("docs", "a", 0), ("other", "a", 0)),
        (("docs", "a", 0), ("docs", "a", 1)),
        # Naive concatenation would make these equal.
        (("a/b", "c", 0), ("a", "b/c", 0)),
        (("a", "b:1", 0), ("a:b", "1", 0)),
        (("docs", "1", 0), ("docs", "", 1)),
    ],
)
def test_different_triples_give_different_ids(left: tuple[str, str, int], right: tuple[str, str, int]) -> None:
    assert point_id(*left) != point_id(*right)


def test_unicode_ids_are_fine() -> None:
    assert uuid.UUID(point_id("colección", "文档-1"))


def test_negative_chunk_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk"):
        point_id("docs", "a", -1)


@pytest.mark.parametrize("name", ["sms", "a", "A.b-c_d", "9" * 128])
def test_collection_names_the_one_rule_accepts(name: str) -> None:
    assert is_collection_name(name)
    check_collection_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "-x", "_x", "a/b", "a\\b", "sms\n", "x" * 129, "é"])
def test_collection_names_the_one_rule_refuses(name: str) -> None:
    assert not is_collection_name(name)
    with pytest.raises(InvalidArgumentError, match="collection name"):
        check_collection_name(name)
