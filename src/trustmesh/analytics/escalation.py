"""The ``escalation`` detector (DESIGN §11): a published policy whose *effective* diff
(``policy/diff.py``, the grants that appear over the registered inventory) carries an
escalation flag — ``wildcard``, ``secrets``, ``escalate``/``bind``/``impersonate``,
``cross-environment`` — is a finding.

- ``policy.published`` (an apply or a rollback): subject the person who published it,
  evidence that entry, key ``escalation:policy:REVISION``.
- ``access.approved``: the version its binding made (``policy_revision``); subject the
  request's subject (``{"workload": W}``, ``{"spiffeId": S}`` or ``{"user": U}``), so
  ``quarantine: true`` suspends a workload that was granted an escalation; evidence the
  ``policy.published`` entry of that version and the approval; key
  ``escalation:access:ID``. The ``policy.published`` an approval writes (``via:
  access:ID``) is left to the approval's finding, so one change is one finding.

The diff is of the two policy versions over the registry as it is when the detector
reads the event (the runner is seconds behind the log; a replay long after sees today's
inventory). Time is the event's ``time``; the wall clock is never read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from trustmesh.analytics.findings import Finding
from trustmesh.analytics.settings import AnomalySettings
from trustmesh.audit.canonical import parse_time
from trustmesh.common.errors import CanonicalError
from trustmesh.policy.compiler import PolicySet
from trustmesh.policy.diff import Grant, diff_policies
from trustmesh.registry import Registry

NAME = "escalation"
HIGH_FLAGS = frozenset({"secrets", "escalate", "bind", "impersonate"})
MAX_GRANTS = 20  # escalating grants a finding's details list
MAX_REMEMBERED = 64  # policy.published entries remembered for the approvals that follow

PolicyLoader = Callable[[int], PolicySet | None]
"""A policy version's set by revision (0: the empty policy); None if it is gone."""


def _epoch(event: Mapping[str, Any]) -> float:
    try:
        return parse_time(str(event.get("time", ""))).timestamp()
    except CanonicalError:
        return 0.0


class EscalationDetector:
    name = NAME

    def __init__(self, policy_at: PolicyLoader, registry: Callable[[], Registry]) -> None:
        self.policy_at = policy_at
        self.registry = registry
        self.published: dict[int, int] = {}  # policy revision -> its policy.published index
        self.first_seen: float | None = None

    # -- the Detector protocol ------------------------------------------------------------
    def observe(
        self, index: int, event: Mapping[str, Any], policy: AnomalySettings
    ) -> list[Finding]:
        kind = event.get("type")
        if kind not in ("policy.published", "access.approved"):
            return []
        detail = event.get("detail")
        if not isinstance(detail, Mapping):
            return []
        revision = detail.get("policy_revision")
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
            return []
        when = _epoch(event)
        if self.first_seen is None:
            self.first_seen = when
        if kind == "policy.published":
            self._remember(revision, index)
        settings = policy.of(NAME)
        if not settings.enabled or when - self.first_seen < settings.warmup:
            return []
        if kind == "policy.published" and str(detail.get("via", "")).startswith("access:"):
            return []  # the approval that follows reports it
        flagged = self._escalations(revision)
        if not flagged:
            return []
        actor = str(event.get("actor", ""))
        if kind == "policy.published":
            subject: dict[str, Any] = (
                {"user": actor[len("user:") :]} if actor.startswith("user:") else {"actor": actor}
            )
            key = f"{NAME}:policy:{revision}"
            evidence = [index]
            what = f"policy revision {revision} published by {actor}"
        else:
            raw = detail.get("subject")
            subject = dict(raw) if isinstance(raw, Mapping) and len(raw) == 1 else {}
            if not subject or not all(isinstance(v, str) for v in subject.values()):
                subject = {"actor": actor}
            request_id = str(detail.get("id", ""))[:64]
            key = f"{NAME}:access:{request_id}"
            evidence = [e for e in (self.published.get(revision), index) if e is not None]
            what = f"access request {request_id} ({detail.get('role')!s:.64}) approved by {actor}"
        flags = sorted({flag for _, fs in flagged for flag in fs})
        severity = "high" if HIGH_FLAGS & set(flags) else "medium"
        return [
            Finding(
                detector=NAME,
                key=key,
                subject=subject,
                summary=f"{what} grants {len(flagged)} escalating permission(s): "
                f"{', '.join(flags)}",
                evidence=evidence,
                severity=severity,
                detected_at=when,
                window=(when, when),
                details={
                    "policyRevision": revision,
                    "actor": actor,
                    "flags": flags,
                    "grants": [{"grant": grant, "flags": fs} for grant, fs in flagged[:MAX_GRANTS]],
                    "grantCount": len(flagged),
                },
            )
        ]

    def snapshot(self) -> dict[str, Any]:
        return {
            "published": {str(k): v for k, v in sorted(self.published.items())},
            "firstSeen": self.first_seen,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        published = state.get("published") or {}
        self.published = {int(k): int(v) for k, v in published.items()}
        first = state.get("firstSeen")
        self.first_seen = float(first) if isinstance(first, int | float) else None

    # -- internals ------------------------------------------------------------------------
    def _remember(self, revision: int, index: int) -> None:
        self.published[revision] = index
        while len(self.published) > MAX_REMEMBERED:
            del self.published[min(self.published)]

    def _escalations(self, revision: int) -> list[tuple[dict[str, str], list[str]]]:
        new = self.policy_at(revision)
        old = self.policy_at(revision - 1)
        if new is None or old is None:
            return []
        diff = diff_policies(old, new, self.registry())
        found = []
        for grant, flags in diff.escalations:
            alarming = [f for f in flags if f != "wildcard" or broad(grant)]
            if alarming:
                found.append((grant.to_json(), alarming))
        return found


def broad(grant: Grant) -> bool:
    """Whether a grant ``policy diff`` flags ``wildcard`` is broad enough to report: any
    verb or method, any resource, any host or any path. ``policy diff`` also flags a
    binding without ``namespaces`` and a path glob under a named prefix
    (``/api/orders/**``) — a second look when reading a diff, but most bindings have one,
    so as findings they would flood every publish (the demo's own policy among them)."""
    if grant.action == "*" or grant.target == "*":
        return True
    if grant.kind == "service":
        host, _, path = grant.target.partition(" ")
        return host == "*" or path in ("*", "/*", "/**")
    return False
