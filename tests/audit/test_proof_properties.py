"""Property tests: generated proofs verify, match the RFC's recursive definitions,
and any single-byte change to a proof, a root or a leaf is refused."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.audit import rfc6962
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.proof import (
    consistency_proof_size,
    inclusion_proof_size,
    verify_consistency,
    verify_inclusion,
)
from trustmesh.common.errors import ProofError

N = 1100  # past 1024, so sizes cross a power of two


def _entry(i: int) -> bytes:
    return b"entry %d" % i


@pytest.fixture(scope="module")
def log() -> MerkleLog:
    log = MerkleLog()
    log.extend(_entry(i) for i in range(N))
    return log


# The RFC 9162 definitions transcribed literally over a list of leaf hashes:
# an oracle that shares no code with the implementation.
def _mth(hashes: list[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    k = 1 << ((len(hashes) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _mth(hashes[:k]) + _mth(hashes[k:])).digest()


def _path(m: int, hashes: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]), RFC 9162 §2.1.3.1."""
    n = len(hashes)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*_path(m, hashes[:k]), _mth(hashes[k:])]
    return [*_path(m - k, hashes[k:]), _mth(hashes[:k])]


def _subproof(m: int, hashes: list[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b), RFC 9162 §2.1.4.1."""
    n = len(hashes)
    if m == n:
        return [] if b else [_mth(hashes)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*_subproof(m, hashes[:k], b), _mth(hashes[k:])]
    return [*_subproof(m - k, hashes[k:], False), _mth(hashes[:k])]


def _flip(data: bytes, position: int, mask: int) -> bytes:
    return data[:position] + bytes([data[position] ^ mask]) + data[position + 1 :]


sizes = st.integers(min_value=1, max_value=N)
masks = st.integers(min_value=1, max_value=255)


@st.composite
def index_and_size(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(sizes)
    return draw(st.integers(min_value=0, max_value=size - 1)), size


@st.composite
def size_pair(draw: st.DrawFn) -> tuple[int, int]:
    second = draw(sizes)
    return draw(st.integers(min_value=1, max_value=second)), second


def test_small_trees_exhaustively_match_the_rfc_definitions(log: MerkleLog) -> None:
    hashes = [log.leaf_hash(i) for i in range(70)]
    for n in range(1, 70):
        root = log.root(n)
        assert root == _mth(hashes[:n])
        for m in range(n):
            proof = log.inclusion_proof(m, n)
            assert proof == _path(m, hashes[:n])
            assert len(proof) == inclusion_proof_size(m, n)
            verify_inclusion(hashes[m], m, n, proof, root)
        for m in range(1, n + 1):
            proof = log.consistency_proof(m, n)
            assert proof == _subproof(m, hashes[:n], True)
            if m < n:
                assert len(proof) == consistency_proof_size(m, n)
            verify_consistency(m, n, log.root(m), root, proof)


@given(index_and_size())
def test_inclusion_proofs_match_the_rfc_definition(log: MerkleLog, case: tuple[int, int]) -> None:
    index, size = case
    hashes = [log.leaf_hash(i) for i in range(size)]
    assert log.inclusion_proof(index, size) == _path(index, hashes)


@given(size_pair())
@settings(max_examples=50)
def test_consistency_proofs_match_the_rfc_definition(log: MerkleLog, case: tuple[int, int]) -> None:
    first, second = case
    hashes = [log.leaf_hash(i) for i in range(second)]
    assert log.consistency_proof(first, second) == _subproof(first, hashes, True)


@given(index_and_size(), st.data())
def test_inclusion_proof_verifies_and_any_changed_byte_fails(
    log: MerkleLog, case: tuple[int, int], data: st.DataObject
) -> None:
    index, size = case
    leaf, root = log.leaf_hash(index), log.root(size)
    proof = log.inclusion_proof(index, size)
    verify_inclusion(leaf, index, size, proof, root)

    mask = data.draw(masks)
    byte = data.draw(st.integers(min_value=0, max_value=31))
    target = data.draw(st.sampled_from(["leaf", "root", "proof"] if proof else ["leaf", "root"]))
    if target == "leaf":
        leaf = _flip(leaf, byte, mask)
    elif target == "root":
        root = _flip(root, byte, mask)
    else:
        k = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
        proof = [*proof[:k], _flip(proof[k], byte, mask), *proof[k + 1 :]]
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, size, proof, root)


@given(index_and_size(), st.data())
def test_inclusion_proof_for_another_index_or_size_fails(
    log: MerkleLog, case: tuple[int, int], data: st.DataObject
) -> None:
    index, size = case
    proof = log.inclusion_proof(index, size)
    other_index = data.draw(st.integers(min_value=0, max_value=N))
    other_size = data.draw(st.integers(min_value=1, max_value=N))
    if (other_index, other_size) == (index, size):
        return
    leaf = log.leaf_hash(index)
    if other_index != index:
        with pytest.raises(ProofError):
            verify_inclusion(leaf, other_index, size, proof, log.root(size))
    # The size only shapes the path; what binds it is the root, which a
    # checkpoint signs together with the size. A proof for one tree never
    # verifies against another tree's size and root.
    if other_size != size and index < other_size:
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, other_size, proof, log.root(other_size))


@given(size_pair(), st.data())
def test_consistency_proof_verifies_and_any_changed_byte_fails(
    log: MerkleLog, case: tuple[int, int], data: st.DataObject
) -> None:
    first, second = case
    first_root, second_root = log.root(first), log.root(second)
    proof = log.consistency_proof(first, second)
    verify_consistency(first, second, first_root, second_root, proof)

    mask = data.draw(masks)
    byte = data.draw(st.integers(min_value=0, max_value=31))
    choices = ["first_root", "second_root"] + (["proof"] if proof else [])
    target = data.draw(st.sampled_from(choices))
    if target == "first_root":
        first_root = _flip(first_root, byte, mask)
    elif target == "second_root":
        second_root = _flip(second_root, byte, mask)
    else:
        k = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
        proof = [*proof[:k], _flip(proof[k], byte, mask), *proof[k + 1 :]]
    with pytest.raises(ProofError):
        verify_consistency(first, second, first_root, second_root, proof)


@given(size_pair(), st.data())
def test_consistency_proof_with_a_hash_added_or_removed_fails(
    log: MerkleLog, case: tuple[int, int], data: st.DataObject
) -> None:
    first, second = case
    proof = log.consistency_proof(first, second)
    extra = data.draw(st.binary(min_size=32, max_size=32))
    position = data.draw(st.integers(min_value=0, max_value=len(proof)))
    longer = [*proof[:position], extra, *proof[position:]]
    with pytest.raises(ProofError):
        verify_consistency(first, second, log.root(first), log.root(second), longer)
    if proof:
        gone = min(position, len(proof) - 1)
        shorter = proof[:gone] + proof[gone + 1 :]
        with pytest.raises(ProofError):
            verify_consistency(first, second, log.root(first), log.root(second), shorter)


@given(size_pair())
def test_a_rewritten_history_is_not_consistent(log: MerkleLog, case: tuple[int, int]) -> None:
    first, second = case
    if first == second:
        return
    # The same log with one entry below `first` changed: its roots must not be
    # provably consistent with the honest log's.
    forged = MerkleLog()
    changed = first // 2
    forged.extend(_entry(i) if i != changed else b"forged" for i in range(second))
    proof = forged.consistency_proof(first, second)
    with pytest.raises(ProofError):
        verify_consistency(first, second, log.root(first), forged.root(second), proof)
    with pytest.raises(ProofError):
        verify_consistency(first, second, forged.root(first), log.root(second), proof)


@given(st.lists(st.binary(max_size=16), min_size=1, max_size=40))
def test_log_root_equals_hashing_all_entries(entries: list[bytes]) -> None:
    log = MerkleLog()
    log.extend(entries)
    for n in range(len(entries) + 1):
        assert log.root(n) == rfc6962.root(entries[:n])
