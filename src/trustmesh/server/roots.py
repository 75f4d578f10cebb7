"""CA root rotation on evidence (DESIGN §9): who holds which root, and when a prepared
root may become active.

Holders report the roots they hold, by SHA-256 fingerprint (of the DER):

* an **agent** with every key sync (``POST /v1/agent/roots``, its cluster credential
  names it); it is forgotten :data:`AGENT_FORGET_AFTER` seconds after its last report
  (it reports at least every 30 s);
* a **sidecar** with each ``POST /v1/x509-svid`` that carries ``bundle_sha256`` (a
  trustmesh extension), keyed by its pod (the SA token's ``kubernetes.io.pod.uid``);
  it is forgotten when it has not renewed within twice the lifetime of the certificate
  it got. A sidecar that sends no ``bundle_sha256`` does not report and is not waited
  for.

A prepared root becomes active (``trustmesh keys rotate --ca``; automatically once the
active root is older than ``--ca-rotation-interval``) only when every holder that
reports in holds it; otherwise the rotation is refused with 409 naming the laggards,
unless forced. Automatic rotation never forces, except for a root that would expire
within :data:`EXPIRY_MARGIN` (evidence cannot keep a root valid). Each rotation stages
a ``key.rotated`` event (``detail.kind: x509-ca``) in its own transaction; roots nothing
valid can chain to leave the bundle with ``admin.ca_roots_removed``.

A replica writes a holder's report only when it changed or its row is getting old, so
the SVID path touches the database for it about once per renewal."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.exc import IntegrityError

from trustmesh.audit import events as ev
from trustmesh.common.clock import Clock
from trustmesh.common.errors import Conflict
from trustmesh.identity.keys import PREPARED
from trustmesh.identity.x509ca import CaManager, RootRecord
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.snapshots import Snapshots
from trustmesh.storage import Database
from trustmesh.storage.schema import root_holders

log = logging.getLogger("trustmesh.server")

AGENT = "agent"
SIDECAR = "sidecar"
AGENT_REPORT_INTERVAL = 30.0  # an agent reports at least this often
AGENT_FORGET_AFTER = 3 * AGENT_REPORT_INTERVAL
EXPIRY_MARGIN = 30 * 86400.0  # an active root closer than this to expiry rotates anyway
MAX_REMEMBERED_WRITES = 100_000  # a replica's memory of what it wrote, per holder
MAX_NAMED_LAGGARDS = 10


@dataclass(frozen=True)
class Holder:
    kind: str
    cluster: str
    holder: str  # agent id or pod uid
    roots: tuple[str, ...]
    subject: str | None
    reported_at: float
    forget_after: float

    def describe(self) -> str:
        if self.kind == AGENT:
            return f"agent {self.holder} of cluster {self.cluster}"
        who = f" ({self.subject})" if self.subject else ""
        return f"sidecar of pod {self.holder}{who} in cluster {self.cluster}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cluster": self.cluster,
            "holder": self.holder,
            "roots": list(self.roots),
            "subject": self.subject,
            "reportedAt": self.reported_at,
            "forgetAfter": self.forget_after,
        }


def _holder(row: Any) -> Holder:
    return Holder(
        kind=row.kind,
        cluster=row.cluster,
        holder=row.holder,
        roots=tuple(json.loads(row.roots)),
        subject=row.subject,
        reported_at=row.reported_at,
        forget_after=row.forget_after,
    )


class RootHolders:
    """The ``root_holders`` table: the last report of each holder."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock
        self._written: dict[tuple[str, str, str], tuple[tuple[str, ...], float]] = {}

    def report(
        self,
        kind: str,
        cluster: str,
        holder: str,
        roots: Iterable[str],
        keep_for: float,
        subject: str | None = None,
    ) -> None:
        """Record that ``holder`` holds ``roots`` now; it counts for ``keep_for`` s."""
        now = self.clock()
        held = tuple(sorted(set(roots)))
        key = (kind, cluster, holder)
        last = self._written.get(key)
        if last is not None and last[0] == held and now - last[1] < keep_for / 4:
            return  # unchanged, and the stored row counts for a while yet
        values = {
            "roots": json.dumps(list(held)),
            "subject": subject,
            "reported_at": now,
            "forget_after": now + keep_for,
        }
        where = (
            root_holders.c.kind == kind,
            root_holders.c.cluster == cluster,
            root_holders.c.holder == holder,
        )
        try:
            with self.db.engine.begin() as conn:
                if conn.execute(update(root_holders).where(*where).values(**values)).rowcount == 0:
                    conn.execute(
                        root_holders.insert().values(
                            kind=kind, cluster=cluster, holder=holder, **values
                        )
                    )
        except IntegrityError:  # another replica inserted it a moment ago
            with self.db.engine.begin() as conn:
                conn.execute(update(root_holders).where(*where).values(**values))
        if len(self._written) >= MAX_REMEMBERED_WRITES:
            self._written.clear()
        self._written[key] = (held, now)

    def current(self, now: float | None = None) -> list[Holder]:
        """Holders that still count, by cluster, kind and id."""
        now = self.clock() if now is None else now
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(root_holders)
                .where(root_holders.c.forget_after > now)
                .order_by(root_holders.c.cluster, root_holders.c.kind, root_holders.c.holder)
            )
            return [_holder(row) for row in rows]

    def forget_expired(self, now: float) -> int:
        with self.db.engine.begin() as conn:
            return conn.execute(
                delete(root_holders).where(root_holders.c.forget_after <= now)
            ).rowcount

    def laggards(self, root_id: str, now: float | None = None) -> list[Holder]:
        """Holders that report in but do not hold ``root_id``."""
        return [h for h in self.current(now) if root_id not in h.roots]


