"""``trustmesh report`` (DESIGN §11, issue 15 item 3): what the audit log says of a time
window, for the security team.

* **Policy coverage**: the inventory's identities (``Registry.inventory_identities``)
  with at least one allow binding on some cluster (the engine's own subject matching
  on every cluster's bundle, as ``policy diff`` does); the allow bindings each
  PolicyTest case matched, and those no case exercises.
* **Least privilege**: for every allow binding, the ``authz.decision`` entries of the
  window it allowed (``decision.bindings``). A binding that allowed nothing is a grant
  never used; one that did gets a narrower GlobalRole and RoleBinding, cut down to what
  was observed (subjects, clusters, namespaces, and per host the methods and paths, per
  API group and resource the verbs, per URL the verbs), which would have allowed every
  observed decision. Each carries the log indexes of sample entries as evidence
  (``trustmesh audit proof`` proves them).
* **Decisions**: allowed and denied over time, denials by cluster, the cross-cluster call
  graph (the caller's origin cluster → the deciding agent's cluster; ``analytics/callgraph.py``,
  which the console's graph page draws whole).
* **Audit completeness**: the agents' sources (last seen, next sequence number, gaps),
  gaps detected in the window, refusals folded over quota and counted as dropped
  (``audit.refusals_folded``), the last checkpoint's age and how far the tree is past it.
* **Access requests**: fulfilment time (``access.requested`` → ``access.approved``) p50 and
  p95; **stale identities** (the server's ``Inventory.stale``, given in); **anomalies** by
  detector (``anomaly.detected`` events).

Bounded memory: the window's entries are read in pages of primary-key ranges (never the
log whole), only the types a section needs, and folded into counters as they go; every
set a binding's observation keeps is capped (:data:`MAX_DISTINCT`), past which that part
of the binding is not narrowed. Nothing here imports the web framework."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import and_, func, select

from trustmesh.analytics.callgraph import CallGraph
from trustmesh.audit import events as ev
from trustmesh.common.errors import InvalidRequest, PolicyError
from trustmesh.manifests import API_VERSION
from trustmesh.policy.compiler import PolicySet
from trustmesh.policy.diff import inventory_bundles
from trustmesh.policy.engine import Engine
from trustmesh.policy.testing import CaseResult
from trustmesh.registry import Registry
from trustmesh.storage import Database
from trustmesh.storage.schema import audit_checkpoints, audit_entries, audit_gaps, audit_sources

ANOMALY_DETECTED = ev.ANOMALY_DETECTED
PAGE = 20_000  # primary-key range read per query
MAX_DISTINCT = 64  # values an observation keeps per part before it gives up narrowing it
MAX_PATHS = 16  # paths kept per host before they are folded to a common prefix glob
MAX_EVIDENCE = 5
MAX_LIST = 500  # rows of any list in the report (uncovered workloads, sources, gaps...)
BUCKETS = 48
DEFAULT_WINDOW = 7 * 86400.0
READ_TYPES = (
    ev.AUTHZ_DECISION,
    ev.ACCESS_REQUESTED,
    ev.ACCESS_APPROVED,
    ev.ACCESS_DENIED,
    ev.AUDIT_GAP,
    ev.REFUSALS_FOLDED,
    ANOMALY_DETECTED,
)
_RELATIVE = re.compile(r"(\d{1,6})([smhd])")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_moment(text: str, now: float, name: str) -> float:
    """``since``/``until`` as epoch seconds: RFC 3339 (``2026-11-30T12:00:00Z``) or a
    time ago (``90m``, ``24h``, ``7d``); InvalidRequest otherwise."""
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return now - int(relative.group(1)) * _UNIT[relative.group(2)]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"{name} must be an RFC 3339 time (2026-11-30T12:00:00Z) or a time ago (90m, 24h, 7d)"
        ) from None
    if moment.tzinfo is None:
        raise InvalidRequest(f"{name} must name its time zone (Z or +HH:MM)")
    return moment.timestamp()


def window(since: str | None, until: str | None, now: float) -> tuple[float, float]:
    """The report's window; default the 7 days up to now."""
    end = parse_moment(until, now, "until") if until else now
    start = parse_moment(since, now, "since") if since else end - DEFAULT_WINDOW
    if not start < end:
        raise InvalidRequest("since must be before until")
    return start, end


