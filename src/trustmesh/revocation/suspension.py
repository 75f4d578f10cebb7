"""Suspension (DESIGN §5): a state, where a revocation is a cut-off in time.

While a workload, a SPIFFE ID or a cluster is suspended, no credential of any kind is
issued for it: the token exchange (JWT-SVIDs) asks :meth:`SuspensionSet.check` before
it signs, and every other issuer (X.509-SVIDs, later) must ask the same, so there is one
rule. What was issued before was revoked in the transaction that began the suspension
(``server/suspensions.py``); ``trustmesh resume`` ends the state and leaves that
revocation in place, so credentials issued after the resume are valid and the earlier
ones stay revoked.

Three kinds: ``workload`` (by name), ``subject`` (a SPIFFE ID) and ``cluster`` (every
workload whose service-account token comes from that cluster). The set is an immutable
snapshot each control-plane replica swaps when ``suspension_revision`` moves, so the
check is three dictionary lookups and never reads the database."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, select

from trustmesh.common.errors import InvalidRequest, SubjectSuspended, WorkloadRetired
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import suspensions

KINDS = ("workload", "subject", "cluster")
RETIREMENT_ACTOR = "trustmesh:retirement"
"""The actor of a Workload's retirement (DESIGN §11, ``server/retirement.py``): a
suspension of kind ``workload`` that an apply of its manifest ends, as ``trustmesh
resume`` ends any other."""
MAX_REASON = 1000
_WHAT = {"workload": "workload", "subject": "SPIFFE ID", "cluster": "cluster"}


@dataclass(frozen=True, slots=True)
class Suspension:
    kind: str
    value: str
    reason: str
    actor: str
    suspended_at: float

    def describe(self) -> str:
        return f"{_WHAT[self.kind]} {self.value}"

    @property
    def retired(self) -> bool:
        return self.kind == "workload" and self.actor == RETIREMENT_ACTOR

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "reason": self.reason,
            "actor": self.actor,
            "suspended_at": self.suspended_at,
            "retired": self.retired,
        }


def check_reason(reason: str) -> str:
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise InvalidRequest(f"reason must be a string of at most {MAX_REASON} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in reason):
        raise InvalidRequest("reason must not contain control characters")
    return reason


class SuspensionSet:
    """The suspensions in force, indexed by (kind, value)."""

    def __init__(self, entries: Iterable[Suspension] = (), revision: int = 0) -> None:
        self.revision = revision
        self._by_key = {(s.kind, s.value): s for s in entries}

    def get(self, kind: str, value: str) -> Suspension | None:
        return self._by_key.get((kind, value))

    def covering(self, *, workload: str | None, spiffe_id: str, cluster: str) -> Suspension | None:
        """The suspension that stops credentials for this subject, if any."""
        keys = [("subject", spiffe_id), ("cluster", cluster)]
        if workload is not None:
            keys.insert(0, ("workload", workload))
        for key in keys:
            found = self._by_key.get(key)
            if found is not None:
                return found
        return None

    def check(self, *, workload: str | None, spiffe_id: str, cluster: str) -> None:
        """Raise SubjectSuspended if no credential may be issued for this subject. The
        caller is told what is suspended, never the administrator's reason."""
        found = self.covering(workload=workload, spiffe_id=spiffe_id, cluster=cluster)
        if found is None:
            return
        if found.retired:
            raise WorkloadRetired(
                f"workload {found.value} was retired ({found.reason}): no credential is "
                "issued for it until its manifest is applied again"
            )
        origin = " (the service account's cluster)" if found.kind == "cluster" else ""
        raise SubjectSuspended(
            f"{found.describe()}{origin} is suspended: no credential is issued for it until "
            "an administrator resumes it"
        )

    def entries(self) -> list[Suspension]:
        return sorted(self._by_key.values(), key=lambda s: (s.suspended_at, s.kind, s.value))

    def __len__(self) -> int:
        return len(self._by_key)


def _of_row(row: Any) -> Suspension:
    return Suspension(
        kind=row.kind,
        value=row.value,
        reason=row.reason,
        actor=row.actor,
        suspended_at=row.created_at,
    )


class SuspensionStore:
    """The ``suspensions`` table; writes run inside the caller's transaction, which
    also revokes what was issued and stages the audit events."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def load(self) -> SuspensionSet:
        with self.db.engine.connect() as conn:
            revision = int(meta_store.get(conn, meta_store.SUSPENSION_REVISION) or 0)
            rows = conn.execute(select(suspensions)).all()
        return SuspensionSet([_of_row(r) for r in rows], revision)

    def get_in(self, conn: Connection, kind: str, value: str) -> Suspension | None:
        """The suspension of (kind, value) as the caller's transaction sees it."""
        row = conn.execute(
            select(suspensions).where(suspensions.c.kind == kind, suspensions.c.value == value)
        ).first()
        return None if row is None else _of_row(row)

    def suspend_in(
        self,
        conn: Connection,
        kind: str,
        value: str,
        reason: str,
        actor: str,
        now: float | None = None,
    ) -> tuple[Suspension, bool]:
        """Begin a suspension; returns it and whether it is new (suspending what is
        suspended already returns the suspension in force, unchanged)."""
        if kind not in KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}")
        check_reason(reason)
        existing = self.get_in(conn, kind, value)
        if existing is not None:
            return existing, False
        suspension = Suspension(kind, value, reason, actor, time.time() if now is None else now)
        conn.execute(
            suspensions.insert().values(
                kind=kind,
                value=value,
                reason=reason,
                actor=actor,
                created_at=suspension.suspended_at,
            )
        )
        meta_store.bump(conn, meta_store.SUSPENSION_REVISION)
        return suspension, True

    def resume_in(self, conn: Connection, kind: str, value: str) -> Suspension | None:
        """End a suspension; returns the one ended, or None if there was none."""
        existing = self.get_in(conn, kind, value)
        if existing is None:
            return None
        conn.execute(
            delete(suspensions).where(suspensions.c.kind == kind, suspensions.c.value == value)
        )
        meta_store.bump(conn, meta_store.SUSPENSION_REVISION)
        return existing
