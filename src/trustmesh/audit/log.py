"""The central audit log (DESIGN §6): one RFC 6962/9162 Merkle tree over the canonical
JSON of every event, signed C2SP checkpoints, proofs, reads and queries.

State has one owner, the database: ``audit_entries`` holds every leaf (the exact
bytes hashed) at its index, ``audit_checkpoints`` every signed checkpoint. Each
replica keeps the tree's hashes in memory (:class:`MerkleLog`, 64 bytes per entry)
and brings it up to date from the stored leaf hashes before it sequences or serves a
proof.

Sequencing -- giving events their indices -- needs one writer. Every append runs in
one transaction that first takes a transaction-scoped PostgreSQL advisory lock
(SQLite has one writer anyway), reads the current size, catches the in-memory tree
up, then inserts. So replicas sharing PostgreSQL take turns and never assign an
index twice, and a checkpoint is signed only over a tree that extends the last
signed one: before signing, the tree's root at the last checkpoint's size must equal
that checkpoint's root, else the log refuses to sign (a log never signs two
inconsistent checkpoints) and reports the database as altered.

Agent events are deduplicated by (source, seq), where the source is the one the
sending credential owns (``CLUSTER/AGENT/SPOOL``, :func:`agent_records`): a resent
batch counts as duplicates, a different record under a used (source, seq) is refused. A sequence number that
skips ahead records a gap (``audit_gaps``) and an ``audit.gap_detected`` event.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy import Connection, and_, delete, insert, select

from trustmesh.audit import events as ev
from trustmesh.audit.checkpoint import Checkpoint, sign_checkpoint
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.note import verifier_key
from trustmesh.audit.rfc6962 import leaf_hash
from trustmesh.common.errors import (
    AuditError,
    EventError,
    InvalidRequest,
    LogInconsistent,
    PayloadTooLarge,
    ProofError,
    SequenceConflict,
    SourceMismatch,
)
from trustmesh.identity.sealing import MasterKey
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import (
    audit_checkpoints,
    audit_entries,
    audit_gaps,
    audit_outbox,
    audit_sources,
)

log = logging.getLogger("trustmesh.audit")

SEQUENCER_LOCK_ID = 0x7472_6175_6474  # "traudt": the audit sequencer's advisory lock
SIGNING_KEY = "audit_signing_key"
ORIGIN = "audit_origin"
VERIFIER_KEY = "audit_verifier_key"
MAX_PAGE = 1000
MAX_INGEST_EVENTS = 1000


@dataclass(frozen=True)
class Record:
    """One event ready to be sequenced: the event, its leaf bytes and where it came from."""

    event: Mapping[str, Any]
    leaf: bytes
    source: str
    seq: int | None = None


@dataclass
class AppendResult:
    accepted: int = 0
    duplicates: int = 0
    tree_size: int = 0
    gaps: list[tuple[str, int, int]] = field(default_factory=list)


def control_plane_source(replica: str) -> dict[str, str]:
    return {"kind": "control-plane", "id": replica}


def record_of(event: Mapping[str, Any]) -> Record:
    """Check an event and pair it with its leaf bytes and source (raises EventError)."""
    leaf = ev.check_event(event)
    source, seq = ev.source_key(event)
    return Record(event, leaf, source, seq)


def agent_records(body: bytes, cluster: str | None, agent: str | None) -> list[Record]:
    """An agent's batch, ``{"events": [...]}``, as records ready to sequence; or
    InvalidRequest naming each problem. An agent may write only the types of
    ``AGENT_TYPES`` (decisions, admission reviews, summaries of folded refusals), only
    of its own ``cluster``, and only into the source of its own credential: each event
    is bound (:func:`~trustmesh.audit.events.bind_source`) to ``cluster`` and
    ``agent``, the authenticated credential's. The admin (``cluster`` None) may send
    for any cluster; its events are bound to the cluster and agent they name."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("body is not valid JSON") from None
    items = document.get("events") if isinstance(document, dict) else None
    if not isinstance(items, list) or not items:
        raise InvalidRequest('body must be {"events": [event, ...]}')
    if len(items) > MAX_INGEST_EVENTS:
        raise PayloadTooLarge(
            f"at most {MAX_INGEST_EVENTS} events per request", error="too_many_events"
        )
    records: list[Record] = []
    problems: list[str] = []
    for i, item in enumerate(items):
        source = item.get("source") if isinstance(item, dict) else None
        if isinstance(source, dict) and source.get("kind") == "agent":
            if cluster is not None and item.get("cluster") != cluster:
                raise SourceMismatch(
                    f"events[{i}] is for cluster {item.get('cluster')!r}; this credential is "
                    f"for cluster {cluster}"
                )
            try:
                item = ev.bind_source(
                    item,
                    cluster if cluster is not None else str(item.get("cluster") or ""),
                    agent if agent is not None else str(source.get("agent") or ""),
                )
            except EventError as exc:
                problems.append(f"events[{i}]: {exc}")
                continue
        try:
            record = record_of(item)
        except EventError as exc:
            problems.append(f"events[{i}]: {exc}")
            continue
        if item["source"]["kind"] != "agent" or item["type"] not in ev.AGENT_TYPES:
            allowed = ", ".join(sorted(ev.AGENT_TYPES))
            problems.append(f"events[{i}]: an agent may only send {allowed} events")
            continue
        records.append(record)
    if problems:
        raise InvalidRequest(
            f"{len(problems)} event(s) are invalid", error="invalid_event", problems=problems[:100]
        )
    return records


