"""The policy engine's decisions (DESIGN §3), on bundles compiled from manifests the
way the control plane compiles them: deny overrides allow, no matching allow is deny,
subjects, cluster and namespace scopes, Kubernetes, non-resource and service rules,
and what every decision carries. Further named cases live in ``testdata/engine/``."""

from __future__ import annotations

from typing import Any

import pytest
from policy_fixtures import INVENTORY, binding, policy, registry, role

from trustmesh.common.errors import PolicyError
from trustmesh.policy.compiler import compile_all, compile_bundle, identity_claims
from trustmesh.policy.engine import MAX_READINGS, Decision, Engine
from trustmesh.request import parse_request

REGISTRY = registry()
PAYMENTS = "spiffe://corp.example/cluster/prod-eu/ns/shop/sa/payments"
CI = "spiffe://corp.example/cluster/dev-us/ns/build/sa/ci"
CALLER = "spiffe://corp.example/ns/tests/sa/caller"
REVISION = 12

READER = role("reader", "{apiGroups: [''], resources: [pods], verbs: [get, list]}")
GET_PODS = {"verb": "get", "resource": "pods", "namespace": "shop"}


def engines(*documents: str, revision: int = REVISION) -> dict[str, Engine]:
    """One engine per registered cluster, from the bundles an apply would publish."""
    bundles = compile_all(policy("".join(documents)), REGISTRY, revision)
    return {cluster: Engine(bundle) for cluster, bundle in bundles.items()}


def engine(*documents: str, cluster: str = "prod-eu") -> Engine:
    return engines(*documents)[cluster]


def as_workload(name: str) -> tuple[str, dict[str, Any]]:
    return REGISTRY.spiffe_id_of(name), identity_claims(REGISTRY, name)


def decide(
    engine: Engine, request: dict[str, Any], who: str = "payments", **claims: Any
) -> Decision:
    """``who`` is a registered workload, or a SPIFFE ID deciding with ``claims``."""
    spiffe_id, found = as_workload(who) if who in REGISTRY.workloads else (who, claims)
    return engine.decide(spiffe_id, found, parse_request(request))


def allowed(engine: Engine, request: dict[str, Any], who: str = "payments", **claims: Any) -> bool:
    return decide(engine, request, who, **claims).allowed


def one_rule(rule: str) -> Engine:
    """A role of one rule, bound to the payments workload."""
    return engine(role("r", rule), binding("b", "r", "[{workload: payments}]"))


def k8s(verb: str, resource: str, **more: str) -> dict[str, str]:
    return {"verb": verb, "resource": resource, "namespace": "shop", **more}


def service(host: str, path: str = "/", method: str = "GET") -> dict[str, str]:
    return {"host": host, "path": path, "method": method}


# --- deny overrides allow; default deny -------------------------------------------------


def test_a_matching_deny_binding_overrides_a_matching_allow() -> None:
    tm = engine(
        READER,
        binding("read", "reader", "[{workload: payments}]"),
        binding("no-reads", "reader", "[{claims: {project: shop}}]", "effect: deny"),
    )
    decision = decide(tm, GET_PODS)
    assert not decision.allowed and decision.denied
    assert decision.bindings == ("no-reads",) and decision.roles == ("reader",)
    assert decision.reason == "denied by RoleBinding no-reads (role reader)"


def test_a_deny_that_does_not_cover_the_request_leaves_the_allow_standing() -> None:
    tm = engine(
        READER,
        role("deleter", "{apiGroups: [''], resources: [pods], verbs: [delete]}"),
        binding("read", "reader", "[{workload: payments}]"),
        binding("no-deletes", "deleter", "[{workload: payments}]", "effect: deny"),
        binding("no-ci", "reader", "[{workload: ci}]", "effect: deny"),
    )
    decision = decide(tm, GET_PODS)
    assert decision.allowed and not decision.denied and decision.bindings == ("read",)
    assert decide(tm, {**GET_PODS, "verb": "delete"}).denied


