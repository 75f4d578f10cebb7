"""The HTML report renders whatever the log holds as text: a name written to look like
markup stays text (no element, no script, no reference out), and the three charts are
there even for an empty window."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

from trustmesh.cli.report import render_html

HOSTILE = '<script>alert(1)</script><img src="https://evil.example/x">'


class Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.svgs: list[str] = []
        self.text: list[str] = []
        self.references: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = dict(attrs)
        if tag == "svg":
            self.svgs.append(found.get("id") or "")
        self.references += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def body(name: str, empty: bool = False) -> dict[str, Any]:
    return {
        "window": {
            "since": "2026-11-30T00:00:00Z",
            "until": "2026-12-01T00:00:00Z",
            "generatedAt": "2026-12-01T00:00:00Z",
            "entriesRead": 0 if empty else 3,
            "policyRevision": 7,
        },
        "coverage": {
            "workloads": 1,
            "covered": 0,
            "percent": 0.0,
            "uncovered": [name],
            "bindings": [
                {"name": name, "effect": "allow", "role": name, "subjects": [name], "testedBy": []}
            ],
            "exercised": [],
            "unexercised": [name],
            "testCases": 0,
        },
        "leastPrivilege": {
            "bindings": [
                {
                    "binding": name,
                    "role": name,
                    "decisions": 1,
                    "unused": False,
                    "narrower": ["rules"],
                    "manifests": [{"kind": "GlobalRole", "metadata": {"name": name}}],
                    "evidence": [4],
                }
            ],
            "unused": [],
            "narrowable": [name],
            "notInPolicy": [],
        },
        "decisions": {
            "total": 0 if empty else 3,
            "allowed": 0 if empty else 2,
            "denied": 0 if empty else 1,
            "bucketSeconds": 1800.0,
            "buckets": [
                {"start": "2026-11-30T00:00:00Z", "allowed": 0 if empty else 2, "denied": 0}
            ],
            "deniedByCluster": {} if empty else {name: 1},
            "crossCluster": [] if empty else [{"from": name, "to": "east", "count": 2}],
        },
        "completeness": {
            "sources": [
                {
                    "source": name,
                    "cluster": name,
                    "agent": name,
                    "nextSeq": 3,
                    "firstSeen": 0.0,
                    "lastSeen": 0.0,
                    "reporting": False,
                    "silentSeconds": 5.0,
                }
            ],
            "gaps": [
                {"source": name, "firstSeq": 1, "lastSeq": 2, "missing": 2, "detectedAt": 0.0}
            ],
            "gapsInWindow": 0,
            "missingInWindow": 0,
            "gapEvents": 0,
            "gapEvidence": [],
            "folded": {},
            "dropped": {},
            "checkpoint": {"size": 3, "treeSize": 3, "signedAt": 0.0, "ageSeconds": 1.0},
        },
        "access": {
            "requested": 0,
            "approved": 0,
            "denied": 0,
            "fulfilled": 0,
            "p50Seconds": None,
            "p95Seconds": None,
            "unansweredInWindow": 0,
        },
        "stale": {
            "days": 30,
            "items": [{"name": name, "cluster": name, "spiffeId": name, "idleDays": 3}],
        },
        "anomalies": {"total": 1, "byDetector": {name: 1}},
    }


def test_names_that_look_like_markup_stay_text() -> None:
    page = render_html(body(HOSTILE))
    parsed = Collect()
    parsed.feed(page)
    parsed.close()
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert parsed.references == []
    assert any(HOSTILE in text for text in parsed.text)  # shown, as text
    assert parsed.svgs == ["decisions-over-time", "denials-by-cluster", "cross-cluster-calls"]


def test_an_empty_window_still_draws_the_three_charts() -> None:
    page = render_html(body("web", empty=True))
    parsed = Collect()
    parsed.feed(page)
    parsed.close()
    assert parsed.svgs == ["decisions-over-time", "denials-by-cluster", "cross-cluster-calls"]
    assert "no denials in the window" in page and "no cross-cluster calls" in page
