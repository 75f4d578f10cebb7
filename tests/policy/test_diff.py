"""The effective policy diff (DESIGN §3): grants over the registered inventory, denies,
escalation flags."""

from __future__ import annotations

import json

import pytest
from policy_fixtures import binding, policy, registry, role

from trustmesh.common.errors import PolicyError
from trustmesh.policy.compiler import identity_claims
from trustmesh.policy.diff import Grant, diff_policies, effective_grants, inventory_bundles
from trustmesh.policy.engine import Engine
from trustmesh.request import parse_request

READER = role("reader", "{apiGroups: [''], resources: [pods], verbs: [get]}")
PAYMENTS = "[{workload: payments}]"


def grants_of(text: str) -> set[Grant]:
    return effective_grants(policy(text), registry())


def targets(
    grants: set[Grant], workload: str = "payments", cluster: str = "prod-eu"
) -> set[tuple[str, ...]]:
    return {
        (g.namespace, g.action, g.target)
        for g in grants
        if g.workload == workload and g.cluster == cluster
    }


def test_a_binding_grants_its_rules_on_every_selected_cluster() -> None:
    grants = grants_of(READER + binding("read", "reader", PAYMENTS, "namespaces: [shop, web]"))
    assert grants == {
        Grant("payments", cluster, ns, "get", "pods", "resource")
        for cluster in ("prod-eu", "dev-us")
        for ns in ("shop", "web")
    }


def test_cluster_scope_and_subject_claims_select_what_is_granted() -> None:
    text = READER + binding(
        "read",
        "reader",
        "[{claims: {environment: dev}}, {matchExpressions: [{key: tier, operator: In, values: [gold]}]}]",
        "clusters: {selector: {matchLabels: {region: us}}}",
    )
    grants = grants_of(text)
    assert {(g.workload, g.cluster) for g in grants} == {("ci", "dev-us"), ("payments", "dev-us")}
    assert all(g.namespace == "*" for g in grants)


def test_targets_name_groups_subresources_names_urls_and_services() -> None:
    text = role(
        "mixed",
        "{apiGroups: ['', apps], resources: [pods/log, deployments], verbs: [get]}",
        "{apiGroups: [''], resources: [secrets], resourceNames: [db, tls], verbs: [get]}",
        "{nonResourceURLs: [/healthz, '/metrics*'], verbs: [get]}",
        "{services: [api.shop, '*.internal'], paths: ['/v1/*', /ping], methods: [GET]}",
    ) + binding("mixed", "mixed", PAYMENTS, "clusters: {names: [prod-eu]}")
    got = {(g.kind, g.action, g.target) for g in grants_of(text)}
    assert got == {
        ("resource", "get", "pods/log"),
        ("resource", "get", "deployments"),
        ("resource", "get", "apps/pods/log"),
        ("resource", "get", "apps/deployments"),
        ("resource", "get", "secrets name=db"),
        ("resource", "get", "secrets name=tls"),
        ("nonResource", "get", "/healthz"),
        ("nonResource", "get", "/metrics*"),
        ("service", "GET", "api.shop /v1/*"),
        ("service", "GET", "api.shop /ping"),
        ("service", "GET", "*.internal /v1/*"),
        ("service", "GET", "*.internal /ping"),
    }


def test_non_resource_rules_in_a_namespaced_binding_grant_nothing() -> None:
    # The engine never matches them (a non-resource request has no namespace); neither
    # does Kubernetes RBAC through a RoleBinding.
    text = role("health", "{nonResourceURLs: [/healthz], verbs: [get]}") + binding(
        "health", "health", PAYMENTS, "namespaces: [shop]"
    )
    assert grants_of(text) == set()


