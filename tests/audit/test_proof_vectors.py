"""Inclusion and consistency proofs against the vector files: the good ones verify
and are exactly what we generate; every deliberately broken one is refused."""

from __future__ import annotations

from typing import Any

import pytest
from audit_vectors import probes, tree8_leaves, tree8_roots

from trustmesh.audit import rfc6962
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.proof import verify_consistency, verify_inclusion
from trustmesh.common.errors import ProofError


def _hashes(values: list[str]) -> list[bytes]:
    return [bytes.fromhex(v) for v in values]


@pytest.fixture(scope="module")
def tree8() -> MerkleLog:
    log = MerkleLog()
    log.extend(tree8_leaves())
    return log


@pytest.mark.parametrize("probe", probes("inclusion"))
def test_inclusion_vector(probe: dict[str, Any]) -> None:
    args = (
        bytes.fromhex(probe["leaf_hash"]),
        probe["leaf_index"],
        probe["tree_size"],
        _hashes(probe["proof"]),
        bytes.fromhex(probe["root"]),
    )
    if probe["want_error"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("probe", probes("consistency"))
def test_consistency_vector(probe: dict[str, Any]) -> None:
    args = (
        probe["first"],
        probe["second"],
        bytes.fromhex(probe["first_root"]),
        bytes.fromhex(probe["second_root"]),
        _hashes(probe["proof"]),
    )
    if probe["want_error"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def _good_over_tree8(kind: str) -> list[Any]:
    """The good probes whose leaves are the reference tree's (not single-entry ones)."""
    return [
        p
        for p in probes(kind)
        if not p.values[0]["want_error"] and "/single-entry/" not in f"/{p.id}"
    ]


@pytest.mark.parametrize("probe", _good_over_tree8("inclusion"))
def test_generated_inclusion_proofs_equal_the_good_vectors(
    probe: dict[str, Any], tree8: MerkleLog
) -> None:
    index, size = probe["leaf_index"], probe["tree_size"]
    assert tree8.leaf_hash(index).hex() == probe["leaf_hash"]
    assert [h.hex() for h in tree8.inclusion_proof(index, size)] == probe["proof"]
    assert tree8.root(size).hex() == probe["root"]


@pytest.mark.parametrize("probe", _good_over_tree8("consistency"))
def test_generated_consistency_proofs_equal_the_good_vectors(
    probe: dict[str, Any], tree8: MerkleLog
) -> None:
    got = tree8.consistency_proof(probe["first"], probe["second"])
    assert [h.hex() for h in got] == probe["proof"]
    roots = tree8_roots()
    assert probe["first_root"] == roots[probe["first"]].hex()
    assert probe["second_root"] == roots[probe["second"]].hex()


def test_every_vector_directory_has_a_good_and_broken_probes() -> None:
    for kind in ("inclusion", "consistency"):
        groups: dict[str, list[bool]] = {}
        for p in probes(kind):
            groups.setdefault(p.id.split("/")[1], []).append(p.values[0]["want_error"])
        for group, wants in groups.items():
            assert any(wants), f"{kind}/{group} has no broken probe"
            if group not in ("degenerate",):
                assert not all(wants), f"{kind}/{group} has no good probe"


# Clear messages: a reader of a failed proof can tell what was wrong.
LEAF0 = rfc6962.leaf_hash(b"")
ROOTS = tree8_roots()


@pytest.fixture(scope="module")
def proof_0_8(tree8: MerkleLog) -> list[bytes]:
    return tree8.inclusion_proof(0, 8)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: (LEAF0, 8, 8, p, ROOTS[8]), "not below tree size"),
        (lambda p: (LEAF0, 0, 8, p[:-1], ROOTS[8]), "has 2 hashes, expected 3"),
        (lambda p: (LEAF0, 0, 8, [*p, p[0]], ROOTS[8]), "has 4 hashes, expected 3"),
        (lambda p: (LEAF0, 0, 8, [b"", *p[1:]], ROOTS[8]), "hash 0 must be a 32-byte hash"),
        (lambda p: (LEAF0, 0, 8, p, ROOTS[7]), "leads to a different root"),
        (lambda p: (LEAF0[:31], 0, 8, p, ROOTS[8]), "leaf hash must be a 32-byte hash"),
        (lambda p: (LEAF0, -1, 8, p, ROOTS[8]), "negative"),
    ],
)
def test_inclusion_errors_say_what_is_wrong(
    proof_0_8: list[bytes], mutate: Any, message: str
) -> None:
    with pytest.raises(ProofError, match=message):
        verify_inclusion(*mutate(proof_0_8))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((7, 6, ROOTS[7], ROOTS[6], []), "larger than second"),
        ((0, 6, ROOTS[0], ROOTS[6], []), "empty tree proves nothing"),
        ((3, 3, ROOTS[3], ROOTS[4], []), "different roots"),
        ((3, 3, ROOTS[3], ROOTS[3], [ROOTS[3]]), "must be empty"),
        ((3, 6, ROOTS[3], ROOTS[6], []), "is empty"),
        ((3, 6, ROOTS[3], ROOTS[6], [ROOTS[3]]), "has 1 hashes, expected"),
        ((3, 6, b"short", ROOTS[6], []), "first root must be a 32-byte hash"),
    ],
)
def test_consistency_errors_say_what_is_wrong(args: Any, message: str) -> None:
    with pytest.raises(ProofError, match=message):
        verify_consistency(*args)


def test_consistency_error_names_the_root_that_does_not_match(tree8: MerkleLog) -> None:
    proof = tree8.consistency_proof(6, 8)
    with pytest.raises(ProofError, match="root of size 8"):
        verify_consistency(6, 8, ROOTS[6], ROOTS[7], proof)
    with pytest.raises(ProofError, match="root of size 6"):
        verify_consistency(6, 8, ROOTS[5], ROOTS[8], proof)
