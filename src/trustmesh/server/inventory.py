"""``trustmesh get clusters|workloads``: the registry's objects as applied, with their
status — for a Cluster the policy revision its agents apply and whether they drift,
for a Workload its SPIFFE ID; for a Cluster also ``status.caRoots``, its agents and
sidecars that report the CA roots they hold and which lag behind the prepared root — and
``status.suspended``: the suspension that stops
credentials for it (DESIGN §5; for a Workload its own, its SPIFFE ID's or its
cluster's), or null."""

from __future__ import annotations

from typing import Any

from trustmesh.registry import RegistryStore
from trustmesh.server.agents import Agents
from trustmesh.server.roots import CaRotation
from trustmesh.server.snapshots import Snapshots


class Inventory:
    def __init__(
        self,
        registry_store: RegistryStore,
        snapshots: Snapshots,
        agents: Agents,
        ca_rotation: CaRotation | None = None,
    ):
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
        return items
