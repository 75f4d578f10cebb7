"""The control plane's Prometheus metrics (``GET /metrics``): counters the token
endpoint bumps, and audit figures read at scrape time from their owners."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trustmesh.audit.log import AuditLog
from trustmesh.identity.kubernetes_sa import VerifiedSaTokenCache
from trustmesh.server.recorder import AuditRecorder


class ServerMetrics:
    def __init__(
        self, audit: AuditLog, recorder: AuditRecorder, sa_tokens: VerifiedSaTokenCache
    ) -> None:
        self.registry = CollectorRegistry()
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
        self.anomalies = Counter(
            "trustmesh_anomalies_total",
            "Anomalies the analytics runner recorded on this replica, by detector (DESIGN §11)",
            ["detector"],
            registry=self.registry,
        )
        self.access_fulfillment = Histogram(
            "trustmesh_access_request_fulfillment_seconds",
            "Time from an access request to its approval (observed by the replica that "
            "approved it)",
            buckets=(60, 300, 900, 1800, 3600, 4 * 3600, 8 * 3600, 86400, 3 * 86400, 7 * 86400),
            registry=self.registry,
        )
