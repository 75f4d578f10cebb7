"""The AnomalyPolicy kind (DESIGN §11 "Anomalies and escalation"): thresholds, windows,
the warm-up before a baseline counts, and which detectors quarantine their subject. A
policy kind: versioned through the catalog like GlobalRoles and RoleBindings; one object
(by convention ``default``) is enough, several are merged in name order, a later name's
field overriding an earlier one's.

    apiVersion: trustmesh.io/v1alpha1
    kind: AnomalyPolicy
    metadata: {name: default}
    spec:
      detectors:
        escalation: {enabled: true, quarantine: true}
        denial_burst: {window: 1m, threshold: 20}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._errors import Sink
from ._nodes import Node, ScalarNode
from ._schema import INVALID, Field, choice, duration, integer, map_of, obj, type_problem

DETECTOR_NAMES = (
    "new_edge",
    "denial_burst",
    "refusal_burst",
    "wrong_cluster",
    "escalation",
    "dormant_use",
    "concurrent_use",
)
"""Every detector a finding may name (``analytics/findings.py``)."""
DETECTOR_FIELDS = ("enabled", "window", "threshold", "baselineWindow", "warmup", "quarantine")
MAX_WINDOW = 30 * 86400  # seconds: the longest window, baseline window or warm-up


def boolean(node: Node, path: str, sink: Sink) -> Any:
    """``true`` or ``false`` (a YAML boolean, never the string "yes")."""
    if not isinstance(node, ScalarNode) or not isinstance(node.value, bool):
        return type_problem(node, path, sink, "true or false")
    return node.value


DETECTOR_SPEC = obj(
    Field("enabled", boolean),
    Field("window", duration(1, MAX_WINDOW)),
    Field("threshold", integer(1, 1_000_000)),
    Field("baselineWindow", duration(1, MAX_WINDOW)),
    Field("warmup", duration(0, MAX_WINDOW)),
    Field("quarantine", boolean),
)

ANOMALY_POLICY_SPEC = obj(
    Field(
        "detectors",
        map_of(DETECTOR_SPEC, choice(*DETECTOR_NAMES)),
        default=dict,
    ),
)


@dataclass(frozen=True)
class AnomalyPolicySpec:
    """Per detector, the fields the manifest set (manifest names: ``baselineWindow``);
    what it leaves out takes the detector's default (``analytics/settings.py``)."""

    detectors: dict[str, dict[str, Any]]


def build_anomaly_policy(spec: dict[str, Any]) -> AnomalyPolicySpec:
    return AnomalyPolicySpec(
        detectors={name: dict(fields) for name, fields in spec.get("detectors", {}).items()}
    )


__all__ = [
    "ANOMALY_POLICY_SPEC",
    "DETECTOR_FIELDS",
    "DETECTOR_NAMES",
    "INVALID",
    "AnomalyPolicySpec",
    "build_anomaly_policy",
]
