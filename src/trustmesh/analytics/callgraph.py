"""Who calls whom, from the audit log's ``authz.decision`` entries (DESIGN §12): the one
place a decision becomes an edge of the call graph. ``trustmesh report``'s cross-cluster
section (``analytics/report.py``) is this graph folded to clusters; the console's graph
page (``GET /v1/audit/graph``) draws it whole.

A decision about a verified workload is a call: the caller is the workload (its SPIFFE
ID) in the cluster its token or certificate was issued for (``identity.origin_cluster``),
the callee what it asked for (``request.host``, else the surface asked, such as
``k8s.access_review``) in the cluster whose agent decided. Each edge counts its calls
and how many were denied. Decisions without a verified workload (refused tokens, people)
are no call of anyone and are only counted.

Bounded: at most :data:`MAX_EDGES` edges (later new edges are counted as ``dropped``) and,
for the endpoint, the newest ``limit`` decisions of the window, read through the log's
``(time, idx)`` index from the window's end backwards (``truncated`` says when the window
held more)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import and_, func, select

from trustmesh.audit import events as ev
from trustmesh.storage import Database
from trustmesh.storage.schema import audit_entries

MAX_EDGES = 2000
MAX_CLUSTER_EDGES = 500
DEFAULT_LIMIT = 50_000
MAX_LIMIT = 200_000
_READ = 5_000  # rows per query while reading the window backwards


def call_of(event: Mapping[str, Any]) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """((caller cluster, caller SPIFFE ID), (callee cluster, callee)) of a decision about
    a verified workload; None for any other event."""
    if event.get("type") != ev.AUTHZ_DECISION:
        return None
    identity = event.get("identity")
    if not isinstance(identity, dict) or not isinstance(identity.get("spiffe_id"), str):
        return None
    cluster = str(event.get("cluster") or "")
    origin = identity.get("origin_cluster")
    request = event.get("request")
    request = request if isinstance(request, dict) else {}
    target = request.get("host") or request.get("surface") or "?"
    return (str(origin) if origin else cluster, identity["spiffe_id"]), (cluster, str(target))


def _allowed(event: Mapping[str, Any]) -> bool:
    decision = event.get("decision")
    return isinstance(decision, dict) and decision.get("allowed") is True


@dataclass
class CallGraph:
    """Edges between workloads (and their fold to clusters) of the decisions added."""

    max_edges: int = MAX_EDGES
    edges: dict[tuple[str, str, str, str], list[int]] = field(default_factory=dict)
    clusters: Counter[tuple[str, str]] = field(default_factory=Counter)
    decisions: int = 0
    calls: int = 0
    dropped: int = 0

    def add(self, event: Mapping[str, Any]) -> None:
        """Count one ``authz.decision`` event (other events are ignored)."""
        if event.get("type") != ev.AUTHZ_DECISION:
            return
        self.decisions += 1
        identity = event.get("identity")
        origin = identity.get("origin_cluster") if isinstance(identity, dict) else None
        cluster = str(event.get("cluster", ""))
        if origin and origin != cluster:
            edge = (str(origin), cluster)
            if edge in self.clusters or len(self.clusters) < MAX_CLUSTER_EDGES:
                self.clusters[edge] += 1
        call = call_of(event)
        if call is None:
            return
        self.calls += 1
        (from_cluster, caller), (to_cluster, callee) = call
        key = (from_cluster, caller, to_cluster, callee)
        counts = self.edges.get(key)
        if counts is None:
            if len(self.edges) >= self.max_edges:
                self.dropped += 1
                return
            counts = self.edges[key] = [0, 0]
        counts[0] += 1
        if not _allowed(event):
            counts[1] += 1

    def cross_cluster(self, limit: int = MAX_CLUSTER_EDGES) -> list[dict[str, Any]]:
        """Calls from one cluster's identities decided in another: ``{"from", "to", "count"}``,
        most first (the report's ``decisions.crossCluster``)."""
        return [{"from": a, "to": b, "count": n} for (a, b), n in self.clusters.most_common(limit)]

    def to_json(self) -> dict[str, Any]:
        """Clusters (each with its workloads and callees as nodes) and edges, most calls
        first; a node's ``id`` is ``CLUSTER|NAME``."""
        nodes: dict[str, dict[str, Any]] = {}
        groups: dict[str, list[str]] = {}

        def node(cluster: str, name: str, kind: str) -> str:
            key = f"{cluster}|{name}"
            if key not in nodes:
                nodes[key] = {"id": key, "cluster": cluster, "name": name, "kind": kind}
                groups.setdefault(cluster, []).append(key)
            elif nodes[key]["kind"] != kind:
                nodes[key]["kind"] = "both"
            return key

        edges = []
        ordered = sorted(self.edges.items(), key=lambda item: (-item[1][0], item[0]))
        for (from_cluster, caller, to_cluster, callee), (calls, denied) in ordered:
            edges.append(
                {
                    "from": node(from_cluster, caller, "workload"),
                    "to": node(to_cluster, callee, "service"),
                    "calls": calls,
                    "denied": denied,
                    "crossCluster": from_cluster != to_cluster,
                }
            )
        return {
            "clusters": [
                {"name": name, "nodes": sorted(keys)} for name, keys in sorted(groups.items())
            ],
            "nodes": sorted(nodes.values(), key=lambda n: n["id"]),
            "edges": edges,
            "decisions": self.decisions,
            "calls": self.calls,
            "droppedEdges": self.dropped,
        }


def call_graph(db: Database, since: str, until: str, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """The graph of the newest ``limit`` decisions with ``since <= time < until`` (event
    times, as the log writes them): read backwards through the ``(time, idx)`` index in
    pages, so the work is bounded by ``limit`` whatever the log's size."""
    limit = max(1, min(limit, MAX_LIMIT))
    graph = CallGraph()
    read = 0
    cursor: tuple[str, int] | None = None  # (time, idx) of the last row read
    moment, idx = audit_entries.c.time, audit_entries.c.idx
    kind = func.coalesce(audit_entries.c.type, "")
    truncated = False
    while read < limit:
        # The type is compared through coalesce() so that no planner reads the type's
        # index (then sorts every decision of the log by time): the window is one range
        # of the (time, idx) index, read backwards and cut at the page.
        clauses = [moment >= since, moment < until, kind == ev.AUTHZ_DECISION]
        if cursor is not None:
            clauses.append((moment < cursor[0]) | and_(moment == cursor[0], idx < cursor[1]))
        take = min(_READ, limit - read)
        with db.engine.connect() as conn:
            rows = conn.execute(
                select(moment, idx, audit_entries.c.leaf)
                .where(and_(*clauses))
                .order_by(moment.desc(), idx.desc())
                .limit(take + 1)
            ).all()
        for row in rows[:take]:
            graph.add(orjson.loads(row.leaf))
        read += min(len(rows), take)
        if len(rows) <= take:
            break
        cursor = (str(rows[take - 1].time), int(rows[take - 1].idx))
        if read >= limit:
            truncated = True
    return {"since": since, "until": until, "read": read, "truncated": truncated, **graph.to_json()}