def test_without_a_matching_allow_the_answer_is_deny_and_names_nothing() -> None:
    tm = engine(READER, binding("read", "reader", "[{workload: payments}]"))
    for request, who, why in [
        (
            {**GET_PODS, "verb": "delete"},
            "payments",
            "nearest: RoleBinding read matched the subject but no rule of role reader: "
            "the closest misses verb delete",
        ),
        (GET_PODS, "ci", "no allow RoleBinding names this identity"),
        (
            {"verb": "get", "nonResourceURL": "/api/v1/pods"},
            "payments",
            "nearest: RoleBinding read matched the subject but role reader has no nonResource rule",
        ),
    ]:
        decision = decide(tm, request, who)
        assert not decision.allowed and not decision.denied
        assert decision.bindings == () and decision.roles == ()
        assert decision.reason == f"no RoleBinding allows this request (default deny); {why}"


def test_an_empty_policy_denies_everything() -> None:
    tm = engine()
    assert not allowed(tm, GET_PODS)
    assert not allowed(tm, {"host": "api.shop.svc", "path": "/", "method": "GET"})


# --- subjects ---------------------------------------------------------------------------


def test_a_spiffe_id_subject_matches_that_exact_id_whatever_its_claims() -> None:
    tm = engine(READER, binding("read", "reader", f"[{{spiffeId: '{PAYMENTS}'}}]"))
    assert allowed(tm, GET_PODS, "payments")
    assert allowed(tm, GET_PODS, PAYMENTS)  # no claims at all
    for other in (PAYMENTS + "/x", PAYMENTS + "-2", PAYMENTS.replace("corp", "other"), CI):
        assert not allowed(tm, GET_PODS, other)


def test_a_workload_subject_names_the_workloads_registered_spiffe_id() -> None:
    tm = engine(READER, binding("read", "reader", "[{workload: ci}]"))
    assert allowed(tm, GET_PODS, "ci")
    assert allowed(tm, GET_PODS, CI)
    assert not allowed(tm, GET_PODS, "payments")


def test_subject_claims_must_all_be_present_and_equal() -> None:
    tm = engine(READER, binding("read", "reader", "[{claims: {project: shop, tier: gold}}]"))
    assert allowed(tm, GET_PODS, "payments")  # registered with project=shop, tier=gold
    assert allowed(tm, GET_PODS, CALLER, project="shop", tier="gold", extra="ignored")
    assert not allowed(tm, GET_PODS, CALLER, project="shop")
    assert not allowed(tm, GET_PODS, CALLER, project="shop", tier="silver")
    assert not allowed(tm, GET_PODS, CALLER, project="Shop", tier="gold")
    assert not allowed(tm, GET_PODS, CALLER, project="shop", tier=None)


@pytest.mark.parametrize(
    ("expression", "claims", "expected"),
    [
        ("{key: tier, operator: In, values: [gold, silver]}", {"tier": "silver"}, True),
        ("{key: tier, operator: In, values: [gold, silver]}", {"tier": "bronze"}, False),
        ("{key: tier, operator: In, values: [gold, silver]}", {}, False),
        ("{key: tier, operator: In, values: [gold, silver]}", {"tier": ["gold"]}, False),
        ("{key: tier, operator: NotIn, values: [bronze]}", {"tier": "gold"}, True),
        ("{key: tier, operator: NotIn, values: [bronze]}", {"tier": "bronze"}, False),
        ("{key: tier, operator: NotIn, values: [bronze]}", {}, True),  # absent is NotIn
        ("{key: project, operator: Exists}", {"project": "shop"}, True),
        ("{key: project, operator: Exists}", {"project": ""}, True),
        ("{key: project, operator: Exists}", {}, False),
        ("{key: sandbox, operator: DoesNotExist}", {}, True),
        ("{key: sandbox, operator: DoesNotExist}", {"sandbox": ""}, False),
    ],
)
def test_match_expressions_follow_kubernetes_label_selectors(
    expression: str, claims: dict[str, Any], expected: bool
) -> None:
    tm = engine(READER, binding("read", "reader", f"[{{matchExpressions: [{expression}]}}]"))
    assert allowed(tm, GET_PODS, CALLER, **claims) is expected


