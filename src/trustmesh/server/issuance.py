"""Issuance at the token endpoint (DESIGN §2, §6): one RFC 8693 exchange, traced and
audited. A token leaves only once its ``token.issued`` event is stored (group commit,
``server/recorder.py``), and when the log cannot be written the exchange fails with 503
rather than issue an unaudited token. Every refusal is recorded too: as its own
``token.exchange_failed`` event, or — beyond the first few of its source in a window —
counted in an ``audit.refusals_folded`` summary (``audit/folding.py``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from trustmesh.common.clock import Clock
from trustmesh.common.errors import NoWorkload, TrustmeshError, Unavailable
from trustmesh.common.tracing import Tracing
from trustmesh.oauth.rfc8693 import TokenExchange, parse_form
from trustmesh.registry.observed import TemplateObservations
from trustmesh.server.metrics import ServerMetrics
from trustmesh.server.recorder import AuditRecorder, issued_event
from trustmesh.server.usage import JWT_SVID, UsageTracker

SPAN_NAME = "token.exchange"
log = logging.getLogger(__name__)


async def observe(
    observations: TemplateObservations | None,
    template: str | None,
    cluster: str,
    namespace: str,
    sa: str,
    spiffe_id: str,
    now: float,
) -> None:
    """Record a template-derived identity the first time it is issued a credential
    (once per replica; a failure is logged and retried at its next credential)."""
    if observations is None or template is None:
        return
    if not observations.is_new(template, cluster, namespace, sa):
        return
    try:
        await asyncio.to_thread(
            observations.record, template, cluster, namespace, sa, spiffe_id, now
        )
    except Exception:
        log.exception("recording a template-derived identity failed")


@dataclass(frozen=True)
class Issued:
    response: dict[str, Any]  # the RFC 8693 §2.2.1 response body
    traceparent: str  # the exchange's span, for the caller to continue the trace


class Issuance:
    def __init__(
        self,
        exchange: TokenExchange,
        recorder: AuditRecorder,
        tracing: Tracing,
        metrics: ServerMetrics,
        usage: UsageTracker,
        clock: Clock,
        observations: TemplateObservations | None = None,
    ) -> None:
        self.exchange = exchange
        self.usage = usage
        self.clock = clock
        self.observations = observations
        self.recorder = recorder
        self.tracing = tracing
        self.metrics = metrics
        self._issued = metrics.exchanges.labels("issued")  # looked up once, not per token

    async def issue(
        self, body: Awaitable[bytes], traceparent: str | None, peer: str | None = None
    ) -> Issued:
        """Read the form-encoded ``body``, exchange, audit. Raises the TrustmeshError
        the caller is answered with — its RFC 6749 §5.2 code — once the refusal is
        recorded. ``peer``: the caller's address (the source refusals are limited by)."""
        started = time.perf_counter()
        source = self.recorder.source
        with self.tracing.span(SPAN_NAME, traceparent) as span:
            form: dict[str, list[str]] = {}
            try:
                form = parse_form(await body)
                result = await self.exchange.exchange(form)
            except TrustmeshError as exc:
                error = exc.error
                self.metrics.exchanges.labels(error).inc()
                span.set("trustmesh.outcome", error)
                subject = form.get("subject_token", [None])[0]
                self.recorder.exchange_refused(
                    error, exc.description, subject, peer, span.trace_id, span.span_id
                )
                if isinstance(exc, NoWorkload):  # onboarding: trustmesh get pending
                    self.usage.refused(
                        exc.cluster, exc.namespace, exc.service_account, self.clock()
                    )
                raise
            span.set("trustmesh.spiffe_id", result.spiffe_id)
            span.set("trustmesh.outcome", "issued")
            try:
                await self.recorder.record(
                    issued_event(source, result, span.trace_id, span.span_id)
                )
            except Exception:
                self.metrics.exchanges.labels("audit_unavailable").inc()
                raise Unavailable(
                    "the audit log cannot be written; no token is issued without its audit record"
                ) from None
        sa = result.sa_token
        await observe(
            self.observations,
            result.template,
            result.cluster,
            sa.namespace,
            sa.service_account,
            result.spiffe_id,
            self.exchange.clock(),
        )
        self._issued.inc()
        # keyed by SPIFFE ID; the Workload named only for an explicit one (what report
        # stale and retirement read), a template-derived identity's name is not stored
        workload = result.workload if result.template is None else None
        self.usage.credential(result.spiffe_id, workload, JWT_SVID, self.clock())
        self.metrics.exchange_seconds.observe(time.perf_counter() - started)
        return Issued(result.response, span.traceparent())