@dataclass(frozen=True)
class ReportInputs:
    """What the control plane knows besides the log: the registry and policy in force,
    its PolicyTest results (with the bindings each case matched) and the stale list."""

    registry: Registry
    policy: PolicySet
    policy_revision: int
    tests: Sequence[CaseResult]
    stale: Sequence[Mapping[str, Any]]
    stale_days: float


# -- observing one binding's allowed decisions ----------------------------------------------


@dataclass
class _Capped:
    """A set that stops growing at MAX_DISTINCT and remembers that it overflowed."""

    values: set[str] = field(default_factory=set)
    overflow: bool = False

    def add(self, value: str) -> None:
        if value in self.values:
            return
        if len(self.values) >= MAX_DISTINCT:
            self.overflow = True
            return
        self.values.add(value)


@dataclass
class _Paths(_Capped):
    """Observed paths; also the leading segments every path seen shares, kept over all of
    them (past the cap too), so the glob that stands for many covers every one."""

    common: list[str] | None = None
    depths: set[int] = field(default_factory=set)

    def add(self, value: str) -> None:
        parts = value.strip("/").split("/")
        if len(self.depths) < 2:
            self.depths.add(len(parts))
        if self.common is None:
            self.common = parts
        else:
            keep = 0
            for mine, theirs in zip(self.common, parts, strict=False):
                if mine != theirs:
                    break
                keep += 1
            del self.common[keep:]
        super().add(value)


@dataclass
class _Resource:
    """Observed verbs of one (API group, resource), and the object names when every
    request named one."""

    verbs: _Capped = field(default_factory=_Capped)
    names: _Capped = field(default_factory=_Capped)
    unnamed: bool = False


@dataclass
class _Usage:
    decisions: int = 0
    evidence: list[int] = field(default_factory=list)
    subjects: _Capped = field(default_factory=_Capped)
    clusters: _Capped = field(default_factory=_Capped)
    namespaces: _Capped = field(default_factory=_Capped)
    no_namespace: bool = False
    # service: host -> (methods, paths); resource: (group, resource) -> verbs; url -> verbs
    services: dict[str, tuple[_Capped, _Paths]] = field(default_factory=dict)
    resources: dict[tuple[str, str], _Resource] = field(default_factory=dict)
    urls: dict[str, _Capped] = field(default_factory=dict)
    rules_overflow: bool = False

    def observe(self, index: int, event: Mapping[str, Any]) -> None:
        self.decisions += 1
        if len(self.evidence) < MAX_EVIDENCE:
            self.evidence.append(index)
        identity = event.get("identity") or {}
        request = event.get("request") or {}
        user = str(request.get("user") or "")
        if identity.get("workload"):
            self.subjects.add(f"workload:{identity['workload']}")
        elif user.startswith("user:"):  # a person, at a cluster's API server
            self.subjects.add(user)
        elif identity.get("spiffe_id"):
            self.subjects.add(f"spiffeId:{identity['spiffe_id']}")
        else:  # nothing to name it by: the binding's own subjects stay
            self.subjects.overflow = True
        self.clusters.add(str(event.get("cluster", "")))
        namespace = request.get("namespace")
        if namespace:
            self.namespaces.add(str(namespace))
        else:
            self.no_namespace = True
        self._observe_rule(request)

    def _observe_rule(self, request: Mapping[str, Any]) -> None:
        verb = str(request.get("verb", ""))
        if "host" in request:
            key = str(request["host"])
            if key not in self.services and len(self.services) >= MAX_DISTINCT:
                self.rules_overflow = True
                return
            methods, paths = self.services.setdefault(key, (_Capped(), _Paths()))
            methods.add(str(request.get("method", "")))
            paths.add(str(request.get("path", "")))
        elif "resource" in request:
            resource = str(request["resource"])
            if request.get("subresource"):
                resource += "/" + str(request["subresource"])
            rkey = (str(request.get("apiGroup", "")), resource)
            if rkey not in self.resources and len(self.resources) >= MAX_DISTINCT:
                self.rules_overflow = True
                return
            found = self.resources.setdefault(rkey, _Resource())
            found.verbs.add(verb)
            if request.get("name"):
                found.names.add(str(request["name"]))
            else:
                found.unnamed = True
        elif "nonResourceURL" in request:
            url = str(request["nonResourceURL"])
            if url not in self.urls and len(self.urls) >= MAX_DISTINCT:
                self.rules_overflow = True
                return
            self.urls.setdefault(url, _Capped()).add(verb)


