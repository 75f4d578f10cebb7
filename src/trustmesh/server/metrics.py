"""The control plane's Prometheus metrics (``GET /metrics``): counters the token
endpoint bumps, and audit figures read at scrape time from their owners."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from trustmesh.audit.canonical import parse_time
from trustmesh.audit.log import AuditLog
from trustmesh.common.clock import Clock
from trustmesh.common.errors import CanonicalError
from trustmesh.common.histogram import LAG_BUCKETS
from trustmesh.common.histogram import Histogram as LagHistogram
from trustmesh.identity.kubernetes_sa import VerifiedSaTokenCache
from trustmesh.manifests import DETECTOR_NAMES
from trustmesh.server.recorder import AuditRecorder
from trustmesh.storage import Database
from trustmesh.storage.schema import analytics_state, anomalies, audit_entries

REPORTS_KEPT_FOR = 86400.0
"""An agent whose last report is older than this is no longer exposed (gone for good)."""


class SequencingLag(Collector):
    """Event time to sequencing, for the events agents ship (``POST
    /v1/audit/events``): one observation per accepted event, no lock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.histogram = LagHistogram(LAG_BUCKETS)

    def observe(self, events: Iterable[Mapping[str, Any]]) -> None:
        now = self.clock()
        for event in events:
            try:
                at = parse_time(event["time"]).timestamp()
            except (KeyError, TypeError, CanonicalError):
                continue
            self.histogram.observe(max(0.0, now - at))

    def collect(self) -> Any:
        family = HistogramMetricFamily(
            "trustmesh_audit_sequencing_lag_seconds",
            "From an agent's audit event (its time) to its place in the log (sequenced "
            "by this replica)",
        )
        buckets, total = self.histogram.samples()
        family.add_metric([], buckets, total)
        yield family


class AuditSourcesCollector(Collector):
    """Per cluster, the events the log knows are missing (the gaps of its sources:
    sequence numbers an agent skipped) and how long since a source of it shipped.
    Read at scrape time (two queries)."""

    def __init__(self, audit: AuditLog, clock: Clock) -> None:
        self.audit = audit
        self.clock = clock

    def collect(self) -> Any:
        now = self.clock()
        missing: dict[str, int] = {}
        quiet: dict[str, float] = {}
        for source in self.audit.sources():
            cluster = str(source["cluster"] or "")
            count = sum(last - first + 1 for first, last in source["gaps"])
            missing[cluster] = missing.get(cluster, 0) + count
            age = max(0.0, now - float(source["last_seen"] or 0.0))
            quiet[cluster] = min(quiet.get(cluster, age), age)
        gaps = GaugeMetricFamily(
            "trustmesh_audit_missing_events",
            "Agent audit events the log knows are missing (sequence gaps of the "
            "cluster's sources, since the log began)",
            labels=["cluster"],
        )
        last = GaugeMetricFamily(
            "trustmesh_audit_source_quiet_seconds",
            "Seconds since the most recent batch of any audit source of the cluster",
            labels=["cluster"],
        )
        for cluster in sorted(missing):
            gaps.add_metric([cluster], float(missing[cluster]))
            last.add_metric([cluster], quiet[cluster])
        yield gaps
        yield last


class AnalyticsCollector(Collector):
    """The anomaly detectors as the database records them, read at scrape time (two
    queries), so every replica reports the deployment's figures whichever process runs
    the detectors (``server/analysis.py``): the findings per detector (the rows of
    ``anomalies``) and the runner's backlog (the log's last index minus the runner's
    committed cursor)."""

    def __init__(self, db: Database, runner: str) -> None:
        self.db = db
        self.runner = runner  # the analytics_state row

    def collect(self) -> Any:
        with self.db.engine.connect() as conn:
            counts: dict[str, int] = {
                str(detector): int(n)
                for detector, n in conn.execute(
                    select(anomalies.c.detector, func.count()).group_by(anomalies.c.detector)
                )
            }
            last = conn.execute(select(func.max(audit_entries.c.idx))).scalar()
            cursor = conn.execute(
                select(analytics_state.c.cursor).where(analytics_state.c.name == self.runner)
            ).scalar()
        found = CounterMetricFamily(
            "trustmesh_anomalies",
            "Anomalies the detectors recorded, by detector (DESIGN §11): the deployment's "
            "total, read from the database (every replica reports the same)",
            labels=["detector"],
        )
        for detector in sorted({*DETECTOR_NAMES, *counts}):
            found.add_metric([str(detector)], float(counts.get(detector, 0)))
        yield found
        backlog = GaugeMetricFamily(
            "trustmesh_analytics_backlog_entries",
            "Audit entries the anomaly detectors have not read yet (the log's last index "
            "minus the runner's committed cursor; the deployment's, read from the database)",
        )
        last_index = -1 if last is None else int(last)
        read = last_index if cursor is None else int(cursor)
        backlog.add_metric([], float(max(0, last_index - read)))
        yield backlog


