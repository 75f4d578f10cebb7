"""The revocation list in the database (DESIGN §5): one row per revocation, numbered by
the ``revocation_revision`` counter so agents can resume with ``since=R``. Rows whose
``expires_at`` has passed cover no valid token and are deleted by maintenance."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, delete, select

from trustmesh.identity.keys import MAX_TOKEN_TTL
from trustmesh.revocation import Revocation, RevocationSet, revocation_expiry
from trustmesh.revocation.model import check_request, whole_second
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import revocations


def entry_of_row(row: Any) -> Revocation:
    """A ``revocations`` row as a Revocation."""
    return Revocation(
        revision=row.revision,
        kind=row.kind,
        value=row.value,
        revoked_at=row.revoked_at,
        expires_at=row.expires_at,
        reason=row.reason,
        actor=row.actor,
        published_at=row.published_at,
    )


class RevocationStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def current_revision(self, conn: Connection | None = None) -> int:
        if conn is None:
            with self.db.engine.connect() as own:
                return self.current_revision(own)
        return int(meta_store.get(conn, meta_store.REVOCATION_REVISION) or 0)

    def revoke(
        self,
        kind: str,
        value: str,
        reason: str,
        actor: str,
        now: float | None = None,
        on_commit: Callable[[Connection, Revocation], None] | None = None,
        lifetime: float = MAX_TOKEN_TTL,
    ) -> tuple[Revocation, bool]:
        """Record a revocation; returns (entry, created). Repeating a revocation is
        idempotent: the same jti or key, or the same subject or cluster within the same
        second, returns the entry in force; a later subject or cluster revocation
        replaces the earlier one (it covers more tokens). ``on_commit`` runs inside the
        transaction of a new entry (the audit event is written with it). ``lifetime``:
        the longest lifetime of a token the entry covers (a federated trust domain's
        SPIFFE ID: longer than ours), which is how long the entry lives (plus skew)."""
        with self.db.engine.begin() as conn:
            entry, created = self.revoke_in(
                conn, kind, value, reason, actor, now, lifetime=lifetime
            )
            if created and on_commit is not None:
                on_commit(conn, entry)
            return entry, created

    def revoke_in(
        self,
        conn: Connection,
        kind: str,
        value: str,
        reason: str,
        actor: str,
        now: float | None = None,
        supersede: bool = False,
        lifetime: float = MAX_TOKEN_TTL,
    ) -> tuple[Revocation, bool]:
        """:meth:`revoke` inside the caller's transaction (a suspension revokes what
        was issued in the transaction that records it). With ``supersede``, a subject or
        cluster revocation of this same second does not stand in for this one: tokens
        issued after it (their ``iat`` moved past it) must be covered too, so the new
        entry's cut-off is the second after it."""
        check_request(kind, value, reason)
        now = time.time() if now is None else now
        revoked_at = whole_second(now)
        existing = conn.execute(
            select(revocations)
            .where(
                revocations.c.kind == kind,
                revocations.c.value == value,
                revocations.c.expires_at > now,
            )
            .order_by(revocations.c.revision.desc())
            .limit(1)
        ).first()
        if existing is not None and (kind in ("jti", "key") or existing.revoked_at >= revoked_at):
            if not supersede or kind in ("jti", "key"):
                return entry_of_row(existing), False
            revoked_at = existing.revoked_at + 1
        revision = meta_store.bump(conn, meta_store.REVOCATION_REVISION)
        entry = Revocation(
            revision=revision,
            kind=kind,
            value=value,
            revoked_at=revoked_at,
            expires_at=revocation_expiry(revoked_at, lifetime),
            reason=reason,
            actor=actor,
            published_at=now,
        )
        conn.execute(revocations.insert().values(**entry.to_json()))
        return entry, True

    def since(self, revision: int, now: float | None = None) -> tuple[int, list[Revocation]]:
        """(current revision, entries in force added after ``revision``)."""
        now = time.time() if now is None else now
        with self.db.engine.connect() as conn:
            current = self.current_revision(conn)
            rows = conn.execute(
                select(revocations)
                .where(revocations.c.revision > revision, revocations.c.expires_at > now)
                .order_by(revocations.c.revision)
            )
            return current, [entry_of_row(r) for r in rows]

    def load(self) -> RevocationSet:
        current, entries = self.since(0)
        loaded = RevocationSet(entries)
        loaded.revision = current
        return loaded

    def remove_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self.db.engine.begin() as conn:
            return int(
                conn.execute(delete(revocations).where(revocations.c.expires_at <= now)).rowcount
            )