def _take_sequencer_lock(conn: Connection) -> None:
    """The one-writer lock, held until the transaction ends: PostgreSQL's advisory lock
    across replicas; on SQLite the database write lock, taken before the size is read."""
    cursor = _cursor(conn)
    if conn.dialect.name == "postgresql":
        cursor.execute(f"SELECT pg_advisory_xact_lock({SEQUENCER_LOCK_ID})")
    else:
        cursor.execute("UPDATE meta SET value = value WHERE name = 'audit_origin'")


def _cursor(conn: Connection) -> Any:
    """A cursor of the driver's connection inside ``conn``'s transaction: the statements
    the sequencer runs for every batch go to the driver directly, without SQLAlchemy's
    per-statement compile and result machinery (several times the statement's cost for
    the small batches of concurrent exchanges)."""
    return conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]


_CATCH_UP = "SELECT idx, leaf_hash FROM audit_entries WHERE idx >= ? ORDER BY idx LIMIT 50000"
_CATCH_UP_FORMAT = _CATCH_UP.replace("?", "%s")  # psycopg's placeholder


def _row(index: int, record: Record, now: float) -> dict[str, Any]:
    return {
        "idx": index,
        "leaf": record.leaf.decode("utf-8"),
        "leaf_hash": leaf_hash(record.leaf),
        **ev.query_columns(record.event),
        "sequenced_at": now,
    }