def test_appeared_and_disappeared_are_sorted_grants() -> None:
    reg = registry()
    old = policy(READER + binding("read", "reader", PAYMENTS, "namespaces: [shop]"))
    new = policy(
        role("reader", "{apiGroups: [''], resources: [pods], verbs: [list]}")
        + binding("read", "reader", PAYMENTS, "namespaces: [shop]")
    )
    diff = diff_policies(old, new, reg)
    assert diff.appeared == [
        Grant("payments", "dev-us", "shop", "list", "pods", "resource"),
        Grant("payments", "prod-eu", "shop", "list", "pods", "resource"),
    ]
    assert diff.disappeared == [
        Grant("payments", "dev-us", "shop", "get", "pods", "resource"),
        Grant("payments", "prod-eu", "shop", "get", "pods", "resource"),
    ]
    assert [flags for _, flags in diff.escalations] == [["cross-environment"]]
    assert not diff.empty
    assert diff_policies(new, new, reg).empty
    body = json.loads(json.dumps(diff.to_json()))
    assert body["appeared"][0] == {
        "workload": "payments",
        "cluster": "dev-us",
        "namespace": "shop",
        "action": "list",
        "target": "pods",
        "kind": "resource",
    }
    assert body["escalations"][0]["flags"] == ["cross-environment"]


def test_moving_rules_between_roles_is_no_effective_change() -> None:
    reg = registry()
    one = policy(
        role("both", "{apiGroups: [''], resources: [pods], verbs: [get, list]}")
        + binding("b", "both", PAYMENTS)
    )
    two = policy(
        role("get", "{apiGroups: [''], resources: [pods], verbs: [get]}")
        + role("list", "{apiGroups: [''], resources: [pods], verbs: [list]}")
        + binding("b1", "get", PAYMENTS)
        + binding("b2", "list", "[{claims: {workload_id: payments}}]")
    )
    assert diff_policies(one, two, reg).empty


def test_the_empty_policy_grants_nothing() -> None:
    assert grants_of("") == set()
    diff = diff_policies(policy(""), policy(READER + binding("r", "reader", PAYMENTS)), registry())
    assert len(diff.appeared) == 2 and diff.disappeared == []


# --- denies ---------------------------------------------------------------------------------


def deny(name: str, role_name: str, subjects: str = PAYMENTS, extra: str = "") -> str:
    return binding(name, role_name, subjects, "effect: deny\n" + extra)


def test_a_deny_removes_a_concrete_grant_as_the_engine_decides() -> None:
    allow = READER + binding("read", "reader", PAYMENTS, "namespaces: [shop, web]")
    text = allow + deny(
        "no-shop", "reader", extra="namespaces: [shop]\nclusters: {names: [prod-eu]}"
    )
    assert targets(grants_of(text)) == {("web", "get", "pods")}
    assert targets(grants_of(text), cluster="dev-us") == {
        ("shop", "get", "pods"),
        ("web", "get", "pods"),
    }
    diff = diff_policies(policy(allow), policy(text), registry())
    assert diff.appeared == [] and diff.disappeared == [
        Grant("payments", "prod-eu", "shop", "get", "pods", "resource")
    ]


def test_a_deny_for_another_identity_removes_nothing() -> None:
    text = (
        READER + binding("read", "reader", PAYMENTS) + deny("no-ci", "reader", "[{workload: ci}]")
    )
    assert len(grants_of(text)) == 2


def test_a_partial_deny_leaves_a_wildcard_namespace_grant_listed() -> None:
    text = (
        READER
        + binding("read", "reader", PAYMENTS)
        + deny("no-kube", "reader", extra="namespaces: [kube-system]")
    )
    assert targets(grants_of(text)) == {("*", "get", "pods")}
    text = READER + binding("read", "reader", PAYMENTS) + deny("all", "reader")
    assert grants_of(text) == set()