def test_a_subject_needs_every_condition_and_a_binding_any_of_its_subjects() -> None:
    tm = engine(
        READER,
        binding("gold-payments", "reader", f"[{{spiffeId: '{PAYMENTS}', claims: {{tier: gold}}}}]"),
    )
    assert allowed(tm, GET_PODS, PAYMENTS, tier="gold")
    assert not allowed(tm, GET_PODS, PAYMENTS, tier="silver")
    assert not allowed(tm, GET_PODS, CALLER, tier="gold")
    tm = engine(READER, binding("either", "reader", "[{workload: ci}, {claims: {team: a}}]"))
    assert allowed(tm, GET_PODS, "ci") and allowed(tm, GET_PODS, CALLER, team="a")
    assert not allowed(tm, GET_PODS, CALLER, team="b")


def test_tokens_of_one_spiffe_id_are_decided_on_their_own_claims() -> None:
    # One engine remembers which bindings name an identity; a token whose claims differ
    # (even only absent against null) must not be handed an earlier token's bindings.
    tm = engine(
        READER, binding("tiered", "reader", "[{matchExpressions: [{key: tier, operator: Exists}]}]")
    )
    for claims, expected in [
        ({"tier": "gold"}, True),
        ({}, False),
        ({"tier": None}, True),  # present, though null
        ({}, False),
        ({"tier": None}, True),
    ]:
        assert allowed(tm, GET_PODS, CALLER, **claims) is expected, claims


# --- clusters and namespaces ------------------------------------------------------------


def test_a_binding_applies_only_in_the_clusters_its_scope_selects() -> None:
    by_cluster = engines(
        READER,
        binding("by-name", "reader", "[{claims: {team: name}}]", "clusters: {names: [dev-us]}"),
        binding(
            "by-label",
            "reader",
            "[{claims: {team: label}}]",
            "clusters: {selector: {matchLabels: {environment: prod}}}",
        ),
        binding(
            "by-expression",
            "reader",
            "[{claims: {team: expression}}]",
            "clusters: {selector: {matchExpressions: [{key: region, operator: NotIn, values: [eu]}]}}",
        ),
        binding("everywhere", "reader", "[{claims: {team: a}}]"),
    )
    expected = {
        "name": {"dev-us"},
        "label": {"prod-eu"},
        "expression": {"dev-us"},
        "a": {"dev-us", "prod-eu"},
    }
    for team, clusters in expected.items():
        assert {c for c, tm in by_cluster.items() if allowed(tm, GET_PODS, CALLER, team=team)} == (
            clusters
        )


def test_a_clusters_bundle_holds_only_the_bindings_and_roles_that_apply_there() -> None:
    text = (
        READER
        + role("writer", "{apiGroups: [''], resources: [pods], verbs: [create]}")
        + binding("read", "reader", "[{workload: payments}]", "clusters: {names: [prod-eu]}")
        + binding("write", "writer", "[{workload: ci}]", "clusters: {names: [dev-us]}")
    )
    bundles = compile_all(policy(text), REGISTRY, REVISION)
    assert [b["name"] for b in bundles["prod-eu"]["bindings"]] == ["read"]
    assert list(bundles["prod-eu"]["roles"]) == ["reader"]
    assert [b["name"] for b in bundles["dev-us"]["bindings"]] == ["write"]


