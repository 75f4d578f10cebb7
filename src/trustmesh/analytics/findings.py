"""What a detector reports (DESIGN §11): a :class:`Finding`, bounded and printable, with
the audit entries it rests on. ``key`` names what the finding is about, stably: the
runner keeps one finding per (detector, key, window start), so a replay or a second
runner never reports the same thing twice."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trustmesh.common.errors import InvalidRequest
from trustmesh.manifests import DETECTOR_NAMES

SEVERITIES = ("low", "medium", "high")
MAX_SUMMARY = 500
MAX_KEY = 500
MAX_EVIDENCE = 100
MAX_DETAILS_BYTES = 8 * 1024
SUBJECT_KINDS = ("workload", "spiffeId", "cluster", "user", "issuer", "policyRevision", "actor")


def printable(text: str, limit: int) -> str:
    """``text`` on one line, control characters replaced, at most ``limit`` characters."""
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


@dataclass(frozen=True)
class Finding:
    """``window``: [start, end] epoch seconds of the events it rests on (``window[0]`` is
    part of its identity); ``evidence``: audit entry indexes, at most 100, ascending."""

    detector: str
    key: str
    subject: dict[str, Any]
    summary: str
    evidence: list[int]
    severity: str
    detected_at: float
    window: tuple[float, float]
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.detector not in DETECTOR_NAMES:
            raise InvalidRequest(f"unknown detector {self.detector!r}")
        if self.severity not in SEVERITIES:
            raise InvalidRequest(f"severity must be one of {', '.join(SEVERITIES)}")
        if not self.key or len(self.key) > MAX_KEY:
            raise InvalidRequest(f"a finding's key is 1 to {MAX_KEY} characters")
        unknown = sorted(set(self.subject) - set(SUBJECT_KINDS))
        if unknown:
            raise InvalidRequest(f"unknown subject kind {unknown[0]!r}")
        object.__setattr__(self, "summary", printable(self.summary, MAX_SUMMARY))
        object.__setattr__(self, "evidence", sorted(set(self.evidence))[:MAX_EVIDENCE])
        if len(json.dumps(self.details, sort_keys=True)) > MAX_DETAILS_BYTES:
            object.__setattr__(self, "details", {"truncated": True})

    def to_json(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "key": self.key,
            "subject": self.subject,
            "summary": self.summary,
            "evidence": self.evidence,
            "severity": self.severity,
            "detectedAt": self.detected_at,
            "window": list(self.window),
            "details": self.details,
        }


__all__ = ["DETECTOR_NAMES", "MAX_EVIDENCE", "SEVERITIES", "Finding", "printable"]
