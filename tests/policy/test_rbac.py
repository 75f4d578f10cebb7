"""RBAC export and TokenReview groups (DESIGN §4), checked against the official
Kubernetes client models."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from policy_fixtures import binding, policy, registry, role

from trustmesh.common.errors import PolicyError
from trustmesh.policy.compiler import identity_claims
from trustmesh.policy.rbac import (
    EXPANDED_SUBJECTS,
    SKIPPED_SERVICE_RULES,
    export_rbac,
    groups_for_claims,
    render_yaml,
)

MODELS = {
    "ClusterRole": "V1ClusterRole",
    "ClusterRoleBinding": "V1ClusterRoleBinding",
    "RoleBinding": "V1RoleBinding",
}
READER = role("reader", "{apiGroups: [''], resources: [pods], verbs: [get, list]}")
SPIFFE_PAYMENTS = "spiffe://corp.example/cluster/prod-eu/ns/shop/sa/payments"
SPIFFE_CI = "spiffe://corp.example/cluster/dev-us/ns/build/sa/ci"


_API: Any = k8s.ApiClient()


class _Response:
    """What ``ApiClient.deserialize`` reads in clients before v35: an object with
    ``.data`` (JSON text); newer clients take the text and a content type."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.data = json.dumps(body)


def deserialize(manifest: dict[str, Any], model: str) -> Any:
    api: Any = k8s.ApiClient()
    if "content_type" in inspect.signature(api.deserialize).parameters:
        return api.deserialize(json.dumps(manifest), model, "application/json")
    return api.deserialize(_Response(manifest), model)


def as_model(manifest: dict[str, Any]) -> Any:
    """Deserialize with the official client (its models refuse missing required fields)
    and serialize back: nothing may be lost or renamed."""
    model = deserialize(manifest, MODELS[manifest["kind"]])
    assert _API.sanitize_for_serialization(model) == manifest
    return model


def export(text: str, cluster: str = "prod-eu") -> list[dict[str, Any]]:
    manifests = export_rbac(policy(text), registry(), cluster)
    for manifest in manifests:
        assert manifest["apiVersion"] == "rbac.authorization.k8s.io/v1"
        as_model(manifest)
    return list(manifests)


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def subjects_of(text: str, cluster: str = "prod-eu") -> list[dict[str, str]]:
    [bound] = [m for m in export(text, cluster) if m["kind"].endswith("Binding")]
    subjects: list[dict[str, str]] = bound.get("subjects", [])
    return subjects


