"""Push delivery of anomaly findings as signed Security Event Tokens (RFC 8935, RFC
8417; DESIGN §11, docs/ssf.md "Push delivery").

* **Receivers** are the registry's ``EventReceiver`` objects: an endpoint (https, or
  http to loopback only), an audience, the detectors they want (default: all), and
  optionally a file on the control plane's host holding a bearer token — read at each
  attempt, never logged, never stored in the database.
* **The outbox** is ``anomaly_deliveries``: :func:`enqueue` adds one row per (finding,
  receiver that wants its detector), in the caller's transaction — the analytics runner
  calls it in the transaction that writes the finding, so a finding and its deliveries
  are written together or not at all.
* **The loop** (:meth:`PushDelivery.run`) looks every :data:`PUSH_TICK` second for due
  rows and claims each with a conditional update (``claimed_by``/``claimed_until``), so
  exactly one replica — and one worker process — attempts a row at a time; a replica
  that dies mid-attempt holds its rows :data:`CLAIM_LEASE` seconds.
* **An attempt** signs the SET now with the active key (``typ: secevent+jwt``, so it
  verifies with the JWKS of the moment) and POSTs it (``Content-Type:
  application/secevent+jwt``, ``Accept: application/json``), at most
  :data:`ATTEMPT_TIMEOUT` seconds, reading at most :data:`MAX_ANSWER_BYTES` of answer,
  following no redirect. ``202`` is delivered; ``400`` is a permanent failure, recorded
  with the RFC 8935 §2.3 ``err`` and ``description`` the receiver gave; anything else
  (another status, no answer, a timeout, TLS) is retried after an exponential delay
  with jitter (:data:`BACKOFF_BASE` doubling to :data:`BACKOFF_CAP`), at most
  :data:`MAX_ATTEMPTS` attempts, then failed for good.
* **State** is :meth:`PushDelivery.status` (``trustmesh get receivers``: delivered,
  pending and failed counts, the last error) and :meth:`PushDelivery.deliveries`
  (``trustmesh get deliveries``) — delivered and failed rows are kept
  :data:`RETENTION` seconds after they finished, then deleted — and the metrics ``trustmesh_push_deliveries_total
  {result}`` and ``trustmesh_push_pending``."""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import Connection, and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row

from trustmesh.common.answers import read_bounded
from trustmesh.common.backoff import Backoff
from trustmesh.common.clock import Clock
from trustmesh.common.errors import InvalidRequest, NotFound
from trustmesh.common.terminal import printable
from trustmesh.identity.keys import ActiveKey
from trustmesh.manifests import EventReceiverSpec, document_from_body
from trustmesh.oauth.rfc8417 import anomaly_set_claims, sign_set
from trustmesh.registry import RegistryStore
from trustmesh.server.snapshots import Snapshots
from trustmesh.storage.db import Database
from trustmesh.storage.schema import anomaly_deliveries, registry_objects

log = logging.getLogger("trustmesh.server")

RECEIVER_KIND = "EventReceiver"
SET_MEDIA_TYPE = "application/secevent+jwt"  # RFC 8417 §2.3, RFC 8935 §2
PUSH_TICK = 1.0
BATCH = 16  # rows claimed per tick: two rounds of attempts, well within CLAIM_LEASE
CONCURRENCY = 8  # attempts in flight per replica
ATTEMPT_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
CLAIM_LEASE = 60.0  # longer than an attempt, so a live replica's claim never lapses
MAX_ANSWER_BYTES = 64 * 1024
MAX_ATTEMPTS = 20
BACKOFF_BASE = 1.0
BACKOFF_CAP = 3600.0
MAX_ERROR_CHARS = 500
MAX_TOKEN_BYTES = 8 * 1024
MAX_FINDING_BYTES = 64 * 1024
LIST_LIMIT = 1000
RETENTION = 30 * 86400  # delivered and failed rows are kept this long, as history
PRUNE_EVERY = 60.0

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
STATES = (PENDING, DELIVERED, FAILED)