@pytest.mark.parametrize(
    ("granted", "denied", "covered"),
    [
        # verbs, groups and resources
        (
            "{apiGroups: [''], resources: [pods], verbs: ['*']}",
            "{apiGroups: [''], resources: [pods], verbs: [get]}",
            False,
        ),
        (
            "{apiGroups: [''], resources: [pods], verbs: ['*']}",
            "{apiGroups: ['*'], resources: [pods], verbs: ['*']}",
            True,
        ),
        (
            "{apiGroups: ['*'], resources: [pods], verbs: [get]}",
            "{apiGroups: [''], resources: [pods], verbs: [get]}",
            False,
        ),
        (
            "{apiGroups: [''], resources: ['*'], verbs: [get]}",
            "{apiGroups: [''], resources: [pods, secrets], verbs: [get]}",
            False,
        ),
        (
            "{apiGroups: [''], resources: ['*/scale'], verbs: [get]}",
            "{apiGroups: [''], resources: ['*/scale'], verbs: [get]}",
            True,
        ),
        (
            "{apiGroups: [''], resources: ['*/scale'], verbs: [get]}",
            "{apiGroups: [''], resources: [pods/scale], verbs: [get]}",
            False,
        ),
        # object names: a deny naming objects does not cover a grant on all of them
        (
            "{apiGroups: [''], resources: [secrets], verbs: [get]}",
            "{apiGroups: [''], resources: [secrets], resourceNames: [db], verbs: [get]}",
            False,
        ),
        (
            "{apiGroups: [''], resources: [secrets], resourceNames: [db], verbs: [get]}",
            "{apiGroups: [''], resources: [secrets], verbs: [get]}",
            True,
        ),
        # non-resource URLs
        (
            "{nonResourceURLs: ['/api/*'], verbs: [get]}",
            "{nonResourceURLs: ['/api/*'], verbs: [get]}",
            True,
        ),
        (
            "{nonResourceURLs: ['/api/*'], verbs: [get]}",
            "{nonResourceURLs: ['/ap*'], verbs: [get]}",
            True,
        ),
        (
            "{nonResourceURLs: ['/api/*'], verbs: [get]}",
            "{nonResourceURLs: ['/api/v1/*'], verbs: [get]}",
            False,
        ),
        (
            "{nonResourceURLs: ['/api*'], verbs: [get]}",
            "{nonResourceURLs: ['/api/*'], verbs: [get]}",
            False,
        ),
        (
            "{nonResourceURLs: ['*'], verbs: [get]}",
            "{nonResourceURLs: ['/*'], verbs: [get]}",
            False,
        ),
        # service hosts and methods
        (
            "{services: ['*.api.shop'], paths: [/x], methods: [GET]}",
            "{services: ['*.shop'], paths: [/x], methods: [GET]}",
            True,
        ),
        (
            "{services: ['*.shop'], paths: [/x], methods: [GET]}",
            "{services: [api.shop], paths: [/x], methods: [GET]}",
            False,
        ),
        (
            "{services: ['*'], paths: [/x], methods: [GET]}",
            "{services: ['*.shop'], paths: [/x], methods: [GET]}",
            False,
        ),
        (
            "{services: [api.shop], paths: [/x], methods: ['*']}",
            "{services: [api.shop], paths: [/x], methods: [GET, POST]}",
            False,
        ),
        # path globs
        (
            "{services: [a], paths: ['/v1/*'], methods: [GET]}",
            "{services: [a], paths: ['/v1/*'], methods: [GET]}",
            True,
        ),
        (
            "{services: [a], paths: ['/v1/x*'], methods: [GET]}",
            "{services: [a], paths: ['/v1/*x*'], methods: [GET]}",
            True,
        ),
        (
            "{services: [a], paths: ['/v1/*'], methods: [GET]}",
            "{services: [a], paths: ['/v1/admin'], methods: [GET]}",
            False,
        ),
        (
            "{services: [a], paths: ['/v1/**'], methods: [GET]}",
            "{services: [a], paths: ['/v1/**'], methods: [GET]}",
            True,
        ),
        (
            "{services: [a], paths: ['/v1/admin/**'], methods: [GET]}",
            "{services: [a], paths: ['/v1/**'], methods: [GET]}",
            True,
        ),
        (
            "{services: [a], paths: ['/v1/**'], methods: [GET]}",
            "{services: [a], paths: ['/*/**'], methods: [GET]}",
            True,
        ),
        (
            "{services: [a], paths: ['/v1/**'], methods: [GET]}",
            "{services: [a], paths: ['*'], methods: [GET]}",
            True,
        ),
        (
            "{services: [a], paths: ['/v1/**'], methods: [GET]}",
            "{services: [a], paths: ['/v1/*'], methods: [GET]}",
            False,
        ),
        # several deny paths that only add up to the first few depths do not cover **
        (
            "{services: [a], paths: ['/v1/**'], methods: [GET]}",
            "{services: [a], paths: [/v1, '/v1/*', '/v1/*/*'], methods: [GET]}",
            False,
        ),
        (
            "{services: [a], paths: ['*'], methods: [GET]}",
            "{services: [a], paths: ['/**'], methods: [GET]}",
            True,
        ),
        (
            "{services: [a], paths: ['*'], methods: [GET]}",
            "{services: [a], paths: ['/*'], methods: [GET]}",
            False,
        ),
        (
            "{services: [a], paths: ['/a/**/b/**'], methods: [GET]}",
            "{services: [a], paths: ['/a/**'], methods: [GET]}",
            True,
        ),
        (
            "{services: [a], paths: ['/a/**/b/**'], methods: [GET]}",
            "{services: [a], paths: ['/a/**/b/*'], methods: [GET]}",
            False,
        ),
    ],
)
def test_a_deny_covers_a_wildcard_grant_only_when_at_least_as_wide(
    granted: str, denied: str, covered: bool
) -> None:
    text = (
        role("granted", granted)
        + binding("allow", "granted", PAYMENTS, "clusters: {names: [prod-eu]}")
        + role("denied", denied)
        + deny("deny", "denied")
    )
    assert (grants_of(text) == set()) is covered


