"""The agent's side of the audit log (DESIGN §6): an ``authz.decision`` event for every
answer on every surface, written to the durable spool before the answer leaves, and
shipped in batches to the control plane.

Events say who asked (the verified identity's provenance, and of the token only its
SHA-256), what was asked (the surface and the request attributes), what was decided
and why (the engine's decision), and the W3C trace the request belongs to. A request
whose token does not authenticate is a decision too: ``allowed: false``, reason
``unauthenticated: <reason>``.

If the spool cannot be written the agent does not answer the question: it answers 503
``audit_unavailable`` (fail closed), as the control plane refuses to issue a token
without its audit record.

Refusals of questions whose token did not verify (or that carried none) are bounded,
the same way on every surface: the first ``--audit-refusal-quota`` of a window are
spooled as events of their own, the rest are counted in the window's
``audit.refusals_folded`` summary (``audit/folding.py``), spooled when the window ends
or the agent stops. A summary that cannot be spooled is not lost count of: its counts
are carried, as ``dropped``, into a summary spooled before the next event. Decisions
about identities whose token verified — allowed, denied, revoked — are never folded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

from trustmesh.agent.controlplane import ControlPlaneClient
from trustmesh.agent.spool import MAX_LINE_BYTES, AuditSpool, Batch, LineTooLong
from trustmesh.agent.xfcc import X509_SVID, XfccHeader
from trustmesh.audit.canonical import parse_time
from trustmesh.audit.events import (
    AUTHZ_DECISION,
    REFUSALS_FOLDED,
    new_event,
    new_event_id,
    now_time,
    token_sha256,
)
from trustmesh.audit.folding import (
    DEFAULT_AGENT_LIMITS,
    FoldingLimits,
    Refusal,
    RefusalFolder,
    Summary,
    fitted,
)
from trustmesh.common.backoff import Backoff
from trustmesh.common.clock import Clock, system_clock
from trustmesh.common.errors import (
    AuditRejected,
    AuditUnavailable,
    CanonicalError,
    CredentialRejected,
    SpoolError,
    Unreachable,
)
from trustmesh.common.tracing import Span
from trustmesh.identity.login import is_person
from trustmesh.identity.svid import VerifiedIdentity
from trustmesh.identity.x509validate import VerifiedSvid
from trustmesh.policy.engine import Decision, Engine

log = logging.getLogger("trustmesh.agent.audit")

MAX_ACTOR = 512  # the schema's limit for event.actor
SHRUNK_STRING = 256  # what a long request attribute keeps when an event is too large
SHRUNK_LIST = 20


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def identity_provenance(
    identity: VerifiedIdentity, token: str | VerifiedSvid | None
) -> dict[str, Any]:
    """``identity`` of an event from a verified token: who, from where, which token; or
    from a verified client certificate: the credential kind, its serial and the SHA-256
    of its DER (never the certificate)."""
    claims = identity.claims
    if is_person(identity):  # a login token: the person is the event's actor
        return {
            "jti": identity.jti,
            "kid": identity.kid,
            "token_sha256": token_sha256(token) if isinstance(token, str) else None,
        }
    if isinstance(token, VerifiedSvid):
        return {
            "spiffe_id": identity.spiffe_id,
            "workload": _text(claims.get("workload_id")),
            "origin_cluster": _text(claims.get("cluster")),
            "credential": X509_SVID,
            "x509_serial": token.serial,
            "x509_sha256": token.sha256,
        }
    return {
        "spiffe_id": identity.spiffe_id,
        "workload": _text(claims.get("workload_id")),
        "origin_cluster": _text(claims.get("cluster")),
        "jti": identity.jti,
        "kid": identity.kid,
        "token_sha256": token_sha256(token) if token is not None else None,
    }


def registered_provenance(
    engine: Engine, spiffe_id: str, claims: Mapping[str, Any]
) -> dict[str, Any]:
    """``identity`` of a SubjectAccessReview event: the API server authenticated the
    user; the bundle's inventory says which workload and cluster it is (no token)."""
    entry = engine.identity(spiffe_id) or {}
    return {
        "spiffe_id": spiffe_id,
        "workload": _text(entry.get("workload")),
        "origin_cluster": _text(claims.get("cluster")),
    }