def user(name: str) -> dict[str, str]:
    return {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": name}


def group(name: str) -> dict[str, str]:
    return {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": name}


def test_the_client_models_refuse_a_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"(?i)role_?ref"):
        deserialize(
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding"}, "V1RoleBinding"
        )
    with pytest.raises(ValueError, match="verbs"):
        deserialize({"rules": [{"apiGroups": [""], "resources": ["pods"]}]}, "V1ClusterRole")


# --- groups ---------------------------------------------------------------------------------


def test_groups_for_claims_are_sorted_and_only_for_string_claims_with_a_group() -> None:
    assert groups_for_claims(
        {
            "project": "shop",
            "environment": "prod",
            "tier": "gold",
            "workload_id": "payments",
            "cluster": "prod-eu",
            "namespace": "shop",
            "team": "payments",
            "service_account": "payments",
        }
    ) == [
        "trustmesh:cluster:prod-eu",
        "trustmesh:environment:prod",
        "trustmesh:project:shop",
        "trustmesh:tier:gold",
        "trustmesh:workload_id:payments",
    ]
    assert (
        groups_for_claims({"project": 7, "tier": "", "environment": None, "cluster": ["a"]}) == []
    )
    assert groups_for_claims({}) == []


def test_groups_of_a_registered_identity_include_its_origin_cluster() -> None:
    reg = registry()
    assert "trustmesh:cluster:dev-us" in groups_for_claims(identity_claims(reg, "ci"))


# --- roles and bindings ---------------------------------------------------------------------


def test_a_namespace_less_binding_is_a_cluster_role_binding() -> None:
    manifests = export(READER + binding("read", "reader", "[{workload: payments}]"))
    assert [(m["kind"], m["metadata"]["name"]) for m in manifests] == [
        ("ClusterRole", "trustmesh:reader"),
        ("ClusterRoleBinding", "trustmesh:read"),
    ]
    cluster_role, bound = manifests
    assert cluster_role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}
    ]
    assert bound["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "trustmesh:reader",
    }
    assert bound["subjects"] == [user(SPIFFE_PAYMENTS)]
    assert bound["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "trustmesh"}


def test_namespaces_become_one_role_binding_each() -> None:
    manifests = export(
        READER + binding("read", "reader", "[{workload: payments}]", "namespaces: [web, shop]")
    )
    bindings = by_kind(manifests, "RoleBinding")
    assert [(m["metadata"]["name"], m["metadata"]["namespace"]) for m in bindings] == [
        ("trustmesh:read", "shop"),
        ("trustmesh:read", "web"),
    ]
    assert all(as_model(m).role_ref.kind == "ClusterRole" for m in bindings)
    assert by_kind(manifests, "ClusterRoleBinding") == []


def test_rules_keep_names_urls_and_included_roles_and_skip_service_rules() -> None:
    text = (
        role("base", "{nonResourceURLs: [/healthz, '/metrics*'], verbs: [get]}")
        + role(
            "mixed",
            "{apiGroups: [''], resources: [secrets], resourceNames: [db], verbs: [get]}",
            "{services: [api.shop], paths: ['/v1/**'], methods: [GET]}",
        ).replace("spec:\n", "spec:\n  include: [base]\n")
        + binding("m", "mixed", "[{workload: payments}]")
    )
    [cluster_role] = by_kind(export(text), "ClusterRole")
    assert cluster_role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["db"]},
        {"nonResourceURLs": ["/healthz", "/metrics*"], "verbs": ["get"]},
    ]
    note = cluster_role["metadata"]["annotations"][SKIPPED_SERVICE_RULES]
    assert note.startswith("1 service rule(s)") and "no Kubernetes RBAC equivalent" in note
    rules = _API.sanitize_for_serialization(as_model(cluster_role))["rules"]
    assert rules[1]["nonResourceURLs"] == ["/healthz", "/metrics*"]


def test_only_roles_of_allow_bindings_on_the_cluster_are_exported() -> None:
    text = (
        READER
        + role("unused", "{apiGroups: [''], resources: [nodes], verbs: [get]}")
        + role("elsewhere", "{apiGroups: [''], resources: [nodes], verbs: [list]}")
        + role("denied", "{apiGroups: [''], resources: [secrets], verbs: ['*']}")
        + binding("read", "reader", "[{workload: payments}]")
        + binding(
            "dev-only",
            "elsewhere",
            "[{workload: payments}]",
            "clusters: {selector: {matchLabels: {environment: dev}}}",
        )
        + binding("no-secrets", "denied", "[{claims: {project: shop}}]", "effect: deny")
    )
    names = [m["metadata"]["name"] for m in export(text)]
    assert names == ["trustmesh:reader", "trustmesh:read"]
    dev = [m["metadata"]["name"] for m in export(text, "dev-us")]
    assert dev == [
        "trustmesh:elsewhere",
        "trustmesh:reader",
        "trustmesh:dev-only",
        "trustmesh:read",
    ]


def test_deny_bindings_are_warnings_not_manifests() -> None:
    text = (
        READER
        + binding("read", "reader", "[{workload: payments}]")
        + binding("no-ci", "reader", "[{workload: ci}]", "effect: deny")
    )
    manifests = export_rbac(policy(text), registry(), "prod-eu")
    assert len(manifests) == 2
    [warning] = manifests.warnings
    assert warning.startswith("RoleBinding no-ci (deny, role reader) is not exported")


def test_resource_star_subresources_are_refused_as_not_rbac() -> None:
    from trustmesh.common.errors import ManifestError

    text = role("logs", "{apiGroups: [''], resources: [pods/*, '*/scale'], verbs: [get]}")
    with pytest.raises(ManifestError, match="RBAC has no res/\\* form"):
        policy(text)


