"""Verifying a stored audit log from its records alone (DESIGN §6, ``trustmesh audit verify``).

:class:`LogVerifier` is fed the log's entries in index order -- each the exact bytes
that were hashed, with the leaf hash stored beside them when the reader has it -- and
the log's signed checkpoints, and trusts nothing but the verifier key:

* every leaf is hashed again (RFC 9162 §2.1.1); bytes that do not match their stored
  hash are named by index (``altered``);
* an index that never arrives is named (``missing``);
* every leaf must be the canonical JSON (RFC 8785) of a schema-valid event: parsing
  it and writing it again must give the same bytes (``not_canonical``,
  ``invalid_event``);
* every event id appears once (``duplicate_event``: a copied entry, even one appended
  after the last checkpoint, where no signature covers it yet);
* each agent spool numbers its events 1, 2, 3...: a number seen twice is named
  (``duplicate_seq``), one that comes after a later one is named (``reordered``)
  unless an ``audit.gap_detected`` event announced it missing (it then arrived
  late, legitimately), and numbers skipped without such an announcement are named
  (``unannounced_gap``);
* the tree is rebuilt (:class:`MerkleLog`) and every checkpoint is checked: its
  C2SP signature (``bad_checkpoint``), its root at its size, and whether the log
  still reaches that size (``truncated``). When roots disagree while every leaf
  matches its stored hash, someone rewrote leaves *and* hashes: the verifier names
  the narrowest range it can, ``[a, b)`` between the last checkpoint that matches
  and the first that does not (``rewritten``). Nothing finer can be named from
  the records alone, because a signed root commits to the whole prefix, not to one
  leaf; with a live log, :func:`narrow_with_proofs` narrows such a range to the
  entries whose inclusion proofs fail.

It never stops at the first problem: every one is counted, the first
``max_problems`` kept. Nothing here touches a database or the network.
"""

from __future__ import annotations

import bisect
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from trustmesh.audit import events as ev
from trustmesh.audit.checkpoint import Checkpoint, verify_checkpoint
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.note import Verifier, parse_verifier_key
from trustmesh.audit.proof import root_from_inclusion_proof, subtree_root
from trustmesh.audit.rfc6962 import leaf_hash, node_hash
from trustmesh.common.errors import CheckpointError, EventError, ProofError

ALTERED = "altered"
MISSING = "missing"
OUT_OF_ORDER = "out_of_order"
NOT_CANONICAL = "not_canonical"
INVALID_EVENT = "invalid_event"
DUPLICATE_SEQ = "duplicate_seq"
DUPLICATE_EVENT = "duplicate_event"
REORDERED = "reordered"
UNANNOUNCED_GAP = "unannounced_gap"
BAD_CHECKPOINT = "bad_checkpoint"
SPLIT_VIEW = "split_view"
REWRITTEN = "rewritten"
TRUNCATED = "truncated"
UNCHECKED = "unchecked"

