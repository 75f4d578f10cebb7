"""The SPIFFE bundles of the federated trust domains, in the database (DESIGN §9; SPIFFE
Federation §4.2, §6.2): per trust domain the last good bundle, when it was fetched and
last changed, why the last attempt failed, and when to poll next.

* **One poll per trust domain across replicas.** :meth:`FederationStore.claim` takes a
  due poll by moving ``next_refresh_at`` forward with a compare-and-set on the value it
  read; the replica whose update matched polls, the others see a poll not yet due.
* **The last good bundle stays.** A failed attempt records its reason and schedules
  the next one; the stored bundle is replaced only by one that parsed
  (:meth:`FederationStore.succeeded`), and removed only by :meth:`FederationStore.drop`
  once its last good fetch is older than ``maxStale``.
* **Replicas serve from a snapshot** (:class:`FederationSet`), reloaded when the
  ``federation_revision`` counter moves: every good fetch and every drop moves it.

Each change that an audit event describes (a new bundle, a dropped one) runs the
caller's ``on_commit`` inside its transaction, so the event exists if and only if the
change commits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError

from trustmesh.identity.spiffe_bundle import SpiffeBundle
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import federated_bundles

MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class BundleRecord:
    """One federated trust domain's row (times in epoch seconds)."""

    trust_domain: str
    endpoint: str
    bundle: str | None
    """The canonical JSON of the last good bundle; None before one, and once dropped."""
    sequence: int | None
    refresh_hint: float | None
    fetched_at: float | None
    changed_at: float | None
    attempted_at: float | None
    error: str | None
    failures: int
    next_refresh_at: float
    dropped_at: float | None

    def use_until(self, max_stale: float) -> float | None:
        """Until when the bundle may be used: its last good fetch plus ``max_stale``."""
        if self.bundle is None or self.fetched_at is None:
            return None
        return self.fetched_at + max_stale


def _record(row: Any) -> BundleRecord:
    return BundleRecord(**row._mapping)


@dataclass(frozen=True)
class FederationSet:
    """The rows as of one revision of the counter."""

    revision: int = 0
    records: dict[str, BundleRecord] = field(default_factory=dict)


OnCommit = Callable[[Connection, BundleRecord | None, BundleRecord], None]
"""(transaction, the row before, the row after)."""


class FederationStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def load(self) -> FederationSet:
        with self.db.engine.connect() as conn:
            revision = int(meta_store.get(conn, meta_store.FEDERATION_REVISION) or 0)
            rows = conn.execute(select(federated_bundles)).all()
        return FederationSet(revision, {row.trust_domain: _record(row) for row in rows})

    @staticmethod
    def _get(conn: Connection, trust_domain: str) -> BundleRecord | None:
        row = conn.execute(
            select(federated_bundles).where(federated_bundles.c.trust_domain == trust_domain)
        ).first()
        return _record(row) if row is not None else None

    def claim(
        self, trust_domain: str, endpoint: str, now: float, lease: float
    ) -> BundleRecord | None:
        """Take the poll of ``trust_domain`` if it is due at ``now`` (or its endpoint
        changed), holding it ``lease`` seconds; the row as it was, or None when the poll
        is not due or another replica took it."""
        with self.db.engine.begin() as conn:
            current = self._get(conn, trust_domain)
            if current is None:
                values = {
                    "trust_domain": trust_domain,
                    "endpoint": endpoint,
                    "failures": 0,
                    "next_refresh_at": now + lease,
                    "attempted_at": now,
                }
                try:
                    with conn.begin_nested():
                        conn.execute(federated_bundles.insert().values(**values))
                except IntegrityError:
                    return None  # another replica inserted it first, and polls
                return self._get(conn, trust_domain)
            if current.next_refresh_at > now and current.endpoint == endpoint:
                return None
            taken = conn.execute(
                update(federated_bundles)
                .where(
                    federated_bundles.c.trust_domain == trust_domain,
                    federated_bundles.c.next_refresh_at == current.next_refresh_at,
                )
                .values(next_refresh_at=now + lease, attempted_at=now, endpoint=endpoint)
            ).rowcount
            return current if taken == 1 else None

    def succeeded(
        self,
        bundle: SpiffeBundle,
        now: float,
        next_refresh_at: float,
        on_commit: OnCommit | None = None,
    ) -> bool:
        """Store a good fetch of ``bundle``; whether its content changed (``on_commit``
        runs only then, inside the transaction)."""
        canonical = bundle.canonical()
        with self.db.engine.begin() as conn:
            before = self._get(conn, bundle.trust_domain)
            changed = before is None or before.bundle != canonical
            conn.execute(
                update(federated_bundles)
                .where(federated_bundles.c.trust_domain == bundle.trust_domain)
                .values(
                    bundle=canonical,
                    sequence=bundle.sequence,
                    refresh_hint=bundle.refresh_hint,
                    fetched_at=now,
                    changed_at=now if changed else federated_bundles.c.changed_at,
                    error=None,
                    failures=0,
                    next_refresh_at=next_refresh_at,
                    dropped_at=None,
                )
            )
            meta_store.bump(conn, meta_store.FEDERATION_REVISION)
            after = self._get(conn, bundle.trust_domain)
            if changed and on_commit is not None and after is not None:
                on_commit(conn, before, after)
        return changed

    def failed(self, trust_domain: str, error: str, next_refresh_at: float) -> None:
        """Record why an attempt failed; the stored bundle stays."""
        with self.db.engine.begin() as conn:
            conn.execute(
                update(federated_bundles)
                .where(federated_bundles.c.trust_domain == trust_domain)
                .values(
                    error=error[:MAX_ERROR_CHARS],
                    failures=federated_bundles.c.failures + 1,
                    next_refresh_at=next_refresh_at,
                )
            )

    def drop(self, record: BundleRecord, now: float, on_commit: OnCommit | None = None) -> bool:
        """Drop the bundle of ``record`` (as read: a fetch since then keeps it); whether
        this call dropped it. ``on_commit`` sees the row as it was just before."""
        with self.db.engine.begin() as conn:
            before = self._get(conn, record.trust_domain)
            dropped = conn.execute(
                update(federated_bundles)
                .where(
                    federated_bundles.c.trust_domain == record.trust_domain,
                    federated_bundles.c.bundle.is_not(None),
                    federated_bundles.c.fetched_at == record.fetched_at,
                )
                .values(bundle=None, dropped_at=now)
            ).rowcount
            if dropped != 1:
                return False
            meta_store.bump(conn, meta_store.FEDERATION_REVISION)
            after = self._get(conn, record.trust_domain)
            if on_commit is not None and after is not None:
                on_commit(conn, before, after)
        return True
