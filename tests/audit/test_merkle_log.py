"""MerkleLog: appends, roots and proofs at past sizes, input errors, and a large log."""

from __future__ import annotations

import random
import time

import pytest

from trustmesh.audit import rfc6962
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.proof import verify_consistency, verify_inclusion
from trustmesh.common.errors import ProofError


def test_append_returns_consecutive_indices() -> None:
    log = MerkleLog()
    assert [log.append(b"%d" % i) for i in range(5)] == [0, 1, 2, 3, 4]
    assert log.extend([b"a", b"b"]) == range(5, 7)
    assert log.size == len(log) == 7
    assert log.leaf_hash(5) == rfc6962.leaf_hash(b"a")


def test_roots_of_past_sizes_do_not_change_as_the_log_grows() -> None:
    log = MerkleLog()
    seen = [log.root()]
    for i in range(100):
        log.append(b"%d" % i)
        seen.append(log.root())
    assert [log.root(n) for n in range(101)] == seen


def test_rebuilding_from_leaf_hashes_gives_the_same_tree() -> None:
    log = MerkleLog()
    log.extend(b"%d" % i for i in range(37))
    again = MerkleLog.from_leaf_hashes(log.leaf_hash(i) for i in range(37))
    assert again.root() == log.root()
    assert again.inclusion_proof(5, 30) == log.inclusion_proof(5, 30)


def test_append_leaf_hash_checks_the_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        MerkleLog().append_leaf_hash(b"short")


def test_sizes_beyond_the_log_are_refused() -> None:
    log = MerkleLog()
    log.extend([b"a", b"b", b"c"])
    with pytest.raises(ProofError, match="not between 0 and the log size 3"):
        log.root(4)
    with pytest.raises(ProofError, match="not between"):
        log.inclusion_proof(0, 4)
    with pytest.raises(ProofError, match="need 0 <= leaf_index < tree_size"):
        log.inclusion_proof(3)
    with pytest.raises(ProofError, match="need 0 < first <= second"):
        log.consistency_proof(0)
    with pytest.raises(ProofError, match="need 0 < first <= second"):
        log.consistency_proof(3, 2)
    with pytest.raises(ProofError, match="no complete subtree"):
        log.node(1, 1)  # leaves 2..3, only 2 exists
    with pytest.raises(ProofError, match="no complete subtree"):
        log.leaf_hash(3)


def test_empty_log_has_the_empty_root_and_no_proofs() -> None:
    log = MerkleLog()
    assert log.root() == rfc6962.EMPTY_ROOT
    with pytest.raises(ProofError):
        log.inclusion_proof(0)


LARGE = 100_000


@pytest.fixture(scope="module")
def large() -> MerkleLog:
    log = MerkleLog()
    log.extend(b"%d" % i for i in range(LARGE))
    return log


def test_large_log_root_equals_the_level_by_level_root(large: MerkleLog) -> None:
    hashes = [large.leaf_hash(i) for i in range(LARGE)]
    assert large.root() == rfc6962.root_from_leaf_hashes(hashes)
    assert large.root(65_537) == rfc6962.root_from_leaf_hashes(hashes[:65_537])


def test_large_log_proofs_verify_quickly(large: MerkleLog) -> None:
    rng = random.Random(7)
    root = large.root()
    started = time.perf_counter()
    rounds = 500
    for _ in range(rounds):
        index = rng.randrange(LARGE)
        verify_inclusion(large.leaf_hash(index), index, LARGE, large.inclusion_proof(index), root)
        first = rng.randint(1, LARGE)
        verify_consistency(first, LARGE, large.root(first), root, large.consistency_proof(first))
    per_round = (time.perf_counter() - started) / rounds
    # Two proofs built and checked plus a past root: tens of µs here; the
    # bound only guards against an accidental O(n) path.
    assert per_round < 0.005, f"{per_round * 1e6:.0f} µs per inclusion+consistency round"
