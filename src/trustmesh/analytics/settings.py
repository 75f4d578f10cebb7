"""The parsed AnomalyPolicy (minimal version; helper "core" owns the full one)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

DAY = 86400.0


@dataclass(frozen=True)
class DetectorSettings:
    """One detector's settings: ``window``, ``baseline_window`` and ``warmup`` in
    seconds; ``threshold`` a count."""

    enabled: bool = True
    window: float = 60.0
    threshold: int = 20
    baseline_window: float = DAY
    warmup: float = DAY
    quarantine: bool = False


DEFAULTS: Mapping[str, DetectorSettings] = {
    "new_edge": DetectorSettings(window=3600.0, threshold=1, baseline_window=30 * DAY),
    "denial_burst": DetectorSettings(window=60.0, threshold=20),
    "refusal_burst": DetectorSettings(window=60.0, threshold=20),
    "wrong_cluster": DetectorSettings(window=300.0, threshold=1, warmup=0.0),
    "escalation": DetectorSettings(window=0.0, threshold=1, warmup=0.0),
    "dormant_use": DetectorSettings(window=3600.0, threshold=1, baseline_window=30 * DAY),
    "concurrent_use": DetectorSettings(window=60.0, threshold=1, warmup=0.0),
}


@dataclass(frozen=True)
class AnomalySettings:
    """Per detector settings; a detector not named gets its safe default."""

    detectors: Mapping[str, DetectorSettings] = field(default_factory=dict)

    def detector(self, name: str) -> DetectorSettings:
        return self.detectors.get(name) or DEFAULTS.get(name) or DetectorSettings()