MAX_PROBLEMS = 100


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the log. ``index`` alone names one entry; with ``end`` it
    names the range ``[index, end)``; ``checkpoint`` is the size of the checkpoint
    concerned, when one is."""

    kind: str
    message: str
    index: int | None = None
    end: int | None = None
    checkpoint: int | None = None

    @property
    def where(self) -> str:
        """Where, in words: ``index 5``, ``indices [3, 9)``, ``checkpoint 12``."""
        if self.index is not None and self.end is not None and self.end - self.index > 1:
            return f"indices [{self.index}, {self.end})"
        if self.index is not None:
            return f"index {self.index}"
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}"
        return "log"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "where": self.where,
            "index": self.index,
            "end": self.end,
            "checkpoint": self.checkpoint,
            "message": self.message,
        }


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`LogVerifier.finish` found. ``problems`` holds at most the first
    ``max_problems``; ``problem_count`` counts them all."""

    origin: str
    size: int
    entries: int
    checkpoints: int
    checkpoints_verified: int
    verified_size: int
    problems: tuple[Problem, ...]
    problem_count: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    @property
    def entries_per_second(self) -> float:
        return self.entries / self.seconds if self.seconds > 0 else 0.0

    @property
    def unsigned(self) -> int:
        """Entries after the largest checkpoint that matched: not yet under a signature."""
        return max(self.size - self.verified_size, 0)

    def replacing(self, old: Problem, new: Sequence[Problem]) -> VerifyReport:
        """This report with ``old`` replaced by ``new`` (a range narrowed to indices)."""
        problems = [p for p in self.problems if p != old]
        problems.extend(new)
        problems.sort(key=_problem_order)
        return replace(
            self,
            problems=tuple(problems),
            problem_count=self.problem_count - 1 + len(new),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "origin": self.origin,
            "size": self.size,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "checkpoints_verified": self.checkpoints_verified,
            "verified_size": self.verified_size,
            "unsigned": self.unsigned,
            "problem_count": self.problem_count,
            "problems": [p.to_json() for p in self.problems],
            "seconds": round(self.seconds, 6),
            "entries_per_second": round(self.entries_per_second, 1),
        }


def _problem_order(problem: Problem) -> tuple[int, int]:
    if problem.index is not None:
        return (problem.index, 0)
    return (problem.checkpoint if problem.checkpoint is not None else -1, 1)


@dataclass
class _Hole:
    """Sequence numbers ``first..last`` a spool skipped at ``index`` (where ``seq`` came)."""

    first: int
    last: int
    index: int
    seq: int


@dataclass
class _Spool:
    """The sequence numbers seen so far from one agent spool (``source.id``)."""

    next_seq: int = 1
    holes: list[_Hole] = field(default_factory=list)
    late: list[tuple[int, int, _Hole]] = field(default_factory=list)
    announced: list[tuple[int, int]] = field(default_factory=list)


def _announced(spool: _Spool, first: int, last: int) -> bool:
    return any(a <= first and last <= b for a, b in spool.announced)


