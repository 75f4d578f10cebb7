"""The demo's federation and what it must show: three clusters and six workloads, the
twelve (workload -> cluster) routes the traffic follows with the decision each must
get, the policy documents of both stages (and the PolicyTest made from the routes),
the bad and the good policy change, and the workload the demo revokes; and the mesh
act's three workloads (two callers in eu-west, the orders service in us-east), the
calls they make over mTLS with the answer each must get, and the workload it suspends.

Everything here is data and pure functions: no process, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trustmesh.manifests import API_VERSION
from trustmesh.spiffeid import workload_spiffe_id

TRUST_DOMAIN = "demo.trustmesh.io"
REVOKED_WORKLOAD = "inventory"
REVOCATION_REASON = "credentials leaked in a CI build log"


# -- the federation ----------------------------------------------------------------------


@dataclass(frozen=True)
class DemoCluster:
    """A simulated cluster of the demo, and the labels it is registered with."""

    name: str
    region: str
    environment: str


@dataclass(frozen=True)
class DemoWorkload:
    """A workload of the demo: where it runs, and the claims it is registered with."""

    name: str
    cluster: str
    namespace: str
    service_account: str
    project: str
    environment: str
    tier: str

    @property
    def spiffe_id(self) -> str:
        """The default SPIFFE ID of an entry that names none (DESIGN §2)."""
        return workload_spiffe_id(TRUST_DOMAIN, self.cluster, self.namespace, self.service_account)


CLUSTERS = (
    DemoCluster("eu-west", "eu-west-1", "production"),
    DemoCluster("us-east", "us-east-1", "production"),
    DemoCluster("ap-south", "ap-south-1", "staging"),
)
WORKLOADS = (
    DemoWorkload("payments", "eu-west", "shop", "payments", "shop", "production", "gold"),
    DemoWorkload("checkout", "eu-west", "shop", "checkout", "shop", "production", "silver"),
    DemoWorkload(
        "inventory", "us-east", "warehouse", "inventory", "warehouse", "production", "silver"
    ),
    DemoWorkload("search", "us-east", "catalog", "search", "catalog", "production", "bronze"),
    DemoWorkload("ledger", "ap-south", "finance", "ledger", "finance", "staging", "gold"),
    DemoWorkload("reports", "ap-south", "finance", "reports", "finance", "staging", "bronze"),
)
WORKLOAD_BY_NAME = {wl.name: wl for wl in WORKLOADS}
ROGUE_CLUSTER = "rogue"
FORGED_AUDIENCE = "us-east"  # where the intruder's forged token wants to go

# The mesh act: workloads that hold X.509-SVIDs (from a trustmesh sidecar each) and talk
# over mTLS through Envoys. frontend and crawler call orders; orders only answers.
MESH_WORKLOADS = (
    DemoWorkload("frontend", "eu-west", "web", "frontend", "web", "production", "gold"),
    DemoWorkload("crawler", "eu-west", "web", "crawler", "web", "production", "bronze"),
    DemoWorkload("orders", "us-east", "shop", "orders", "shop", "production", "gold"),
)
MESH_BY_NAME = {wl.name: wl for wl in MESH_WORKLOADS}
MESH_CALLERS = ("frontend", "crawler")
MESH_SERVER = "orders"
MESH_AGENT_ID = "us-east-mesh"  # the agent behind orders' Envoy: its own credential
SUSPENDED_WORKLOAD = "frontend"
SUSPENSION_REASON = "frontend pod compromised: suspended pending investigation"
DEFAULT_SVID_TTL = 20  # the mesh workloads' maxTokenTTL: X.509-SVIDs renewed every ~10 s


def manifest(issuers: dict[str, str], svid_ttl: int = DEFAULT_SVID_TTL) -> str:
    """Cluster (issuer only: keys by OIDC discovery) and Workload documents; the mesh
    workloads' credentials live ``svid_ttl`` seconds (``maxTokenTTL``), so their
    sidecars renew them at half-life within the demo."""
    documents: list[dict[str, Any]] = []
    for spec in CLUSTERS:
        labels = {"region": spec.region, "environment": spec.environment}
        documents.append(
            _document("Cluster", spec.name, {"issuer": issuers[spec.name], "labels": labels})
        )
    for wl in (*WORKLOADS, *MESH_WORKLOADS):
        selector = {
            "cluster": wl.cluster,
            "namespace": wl.namespace,
            "serviceAccount": wl.service_account,
        }
        claims = {"project": wl.project, "environment": wl.environment, "tier": wl.tier}
        workload: dict[str, Any] = {"selector": selector, "claims": claims}
        if wl in MESH_WORKLOADS:
            workload["maxTokenTTL"] = svid_ttl
        documents.append(_document("Workload", wl.name, workload))
    return yaml.safe_dump_all(documents, sort_keys=False)


def _document(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


# -- the policy ----------------------------------------------------------------------------
#
# Two services, two roles, four bindings. ROUTES is the demo's traffic *and* its
# expectation: what each (workload -> cluster) call must get under the initial policy
# and after the accepted change. The PolicyTest applied with the policy is made from the
# same table, so the control plane refuses to publish a policy that disagrees with it,
# and every decision an agent answers during the run is checked against it.


@dataclass(frozen=True)
class ServiceCall:
    method: str
    host: str
    path: str

    def request(self) -> dict[str, str]:
        """The flat service request of ``POST /v1/authorize`` (DESIGN §4)."""
        return {"host": self.host, "path": self.path, "method": self.method}

    def __str__(self) -> str:
        return f"{self.method} {self.host}{self.path}"

    @property
    def short(self) -> str:
        return f"{self.method} {self.path}"


ORDERS_READ = ServiceCall("GET", "orders.shop.internal", "/api/orders/1042")
ORDERS_DELETE = ServiceCall("DELETE", "orders.shop.internal", "/api/orders/1042")
LEDGER_WRITE = ServiceCall("POST", "ledger.finance.internal", "/api/ledger/entries")


@dataclass(frozen=True)
class Expect:
    """What a decision must be: ``allow`` or ``deny`` by the named RoleBinding, or the
    ``default deny`` of a request no binding allows."""

    effect: str
    binding: str = ""

    def matches(self, decision: dict[str, Any]) -> bool:
        bindings = decision.get("bindings") or []
        allowed, denied = decision.get("allowed") is True, decision.get("denied") is True
        if self.effect == "allow":
            return allowed and not denied and self.binding in bindings
        if self.effect == "deny":
            return denied and not allowed and self.binding in bindings
        return not allowed and not denied

    @property
    def verdict(self) -> str:
        return "allow" if self.effect == "allow" else "deny"

    def __str__(self) -> str:
        return f"{self.effect} by {self.binding}" if self.binding else self.effect


def allow(binding: str) -> Expect:
    return Expect("allow", binding)


def deny(binding: str) -> Expect:
    return Expect("deny", binding)


DEFAULT_DENY = Expect("default deny")


@dataclass(frozen=True)
class Route:
    """One (workload -> target cluster) flow: its request and what it must get, per
    policy stage (0: the initial policy, 1: after the accepted change)."""

    workload: str
    target: str
    call: ServiceCall
    expect: tuple[Expect, Expect]


def _route(
    workload: str, target: str, call: ServiceCall, before: Expect, after: Expect | None = None
) -> Route:
    return Route(workload, target, call, (before, after or before))


ROUTES = (
    _route("payments", "us-east", ORDERS_READ, allow("shop-reads-orders")),
    _route("payments", "ap-south", LEDGER_WRITE, allow("ledger-writers")),
    _route("checkout", "us-east", ORDERS_READ, allow("shop-reads-orders")),
    _route("checkout", "ap-south", LEDGER_WRITE, DEFAULT_DENY, allow("ledger-writers")),
    _route("inventory", "eu-west", ORDERS_READ, DEFAULT_DENY),
    _route("inventory", "ap-south", LEDGER_WRITE, DEFAULT_DENY),
    _route("search", "eu-west", ORDERS_READ, DEFAULT_DENY),
    _route("search", "ap-south", LEDGER_WRITE, deny("bronze-never-writes-ledger")),
    _route("ledger", "eu-west", LEDGER_WRITE, allow("finance-writes-ledger")),
    _route("ledger", "us-east", LEDGER_WRITE, allow("finance-writes-ledger")),
    _route("reports", "eu-west", LEDGER_WRITE, deny("bronze-never-writes-ledger")),
    _route("reports", "us-east", ORDERS_READ, DEFAULT_DENY),
)
# Checked by the PolicyTest only: shop reads orders in production clusters, not staging.
TEST_ONLY_ROUTES = (_route("checkout", "ap-south", ORDERS_READ, DEFAULT_DENY),)


@dataclass(frozen=True)
class MeshRoute:
    """A call of the mesh act: a workload calls orders (in us-east) over mTLS through
    the Envoys, and the agent behind orders' Envoy decides from its client certificate.
    The same under both policy stages."""

    workload: str
    call: ServiceCall
    expect: Expect

    @property
    def status(self) -> int:
        """What the caller must get: the upstream's 200, or ext_authz's 403."""
        return 200 if self.expect.effect == "allow" else 403

    @property
    def target(self) -> str:
        return MESH_BY_NAME[MESH_SERVER].cluster

    @property
    def name(self) -> str:
        wl = MESH_BY_NAME[self.workload]
        return f"{wl.name}@{wl.cluster} -> {MESH_SERVER}@{self.target} {self.call}"


MESH_ROUTES = (
    MeshRoute("frontend", ORDERS_READ, allow("gold-web-reads-orders")),
    MeshRoute("frontend", ORDERS_DELETE, DEFAULT_DENY),
    MeshRoute("crawler", ORDERS_READ, DEFAULT_DENY),
)


@dataclass(frozen=True)
class PolicyChangeSpec:
    title: str
    stage: int  # the policy stage the manifest describes
    extra: tuple[dict[str, Any], ...] = ()  # documents beyond that stage's policy


BAD_CHANGE = PolicyChangeSpec(
    "every project may write the ledger (new RoleBinding everyone-writes-ledger)",
    0,
    (
        _document(
            "RoleBinding",
            "everyone-writes-ledger",
            {
                "role": "ledger-writer",
                "subjects": [{"matchExpressions": [{"key": "project", "operator": "Exists"}]}],
            },
        ),
    ),
)
GOOD_CHANGE = PolicyChangeSpec(
    "checkout may write the ledger (RoleBinding ledger-writers gains workload checkout)", 1
)


def _rule(call: ServiceCall, paths: str) -> dict[str, list[str]]:
    return {"services": [call.host], "paths": [paths], "methods": [call.method]}


def _binding(name: str, role: str, subjects: list[dict[str, Any]], **scope: Any) -> dict[str, Any]:
    return _document("RoleBinding", name, {"role": role, "subjects": subjects, **scope})


# Every detector live after the demo's first seconds (the defaults wait a day before a
# baseline counts), so the finale's count of findings on normal traffic means something:
# edges and identities are known after one round of traffic; the bursts judge 10 s
# windows against a baseline learnt over 30 s, once one window has fed it.
ANOMALY_DETECTORS: dict[str, dict[str, Any]] = {
    "new_edge": {"warmup": 15},
    "dormant_use": {"warmup": 15},
    "denial_burst": {"warmup": 40, "window": 10, "baselineWindow": 30, "threshold": 20},
    "refusal_burst": {"warmup": 20, "window": 10, "baselineWindow": 30, "threshold": 5},
}


def policy_documents(stage: int) -> list[dict[str, Any]]:
    """GlobalRoles, RoleBindings and the PolicyTest of ``stage``."""
    writers = ["payments", "checkout"] if stage else ["payments"]
    production = {"selector": {"matchLabels": {"environment": "production"}}}
    return [
        _document("GlobalRole", "orders-reader", {"rules": [_rule(ORDERS_READ, "/api/orders/**")]}),
        _document("GlobalRole", "ledger-writer", {"rules": [_rule(LEDGER_WRITE, "/api/ledger/**")]}),
        _binding("shop-reads-orders", "orders-reader", [{"claims": {"project": "shop"}}], clusters=production),
        _binding("ledger-writers", "ledger-writer", [{"workload": name} for name in writers]),
        _binding("finance-writes-ledger", "ledger-writer", [{"claims": {"project": "finance"}}]),
        _binding("bronze-never-writes-ledger", "ledger-writer", [{"claims": {"tier": "bronze"}}], effect="deny"),
        _binding("gold-web-reads-orders", "orders-reader", [{"claims": {"project": "web", "tier": "gold"}}]),
        _document("PolicyTest", "demo-expectations", {"cases": policy_test_cases(stage)}),
        _document("AnomalyPolicy", "demo-analytics", {"detectors": ANOMALY_DETECTORS}),
    ]  # fmt: skip


def policy_test_cases(stage: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"{route.workload} -> {route.target}: {route.call} is {route.expect[stage]}",
            "subject": {"workload": route.workload},
            "cluster": route.target,
            "request": route.call.request(),
            "expect": route.expect[stage].verdict,
        }
        for route in (*ROUTES, *TEST_ONLY_ROUTES)
    ] + [
        {
            "name": f"{route.workload} -> {route.target} over mTLS: {route.call} is {route.expect}",
            "subject": {"workload": route.workload},
            "cluster": route.target,
            "request": route.call.request(),
            "expect": route.expect.verdict,
        }
        for route in MESH_ROUTES
    ]


def policy_manifest(change: PolicyChangeSpec | int) -> str:
    """The whole policy of a stage (an int), or of a change (with its extra documents)."""
    if isinstance(change, int):
        change = PolicyChangeSpec("", change)
    return yaml.safe_dump_all([*policy_documents(change.stage), *change.extra], sort_keys=False)


def write_policy_files(root: Path) -> Path:
    """The manifests the demo applies, for reading (kept with ``--data-dir``)."""
    folder = root / "policy"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (
        ("initial.yaml", policy_manifest(0)),
        ("rejected-change.yaml", policy_manifest(BAD_CHANGE)),
        ("accepted-change.yaml", policy_manifest(GOOD_CHANGE)),
    ):
        (folder / name).write_text(content, encoding="utf-8")
    return folder


# -- the life cycle act (DESIGN §11) ------------------------------------------------------
#
# People with roles replace the bootstrap admin.token; a team's new namespace is onboarded
# by a WorkloadTemplate, with no Workload of its own; a service account nobody onboarded is
# refused, listed as pending and admitted from the manifest the control plane suggests; a
# Workload nobody uses retires by itself; and one access request runs from request to
# expiry through two people.

PEOPLE = (("alice", "admin"), ("bob", "approver"), ("carol", "auditor"))
OPERATOR_PERSON = "alice"  # the demo's changes from then on are hers
REQUESTER, APPROVER = "carol", "bob"


@dataclass(frozen=True)
class ServiceAccount:
    cluster: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.name}"


ONBOARDING_TEMPLATE = "analytics-teams"
ONBOARDED = ServiceAccount("eu-west", "analytics-etl", "loader")  # matched by the template
PENDING = ServiceAccount("us-east", "billing", "invoicer")  # matched by nothing, at first
RETIRING_WORKLOAD = "legacy-export"
RETIRING = ServiceAccount("ap-south", "batch", "exporter")
RETIRE_AFTER = 3  # seconds unused before legacy-export retires
ACCESS_ROLE = "orders-reader"
ACCESS_CLUSTER = "us-east"
ACCESS_CALL = ORDERS_READ
ACCESS_REASON = "one-off export of the order history for the Q4 audit"


def onboarded_workload() -> str:
    """The name trustmesh gives the identity the template derives (DESIGN §11)."""
    sa = ONBOARDED
    return f"{ONBOARDING_TEMPLATE}/{sa.cluster}/{sa.namespace}/{sa.name}"


def onboarding_manifest() -> str:
    """The WorkloadTemplate for every ``analytics-*`` namespace of eu-west, and the
    Workload that will go unused and retire."""
    template = {
        "clusters": {"names": [ONBOARDED.cluster]},
        "namespaces": ["analytics-*"],
        "serviceAccounts": ["*"],
        "claims": {"project": "analytics", "environment": "production", "tier": "silver"},
    }
    retiring = {
        "selector": {
            "cluster": RETIRING.cluster,
            "namespace": RETIRING.namespace,
            "serviceAccount": RETIRING.name,
        },
        "claims": {"project": "finance", "environment": "staging", "tier": "bronze"},
        "retireAfterUnused": RETIRE_AFTER,
    }
    return yaml.safe_dump_all(
        [
            _document("WorkloadTemplate", ONBOARDING_TEMPLATE, template),
            _document("Workload", RETIRING_WORKLOAD, retiring),
        ],
        sort_keys=False,
    )