# --- subjects -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subjects", "expected"),
    [
        ("[{workload: payments}]", [user(SPIFFE_PAYMENTS)]),
        (f"[{{spiffeId: '{SPIFFE_CI}'}}]", [user(SPIFFE_CI)]),
        (
            "[{spiffeId: 'spiffe://corp.example/not/registered'}]",
            [user("spiffe://corp.example/not/registered")],
        ),
        ("[{claims: {project: shop}}]", [group("trustmesh:project:shop")]),
        ("[{claims: {environment: dev}}]", [group("trustmesh:environment:dev")]),
        ("[{claims: {tier: gold}}]", [group("trustmesh:tier:gold")]),
        ("[{claims: {workload_id: ci}}]", [group("trustmesh:workload_id:ci")]),
        ("[{claims: {cluster: dev-us}}]", [group("trustmesh:cluster:dev-us")]),
        (
            "[{claims: {project: shop}}, {workload: ci}, {claims: {project: shop}}]",
            [group("trustmesh:project:shop"), user(SPIFFE_CI)],
        ),
    ],
)
def test_subjects_rbac_can_express(subjects: str, expected: list[dict[str, str]]) -> None:
    text = READER + binding("read", "reader", subjects)
    assert subjects_of(text) == expected
    [bound] = by_kind(export(text), "ClusterRoleBinding")
    assert EXPANDED_SUBJECTS not in bound["metadata"].get("annotations", {})


@pytest.mark.parametrize(
    ("subjects", "expected"),
    [
        # several claims ANDed
        ("[{claims: {project: shop, tier: gold}}]", [SPIFFE_PAYMENTS]),
        ("[{claims: {project: shop, tier: bronze}}]", []),
        # a claim without a group
        ("[{claims: {namespace: build}}]", [SPIFFE_CI]),
        # matchExpressions, alone or with a claim
        ("[{matchExpressions: [{key: tier, operator: NotIn, values: [gold]}]}]", [SPIFFE_CI]),
        ("[{matchExpressions: [{key: project, operator: Exists}]}]", [SPIFFE_CI, SPIFFE_PAYMENTS]),
        (
            "[{claims: {environment: prod}, matchExpressions: [{key: team, operator: DoesNotExist}]}]",
            [SPIFFE_PAYMENTS],
        ),
        # a workload ANDed with a claim it does not have
        ("[{workload: payments, claims: {tier: bronze}}]", []),
    ],
)
def test_subjects_rbac_cannot_express_are_expanded_over_the_inventory(
    subjects: str, expected: list[str]
) -> None:
    text = READER + binding("read", "reader", subjects)
    assert subjects_of(text) == [user(u) for u in expected]
    [bound] = by_kind(export(text), "ClusterRoleBinding")
    note = bound["metadata"]["annotations"][EXPANDED_SUBJECTS]
    assert note.startswith("subject 1 (") and f"expanded to {len(expected)} registered" in note


# --- YAML and errors ------------------------------------------------------------------------


def test_render_yaml_puts_warnings_first_as_comments_and_round_trips() -> None:
    text = (
        READER
        + binding("read", "reader", "[{claims: {project: shop}}]", "namespaces: [shop]")
        + binding("nope", "reader", "[{workload: ci}]", "effect: deny")
    )
    manifests = export_rbac(policy(text), registry(), "prod-eu")
    rendered = render_yaml(manifests, manifests.warnings)
    lines = rendered.splitlines()
    assert lines[0].startswith("# trustmesh export-rbac")
    assert lines[1].startswith("# warning: RoleBinding nope (deny, role reader)")
    assert lines[2] == "---"
    docs = list(yaml.safe_load_all(rendered))
    assert docs == list(manifests)
    assert render_yaml(manifests) == rendered
    assert render_yaml([], ["two\nlines"]).splitlines()[1:] == [
        "# warning: two",
        "# warning: lines",
    ]


def test_an_unknown_cluster_or_role_is_an_error() -> None:
    with pytest.raises(ValueError, match="'nowhere' is not a registered Cluster"):
        export_rbac(policy(READER), registry(), "nowhere")
    with pytest.raises(PolicyError, match="role 'missing'"):
        export_rbac(policy(binding("b", "missing", "[{workload: ci}]")), registry(), "prod-eu")