def test_a_binding_with_namespaces_matches_only_requests_in_them() -> None:
    kinds = role(
        "kinds",
        "{apiGroups: [''], resources: [pods], verbs: [get]}",
        "{nonResourceURLs: [/healthz], verbs: [get]}",
        "{services: [api.shop.svc, api.example], paths: ['*'], methods: [GET]}",
    )
    tm = engine(kinds, binding("shop", "kinds", "[{workload: payments}]", "namespaces: [shop]"))
    assert allowed(tm, GET_PODS)
    assert not allowed(tm, {**GET_PODS, "namespace": "build"})
    assert not allowed(tm, {**GET_PODS, "namespace": "shop-2"})
    # Requests without a namespace never match a binding that lists namespaces.
    assert not allowed(tm, {"verb": "get", "resource": "pods"})
    assert not allowed(tm, {"verb": "get", "nonResourceURL": "/healthz"})
    assert allowed(tm, {**service("api.shop.svc"), "namespace": "shop"})
    assert not allowed(tm, {**service("api.shop.svc"), "namespace": "build"})
    assert not allowed(tm, service("api.example"))  # an external host: no namespace
    tm = engine(kinds, binding("anywhere", "kinds", "[{workload: payments}]"))
    assert allowed(tm, {"verb": "get", "resource": "pods"})
    assert allowed(tm, {**GET_PODS, "namespace": "build"})
    assert allowed(tm, {"verb": "get", "nonResourceURL": "/healthz"})
    assert allowed(tm, service("api.example"))


# --- Kubernetes rules -------------------------------------------------------------------


def test_kubernetes_star_matches_any_verb_api_group_or_resource() -> None:
    tm = one_rule("{apiGroups: [''], resources: [pods], verbs: ['*']}")
    assert allowed(tm, k8s("delete", "pods")) and allowed(tm, k8s("escalate", "pods"))
    assert not allowed(tm, k8s("delete", "pods", apiGroup="apps"))
    tm = one_rule("{apiGroups: ['*'], resources: [deployments], verbs: [get]}")
    assert allowed(tm, k8s("get", "deployments", apiGroup="apps"))
    assert allowed(tm, k8s("get", "deployments"))
    assert not allowed(tm, k8s("list", "deployments", apiGroup="apps"))
    tm = one_rule("{apiGroups: [apps], resources: ['*'], verbs: [get]}")
    assert allowed(tm, k8s("get", "statefulsets", apiGroup="apps"))
    assert allowed(tm, k8s("get", "deployments", apiGroup="apps", subresource="scale"))
    assert not allowed(tm, k8s("get", "pods"))


def test_a_plain_resource_does_not_cover_its_subresources() -> None:
    tm = one_rule("{apiGroups: [''], resources: [pods], verbs: [get]}")
    assert allowed(tm, k8s("get", "pods"))
    assert not allowed(tm, k8s("get", "pods", subresource="log"))
    assert not allowed(tm, k8s("get", "pods", subresource="exec"))


def test_subresource_rules_cover_that_subresource_only() -> None:
    tm = one_rule("{apiGroups: [''], resources: [pods/log], verbs: [get]}")
    assert allowed(tm, k8s("get", "pods", subresource="log"))
    assert not allowed(tm, k8s("get", "pods"))
    assert not allowed(tm, k8s("get", "pods", subresource="exec"))
    assert not allowed(tm, k8s("get", "jobs", subresource="log"))
    tm = one_rule("{apiGroups: ['*'], resources: ['*/scale'], verbs: [get]}")
    assert allowed(tm, k8s("get", "deployments", apiGroup="apps", subresource="scale"))
    assert allowed(tm, k8s("get", "statefulsets", apiGroup="apps", subresource="scale"))
    assert not allowed(tm, k8s("get", "deployments", apiGroup="apps"))
    assert not allowed(tm, k8s("get", "deployments", apiGroup="apps", subresource="status"))


def test_resource_names_narrow_a_rule_to_the_named_objects() -> None:
    tm = one_rule(
        "{apiGroups: [''], resources: [configmaps], resourceNames: [app-config], verbs: [get]}"
    )
    assert allowed(tm, k8s("get", "configmaps", name="app-config"))
    assert not allowed(tm, k8s("get", "configmaps", name="db-password"))
    assert not allowed(tm, k8s("get", "configmaps", name="App-Config"))
    assert not allowed(tm, k8s("get", "configmaps"))  # no name: not covered