class LogVerifier:
    """Streaming verifier of one log; see the module docstring.

    ``checkpoints`` are ``(size, signed note)`` pairs as stored. Feed entries with
    :meth:`add` in index order, then call :meth:`finish` once.
    """

    def __init__(
        self,
        verifier: str | Verifier,
        checkpoints: Iterable[tuple[int, str]] = (),
        *,
        max_problems: int = MAX_PROBLEMS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.verifier = parse_verifier_key(verifier) if isinstance(verifier, str) else verifier
        self.max_problems = max_problems
        self._clock = clock
        self._seconds = 0.0
        self._problems: list[Problem] = []
        self._problem_count = 0
        self._tree = MerkleLog()
        self._next = 0
        self._entries = 0
        self._first_missing: int | None = None
        # Stored leaf hashes that differ from the recomputed ones, by index (ascending):
        # the tree "as stored" is the recomputed tree with these substituted.
        self._stored: dict[int, bytes] = {}
        self._stored_at: list[int] = []
        self._stored_nodes: dict[tuple[int, int], bytes] = {}
        self._altered: dict[int, bytes] = {}
        self._spools: dict[str, _Spool] = {}
        self._event_ids: dict[int, int] = {}  # UUID as an integer -> first index
        # Checkpoint checks, by size, in the order the tree reaches them.
        self.checkpoints: dict[int, Checkpoint] = {}
        self._roots: dict[int, set[bytes]] = {}
        self._due: list[int] = []
        self._due_next = 0
        self._checkpoint_count = 0
        self._outcomes: list[tuple[int, str]] = []  # (size, "leaves"|"stored"|"neither")
        self._last_good = 0
        self._failing: list[int] = []
        self._verified = 0
        self._verified_size = 0
        started = self._clock()
        for size, note in checkpoints:
            self._add_checkpoint(size, note)
        self._due = sorted(self._roots)
        self._check_due()
        self._seconds += self._clock() - started

    # -- problems -------------------------------------------------------------------------
    def _report(self, problem: Problem) -> None:
        self._problem_count += 1
        if len(self._problems) < self.max_problems:
            self._problems.append(problem)

    # -- checkpoints ----------------------------------------------------------------------
    def _add_checkpoint(self, size: int, note: str) -> None:
        self._checkpoint_count += 1
        try:
            checkpoint = verify_checkpoint(note, self.verifier)
        except CheckpointError as exc:
            self._report(Problem(BAD_CHECKPOINT, f"checkpoint {size}: {exc}", checkpoint=size))
            return
        if checkpoint.size != size:
            self._report(
                Problem(
                    BAD_CHECKPOINT,
                    f"checkpoint stored as size {size} holds a signed note for size "
                    f"{checkpoint.size}",
                    checkpoint=size,
                )
            )
        roots = self._roots.setdefault(checkpoint.size, set())
        if roots and checkpoint.root_hash not in roots:
            self._report(
                Problem(
                    SPLIT_VIEW,
                    f"the log signed two different roots for size {checkpoint.size}: its key "
                    "signed inconsistent checkpoints (a split view, or a stolen key)",
                    checkpoint=checkpoint.size,
                )
            )
        roots.add(checkpoint.root_hash)
        self.checkpoints.setdefault(checkpoint.size, checkpoint)

    def _check_due(self) -> None:
        while self._due_next < len(self._due) and self._due[self._due_next] <= self._tree.size:
            size = self._due[self._due_next]
            self._due_next += 1
            self._check_root(size, self._roots[size])

    def _check_root(self, size: int, roots: set[bytes]) -> None:
        if self._tree.root(size) in roots:
            outcome = "leaves"
        elif self._stored_below(size) and self._stored_root(size) in roots:
            outcome = "stored"
        else:
            outcome = "neither"
        self._outcomes.append((size, outcome))
        if outcome == "neither":
            self._failing.append(size)
            return
        self._close_failing_run()
        self._last_good = size
        self._verified += 1
        self._verified_size = size

    def _close_failing_run(self) -> None:
        if not self._failing:
            return
        start, end = self._last_good, self._failing[0]
        later = self._failing[1:]
        message = (
            f"the tree of entries [0, {end}) does not match the checkpoint signed at size "
            f"{end}, while [0, {start}) matches the one at size {start}: entries in "
            f"[{start}, {end}) were changed together with their stored leaf hashes, or "
            "inserted, removed or reordered"
        )
        if start == 0:
            message = (
                f"the tree of entries [0, {end}) does not match the checkpoint signed at size "
                f"{end}: entries in [0, {end}) were changed together with their stored leaf "
                "hashes, or inserted, removed or reordered"
            )
        known = [i for i in self._stored_at if start <= i < end]
        if known:
            message += f" (besides the altered {_indices(known)})"
        if later:
            message += (
                f"; the {len(later)} later checkpoint(s) up to size {later[-1]} fail with it "
                "and cannot tell a second change apart"
            )
        self._report(Problem(REWRITTEN, message, index=start, end=end, checkpoint=end))
        self._failing = []

    def _stored_below(self, size: int) -> bool:
        return bool(self._stored_at) and self._stored_at[0] < size

    def _stored_root(self, size: int) -> bytes:
        """The root of the tree built from the *stored* leaf hashes: the recomputed tree
        with the differing hashes substituted, re-hashing only the nodes above them."""
        return subtree_root(self._stored_node, 0, size)

    def _stored_node(self, level: int, index: int) -> bytes:
        low = index << level
        high = low + (1 << level)
        at = bisect.bisect_left(self._stored_at, low)
        if at == len(self._stored_at) or self._stored_at[at] >= high:
            return self._tree.node(level, index)
        if level == 0:
            return self._stored[low]
        cached = self._stored_nodes.get((level, index))
        if cached is None:
            # A complete subtree never changes, and new stored hashes only come at
            # indices beyond it, so its node can be kept.
            cached = node_hash(
                self._stored_node(level - 1, 2 * index), self._stored_node(level - 1, 2 * index + 1)
            )
            self._stored_nodes[(level, index)] = cached
        return cached

    # -- entries --------------------------------------------------------------------------
    def check_columns(self, index: int, leaf: bytes, columns: Mapping[str, Any]) -> None:
        """Compare the query columns stored beside entry ``index`` with the fields of
        its record (offline readers have them). The leaf is the record: a column that
        disagrees would only mislead ``audit query``, so it is named as such."""
        started = self._clock()
        try:
            expected = ev.query_columns(orjson.loads(leaf))
        except (ValueError, TypeError, KeyError, AttributeError):
            return  # the leaf itself is reported by add()
        finally:
            self._seconds += self._clock() - started
        wrong = [name for name in ev.QUERY_COLUMNS if columns.get(name) != expected[name]]
        if wrong:
            name = wrong[0]
            self._report(
                Problem(
                    "column_mismatch",
                    f"query column{'s' if len(wrong) > 1 else ''} {', '.join(wrong)} "
                    f"disagree{'' if len(wrong) > 1 else 's'} with the record "
                    f"({name}: stored {columns.get(name)!r}, record {expected[name]!r}); "
                    "audit query would mislead",
                    index=index,
                )
            )

    def add(self, index: int, leaf: bytes, stored_hash: bytes | None = None) -> None:
        """Check one entry: ``leaf`` is the exact bytes hashed, ``stored_hash`` the leaf
        hash stored with it (``None`` when the reader has none, e.g. over HTTP)."""
        started = self._clock()
        try:
            self._add(index, leaf, stored_hash)
        finally:
            self._seconds += self._clock() - started

    def _add(self, index: int, leaf: bytes, stored_hash: bytes | None) -> None:
        if index < self._next:
            self._report(
                Problem(
                    OUT_OF_ORDER,
                    f"entry {index} comes after entry {self._next - 1}: the index is repeated "
                    "or out of order",
                    index=index,
                )
            )
            return
        if index > self._next:
            self._report(
                Problem(
                    MISSING,
                    f"entries [{self._next}, {index}) are missing"
                    if index - self._next > 1
                    else f"entry {self._next} is missing",
                    index=self._next,
                    end=index,
                )
            )
            if self._first_missing is None:
                self._first_missing = self._next
        self._next = index + 1
        self._entries += 1
        computed = leaf_hash(leaf)
        if stored_hash is not None and bytes(stored_hash) != computed:
            self._stored[index] = bytes(stored_hash)
            self._stored_at.append(index)
            self._altered[index] = computed
            self._report(Problem(ALTERED, "", index=index))  # worded in finish()
        self._check_event(index, leaf)
        if self._first_missing is None:
            self._tree.append_leaf_hash(computed)
            self._check_due()

    def _check_event(self, index: int, leaf: bytes) -> None:
        try:
            event = orjson.loads(leaf)
        except orjson.JSONDecodeError as exc:
            self._report(Problem(NOT_CANONICAL, f"the leaf is not JSON: {exc}", index=index))
            return
        try:
            canonical = ev.check_event(event)
        except EventError as exc:
            self._report(
                Problem(INVALID_EVENT, f"the leaf is not a valid event: {exc}", index=index)
            )
            return
        if canonical != leaf:
            self._report(
                Problem(
                    NOT_CANONICAL,
                    "the leaf is not the canonical JSON (RFC 8785) of its event: "
                    f"{len(leaf)} bytes where the canonical form has {len(canonical)}",
                    index=index,
                )
            )
        event_id = uuid.UUID(event["event_id"]).int
        first = self._event_ids.setdefault(event_id, index)
        if first != index:
            self._report(
                Problem(
                    DUPLICATE_EVENT,
                    f"event {event['event_id']} is already in the log at index {first}: "
                    "an entry was copied",
                    index=index,
                )
            )
        source = event["source"]
        if source["kind"] == "agent":
            self._check_seq(index, str(source["id"]), int(source["seq"]))
        if event["type"] == ev.AUDIT_GAP:
            self._note_announcement(event.get("detail"))

    def _check_seq(self, index: int, spool_id: str, seq: int) -> None:
        spool = self._spools.setdefault(spool_id, _Spool())
        if seq == spool.next_seq:
            spool.next_seq += 1
        elif seq > spool.next_seq:
            spool.holes.append(_Hole(spool.next_seq, seq - 1, index, seq))
            spool.next_seq = seq + 1
        else:
            hole = next((h for h in spool.holes if h.first <= seq <= h.last), None)
            if hole is None:
                self._report(
                    Problem(
                        DUPLICATE_SEQ,
                        f"agent spool {spool_id} seq {seq} is already in the log: a sequence "
                        "number repeats",
                        index=index,
                    )
                )
                return
            spool.late.append((index, seq, hole))
            self._split_hole(spool, hole, seq)

    @staticmethod
    def _split_hole(spool: _Spool, hole: _Hole, seq: int) -> None:
        at = spool.holes.index(hole)
        pieces = [
            _Hole(first, last, hole.index, hole.seq)
            for first, last in ((hole.first, seq - 1), (seq + 1, hole.last))
            if first <= last
        ]
        spool.holes[at : at + 1] = pieces

    def _note_announcement(self, detail: Any) -> None:
        if not isinstance(detail, dict):
            return
        spool_id, first, last = (
            detail.get("source"),
            detail.get("first_seq"),
            detail.get("last_seq"),
        )
        if isinstance(spool_id, str) and isinstance(first, int) and isinstance(last, int):
            self._spools.setdefault(spool_id, _Spool()).announced.append((first, last))

    # -- the end --------------------------------------------------------------------------
    def finish(self) -> VerifyReport:
        """Check what only the end can tell and return the report."""
        started = self._clock()
        size = self._next
        self._close_failing_run()
        self._finish_checkpoints(size)
        self._finish_sequences()
        problems = [self._worded(p) for p in self._problems]
        problems.sort(key=_problem_order)
        self._seconds += self._clock() - started
        return VerifyReport(
            origin=self.verifier.name,
            size=size,
            entries=self._entries,
            checkpoints=self._checkpoint_count,
            checkpoints_verified=self._verified,
            verified_size=self._verified_size,
            problems=tuple(problems),
            problem_count=self._problem_count,
            seconds=self._seconds,
        )

    def _finish_checkpoints(self, size: int) -> None:
        beyond = [s for s in self._due if s > size]
        if beyond:
            self._report(
                Problem(
                    TRUNCATED,
                    f"the log holds {size} entries but {len(beyond)} checkpoint(s) were signed "
                    f"over more, up to {beyond[-1]}: entries [{size}, {beyond[-1]}) were removed "
                    "from its end",
                    index=size,
                    end=beyond[-1],
                    checkpoint=beyond[-1],
                )
            )
        first_missing = self._first_missing
        if first_missing is not None:
            unchecked = [s for s in self._due if first_missing < s <= size]
            if unchecked:
                self._report(
                    Problem(
                        UNCHECKED,
                        f"{len(unchecked)} checkpoint(s) from size {unchecked[0]} to "
                        f"{unchecked[-1]} cover the missing entry {first_missing} and could "
                        "not be checked",
                        index=first_missing,
                        end=unchecked[-1],
                        checkpoint=unchecked[0],
                    )
                )

    def _finish_sequences(self) -> None:
        for spool_id, spool in self._spools.items():
            for index, seq, hole in spool.late:
                if not _announced(spool, seq, seq):
                    self._report(
                        Problem(
                            REORDERED,
                            f"agent spool {spool_id} seq {seq} comes after seq {hole.seq} "
                            f"(index {hole.index}) and no audit.gap_detected event announced "
                            "it missing: entries were reordered",
                            index=index,
                        )
                    )
            reordered = {seq for _, seq, _ in spool.late}
            for hole in spool.holes:
                if _announced(spool, hole.first, hole.last):
                    continue
                # Numbers that arrived late are reported as reordered, not as missing.
                if any(hole.first <= seq <= hole.last for seq in reordered):
                    continue
                numbers = (
                    f"seq {hole.first}"
                    if hole.first == hole.last
                    else f"seqs {hole.first}..{hole.last}"
                )
                self._report(
                    Problem(
                        UNANNOUNCED_GAP,
                        f"agent spool {spool_id} jumps to seq {hole.seq} here: {numbers} never "
                        "appear and no audit.gap_detected event announced them (entries removed?)",
                        index=hole.index,
                    )
                )

    def _worded(self, problem: Problem) -> Problem:
        if problem.kind != ALTERED or problem.index is None:
            return problem
        index = problem.index
        computed, stored = self._altered[index], self._stored[index]
        # The first checkpoint checked that covers this entry says which side it signed.
        found = bisect.bisect_left(self._outcomes, (index + 1, ""))
        outcome = self._outcomes[found] if found < len(self._outcomes) else None
        base = (
            f"the leaf hashes to {computed.hex()[:16]}… but the stored leaf hash is "
            f"{stored.hex()[:16]}…"
        )
        if outcome is not None and outcome[1] == "stored":
            message = (
                f"the leaf bytes were changed: {base}, and the stored hash is the one the "
                f"checkpoint at size {outcome[0]} signed"
            )
        elif outcome is not None and outcome[1] == "leaves":
            message = (
                f"the stored leaf hash was changed: {base}, and the leaf is the one the "
                f"checkpoint at size {outcome[0]} signed"
            )
        else:
            message = f"the leaf and its stored hash disagree: {base}"
        return replace(problem, message=message)


def _indices(indices: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:10])
    more = f" and {len(indices) - 10} more" if len(indices) > 10 else ""
    return f"entr{'y' if len(indices) == 1 else 'ies'} {shown}{more}"


