"""``trustmesh bench engine`` at a small size: structure, and agreement of Cedar and
casbin with our engine (1.0, or the comparison proves nothing). Nothing here asserts
speed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trustmesh.bench import engine
from trustmesh.bench._policygen import Identity, Sizes, generate_bodies, load_world
from trustmesh.request import parse_request

pytest.importorskip("cedarpy")
pytest.importorskip("casbin")

SMALL: dict[str, Any] = {
    "clusters": 6,
    "workloads": 400,
    "projects": 20,
    "roles": 60,
    "bindings": 240,
}


@pytest.fixture(scope="module")
def small_run() -> dict[str, Any]:
    return engine.run(requests=2_000, seed=11, **SMALL)


def test_small_run_has_the_promised_shape(small_run: dict[str, Any]) -> None:
    result = small_run
    assert set(result) >= {
        "workload",
        "results",
        "agreement",
        "compile_seconds",
        "title",
        "summary",
    }
    assert [r["name"] for r in result["results"]] == ["trustmesh", "cedar", "casbin"]
    for r in result["results"]:
        assert set(r) >= {"name", "p50_us", "p99_us", "decisions_per_s", "per_s", "note"}
        assert r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"] and r["decisions_per_s"] > 0
        assert r["decided"] == 2_000  # small runs time and compare every request
    workload = result["workload"]
    assert workload["requests"] == 2_000 and workload["bindings"] == SMALL["bindings"]
    assert 0.2 < workload["allow_fraction"] < 0.7
    assert set(workload["families"]) == {"resource", "nonResource", "service"}
    assert result["compile_seconds"] > 0
    assert all(isinstance(line, str) for line in result["summary"])
    json.dumps(result, allow_nan=False)


def test_small_run_peers_agree_exactly(small_run: dict[str, Any]) -> None:
    assert small_run["agreement"] == {"cedar": 1.0, "casbin": 1.0}, small_run["disagreements"]
    cedar = next(r for r in small_run["results"] if r["name"] == "cedar")
    assert cedar["evaluation_errors"] == 0


def test_generation_is_deterministic() -> None:
    sizes = Sizes(clusters=3, workloads=50, projects=5, roles=10, bindings=30)
    assert generate_bodies(sizes, 3) == generate_bodies(sizes, 3)
    assert generate_bodies(sizes, 3) != generate_bodies(sizes, 4)


# --- hand-written semantics --------------------------------------------------------------


def _doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "trustmesh.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }


def _workload(name: str, cluster: str, namespace: str, claims: dict[str, str]) -> dict[str, Any]:
    selector = {"cluster": cluster, "namespace": namespace, "serviceAccount": name}
    return _doc("Workload", name, {"selector": selector, "claims": claims})


BODIES = [
    _doc(
        "Cluster",
        "alpha",
        {"issuer": "https://alpha.example", "labels": {"environment": "prod", "region": "eu"}},
    ),
    _doc(
        "Cluster",
        "beta",
        {"issuer": "https://beta.example", "labels": {"environment": "dev", "region": "us"}},
    ),
    _workload(
        "payments", "alpha", "shop", {"project": "shop", "tier": "gold", "environment": "prod"}
    ),
    _workload(
        "batch", "alpha", "jobs", {"project": "shop", "environment": "prod"}
    ),  # no tier claim
    _workload("web", "beta", "web", {"project": "web", "tier": "bronze", "environment": "dev"}),
    _doc(
        "GlobalRole",
        "reader",
        {
            "rules": [
                {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]}
            ]
        },
    ),
    _doc(
        "GlobalRole",
        "scaler",
        {
            "rules": [
                {"apiGroups": ["apps"], "resources": ["*/scale"], "verbs": ["update", "patch"]}
            ]
        },
    ),
    _doc(
        "GlobalRole",
        "secrets",
        {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["*"]}]},
    ),
    _doc(
        "GlobalRole",
        "orders-api",
        {
            "rules": [
                {
                    "services": ["orders.shop.svc", "*.internal"],
                    "paths": ["/v1/orders/**", "/v1/*/status"],
                    "methods": ["GET", "POST"],
                }
            ]
        },
    ),
    _doc(
        "GlobalRole",
        "refunds",
        {
            "rules": [
                {
                    "services": ["orders.shop.svc"],
                    "paths": ["/v1/orders/*/refund"],
                    "methods": ["*"],
                }
            ]
        },
    ),
    _doc(
        "GlobalRole",
        "debug",
        {"rules": [{"nonResourceURLs": ["/metrics", "/debug/*"], "verbs": ["get"]}]},
    ),
    _doc(
        "RoleBinding",
        "read",
        {
            "role": "reader",
            "subjects": [{"claims": {"project": "shop"}}],
            "namespaces": ["shop", "jobs"],
        },
    ),
    _doc(
        "RoleBinding",
        "scale",
        {
            "role": "scaler",
            "subjects": [
                {
                    "claims": {"project": "shop"},
                    "matchExpressions": [
                        {"key": "tier", "operator": "NotIn", "values": ["bronze"]}
                    ],
                },
                {
                    "claims": {"project": "web"},
                    "matchExpressions": [
                        {"key": "tier", "operator": "NotIn", "values": ["bronze"]}
                    ],
                },
            ],
        },
    ),
    _doc(
        "RoleBinding",
        "secrets-allow",
        {"role": "secrets", "subjects": [{"claims": {"project": "shop"}}]},
    ),
    _doc(
        "RoleBinding",
        "secrets-deny",
        {
            "role": "secrets",
            "effect": "deny",
            "subjects": [{"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}],
        },
    ),
    _doc(
        "RoleBinding",
        "orders",
        {
            "role": "orders-api",
            "subjects": [{"claims": {"project": "shop"}}],
            "clusters": {"selector": {"matchLabels": {"environment": "prod"}}},
        },
    ),
    _doc(
        "RoleBinding",
        "no-refunds-for-gold",
        {
            "role": "refunds",
            "effect": "deny",
            "subjects": [{"claims": {"project": "shop", "tier": "gold"}}],
        },
    ),
    _doc(
        "RoleBinding",
        "debug-web",
        {"role": "debug", "subjects": [{"workload": "web"}], "clusters": {"names": ["beta"]}},
    ),
]

ADHOC = Identity(
    workload="",
    spiffe_id="spiffe://bench.example/adhoc/tool",
    claims={"project": "shop", "tier": "silver"},
    cluster="alpha",
)

# (identity, cluster, request, expected allowed, why)
CASES: list[tuple[str, str, dict[str, Any], bool, str]] = [
    (
        "payments",
        "alpha",
        {"verb": "get", "resource": "pods", "namespace": "shop"},
        True,
        "plain allow",
    ),
    (
        "payments",
        "alpha",
        {"verb": "get", "resource": "pods", "namespace": "other"},
        False,
        "namespace scope",
    ),
    (
        "payments",
        "alpha",
        {"verb": "get", "resource": "pods", "subresource": "log", "namespace": "shop"},
        True,
        "res/sub",
    ),
    (
        "payments",
        "alpha",
        {"verb": "get", "resource": "pods", "subresource": "exec", "namespace": "shop"},
        False,
        "default deny",
    ),
    (
        "payments",
        "alpha",
        {"verb": "delete", "resource": "pods", "namespace": "shop"},
        False,
        "verb not granted",
    ),
    (
        "batch",
        "alpha",
        {
            "verb": "patch",
            "apiGroup": "apps",
            "resource": "deployments",
            "subresource": "scale",
            "namespace": "jobs",
        },
        True,
        "*/scale, NotIn on an absent claim holds",
    ),
    (
        "web",
        "beta",
        {
            "verb": "patch",
            "apiGroup": "apps",
            "resource": "deployments",
            "subresource": "scale",
            "namespace": "web",
        },
        False,
        "NotIn excludes bronze",
    ),
    (
        "payments",
        "alpha",
        {"verb": "patch", "apiGroup": "apps", "resource": "deployments", "namespace": "shop"},
        False,
        "*/scale does not cover the resource itself",
    ),
    (
        "payments",
        "alpha",
        {"verb": "get", "resource": "secrets", "namespace": "shop"},
        True,
        "allow, deny does not name it",
    ),
    (
        "batch",
        "alpha",
        {"verb": "get", "resource": "secrets", "namespace": "jobs"},
        False,
        "deny overrides allow",
    ),
    (
        "payments",
        "alpha",
        {"host": "orders.shop.svc", "path": "/v1/orders", "method": "GET"},
        True,
        "** is zero segments",
    ),
    (
        "payments",
        "alpha",
        {"host": "orders.shop.svc:8443", "path": "/v1/orders/a/b/c?x=1", "method": "GET"},
        True,
        "** spans segments; port and query ignored",
    ),
    (
        "payments",
        "alpha",
        {"host": "orders.shop.svc", "path": "/v1/orders/9/refund", "method": "GET"},
        False,
        "deny overrides ** allow",
    ),
    (
        "batch",
        "alpha",
        {"host": "orders.shop.svc", "path": "/v1/orders/9/refund", "method": "GET"},
        True,
        "deny needs tier gold",
    ),
    (
        "payments",
        "alpha",
        {"host": "a.internal", "path": "/v1/items/status", "method": "POST"},
        True,
        "* is one segment",
    ),
    (
        "payments",
        "alpha",
        {"host": "a.internal", "path": "/v1/a/b/status", "method": "GET"},
        False,
        "* does not cross /",
    ),
    (
        "payments",
        "alpha",
        {"host": "internal", "path": "/v1/items/status", "method": "GET"},
        False,
        "*.internal needs a label",
    ),
    (
        "payments",
        "alpha",
        {"host": "orders.shop.svc", "path": "/v1/orders", "method": "DELETE"},
        False,
        "method",
    ),
    (
        "payments",
        "beta",
        {"host": "orders.shop.svc", "path": "/v1/orders", "method": "GET"},
        False,
        "cluster selector",
    ),
    ("web", "beta", {"verb": "get", "nonResourceURL": "/debug/pprof/heap"}, True, "URL prefix"),
    ("web", "beta", {"verb": "get", "nonResourceURL": "/metrics/extra"}, False, "exact URL only"),
    ("web", "alpha", {"verb": "get", "nonResourceURL": "/metrics"}, False, "cluster names"),
    (
        "adhoc",
        "alpha",
        {"host": "orders.shop.svc", "path": "/v1/orders/1", "method": "POST"},
        True,
        "claims-only identity",
    ),
    (
        "adhoc",
        "alpha",
        {"host": "orders.shop.svc", "path": "/v1/orders/1/refund", "method": "POST"},
        True,
        "silver is not denied",
    ),
]


def test_known_cases_all_engines_agree_with_expectations() -> None:
    world = load_world(BODIES)
    by_name = {i.workload: i for i in world.identities}
    queries = [
        engine.Query(ADHOC if who == "adhoc" else by_name[who], cluster, parse_request(request))
        for who, cluster, request, _, _ in CASES
    ]
    answers = engine.decide_all(world, queries)
    assert set(answers) == {"trustmesh", "cedar", "casbin"}
    expected = [case[3] for case in CASES]
    for name, got in answers.items():
        wrong = [
            f"{case[4]}: expected {case[3]}"
            for case, answer in zip(CASES, got, strict=True)
            if answer != case[3]
        ]
        assert got == expected, f"{name}: {wrong}"


def test_a_run_with_template_identities_beside_workloads() -> None:
    """``--template-identities N``: N identities WorkloadTemplates give, drawn into the
    requests alike, decided as the explicit ones are (peers agree)."""
    result = engine.run(requests=600, seed=5, template_identities=200, **SMALL)
    workload = result["workload"]
    assert workload["template_identities"] == 200 and workload["workloads"] == SMALL["workloads"]
    assert 0 < workload["template_identity_requests"] < 1
    assert result["agreement"] == {"cedar": 1.0, "casbin": 1.0}, result["disagreements"]


def test_template_identities_resolve_through_their_templates() -> None:
    from trustmesh.bench._policygen import template_accounts

    sizes = Sizes(
        clusters=3, workloads=50, projects=5, roles=10, bindings=30, template_identities=40
    )
    world = load_world(generate_bodies(sizes, 3), accounts=template_accounts(sizes, 3))
    derived = [i for i in world.identities if "/" in i.workload]
    assert len(derived) == 40 and len(world.identities) == 90
    for identity in derived:
        template = identity.workload.split("/")[0]
        assert template == f"tpl-{identity.claims['project']}-{identity.claims['environment']}"
        assert (
            identity.claims["environment"] == world.cluster_labels(identity.cluster)["environment"]
        )
