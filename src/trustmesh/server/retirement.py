"""Retiring unused Workloads and restoring them (DESIGN §11).

A Workload with ``spec.retireAfterUnused`` that has neither received a credential nor
been seen in an agent's decision for that long (``server/usage.py``; one never used
counts from its last apply) is retired, in one transaction:

- a suspension of the workload whose actor is ``trustmesh:retirement``
  (``revocation/suspension.py``): the token exchange and ``POST /v1/x509-svid`` refuse
  it with ``invalid_grant`` saying it was retired and how to restore it;
- a subject revocation of its SPIFFE ID (cut-off now plus the suspension grace), which
  reaches every agent through the revocation stream within about a second, so the
  agents deny the tokens and certificates it still holds;
- a ``workload.retired`` audit event (and the ``revocation.created`` of that
  revocation), actor ``system``.

Any replica may find a workload due; the suspension's primary key makes the second
finder's transaction change nothing (on PostgreSQL its insert fails and is dropped).

An apply whose documents include the retired Workload — changed or not — restores it:
the suspension ends, the registry object is touched (new generation, ``updatedAt``, by
the applier) and the registry revision moves, so the restore is a registry version of
its own and the idle time counts again from it; ``workload.restored`` is recorded. What
was revoked stays revoked (a revocation is a cut-off in time): credentials issued after
the restore are valid."""

from __future__ import annotations

import logging

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError

from trustmesh.audit import events as ev
from trustmesh.common.clock import Clock
from trustmesh.registry import AppliedChange, RegistryStore
from trustmesh.revocation.store import RevocationStore
from trustmesh.revocation.suspension import MAX_REASON, RETIREMENT_ACTOR, SuspensionStore
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.revoke import stage_revocation
from trustmesh.server.snapshots import Snapshots
from trustmesh.server.usage import UsageTracker
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import registry_objects

log = logging.getLogger("trustmesh.server")

SYSTEM = "system"  # the actor of what the server does by itself (audit events)


def human_duration(seconds: float) -> str:
    """``30d``, ``12h``, ``90s``: the largest unit that divides it, for reasons."""
    whole = int(seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if whole >= size and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


class Retirement:
    def __init__(
        self,
        db: Database,
        suspensions: SuspensionStore,
        revocations: RevocationStore,
        registry_store: RegistryStore,
        snapshots: Snapshots,
        recorder: AuditRecorder,
        usage: UsageTracker,
        clock: Clock,
        grace: float,
    ) -> None:
        self.db = db
        self.suspensions = suspensions
        self.revocations = revocations
        self.registry_store = registry_store
        self.snapshots = snapshots
        self.recorder = recorder
        self.usage = usage
        self.clock = clock
        self.grace = grace

    def retire_due(self) -> list[str]:
        """Retire every Workload unused for its ``retireAfterUnused``; their names."""
        registry = self.snapshots.registry
        suspended = self.snapshots.suspensions
        candidates = {
            name: spec.retire_after_unused
            for name, spec in registry.workloads.items()
            if spec.retire_after_unused is not None and suspended.get("workload", name) is None
        }
        if not candidates:
            return []
        now = self.clock()
        ids = {name: registry.spiffe_id_of(name) for name in candidates}
        used = self.usage.usage(ids.values())
        with self.db.engine.connect() as conn:
            applied = dict(
                conn.execute(
                    select(registry_objects.c.name, registry_objects.c.updated_at).where(
                        registry_objects.c.kind == "Workload",
                        registry_objects.c.name.in_(sorted(candidates)),
                    )
                ).all()
            )
        retired = []
        for name, after in sorted(candidates.items()):
            if name not in applied:
                continue
            found = used.get(ids[name])
            last_used = found.last_used if found is not None else None
            since = max(t for t in (last_used, float(applied[name])) if t is not None)
            if now - since < after:
                continue
            if self._retire(name, ids[name], after, last_used, now):
                retired.append(name)
        if retired:
            self.snapshots.refresh()
            self.recorder.drain()
        return retired

    def _retire(
        self, name: str, spiffe_id: str, after: int, last_used: float | None, now: float
    ) -> bool:
        reason = f"unused for {human_duration(after)}"
        try:
            with self.db.engine.begin() as conn:
                _, created = self.suspensions.suspend_in(
                    conn, "workload", name, reason, RETIREMENT_ACTOR, now
                )
                if not created:
                    return False
                entry, new_entry = self.revocations.revoke_in(
                    conn,
                    "subject",
                    spiffe_id,
                    f"retired: {reason}"[:MAX_REASON],
                    SYSTEM,
                    now + self.grace,
                    supersede=True,
                )
                self.recorder.stage(
                    conn,
                    ev.WORKLOAD_RETIRED,
                    SYSTEM,
                    {
                        "workload": name,
                        "spiffe_id": spiffe_id,
                        "retire_after_unused": after,
                        "last_used": ev.now_time(last_used) if last_used else None,
                        "revocation_revision": entry.revision,
                    },
                )
                if new_entry:
                    stage_revocation(self.recorder, conn, entry, SYSTEM)
        except IntegrityError:  # another replica retired it at the same moment
            return False
        log.info("workload %s retired: %s", name, reason)
        return True

    def retired_in(self, conn: Connection, names: list[str]) -> list[str]:
        """Which of the Workloads ``names`` are retired, as the transaction sees it."""
        out = []
        for name in names:
            found = self.suspensions.get_in(conn, "workload", name)
            if found is not None and found.retired:
                out.append(name)
        return out

    def restore_in(
        self, conn: Connection, names: list[str], actor: str, registry_changed: bool
    ) -> tuple[list[AppliedChange], int | None]:
        """End the retirement of each of ``names`` (retired Workloads the apply
        names), touch their registry objects and record ``workload.restored``; the
        changes, and the new registry revision when the apply itself made none."""
        now = self.clock()
        changes = []
        for name in names:
            ended = self.suspensions.resume_in(conn, "workload", name)
            if ended is None:
                continue
            conn.execute(
                update(registry_objects)
                .where(registry_objects.c.kind == "Workload", registry_objects.c.name == name)
                .values(
                    generation=registry_objects.c.generation + 1,
                    updated_at=now,
                    updated_by=actor,
                )
            )
            self.recorder.stage(
                conn,
                ev.WORKLOAD_RESTORED,
                actor,
                {
                    "workload": name,
                    "retired_at": ev.now_time(ended.suspended_at),
                    "reason": ended.reason,
                },
            )
            changes.append(AppliedChange("Workload", name, "restored"))
        revision = None
        if changes and not registry_changed:
            revision = meta_store.bump(conn, meta_store.REGISTRY_REVISION, at=self.clock())
        return changes, revision