def test_non_resource_urls_match_exactly_or_by_prefix_with_a_trailing_star() -> None:
    def url(path: str, verb: str = "get") -> dict[str, str]:
        return {"verb": verb, "nonResourceURL": path}

    tm = one_rule("{nonResourceURLs: [/healthz, '/metrics*', '/apis/*'], verbs: [get]}")
    assert allowed(tm, url("/healthz"))
    assert not allowed(tm, url("/healthz/")) and not allowed(tm, url("/healthz/ready"))
    assert not allowed(tm, url("/healthz", "post"))
    assert allowed(tm, url("/metrics")) and allowed(tm, url("/metrics/cadvisor"))
    assert allowed(tm, url("/metricsx"))  # a string prefix, as in RBAC
    assert not allowed(tm, url("/metric"))
    assert allowed(tm, url("/apis/apps/v1")) and allowed(tm, url("/apis/"))
    assert not allowed(tm, url("/apis"))
    tm = one_rule("{nonResourceURLs: ['*'], verbs: [get]}")
    assert allowed(tm, url("/")) and allowed(tm, url("/debug/pprof/heap"))


# --- service rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hosts", "host", "expected"),
    [
        ("[api.shop.svc]", "api.shop.svc", True),
        ("[api.shop.svc]", "API.Shop.svc", True),  # hosts are compared lowercased
        ("[api.shop.svc]", "api.shop.svc:8080", True),  # the port is removed
        ("[api.shop.svc]", "api.shop.svc.", True),  # and one trailing dot
        ("[api.shop.svc]", "api.shop.svc.cluster.local", True),  # and the cluster domain
        ("[api.shop.svc]", "api.shop.svc.cluster.local.:443", True),
        ("[api.shop.svc]", "api.shop.svc.other.local", False),  # another cluster's domain
        ("[api.shop.svc]", "web.shop.svc", False),
        ("[api.shop.svc]", "xapi.shop.svc", False),
        ("[api.shop.svc]", "api.shop.svc.evil.example", False),
        ("['*.shop.svc']", "web.shop.svc", True),
        ("['*.shop.svc']", "a.web.shop.svc", True),
        ("['*.shop.svc']", "web.shop.svc:8080", True),
        ("['*.shop.svc']", "shop.svc", False),  # not the suffix itself
        ("['*.shop.svc']", "evilshop.svc", False),
        ("['*.shop.svc']", "web.shop.svc.evil.example", False),
        ("['*']", "evil.example:8080", True),
    ],
)
def test_service_rule_hosts(hosts: str, host: str, expected: bool) -> None:
    tm = one_rule(f"{{services: {hosts}, paths: ['*'], methods: [GET]}}")
    assert allowed(tm, service(host)) is expected


def test_each_cluster_reads_hosts_with_its_own_cluster_domain() -> None:
    """The Cluster's clusterDomain travels in its bundle; the agent of that cluster
    reads <svc>.<ns>.svc.<clusterDomain> as the service, and only that domain."""
    inventory = registry(
        INVENTORY.replace(
            'spec: {issuer: "https://dev-us.example",',
            'spec: {clusterDomain: corp.internal, issuer: "https://dev-us.example",',
        )
    )
    text = role("admin", "{services: [admin.shop.svc], paths: ['*'], methods: [GET]}") + binding(
        "no-admin", "admin", "[{claims: {project: shop}}]", "effect: deny"
    )
    bundles = compile_all(policy(text), inventory, REVISION)
    assert bundles["dev-us"]["clusterDomain"] == "corp.internal"
    assert bundles["prod-eu"]["clusterDomain"] == "cluster.local"
    dev, prod = Engine(bundles["dev-us"]), Engine(bundles["prod-eu"])
    claims = {"project": "shop"}
    for engine_, host, denied in [
        (dev, "admin.shop.svc.corp.internal", True),
        (dev, "admin.shop.svc.corp.internal.:443", True),
        (dev, "admin.shop.svc.cluster.local", False),  # not this cluster's domain
        (prod, "admin.shop.svc.cluster.local", True),
        (prod, "admin.shop.svc.corp.internal", False),
    ]:
        decision = engine_.decide(CALLER, claims, parse_request(service(host)))
        assert decision.denied is denied, (engine_.cluster, host, decision)