def _refused_credential(
    token: str | XfccHeader | None, digest: str | None
) -> dict[str, Any] | None:
    """``identity`` of a refusal's event: the token's hash, or the kind and hash of a
    forwarded client certificate (computed only for an event that is spooled)."""
    if isinstance(token, XfccHeader):
        return {"credential": X509_SVID, "x509_sha256": token.der_sha256()}
    return {"token_sha256": digest} if digest else None


def decision_fields(decision: Decision, reason: str | None = None) -> dict[str, Any]:
    """``decision`` of an event from the engine's decision (``reason`` overrides)."""
    return {
        "allowed": decision.allowed,
        "reason": reason or decision.reason,
        "policy_revision": decision.policy_revision,
        "bindings": list(decision.bindings),
        "roles": list(decision.roles),
        "decision_id": decision.decision_id,
    }


def refusal(reason: str, revision: int | None) -> dict[str, Any]:
    """``decision`` of an event for an answer the engine did not give (no token, no
    opinion…): always ``allowed: false``."""
    return {"allowed": False, "reason": reason, "policy_revision": revision}


def _without_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {key: _without_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_surrogates(item) for item in value]
    return value


def shrunk(event: dict[str, Any]) -> dict[str, Any]:
    """An event that fits the spool and the schema: lone surrogates replaced (JSON
    allows them in requests, JSON text of the log does not), long request attributes
    and the reason cut, long binding lists cut. Only for the rare event that needs it."""
    event = _without_surrogates(event)
    request = event.get("request")
    if isinstance(request, dict):
        for key, value in request.items():
            if isinstance(value, str) and len(value) > SHRUNK_STRING:
                request[key] = value[:SHRUNK_STRING] + "…"
    decision = event.get("decision")
    if isinstance(decision, dict):
        reason = decision.get("reason")
        if isinstance(reason, str) and len(reason) > 2 * SHRUNK_STRING:
            decision["reason"] = reason[: 2 * SHRUNK_STRING] + "…"
        for key in ("bindings", "roles"):
            items = decision.get(key)
            if isinstance(items, list) and len(items) > SHRUNK_LIST:
                decision[key] = [*items[:SHRUNK_LIST], f"… {len(items) - SHRUNK_LIST} more"]
    return event