def test_a_namespaced_deny_covers_a_namespaced_service_grant_by_namespace() -> None:
    svc = role("svc", "{services: [a], paths: ['/v1/**'], methods: [GET]}")
    allow = svc + binding(
        "allow", "svc", PAYMENTS, "namespaces: [shop, web]\nclusters: {names: [prod-eu]}"
    )
    assert targets(grants_of(allow + deny("d", "svc", extra="namespaces: [shop]"))) == {
        ("web", "GET", "a /v1/**")
    }
    assert grants_of(allow + deny("d", "svc")) == set()
    wide = svc + binding("allow", "svc", PAYMENTS, "clusters: {names: [prod-eu]}")
    assert len(grants_of(wide + deny("d", "svc", extra="namespaces: [shop]"))) == 1


def test_dropped_grants_are_denied_by_the_engine_for_sample_requests() -> None:
    """Soundness: every grant the diff drops is one the engine denies, checked on
    concrete requests inside a few wildcard grants."""
    text = (
        role(
            "all",
            "{apiGroups: ['*'], resources: ['*'], verbs: ['*']}",
            "{services: ['*'], paths: ['*'], methods: ['*']}",
        )
        + binding("allow", "all", PAYMENTS, "clusters: {names: [prod-eu]}")
        + role(
            "wide",
            "{apiGroups: ['*'], resources: ['*'], verbs: ['*']}",
            "{services: ['*'], paths: ['/**'], methods: ['*']}",
        )
        + deny("deny", "wide")
    )
    reg = registry()
    assert effective_grants(policy(text), reg) == set()
    engine = Engine(inventory_bundles(policy(text), reg)["prod-eu"])
    spiffe_id = reg.spiffe_id_of("payments")
    claims = identity_claims(reg, "payments")
    for request in (
        {"verb": "delete", "apiGroup": "apps", "resource": "deployments", "namespace": "x"},
        {"verb": "get", "resource": "nodes"},
        {"host": "anything:8080", "path": "/deep/er/path", "method": "PATCH"},
        {"host": "a", "path": "/", "method": "GET"},
    ):
        assert engine.decide(spiffe_id, claims, parse_request(request)).denied, request


# --- escalations ----------------------------------------------------------------------------