def _paths(paths: _Paths) -> list[str]:
    """The observed paths, or one glob standing for them all when there are too many:
    the leading segments all of them share, then one ``*`` per further segment when all
    of them have as many segments (``/api/v1/orders/*``), else ``/**``."""
    if not paths.overflow and len(paths.values) <= MAX_PATHS:
        return sorted(paths.values)
    common = list(paths.common or ())
    if len(paths.depths) == 1:
        (depth,) = paths.depths
        return ["/" + "/".join([*common, *["*"] * (depth - len(common))])]
    common = [p for p in common if p]
    return ["/" + "/".join([*common, "**"]) if common else "/**"]


def _observed_rules(usage: _Usage) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for host, (methods, paths) in sorted(usage.services.items()):
        rules.append(
            {
                "services": [host],
                "methods": ["*"] if methods.overflow else sorted(methods.values),
                "paths": _paths(paths),
            }
        )
    for (group, resource), found in sorted(usage.resources.items()):
        rule: dict[str, Any] = {
            "apiGroups": [group],
            "resources": [resource],
            "verbs": ["*"] if found.verbs.overflow else sorted(found.verbs.values),
        }
        if not found.unnamed and not found.names.overflow:
            rule["resourceNames"] = sorted(found.names.values)
        rules.append(rule)
    for url, verbs in sorted(usage.urls.items()):
        rules.append(
            {"nonResourceURLs": [url], "verbs": ["*"] if verbs.overflow else sorted(verbs.values)}
        )
    return rules


def _role_rules(policy: PolicySet, role: str) -> list[dict[str, Any]]:
    for body in policy.bodies:
        if body["kind"] == "GlobalRole" and body["metadata"]["name"] == role:
            return list(body["spec"].get("rules", []))
    return []


def _binding_body(policy: PolicySet, name: str) -> dict[str, Any]:
    for body in policy.bodies:
        if body["kind"] == "RoleBinding" and body["metadata"]["name"] == name:
            return dict(body["spec"])
    return {}


def _subject(text: str) -> dict[str, str]:
    kind, _, value = text.partition(":")
    return {kind: value}


def _suggestion(name: str, policy: PolicySet, usage: _Usage) -> dict[str, Any]:
    """A grant used in the window, cut down to what it was used for."""
    spec = policy.bindings[name]
    current = _binding_body(policy, name)
    narrowed: list[str] = []
    binding: dict[str, Any] = {"role": f"{spec.role}-observed-{name}"}
    if usage.subjects.overflow:
        binding["subjects"] = current.get("subjects", [])
    else:
        binding["subjects"] = [_subject(s) for s in sorted(usage.subjects.values)]
        declared = {
            f"workload:{s.workload}"
            if s.workload
            else f"user:{s.user}"
            if s.user
            else f"spiffeId:{s.spiffe_id}"
            for s in spec.subjects
            if (s.workload or s.user or s.spiffe_id) and not s.claims and not s.match_expressions
        }
        if len(declared) != len(spec.subjects) or not declared <= usage.subjects.values:
            narrowed.append("subjects")
    if usage.clusters.overflow:
        if "clusters" in current:
            binding["clusters"] = current["clusters"]
    else:
        binding["clusters"] = {"names": sorted(usage.clusters.values)}
        if (
            spec.clusters is None
            or spec.clusters.has_selector
            or set(spec.clusters.names) - usage.clusters.values
        ):
            narrowed.append("clusters")
    if usage.namespaces.overflow or usage.no_namespace:
        if spec.namespaces is not None:
            binding["namespaces"] = list(spec.namespaces)
    else:
        binding["namespaces"] = sorted(usage.namespaces.values)
        if spec.namespaces is None or set(spec.namespaces) - usage.namespaces.values:
            narrowed.append("namespaces")
    rules = _role_rules(policy, spec.role)
    observed = rules if usage.rules_overflow else _observed_rules(usage)
    if observed != rules:
        narrowed.append("rules")
    role_name = binding["role"]
    return {
        "narrower": narrowed,
        "manifests": [
            {
                "apiVersion": API_VERSION,
                "kind": "GlobalRole",
                "metadata": {"name": role_name},
                "spec": {"rules": observed},
            },
            {
                "apiVersion": API_VERSION,
                "kind": "RoleBinding",
                "metadata": {"name": name},
                "spec": binding,
            },
        ],
    }


