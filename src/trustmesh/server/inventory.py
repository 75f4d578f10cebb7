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

import bisect
import builtins
import dataclasses
from dataclasses import dataclass
from typing import Any

from trustmesh.manifests import API_VERSION
from trustmesh.registry import Registry, RegistryStore
from trustmesh.registry.observed import TemplateObservations
from trustmesh.server.agents import Agents
from trustmesh.server.roots import CaRotation
from trustmesh.server.snapshots import Snapshots
from trustmesh.server.usage import NO_USAGE, Usage, UsageTracker

DAY = 86400.0
MAX_PAGE = 1000
WORKLOAD_SOURCES = ("explicit", "template")


@dataclass(frozen=True)
class WorkloadQuery:
    """A page of the Workload listing: at most ``limit`` (1..MAX_PAGE) by name after
    ``after``; ``source`` explicit or template-derived; ``cluster``; ``contains`` (a
    case-insensitive part of the name or SPIFFE ID); ``stale_days`` (only explicit
    Workloads unused for that many days, as ``report stale``)."""

    limit: int = 100
    after: str | None = None
    source: str | None = None
    cluster: str | None = None
    contains: str | None = None
    stale_days: float | None = None


class Inventory:
    def __init__(
        self,
        registry_store: RegistryStore,
        snapshots: Snapshots,
        agents: Agents,
        ca_rotation: CaRotation | None = None,
        observations: TemplateObservations | None = None,
        usage: UsageTracker | None = None,
    ):
        self.observations = observations
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
            self._explicit_status(items)
            items.extend(self._template_derived())
            self._usage_status(items)
        return items

    def _explicit_status(self, items: builtins.list[dict[str, Any]]) -> None:
        """A listed Workload's SPIFFE ID and suspension, and ``template: null``."""
        registry, suspensions = self.snapshots.registry, self.snapshots.suspensions
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

    def _usage_status(self, items: builtins.list[dict[str, Any]]) -> None:
        usage = self._usage_of(items)
        for item in items:
            found = usage.get(item["status"].get("spiffeId", ""), NO_USAGE)
            item["status"]["usage"] = found.to_json()

    def page(self, query: WorkloadQuery, now: float) -> dict[str, Any]:
        """One page of ``GET /v1/workloads`` with paging or filters: the Workloads and
        template-derived identities that pass ``query``, by name, from after
        ``query.after``; each as :meth:`list` shows it. Only the page's explicit
        Workloads are read from the database; the filters run over the registry in
        force (and the observed template identities), so 10,000 Workloads page without
        loading 10,000 bodies (``staleDays`` reads every explicit one: :meth:`stale`)."""
        registry = self.snapshots.registry
        rows: dict[str, tuple[str, str]] = {}  # name -> (cluster, SPIFFE ID)
        derived: dict[str, dict[str, Any]] = {}
        if query.source in (None, "explicit"):
            for name, spec in registry.workloads.items():
                rows[name] = (spec.selector.cluster, registry.spiffe_id_of(name))
        if query.source in (None, "template"):
            for item in self._template_derived():
                name = item["metadata"]["name"]
                derived[name] = item
                rows[name] = (item["spec"]["selector"]["cluster"], item["status"]["spiffeId"])
        if query.stale_days is not None:
            idle = {r["name"] for r in self.stale(query.stale_days, now)}
            rows = {name: row for name, row in rows.items() if name in idle}
        needle = (query.contains or "").lower()
        names = sorted(
            name
            for name, (cluster, spiffe_id) in rows.items()
            if (query.cluster is None or cluster == query.cluster)
            and (not needle or needle in name.lower() or needle in spiffe_id.lower())
        )
        start = bisect.bisect_right(names, query.after) if query.after is not None else 0
        chosen = names[start : start + query.limit]
        explicit = [n for n in chosen if n not in derived]
        bodies = {
            body["metadata"]["name"]: body
            for body in self.registry_store.list_bodies("Workload", explicit)
        }
        self._explicit_status(list(bodies.values()))
        items = [
            derived[n] if n in derived else bodies[n] for n in chosen if n in bodies or n in derived
        ]
        self._usage_status(items)
        more = start + query.limit < len(names)
        return {
            "kind": "WorkloadList",
            "items": items,
            "total": len(names),
            "next": chosen[-1] if more and chosen else None,
        }

    def _template_derived(self) -> builtins.list[dict[str, Any]]:
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

    def registry_with_observed(self) -> Registry:
        """The registry in force with the (cluster, namespace, service account) of the
        template-derived identities listed (``Registry.observed``: ``policy diff``
        counts them in the inventory, as the listing shows them)."""
        accounts = tuple(
            (sel["cluster"], sel["namespace"], sel["serviceAccount"])
            for sel in (item["spec"]["selector"] for item in self._template_derived())
        )
        return dataclasses.replace(self.snapshots.registry, observed=accounts)

    def _usage_of(self, items: builtins.list[dict[str, Any]]) -> dict[str, Usage]:
        """The last use of every listed identity (explicit or template-derived), by
        SPIFFE ID."""
        if self.usage is None:
            return {}
        return self.usage.usage(
            i["status"]["spiffeId"] for i in items if i["status"].get("spiffeId")
        )

    def stale(self, days: float, now: float) -> builtins.list[dict[str, Any]]:
        """Workloads that have neither received a credential nor been seen in a decision
        for ``days``; one never used counts from its last apply. Longest idle first.
        Explicit Workloads only: a template-derived identity has no apply of its own to
        count from, and nothing to retire (its template admits it again)."""
        cutoff = now - days * DAY
        out = []
        for item in self.list("Workload"):
            status = item["status"]
            if status.get("template"):
                continue
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