AgentReports = Callable[[], Mapping[str, list[dict[str, Any]]]]


class AgentStatusCollector(Collector):
    """Per agent, from the reports agents make with each bundle poll (``agent_status``,
    shared by every replica): how long since it reported, and how far and how long it
    is behind the policy bundle in force. Read at scrape time (one query)."""

    def __init__(
        self,
        reports: AgentReports,
        version: Callable[[], tuple[int, int]],
        published_at: Callable[[], float],
        clock: Clock,
    ) -> None:
        self.reports = reports
        self.version = version
        self.published_at = published_at
        self.clock = clock

    def collect(self) -> Any:
        now = self.clock()
        current = self.version()
        published = self.published_at()
        age = GaugeMetricFamily(
            "trustmesh_agent_status_report_age_seconds",
            "Seconds since the agent last polled for its policy bundle (a long poll "
            "reports on each round: at most ~35 s while it is healthy)",
            labels=["cluster", "agent"],
        )
        behind = GaugeMetricFamily(
            "trustmesh_agent_status_policy_revisions_behind",
            "Policy revisions between the bundle in force at the control plane and the "
            "one the agent last reported applying",
            labels=["cluster", "agent"],
        )
        lag = GaugeMetricFamily(
            "trustmesh_agent_status_policy_lag_seconds",
            "0 when the agent's last report names the bundle version in force; else "
            "seconds since that version was published (how long it has been behind)",
            labels=["cluster", "agent"],
        )
        for cluster, agents in sorted(self.reports().items()):
            for report in agents:
                seen = float(report["lastSeen"])
                if now - seen > REPORTS_KEPT_FOR:
                    continue
                labels = [cluster, str(report["agentId"])]
                applied = (int(report["appliedRevision"]), int(report["appliedRegistryRevision"]))
                age.add_metric(labels, max(0.0, now - seen))
                behind.add_metric(labels, float(max(0, current[0] - applied[0])))
                lag.add_metric(labels, 0.0 if applied >= current else max(0.0, now - published))
        yield age
        yield behind
        yield lag


class ServerMetrics:
    def __init__(
        self,
        audit: AuditLog,
        recorder: AuditRecorder,
        sa_tokens: VerifiedSaTokenCache,
        clock: Clock,
    ) -> None:
        self.registry = CollectorRegistry()
        self.sequencing = SequencingLag(clock)
        self.registry.register(self.sequencing)
        self.registry.register(AuditSourcesCollector(audit, clock))
        Gauge(
            "trustmesh_sa_token_cache_entries",
            "Verified service-account tokens kept for the exchanges that present them again",
            registry=self.registry,
        ).set_function(lambda: len(sa_tokens))
        Gauge(
            "trustmesh_sa_token_cache_hits",
            "Exchanges whose service-account token was verified before (since start)",
            registry=self.registry,
        ).set_function(lambda: sa_tokens.hits)
        Gauge(
            "trustmesh_audit_entries",
            "Entries in the audit log (this replica's view)",
            registry=self.registry,
        ).set_function(lambda: audit.size)
        Gauge(
            "trustmesh_audit_inconsistent",
            "1 when the stored audit log no longer extends its last signed checkpoint",
            registry=self.registry,
        ).set_function(lambda: 1.0 if audit.inconsistent else 0.0)
        Gauge(
            "trustmesh_audit_write_failures",
            "Control-plane audit events that could not be written (since start)",
            registry=self.registry,
        ).set_function(lambda: recorder.failures)
        Gauge(
            "trustmesh_audit_refusals_folded",
            "Refused exchanges counted in an audit.refusals_folded summary instead of an "
            "event of their own (since start)",
            registry=self.registry,
        ).set_function(lambda: recorder.folder.folded_total)
        Gauge(
            "trustmesh_audit_refusals_dropped",
            "Refused exchanges whose record could not be written when due, reported by a "
            "later summary (since start)",
            registry=self.registry,
        ).set_function(lambda: recorder.folder.dropped_total)
        self.exchanges = Counter(
            "trustmesh_token_exchanges_total",
            "Token exchanges by result",
            ["result"],
            registry=self.registry,
        )
        self.exchange_seconds = Histogram(
            "trustmesh_token_exchange_seconds",
            "Token exchange latency inside the server",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
            registry=self.registry,
        )
        self.x509_svids = Counter(
            "trustmesh_x509_svids_total",
            "X.509-SVID requests (POST /v1/x509-svid) by result",
            ["result"],
            registry=self.registry,
        )
        self.x509_svid_seconds = Histogram(
            "trustmesh_x509_svid_seconds",
            "X.509-SVID issuance latency inside the server",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
            registry=self.registry,
        )
        self.access_fulfillment = Histogram(
            "trustmesh_access_request_fulfillment_seconds",
            "Time from an access request to its approval (observed by the replica that "
            "approved it)",
            buckets=(60, 300, 900, 1800, 3600, 4 * 3600, 8 * 3600, 86400, 3 * 86400, 7 * 86400),
            registry=self.registry,
        )
