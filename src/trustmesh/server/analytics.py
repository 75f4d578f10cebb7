"""The analytics runner and the anomalies it records (DESIGN §11 "Anomalies and
escalation").

**One runner.** Exactly one replica runs the detectors at a time: it holds the lease
row of ``analytics_state`` (``holder``, ``lease_until``), renewing it every round; when
the holder dies another replica takes the lease once it lapses. The row also keeps the
last audit index the detectors read (``cursor``) and their state (``snapshots``, JSON
per detector). A round reads the entries after the cursor in index order, feeds every
detector each event, and commits in ONE transaction, guarded by the lease and the cursor
it started from: the findings (table ``anomalies``, unique on (detector, key, window
start), so a replay never reports twice), their ``anomaly.detected`` events (actor
``system``), one push-delivery row per (finding, receiver) (``anomaly_deliveries``,
drained by the push sender), the quarantines they ask for, the detectors' snapshots and
the new cursor. A runner that lost its lease meanwhile commits nothing and reloads the
state the new holder wrote; a new holder starts from the last committed cursor and
snapshots, so an entry is read once for its findings however often runners change.

**Detectors** are the list the runner is built with (the composition root,
``server/controlplane.py``): each has a ``name``, ``observe(index, event, settings) ->
[Finding]``, ``snapshot()`` and ``restore(state)``. Their settings are the
AnomalyPolicy of the current policy version (``analytics/settings.py``).

**Quarantine.** A finding of a detector whose settings say ``quarantine: true`` whose
subject is a workload, a SPIFFE ID or a cluster suspends it (``Suspender.suspend_in``,
actor ``system``, reason naming the finding), in the finding's transaction; the finding
says so (``quarantined``), or says why it could not (the workload is not registered).

**People** list and read findings (any role) and acknowledge or resolve them (admin or
approver; ``acknowledged_by``/``resolved_by`` name them)."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Connection, select, update

from trustmesh.analytics.detectors import Detector
from trustmesh.analytics.findings import DETECTOR_NAMES, Finding, printable
from trustmesh.analytics.settings import AnomalySettings
from trustmesh.audit import events as ev
from trustmesh.common.clock import Clock
from trustmesh.common.errors import Conflict, EventError, InvalidRequest, NotFound
from trustmesh.revocation.suspension import MAX_REASON
from trustmesh.server.push import enqueue
from trustmesh.server.recorder import AuditRecorder, admin_event
from trustmesh.server.revoke import Suspender
from trustmesh.server.snapshots import Snapshots
from trustmesh.storage import Database
from trustmesh.storage.schema import (
    analytics_state,
    anomalies,
    audit_entries,
)

log = logging.getLogger("trustmesh.server")

RUNNER = "runner"  # the analytics_state row
SYSTEM = "system"
LEASE_SECONDS = 5.0  # how long a runner's lease lasts unrenewed
INTERVAL = 1.0  # seconds between rounds: a finding within about a second of its entry
BATCH = 500  # audit entries a round reads at most; a full one is followed at once by the next
STATES = ("open", "acknowledged", "resolved")
MAX_NOTE = 2000
MAX_LISTED = 1000
_QUARANTINE_KINDS = {"workload": "workload", "spiffeId": "subject", "cluster": "cluster"}


@dataclass(frozen=True)
class Anomaly:
    """A recorded finding and what people did about it."""

    id: str
    finding: Finding
    state: str
    acknowledged_by: str | None
    acknowledged_at: float | None
    resolved_by: str | None
    resolved_at: float | None
    note: str | None
    quarantined: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            **self.finding.to_json(),
            "state": self.state,
            "acknowledgedBy": self.acknowledged_by,
            "acknowledgedAt": self.acknowledged_at,
            "resolvedBy": self.resolved_by,
            "resolvedAt": self.resolved_at,
            "note": self.note,
            "quarantined": self.quarantined,
        }


def _anomaly(row: Any) -> Anomaly:
    return Anomaly(
        id=row.id,
        finding=Finding(
            detector=row.detector,
            key=row.key,
            subject=json.loads(row.subject),
            summary=row.summary,
            evidence=json.loads(row.evidence),
            severity=row.severity,
            detected_at=row.detected_at,
            window=(row.window_start, row.window_end),
            details=json.loads(row.details),
        ),
        state=row.state,
        acknowledged_by=row.acknowledged_by,
        acknowledged_at=row.acknowledged_at,
        resolved_by=row.resolved_by,
        resolved_at=row.resolved_at,
        note=row.note,
        quarantined=json.loads(row.quarantined) if row.quarantined else None,
    )


def _no_floats(value: Any) -> Any:
    """Audit events hold no floats (``audit/canonical.py``): a whole one becomes an
    integer, any other its decimal text."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else f"{value:.3f}"
    if isinstance(value, Mapping):
        return {str(k): _no_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_floats(v) for v in value]
    return value


