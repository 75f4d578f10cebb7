"""What the control plane writes into its audit log, and how.

The builders turn each control-plane action into one event of the schema in
``audit/events.py``. Changes (apply, rollback, revoke, rotate, credentials) stage
their event in their own transaction (:meth:`AuditRecorder.stage`, the outbox) and
move it into the log right after (:meth:`AuditRecorder.drain`); refusals that changed
nothing are written with :meth:`AuditRecorder.write_admin`. The token endpoint uses
:meth:`AuditRecorder.record`, a group commit: concurrent exchanges share one
transaction, and no token leaves the server before its ``token.issued`` event is
stored -- if the log cannot be written the exchange fails (503).

Refused exchanges (:meth:`AuditRecorder.exchange_refused`) go through the replica's
:class:`~trustmesh.audit.folding.RefusalFolder`: the first of each source in a window
are ``token.exchange_failed`` events, the rest are folded into the window's
``audit.refusals_folded`` summary, written when the window ends or the replica stops.
A ``token.issued`` event is never folded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Connection

from trustmesh.audit import events as ev
from trustmesh.audit.folding import (
    FoldingLimits,
    Refusal,
    RefusalFolder,
    Summary,
    fitted,
    source_address,
)
from trustmesh.audit.log import AuditLog, Record, record_of
from trustmesh.common.clock import Clock, system_clock
from trustmesh.identity.kubernetes_sa import parse_unverified
from trustmesh.oauth.rfc8693 import Exchanged

log = logging.getLogger("trustmesh.audit")

MAX_BATCH = 2000

_Pending = tuple[Record, "asyncio.Future[None] | None", Callable[[], None] | None]
"""An event to append, the future of whoever waits for it, what to do if it fails."""


class AuditRecorder:
    """Writes the control plane's own events into the log."""

    def __init__(
        self,
        audit: AuditLog,
        clock: Clock = system_clock,
        refusals: FoldingLimits | None = None,
    ) -> None:
        self.audit = audit
        self.source = audit.source
        self.clock = clock
        self.folder = RefusalFolder(refusals or FoldingLimits())
        self._pending: list[_Pending] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._writer: ThreadPoolExecutor | None = None
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
        # One thread of its own: appends run one at a time, and none waits behind the
        # database work other loops hand to the default executor.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="audit-writer")
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="audit-recorder")
        self._ticker = asyncio.create_task(self._tick_loop(), name="audit-refusal-windows")

    async def record(self, event: Mapping[str, Any]) -> None:
        """Append ``event`` and return once it is stored (raises if it could not be)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(record_of(event), future)
        await future

    def submit(self, event: Mapping[str, Any]) -> None:
        """Append ``event`` soon, without waiting."""
        self._enqueue(record_of(event), None)

    def _enqueue(
        self,
        record: Record,
        future: asyncio.Future[None] | None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        if self._wake is None:
            raise RuntimeError("the audit recorder is not running")
        if self.folder.owed:  # refusals dropped earlier are reported before this event
            self._summarise(self.folder.take_dropped())
        self._pending.append((record, future, on_failure))
        self._wake.set()

    # -- refused exchanges, folded -----------------------------------------------------------
    def exchange_refused(
        self,
        error: str,
        description: str,
        subject_token: str | None,
        peer: str | None,
        trace_id: str | None,
        span_id: str | None,
        surface: str = "token",
    ) -> bool:
        """Record a refused exchange from the caller at ``peer``: as its own
        ``token.exchange_failed`` event (True), or folded into the window's summary
        (False). Not awaited: nothing changed, and a refusal waits for no commit.
        ``surface``: ``token`` (RFC 8693), ``x509-svid`` (``POST /v1/x509-svid``) or
        ``console`` (a sign-in with a credential that is not valid, which carries no
        trace)."""
        claimed = claimed_facts(subject_token)
        digest = ev.token_sha256(subject_token) if subject_token else None
        refusal = Refusal(
            error=error,
            reason=f"{error}: {description}",
            surface=surface,
            address=source_address(peer),
            issuer=claimed.get("iss"),
            token_sha256=digest,
        )
        now = self.clock()
        verdict = self.folder.observe(now, refusal)
        if verdict.due is not None:
            self._summarise(verdict.due)
        if not verdict.individual:
            return False
        event = exchange_failed_event(
            self.source, error, description, subject_token, trace_id, span_id, claimed, surface
        )
        try:
            record = record_of(event)
        except Exception:
            self.failures += 1
            log.exception("a token.exchange_failed event does not fit the schema")
            self.folder.drop(now, refusal)
            return False
        self._enqueue(record, None, lambda: self.folder.drop(now, refusal))
        return True

    def _summarise(self, summary: Summary | None) -> None:
        """Write a summary soon; if it cannot be written, what it counted is dropped
        and reported with the next one."""
        if summary is None:
            return
        limits = self.folder.limits
        at = self.clock()
        event = fitted(
            lambda top: ev.new_event(
                ev.REFUSALS_FOLDED,
                source=self.source,
                actor="system",
                detail=summary.detail(ev.TOKEN_EXCHANGE_FAILED, limits, top),
                at=at,
            ),
            ev.MAX_EVENT_BYTES,
        )
        try:
            record = record_of(event)
        except Exception:
            self.failures += 1
            log.exception("an audit.refusals_folded event does not fit the schema")
            self.folder.unwritten(summary)
            return
        assert self._wake is not None
        self._pending.append((record, None, lambda: self.folder.unwritten(summary)))
        self._wake.set()

    def tick(self) -> None:
        """Write the summary of a window that has ended, and retry a summary of
        dropped refusals."""
        self._summarise(self.folder.due(self.clock()))
        if self.folder.owed:
            self._summarise(self.folder.take_dropped())

    async def _tick_loop(self) -> None:
        interval = min(1.0, self.folder.limits.window / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick()
            except Exception:  # the loop must survive anything
                log.exception("closing a refusal window failed")

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
                await asyncio.get_running_loop().run_in_executor(
                    self._writer, self.audit.append, [r for r, _, _ in batch]
                )
            except Exception as exc:
                self.failures += 1
                log.error("audit log write failed for %d events: %s", len(batch), exc)
                for _, future, on_failure in batch:
                    if future is not None and not future.done():
                        future.set_exception(exc)
                    if on_failure is not None:
                        on_failure()
                continue
            for _, future, _ in batch:
                if future is not None and not future.done():
                    future.set_result(None)

    async def close(self) -> None:
        """Write what is pending, the summary of the open refusal window included,
        then stop (SIGTERM)."""
        for task in (self._ticker, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._wake is not None:
            self._summarise(self.folder.flush())
        await self._flush()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        held = self.folder.pending()
        if held["dropped"]:
            log.error(
                "audit: %d refused exchanges could not be recorded before stopping",
                held["dropped"],
            )


# -- event builders ------------------------------------------------------------------------
def issued_event(
    source: Mapping[str, Any],
    result: Exchanged,
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
            "token_sha256": result.subject_token_sha256,
            **({"template": result.template} if result.template else {}),
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


def claimed_facts(subject_token: str | None) -> dict[str, str]:
    """``iss``, ``sub``, ``kid`` and ``jti`` of a presented token, read *unverified*
    (those it has): what the token claims, not what it proved."""
    if not subject_token:
        return {}
    try:
        unverified = parse_unverified(subject_token)
    except Exception:
        return {}
    claimed = {
        "iss": _short(unverified.claims.get("iss")),
        "sub": _short(unverified.claims.get("sub")),
        "kid": _short(unverified.kid),
        "jti": _short(unverified.claims.get("jti")),
    }
    return {k: v for k, v in claimed.items() if v}


def exchange_failed_event(
    source: Mapping[str, Any],
    error: str,
    description: str,
    subject_token: str | None,
    trace_id: str | None,
    span_id: str | None,
    claimed: Mapping[str, str] | None = None,
    surface: str = "token",
) -> dict[str, Any]:
    """A refused exchange. Provenance comes from the token's unverified claims, marked
    as claimed: the token did not prove them (``claimed``: :func:`claimed_facts`,
    when the caller has read them already)."""
    identity: dict[str, Any] = {}
    if subject_token:
        identity["token_sha256"] = ev.token_sha256(subject_token)
    if claimed is None:
        claimed = claimed_facts(subject_token)
    return ev.new_event(
        ev.TOKEN_EXCHANGE_FAILED,
        source=source,
        actor="anonymous",
        identity=identity,
        request={"surface": surface},
        decision={"allowed": False, "reason": f"{error}: {description}"[:500]},
        detail={"error": error, "claimed": dict(claimed) or None},
        trace_id=trace_id,
        span_id=span_id,
    )


def actor_name(actor: str) -> str:
    """Actors in audit events: the authenticated principal — ``user:NAME`` for a person
    (``user:bootstrap`` for the bootstrap admin.token; a claimed ``--author`` is never
    the actor), ``cluster:NAME`` for agents, ``system`` for the server itself
    (``admin:NAME`` for its own operations, e.g. ``admin:restore``)."""
    if actor.startswith(("user:", "admin:", "cluster:", "spiffe://")) or actor in (
        "system",
        "admin",
    ):
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