def _cleaned(part: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """``part`` without ``None`` members (copied only when it has some), None if empty."""
    if not part:
        return None
    if None in part.values():
        part = {key: value for key, value in part.items() if value is not None}
    return part or None


def decision_event(
    source: Mapping[str, Any],
    cluster: str,
    actor: str | None,
    identity: Mapping[str, Any] | None,
    request: Mapping[str, Any] | None,
    decision: Mapping[str, Any] | None,
    span: Span,
) -> dict[str, Any]:
    """An ``authz.decision`` event: what :func:`trustmesh.audit.events.new_event`
    builds (same members, same order, ``None`` left out), without its per-event
    ``uuid.UUID`` and ``datetime`` objects, which cost more than the rest of the
    decision's audit together (tests/agent/test_audit_spool.py holds the two equal)."""
    event: dict[str, Any] = {
        "event_id": new_event_id(),
        "type": AUTHZ_DECISION,
        "time": now_time(),
        "source": dict(source),
        "cluster": cluster,
    }
    if actor is not None:
        event["actor"] = actor
    for name, part in (("identity", identity), ("request", request), ("decision", decision)):
        cleaned = _cleaned(part)
        if cleaned is not None:
            event[name] = cleaned
    event["trace_id"] = span.trace_id
    event["span_id"] = span.span_id
    return event


class DecisionAudit:
    """Builds the ``authz.decision`` events of one agent and spools them, folding
    refusals of unauthenticated questions beyond the quota of their window."""

    def __init__(
        self,
        spool: AuditSpool,
        cluster: str,
        agent: str,
        *,
        clock: Clock = system_clock,
        refusals: FoldingLimits = DEFAULT_AGENT_LIMITS,
    ) -> None:
        self.spool = spool
        self.cluster = cluster
        self.source = {"kind": "agent", "id": spool.source_id, "agent": agent}
        self.clock = clock
        self.folder = RefusalFolder(refusals)
        self.failures = 0

    def record(
        self,
        span: Span,
        request: Mapping[str, Any],
        decision: Mapping[str, Any],
        identity: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> int:
        """Spool one decision; its seq. Raises AuditUnavailable when it cannot be."""
        if self.folder.owed:  # refusals dropped earlier are reported before this event
            self._spool_summary(self.folder.take_dropped())
        event = decision_event(
            self.source,
            self.cluster,
            actor if actor is None or len(actor) <= MAX_ACTOR else None,
            identity,
            request,
            decision,
            span,
        )
        try:
            try:
                return self.spool.append(event)
            except (LineTooLong, orjson.JSONEncodeError):
                return self.spool.append(shrunk(event))
        except (SpoolError, LineTooLong, orjson.JSONEncodeError) as exc:
            self.failures += 1
            log.error("audit: cannot spool a decision, answering 503: %s", exc)
            raise AuditUnavailable(
                "the decision cannot be written to the audit spool; no answer is given "
                "without its audit record"
            ) from None

    def decided(
        self,
        span: Span,
        request: Mapping[str, Any],
        identity: VerifiedIdentity,
        token: str | VerifiedSvid | None,
        decision: Decision,
        reason: str | None = None,
    ) -> int:
        """An engine decision about a verified identity (``token``: the bearer token, or
        the verified client certificate)."""
        return self.record(
            span,
            request,
            decision_fields(decision, reason),
            identity_provenance(identity, token),
            identity.spiffe_id,
        )

    def token_reviewed(
        self,
        span: Span,
        request: Mapping[str, Any],
        identity: VerifiedIdentity,
        token: str,
        authenticated: bool,
        revision: int | None,
    ) -> int:
        """A TokenReview of a token that verified: ``allowed`` is whether it
        authenticated (it does not when the API server asks for another audience)."""
        reason = "authenticated" if authenticated else "unauthenticated: audience_mismatch"
        return self.record(
            span,
            request,
            {"allowed": authenticated, "reason": reason, "policy_revision": revision},
            identity_provenance(identity, token),
            identity.spiffe_id if authenticated else None,
        )

    def access_reviewed(
        self,
        span: Span,
        request: Mapping[str, Any],
        engine: Engine,
        user: str,
        claims: Mapping[str, Any] | None,
        decision: Decision | None,
    ) -> int:
        """A SubjectAccessReview: the engine's decision about a registered user, or no
        opinion (not a registered identity, or no binding covers the request)."""
        if claims is None or decision is None:
            reason = "no opinion: not a registered trustmesh identity"
            return self.record(span, request, refusal(reason, engine.revision))
        no_opinion = not decision.allowed and not decision.denied
        return self.record(
            span,
            request,
            decision_fields(decision, f"no opinion: {decision.reason}" if no_opinion else None),
            registered_provenance(engine, user, claims),
            user,
        )

    def person_reviewed(
        self, span: Span, request: Mapping[str, Any], user: str, decision: Decision
    ) -> int:
        """A SubjectAccessReview of a person (``user:NAME``, the actor): allowed or
        denied by a binding naming them, else no opinion."""
        no_opinion = not decision.allowed and not decision.denied
        return self.record(
            span,
            request,
            decision_fields(decision, f"no opinion: {decision.reason}" if no_opinion else None),
            None,
            user,
        )

    def unauthenticated(
        self,
        span: Span,
        request: Mapping[str, Any],
        token: str | XfccHeader | None,
        reason: str,
        revision: int | None,
        description: str | None = None,
        *,
        verified: bool = False,
    ) -> int | None:
        """A token (or forwarded client certificate) that did not authenticate, or
        none: of the token only its hash, of the certificate the SHA-256 of its DER.
        Spooled (its seq), or folded into the window's summary (None) when the
        window's quota is used up. ``verified``: the credential verified but was refused
        (revoked, a stale revocation list): never folded."""
        digest = None
        if not isinstance(token, XfccHeader):
            digest = token_sha256(token) if token else None
        decision = refusal(f"unauthenticated: {reason}", revision)
        if verified:
            return self.record(span, request, decision, _refused_credential(token, digest))
        refused = Refusal(
            error=reason,
            reason=description,
            surface=_text(request.get("surface")),
            token_sha256=digest,
        )
        now = self.clock()
        verdict = self.folder.observe(now, refused)
        if verdict.due is not None:
            self._spool_summary(verdict.due)
        if not verdict.individual:
            return None
        try:
            return self.record(span, request, decision, _refused_credential(token, digest))
        except AuditUnavailable:
            self.folder.drop(now, refused)
            raise

    # -- summaries of folded refusals --------------------------------------------------
    def _spool_summary(self, summary: Summary | None) -> None:
        """Spool an ``audit.refusals_folded`` event; when it cannot be, what it counted
        is carried as dropped into the next one (spooled before the next event)."""
        if summary is None:
            return
        limits = self.folder.limits
        at = self.clock()
        event = fitted(
            lambda top: new_event(
                REFUSALS_FOLDED,
                source=self.source,
                cluster=self.cluster,
                actor="system",
                detail=summary.detail(AUTHZ_DECISION, limits, top),
                at=at,
            ),
            MAX_LINE_BYTES - 64,  # room for the seq the spool adds
        )
        try:
            self.spool.append(event)
        except (SpoolError, LineTooLong, orjson.JSONEncodeError) as exc:
            self.folder.unwritten(summary)
            log.error(
                "audit: cannot spool the summary of %d refusals (kept as dropped, reported "
                "with the next event): %s",
                summary.refusals,
                exc,
            )

    def tick(self) -> None:
        """Spool the summary of a window that has ended, and any dropped refusals."""
        self._spool_summary(self.folder.due(self.clock()))
        if self.folder.owed:
            self._spool_summary(self.folder.take_dropped())

    def flush(self) -> None:
        """On shutdown: spool the summary of the open window (and what was dropped), so
        a restart loses no count of what was folded."""
        self._spool_summary(self.folder.flush())
        held = self.folder.pending()["dropped"]
        if held:
            log.error("audit: %d refusals could not be recorded before stopping", held)

    async def run(self) -> None:
        """Close ended windows while no refusal comes to do it."""
        interval = min(1.0, self.folder.limits.window / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick()
            except Exception:  # the loop must survive anything
                log.exception("audit: closing a refusal window failed")


def event_time(lines: bytes) -> float | None:
    """The ``time`` of the first spooled event in ``lines`` (epoch seconds), or None
    when it cannot be read."""
    try:
        event = orjson.loads(lines.split(b"\n", 1)[0])
        return parse_time(event["time"]).timestamp()
    except (orjson.JSONDecodeError, KeyError, TypeError, CanonicalError):
        return None


class AuditShipper:
    """Sends spooled events to the control plane in batches, oldest first, and moves
    the spool's cursor once they are acknowledged.

    It looks for fsynced events every ``interval`` seconds and sends right away while
    there are more. Connection errors and 5xx answers are retried on the next server,
    then with backoff; a 401/403 (credential) or another 4xx (a bug: the answer is
    logged in full) is retried with backoff too. Events are never dropped."""

    def __init__(
        self,
        spool: AuditSpool,
        client: ControlPlaneClient,
        *,
        interval: float = 0.05,
        max_events: int = 1000,
        max_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.spool = spool
        self.client = client
        self.interval = interval
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.backoff = Backoff(base=0.1, cap=5.0)
        self.shipped = 0  # events acknowledged (duplicates included)
        self.duplicates = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_success = 0.0  # monotonic
        # (first seq, event time) of the batch being shipped: the oldest unacknowledged
        # event once it is fsynced (a metric; None: nothing read since the last ack)
        self._pending: tuple[int, float | None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping:
            try:
                shipped = await self.ship_once()
            except Exception as exc:  # the loop must survive anything
                self._failed(exc)
                await self._sleep(self.backoff.next_delay())
                continue
            if shipped < self.max_events:
                await self._sleep(self.interval)

    async def _sleep(self, delay: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def ship_once(self, timeout: float | None = None) -> int:
        """Send the next batch, if any; the number of events acknowledged."""
        batch = self.spool.read_batch(self.max_events, self.max_bytes)
        if batch is None:
            return 0
        if self._pending is None or self._pending[0] != batch.first_seq:
            self._pending = (batch.first_seq, event_time(batch.data))
        answer = await self.client.ship_audit(batch.body(), timeout)
        await asyncio.to_thread(self.spool.acknowledge, batch)
        self._pending = None
        self._succeeded(batch, answer)
        return batch.size

    def oldest_unshipped_age(self, now: float) -> float:
        """Seconds since the oldest event the control plane has not acknowledged was
        written (its ``time``); 0 when nothing waits or no batch was read since."""
        pending = self._pending
        if pending is None or pending[1] is None or not self.spool.backlog:
            return 0.0
        return max(0.0, now - pending[1])

    def _succeeded(self, batch: Batch, answer: Mapping[str, Any]) -> None:
        self.shipped += batch.size
        duplicates = answer.get("duplicates")
        if isinstance(duplicates, int):
            self.duplicates += duplicates
        gaps = answer.get("gaps")
        if gaps:
            log.warning("audit: the control plane reports missing events %s", gaps)
        self.backoff.reset()
        self.last_error = None
        self.last_success = time.monotonic()

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if isinstance(exc, AuditRejected):
            self.last_error = str(exc)
            log.error("audit: the control plane refused a batch (a bug; kept, retrying): %s", exc)
        elif isinstance(exc, CredentialRejected):
            self.last_error = str(exc)
            log.error("audit: %s", exc)
        elif isinstance(exc, Unreachable):
            self.last_error = f"no control plane took the batch: {exc}"
            log.warning("audit: %s", self.last_error)
        else:
            self.last_error = f"shipping failed: {exc.__class__.__name__}: {exc}"
            log.exception("audit: shipping failed")

    async def drain_all(self) -> None:
        """Ship until nothing is left (a spool no one writes any more), retrying with
        backoff; for as long as it takes."""
        await asyncio.to_thread(self.spool.sync)
        while self.spool.backlog:
            try:
                if not await self.ship_once():
                    await self._sleep(self.interval)
            except Exception as exc:  # the loop must survive anything
                self._failed(exc)
                await self._sleep(self.backoff.next_delay())

    async def drain(self, timeout: float) -> None:
        """On shutdown: fsync, then ship what is left within ``timeout`` seconds; what
        does not make it stays in the spool for the next start."""
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        await asyncio.to_thread(self.spool.sync)
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                if not await asyncio.wait_for(self.ship_once(remaining), remaining):
                    return
            except Exception as exc:
                self._failed(exc)
                return
        if self.spool.backlog:
            log.warning(
                "audit: %d events stay in the spool until the next start", self.spool.backlog
            )

    def status(self) -> dict[str, Any]:
        return {
            **self.spool.status(),
            "shipped": self.shipped,
            "ship_failures": self.failures,
            "last_ship_age_seconds": round(time.monotonic() - self.last_success, 3)
            if self.last_success
            else None,
            "last_ship_error": self.last_error,
        }