def event_detail(
    anomaly_id: str, finding: Finding, quarantined: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``anomaly.detected`` detail: the finding, its times RFC 3339."""
    body = finding.to_json()
    return {
        "id": anomaly_id,
        **{k: _no_floats(v) for k, v in body.items()},
        "detectedAt": ev.now_time(finding.detected_at),
        "window": [ev.now_time(finding.window[0]), ev.now_time(finding.window[1])],
        "quarantined": quarantined,
    }


class AnalyticsRunner:
    def __init__(
        self,
        db: Database,
        detectors: Sequence[Detector],
        snapshots: Snapshots,
        recorder: AuditRecorder,
        suspender: Suspender,
        clock: Clock,
        replica: str,
        *,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.db = db
        self.detectors = list(detectors)
        self.snapshots = snapshots
        self.recorder = recorder
        self.suspender = suspender
        self.clock = clock
        self.replica = replica
        self.lease_seconds = lease_seconds
        self.cursor: int | None = None  # None: state not loaded (not the holder)
        self.behind = False  # the last round read a full batch: the next need not wait

    # -- the lease -------------------------------------------------------------------------
    def _take_lease(self) -> bool:
        """Renew our lease or take a lapsed one; whether we hold it now."""
        now = self.clock()
        with self.db.engine.begin() as conn:
            taken = conn.execute(
                update(analytics_state)
                .where(
                    analytics_state.c.name == RUNNER,
                    (analytics_state.c.holder == self.replica)
                    | (analytics_state.c.lease_until < now)
                    | analytics_state.c.holder.is_(None),
                )
                .values(holder=self.replica, lease_until=now + self.lease_seconds)
            ).rowcount
        if taken != 1:
            self.cursor = None
        return taken == 1

    def _load(self) -> None:
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(analytics_state.c.cursor, analytics_state.c.snapshots).where(
                    analytics_state.c.name == RUNNER
                )
            ).one()
        stored = json.loads(row.snapshots)
        for detector in self.detectors:
            detector.restore(stored.get(detector.name) or {})
        self.cursor = int(row.cursor)
        log.info("analytics runner on replica %s from audit index %d", self.replica, self.cursor)

    def release(self) -> None:
        """Give the lease up (a clean stop), so another replica need not wait it out."""
        with self.db.engine.begin() as conn:
            conn.execute(
                update(analytics_state)
                .where(analytics_state.c.name == RUNNER, analytics_state.c.holder == self.replica)
                .values(holder=None, lease_until=0.0)
            )
        self.cursor = None

    # -- a round ---------------------------------------------------------------------------
    def settings(self) -> AnomalySettings:
        policy = self.snapshots.policy
        return AnomalySettings.from_specs(policy.anomaly.items(), self.snapshots.policy_revision)

    def run_once(self) -> list[Anomaly]:
        """One round: the findings it recorded (none when another replica runs).
        ``behind`` says afterwards whether it read a full batch (more may be waiting)."""
        self.behind = False
        if not self._take_lease():
            return []
        if self.cursor is None:
            self._load()
        assert self.cursor is not None
        start = self.cursor
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(audit_entries.c.idx, audit_entries.c.leaf)
                .where(audit_entries.c.idx > start)
                .order_by(audit_entries.c.idx)
                .limit(BATCH)
            ).all()
        if not rows:
            return []
        self.behind = len(rows) == BATCH
        # the AnomalyPolicy in force now, not as of the last refresh loop: a policy applied
        # before these entries were read judges them, in whichever process runs this
        self.snapshots.refresh()
        settings = self.settings()
        found: list[Finding] = []
        end = start
        for idx, leaf in rows:
            end = int(idx)
            event = json.loads(leaf)
            if event.get("type") == ev.ANOMALY_DETECTED:
                continue
            for detector in self.detectors:
                try:
                    found.extend(detector.observe(end, event, settings))
                except Exception:  # one detector's bug does not stop the others
                    log.exception("detector %s failed on audit entry %d", detector.name, end)
        found = [f for f in found if self._recordable(f)]
        try:
            recorded = self._commit(start, end, found, settings)
        except Conflict:  # another replica holds the lease now: it reads from its cursor
            self.cursor = None
            log.info("analytics runner on replica %s lost its lease", self.replica)
            return []
        except Exception:
            self.cursor = None  # the detectors' memory is ahead of the stored state
            raise
        if recorded:
            if any(a.quarantined and a.quarantined.get("created") for a in recorded):
                self.snapshots.refresh()
            self.recorder.drain()
            for anomaly in recorded:
                log.warning(
                    "anomaly %s (%s): %s", anomaly.id, anomaly.finding.detector,
                    anomaly.finding.summary,
                )  # fmt: skip
        return recorded

    def _recordable(self, finding: Finding) -> bool:
        """Whether the finding's ``anomaly.detected`` passes the event schema: one that
        does not (a detector's details the log refuses) is logged and dropped, so it
        cannot stop every later round at the same cursor."""
        quarantine = {"kind": "workload", "value": "x", "created": True}
        detail = event_detail("0" * 16, finding, quarantine)
        try:
            ev.check_event(admin_event(self.recorder.source, ev.ANOMALY_DETECTED, SYSTEM, detail))
        except EventError as exc:
            log.error("detector %s: a finding the audit log refuses, dropped: %s",
                      finding.detector, exc)  # fmt: skip
            return False
        return True

    def _commit(
        self, start: int, end: int, found: list[Finding], settings: AnomalySettings
    ) -> list[Anomaly]:
        now = self.clock()
        snapshots = {d.name: d.snapshot() for d in self.detectors}
        recorded: list[Anomaly] = []
        with self.db.engine.begin() as conn:
            moved = conn.execute(
                update(analytics_state)
                .where(
                    analytics_state.c.name == RUNNER,
                    analytics_state.c.holder == self.replica,
                    analytics_state.c.cursor == start,
                )
                .values(
                    cursor=end,
                    snapshots=json.dumps(snapshots, sort_keys=True),
                    updated_at=now,
                    lease_until=now + self.lease_seconds,
                )
            ).rowcount
            if moved != 1:
                raise Conflict("the analytics lease moved to another replica")
            for finding in found:
                anomaly = self._record_in(conn, replace(finding, detected_at=now), settings)
                if anomaly is not None:
                    recorded.append(anomaly)
        self.cursor = end
        return recorded

    def _record_in(
        self, conn: Connection, finding: Finding, settings: AnomalySettings
    ) -> Anomaly | None:
        exists = conn.execute(
            select(anomalies.c.id).where(
                anomalies.c.detector == finding.detector,
                anomalies.c.key == finding.key,
                anomalies.c.window_start == finding.window[0],
            )
        ).first()
        if exists is not None:
            return None
        anomaly_id = secrets.token_hex(8)
        quarantined = None
        if settings.of(finding.detector).quarantine:
            quarantined = self._quarantine_in(conn, anomaly_id, finding)
        # the event first: one it refuses (EventError) fails the round before any row
        self.recorder.stage(
            conn, ev.ANOMALY_DETECTED, SYSTEM, event_detail(anomaly_id, finding, quarantined)
        )
        conn.execute(
            anomalies.insert().values(
                id=anomaly_id,
                detector=finding.detector,
                key=finding.key,
                window_start=finding.window[0],
                window_end=finding.window[1],
                subject=json.dumps(finding.subject, sort_keys=True),
                summary=finding.summary,
                evidence=json.dumps(finding.evidence),
                details=json.dumps(finding.details, sort_keys=True),
                severity=finding.severity,
                detected_at=finding.detected_at,
                state="open",
                quarantined=None if quarantined is None else json.dumps(quarantined),
            )
        )
        # one push delivery per EventReceiver that wants this detector (server/push.py)
        enqueue(conn, anomaly_id, {"id": anomaly_id, **finding.to_json()}, finding.detected_at)
        return Anomaly(anomaly_id, finding, "open", None, None, None, None, None, quarantined)

    def _quarantine_in(self, conn: Connection, anomaly_id: str, finding: Finding) -> dict[str, Any]:
        """Suspend the finding's subject; what was done, or why nothing was."""
        for kind, value in finding.subject.items():
            target = _QUARANTINE_KINDS.get(kind)
            if target is None or not isinstance(value, str):
                continue
            reason = f"quarantined by anomaly {anomaly_id} ({finding.detector}): {finding.summary}"
            try:  # a refusal comes before any write (the subject is checked first)
                result = self.suspender.suspend_in(conn, target, value, reason[:MAX_REASON], SYSTEM)
            except (NotFound, InvalidRequest) as exc:
                return {"kind": target, "value": value, "created": False, "error": str(exc)}
            return {"kind": target, "value": value, "created": bool(result["created"])}
        return {
            "created": False,
            "error": "the subject is not a workload, SPIFFE ID or cluster: nothing to suspend",
        }


class Anomalies:
    """Listing, reading, acknowledging and resolving findings (``/v1/anomalies``)."""

    def __init__(self, db: Database, recorder: AuditRecorder, clock: Clock) -> None:
        self.db = db
        self.recorder = recorder
        self.clock = clock

    def listing(
        self,
        state: str | None = None,
        detector: str | None = None,
        limit: int = MAX_LISTED,
        after: str | None = None,
    ) -> tuple[list[Anomaly], str | None]:
        """The newest first, ``limit`` (1 to 1000) at a time after the finding ``after``
        (the last of the previous page), and the id to pass as ``after`` for the next page
        (None on the last)."""
        if state is not None and state not in STATES:
            raise InvalidRequest(f"state must be one of {', '.join(STATES)}")
        if detector is not None and detector not in DETECTOR_NAMES:
            raise InvalidRequest(f"detector must be one of {', '.join(DETECTOR_NAMES)}")
        if not 1 <= limit <= MAX_LISTED:
            raise InvalidRequest(f"limit must be 1 to {MAX_LISTED}, not {limit}")
        query = select(anomalies).order_by(anomalies.c.detected_at.desc(), anomalies.c.id)
        if state is not None:
            query = query.where(anomalies.c.state == state)
        if detector is not None:
            query = query.where(anomalies.c.detector == detector)
        with self.db.engine.connect() as conn:
            if after is not None:
                mark = conn.execute(
                    select(anomalies.c.detected_at).where(anomalies.c.id == after)
                ).scalar()
                if mark is None:
                    raise InvalidRequest(
                        f"after: no anomaly {printable(after, 64)!r} (a page's next)"
                    )
                query = query.where(
                    (anomalies.c.detected_at < mark)
                    | ((anomalies.c.detected_at == mark) & (anomalies.c.id > after))
                )
            found = [_anomaly(r) for r in conn.execute(query.limit(limit + 1))]
        more = len(found) > limit
        return found[:limit], found[limit - 1].id if more else None

    def analyzed_through(self) -> int:
        """The size of the log prefix the detectors have read (the runner's committed
        cursor + 1): every finding about an entry below it is recorded."""
        with self.db.engine.connect() as conn:
            cursor = conn.execute(
                select(analytics_state.c.cursor).where(analytics_state.c.name == RUNNER)
            ).scalar()
        return 0 if cursor is None else max(int(cursor) + 1, 0)

    def get(self, anomaly_id: str) -> Anomaly:
        with self.db.engine.connect() as conn:
            row = conn.execute(select(anomalies).where(anomalies.c.id == anomaly_id)).first()
        if row is None:
            raise NotFound(f"anomaly {printable(anomaly_id, 64)} does not exist")
        return _anomaly(row)

    def acknowledge(self, anomaly_id: str, person: str, note: Any = None) -> Anomaly:
        """open -> acknowledged (someone is looking at it)."""
        return self._move(anomaly_id, person, note, ("open",), "acknowledged")

    def resolve(self, anomaly_id: str, person: str, note: Any = None) -> Anomaly:
        """open or acknowledged -> resolved."""
        return self._move(anomaly_id, person, note, ("open", "acknowledged"), "resolved")

    def _move(
        self, anomaly_id: str, person: str, note: Any, allowed: tuple[str, ...], to: str
    ) -> Anomaly:
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
            raise InvalidRequest(f"note must be a string of at most {MAX_NOTE} characters")
        found = self.get(anomaly_id)
        if found.state not in allowed:
            raise Conflict(f"anomaly {found.id} is {found.state}; it cannot become {to}")
        prefix = "acknowledged" if to == "acknowledged" else "resolved"
        values: dict[str, Any] = {
            "state": to,
            f"{prefix}_by": person,
            f"{prefix}_at": self.clock(),
        }
        if note:
            values["note"] = note
        with self.db.engine.begin() as conn:
            changed = conn.execute(
                update(anomalies)
                .where(anomalies.c.id == found.id, anomalies.c.state == found.state)
                .values(**values)
            ).rowcount
            if changed != 1:
                raise Conflict(f"anomaly {found.id} changed meanwhile; try again")
            self.recorder.stage(
                conn,
                f"admin.anomaly_{to}",
                person,
                {
                    "id": found.id,
                    "detector": found.finding.detector,
                    "key": found.finding.key,
                    "note": note or None,
                },
            )
        self.recorder.drain()
        return self.get(found.id)