# -- the aggregate --------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation), or None with no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass
class _Aggregate:
    start: float
    end: float
    entries: int = 0
    allowed: int = 0
    denied: int = 0
    buckets: list[list[int]] = field(default_factory=lambda: [[0, 0] for _ in range(BUCKETS)])
    denied_by_cluster: Counter[str] = field(default_factory=Counter)
    graph: CallGraph = field(default_factory=lambda: CallGraph(max_edges=MAX_LIST))
    usage: dict[str, _Usage] = field(default_factory=dict)
    requested: dict[str, float] = field(default_factory=dict)
    fulfilment: list[float] = field(default_factory=list)
    answered_ids: set[str] = field(default_factory=set)
    unmatched_approvals: dict[str, float] = field(default_factory=dict)
    access_counts: Counter[str] = field(default_factory=Counter)
    gap_events: int = 0
    gap_entries: list[int] = field(default_factory=list)
    folded: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    anomalies: Counter[str] = field(default_factory=Counter)

    def add(self, index: int, kind: str, event: Mapping[str, Any]) -> None:
        self.entries += 1
        if kind == ev.AUTHZ_DECISION:
            self._decision(index, event)
        elif kind == ev.ACCESS_REQUESTED:
            self.access_counts["requested"] += 1
            self.requested[str(event["detail"].get("id"))] = _epoch(event["time"])
        elif kind == ev.ACCESS_APPROVED:
            self.access_counts["approved"] += 1
            request_id = str(event["detail"].get("id"))
            self.answered_ids.add(request_id)
            at = _epoch(event["time"])
            asked = self.requested.get(request_id)
            if asked is None:
                self.unmatched_approvals[request_id] = at
            else:
                self.fulfilment.append(max(0.0, at - asked))
        elif kind == ev.ACCESS_DENIED:
            self.access_counts["denied"] += 1
            self.answered_ids.add(str(event["detail"].get("id")))
        elif kind == ev.AUDIT_GAP:
            self.gap_events += 1
            if len(self.gap_entries) < MAX_EVIDENCE:
                self.gap_entries.append(index)
        elif kind == ev.REFUSALS_FOLDED:
            detail = event.get("detail") or {}
            writer = str((event.get("source") or {}).get("kind", ""))
            self.folded[writer] += int(detail.get("folded") or 0)
            self.dropped[writer] += int((detail.get("dropped") or {}).get("count") or 0)
        elif kind == ANOMALY_DETECTED:
            detail = event.get("detail") or {}
            self.anomalies[str(detail.get("detector") or "unknown")] += 1

    def _decision(self, index: int, event: Mapping[str, Any]) -> None:
        decision = event.get("decision") or {}
        allowed = bool(decision.get("allowed"))
        cluster = str(event.get("cluster", ""))
        at = _epoch(event["time"])
        bucket = min(BUCKETS - 1, int((at - self.start) / (self.end - self.start) * BUCKETS))
        self.buckets[max(0, bucket)][0 if allowed else 1] += 1
        self.graph.add(event)
        if not allowed:
            self.denied += 1
            self.denied_by_cluster[cluster] += 1
            return
        self.allowed += 1
        for name in decision.get("bindings") or ():
            usage = self.usage.get(name)
            if usage is None:
                if len(self.usage) >= 10 * MAX_LIST:
                    continue
                usage = self.usage[name] = _Usage()
            usage.observe(index, event)


def _entries(db: Database, start: str, end: str) -> Iterator[tuple[int, str, bytes]]:
    """(index, type, leaf) of the window's entries of the types read, in log order, one
    primary-key range at a time."""
    with db.engine.connect() as conn:
        top = conn.execute(select(func.max(audit_entries.c.idx))).scalar()
    if top is None:
        return
    # The type and time filters are wrapped in coalesce() so that no planner reads them
    # through their indexes (SQLite without statistics would, scanning the whole type
    # index for every page): each page is one primary-key range, so the whole read is
    # one pass over the log, whatever its size.
    kind = func.coalesce(audit_entries.c.type, "")
    moment = func.coalesce(audit_entries.c.time, "")
    low = 0
    while low <= int(top):
        query = (
            select(audit_entries.c.idx, audit_entries.c.type, audit_entries.c.leaf)
            .where(
                and_(
                    audit_entries.c.idx >= low,
                    audit_entries.c.idx < low + PAGE,
                    moment >= start,
                    moment < end,
                    kind.in_(READ_TYPES),
                )
            )
            .order_by(audit_entries.c.idx)
        )
        with db.engine.connect() as conn:
            rows = conn.execute(query).all()
        for row in rows:
            yield int(row.idx), str(row.type), row.leaf.encode("utf-8")
        low += PAGE