def verify_log(
    verifier: str | Verifier,
    entries: Iterable[tuple[int, bytes, bytes | None]],
    checkpoints: Iterable[tuple[int, str]],
    *,
    max_problems: int = MAX_PROBLEMS,
) -> VerifyReport:
    """Verify a whole log in one call: ``entries`` are ``(index, leaf, stored hash or
    None)`` in index order, ``checkpoints`` ``(size, signed note)``."""
    verifier_state = LogVerifier(verifier, checkpoints, max_problems=max_problems)
    for index, leaf, stored in entries:
        verifier_state.add(index, leaf, stored)
    return verifier_state.finish()


def narrow_with_proofs(
    problem: Problem,
    checkpoint: Checkpoint,
    leaves: Iterable[tuple[int, bytes]],
    proof_for: Callable[[int], Sequence[bytes]],
) -> list[Problem] | None:
    """Narrow a ``rewritten`` range with inclusion proofs from a live log.

    ``leaves`` are the entries of the range as read, ``proof_for(i)`` the log's
    inclusion proof of entry ``i`` in the tree of ``checkpoint.size``. A proof that
    leads from a leaf to the signed root proves that leaf is the signed one, whoever
    computed the proof; so if some entries of the range are proven and others not,
    the others are named one by one. Returns ``None`` when nothing is gained (no
    entry, or every entry, fails), and the range stands.
    """
    failed: list[int] = []
    count = 0
    for index, leaf in leaves:
        count += 1
        try:
            proof = proof_for(index)
            root = root_from_inclusion_proof(leaf_hash(leaf), index, checkpoint.size, proof)
        except ProofError:
            root = b""
        if root != checkpoint.root_hash:
            failed.append(index)
    if not failed or len(failed) == count:
        return None
    return [
        Problem(
            ALTERED,
            f"the leaf is not the one the checkpoint at size {checkpoint.size} signed: its "
            f"inclusion proof does not lead to the signed root, while every other entry of "
            f"[{problem.index}, {problem.end}) is proven",
            index=index,
            checkpoint=checkpoint.size,
        )
        for index in failed
    ]
