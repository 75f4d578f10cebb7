"""``trustmesh get clusters|workloads``: the registry's objects as applied, with their
status — for a Cluster the policy revision its agents apply and whether they drift,
for a Workload its SPIFFE ID; for a Cluster also ``status.caRoots``, its agents and
sidecars that report the CA roots they hold and which lag behind the prepared root — and
``status.suspended``: the suspension that stops
credentials for it (DESIGN §5; for a Workload its own, its SPIFFE ID's or its
cluster's), or null. A Workload's ``status.usage`` says when it last received a credential
and was last seen in an agent's decision (``server/usage.py``); :meth:`Inventory.stale`
lists the Workloads unused for N days (``trustmesh report stale``)."""

from __future__ import annotations

import builtins
from typing import Any

from trustmesh.registry import RegistryStore
from trustmesh.server.agents import Agents
from trustmesh.server.roots import CaRotation
from trustmesh.server.snapshots import Snapshots
from trustmesh.server.usage import NO_USAGE, Usage, UsageTracker

DAY = 86400.0


class Inventory:
    def __init__(
        self,
        registry_store: RegistryStore,
        snapshots: Snapshots,
        agents: Agents,
        ca_rotation: CaRotation | None = None,
        usage: UsageTracker | None = None,
    ):
        self.usage = usage
        self.registry_store = registry_store
        self.snapshots = snapshots
        self.agents = agents
        self.ca_rotation = ca_rotation

    def list(self, kind: str) -> list[dict[str, Any]]:
        items = self.registry_store.list_bodies(kind)
        suspensions = self.snapshots.suspensions
        if kind == "Cluster":
            reports = self.agents.reports()
            roots = self.ca_rotation.status() if self.ca_rotation else None
            for item in items:
                name = item["metadata"]["name"]
                item["status"]["policy"] = self.agents.policy_status(name, reports)
                if roots is not None and self.ca_rotation is not None:
                    item["status"]["caRoots"] = self.ca_rotation.cluster_status(roots, name)
                suspended = suspensions.get("cluster", name)
                item["status"]["suspended"] = suspended.to_json() if suspended else None
        if kind == "Workload":
            registry = self.snapshots.registry
            usage = self._usage_of(items)
            for item in items:
                name = item["metadata"]["name"]
                suspended = None
                if name in registry.workloads:
                    spiffe_id = registry.spiffe_id_of(name)
                    item["status"]["spiffeId"] = spiffe_id
                    suspended = suspensions.covering(
                        workload=name,
                        spiffe_id=spiffe_id,
                        cluster=registry.workloads[name].selector.cluster,
                    )
                item["status"]["suspended"] = suspended.to_json() if suspended else None
                found = usage.get(item["status"].get("spiffeId", ""), NO_USAGE)
                item["status"]["usage"] = found.to_json()
        return items

    def _usage_of(self, items: builtins.list[dict[str, Any]]) -> dict[str, Usage]:
        if self.usage is None:
            return {}
        registry = self.snapshots.registry
        names = [
            i["metadata"]["name"] for i in items if i["metadata"]["name"] in registry.workloads
        ]
        return self.usage.usage([registry.spiffe_id_of(n) for n in names])

    def stale(self, days: float, now: float) -> builtins.list[dict[str, Any]]:
        """Workloads that have neither received a credential nor been seen in a decision
        for ``days``; one never used counts from its last apply. Longest idle first."""
        cutoff = now - days * DAY
        out = []
        for item in self.list("Workload"):
            status = item["status"]
            usage = status["usage"]
            times = [t for t in (usage["lastCredentialAt"], usage["lastDecisionAt"]) if t]
            since = max(times) if times else float(status["updatedAt"])
            if since > cutoff:
                continue
            out.append(
                {
                    "name": item["metadata"]["name"],
                    "spiffeId": status.get("spiffeId"),
                    "cluster": item["spec"]["selector"]["cluster"],
                    "lastUsed": max(times) if times else None,
                    "idleSince": since,
                    "idleDays": round((now - since) / DAY, 2),
                    "usage": usage,
                    "suspended": status.get("suspended"),
                }
            )
        out.sort(key=lambda r: (r["idleSince"], r["name"]))
        return out