def _requested_before(db: Database, ids: set[str], start: str) -> dict[str, float]:
    """When the requests approved in the window but asked before it were asked."""
    found: dict[str, float] = {}
    if not ids:
        return found
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(audit_entries.c.leaf).where(
                and_(
                    audit_entries.c.type == ev.ACCESS_REQUESTED,
                    audit_entries.c.time < start,
                )
            )
        ).all()
    for row in rows:
        event = orjson.loads(row.leaf)
        request_id = str(event["detail"].get("id"))
        if request_id in ids:
            found[request_id] = _epoch(event["time"])
    return found


# -- the sections ---------------------------------------------------------------------------


def _coverage(inputs: ReportInputs) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """Coverage of the inventory and of the tests; also which identities each allow
    binding names (on any cluster)."""
    registry, policy = inputs.registry, inputs.policy
    try:
        bundles = inventory_bundles(policy, registry)
    except PolicyError:
        bundles = {}
    identities = registry.inventory_identities()
    names: dict[str, set[str]] = {}
    covered: set[str] = set()
    for _, bundle in sorted(bundles.items()):
        engine = Engine(bundle)
        for identity in identities:
            _, allows = engine.applicable(identity.spiffe_id, identity.claims)
            for binding in allows:
                names.setdefault(binding.name, set()).add(identity.workload)
                covered.add(identity.workload)
    all_names = sorted({i.workload for i in identities})
    uncovered = [n for n in all_names if n not in covered]
    allow_bindings = sorted(n for n, b in policy.bindings.items() if b.effect == "allow")
    tested: dict[str, list[dict[str, str]]] = {}
    for result in inputs.tests:
        for name in result.bindings:
            tested.setdefault(name, []).append(
                {"test": result.test, "case": result.case, "cluster": result.cluster}
            )
    total = len(all_names)
    return (
        {
            "workloads": total,
            "covered": total - len(uncovered),
            "percent": round(100.0 * (total - len(uncovered)) / total, 1) if total else 100.0,
            "uncovered": uncovered[:MAX_LIST],
            "bindings": [
                {
                    "name": name,
                    "role": policy.bindings[name].role,
                    "effect": policy.bindings[name].effect,
                    "subjects": sorted(names.get(name, set()))[:MAX_LIST],
                    "testedBy": tested.get(name, [])[:MAX_LIST],
                }
                for name in sorted(policy.bindings)
            ],
            "exercised": sorted(n for n in policy.bindings if n in tested),
            "unexercised": [n for n in allow_bindings if n not in tested],
            "testCases": len(inputs.tests),
        },
        names,
    )


def _least_privilege(inputs: ReportInputs, agg: _Aggregate) -> dict[str, Any]:
    policy = inputs.policy
    items = []
    for name in sorted(policy.bindings):
        spec = policy.bindings[name]
        if spec.effect != "allow":
            continue
        usage = agg.usage.get(name)
        if usage is None:
            items.append(
                {
                    "binding": name,
                    "role": spec.role,
                    "decisions": 0,
                    "unused": True,
                    "suggestion": "remove: no decision in the window was allowed by it",
                    "evidence": [],
                }
            )
            continue
        suggestion = _suggestion(name, policy, usage)
        items.append(
            {
                "binding": name,
                "role": spec.role,
                "decisions": usage.decisions,
                "unused": False,
                "narrower": suggestion["narrower"],
                "manifests": suggestion["manifests"],
                "evidence": usage.evidence,
            }
        )
    others = sorted(n for n in agg.usage if n not in policy.bindings)
    return {
        "bindings": items,
        "unused": [i["binding"] for i in items if i["unused"]],
        "narrowable": [i["binding"] for i in items if i.get("narrower")],
        "notInPolicy": [
            {"binding": n, "decisions": agg.usage[n].decisions, "evidence": agg.usage[n].evidence}
            for n in others[:MAX_LIST]
        ],
    }


