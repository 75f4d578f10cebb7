"""RFC 6962 / RFC 9162 Merkle tree hashing (RFC 9162 §2.1.1, RFC 6962 §2.1).

The hash is SHA-256 and the leaf/node prefixes give domain separation between
leaves and interior nodes (RFC 9162 §2.1.1, and §12.1 on second-preimage
attacks):

    MTH({})        = SHA-256()
    MTH({d(0)})    = SHA-256(0x00 || d(0))
    MTH(D[n])      = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))

where k is the largest power of two smaller than n. This module is the only
place that knows those bytes; proofs and logs call it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
"""Length in bytes of every tree hash (SHA-256)."""

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH({}) -- the hash of an empty string (RFC 9162 §2.1.1)."""

_sha256 = hashlib.sha256


def empty_root() -> bytes:
    """The root of the empty tree: SHA-256 of the empty string (RFC 9162 §2.1.1)."""
    return EMPTY_ROOT


def leaf_hash(data: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d) for one entry d (RFC 9162 §2.1.1)."""
    return _sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): an interior node (RFC 9162 §2.1.1)."""
    return _sha256(NODE_PREFIX + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``): the k of
    RFC 9162 §2.1.1 at which MTH(D[n]) splits into D[0:k] and D[k:n]."""
    if n < 2:
        raise ValueError(f"a tree of {n} leaves has no split point")
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH over raw entries ``leaves`` (RFC 9162 §2.1.1); the entries are hashed here."""
    return root_from_leaf_hashes([leaf_hash(d) for d in leaves])


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over entries already hashed with :func:`leaf_hash`.

    Iterative and O(n): pairs are combined level by level, and a lone last node
    is carried up unchanged, which yields exactly the RFC 9162 §2.1.1 split at
    the largest power of two (the left part of every split is a complete
    subtree, so only the right edge of the tree is ever unpaired).
    """
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]
