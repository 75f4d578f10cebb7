"""Onboarding from refusals and the last use of identities (DESIGN §11).

Two records, both kept in the database so every replica sees the same:

- **Pending service accounts** (``pending_accounts``): each verified service account
  refused with ``unauthorized_client`` because no Workload selects it and no
  WorkloadTemplate matches it — at the token endpoint or at ``POST /v1/x509-svid`` —
  with a count and when it was first and last seen. ``trustmesh get pending`` lists
  them, and prints the Workload that would admit each. A row leaves when a Workload or
  a WorkloadTemplate admits its service account — deleted by the apply that writes it,
  in its transaction, and checked again against the registry in force at every read
  and every 30 s (:func:`admitted`, the exchange's own resolution) — or after
  :data:`PENDING_RETENTION` without a refusal.
- **Last use** (``identity_usage``), keyed by SPIFFE ID (and the Workload, when the
  credential was issued for an explicit one; a template-derived identity's row names
  none): when the identity last received a credential
  (JWT-SVID or X.509-SVID) and when it was last seen in an agent's ``authz.decision``
  event, as the agents ship them.

Bounds. Anyone holding a valid SA token of a registered cluster could invent service
accounts to fill the pending list; so at most :data:`PENDING_PER_CLUSTER` rows per
cluster and :data:`PENDING_TOTAL` in all are kept: a refusal of a service account not
yet listed is dropped once its cluster (or the whole list) is full — counted in
``trustmesh_pending_dropped_total`` and in ``get pending``'s answer — while rows
already listed keep counting. Replicas check the caps each at its own flush, so
together they may overshoot by what one flush of each carries, never more.

Cost on the hot path. An exchange or a signed certificate only assigns into a
dictionary in memory; a refusal likewise. Each replica writes what it gathered every
``flush_interval`` seconds (default 2 s) in one transaction — one row per identity
however many tokens it received — and once more when it stops. So a replica killed
with ``kill -9`` loses at most the last interval's last-use times, never a credential
or an audit event; the last-use times are an operational record, the audit log stays
the evidence."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, case, delete, func, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from trustmesh.audit.canonical import parse_time
from trustmesh.audit.events import AUTHZ_DECISION
from trustmesh.common.clock import Clock
from trustmesh.common.errors import CanonicalError
from trustmesh.common.limits import DEFAULT_PENDING_PER_CLUSTER, DEFAULT_PENDING_TOTAL
from trustmesh.manifests import API_VERSION
from trustmesh.registry import Registry
from trustmesh.storage import Database
from trustmesh.storage.schema import identity_usage, pending_accounts

log = logging.getLogger("trustmesh.server")

DEFAULT_FLUSH_INTERVAL = 2.0
PENDING_PER_CLUSTER = DEFAULT_PENDING_PER_CLUSTER
PENDING_TOTAL = DEFAULT_PENDING_TOTAL
PENDING_RETENTION = 30 * 86400.0  # a pending row not refused again for this long leaves
MAX_BUFFERED = 50_000  # keys one replica gathers between two flushes, of each kind
PRUNE_INTERVAL = 30.0
_CHUNK = 500

JWT_SVID = "jwt-svid"
X509_SVID = "x509-svid"

Account = tuple[str, str, str]  # (cluster, namespace, service account)


def admitted(registry: Registry, cluster: str, namespace: str, service_account: str) -> bool:
    """Whether the registry gives this service account an identity — a Workload that
    selects it, or the WorkloadTemplate that matches it (what the exchange resolves): the
    one rule that clears a pending row."""
    return registry.resolve(cluster, namespace, service_account) is not None


def suggested_name(cluster: str, namespace: str, service_account: str) -> str:
    """A Workload name (a DNS-1123 label) for a pending service account:
    ``CLUSTER-NAMESPACE-SA``, dots made dashes; when longer than 63 characters, cut and
    ended with 8 hex digits of its SHA-256 so two long names stay apart."""
    full = f"{cluster}-{namespace}-{service_account.replace('.', '-')}"
    if len(full) <= 63:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return f"{full[:54].rstrip('-')}-{digest}"


@dataclass(frozen=True)
class PendingAccount:
    cluster: str
    namespace: str
    service_account: str
    count: int
    first_seen: float
    last_seen: float

    def manifest(self) -> dict[str, Any]:
        """The Workload that would admit this service account (``trustmesh apply``
        takes it as printed; claims are left for the operator to add)."""
        return {
            "apiVersion": API_VERSION,
            "kind": "Workload",
            "metadata": {
                "name": suggested_name(self.cluster, self.namespace, self.service_account)
            },
            "spec": {
                "selector": {
                    "cluster": self.cluster,
                    "namespace": self.namespace,
                    "serviceAccount": self.service_account,
                }
            },
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "namespace": self.namespace,
            "serviceAccount": self.service_account,
            "count": self.count,
            "firstSeen": self.first_seen,
            "lastSeen": self.last_seen,
            "manifest": self.manifest(),
        }


@dataclass(frozen=True)
class Usage:
    spiffe_id: str
    workload: str | None
    last_credential_at: float | None
    last_credential_kind: str | None
    last_decision_at: float | None
    last_decision_cluster: str | None

    @property
    def last_used(self) -> float | None:
        times = [t for t in (self.last_credential_at, self.last_decision_at) if t is not None]
        return max(times) if times else None

    def to_json(self) -> dict[str, Any]:
        return {
            "lastCredentialAt": self.last_credential_at,
            "lastCredentialKind": self.last_credential_kind,
            "lastDecisionAt": self.last_decision_at,
            "lastDecisionCluster": self.last_decision_cluster,
        }


NO_USAGE = Usage("", None, None, None, None, None)


@dataclass
class _Credential:
    workload: str | None
    at: float
    kind: str


@dataclass
class _Refused:
    count: int
    first: float
    last: float


@dataclass
class Batch:
    """What one replica gathered between two flushes."""

    credentials: dict[str, _Credential]
    decisions: dict[str, tuple[float, str]]
    refused: dict[Account, _Refused]

    def __len__(self) -> int:
        return len(self.credentials) + len(self.decisions) + len(self.refused)


def _later(column: Any, new: Any) -> ColumnElement[Any]:
    """The later of a stored time and a new one, either possibly NULL."""
    return case(
        (new.is_(None), column),
        (column.is_(None), new),
        (new > column, new),
        else_=column,
    )


def _newer(stored_at: Any, new_at: Any, column: Any, new: Any) -> ColumnElement[Any]:
    """``new`` when ``new_at`` is later than ``stored_at``, else the stored ``column``."""
    return case(
        (new_at.is_(None), column),
        (stored_at.is_(None), new),
        (new_at > stored_at, new),
        else_=column,
    )


class UsageTracker:
    """The replica's side: cheap notes on the hot path, a periodic flush, and the reads
    behind ``get pending``, ``get workloads`` and ``report stale``."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        registry: Callable[[], Registry],
        trust_domain: str,
        *,
        per_cluster: int = PENDING_PER_CLUSTER,
        total: int = PENDING_TOTAL,
        retention: float = PENDING_RETENTION,
    ) -> None:
        self.db = db
        self.clock = clock
        self.registry = registry
        self.per_cluster = per_cluster
        self.total = total
        self.retention = retention
        self._prefix = f"spiffe://{trust_domain}/"
        self._batch = Batch({}, {}, {})
        self.dropped = 0  # pending refusals not recorded: a cap or the buffer was full
        self.failures = 0
        self._pruned_at = 0.0

    # -- the hot path: memory only -------------------------------------------------------
    def credential(self, spiffe_id: str, workload: str | None, kind: str, at: float) -> None:
        credentials = self._batch.credentials
        note = credentials.get(spiffe_id)
        if note is not None:
            note.at, note.kind, note.workload = at, kind, workload
        elif len(credentials) < MAX_BUFFERED:
            credentials[spiffe_id] = _Credential(workload, at, kind)

    def refused(self, cluster: str, namespace: str, service_account: str, at: float) -> None:
        refused = self._batch.refused
        key = (cluster, namespace, service_account)
        note = refused.get(key)
        if note is not None:
            note.count += 1
            note.last = at
        elif len(refused) < MAX_BUFFERED:
            refused[key] = _Refused(1, at, at)
        else:
            self.dropped += 1

    def decisions(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Note the identities of ``authz.decision`` events an agent shipped: those
        with a verified identity of our trust domain (``actor`` is its SPIFFE ID). The
        event's time counts, never later than now. Runs on the event loop, where the
        other notes are taken: per event only comparisons — canonical times are
        fixed-width RFC 3339 UTC, so they order as strings — and one time parsed per
        identity in the batch."""
        latest: dict[str, tuple[str, Any]] = {}
        for event in events:
            if event.get("type") != AUTHZ_DECISION:
                continue
            actor = event.get("actor")
            identity = event.get("identity")
            if (
                not isinstance(actor, str)
                or not actor.startswith(self._prefix)
                or not isinstance(identity, dict)
                or identity.get("spiffe_id") != actor
            ):
                continue
            at = event.get("time")
            if not isinstance(at, str):
                continue
            known = latest.get(actor)
            if known is None or at > known[0]:
                latest[actor] = (at, event.get("cluster"))
        if not latest:
            return
        now = self.clock()
        seen = self._batch.decisions
        for actor, (text, cluster) in latest.items():
            try:
                when = min(parse_time(text).timestamp(), now)
            except CanonicalError:
                continue
            previous = seen.get(actor)
            if previous is None:
                if len(seen) < MAX_BUFFERED:
                    seen[actor] = (when, str(cluster or ""))
            elif when > previous[0]:
                seen[actor] = (when, str(cluster or ""))

    # -- flushing ---------------------------------------------------------------------------
    def take(self) -> Batch:
        """Hand over what was gathered (called on the event loop, where the notes are
        taken, so none is lost in between)."""
        batch, self._batch = self._batch, Batch({}, {}, {})
        return batch

    def give_back(self, batch: Batch) -> None:
        """A flush that failed: its notes join the next batch (bounded as ever)."""
        for spiffe_id, note in batch.credentials.items():
            known = self._batch.credentials.get(spiffe_id)
            if known is None or note.at > known.at:
                self.credential(spiffe_id, note.workload, note.kind, note.at)
        for spiffe_id, (at, cluster) in batch.decisions.items():
            known_decision = self._batch.decisions.get(spiffe_id)
            if known_decision is None and len(self._batch.decisions) >= MAX_BUFFERED:
                continue
            if known_decision is None or at > known_decision[0]:
                self._batch.decisions[spiffe_id] = (at, cluster)
        for key, refused in batch.refused.items():
            known_refused = self._batch.refused.get(key)
            if known_refused is None:
                if len(self._batch.refused) < MAX_BUFFERED:
                    self._batch.refused[key] = refused
                else:
                    self.dropped += refused.count
            else:
                known_refused.count += refused.count
                known_refused.first = min(known_refused.first, refused.first)
                known_refused.last = max(known_refused.last, refused.last)

    def write(self, batch: Batch) -> None:
        """Write ``batch`` in one transaction (run off the event loop)."""
        now = self.clock()
        if not batch and now - self._pruned_at < PRUNE_INTERVAL:
            return
        with self.db.engine.begin() as conn:
            if batch.credentials or batch.decisions:
                self._write_usage(conn, batch)
            if batch.refused:
                self._write_pending(conn, batch.refused)
            if now - self._pruned_at >= PRUNE_INTERVAL:
                self._prune(conn, now)
        if now - self._pruned_at >= PRUNE_INTERVAL:
            self._pruned_at = now

    def _insert(self, conn: Connection, table: Any) -> Any:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    def _write_usage(self, conn: Connection, batch: Batch) -> None:
        rows: dict[str, dict[str, Any]] = {}
        for spiffe_id, note in batch.credentials.items():
            rows[spiffe_id] = {
                "spiffe_id": spiffe_id,
                "workload": note.workload,
                "last_credential_at": note.at,
                "last_credential_kind": note.kind,
                "last_decision_at": None,
                "last_decision_cluster": None,
            }
        for spiffe_id, (at, cluster) in batch.decisions.items():
            row = rows.setdefault(
                spiffe_id,
                {
                    "spiffe_id": spiffe_id,
                    "workload": None,
                    "last_credential_at": None,
                    "last_credential_kind": None,
                },
            )
            row["last_decision_at"] = at
            row["last_decision_cluster"] = cluster
        table = identity_usage
        statement = self._insert(conn, table)
        new = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.spiffe_id],
            set_={
                "workload": _newer(
                    table.c.last_credential_at,
                    new.last_credential_at,
                    table.c.workload,
                    new.workload,
                ),
                "last_credential_kind": _newer(
                    table.c.last_credential_at,
                    new.last_credential_at,
                    table.c.last_credential_kind,
                    new.last_credential_kind,
                ),
                "last_credential_at": _later(table.c.last_credential_at, new.last_credential_at),
                "last_decision_cluster": _newer(
                    table.c.last_decision_at,
                    new.last_decision_at,
                    table.c.last_decision_cluster,
                    new.last_decision_cluster,
                ),
                "last_decision_at": _later(table.c.last_decision_at, new.last_decision_at),
            },
        )
        values = sorted(rows.values(), key=lambda r: r["spiffe_id"])  # one lock order
        for start in range(0, len(values), _CHUNK):
            conn.execute(statement, values[start : start + _CHUNK])

    def _write_pending(self, conn: Connection, refused: dict[Account, _Refused]) -> None:
        table = pending_accounts
        keys = sorted(refused)
        present: set[Account] = set()
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            present.update(
                (r.cluster, r.namespace, r.service_account)
                for r in conn.execute(
                    select(table.c.cluster, table.c.namespace, table.c.service_account).where(
                        tuple_(table.c.cluster, table.c.namespace, table.c.service_account).in_(
                            chunk
                        )
                    )
                )
            )
        per_cluster: dict[str, int] = {
            str(cluster): int(count)
            for cluster, count in conn.execute(
                select(table.c.cluster, func.count()).group_by(table.c.cluster)
            ).all()
        }
        total = sum(per_cluster.values())
        rows = []
        for key in keys:
            note = refused[key]
            if key not in present:
                cluster = key[0]
                if total >= self.total or per_cluster.get(cluster, 0) >= self.per_cluster:
                    self.dropped += note.count
                    continue
                total += 1
                per_cluster[cluster] = per_cluster.get(cluster, 0) + 1
            rows.append(
                {
                    "cluster": key[0],
                    "namespace": key[1],
                    "service_account": key[2],
                    "count": note.count,
                    "first_seen": note.first,
                    "last_seen": note.last,
                }
            )
        if not rows:
            return
        statement = self._insert(conn, table)
        new = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.cluster, table.c.namespace, table.c.service_account],
            set_={
                "count": table.c.count + new.count,
                "first_seen": case(
                    (new.first_seen < table.c.first_seen, new.first_seen),
                    else_=table.c.first_seen,
                ),
                "last_seen": _later(table.c.last_seen, new.last_seen),
            },
        )
        for start in range(0, len(rows), _CHUNK):
            conn.execute(statement, rows[start : start + _CHUNK])

    def _prune(self, conn: Connection, now: float) -> None:
        """Rows not refused for ``retention`` leave; so do rows a Workload now admits."""
        table = pending_accounts
        conn.execute(delete(table).where(table.c.last_seen < now - self.retention))
        self.clear_admitted_in(conn, self.registry())

    def clear_admitted_in(self, conn: Connection, registry: Registry) -> None:
        """Delete the rows ``registry`` admits, in the caller's transaction (an apply
        calls it with the registry it writes, so no replica lists them afterwards)."""
        table = pending_accounts
        rows = conn.execute(
            select(table.c.cluster, table.c.namespace, table.c.service_account)
        ).all()
        gone = [tuple(r) for r in rows if admitted(registry, *r)]
        for start in range(0, len(gone), _CHUNK):
            conn.execute(
                delete(table).where(
                    tuple_(table.c.cluster, table.c.namespace, table.c.service_account).in_(
                        gone[start : start + _CHUNK]
                    )
                )
            )

    # -- reads ------------------------------------------------------------------------------
    def pending(self) -> list[PendingAccount]:
        """The pending service accounts, most recently refused first; those a Workload
        admits by now are deleted first (the refusal is history, not a to-do)."""
        table = pending_accounts
        with self.db.engine.begin() as conn:
            self.clear_admitted_in(conn, self.registry())
            rows = conn.execute(
                select(table).order_by(
                    table.c.last_seen.desc(),
                    table.c.cluster,
                    table.c.namespace,
                    table.c.service_account,
                )
            ).all()
        return [
            PendingAccount(
                r.cluster,
                r.namespace,
                r.service_account,
                int(r._mapping["count"]),  # a Row's own .count is tuple.count
                r.first_seen,
                r.last_seen,
            )
            for r in rows
        ]

    def usage(self, spiffe_ids: Iterable[str]) -> dict[str, Usage]:
        """The stored last use of each of ``spiffe_ids`` that has any."""
        wanted = sorted(set(spiffe_ids))
        found: dict[str, Usage] = {}
        table = identity_usage
        with self.db.engine.connect() as conn:
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                for r in conn.execute(select(table).where(table.c.spiffe_id.in_(chunk))):
                    found[r.spiffe_id] = Usage(
                        r.spiffe_id,
                        r.workload,
                        r.last_credential_at,
                        r.last_credential_kind,
                        r.last_decision_at,
                        r.last_decision_cluster,
                    )
        return found
