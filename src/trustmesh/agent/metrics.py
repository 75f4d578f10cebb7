"""The agent's Prometheus metrics (``GET /metrics``). Counters the decision pipeline
bumps (plain increments on the hot path); everything else is read at scrape time from
its owner, so no figure is kept twice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from trustmesh.agent.audit import AuditShipper, DecisionAudit
from trustmesh.agent.authn import Authenticator
from trustmesh.agent.policy import PolicyHolder
from trustmesh.agent.revocations import RevocationHolder
from trustmesh.common.clock import Clock
from trustmesh.common.histogram import DECISION_BUCKETS, Histogram

ADMISSION = "admission"
DECISION_SURFACES = ("authorize", "ext_authz", "tokenreview", "subjectaccessreview", ADMISSION)
"""The surfaces as ``agent/decide.py`` names them, and the admission webhooks."""


def histogram_family(
    name: str, documentation: str, label: str | None, histograms: dict[str, Histogram]
) -> HistogramMetricFamily:
    """One histogram family from :class:`Histogram` objects, by ``label`` value (None:
    one unlabelled histogram, keyed by "")."""
    family = HistogramMetricFamily(name, documentation, labels=[label] if label else None)
    for value, histogram in histograms.items():
        buckets, total = histogram.samples()
        family.add_metric([value] if label else [], buckets, total)
    return family


class LatencyCollector(Collector):
    """Decision latency per surface, and how late policy, revocations and audit
    events arrive where they are due."""

    def __init__(
        self,
        decisions: dict[str, Histogram],
        policy: PolicyHolder,
        revocations: RevocationHolder,
        shipper: AuditShipper,
        clock: Clock,
    ) -> None:
        self.decisions = decisions
        self.policy = policy
        self.revocations = revocations
        self.shipper = shipper
        self.clock = clock

    def collect(self) -> Any:
        yield histogram_family(
            "trustmesh_agent_decision_seconds",
            "Time the agent spent answering one question, by surface (authenticate, "
            "revocation check, policy, audit spool; admission: the whole review)",
            "surface",
            self.decisions,
        )
        yield histogram_family(
            "trustmesh_agent_policy_propagation_seconds",
            "From a policy bundle's publication at the control plane (publishedAt) to "
            "its being in force at this agent",
            None,
            {"": self.policy.propagation},
        )
        policy_lag = self.policy.last_lag
        yield GaugeMetricFamily(
            "trustmesh_agent_policy_lag_seconds",
            "Propagation time of the bundle in force (NaN: it carried no publishedAt)",
            value=float("nan") if policy_lag is None else policy_lag,
        )
        yield GaugeMetricFamily(
            "trustmesh_agent_policy_revision",
            "Policy revision of the bundle in force (0: none yet)",
            value=float(self.policy.version[0]) if self.policy.version else 0.0,
        )
        yield histogram_family(
            "trustmesh_agent_revocation_propagation_seconds",
            "From a revocation's recording at the control plane (published_at) to its "
            "being enforced by this agent (entries received by the long poll)",
            None,
            {"": self.revocations.propagation},
        )
        revocation_lag = self.revocations.last_lag
        yield GaugeMetricFamily(
            "trustmesh_agent_revocation_lag_seconds",
            "Propagation time of the last revocation received by the long poll (NaN: none yet)",
            value=float("nan") if revocation_lag is None else revocation_lag,
        )
        yield GaugeMetricFamily(
            "trustmesh_agent_revocation_revision",
            "Revision of the revocation list in force",
            value=float(self.revocations.revocations.revision),
        )
        yield GaugeMetricFamily(
            "trustmesh_agent_audit_oldest_unshipped_age_seconds",
            "Age of the oldest audit event not yet acknowledged by the control plane "
            "(0: nothing waiting)",
            value=self.shipper.oldest_unshipped_age(self.clock()),
        )


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
        policy: PolicyHolder,
        clock: Clock,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(AuditCollector(audit, shipper))
        # One histogram per surface, bumped with no lock (observe_decision).
        self.decision_seconds = {
            surface: Histogram(DECISION_BUCKETS) for surface in DECISION_SURFACES
        }
        self.registry.register(
            LatencyCollector(self.decision_seconds, policy, revocations, shipper, clock)
        )
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
