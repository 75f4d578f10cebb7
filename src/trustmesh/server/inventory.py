"""``trustmesh get clusters|workloads``: the registry's objects as applied, with their
status — for a Cluster the policy revision its agents apply and whether they drift,
for a Workload its SPIFFE ID; for a Cluster also ``status.caRoots``, its agents and
sidecars that report the CA roots they hold and which lag behind the prepared root — and
``status.suspended``: the suspension that stops
credentials for it (DESIGN §5; for a Workload its own, its SPIFFE ID's or its
cluster's), or null."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trustmesh.manifests import API_VERSION
from trustmesh.registry import RegistryStore
from trustmesh.registry.observed import TemplateObservations
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
        observations: TemplateObservations | None = None,
    ):
        self.observations = observations
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
                item["status"]["template"] = None
            items.extend(self._template_derived())
        return items

    def _template_derived(self) -> Sequence[dict[str, Any]]:
        """The identities templates gave, as observed at their first credential, shaped
        as Workloads with ``status.template``; those the registry in force still gives
        through that template (an explicit Workload applied since wins)."""
        if self.observations is None:
            return []
        registry, suspensions = self.snapshots.registry, self.snapshots.suspensions
        out = []
        for seen in self.observations.list():
            identity = registry.resolve(seen.cluster, seen.namespace, seen.service_account)
            if identity is None or identity.template != seen.template:
                continue
            spec: dict[str, Any] = {
                "selector": {
                    "cluster": seen.cluster,
                    "namespace": seen.namespace,
                    "serviceAccount": seen.service_account,
                },
                "claims": {
                    k: v
                    for k, v in identity.claims.items()
                    if k not in ("cluster", "namespace", "service_account")
                },
            }
            if identity.max_token_ttl is not None:
                spec["maxTokenTTL"] = identity.max_token_ttl
            suspended = suspensions.covering(
                workload=identity.workload, spiffe_id=identity.spiffe_id, cluster=seen.cluster
            )
            out.append(
                {
                    "apiVersion": API_VERSION,
                    "kind": "Workload",
                    "metadata": {"name": identity.workload},
                    "spec": spec,
                    "status": {
                        "spiffeId": identity.spiffe_id,
                        "template": seen.template,
                        "firstIssuedAt": seen.first_issued_at,
                        "suspended": suspended.to_json() if suspended else None,
                    },
                }
            )
        return out
