"""``GET /v1/report`` (DESIGN §11): the control plane's side of ``trustmesh report`` —
the registry and policy in force, their PolicyTest results (which bindings each case
matched), the stale identities, and the counters of what this replica dropped, handed
to ``analytics/report.py``, which reads the window's audit entries page by page."""

from __future__ import annotations

from typing import Any

from trustmesh.analytics.report import ReportInputs, build_report, window
from trustmesh.common.errors import PolicyError
from trustmesh.policy.testing import CaseResult, run_policy_tests
from trustmesh.server.inventory import Inventory
from trustmesh.server.snapshots import Snapshots
from trustmesh.server.usage import UsageTracker
from trustmesh.storage import Database

DEFAULT_STALE_DAYS = 30.0


class Reports:
    def __init__(
        self,
        db: Database,
        snapshots: Snapshots,
        inventory: Inventory,
        usage: UsageTracker | None = None,
    ) -> None:
        self.db = db
        self.snapshots = snapshots
        self.inventory = inventory
        self.usage = usage

    def report(
        self,
        since: str | None,
        until: str | None,
        now: float,
        stale_days: float = DEFAULT_STALE_DAYS,
    ) -> dict[str, Any]:
        """The report of the window (InvalidRequest for a bad ``since``/``until``)."""
        start, end = window(since, until, now)
        registry, policy = self.snapshots.registry, self.snapshots.policy
        tests: list[CaseResult]
        try:
            tests = run_policy_tests(policy, registry)
        except (PolicyError, KeyError):  # an unpublishable policy cannot be in force
            tests = []
        inputs = ReportInputs(
            registry=registry,
            policy=policy,
            policy_revision=self.snapshots.policy_revision,
            tests=tests,
            stale=self.inventory.stale(stale_days, now),
            stale_days=stale_days,
        )
        body = build_report(self.db, inputs, start, end, now)
        if self.usage is not None:
            body["completeness"]["pendingDroppedByThisReplica"] = self.usage.dropped
        return {"kind": "Report", **body}
