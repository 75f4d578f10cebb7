"""The log verifier against real logs (real Ed25519 keys, real signed checkpoints) and
every way of tampering with one: each is reported, at the right index or range."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.audit import events as ev
from trustmesh.audit import verify as v
from trustmesh.audit.checkpoint import Checkpoint, sign_checkpoint
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.note import verifier_key
from trustmesh.audit.rfc6962 import leaf_hash

ORIGIN = "corp.example/trustmesh-audit"
KEY = Ed25519PrivateKey.generate()
VKEY = verifier_key(ORIGIN, KEY.public_key())
SPOOL = "spool-7f3a"

Entry = tuple[int, bytes, bytes | None]


def control_plane_event(n: int) -> dict[str, object]:
    return ev.new_event(
        "admin.apply",
        source={"kind": "control-plane", "id": "replica-1"},
        actor="admin:alice",
        detail={"n": n},
    )


def agent_event(seq: int, allowed: bool = True, spool: str = SPOOL) -> dict[str, object]:
    return ev.new_event(
        ev.AUTHZ_DECISION,
        source={"kind": "agent", "id": spool, "agent": "agent-1", "seq": seq},
        cluster="edge-1",
        actor="spiffe://corp.example/ns/shop/sa/payments",
        identity={"spiffe_id": "spiffe://corp.example/ns/shop/sa/payments"},
        request={"surface": "authorize", "method": "GET", "host": "api.test", "path": "/x"},
        decision={"allowed": allowed, "reason": "binding shop-read"},
    )


def gap_event(first: int, last: int, spool: str = SPOOL) -> dict[str, object]:
    return ev.new_event(
        ev.AUDIT_GAP,
        source={"kind": "control-plane", "id": "replica-1"},
        actor="system",
        detail={"source": spool, "first_seq": first, "last_seq": last},
    )


@dataclass
class Log:
    """A log as a reader sees it: entries and stored checkpoints, both editable."""

    entries: list[Entry]
    checkpoints: list[tuple[int, str]] = field(default_factory=list)

    def verify(self, max_problems: int = v.MAX_PROBLEMS) -> v.VerifyReport:
        return v.verify_log(VKEY, self.entries, self.checkpoints, max_problems=max_problems)


def sign(tree: MerkleLog, size: int, key: Ed25519PrivateKey = KEY) -> str:
    return sign_checkpoint(Checkpoint(ORIGIN, size, tree.root(size)), key)


def log_of(leaves: list[bytes], every: int = 8) -> Log:
    """Entries with their stored hashes; a checkpoint every ``every`` entries and one
    at the end, as the control plane signs them."""
    tree = MerkleLog()
    tree.extend(leaves)
    sizes = sorted({*range(every, len(leaves) + 1, every), len(leaves)})
    return Log(
        entries=[(i, leaf, leaf_hash(leaf)) for i, leaf in enumerate(leaves)],
        checkpoints=[(size, sign(tree, size)) for size in sizes],
    )


def mixed_leaves(n: int = 40) -> list[bytes]:
    """Control-plane events at every third index, agent decisions (seq 1, 2, ...) between."""
    events = []
    seq = 0
    for i in range(n):
        if i % 3 == 0:
            events.append(control_plane_event(i))
        else:
            seq += 1
            events.append(agent_event(seq))
    return [ev.check_event(e) for e in events]


def kinds(report: v.VerifyReport) -> list[tuple[str, int | None, int | None]]:
    return [(p.kind, p.index, p.end) for p in report.problems]


def seq_of(leaf: bytes) -> int | None:
    source = json.loads(leaf)["source"]
    return source.get("seq")


def test_an_intact_log_verifies() -> None:
    log = log_of(mixed_leaves())
    report = log.verify()
    assert report.ok and report.problems == ()
    assert report.size == report.entries == report.verified_size == 40
    assert report.checkpoints == report.checkpoints_verified == 5
    assert report.unsigned == 0 and report.entries_per_second > 0
    assert report.to_json()["ok"] is True


def test_an_empty_log_with_its_empty_checkpoint_verifies() -> None:
    log = Log([], [(0, sign(MerkleLog(), 0))])
    report = log.verify()
    assert report.ok and report.size == 0 and report.checkpoints_verified == 1


def test_entries_after_the_last_checkpoint_are_counted_as_unsigned() -> None:
    leaves = mixed_leaves(20)
    log = log_of(leaves[:16])
    log.entries += [(i, leaves[i], leaf_hash(leaves[i])) for i in range(16, 20)]
    report = log.verify()
    assert report.ok and report.verified_size == 16 and report.unsigned == 4


def test_an_altered_leaf_is_named_by_index_and_the_signed_hash_says_which_side() -> None:
    log = log_of(mixed_leaves())
    index, _, stored = log.entries[10]
    changed = ev.check_event(agent_event(seq_of(log.entries[10][1]) or 0, allowed=False))
    log.entries[10] = (index, changed, stored)
    report = log.verify()
    assert kinds(report) == [(v.ALTERED, 10, None)]
    assert "leaf bytes were changed" in report.problems[0].message
    assert "size 16" in report.problems[0].message


def test_an_altered_stored_hash_alone_is_named_and_the_leaf_is_the_signed_one() -> None:
    log = log_of(mixed_leaves())
    index, leaf, _ = log.entries[5]
    log.entries[5] = (index, leaf, b"\x00" * 32)
    report = log.verify()
    assert kinds(report) == [(v.ALTERED, 5, None)]
    assert "stored leaf hash was changed" in report.problems[0].message


def test_leaf_and_hash_rewritten_together_give_the_range_between_checkpoints() -> None:
    log = log_of(mixed_leaves())
    original = json.loads(log.entries[10][1])
    original["decision"]["allowed"] = False
    forged = ev.check_event(original)
    log.entries[10] = (10, forged, leaf_hash(forged))
    report = log.verify()
    assert kinds(report) == [(v.REWRITTEN, 8, 16)]
    assert report.problems[0].checkpoint == 16
    assert "[8, 16)" in report.problems[0].message
    assert "3 later checkpoint(s) up to size 40" in report.problems[0].message
    assert report.verified_size == 8


def test_a_rewrite_before_the_first_checkpoint_names_the_range_from_zero() -> None:
    log = log_of(mixed_leaves())
    forged = ev.check_event(control_plane_event(999))
    log.entries[3] = (3, forged, leaf_hash(forged))
    assert kinds(log.verify()) == [(v.REWRITTEN, 0, 8)]


def test_a_dropped_middle_entry_is_named() -> None:
    log = log_of(mixed_leaves())
    dropped = log.entries.pop(10)
    assert seq_of(dropped[1]) is not None
    report = log.verify()
    found = kinds(report)
    assert (v.MISSING, 10, 11) in found
    assert report.problems[0].message == "entry 10 is missing"
    # the agent's sequence numbers skip one that nobody announced missing
    assert (v.UNANNOUNCED_GAP, 11, None) in found
    # the checkpoints beyond it cannot be checked; the one before still is
    assert any(p.kind == v.UNCHECKED and p.index == 10 for p in report.problems)
    assert report.verified_size == 8


def test_a_dropped_tail_is_named_by_the_checkpoint_that_covered_it() -> None:
    log = log_of(mixed_leaves())
    del log.entries[35:]
    report = log.verify()
    assert kinds(report) == [(v.TRUNCATED, 35, 40)]
    assert report.problems[0].checkpoint == 40
    assert report.verified_size == 32


def test_two_swapped_entries_are_reported_as_reordered() -> None:
    log = log_of(mixed_leaves())
    first, second = log.entries[10], log.entries[11]
    assert seq_of(first[1]) is not None and seq_of(second[1]) is not None
    log.entries[10] = (10, second[1], second[2])
    log.entries[11] = (11, first[1], first[2])
    found = kinds(log.verify())
    assert (v.REWRITTEN, 8, 16) in found
    assert (v.REORDERED, 11, None) in found
    assert len(found) == 2


def test_a_swap_of_leaves_without_their_hashes_names_both_indices() -> None:
    log = log_of(mixed_leaves())
    first, second = log.entries[10], log.entries[11]
    log.entries[10] = (10, second[1], first[2])
    log.entries[11] = (11, first[1], second[2])
    found = kinds(log.verify())
    assert (v.ALTERED, 10, None) in found and (v.ALTERED, 11, None) in found


def test_a_duplicated_sequence_number_is_named() -> None:
    leaves = [ev.check_event(agent_event(seq)) for seq in (1, 2, 3, 3, 4)]
    report = log_of(leaves).verify()  # even when the log signed it
    assert kinds(report) == [(v.DUPLICATE_SEQ, 3, None)]
    assert SPOOL in report.problems[0].message


def test_a_copied_entry_slipped_in_is_named() -> None:
    log = log_of(mixed_leaves())
    copy = log.entries[10]
    shifted = [(i + 1, leaf, h) for i, leaf, h in log.entries[12:]]
    log.entries = [*log.entries[:12], (12, copy[1], copy[2]), *shifted]
    found = kinds(log.verify())
    assert (v.DUPLICATE_SEQ, 12, None) in found
    assert (v.REWRITTEN, 8, 16) in found


def test_a_copy_appended_after_the_last_checkpoint_is_named() -> None:
    log = log_of(mixed_leaves(12))
    _, leaf, stored = log.entries[6]
    log.entries.append((12, leaf, stored))
    report = log.verify()
    assert kinds(report) == [(v.DUPLICATE_EVENT, 12, None)]
    assert "index 6" in report.problems[0].message


def test_a_forged_checkpoint_is_named_and_the_others_still_check() -> None:
    log = log_of(mixed_leaves())
    size, note = log.checkpoints[1]
    text, _, signature = note.partition("\n\n")
    lines = text.split("\n")
    lines[2] = "A" * 43 + "="  # another root, same signature
    log.checkpoints[1] = (size, "\n".join(lines) + "\n\n" + signature)
    other = Ed25519PrivateKey.generate()
    tree = MerkleLog()
    tree.extend(leaf for _, leaf, _ in log.entries)
    log.checkpoints[2] = (24, sign(tree, 24, other))  # same name, another key
    report = log.verify()
    assert [(p.kind, p.checkpoint) for p in report.problems] == [
        (v.BAD_CHECKPOINT, 16),
        (v.BAD_CHECKPOINT, 24),
    ]
    assert "does not verify" in report.problems[0].message
    assert "another key" in report.problems[1].message
    assert report.checkpoints_verified == 3


def test_a_checkpoint_stored_under_another_size_is_named() -> None:
    log = log_of(mixed_leaves())
    log.checkpoints[0] = (9, log.checkpoints[0][1])
    report = log.verify()
    assert [(p.kind, p.checkpoint) for p in report.problems] == [(v.BAD_CHECKPOINT, 9)]


def test_two_signed_roots_for_one_size_are_a_split_view() -> None:
    leaves = mixed_leaves(16)
    log = log_of(leaves)
    other = MerkleLog()
    other.extend([*leaves[:15], ev.check_event(control_plane_event(1000))])
    log.checkpoints.append((16, sign(other, 16)))
    report = log.verify()
    assert [p.kind for p in report.problems] == [v.SPLIT_VIEW]


def test_a_leaf_that_is_not_canonical_json_is_named() -> None:
    leaves = mixed_leaves(12)
    event = json.loads(leaves[4])
    leaves[4] = json.dumps(event, indent=1).encode()  # same event, other bytes
    leaves[6] = b"\xff not even JSON"
    report = log_of(leaves).verify()  # signed that way: only the form is wrong
    found = kinds(report)
    assert found[0] == (v.NOT_CANONICAL, 4, None)
    assert found[1] == (v.NOT_CANONICAL, 6, None)
    assert "not JSON" in report.problems[1].message


def test_a_leaf_that_is_not_a_valid_event_is_named() -> None:
    leaves = mixed_leaves(12)
    event = json.loads(leaves[3])
    event["type"] = "made.up"
    leaves[3] = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
    report = log_of(leaves).verify()
    assert kinds(report) == [(v.INVALID_EVENT, 3, None)]
    assert "made.up" in report.problems[0].message


def test_a_late_event_in_an_announced_gap_is_legitimate() -> None:
    events = [agent_event(1), agent_event(2), agent_event(5), gap_event(3, 4), agent_event(3)]
    report = log_of([ev.check_event(e) for e in events]).verify()
    assert report.ok, report.problems


def test_sequence_numbers_skipped_without_an_announcement_are_named() -> None:
    events = [agent_event(1), agent_event(2), agent_event(5), agent_event(6)]
    report = log_of([ev.check_event(e) for e in events]).verify()
    assert kinds(report) == [(v.UNANNOUNCED_GAP, 2, None)]
    assert "seqs 3..4" in report.problems[0].message


def test_every_spool_has_its_own_numbers() -> None:
    events = [
        agent_event(1),
        agent_event(1, spool="other"),
        agent_event(2),
        agent_event(2, spool="other"),
    ]
    assert log_of([ev.check_event(e) for e in events]).verify().ok


def test_entries_out_of_index_order_are_named() -> None:
    log = log_of(mixed_leaves(10))
    log.entries.insert(5, log.entries[2])
    found = kinds(log.verify())
    assert (v.OUT_OF_ORDER, 2, None) in found


def test_every_problem_is_counted_and_the_first_hundred_kept() -> None:
    log = log_of(mixed_leaves(150))
    log.entries = [(i, leaf, b"\x01" * 32) for i, leaf, _ in log.entries]
    report = log.verify()
    assert report.problem_count >= 150 and len(report.problems) == v.MAX_PROBLEMS
    assert [p.index for p in report.problems[:3]] == [0, 1, 2]


def test_entries_read_without_stored_hashes_still_check_against_the_checkpoints() -> None:
    log = log_of(mixed_leaves())
    log.entries = [(i, leaf, None) for i, leaf, _ in log.entries]
    assert log.verify().ok
    forged = ev.check_event(control_plane_event(123))
    log.entries[21] = (21, forged, None)
    assert kinds(log.verify()) == [(v.REWRITTEN, 16, 24)]


def test_inclusion_proofs_from_an_honest_tree_narrow_a_range_to_the_index() -> None:
    leaves = mixed_leaves()
    honest = MerkleLog()
    honest.extend(leaves)
    log = log_of(leaves)
    forged = ev.check_event(control_plane_event(123))
    log.entries[21] = (21, forged, leaf_hash(forged))
    verifier = v.LogVerifier(VKEY, log.checkpoints)
    for index, leaf, stored in log.entries:
        verifier.add(index, leaf, stored)
    report = verifier.finish()
    (rewritten,) = report.problems
    assert rewritten.end is not None and rewritten.index is not None
    checkpoint = verifier.checkpoints[rewritten.end]
    range_leaves = [(i, leaf) for i, leaf, _ in log.entries[rewritten.index : rewritten.end]]
    narrowed = v.narrow_with_proofs(
        rewritten, checkpoint, range_leaves, lambda i: honest.inclusion_proof(i, checkpoint.size)
    )
    assert narrowed is not None and [(p.kind, p.index) for p in narrowed] == [(v.ALTERED, 21)]
    report = report.replacing(rewritten, narrowed)
    assert kinds(report) == [(v.ALTERED, 21, None)] and report.problem_count == 1

    # proofs from the rewritten tree prove nothing: the range stands
    rewritten_tree = MerkleLog()
    rewritten_tree.extend(leaf for _, leaf, _ in log.entries)
    assert (
        v.narrow_with_proofs(
            rewritten,
            checkpoint,
            range_leaves,
            lambda i: rewritten_tree.inclusion_proof(i, checkpoint.size),
        )
        is None
    )


def test_a_malformed_verifier_key_is_refused() -> None:
    with pytest.raises(ValueError, match="verifier key"):
        v.LogVerifier("not-a-key")


# -- property: any single change is detected and located ---------------------------------
MUTATIONS = [
    "flip_byte",
    "flip_byte_rehash",
    "replace_rehash",
    "drop",
    "drop_tail",
    "swap",
    "insert_copy",
    "forge_checkpoint",
]


def covers(problem: v.Problem, index: int) -> bool:
    if problem.index is None:
        return False
    if problem.end is None:
        return problem.index == index
    return problem.index <= index < problem.end


@given(
    n=st.integers(min_value=2, max_value=60),
    every=st.integers(min_value=1, max_value=20),
    mutation=st.sampled_from(MUTATIONS),
    with_hashes=st.booleans(),
    data=st.data(),
)
@settings(max_examples=300, deadline=None)
def test_any_single_change_is_detected_and_located(
    n: int, every: int, mutation: str, with_hashes: bool, data: st.DataObject
) -> None:
    log = log_of(mixed_leaves(n), every)
    if not with_hashes:
        log.entries = [(i, leaf, None) for i, leaf, _ in log.entries]
    i = data.draw(st.integers(min_value=0, max_value=n - 1), label="index")
    index, leaf, stored = log.entries[i]
    expect: set[int] = {i}
    if mutation in ("flip_byte", "flip_byte_rehash"):
        at = data.draw(st.integers(min_value=0, max_value=len(leaf) - 1), label="byte")
        bit = data.draw(st.integers(min_value=0, max_value=7), label="bit")
        changed = leaf[:at] + bytes([leaf[at] ^ (1 << bit)]) + leaf[at + 1 :]
        rehashed = leaf_hash(changed) if stored is not None else None
        log.entries[i] = (index, changed, rehashed if mutation.endswith("rehash") else stored)
    elif mutation == "replace_rehash":
        other = ev.check_event(control_plane_event(10_000 + i))
        log.entries[i] = (index, other, leaf_hash(other) if stored is not None else None)
    elif mutation == "drop":
        del log.entries[i]
    elif mutation == "drop_tail":
        del log.entries[i:]
    elif mutation == "swap":
        j = data.draw(st.integers(min_value=0, max_value=n - 1).filter(lambda j: j != i))
        other_entry = log.entries[j]
        log.entries[i] = (i, other_entry[1], other_entry[2])
        log.entries[j] = (j, leaf, stored)
        expect = {i, j}
    elif mutation == "insert_copy":
        j = data.draw(st.integers(min_value=0, max_value=n - 1), label="copied")
        copy = log.entries[j]
        rest = [(k + 1, lf, h) for k, lf, h in log.entries[i:]]
        log.entries = [*log.entries[:i], (i, copy[1], copy[2]), *rest]
        expect = {i, i + 1}  # a copy of entry i inserted before it changes i + 1
    else:
        c = data.draw(st.integers(min_value=0, max_value=len(log.checkpoints) - 1))
        size, note = log.checkpoints[c]
        at = data.draw(st.integers(min_value=0, max_value=len(note) - 2), label="note byte")
        # change one character of the note (the final newline stays)
        replacement = "x" if note[at] != "x" else "y"
        log.checkpoints[c] = (size, note[:at] + replacement + note[at + 1 :])
        report = log.verify()
        assert not report.ok
        assert any(p.checkpoint == size for p in report.problems), report.problems
        return
    report = log.verify()
    assert not report.ok, mutation
    located = {k for k in expect if any(covers(p, k) for p in report.problems)}
    assert located, (mutation, i, expect, report.problems)
