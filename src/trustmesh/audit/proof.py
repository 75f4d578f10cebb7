"""Inclusion and consistency proofs: generation (RFC 9162 §2.1.3.1, §2.1.4.1) and
verification (RFC 9162 §2.1.3.2, §2.1.4.2).

Generation reads the tree through one function, ``get_node(level, index)``, which
returns the hash of the *complete* subtree of ``2**level`` leaves that starts at
leaf ``index * 2**level`` (level 0 is the leaf hashes). Every node an RFC 9162
proof needs is either such a complete subtree -- one lookup -- or the right edge
of a tree whose size is not a power of two, which :func:`subtree_root` folds from
at most log2(n) complete subtrees. A proof therefore costs O(log n) lookups and
hashes whatever stores the nodes: :class:`trustmesh.audit.compact.MerkleLog` in
memory, a tiled table in a database later.

Verification follows the RFC's algorithms step by step and raises
:class:`ProofError` on any malformed or wrong proof; it never returns a boolean
that a caller could forget to check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from trustmesh.audit.rfc6962 import HASH_SIZE, node_hash, split_point
from trustmesh.common.errors import ProofError

GetNode = Callable[[int, int], bytes]
"""``get_node(level, index)``: the hash of leaves ``[index << level, (index + 1) << level)``,
a complete subtree. Only called for subtrees that lie wholly inside the tree."""


def subtree_root(get_node: GetNode, start: int, end: int) -> bytes:
    """MTH(D[start:end]) (RFC 9162 §2.1.1) from complete subtrees.

    ``start`` must be a multiple of the smallest power of two ``>= end - start`` --
    true of every range the RFC's recursive definitions visit. The range splits
    into complete subtrees by the binary digits of its length, largest first,
    and MTH folds them from the right: MTH = H(c1, H(c2, ... H(ck-1, ck))).
    """
    size = end - start
    if size <= 0:
        raise ProofError(f"empty or inverted range [{start}, {end})")
    if start & ((1 << (size - 1).bit_length()) - 1):
        raise ProofError(f"range [{start}, {end}) is not aligned to a subtree of the tree")
    if size & (size - 1) == 0:
        level = size.bit_length() - 1
        return get_node(level, start >> level)
    parts: list[bytes] = []
    pos = start
    remaining = size
    while remaining:
        level = remaining.bit_length() - 1
        parts.append(get_node(level, pos >> level))
        pos += 1 << level
        remaining -= 1 << level
    acc = parts[-1]
    for part in reversed(parts[:-1]):
        acc = node_hash(part, acc)
    return acc


def inclusion_proof(leaf_index: int, tree_size: int, get_node: GetNode) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 §2.1.3.1, the audit path of leaf ``m`` in a tree of ``n``.

    The RFC's recursion, unrolled: walk from the root towards the leaf, and at
    each split record the MTH of the half that does *not* hold the leaf. The RFC
    lists the path leaf-first, so the walk's list is reversed.
    """
    if tree_size < 1 or not 0 <= leaf_index < tree_size:
        raise ProofError(
            f"no inclusion proof for leaf {leaf_index} in a tree of size {tree_size}: "
            "need 0 <= leaf_index < tree_size"
        )
    path: list[bytes] = []
    lo, hi = 0, tree_size
    while hi - lo > 1:
        k = split_point(hi - lo)
        if leaf_index - lo < k:
            path.append(subtree_root(get_node, lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree_root(get_node, lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_proof(first: int, second: int, get_node: GetNode) -> list[bytes]:
    """PROOF(m, D[n]) = SUBPROOF(m, D[n], true) of RFC 9162 §2.1.4.1.

    Defined for ``0 < first <= second``; empty when the sizes are equal (the
    verifier then compares roots). The RFC leaves ``first == 0`` undefined:
    every tree extends the empty one, so such a proof would prove nothing, and
    it is refused here as by the verifier. Otherwise the recursion is unrolled
    like :func:`inclusion_proof`; ``b`` becomes false once the walk enters a
    right half, and the final MTH(D[m]) is only emitted then.
    """
    if not 0 < first <= second:
        raise ProofError(
            f"no consistency proof from size {first} to size {second}: need 0 < first <= second"
        )
    if first == second:
        return []
    proof: list[bytes] = []
    lo, hi, m = 0, second, first
    whole_first_tree = True  # the RFC's b
    while m != hi - lo:
        k = split_point(hi - lo)
        if m <= k:
            proof.append(subtree_root(get_node, lo + k, hi))
            hi = lo + k
        else:
            proof.append(subtree_root(get_node, lo, lo + k))
            lo += k
            m -= k
            whole_first_tree = False
    if not whole_first_tree:
        proof.append(subtree_root(get_node, lo, hi))
    proof.reverse()
    return proof


def inclusion_proof_size(leaf_index: int, tree_size: int) -> int:
    """How many hashes PATH(m, D[n]) has: one per level below the point where the
    paths to ``m`` and ``n - 1`` diverge, plus one per left sibling above it."""
    inner = (leaf_index ^ (tree_size - 1)).bit_length()
    return inner + (leaf_index >> inner).bit_count()


def consistency_proof_size(first: int, second: int) -> int:
    """How many hashes PROOF(m, D[n]) has for ``0 < m < n``.

    The complete subtrees below ``first``'s lowest set bit are shared by both
    trees, so the proof is that of an inclusion proof one level up, plus MTH(D[m])'s
    last node unless ``first`` is a power of two (then the verifier seeds with
    ``first_root`` itself, RFC 9162 §2.1.4.2 step 2).
    """
    shift = (first & -first).bit_length() - 1
    index = (first - 1) >> shift
    size = ((second - 1) >> shift) + 1
    seed = 0 if first & (first - 1) == 0 else 1
    return seed + inclusion_proof_size(index, size)


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        size = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise ProofError(f"{what} must be a {HASH_SIZE}-byte hash, got {size}")


def _check_path(proof: Sequence[bytes], expected: int, what: str) -> None:
    if len(proof) != expected:
        raise ProofError(f"{what} has {len(proof)} hashes, expected {expected}")
    for i, item in enumerate(proof):
        _check_hash(item, f"{what} hash {i}")


def root_from_inclusion_proof(
    leaf_hash: bytes, leaf_index: int, tree_size: int, proof: Sequence[bytes]
) -> bytes:
    """The root that ``proof`` implies for ``leaf_hash`` at ``leaf_index``: steps 1-4
    of RFC 9162 §2.1.3.2, with the length of every hash checked first."""
    # Step 1.
    if leaf_index < 0 or tree_size < 0:
        raise ProofError(f"negative leaf index {leaf_index} or tree size {tree_size}")
    if leaf_index >= tree_size:
        raise ProofError(f"leaf index {leaf_index} is not below tree size {tree_size}")
    _check_hash(leaf_hash, "leaf hash")
    _check_path(
        proof,
        inclusion_proof_size(leaf_index, tree_size),
        f"inclusion proof for leaf {leaf_index} in a tree of size {tree_size}",
    )
    # Steps 2 and 3.
    fn, sn = leaf_index, tree_size - 1
    r = leaf_hash
    # Step 4.
    for p in proof:
        if sn == 0:  # 4a
            raise ProofError("inclusion proof is longer than the path to the root")
        if fn & 1 or fn == sn:  # 4b
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1  # 4c
        sn >>= 1
    # Step 5, first half: the path must have reached the root.
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the path to the root")
    return r


def verify_inclusion(
    leaf_hash: bytes, leaf_index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``proof`` shows ``leaf_hash`` at ``leaf_index`` in the tree of
    ``tree_size`` leaves whose root is ``root`` (RFC 9162 §2.1.3.2).

    ``leaf_hash`` is the RFC 6962 leaf hash (``rfc6962.leaf_hash(entry)``), not the
    entry. Raises :class:`ProofError`; returns nothing on success.
    """
    _check_hash(root, "root")
    computed = root_from_inclusion_proof(leaf_hash, leaf_index, tree_size, proof)
    # Step 5, second half.
    if computed != root:
        raise ProofError(
            f"inclusion proof for leaf {leaf_index} in a tree of size {tree_size} "
            "leads to a different root"
        )


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``second`` leaves with ``second_root`` extends the tree
    of ``first`` leaves with ``first_root`` (RFC 9162 §2.1.4.2).

    The RFC defines proofs for ``0 < first < second``. For ``first == second``
    PROOF is empty (§2.1.4.1), so the proof must be empty and the roots equal.
    ``first == 0`` is refused: any tree extends the empty tree, so the proof
    could show nothing (transparency-dev/merkle refuses it too). Raises
    :class:`ProofError`; returns nothing on success.
    """
    if first < 0 or second < 0:
        raise ProofError(f"negative tree size ({first}, {second})")
    if first > second:
        raise ProofError(f"first tree size {first} is larger than second tree size {second}")
    if first == 0:
        raise ProofError("a consistency proof from the empty tree proves nothing; need first > 0")
    _check_hash(first_root, "first root")
    _check_hash(second_root, "second root")
    if first == second:
        if proof:
            raise ProofError(
                f"consistency proof between equal sizes {first} must be empty, "
                f"got {len(proof)} hashes"
            )
        if first_root != second_root:
            raise ProofError(f"trees of equal size {first} have different roots")
        return

    # Step 1.
    if not proof:
        raise ProofError(f"consistency proof from size {first} to {second} is empty")
    _check_path(
        proof,
        consistency_proof_size(first, second),
        f"consistency proof from size {first} to {second}",
    )
    path = list(proof)
    # Step 2.
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    # Step 3.
    fn, sn = first - 1, second - 1
    # Step 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5.
    fr = sr = path[0]
    # Step 6.
    for c in path[1:]:
        if sn == 0:  # 6a
            raise ProofError("consistency proof is longer than the path to the root")
        if fn & 1 or fn == sn:  # 6b
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1  # 6c
        sn >>= 1
    # Step 7.
    if sn != 0:
        raise ProofError("consistency proof is shorter than the path to the root")
    if fr != first_root:
        raise ProofError(f"consistency proof does not lead to the root of size {first}")
    if sr != second_root:
        raise ProofError(f"consistency proof does not lead to the root of size {second}")
