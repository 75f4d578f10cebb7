"""The AnomalyPolicy kind, its settings, findings' bounds, and the escalation detector
over real policy versions and a real registry (DESIGN §11): what it reports for an apply
and for an access approval, what it leaves alone, and that its state survives a
snapshot and a restore (the runner persists it)."""

from __future__ import annotations

from typing import Any

import pytest

from trustmesh.analytics.escalation import EscalationDetector
from trustmesh.analytics.findings import Finding
from trustmesh.analytics.settings import DEFAULT_SETTINGS, AnomalySettings
from trustmesh.common.errors import InvalidRequest
from trustmesh.manifests import AnomalyPolicySpec, ManifestError, parse_text
from trustmesh.policy.compiler import PolicySet
from trustmesh.registry import Registry, build_registry

INVENTORY = """
apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata: {name: east}
spec: {issuer: "https://east.example"}
---
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: web}
spec:
  selector: {cluster: east, namespace: shop, serviceAccount: web}
"""
ROLES = """
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: pods}
spec: {rules: [{apiGroups: [''], resources: [pods], verbs: [get]}]}
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: secrets}
spec: {rules: [{apiGroups: [''], resources: [secrets], verbs: [get]}]}
"""


def binding(name: str, role: str) -> str:
    return f"""
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: {name}}}
spec: {{role: {role}, subjects: [{{workload: web}}], namespaces: [shop]}}
"""


VERSIONS = {
    0: "",
    1: ROLES + binding("web-pods", "pods"),
    2: ROLES + binding("web-pods", "pods") + binding("web-secrets", "secrets"),
}


def detector() -> EscalationDetector:
    registry: Registry = build_registry("corp.example", 1, parse_text(INVENTORY, "inv.yaml"))

    def policy_at(revision: int) -> PolicySet | None:
        text = VERSIONS.get(revision)
        if text is None:
            return None
        return PolicySet.from_documents(parse_text(text, "p.yaml") if text else [])

    return EscalationDetector(policy_at, lambda: registry)


def published(revision: int, via: str = "apply", actor: str = "user:ada") -> dict[str, Any]:
    return {
        "type": "policy.published",
        "time": "2026-12-01T03:00:00.000Z",
        "actor": actor,
        "detail": {"policy_revision": revision, "via": via},
    }


def approved(revision: int) -> dict[str, Any]:
    return {
        "type": "access.approved",
        "time": "2026-12-01T03:00:01.000Z",
        "actor": "user:dave",
        "detail": {
            "id": "abc123",
            "role": "secrets",
            "subject": {"workload": "web"},
            "policy_revision": revision,
        },
    }


def test_an_apply_that_grants_secrets_is_a_finding_and_one_that_does_not_is_none() -> None:
    found = detector()
    assert found.observe(10, published(1), DEFAULT_SETTINGS) == []
    (finding,) = found.observe(11, published(2), DEFAULT_SETTINGS)
    assert (finding.detector, finding.key, finding.subject) == (
        "escalation", "escalation:policy:2", {"user": "ada"},
    )  # fmt: skip
    assert finding.evidence == [11] and finding.severity == "high"
    assert finding.details["flags"] == ["secrets"]
    assert finding.window[0] == finding.window[1] == finding.detected_at


def test_an_approval_is_reported_once_with_both_entries_as_evidence() -> None:
    found = detector()
    assert found.observe(20, published(2, via="access:abc123"), DEFAULT_SETTINGS) == []
    (finding,) = found.observe(21, approved(2), DEFAULT_SETTINGS)
    assert finding.key == "escalation:access:abc123"
    assert finding.subject == {"workload": "web"} and finding.evidence == [20, 21]


def test_state_survives_a_snapshot_and_restore_and_settings_are_honoured() -> None:
    first = detector()
    first.observe(20, published(2, via="access:abc123"), DEFAULT_SETTINGS)
    second = detector()
    second.restore(first.snapshot())
    (finding,) = second.observe(21, approved(2), DEFAULT_SETTINGS)
    assert finding.evidence == [20, 21]
    off = AnomalySettings.from_specs(
        [("default", AnomalyPolicySpec({"escalation": {"enabled": False}}))]
    )
    assert detector().observe(11, published(2), off) == []
    assert (
        detector().observe(11, {"type": "policy.published", "detail": "x"}, DEFAULT_SETTINGS) == []
    )
    assert detector().observe(11, published(7), DEFAULT_SETTINGS) == []  # a version gone


def test_anomaly_policy_manifests_are_strict_and_merge_in_name_order() -> None:
    text = """
apiVersion: trustmesh.io/v1alpha1
kind: AnomalyPolicy
metadata: {name: a}
spec:
  detectors:
    escalation: {quarantine: true}
    denial_burst: {window: 1m, threshold: 20, warmup: 0}
---
apiVersion: trustmesh.io/v1alpha1
kind: AnomalyPolicy
metadata: {name: b}
spec:
  detectors:
    denial_burst: {threshold: 50, baselineWindow: 1d}
"""
    docs = parse_text(text, "anomaly.yaml")
    settings = AnomalySettings.from_specs(PolicySet.from_documents(docs).anomaly.items(), 3)
    burst = settings.of("denial_burst")
    assert (burst.window, burst.threshold, burst.warmup, burst.baseline_window) == (
        60,
        50,
        0,
        86400,
    )
    assert settings.of("escalation").quarantine is True
    assert settings.of("new_edge").quarantine is False and settings.revision == 3
    bad = """apiVersion: trustmesh.io/v1alpha1
kind: AnomalyPolicy
metadata: {name: default}
spec:
  detectors:
    escalation: {quarantine: yes-please}
    denial_brust: {threshold: 0}
    new_edge: {windw: 5}
"""
    with pytest.raises(ManifestError) as refused:
        parse_text(bad, "anomaly.yaml")
    problems = "\n".join(str(p) for p in refused.value.problems)
    assert (
        "anomaly.yaml:6: spec.detectors.escalation.quarantine: expected true or false" in problems
    )
    assert "anomaly.yaml:7: spec.detectors.denial_brust: 'denial_brust' is not one of" in problems
    assert "did you mean 'denial_burst'" in problems
    assert "anomaly.yaml:8: spec.detectors.new_edge.windw: unknown field 'windw'" in problems


def test_findings_are_bounded_and_checked() -> None:
    finding = Finding(
        detector="escalation", key="k", subject={"workload": "w"}, summary="a\x1b[31m" + "x" * 900,
        evidence=list(range(300, 0, -1)), severity="low", detected_at=1.0, window=(1.0, 1.0),
    )  # fmt: skip
    assert len(finding.summary) == 500 and "\x1b" not in finding.summary
    assert finding.evidence == list(range(1, 101))
    with pytest.raises(InvalidRequest, match="unknown detector"):
        Finding("nope", "k", {}, "s", [], "low", 1.0, (1.0, 1.0))
    with pytest.raises(InvalidRequest, match="severity"):
        Finding("escalation", "k", {}, "s", [], "urgent", 1.0, (1.0, 1.0))