# -- the outbox ------------------------------------------------------------------------------
def receivers_of(conn: Connection) -> dict[str, EventReceiverSpec]:
    """The EventReceivers as stored, read in ``conn``'s transaction."""
    rows = conn.execute(
        select(registry_objects.c.name, registry_objects.c.body).where(
            registry_objects.c.kind == RECEIVER_KIND
        )
    )
    found: dict[str, EventReceiverSpec] = {}
    for name, body in rows:
        spec = document_from_body(orjson.loads(body)).spec
        if isinstance(spec, EventReceiverSpec):
            found[name] = spec
    return found


def enqueue(conn: Connection, finding_id: str | int, finding: Mapping[str, Any], now: float) -> int:
    """Add the deliveries of one finding, in ``conn``'s transaction: a row for every
    EventReceiver whose ``events`` take ``finding["detector"]``; a (finding, receiver)
    already queued is left as it is. Returns how many rows were added."""
    detector = finding.get("detector")
    if not isinstance(detector, str) or not detector:
        raise InvalidRequest("a finding must name its detector")
    text = orjson.dumps(dict(finding)).decode()
    if len(text) > MAX_FINDING_BYTES:
        raise InvalidRequest(f"a finding is at most {MAX_FINDING_BYTES} bytes of JSON")
    rows = [
        {
            "id": secrets.token_hex(16),
            "finding_id": str(finding_id),
            "receiver": name,
            "jti": secrets.token_hex(16),
            "detector": detector,
            "finding": text,
            "state": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for name, spec in sorted(receivers_of(conn).items())
        if spec.wants(detector)
    ]
    if not rows:
        return 0
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(anomaly_deliveries)
        .on_conflict_do_nothing(index_elements=["finding_id", "receiver"])
        .returning(anomaly_deliveries.c.id)
    )
    # RETURNING counts what was added (rowcount is -1 on PostgreSQL here), one
    # statement per receiver (there are a few)
    return sum(len(conn.execute(statement, row).all()) for row in rows)


def claim_due(db: Database, replica: str, now: float, limit: int) -> list[Row[Any]]:
    """Up to ``limit`` due rows, each claimed for ``replica`` until ``now`` +
    :data:`CLAIM_LEASE` by a conditional update: a row another replica (or worker)
    claimed first, and still holds, is left to it."""
    t = anomaly_deliveries
    free = or_(t.c.claimed_until.is_(None), t.c.claimed_until < now)
    due = and_(t.c.state == PENDING, t.c.next_attempt_at <= now, free)
    with db.engine.connect() as conn:
        ids = list(
            conn.execute(
                select(t.c.id)
                .where(due)
                .order_by(t.c.next_attempt_at, t.c.created_at, t.c.id)
                .limit(limit)
            ).scalars()
        )
    rows: list[Row[Any]] = []
    for row_id in ids:
        with db.engine.begin() as conn:
            taken = conn.execute(
                update(t)
                .where(t.c.id == row_id, due)
                .values(claimed_by=replica, claimed_until=now + CLAIM_LEASE)
            ).rowcount
            if taken == 1:
                rows.append(conn.execute(select(t).where(t.c.id == row_id)).one())
    return rows


def prune(db: Database, now: float) -> int:
    """Delete the rows delivered or failed more than :data:`RETENTION` seconds ago; how
    many. Any replica may: a row deleted twice is deleted once."""
    t = anomaly_deliveries
    with db.engine.begin() as conn:
        done = conn.execute(
            delete(t).where(t.c.state != PENDING, t.c.finished_at < now - RETENTION)
        )
    return max(done.rowcount, 0)


