"""What the control plane writes into its audit log, and how.

The builders turn each control-plane action into one event of the schema in
``audit/events.py``. Changes (apply, rollback, revoke, rotate, credentials) stage
their event in their own transaction (:meth:`AuditRecorder.stage`, the outbox) and
move it into the log right after (:meth:`AuditRecorder.drain`); refusals that changed
nothing are written with :meth:`AuditRecorder.write_admin`. The token endpoint uses
:meth:`AuditRecorder.record`, a group commit: concurrent exchanges share one
transaction, and no token leaves the server before its ``token.issued`` event is
stored -- if the log cannot be written the exchange fails (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection

from trustmesh.audit import events as ev
from trustmesh.audit.log import AuditLog, Record, record_of
from trustmesh.identity.kubernetes_sa import parse_unverified
from trustmesh.oauth.rfc8693 import Exchanged

log = logging.getLogger("trustmesh.audit")

MAX_BATCH = 2000


class AuditRecorder:
    """Writes the control plane's own events into the log."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.source = audit.source
        self._pending: list[tuple[Record, asyncio.Future[None] | None]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    # -- synchronous (worker threads) ------------------------------------------------------
    def write_admin(
        self, type_: str, actor: str, detail: Mapping[str, Any], cluster: str | None = None
    ) -> None:
        """Append an action that changed nothing (a rejected apply) now; a failure is
        logged and counted, not raised."""
        event = admin_event(self.source, type_, actor_name(actor), detail, cluster)
        try:
            self.audit.append([record_of(event)])
        except Exception:
            self.failures += 1
            log.exception("could not write %s to the audit log", type_)

    def stage(
        self,
        conn: Connection,
        type_: str,
        actor: str,
        detail: Mapping[str, Any],
        cluster: str | None = None,
    ) -> None:
        """Record a change inside its own transaction (the outbox, ``AuditLog.stage``):
        the event exists if and only if the change commits. :meth:`drain` then moves it
        into the log."""
        self.audit.stage(conn, admin_event(self.source, type_, actor_name(actor), detail, cluster))

    def drain(self) -> None:
        """Sequence what the last change staged; on failure the checkpoint loop (of
        this or any replica) retries, so nothing committed is lost."""
        try:
            self.audit.drain_outbox()
        except Exception:
            self.failures += 1
            log.exception("moving staged audit events into the log failed; will retry")

    # -- asynchronous group commit ------------------------------------------------------------
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="audit-recorder")

    async def record(self, event: Mapping[str, Any]) -> None:
        """Append ``event`` and return once it is stored (raises if it could not be)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(record_of(event), future)
        await future

    def submit(self, event: Mapping[str, Any]) -> None:
        """Append ``event`` soon, without waiting (failed exchanges)."""
        self._enqueue(record_of(event), None)

    def _enqueue(self, record: Record, future: asyncio.Future[None] | None) -> None:
        if self._wake is None:
            raise RuntimeError("the audit recorder is not running")
        self._pending.append((record, future))
        self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            await asyncio.sleep(0)  # let the requests already running enqueue theirs too
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                await asyncio.to_thread(self.audit.append, [r for r, _ in batch])
            except Exception as exc:
                self.failures += 1
                log.error("audit log write failed for %d events: %s", len(batch), exc)
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_exception(exc)
                continue
            for _, future in batch:
                if future is not None and not future.done():
                    future.set_result(None)

    async def close(self) -> None:
        """Write what is pending, then stop (SIGTERM)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._flush()


# -- event builders ------------------------------------------------------------------------
def issued_event(
    source: Mapping[str, Any],
    result: Exchanged,
    subject_token: str,
    trace_id: str,
    span_id: str,
) -> dict[str, Any]:
    sa = result.sa_token
    return ev.new_event(
        ev.TOKEN_ISSUED,
        source=source,
        cluster=result.cluster,
        actor=result.spiffe_id,
        identity={
            "spiffe_id": result.spiffe_id,
            "workload": result.workload,
            "origin_cluster": result.cluster,
            "sa_issuer": sa.issuer,
            "sa_subject": f"system:serviceaccount:{sa.namespace}:{sa.service_account}",
            "jti": result.jti,
            "kid": result.kid,
            "token_sha256": ev.token_sha256(subject_token),
        },
        request={"surface": "token", "audience": list(result.audiences)},
        detail={
            "issued_token_sha256": ev.token_sha256(str(result.response["access_token"])),
            "expires_in": int(result.response["expires_in"]),
            "sa_token": {
                "jti": sa.jti,
                "kid": sa.kid,
                "pod": sa.pod_name,
                "node": sa.node_name,
                "service_account_uid": sa.service_account_uid,
            },
        },
        trace_id=trace_id,
        span_id=span_id,
    )


def exchange_failed_event(
    source: Mapping[str, Any],
    error: str,
    description: str,
    subject_token: str | None,
    trace_id: str,
    span_id: str,
) -> dict[str, Any]:
    """A refused exchange. Provenance comes from the token's unverified claims, marked
    as claimed: the token did not prove them."""
    identity: dict[str, Any] = {}
    claimed: dict[str, Any] = {}
    if subject_token:
        identity["token_sha256"] = ev.token_sha256(subject_token)
        with contextlib.suppress(Exception):
            unverified = parse_unverified(subject_token)
            claimed = {
                "iss": _short(unverified.claims.get("iss")),
                "sub": _short(unverified.claims.get("sub")),
                "kid": _short(unverified.kid),
                "jti": _short(unverified.claims.get("jti")),
            }
    return ev.new_event(
        ev.TOKEN_EXCHANGE_FAILED,
        source=source,
        actor="anonymous",
        identity=identity,
        request={"surface": "token"},
        decision={"allowed": False, "reason": f"{error}: {description}"[:500]},
        detail={"error": error, "claimed": {k: v for k, v in claimed.items() if v} or None},
        trace_id=trace_id,
        span_id=span_id,
    )


def actor_name(actor: str) -> str:
    """Actors in audit events: ``admin:NAME`` for people (``--author`` or the admin
    credential), ``cluster:NAME`` for agents, ``system`` for the server itself."""
    if actor.startswith(("admin:", "cluster:", "spiffe://")) or actor in ("system", "admin"):
        return actor[:200]
    return f"admin:{actor}"[:200]


def _short(value: Any) -> str | None:
    return value[:256] if isinstance(value, str) and value else None


def admin_event(
    source: Mapping[str, Any],
    type_: str,
    actor: str,
    detail: Mapping[str, Any],
    cluster: str | None = None,
) -> dict[str, Any]:
    return ev.new_event(type_, source=source, actor=actor, cluster=cluster, detail=detail)