def test_a_stored_version_with_ports_or_the_cluster_domain_in_rule_hosts_still_denies() -> None:
    """Applies refuse such rule hosts now (checked with the whole policy, so stored
    versions from before still load); an engine reads them without the port or the
    domain, so the deny they spell keeps denying every spelling of the host."""
    text = role(
        "admin",
        "{services: ['admin.shop.svc:8443', 'api.shop.svc.cluster.local'], paths: ['*'], "
        "methods: [GET]}",
    ) + binding("no-admin", "admin", "[{workload: payments}]", "effect: deny")
    stored = policy(text)  # loads, as a stored version is loaded
    with pytest.raises(PolicyError) as caught:
        compile_all(stored, REGISTRY, REVISION)  # what an apply or a rollback runs
    assert sorted(caught.value.problems) == [
        "GlobalRole admin: rules[0]: service host 'admin.shop.svc:8443' has a port: rules "
        "name hosts, and the port is removed from every request before matching (write "
        "'admin.shop.svc')",
        "GlobalRole admin: rules[0]: service host 'api.shop.svc.cluster.local': name a "
        "service as <svc>.<ns>.svc (the cluster domain is removed from requests before "
        "matching: write 'api.shop.svc')",
    ]
    tm = Engine(compile_bundle(stored, REGISTRY, "prod-eu", REVISION))  # as bundles.py does
    for host in ("admin.shop.svc", "admin.shop.svc:8443", "admin.shop.svc:80", "api.shop.svc"):
        assert decide(tm, service(host)).denied, host


def test_a_short_host_with_too_many_readings_is_denied_without_deciding_them() -> None:
    """Each namespace a rule names is a reading of a one-label host: past MAX_READINGS
    the engine asks for the namespace instead of deciding every reading."""
    spaces = [f"ns{i}" for i in range(MAX_READINGS)]
    rules = ", ".join(f"'*.{ns}.svc'" for ns in spaces)
    tm = one_rule(f"{{services: [{rules}, '*'], paths: ['*'], methods: [GET]}}")
    decision = decide(tm, service("api"))
    assert not decision.allowed and not decision.denied
    assert f"more than {MAX_READINGS}; give the request its namespace" in decision.reason
    assert allowed(tm, {**service("api"), "namespace": "ns3"})  # one reading: api.ns3.svc
    fewer = one_rule(
        f"{{services: [{rules.rsplit(', ', 1)[0]}, '*'], paths: ['*'], methods: [GET]}}"
    )
    assert allowed(fewer, service("api"))  # 64 readings, each allowed by '*'


@pytest.mark.parametrize(
    ("glob", "path", "expected"),
    [
        ("/orders/*", "/orders/42", True),
        ("/orders/*", "/orders/42/items", False),  # * is exactly one segment
        ("/orders/*", "/orders", False),
        ("/orders/*", "/Orders/42", False),  # paths match case-sensitively
        ("/orders/*", "/orders/42?expand=a/b", True),  # the query is not the path
        ("/reports/**", "/reports", True),  # ** is any number of segments, none included
        ("/reports/**", "/reports/2024/q1/summary", True),
        ("/reports/**", "/reportsx/1", False),
        ("/reports/**", "/other/reports/1", False),
        ("/users/*/profile", "/users/7/profile", True),
        ("/users/*/profile", "/users/7/8/profile", False),
        ("/files/**/meta", "/files/meta", True),
        ("/files/**/meta", "/files/a/b/meta", True),
        ("/files/**/meta", "/files/a/meta/x", False),
        ("/v1/item-*", "/v1/item-42", True),
        ("/v1/item-*", "/v1/item-4/2", False),
        ("/static/app.js", "/static/app.js", True),
        ("/static/app.js", "/static/appxjs", False),  # a dot is a dot
        ("*", "/any/thing", True),
        ("/**", "/", True),
    ],
)
def test_service_rule_path_globs(glob: str, path: str, expected: bool) -> None:
    tm = one_rule(f"{{services: [api.shop.svc], paths: ['{glob}'], methods: [GET]}}")
    assert allowed(tm, service("api.shop.svc", path)) is expected


