"""What a detector reports (minimal version; helper "core" owns the full one)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

DETECTORS = (
    "new_edge",
    "denial_burst",
    "refusal_burst",
    "wrong_cluster",
    "escalation",
    "dormant_use",
    "concurrent_use",
)
MAX_EVIDENCE = 100
MAX_SUMMARY = 500

Severity = Literal["low", "medium", "high"]


@dataclass(frozen=True)
class Finding:
    """One anomaly: ``key`` is stable (what the finding is about, used against double
    reporting), ``evidence`` the audit indexes of the entries that triggered it."""

    detector: str
    key: str
    subject: dict[str, Any]
    summary: str
    evidence: list[int]
    severity: Severity
    detected_at: float
    window: list[float]
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
