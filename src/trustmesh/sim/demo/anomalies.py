"""The demo's count of what the security analytics found (issue 15): every finding the
control plane's detectors recorded over the demo's log, in three kinds:

- about the intruder's attempts (expected: the demo stages them);
- about the demo's own changes, which the detectors are right to point out for review:
  an ``escalation`` of a policy revision the demo published or an access it approved,
  a ``new_edge`` first reached through a grant one of them opened (the good policy
  change, the access request), and the ``denial_burst`` of the life cycle act polling
  the agent every 5 ms until an approval is in force;
- about normal traffic: false positives, which the demo reports as problems, so the
  demo's normal traffic staying quiet is checked on every run.

The demo's AnomalyPolicy (``scenario.ANOMALY_DETECTORS``) lets every detector report
after the first seconds, so the count covers all of them, not only those the defaults
leave live on a fresh federation."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from trustmesh.sim.demo.scenario import (
    ACCESS_CALL,
    ONBOARDED,
    ROUTES,
    TRUST_DOMAIN,
    onboarded_workload,
)
from trustmesh.spiffeid import workload_spiffe_id

ANALYSIS_WAIT = 15.0  # the runner reads the log once a second, 500 entries a round


@dataclass
class AnomalyCount:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _listing(http: httpx.Client, url: str, token: str) -> dict[str, Any]:
    answer = http.get(url + "/v1/anomalies", headers={"Authorization": f"Bearer {token}"})
    answer.raise_for_status()
    listing: dict[str, Any] = answer.json()
    return listing


def about_intruder(finding: dict[str, Any], rogue_issuer: str) -> bool:
    """Whether a finding is about the demo's intruder: its forged service-account tokens
    come from the unregistered cluster's issuer."""
    return finding.get("subject") == {"issuer": rogue_issuer}


def onboarded_spiffe_id() -> str:
    return workload_spiffe_id(TRUST_DOMAIN, ONBOARDED.cluster, ONBOARDED.namespace, ONBOARDED.name)


def opened_edges() -> set[tuple[str, str]]:
    """(workload, host) edges a staged change opens: the routes the good policy change
    turns from deny to allow, and the access request's call."""
    opened = {
        (route.workload, route.call.host)
        for route in ROUTES
        if route.expect[0].verdict == "deny" and route.expect[1].verdict == "allow"
    }
    return opened | {(onboarded_workload(), ACCESS_CALL.host)}


def about_staged_change(finding: dict[str, Any]) -> bool:
    """Whether a finding is about a change the demo made on purpose."""
    if finding.get("detector") == "escalation":
        return True  # every policy publish and access approval in the demo is its own
    if finding.get("detector") == "denial_burst":
        # the life cycle act asks the agent every 5 ms whether the onboarded identity's
        # access is in force yet: each ask before the approval arrives is a denial
        return finding.get("subject") == {"spiffeId": onboarded_spiffe_id()}
    details = finding.get("details") or {}
    edge = (details.get("workload"), details.get("host"))
    return finding.get("detector") == "new_edge" and edge in opened_edges()


def count_anomalies(
    http: httpx.Client,
    server_url: str,
    admin_token: str,
    log_size: int,
    rogue_issuer: str,
    say: Callable[[str], None],
) -> AnomalyCount:
    """Wait until the detectors have read the first ``log_size`` entries, then count."""
    count = AnomalyCount()
    deadline = time.monotonic() + ANALYSIS_WAIT
    try:
        listing = _listing(http, server_url, admin_token)
        while listing["analyzedThrough"] < log_size and time.monotonic() < deadline:
            time.sleep(0.2)
            listing = _listing(http, server_url, admin_token)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        count.problems.append(f"anomalies: could not list them ({exc})")
        return count
    if listing["analyzedThrough"] < log_size:
        count.problems.append(
            f"anomalies: the detectors read {listing['analyzedThrough']} of {log_size} "
            f"entries in {ANALYSIS_WAIT:g} s"
        )
    items: list[dict[str, Any]] = listing["items"]
    intruder = [f for f in items if about_intruder(f, rogue_issuer)]
    staged = [f for f in items if f not in intruder and about_staged_change(f)]
    false = [f for f in items if f not in intruder and f not in staged]
    count.lines.append(
        f"analytics: {len(items)} finding(s) over {log_size} entries: "
        f"{len(intruder)} about the intruder ({_kinds(intruder)}), "
        f"{len(staged)} about the demo's own changes ({_kinds(staged)}), "
        f"{len(false)} on normal traffic (false positives)"
    )
    for finding in false:
        say(f"analytics: false positive {finding['detector']}: {finding['summary']}")
        count.problems.append(
            f"analytics: a finding on normal traffic: {finding['detector']} {finding['key']}"
        )
    return count


def _kinds(findings: list[dict[str, Any]]) -> str:
    counted = Counter(f["detector"] for f in findings)
    return ", ".join(f"{n} {k}" for k, n in sorted(counted.items())) or "none"
