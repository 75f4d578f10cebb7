"""RFC 9162 §2.1.1 tree hashing against the RFC 6962 reference tree vectors."""

from __future__ import annotations

import hashlib

import pytest
from audit_vectors import load, tree8_leaves, tree8_roots
from hypothesis import given
from hypothesis import strategies as st

from trustmesh.audit import rfc6962
from trustmesh.audit.compact import MerkleLog


def test_empty_root_is_sha256_of_nothing() -> None:
    vectors = load("rfc6962/hashes.json")
    assert rfc6962.empty_root().hex() == vectors["empty_root"]
    assert rfc6962.root([]) == rfc6962.EMPTY_ROOT
    assert MerkleLog().root() == rfc6962.EMPTY_ROOT


def test_leaf_and_node_hashes_match_vectors() -> None:
    vectors = load("rfc6962/hashes.json")
    for case in vectors["leaf_hashes"]:
        assert rfc6962.leaf_hash(bytes.fromhex(case["data"])).hex() == case["hash"]
    for case in vectors["node_hashes"]:
        left, right = bytes.fromhex(case["left"]), bytes.fromhex(case["right"])
        assert rfc6962.node_hash(left, right).hex() == case["hash"]


def test_empty_leaf_differs_from_empty_tree() -> None:
    assert rfc6962.leaf_hash(b"") != rfc6962.EMPTY_ROOT


@pytest.mark.parametrize("size", range(9))
def test_reference_tree_roots_at_every_size(size: int) -> None:
    leaves, roots = tree8_leaves(), tree8_roots()
    assert rfc6962.root(leaves[:size]) == roots[size]
    log = MerkleLog()
    log.extend(leaves)
    assert log.root(size) == roots[size]


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 transcribed literally: the recursive definition."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


@given(st.lists(st.binary(max_size=8), max_size=70))
def test_iterative_root_equals_recursive_definition(leaves: list[bytes]) -> None:
    assert rfc6962.root(leaves) == _mth(leaves)


@pytest.mark.parametrize(("n", "k"), [(2, 1), (3, 2), (4, 2), (5, 4), (8, 4), (9, 8), (1025, 1024)])
def test_split_point_is_largest_power_of_two_below(n: int, k: int) -> None:
    assert rfc6962.split_point(n) == k


def test_split_point_needs_two_leaves() -> None:
    with pytest.raises(ValueError, match="no split point"):
        rfc6962.split_point(1)