class AuditLog:
    """The log of one trust domain, as seen by one control-plane replica."""

    def __init__(
        self,
        db: Database,
        master_key: MasterKey,
        trust_domain: str,
        replica: str,
        checkpoint_interval: float = 0.5,
        lock_file: Path | None = None,
    ) -> None:
        """``lock_file``: where processes sharing one SQLite database queue for the
        sequencer (``server/workers.py``); PostgreSQL needs none (its advisory lock)."""
        self.db = db
        self._lock_fd = (
            None
            if lock_file is None
            else os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        )
        self._master_key = master_key
        self.trust_domain = trust_domain
        self.replica = replica
        self.source = control_plane_source(replica)
        self.checkpoint_interval = checkpoint_interval
        self._tree = MerkleLog()
        self._lock = threading.Lock()  # one sequencer per process; the DB lock across them
        self._last_checkpoint: tuple[int, bytes, str] | None = None
        self._last_signed_at = 0.0
        self.origin = ""
        self.inconsistent: str | None = None
        self._compiled_insert: dict[str, Any] = {}
        self._key: Ed25519PrivateKey

    @contextlib.contextmanager
    def _sequencer(self) -> Iterator[None]:
        """This process's one sequencer, then (SQLite with a lock file) the turn among
        processes: a blocking ``flock``, so a process waits in the kernel and wakes the
        moment the lock is free, instead of SQLite's busy handler sleeping 1-100 ms
        between retries. The database's own lock, taken inside, stays the authority."""
        with self._lock:
            if self._lock_fd is None:
                yield
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- set-up ---------------------------------------------------------------------------
    def open(self) -> None:
        """Create (first start) or unseal the log's Ed25519 key, load the tree."""
        origin = f"{self.trust_domain}/trustmesh-audit"
        candidate = Ed25519PrivateKey.generate()
        raw = candidate.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        sealed = self._master_key.seal(raw, SIGNING_KEY.encode())
        with self.db.engine.begin() as conn:
            stored = meta_store.insert_if_absent(conn, SIGNING_KEY, sealed)
            self.origin = meta_store.insert_if_absent(conn, ORIGIN, origin)
        self._key = Ed25519PrivateKey.from_private_bytes(
            self._master_key.open(stored, SIGNING_KEY.encode())
        )
        vkey = verifier_key(self.origin, self._key.public_key())
        with self.db.engine.begin() as conn:
            meta_store.insert_if_absent(conn, VERIFIER_KEY, vkey)
        self.verifier_key = vkey
        with self._lock, self.db.engine.connect() as conn:
            self._catch_up(conn)
            self._load_last_checkpoint(conn)

    def _catch_up(self, conn: Connection) -> int:
        """Append to the in-memory tree whatever the database holds beyond it."""
        size = self._tree.size
        cursor = _cursor(conn)
        query = _CATCH_UP if conn.dialect.paramstyle == "qmark" else _CATCH_UP_FORMAT
        while True:
            cursor.execute(query, (size,))
            rows = cursor.fetchall()
            if not rows:
                return size
            for index, hash_ in rows:
                if index != size:
                    raise LogInconsistent(
                        f"audit entry {size} is missing from the database (next is {index}); "
                        "run trustmesh audit verify"
                    )
                self._tree.append_leaf_hash(bytes(hash_))
                size += 1

    def _load_last_checkpoint(self, conn: Connection) -> None:
        row = conn.execute(
            select(
                audit_checkpoints.c.size, audit_checkpoints.c.root_hash, audit_checkpoints.c.note
            )
            .order_by(audit_checkpoints.c.size.desc())
            .limit(1)
        ).first()
        self._last_checkpoint = (
            None if row is None else (int(row.size), bytes(row.root_hash), str(row.note))
        )

    @property
    def size(self) -> int:
        return self._tree.size

    # -- sequencing -----------------------------------------------------------------------
    def append(self, records: Sequence[Record], staged: Sequence[str] = ()) -> AppendResult:
        """Sequence ``records`` in one transaction (all or nothing); see the module doc.
        ``staged`` names outbox rows (event ids) that this transaction moves into the
        log: they are deleted from the outbox in the same transaction."""
        with self._sequencer():
            start = self._tree.size
            try:
                with self.db.engine.begin() as conn:
                    _take_sequencer_lock(conn)
                    self._catch_up(conn)
                    start = self._tree.size
                    if staged:  # another replica may have drained some of them already
                        logged = set(
                            conn.execute(
                                select(audit_entries.c.event_id).where(
                                    audit_entries.c.event_id.in_(staged)
                                )
                            ).scalars()
                        )
                        records = [r for r in records if r.event["event_id"] not in logged]
                    result = self._append_locked(conn, records)
                    if staged:
                        conn.execute(
                            delete(audit_outbox).where(audit_outbox.c.event_id.in_(staged))
                        )
                    self._checkpoint_or_alarm(conn, force=False)
            except BaseException:
                self._tree.truncate(min(start, self._tree.size))
                self._last_checkpoint = None  # reloaded on the next checkpoint
                raise
            return result

    # -- the outbox: events of a change, committed with the change ---------------------
    def stage(self, conn: Connection, event: Mapping[str, Any]) -> None:
        """Write ``event`` to the outbox inside the caller's transaction: it exists if
        and only if the change it describes commits. :meth:`drain_outbox` sequences it
        right after (and every replica's checkpoint loop, should this process die
        first), so the log never misses a committed admin action."""
        leaf = ev.check_event(event)
        conn.execute(
            insert(audit_outbox).values(
                event_id=event["event_id"], leaf=leaf.decode("utf-8"), staged_at=time.time()
            )
        )

    def drain_outbox(self) -> int:
        """Move staged events into the log, oldest first; returns how many."""
        moved = 0
        while True:
            with self.db.engine.connect() as conn:
                rows = conn.execute(
                    select(audit_outbox.c.event_id, audit_outbox.c.leaf)
                    .order_by(audit_outbox.c.staged_at, audit_outbox.c.event_id)
                    .limit(MAX_PAGE)
                ).all()
            if not rows:
                return moved
            records = [record_of(json.loads(row.leaf)) for row in rows]
            moved += self.append(records, staged=[row.event_id for row in rows]).accepted

    def _append_locked(self, conn: Connection, records: Sequence[Record]) -> AppendResult:
        now = time.time()
        result = AppendResult()
        fresh: list[Record] = []
        by_source: dict[str, list[Record]] = {}
        for record in records:
            if record.seq is None:
                fresh.append(record)
            else:
                by_source.setdefault(record.source, []).append(record)
        for source, items in by_source.items():
            new, duplicates, gaps = self._dedupe(conn, source, items, now)
            result.duplicates += duplicates
            fresh.extend(new)
            for first, last in gaps:
                result.gaps.append((source, first, last))
                fresh.append(self._gap_record(items[0], first, last))
        index = self._tree.size
        rows = []
        for record in fresh:
            row = _row(index, record, now)
            rows.append(row)
            self._tree.append_leaf_hash(row["leaf_hash"])
            index += 1
        if rows:
            self._insert_entries(conn, rows)
        result.accepted = len(rows)
        result.tree_size = self._tree.size
        return result

    def _insert_entries(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """INSERT the rows with the driver's executemany and a statement compiled once
        per dialect: SQLAlchemy's per-execute compile and parameter processing cost
        more than the insert itself for the small batches of concurrent exchanges."""
        compiled = self._compiled_insert.get(conn.dialect.name)
        if compiled is None:
            compiled = insert(audit_entries).compile(
                dialect=conn.dialect, column_keys=list(rows[0])
            )
            self._compiled_insert[conn.dialect.name] = compiled
        order = compiled.positiontup or [] if compiled.positional else None
        params: list[Any] = rows if order is None else [tuple(r[k] for k in order) for r in rows]
        _cursor(conn).executemany(compiled.string, params)

    def _dedupe(
        self, conn: Connection, source: str, items: list[Record], now: float
    ) -> tuple[list[Record], int, list[tuple[int, int]]]:
        cluster = str(items[0].event.get("cluster", ""))
        agent = str(items[0].event["source"].get("agent", ""))[:64]
        state = self._source_state(conn, source, cluster)
        legacy = None if state is not None else self._legacy_state(conn, source, cluster)
        seqs = [r.seq for r in items if r.seq is not None]
        in_range = and_(
            audit_entries.c.cluster == cluster,
            audit_entries.c.seq >= min(seqs),
            audit_entries.c.seq <= max(seqs),
        )
        stored = dict(
            conn.execute(
                select(audit_entries.c.seq, audit_entries.c.leaf_hash).where(
                    audit_entries.c.source == source, in_range
                )
            ).all()
        )
        logged_before: set[int] = set()
        if legacy is not None:  # logged under the spool id alone, before migration 6
            logged_before = set(
                conn.execute(
                    select(audit_entries.c.seq).where(audit_entries.c.source == legacy[0], in_range)
                ).scalars()
            )
        new: list[Record] = []
        duplicates = 0
        seen: set[int] = set()
        for record in sorted(items, key=lambda r: r.seq or 0):
            assert record.seq is not None
            if record.seq in stored or record.seq in seen:
                previous = stored.get(record.seq)
                if previous is not None and bytes(previous) != leaf_hash(record.leaf):
                    raise SequenceConflict(
                        f"source {source} seq {record.seq} is already in the log with different content"
                    )
                duplicates += 1
                continue
            if record.seq in logged_before:
                duplicates += 1
                continue
            seen.add(record.seq)
            new.append(record)
        start = state if state is not None else (legacy[1] if legacy is not None else 1)
        expected = start
        gaps: list[tuple[int, int]] = []
        for record in new:
            assert record.seq is not None
            if record.seq > expected:
                gaps.append((expected, record.seq - 1))
            expected = max(expected, record.seq + 1)
        if gaps:
            conn.execute(
                insert(audit_gaps),
                [
                    {"source": source, "first_seq": a, "last_seq": b, "detected_at": now}
                    for a, b in gaps
                ],
            )
            for a, b in gaps:
                log.error("audit events %d..%d from source %s never arrived", a, b, source)
        if state is None:
            conn.execute(
                insert(audit_sources).values(
                    source=source,
                    cluster=cluster,
                    agent=agent,
                    next_seq=expected,
                    first_seen=now,
                    last_seen=now,
                )
            )
        else:
            conn.execute(
                audit_sources.update()
                .where(audit_sources.c.source == source)
                .values(next_seq=max(expected, start), last_seen=now)
            )
        return new, duplicates, gaps

    def _source_state(self, conn: Connection, source: str, cluster: str) -> int | None:
        """The next seq expected from ``source`` (None: a new source); SourceMismatch if
        the source belongs to another cluster (a bound source never does: its key
        starts with its cluster)."""
        state = conn.execute(
            select(audit_sources.c.cluster, audit_sources.c.next_seq).where(
                audit_sources.c.source == source
            )
        ).first()
        if state is None:
            return None
        if state.cluster != cluster:
            raise SourceMismatch(f"audit source {source} belongs to cluster {state.cluster}")
        return int(state.next_seq)

    def _legacy_state(self, conn: Connection, source: str, cluster: str) -> tuple[str, int] | None:
        """For a new ``CLUSTER/AGENT/SPOOL`` source: the source its spool wrote under
        alone before migration 6 (of the same cluster) and its next seq, so an upgraded
        agent continues its numbering rather than reporting a gap."""
        parts = source.split("/")
        if len(parts) != 3 or parts[0] != cluster:
            return None
        row = conn.execute(
            select(audit_sources.c.cluster, audit_sources.c.next_seq).where(
                audit_sources.c.source == parts[2]
            )
        ).first()
        if row is None or row.cluster != cluster:
            return None
        return parts[2], int(row.next_seq)

    def _gap_record(self, sample: Record, first: int, last: int) -> Record:
        event = ev.new_event(
            ev.AUDIT_GAP,
            source=self.source,
            cluster=sample.event.get("cluster"),
            actor="system",
            detail={
                "source": sample.source,
                "agent": sample.event["source"].get("agent"),
                "first_seq": first,
                "last_seq": last,
                "missing": last - first + 1,
            },
        )
        return record_of(event)

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_now(self) -> str | None:
        """Sign a checkpoint if the log grew since the last one (the periodic task and
        shutdown call this); returns the newest signed note."""
        with self._sequencer(), self.db.engine.begin() as conn:
            _take_sequencer_lock(conn)
            self._catch_up(conn)
            self._checkpoint_or_alarm(conn, force=True)
        return self._last_checkpoint[2] if self._last_checkpoint else None

    def _checkpoint_or_alarm(self, conn: Connection, force: bool) -> None:
        """Sign when due. If the stored log no longer extends the last checkpoint, keep
        accepting events (they are stored) but sign nothing more, and say so loudly:
        ``inconsistent`` shows on /readyz and in the log until an operator acts."""
        try:  # raised before anything is written: the append itself still commits
            self._maybe_checkpoint(conn, force)
        except LogInconsistent as exc:
            if self.inconsistent is None:
                log.critical("%s", exc)
            self.inconsistent = str(exc)

    def _maybe_checkpoint(self, conn: Connection, force: bool) -> None:
        if self._last_checkpoint is None:
            self._load_last_checkpoint(conn)
        size = self._tree.size
        last = self._last_checkpoint
        if last is not None and last[0] >= size:
            return
        if size == 0 and last is None and not force:
            return
        now = time.time()
        if not force and now - self._last_signed_at < self.checkpoint_interval:
            return
        # About to sign: under the sequencer lock the stored checkpoints are final, and
        # another replica may have signed one since this one last looked (signing the
        # same size again would break the checkpoint table's key and the append with it).
        self._load_last_checkpoint(conn)
        last = self._last_checkpoint
        if last is not None and last[0] >= size:
            return
        if last is not None and self._tree.root(last[0]) != last[1]:
            raise LogInconsistent(
                f"the stored log does not extend the checkpoint signed at size {last[0]}; "
                "refusing to sign (run trustmesh audit verify)"
            )
        root = self._tree.root()
        note = sign_checkpoint(Checkpoint(self.origin, size, root), self._key)
        conn.execute(
            insert(audit_checkpoints).values(size=size, root_hash=root, note=note, signed_at=now)
        )
        self._last_checkpoint = (size, root, note)
        self._last_signed_at = now

    def latest_checkpoint(self) -> str:
        """The newest signed note (signing one first if the log has none yet)."""
        with self.db.engine.connect() as conn:
            note = conn.execute(
                select(audit_checkpoints.c.note).order_by(audit_checkpoints.c.size.desc()).limit(1)
            ).scalar()
        if note is None:
            note = self.checkpoint_now()
        assert note is not None
        return str(note)

    def checkpoints(self, after: int = -1, limit: int = MAX_PAGE) -> list[dict[str, Any]]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(audit_checkpoints.c.size, audit_checkpoints.c.note)
                .where(audit_checkpoints.c.size > after)
                .order_by(audit_checkpoints.c.size)
                .limit(min(limit, MAX_PAGE))
            ).all()
        return [{"size": int(r.size), "note": r.note} for r in rows]

    # -- proofs ---------------------------------------------------------------------------
    def _tree_of_size(self, size: int) -> MerkleLog:
        if size > self._tree.size:
            with self._lock, self.db.engine.connect() as conn:
                self._catch_up(conn)
        if size > self._tree.size:
            raise AuditError(f"the log has {self._tree.size} entries, fewer than {size}")
        return self._tree

    def inclusion(self, index: int, size: int) -> list[bytes]:
        if not 0 <= index < size:
            raise AuditError(f"index must be in [0, size): index={index}, size={size}")
        tree = self._tree_of_size(size)
        try:
            return tree.inclusion_proof(index, size)
        except ProofError as exc:
            raise AuditError(str(exc)) from None

    def consistency(self, first: int, second: int) -> list[bytes]:
        if not 0 <= first <= second:
            raise AuditError(f"need 0 <= first <= second: first={first}, second={second}")
        tree = self._tree_of_size(second)
        try:
            return tree.consistency_proof(first, second)
        except ProofError as exc:
            raise AuditError(str(exc)) from None

    # -- reads ----------------------------------------------------------------------------
    def entries(self, start: int, end: int) -> list[dict[str, Any]]:
        if not 0 <= start < end:
            raise AuditError(f"need 0 <= start < end: start={start}, end={end}")
        end = min(end, start + MAX_PAGE)
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(audit_entries.c.idx, audit_entries.c.leaf)
                .where(and_(audit_entries.c.idx >= start, audit_entries.c.idx < end))
                .order_by(audit_entries.c.idx)
            ).all()
        return [entry_json(int(r.idx), r.leaf) for r in rows]

    def query(
        self,
        filters: Mapping[str, str],
        after: int = -1,
        limit: int = 100,
        *,
        descending: bool = False,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Entries matching every filter (column -> value; ``since``/``until`` compare
        times), in log order after index ``after`` (``descending``: newest first, below
        ``after``; -1 there means from the end); returns them and the next cursor.

        The page's indexes are chosen first from the indexes alone (every filter column
        is indexed with ``idx``, migration 18): an equality filter reads one range of its
        index in order and stops at the page's end; a time range is sorted by ``idx``
        inside the index (covering, no table reads). Only the page's rows are read."""
        limit = max(1, min(limit, MAX_PAGE))
        idx = audit_entries.c.idx
        clauses = [idx < after if descending and after >= 0 else idx > after]
        for name, value in filters.items():
            if name == "since":
                clauses.append(audit_entries.c.time >= value)
            elif name == "until":
                clauses.append(audit_entries.c.time < value)
            else:
                clauses.append(audit_entries.c[name] == value)
        order = idx.desc() if descending else idx
        page = select(idx).where(and_(*clauses)).order_by(order).limit(limit + 1)
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(idx, audit_entries.c.leaf).where(idx.in_(page)).order_by(order)
            ).all()
        found = [entry_json(int(r.idx), r.leaf) for r in rows[:limit]]
        return found, (found[-1]["index"] if len(rows) > limit else None)

    def sources(self) -> list[dict[str, Any]]:
        with self.db.engine.connect() as conn:
            states = conn.execute(select(audit_sources).order_by(audit_sources.c.source)).all()
            gaps = conn.execute(select(audit_gaps).order_by(audit_gaps.c.first_seq)).all()
        by_source: dict[str, list[list[int]]] = {}
        for gap in gaps:
            by_source.setdefault(gap.source, []).append([int(gap.first_seq), int(gap.last_seq)])
        return [
            {
                "source": s.source,
                "cluster": s.cluster,
                "agent": s.agent,
                "next_seq": int(s.next_seq),
                "first_seen": s.first_seen,
                "last_seen": s.last_seen,
                "gaps": by_source.get(s.source, []),
            }
            for s in states
        ]


def entry_json(index: int, leaf: str) -> dict[str, Any]:
    raw = leaf.encode("utf-8")
    return {"index": index, "leaf": base64.b64encode(raw).decode(), "event": json.loads(raw)}
