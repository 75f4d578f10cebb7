"""Security analytics (DESIGN §11 "Anomalies and escalation"): detectors read the audit
log's events in index order and report :class:`~trustmesh.analytics.findings.Finding`
objects; ``server/analytics.py`` runs them (one replica at a time) and records what they
find. Pure logic over events: nothing here touches a database or the network, except
through what the runner hands in (``escalation``: a way to read policy versions)."""