class CaRotation:
    """Rotates the CA root when the evidence allows (or when forced)."""

    def __init__(
        self,
        ca: CaManager,
        holders: RootHolders,
        snapshots: Snapshots,
        recorder: AuditRecorder,
        interval: float,
        clock: Clock,
    ) -> None:
        self.ca = ca
        self.holders = holders
        self.snapshots = snapshots
        self.recorder = recorder
        self.interval = interval
        self.clock = clock

    def _prepared(self) -> RootRecord:
        prepared = next((r for r in self.ca.list_roots() if r.state == PREPARED), None)
        if prepared is None:
            raise Conflict("there is no prepared CA root to activate")
        return prepared

    def status(self) -> dict[str, Any]:
        """The roots, the prepared root the next rotation activates, every holder that
        counts and which of them lag (``GET /v1/ca``)."""
        now = self.clock()
        roots = self.ca.list_roots()
        prepared = next((r for r in roots if r.state == PREPARED), None)
        holders = self.holders.current(now)
        lagging = [h for h in holders if prepared is not None and prepared.id not in h.roots]
        return {
            "roots": [r.to_json() for r in roots],
            "prepared": prepared.id if prepared else None,
            "holders": [h.to_json() for h in holders],
            "laggards": [h.to_json() for h in lagging],
        }

    def cluster_status(self, status: dict[str, Any], cluster: str) -> dict[str, Any]:
        """``status.caRoots`` of a Cluster: its holders that report in and the laggards."""
        holders = [h for h in status["holders"] if h["cluster"] == cluster]
        lagging = [h for h in status["laggards"] if h["cluster"] == cluster]
        return {
            "prepared": status["prepared"],
            "holdersReporting": len(holders),
            "lagging": [_name(h) for h in lagging],
        }

    def rotate(self, actor: str, force: bool = False) -> RootRecord:
        """Activate the prepared root; refused (409, naming the laggards) while any
        holder that reports in does not hold it, unless ``force``."""
        now = self.clock()
        prepared = self._prepared()
        lagging = self.holders.laggards(prepared.id, now)
        if lagging and not force:
            named = ", ".join(h.describe() for h in lagging[:MAX_NAMED_LAGGARDS])
            more = len(lagging) - MAX_NAMED_LAGGARDS
            if more > 0:
                named += f" and {more} more"
            raise Conflict(
                f"the prepared CA root {prepared.id[:16]} is not yet held by {named}: wait "
                "until they have fetched it (trustmesh get clusters shows who lags), or "
                "rotate with --force",
                laggards=[h.to_json() for h in lagging],
            )
        return self._rotate(actor, "requested", prepared.id, lagging, force, now)

    def _rotate(
        self,
        actor: str,
        reason: str,
        prepared: str,
        lagging: list[Holder],
        forced: bool,
        now: float,
        expected_active: str | None = None,
    ) -> RootRecord:
        def record(conn: Connection, new: RootRecord, previous: str) -> None:
            detail: dict[str, Any] = {
                "kind": "x509-ca",
                "active_root": new.id,
                "previous_root": previous,
                "reason": reason,
            }
            if forced:
                detail["forced"] = True
                detail["laggards"] = [h.describe() for h in lagging[:MAX_NAMED_LAGGARDS]]
                detail["laggard_count"] = len(lagging)
            self.recorder.stage(conn, ev.KEY_ROTATED, actor, detail)

        rotated = self.ca.rotate(
            now, expected_prepared=prepared, expected_active=expected_active, on_commit=record
        )
        self.snapshots.refresh()
        self.recorder.drain()
        if forced and lagging:
            log.warning(
                "CA root %s made active although %d holders lag", rotated.id[:16], len(lagging)
            )
        return rotated

    def maintain(self, now: float) -> None:
        """Rotate a root older than the interval once every holder has its successor;
        remove roots nothing valid chains to; forget holders that stopped reporting."""
        self.holders.forget_expired(now)
        active = self.ca.active_root()
        age = now - (active.activated_at or active.created_at)
        expiring = active.not_after - now < EXPIRY_MARGIN
        if age >= self.interval or expiring:
            prepared = self._prepared()
            lagging = self.holders.laggards(prepared.id, now)
            if lagging and not expiring:
                log.warning(
                    "CA root rotation is due but %d holders lag (first: %s)",
                    len(lagging),
                    lagging[0].describe(),
                )
            else:
                self._rotate(
                    "system", "automatic", prepared.id, lagging, bool(lagging), now, active.id
                )

        def removed_roots(conn: Connection, ids: list[str]) -> None:
            self.recorder.stage(conn, "admin.ca_roots_removed", "system", {"removed": ids})

        if self.ca.remove_expired(now, on_commit=removed_roots):
            self.recorder.drain()
            self.snapshots.refresh()


def _name(holder: dict[str, Any]) -> str:
    if holder["kind"] == AGENT:
        return f"agent {holder['holder']}"
    return f"pod {holder['holder']}"