# -- one attempt -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    result: str  # "delivered" | "failed" (permanent) | "retry"
    status: int | None = None
    error: str | None = None


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _rfc8935_error(body: bytes) -> str:
    """``err: description`` of an RFC 8935 §2.3 error answer, or what it was instead."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("err"), str):
        description = answer.get("description")
        if isinstance(description, str) and description:
            return f"{answer['err']}: {description}"
        return str(answer["err"])
    return "the receiver refused the SET (HTTP 400) without an RFC 8935 error object"


def read_token(path: str) -> str:
    """The bearer token in ``path`` (stripped), or ValueError saying why not — never
    with the file's content."""
    try:
        with Path(path).open("rb") as file:
            raw = file.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"authorizationTokenFile {path}: {exc.strerror or 'unreadable'}") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise ValueError(f"authorizationTokenFile {path} is larger than {MAX_TOKEN_BYTES} bytes")
    token = raw.decode("ascii", "replace").strip()
    if not token or any(not (0x21 <= ord(c) <= 0x7E) for c in token):
        raise ValueError(
            f"authorizationTokenFile {path} must hold one token of printable ASCII characters"
        )
    return token


async def post_set(endpoint: str, token: str | None, signed: str) -> Outcome:
    """One RFC 8935 §2 transmission of ``signed`` to ``endpoint``, bounded in time and
    answer size; never follows a redirect (module docstring)."""
    headers = {"Content-Type": SET_MEDIA_TYPE, "Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    timeout = httpx.Timeout(ATTEMPT_TIMEOUT, connect=CONNECT_TIMEOUT)

    async def attempt() -> Outcome:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            request = client.build_request("POST", endpoint, content=signed, headers=headers)
            response = await client.send(request, stream=True)
            try:
                status = response.status_code
                body = await read_bounded(response, MAX_ANSWER_BYTES)
            finally:
                await response.aclose()
        if status == 202:
            return Outcome(DELIVERED, status)
        if status == 400:
            if body is None:
                return Outcome(FAILED, status, "the receiver refused the SET (HTTP 400)")
            return Outcome(FAILED, status, _bounded(_rfc8935_error(body)))
        if body is None:
            return Outcome(
                "retry",
                status,
                f"the receiver answered HTTP {status} (over {MAX_ANSWER_BYTES} bytes)",
            )
        if 300 <= status < 400:
            return Outcome(
                "retry", status, f"the receiver answered HTTP {status} (redirects are not followed)"
            )
        return Outcome("retry", status, f"the receiver answered HTTP {status}")

    try:
        return await asyncio.wait_for(attempt(), ATTEMPT_TIMEOUT)
    except TimeoutError:
        return Outcome("retry", None, f"no answer within {ATTEMPT_TIMEOUT:.0f} s")
    except httpx.HTTPError as exc:
        reason = _bounded(str(exc) or exc.__class__.__name__)
        return Outcome("retry", None, f"the receiver could not be reached: {reason}")
    except ssl.SSLError as exc:
        return Outcome("retry", None, f"TLS with the receiver failed: {exc.reason}")


def retry_delay(attempts: int) -> float:
    """After the ``attempts``-th failed attempt: 1, 2, 4… seconds up to an hour, each
    drawn in its upper half (equal jitter, ``common/backoff.py``)."""
    return Backoff(BACKOFF_BASE, 2.0, BACKOFF_CAP, attempt=max(attempts - 1, 0)).next_delay()


# -- the service ------------------------------------------------------------------------------
class PushDelivery:
    """The delivery side of the outbox (module docstring)."""

    def __init__(
        self,
        db: Database,
        registry_store: RegistryStore,
        snapshots: Snapshots,
        replica: str,
        clock: Clock,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self.db = db
        self.registry_store = registry_store
        self.snapshots = snapshots
        self.replica = replica
        self.clock = clock
        self.results = Counter(
            "trustmesh_push_deliveries_total",
            "Attempts to push an anomaly SET to an EventReceiver, by result (delivered, "
            "failed for good, retry)",
            ["result"],
            registry=metrics,
        )
        self.pending = 0
        Gauge(
            "trustmesh_push_pending",
            "Anomaly SETs not yet delivered nor failed (as this replica last counted)",
            registry=metrics,
        ).set_function(lambda: self.pending)

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        pruned_at = 0.0
        while True:
            try:
                while await self.deliver_pending() == BATCH:
                    pass  # a full batch: more may be due now
                if self.clock() - pruned_at >= PRUNE_EVERY:
                    pruned_at = self.clock()
                    await asyncio.to_thread(prune, self.db, pruned_at)
            except Exception:  # the next tick tries again; serving goes on meanwhile
                log.exception("push: delivering anomaly SETs failed")
            await asyncio.sleep(PUSH_TICK)

    def enqueue(self, conn: Connection, finding_id: str | int, finding: Mapping[str, Any]) -> int:
        """:func:`enqueue` with this replica's clock."""
        return enqueue(conn, finding_id, finding, self.clock())

    async def deliver_pending(self) -> int:
        """Claim the due rows (up to :data:`BATCH`) and attempt each; how many were
        claimed."""
        now = self.clock()
        claimed = await asyncio.to_thread(self._claim, now)
        if claimed:
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(row: Row[Any]) -> None:
                async with gate:
                    await self._attempt(row)

            await asyncio.gather(*(one(row) for row in claimed))
        self.pending = await asyncio.to_thread(self._count_pending)
        return len(claimed)

    def _claim(self, now: float) -> list[Row[Any]]:
        return claim_due(self.db, self.replica, now, BATCH)

    async def _attempt(self, row: Row[Any]) -> None:
        spec = self.snapshots.registry.receivers.get(row.receiver)
        if spec is None:  # applied on another replica a moment ago, or deleted?
            spec = await asyncio.to_thread(self._stored_receiver, row.receiver)
        if spec is None:
            outcome = Outcome(FAILED, None, f"EventReceiver {row.receiver} no longer exists")
        else:
            outcome = await self._send(row, spec, self.snapshots.keyset.active)
        attempts = row.attempts + 1
        if outcome.result == "retry" and attempts >= MAX_ATTEMPTS:
            outcome = Outcome(
                FAILED, outcome.status, f"gave up after {attempts} attempts: {outcome.error}"
            )
        self.results.labels(outcome.result).inc()
        if outcome.result != DELIVERED:
            log.warning(
                "push: anomaly SET %s to EventReceiver %s: %s (%s)",
                row.jti,
                row.receiver,
                printable(outcome.error or ""),
                "retrying" if outcome.result == "retry" else "failed for good",
            )
        await asyncio.to_thread(self._record, row, attempts, outcome)

    def _stored_receiver(self, name: str) -> EventReceiverSpec | None:
        with self.db.engine.connect() as conn:
            return receivers_of(conn).get(name)

    async def _send(self, row: Row[Any], spec: EventReceiverSpec, key: ActiveKey) -> Outcome:
        token: str | None = None
        if spec.authorization_token_file is not None:
            try:
                token = await asyncio.to_thread(read_token, spec.authorization_token_file)
            except ValueError as exc:
                return Outcome("retry", None, str(exc))
        finding = orjson.loads(row.finding)
        claims = anomaly_set_claims(
            finding, self.snapshots.issuer, spec.audience, row.jti, row.finding_id, self.clock()
        )
        return await post_set(spec.endpoint, token, sign_set(claims, key))

    def _record(self, row: Row[Any], attempts: int, outcome: Outcome) -> None:
        t = anomaly_deliveries
        now = self.clock()
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_attempt_at": now,
            "last_status": outcome.status,
            "claimed_by": None,
            "claimed_until": None,
        }
        if outcome.result == "retry":
            values.update(last_error=outcome.error, next_attempt_at=now + retry_delay(attempts))
        elif outcome.result == DELIVERED:  # the error of an earlier attempt stays shown
            values.update(state=DELIVERED, finished_at=now)
        else:
            values.update(state=FAILED, last_error=outcome.error, finished_at=now)
        with self.db.engine.begin() as conn:
            conn.execute(
                update(t)
                .where(t.c.id == row.id, t.c.claimed_by == self.replica, t.c.state == PENDING)
                .values(**values)
            )

    def _count_pending(self) -> int:
        t = anomaly_deliveries
        with self.db.engine.connect() as conn:
            count = conn.execute(
                select(func.count()).select_from(t).where(t.c.state == PENDING)
            ).scalar()
        return int(count or 0)

    # -- reads -----------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """``trustmesh get receivers``: each EventReceiver as applied, with
        ``status.delivery``: ``delivered``, ``pending``, ``failed`` counts, the last
        attempt and delivery, and the last error (of the latest row attempted that had
        one: a row delivered after retries keeps the error of its last failed attempt)."""
        items = self.registry_store.list_bodies(RECEIVER_KIND)
        t = anomaly_deliveries
        with self.db.engine.connect() as conn:
            counts: dict[tuple[str, str], int] = {
                (r, s): int(n)
                for r, s, n in conn.execute(
                    select(t.c.receiver, t.c.state, func.count()).group_by(t.c.receiver, t.c.state)
                )
            }
            times = {
                r: (attempted, delivered)
                for r, attempted, delivered in conn.execute(
                    select(
                        t.c.receiver,
                        func.max(t.c.last_attempt_at),
                        func.max(t.c.finished_at).filter(t.c.state == DELIVERED),
                    ).group_by(t.c.receiver)
                )
            }
            errors: dict[str, str] = {}
            for r, error in conn.execute(
                select(t.c.receiver, t.c.last_error)
                .where(t.c.last_error.is_not(None))
                .order_by(t.c.last_attempt_at.desc(), t.c.created_at.desc())
            ):
                errors.setdefault(r, error)
        for item in items:
            name = item["metadata"]["name"]
            attempted, delivered = times.get(name, (None, None))
            item["status"]["delivery"] = {
                "delivered": counts.get((name, DELIVERED), 0),
                "pending": counts.get((name, PENDING), 0),
                "failed": counts.get((name, FAILED), 0),
                "lastAttempt": attempted,
                "lastDelivered": delivered,
                "lastError": errors.get(name),
            }
        return items

    def deliveries(
        self, receiver: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """``trustmesh get deliveries``: the outbox rows, newest first (at most
        ``limit``, up to :data:`LIST_LIMIT`), optionally of one receiver or state."""
        if state is not None and state not in STATES:
            raise InvalidRequest(f"state must be one of {', '.join(STATES)}")
        if not 1 <= limit <= LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {LIST_LIMIT}")
        t = anomaly_deliveries
        query = select(t).order_by(t.c.created_at.desc(), t.c.id).limit(limit)
        if receiver is not None:
            if receiver not in self.snapshots.registry.receivers and not self._known(receiver):
                raise NotFound(f"no deliveries for EventReceiver {receiver!r}")
            query = query.where(t.c.receiver == receiver)
        if state is not None:
            query = query.where(t.c.state == state)
        with self.db.engine.connect() as conn:
            rows = list(conn.execute(query))
        return [
            {
                "id": row.id,
                "findingId": row.finding_id,
                "receiver": row.receiver,
                "jti": row.jti,
                "detector": row.detector,
                "state": row.state,
                "attempts": row.attempts,
                "createdAt": row.created_at,
                "lastAttempt": row.last_attempt_at,
                "nextAttempt": row.next_attempt_at if row.state == PENDING else None,
                "finishedAt": row.finished_at,
                "lastStatus": row.last_status,
                "lastError": row.last_error,
            }
            for row in rows
        ]

    def _known(self, receiver: str) -> bool:
        t = anomaly_deliveries
        with self.db.engine.connect() as conn:
            return (
                conn.execute(select(t.c.id).where(t.c.receiver == receiver).limit(1)).first()
                is not None
            )
