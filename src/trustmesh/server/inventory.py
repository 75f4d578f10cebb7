"""``trustmesh get clusters|workloads``: the registry's objects as applied, with their
status — for a Cluster the policy revision its agents apply and whether they drift,
for a Workload its SPIFFE ID."""

from __future__ import annotations

from typing import Any

from trustmesh.registry import RegistryStore
from trustmesh.server.agents import Agents
from trustmesh.server.snapshots import Snapshots


class Inventory:
    def __init__(self, registry_store: RegistryStore, snapshots: Snapshots, agents: Agents):
        self.registry_store = registry_store
        self.snapshots = snapshots
        self.agents = agents

    def list(self, kind: str) -> list[dict[str, Any]]:
        items = self.registry_store.list_bodies(kind)
        if kind == "Cluster":
            reports = self.agents.reports()
            for item in items:
                item["status"]["policy"] = self.agents.policy_status(
                    item["metadata"]["name"], reports
                )
        if kind == "Workload":
            registry = self.snapshots.registry
            for item in items:
                name = item["metadata"]["name"]
                if name in registry.workloads:
                    item["status"]["spiffeId"] = registry.spiffe_id_of(name)
        return items