def _completeness(db: Database, agg: _Aggregate, now: float) -> dict[str, Any]:
    with db.engine.connect() as conn:
        sources = conn.execute(
            select(audit_sources).order_by(audit_sources.c.source).limit(MAX_LIST)
        ).all()
        gaps = conn.execute(
            select(audit_gaps).order_by(audit_gaps.c.detected_at.desc()).limit(MAX_LIST)
        ).all()
        checkpoint = conn.execute(
            select(audit_checkpoints.c.size, audit_checkpoints.c.signed_at)
            .order_by(audit_checkpoints.c.size.desc())
            .limit(1)
        ).first()
        top = conn.execute(select(func.max(audit_entries.c.idx))).scalar()
    size = 0 if top is None else int(top) + 1
    gap_rows = [
        {
            "source": g.source,
            "firstSeq": int(g.first_seq),
            "lastSeq": int(g.last_seq),
            "missing": int(g.last_seq) - int(g.first_seq) + 1,
            "detectedAt": g.detected_at,
        }
        for g in gaps
    ]
    in_window = [g for g in gap_rows if agg.start <= g["detectedAt"] < agg.end]
    return {
        "sources": [
            {
                "source": s.source,
                "cluster": s.cluster,
                "agent": s.agent,
                "nextSeq": int(s.next_seq),
                "firstSeen": s.first_seen,
                "lastSeen": s.last_seen,
                "reporting": agg.start <= s.last_seen,
                "silentSeconds": round(max(0.0, now - s.last_seen), 1),
            }
            for s in sources
        ],
        "gaps": gap_rows,
        "gapsInWindow": len(in_window),
        "missingInWindow": sum(g["missing"] for g in in_window),
        "gapEvents": agg.gap_events,
        "gapEvidence": agg.gap_entries,
        "folded": dict(sorted(agg.folded.items())),
        "dropped": dict(sorted(agg.dropped.items())),
        "checkpoint": {
            "size": int(checkpoint.size) if checkpoint else 0,
            "treeSize": int(size),
            "signedAt": checkpoint.signed_at if checkpoint else None,
            "ageSeconds": round(max(0.0, now - checkpoint.signed_at), 1) if checkpoint else None,
        },
    }


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(
    db: Database, inputs: ReportInputs, start: float, end: float, now: float
) -> dict[str, Any]:
    """The report of the window [start, end) as JSON (the module docstring)."""
    agg = _Aggregate(start, end)
    start_text, end_text = ev.now_time(start), ev.now_time(end)
    for index, kind, leaf in _entries(db, start_text, end_text):
        agg.add(index, kind, orjson.loads(leaf))
    for request_id, asked in _requested_before(
        db, set(agg.unmatched_approvals), start_text
    ).items():
        agg.fulfilment.append(max(0.0, agg.unmatched_approvals[request_id] - asked))
    coverage, _ = _coverage(inputs)
    width = (end - start) / BUCKETS
    pending = [r for r in agg.requested if r not in agg.answered_ids]
    return {
        "window": {
            "since": _iso(start),
            "until": _iso(end),
            "generatedAt": _iso(now),
            "entriesRead": agg.entries,
            "policyRevision": inputs.policy_revision,
        },
        "coverage": coverage,
        "leastPrivilege": _least_privilege(inputs, agg),
        "decisions": {
            "total": agg.allowed + agg.denied,
            "allowed": agg.allowed,
            "denied": agg.denied,
            "bucketSeconds": round(width, 3),
            "buckets": [
                {"start": _iso(start + i * width), "allowed": a, "denied": d}
                for i, (a, d) in enumerate(agg.buckets)
            ],
            "deniedByCluster": dict(agg.denied_by_cluster.most_common(MAX_LIST)),
            "crossCluster": agg.graph.cross_cluster(MAX_LIST),
        },
        "completeness": _completeness(db, agg, now),
        "access": {
            "requested": agg.access_counts["requested"],
            "approved": agg.access_counts["approved"],
            "denied": agg.access_counts["denied"],
            "fulfilled": len(agg.fulfilment),
            "p50Seconds": _round(_percentile(agg.fulfilment, 0.5)),
            "p95Seconds": _round(_percentile(agg.fulfilment, 0.95)),
            "unansweredInWindow": len(pending),
        },
        "stale": {"days": inputs.stale_days, "items": list(inputs.stale)[:MAX_LIST]},
        "anomalies": {
            "total": sum(agg.anomalies.values()),
            "byDetector": dict(sorted(agg.anomalies.items())),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
