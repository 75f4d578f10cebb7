"""The parsed AnomalyPolicy (DESIGN §11): per detector ``enabled``, ``window``,
``threshold``, ``baselineWindow``, ``warmup`` and ``quarantine``, with safe defaults when
no AnomalyPolicy is applied (every detector on, nothing quarantined). Several
AnomalyPolicy objects merge in name order, a later object's field winning."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from trustmesh.manifests import DETECTOR_NAMES, AnomalyPolicySpec


@dataclass(frozen=True)
class DetectorSettings:
    enabled: bool = True
    window: int = 300  # seconds a burst is counted over
    threshold: int = 10  # events in a window that make a burst
    baseline_window: int = 7 * 86400  # seconds of history a baseline remembers
    warmup: int = 3600  # seconds of the log seen before a baseline detector reports
    quarantine: bool = False  # suspend the finding's subject (workload, SPIFFE ID, cluster)

    def to_json(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "window": self.window,
            "threshold": self.threshold,
            "baselineWindow": self.baseline_window,
            "warmup": self.warmup,
            "quarantine": self.quarantine,
        }


DAY = 86400
# Each detector's safe defaults when no AnomalyPolicy names it (docs/analytics.md): the
# baseline detectors watch a day of the log before they report, so a fresh federation
# does not flood findings; escalation, wrong_cluster and concurrent_use need no baseline.
DEFAULTS: dict[str, DetectorSettings] = {
    "new_edge": DetectorSettings(window=3600, threshold=1, baseline_window=30 * DAY, warmup=DAY),
    "denial_burst": DetectorSettings(window=60, threshold=20, baseline_window=DAY, warmup=DAY),
    "refusal_burst": DetectorSettings(window=60, threshold=20, baseline_window=DAY, warmup=DAY),
    "wrong_cluster": DetectorSettings(window=300, threshold=1, baseline_window=DAY, warmup=0),
    "escalation": DetectorSettings(window=0, threshold=1, baseline_window=DAY, warmup=0),
    "dormant_use": DetectorSettings(window=3600, threshold=1, baseline_window=30 * DAY, warmup=DAY),
    "concurrent_use": DetectorSettings(window=60, threshold=1, baseline_window=DAY, warmup=0),
}
assert set(DEFAULTS) == set(DETECTOR_NAMES)

_FIELDS = {
    "enabled": "enabled",
    "window": "window",
    "threshold": "threshold",
    "baselineWindow": "baseline_window",
    "warmup": "warmup",
    "quarantine": "quarantine",
}


@dataclass(frozen=True)
class AnomalySettings:
    detectors: dict[str, DetectorSettings]
    revision: int = 0  # the policy revision they were read from (0: defaults)

    def of(self, detector: str) -> DetectorSettings:
        return self.detectors.get(detector, DEFAULTS.get(detector, DetectorSettings()))

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "detectors": {name: s.to_json() for name, s in sorted(self.detectors.items())},
        }

    @classmethod
    def from_specs(
        cls, specs: Iterable[tuple[str, AnomalyPolicySpec]], revision: int = 0
    ) -> AnomalySettings:
        """The settings of the AnomalyPolicy objects ``(name, spec)``, merged in name
        order over the defaults."""
        detectors = dict(DEFAULTS)
        for _, spec in sorted(specs, key=lambda pair: pair[0]):
            for name, fields in spec.detectors.items():
                changes = {_FIELDS[k]: v for k, v in fields.items() if k in _FIELDS}
                detectors[name] = replace(detectors.get(name, DetectorSettings()), **changes)
        return cls(detectors=detectors, revision=revision)


DEFAULT_SETTINGS = AnomalySettings(detectors=dict(DEFAULTS))
