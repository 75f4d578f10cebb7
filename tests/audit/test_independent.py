"""Cross-check against a second, independent RFC 9162 implementation: pymerkle
(PyPI, pure Python). Roots must agree at every size, our inclusion paths must be
pymerkle's path without its leading leaf hash, and pymerkle's own consistency
proofs must verify against our roots under its verifier.

pymerkle is an optional test dependency: without it these tests skip, and the
transparency-dev vectors in testdata/ remain the independent reference.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.audit.compact import MerkleLog

pymerkle: Any = pytest.importorskip("pymerkle", reason="pip install pymerkle for the cross-check")

N = 300


@pytest.fixture(scope="module")
def pair() -> tuple[MerkleLog, Any]:
    ours = MerkleLog()
    theirs = pymerkle.InmemoryTree(algorithm="sha256")  # RFC 9162 prefixes by default
    for i in range(N):
        entry = b"entry %d" % i
        ours.append(entry)
        theirs.append_entry(entry)
    return ours, theirs


def test_roots_agree_at_every_size(pair: tuple[MerkleLog, Any]) -> None:
    ours, theirs = pair
    for size in range(1, N + 1):
        assert ours.root(size) == theirs.get_root(size), size


def test_empty_roots_agree() -> None:
    assert MerkleLog().root() == pymerkle.InmemoryTree(algorithm="sha256").hash_empty()


@given(st.data())
@settings(max_examples=200)
def test_inclusion_paths_agree(pair: tuple[MerkleLog, Any], data: st.DataObject) -> None:
    ours, theirs = pair
    size = data.draw(st.integers(min_value=1, max_value=N))
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    their_proof = theirs.prove_inclusion(index + 1, size)  # pymerkle counts from 1
    path = [bytes.fromhex(h) for h in their_proof.serialize()["path"]]
    assert path[0] == ours.leaf_hash(index)
    assert path[1:] == ours.inclusion_proof(index, size)


@given(st.data())
@settings(max_examples=200)
def test_their_consistency_proofs_verify_between_our_roots(
    pair: tuple[MerkleLog, Any], data: st.DataObject
) -> None:
    ours, theirs = pair
    second = data.draw(st.integers(min_value=2, max_value=N))
    first = data.draw(st.integers(min_value=1, max_value=second - 1))
    their_proof = theirs.prove_consistency(first, second)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pymerkle.verify_consistency(ours.root(first), ours.root(second), their_proof)
    tampered = bytes([ours.root(first)[0] ^ 1]) + ours.root(first)[1:]
    with pytest.raises(pymerkle.InvalidProof):
        pymerkle.verify_consistency(tampered, ours.root(second), their_proof)
