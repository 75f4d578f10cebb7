"""An append-only Merkle log in memory: RFC 9162 §2.1 trees for every past size.

The log keeps, per level, the hashes of the complete subtrees formed so far
(level 0 is the leaf hashes, level h the subtrees of 2**h leaves), each level a
flat ``bytearray`` of 32-byte hashes. A complete subtree never changes once
formed, so these nodes serve every past tree size as well as the current one:

* ``append`` hashes the entry and completes at most one subtree per level --
  O(log n) worst case, O(1) amortised;
* ``root(size)`` and every proof are O(log n) node lookups and hashes through
  :func:`trustmesh.audit.proof.subtree_root`;
* memory is about 2n hashes (64 bytes per entry), with no per-node objects.

The layout is the in-memory twin of a tiled store (a table keyed by
``(level, index)``), which is what a database-backed log will implement later
behind the same ``get_node`` function. The log holds hashes, not entries:
whoever stores the entries keeps them. Not thread-safe; callers serialise
appends.
"""

from __future__ import annotations

from collections.abc import Iterable

from trustmesh.audit.proof import consistency_proof, inclusion_proof, subtree_root
from trustmesh.audit.rfc6962 import EMPTY_ROOT, HASH_SIZE, leaf_hash, node_hash
from trustmesh.common.errors import ProofError


class MerkleLog:
    """An append-only RFC 9162 Merkle tree with roots and proofs at any past size."""

    __slots__ = ("_levels", "_size")

    def __init__(self) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0

    @classmethod
    def from_leaf_hashes(cls, hashes: Iterable[bytes]) -> MerkleLog:
        """Rebuild a log from stored RFC 6962 leaf hashes, in index order."""
        log = cls()
        for h in hashes:
            log.append_leaf_hash(h)
        return log

    @property
    def size(self) -> int:
        """The number of entries appended so far."""
        return self._size

    def __len__(self) -> int:
        return self._size

    def append(self, entry: bytes) -> int:
        """Append one entry (the exact bytes to be hashed) and return its index."""
        return self.append_leaf_hash(leaf_hash(entry))

    def extend(self, entries: Iterable[bytes]) -> range:
        """Append entries in order and return the range of their indices."""
        start = self._size
        for entry in entries:
            self.append_leaf_hash(leaf_hash(entry))
        return range(start, self._size)

    def append_leaf_hash(self, hash_: bytes) -> int:
        """Append an entry by its RFC 6962 leaf hash and return its index."""
        if len(hash_) != HASH_SIZE:
            raise ValueError(f"a leaf hash has {HASH_SIZE} bytes, got {len(hash_)}")
        index = self._size
        levels = self._levels
        levels[0] += hash_
        self._size = count = index + 1
        node = bytes(hash_)
        level = 0
        # Each trailing zero bit of the new size is one more subtree completed.
        while not count & 1:
            below = levels[level]
            node = node_hash(bytes(below[-2 * HASH_SIZE : -HASH_SIZE]), node)
            level += 1
            if level == len(levels):
                levels.append(bytearray())
            levels[level] += node
            count >>= 1
        return index

    def node(self, level: int, index: int) -> bytes:
        """The hash of the complete subtree of ``2**level`` leaves starting at leaf
        ``index << level``; it must already be complete."""
        if level < 0 or index < 0 or (index + 1) << level > self._size:
            raise ProofError(
                f"no complete subtree at level {level}, index {index} in a log of size {self._size}"
            )
        offset = index * HASH_SIZE
        return bytes(self._levels[level][offset : offset + HASH_SIZE])

    def leaf_hash(self, index: int) -> bytes:
        """The RFC 6962 leaf hash of entry ``index``."""
        return self.node(0, index)

    def _size_or_current(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise ProofError(f"tree size {size} is not between 0 and the log size {self._size}")
        return size

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` entries (default: all) -- RFC 9162 §2.1.1."""
        n = self._size_or_current(size)
        if n == 0:
            return EMPTY_ROOT
        return subtree_root(self.node, 0, n)

    def inclusion_proof(self, leaf_index: int, size: int | None = None) -> list[bytes]:
        """The audit path of entry ``leaf_index`` in the tree of ``size`` entries
        (default: all) -- RFC 9162 §2.1.3.1."""
        return inclusion_proof(leaf_index, self._size_or_current(size), self.node)

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """The proof that the tree of ``second`` entries (default: all) extends the
        tree of ``first`` entries -- RFC 9162 §2.1.4.1."""
        return consistency_proof(first, self._size_or_current(second), self.node)

    def truncate(self, size: int) -> None:
        """Forget every entry from ``size`` on (undo appends whose storage failed)."""
        if not 0 <= size <= self._size:
            raise ValueError(f"cannot truncate a log of size {self._size} to {size}")
        for level, nodes in enumerate(self._levels):
            del nodes[(size >> level) * HASH_SIZE :]
        self._size = size
