"""The federation at a glance (``GET /v1/overview``, the console's overview page): every
cluster with its agents -- the policy revision in force against the one each agent
last reported applying, drift, how long behind, staleness; the revocation revision each
agent last said it holds, how many revocations it lacks and since when (the oldest
one it lacks was published; unknown for an agent that never said) -- its last audit shipment,
its token issuer and key set; the control plane's own issuer and signing keys; the
revocation list's revision. One answer, so the page is one request however many
clusters there are: a handful of queries over whole tables (agent reports, audit
sources, stored key sets, signing keys), the rest from the replica's snapshots.

:meth:`Overview.fingerprint` digests what the page shows without the times that move
on their own (an agent's last poll, the answer's own time), so the console's live
stream (``server/live.py``) tells pages to re-fetch only when something they show
changed: a revision, drift, an agent going stale or coming back, an agent falling
behind on revocations or catching up, an audit shipment."""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import Counter
from typing import Any

from sqlalchemy import func, select

from trustmesh.common.clock import Clock
from trustmesh.identity.keys import KeyManager
from trustmesh.server.agents import AGENT_STALE_AFTER, Agents
from trustmesh.server.snapshots import Snapshots
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import audit_sources, cluster_keys

VOLATILE = frozenset(
    {"generatedAt", "lastSeen", "lagSeconds", "ageSeconds", "revocationLagSeconds"}
)


class RevocationLag:
    """How far a revocation revision is behind the list in force, and for how long: since
    the oldest revocation after it was published (an entry that has expired or carries
    no publish time, recorded before migration 15, is not known: then since the list
    last moved, which is later -- a lower bound)."""

    def __init__(
        self, revision: int, published: list[tuple[int, float]], last_published: float | None
    ) -> None:
        self.revision = revision
        self.last_published = last_published
        self._revisions = [r for r, _ in published]  # ascending
        # the earliest publish time from each position on
        self._earliest: list[float] = []
        low = float("inf")
        for _, at in reversed(published):
            low = min(low, at)
            self._earliest.append(low)
        self._earliest.reverse()

    def of(self, held: int | None, now: float) -> dict[str, Any]:
        if held is None:
            return {
                "revocationRevision": None,
                "revocationsBehind": None,
                "revocationLagSeconds": None,
            }
        behind = max(0, self.revision - held)
        lag: float | None = 0.0
        if behind:
            first = bisect.bisect_right(self._revisions, held)
            since = self._earliest[first] if first < len(self._earliest) else None
            if since is None:
                since = self.last_published
            lag = None if since is None else round(max(0.0, now - since), 3)
        return {
            "revocationRevision": held,
            "revocationsBehind": behind,
            "revocationLagSeconds": lag,
        }