def test_service_rule_methods_are_listed_or_star() -> None:
    tm = one_rule("{services: [api.shop.svc], paths: ['/**'], methods: [GET, HEAD]}")
    assert allowed(tm, service("api.shop.svc", "/a", "GET"))
    assert allowed(tm, service("api.shop.svc", "/a", "get"))  # the request model upper-cases
    assert not allowed(tm, service("api.shop.svc", "/a", "POST"))
    tm = one_rule("{services: [api.shop.svc], paths: ['/**'], methods: ['*']}")
    assert allowed(tm, service("api.shop.svc", "/a", "DELETE"))
    assert allowed(tm, service("api.shop.svc", "/a", "PURGE"))


def test_service_rules_grant_only_service_requests() -> None:
    tm = one_rule("{services: ['*'], paths: ['*'], methods: ['*']}")
    assert allowed(tm, service("api.shop.svc"))
    assert not allowed(tm, k8s("get", "pods"))
    assert not allowed(tm, {"verb": "get", "nonResourceURL": "/healthz"})
    tm = one_rule("{apiGroups: ['*'], resources: ['*'], verbs: ['*']}")
    assert not allowed(tm, service("api.shop.svc"))


# --- what a decision carries ------------------------------------------------------------


def test_a_decision_names_every_matching_binding_and_each_role_once() -> None:
    tm = engine(
        READER,
        role("viewer", "{apiGroups: [''], resources: [pods, services], verbs: [get]}"),
        binding("by-project", "reader", "[{claims: {project: shop}}]"),
        binding("by-workload", "reader", "[{workload: payments}]"),
        binding("viewers", "viewer", "[{claims: {tier: gold}}]"),
        binding("someone-else", "viewer", "[{workload: ci}]"),
    )
    decision = decide(tm, GET_PODS)
    assert decision.allowed
    assert sorted(decision.bindings) == ["by-project", "by-workload", "viewers"]
    assert sorted(decision.roles) == ["reader", "viewer"]
    first = decision.bindings[0]
    role_of = {"by-project": "reader", "by-workload": "reader", "viewers": "viewer"}
    assert decision.reason == f"allowed by RoleBinding {first} (role {role_of[first]})"


def test_a_decision_carries_the_policy_revision_and_a_unique_id() -> None:
    text = READER + binding("read", "reader", "[{workload: payments}]")
    first = engines(text, revision=41)["prod-eu"]
    decisions = [decide(first, GET_PODS) for _ in range(3)] + [decide(first, GET_PODS, "ci")]
    assert {d.policy_revision for d in decisions} == {41}
    other = engines(text, revision=41)["prod-eu"]  # another agent, same bundle
    ids = [d.decision_id for d in decisions] + [decide(other, GET_PODS).decision_id]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == len(ids)
    assert decisions[0].to_json() == {
        "allowed": True,
        "denied": False,
        "reason": "allowed by RoleBinding read (role reader)",
        "bindings": ["read"],
        "roles": ["reader"],
        "policy_revision": 41,
        "decision_id": decisions[0].decision_id,
    }


def test_an_engine_takes_a_bundle_dict_shaped_as_the_compiler_emits_it() -> None:
    bundle = {
        "apiVersion": "trustmesh.io/v1alpha1",
        "kind": "PolicyBundle",
        "cluster": "prod-eu",
        "revision": 5,
        "registryRevision": 1,
        "roles": {"reader": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
        "bindings": [
            {
                "name": "read",
                "role": "reader",
                "effect": "allow",
                "subjects": [{"spiffeId": PAYMENTS}],
                "namespaces": ["shop"],
            }
        ],
        "identities": {},
    }
    compiled = compile_bundle(
        policy(READER + binding("read", "reader", "[{workload: payments}]", "namespaces: [shop]")),
        REGISTRY,
        "prod-eu",
        5,
    )
    assert (compiled["roles"], compiled["bindings"]) == (bundle["roles"], bundle["bindings"])
    tm = Engine(bundle)  # no claim counts: the engine counts the (empty) inventory itself
    assert decide(tm, GET_PODS).allowed
    assert not decide(tm, {**GET_PODS, "namespace": "build"}).allowed
    assert decide(tm, GET_PODS).policy_revision == 5