def flags_for(rule: str, subjects: str = PAYMENTS, clusters: str = "prod-eu") -> list[list[str]]:
    # Namespaced, so "wildcard" is about the rule (non-resource rules need no namespaces).
    spaces = "" if "nonResourceURLs" in rule else "\nnamespaces: [shop]"
    new = role("r", rule) + binding(
        "b", "r", subjects, f"clusters: {{names: [{clusters}]}}{spaces}"
    )
    diff = diff_policies(policy(""), policy(new), registry())
    return [flags for _, flags in diff.escalations]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("{apiGroups: [''], resources: [pods], verbs: [get]}", []),
        ("{apiGroups: [''], resources: [pods], verbs: ['*']}", [["wildcard"]]),
        ("{apiGroups: ['*'], resources: [pods], verbs: [get]}", [["wildcard"]]),
        ("{apiGroups: [''], resources: [secrets], verbs: [get]}", [["secrets"]]),
        (
            "{apiGroups: [''], resources: [secrets], resourceNames: [db], verbs: [get]}",
            [["secrets"]],
        ),
        ("{apiGroups: [''], resources: ['*'], verbs: [get]}", [["wildcard", "secrets"]]),
        ("{apiGroups: [apps], resources: [secrets], verbs: [get]}", []),
        (
            "{apiGroups: [rbac.authorization.k8s.io], resources: [clusterroles], verbs: [escalate]}",
            [["escalate"]],
        ),
        ("{apiGroups: [rbac.authorization.k8s.io], resources: [roles], verbs: [bind]}", [["bind"]]),
        ("{apiGroups: [''], resources: [users], verbs: [impersonate]}", [["impersonate"]]),
        (
            "{apiGroups: [rbac.authorization.k8s.io], resources: [clusterroles], verbs: ['*']}",
            [["wildcard", "bind", "escalate"]],
        ),
        (
            "{apiGroups: [''], resources: [serviceaccounts], verbs: ['*']}",
            [["wildcard", "impersonate"]],
        ),
        (
            "{apiGroups: ['*'], resources: ['*'], verbs: ['*']}",
            [["wildcard", "secrets", "bind", "escalate", "impersonate"]],
        ),
        ("{nonResourceURLs: ['/logs/*'], verbs: [get]}", [["wildcard"]]),
        ("{services: [api.shop], paths: ['/v1/**'], methods: [GET]}", [["wildcard"]]),
        ("{services: ['*.shop'], paths: [/v1], methods: [GET]}", [["wildcard"]]),
    ],
)
def test_escalation_flags(rule: str, expected: list[list[str]]) -> None:
    assert flags_for(rule) == expected


def test_a_namespace_less_binding_is_a_wildcard() -> None:
    rule = "{apiGroups: [''], resources: [pods], verbs: [get]}"
    new = role("r", rule) + binding(
        "b", "r", PAYMENTS, "clusters: {names: [prod-eu]}\nnamespaces: [shop]"
    )
    assert diff_policies(policy(""), policy(new), registry()).escalations == []
    new = role("r", rule) + binding("b", "r", PAYMENTS, "clusters: {names: [prod-eu]}")
    [(grant, flags)] = diff_policies(policy(""), policy(new), registry()).escalations
    assert grant.namespace == "*" and flags == ["wildcard"]


def test_cross_environment_compares_the_environment_claim_and_label() -> None:
    rule = "{apiGroups: [''], resources: [pods], verbs: [get]}"
    assert flags_for(rule, clusters="dev-us") == [["cross-environment"]]
    assert flags_for(rule, "[{workload: ci}]", clusters="dev-us") == []
    assert flags_for(rule, "[{workload: ci}]", clusters="prod-eu") == [["cross-environment"]]


def test_flags_are_only_for_appeared_grants() -> None:
    rule = role("r", "{apiGroups: ['*'], resources: ['*'], verbs: ['*']}") + binding(
        "b", "r", PAYMENTS
    )
    diff = diff_policies(policy(rule), policy(""), registry())
    assert len(diff.disappeared) == 2 and diff.escalations == []


# --- old revisions over today's inventory ---------------------------------------------------


def test_an_old_revision_naming_deleted_workloads_and_clusters_still_diffs() -> None:
    old = policy(
        READER
        + binding("gone", "reader", "[{workload: retired}]")
        + binding("elsewhere", "reader", PAYMENTS, "clusters: {names: [decommissioned]}")
        + binding("kept", "reader", "[{workload: retired}, {workload: ci}]")
    )
    diff = diff_policies(old, policy(""), registry())
    assert {(g.workload, g.cluster) for g in diff.disappeared} == {
        ("ci", "prod-eu"),
        ("ci", "dev-us"),
    }


def test_roles_that_do_not_fit_together_are_an_error() -> None:
    with pytest.raises(PolicyError, match="role 'missing' is not a GlobalRole"):
        effective_grants(policy(binding("b", "missing", PAYMENTS)), registry())