class Overview:
    def __init__(
        self,
        db: Database,
        snapshots: Snapshots,
        agents: Agents,
        keys: KeyManager,
        clock: Clock,
    ) -> None:
        self.db = db
        self.snapshots = snapshots
        self.agents = agents
        self.keys = keys
        self.clock = clock

    def build(self) -> dict[str, Any]:
        now = self.clock()
        snapshots = self.snapshots
        registry = snapshots.registry
        desired = snapshots.bundle_version()
        published = snapshots.bundle_published_at()
        reports = self.agents.reports()
        shipments = self._shipments()
        key_sets = self._key_sets()
        workloads = Counter(w.selector.cluster for w in registry.workloads.values())
        with self.db.engine.connect() as conn:
            revocations_at = meta_store.published_at(conn, meta_store.REVOCATION_REVISION)
        held = snapshots.revocations
        lag = RevocationLag(
            held.revision,
            [(e.revision, e.published_at) for e in held.entries() if e.published_at is not None],
            revocations_at,
        )
        clusters = []
        for name in sorted(registry.clusters):
            spec = registry.clusters[name]
            agents = [
                self._agent(report, desired, published, now)
                | lag.of(report["revocationRevision"], now)
                for report in reports.get(name, [])
            ]
            fresh = [a for a in agents if not a["stale"]]
            applied = sorted({a["appliedRevision"] for a in fresh})
            known = [a for a in fresh if a["revocationsBehind"] is not None]
            shipped = shipments.get(name, {})
            suspended = snapshots.suspensions.get("cluster", name)
            clusters.append(
                {
                    "name": name,
                    "issuer": spec.issuer,
                    "keySources": list(spec.key_sources) or ["inline jwks"],
                    "keySet": key_sets.get(name),
                    "suspended": suspended is not None,
                    "workloads": workloads.get(name, 0),
                    "desiredRevision": desired[0],
                    "appliedRevisions": applied,
                    "drift": bool(fresh) and any(a["behind"] for a in fresh),
                    "agentsReporting": len(fresh),
                    "agentsStale": len(agents) - len(fresh),
                    "revocationsBehind": max((a["revocationsBehind"] for a in known), default=None),
                    "revocationLagSeconds": _worst_lag(known),
                    "revocationsUnknown": len(fresh) - len(known),
                    "agents": agents,
                    "lastShipment": shipped.get("lastShipment"),
                    "auditSources": shipped.get("sources", 0),
                    "auditEvents": shipped.get("events", 0),
                }
            )
        keyset = snapshots.keyset
        return {
            "generatedAt": now,
            "trustDomain": snapshots.trust_domain,
            "issuer": snapshots.issuer,
            "policy": {
                "desiredRevision": desired[0],
                "registryRevision": desired[1],
                "publishedAt": published,
            },
            "revocations": {
                "revision": snapshots.revocations.revision,
                "lastPublishedAt": revocations_at,
            },
            "signingKeys": {
                "activeKid": keyset.active.kid,
                "revision": keyset.revision,
                "keys": [
                    {"kid": k.kid, "alg": k.alg, "state": k.state, "createdAt": k.created_at}
                    for k in self.keys.list_keys()
                ],
            },
            "federation": [
                {"name": n, "trustDomain": f.trust_domain, "endpoint": f.bundle_endpoint_url}
                for n, f in sorted(registry.federations.items())
            ],
            "totals": {
                "clusters": len(clusters),
                "workloads": len(registry.workloads),
                "agents": sum(len(c["agents"]) for c in clusters),
                "agentsReporting": sum(c["agentsReporting"] for c in clusters),
                "drifting": sum(1 for c in clusters if c["drift"]),
                "withoutAgents": sum(1 for c in clusters if not c["agentsReporting"]),
                "revocationsBehind": sum(1 for c in clusters if c["revocationsBehind"]),
            },
            "clusters": clusters,
        }

    def fingerprint(self) -> str:
        """A digest of :meth:`build` without the times that move on their own."""
        stable = _without(self.build(), VOLATILE)
        return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _agent(
        report: dict[str, Any], desired: tuple[int, int], published: float, now: float
    ) -> dict[str, Any]:
        applied = (int(report["appliedRevision"]), int(report["appliedRegistryRevision"]))
        behind = applied < desired
        return {
            "agentId": report["agentId"],
            "appliedRevision": applied[0],
            "appliedRegistryRevision": applied[1],
            "lastSeen": report["lastSeen"],
            "stale": now - report["lastSeen"] >= AGENT_STALE_AFTER,
            "behind": behind,
            "revisionsBehind": max(0, desired[0] - applied[0]),
            "lagSeconds": round(max(0.0, now - published), 3) if behind else 0.0,
        }

    def _shipments(self) -> dict[str, dict[str, Any]]:
        """Per cluster: its agents' audit sources, the events they sent, the last one."""
        s = audit_sources.c
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(s.cluster, func.count(), func.sum(s.next_seq), func.max(s.last_seen))
                .where(s.source.not_like("unbound:%"))
                .group_by(s.cluster)
            ).all()
        return {
            cluster: {"sources": count, "events": int(events or 0), "lastShipment": last}
            for cluster, count, events, last in rows
        }

    def _key_sets(self) -> dict[str, dict[str, Any]]:
        """Per cluster: the last good key set stored for it (DESIGN §10)."""
        k = cluster_keys.c
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(k.cluster, k.jwks, k.fetched_at, k.fetched_from, k.expired_at)
            ).all()
        found = {}
        for cluster, jwks, fetched_at, fetched_from, expired_at in rows:
            try:
                kids = [str(key.get("kid", "")) for key in json.loads(jwks).get("keys", [])]
            except (ValueError, AttributeError):
                kids = []
            found[cluster] = {
                "kids": kids,
                "fetchedAt": fetched_at,
                "fetchedFrom": fetched_from,
                "expiredAt": expired_at,
            }
        return found


def _worst_lag(agents: list[dict[str, Any]]) -> float | None:
    """The longest revocation lag of ``agents`` (those reporting): 0 when none is
    behind; None when none reports, or those behind are behind by no known time."""
    if not agents:
        return None
    behind = [a["revocationLagSeconds"] for a in agents if a["revocationsBehind"]]
    if not behind:
        return 0.0
    return max((lag for lag in behind if lag is not None), default=None)


def _without(value: Any, keys: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value
