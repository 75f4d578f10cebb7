"""The agent's Prometheus metrics (``GET /metrics``). Counters the decision pipeline
bumps (plain increments on the hot path); everything else is read at scrape time from
its owner, so no figure is kept twice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from trustmesh.agent.audit import AuditShipper, DecisionAudit
from trustmesh.agent.authn import Authenticator
from trustmesh.agent.revocations import RevocationHolder


class AuditCollector(Collector):
    """The spool's and the shipper's figures."""

    def __init__(self, audit: DecisionAudit, shipper: AuditShipper) -> None:
        self.audit = audit
        self.shipper = shipper

    def collect(self) -> Any:
        spool = self.shipper.spool
        yield CounterMetricFamily(
            "trustmesh_agent_audit_unavailable",
            "Questions answered 503 because their decision could not be spooled",
            value=self.audit.failures,
        )
        yield CounterMetricFamily(
            "trustmesh_agent_audit_refusals_folded",
            "Refusals of unauthenticated questions counted in an audit.refusals_folded "
            "summary instead of an event of their own (the window's quota was used up)",
            value=self.audit.folder.folded_total,
        )
        yield CounterMetricFamily(
            "trustmesh_agent_audit_refusals_dropped",
            "Refusals of unauthenticated questions whose record could not be spooled when "
            "due, reported as dropped by a later summary",
            value=self.audit.folder.dropped_total,
        )
        yield CounterMetricFamily(
            "trustmesh_agent_audit_spooled",
            "Decision events written to the audit spool by this process",
            value=spool.appended,
        )
        yield CounterMetricFamily(
            "trustmesh_agent_audit_shipped",
            "Audit events the control plane acknowledged (duplicates of a resend included)",
            value=self.shipper.shipped,
        )
        yield CounterMetricFamily(
            "trustmesh_agent_audit_ship_failures",
            "Audit batches the control plane did not take (unreachable, 5xx, refused)",
            value=self.shipper.failures,
        )
        yield GaugeMetricFamily(
            "trustmesh_agent_audit_spool_backlog",
            "Audit events spooled but not yet acknowledged by the control plane",
            value=spool.backlog,
        )
        yield GaugeMetricFamily(
            "trustmesh_agent_audit_spool_segments",
            "Segment files in the audit spool",
            value=len(spool.segments()),
        )


class AgentMetrics:
    def __init__(
        self,
        authn: Authenticator,
        revocations: RevocationHolder,
        state_age: Callable[[], float | None],
        audit: DecisionAudit,
        shipper: AuditShipper,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(AuditCollector(audit, shipper))
        self.authentications = Counter(
            "trustmesh_agent_authentications_total",
            "Token authentications by result",
            ["result"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "trustmesh_agent_decisions_total",
            "Authorization decisions by outcome",
            ["outcome"],
            registry=self.registry,
        )
        # The children every decision bumps, looked up once (labels() takes a lock).
        self.authenticated = self.authentications.labels("ok")
        self.allowed = self.decisions.labels("allow")
        self.denied = self.decisions.labels("deny")
        Gauge(
            "trustmesh_agent_cache_entries", "Verified-token cache entries", registry=self.registry
        ).set_function(lambda: len(authn.cache))
        Gauge(
            "trustmesh_agent_revocation_age_seconds",
            "Seconds since the revocation list was last confirmed with the control plane",
            registry=self.registry,
        ).set_function(revocations.age)
        Gauge(
            "trustmesh_agent_revocation_stale",
            "1 when the revocation list is older than its staleness bound",
            registry=self.registry,
        ).set_function(lambda: 1.0 if revocations.stale() else 0.0)
        Gauge(
            "trustmesh_agent_revocation_fail_open",
            "1 when the agent keeps answering from a stale revocation list",
            registry=self.registry,
        ).set_function(lambda: 1.0 if revocations.fail_open else 0.0)

        def age() -> float:
            value = state_age()
            return float("inf") if value is None else value

        Gauge(
            "trustmesh_agent_state_age_seconds",
            "Seconds since the last successful sync with the control plane",
            registry=self.registry,
        ).set_function(age)
