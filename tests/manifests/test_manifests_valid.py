"""Valid manifests load with defaults filled in (DESIGN §3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from manifest_samples import CLUSTER, WORKLOAD

from trustmesh.common.errors import ManifestError
from trustmesh.manifests import (
    API_VERSION,
    ClusterSpec,
    GlobalRoleSpec,
    Problem,
    WorkloadSelector,
    WorkloadSpec,
    document_from_body,
    load_paths,
    parse_text,
)


def test_cluster_with_inline_jwks() -> None:
    [doc] = parse_text(CLUSTER, "c.yaml")
    assert (doc.kind, doc.name, doc.path, doc.line) == ("Cluster", "east", "c.yaml", 1)
    assert isinstance(doc.spec, ClusterSpec)
    assert doc.spec.issuer == "https://oidc.east.example"
    assert doc.spec.jwks is not None and doc.spec.jwks["keys"][0]["kid"] == "east-1"
    assert doc.spec.jwks_uri is None
    assert doc.spec.audience == "trustmesh"
    assert doc.spec.labels == {}
    assert doc.body["apiVersion"] == API_VERSION
    assert doc.body["spec"]["audience"] == "trustmesh"
    assert doc.body["spec"]["labels"] == {}


def test_cluster_domain_defaults_to_cluster_local_without_changing_the_body() -> None:
    [doc] = parse_text(CLUSTER, "c.yaml")
    assert isinstance(doc.spec, ClusterSpec) and doc.spec.cluster_domain == "cluster.local"
    assert "clusterDomain" not in doc.body["spec"]  # Clusters applied before keep their hash
    [custom] = parse_text(CLUSTER.replace("spec:\n", "spec:\n  clusterDomain: corp.internal\n"))
    assert isinstance(custom.spec, ClusterSpec) and custom.spec.cluster_domain == "corp.internal"
    assert custom.body["spec"]["clusterDomain"] == "corp.internal"


def test_a_service_rule_may_fold_path_case() -> None:
    text = """\
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: r}
spec:
  rules:
  - {services: [api.shop.svc], paths: [/Admin/**], methods: [GET], pathCase: insensitive}
  - {services: [api.shop.svc], paths: [/x], methods: [GET], pathCase: sensitive}
  - {services: [api.shop.svc], paths: [/y], methods: [GET]}
"""
    [doc] = parse_text(text, "r.yaml")
    assert isinstance(doc.spec, GlobalRoleSpec)
    assert [r.path_case for r in doc.spec.rules] == ["insensitive", "sensitive", "sensitive"]


def test_cluster_with_jwks_uri_and_labels() -> None:
    text = """\
apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata:
  name: west
  labels: {team: platform}
spec:
  issuer: https://oidc.west.example/id
  jwksUri: https://oidc.west.example/keys
  audience: fed
  labels:
    region: us-west-2
    environment: prod
"""
    [doc] = parse_text(text)
    assert doc.spec == ClusterSpec(
        issuer="https://oidc.west.example/id",
        jwks=None,
        jwks_uri="https://oidc.west.example/keys",
        audience="fed",
        labels={"environment": "prod", "region": "us-west-2"},
    )
    assert doc.body["metadata"] == {"name": "west", "labels": {"team": "platform"}}
    assert doc.body["spec"]["jwksUri"] == "https://oidc.west.example/keys"


def test_cluster_with_redundant_key_sources() -> None:
    """``jwksUris``: JWKS and discovery URLs, tried in that order (DESIGN §10)."""
    text = """\
apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata:
  name: west
spec:
  issuer: https://oidc.west.example/id
  jwksUris:
  - https://keys.west.example/jwks
  - https://oidc.west.example/id/.well-known/openid-configuration
  - http://127.0.0.1:8443/openid/v1/jwks
"""
    [doc] = parse_text(text)
    assert isinstance(doc.spec, ClusterSpec)
    sources = (
        "https://keys.west.example/jwks",
        "https://oidc.west.example/id/.well-known/openid-configuration",
        "http://127.0.0.1:8443/openid/v1/jwks",
    )
    assert doc.spec.jwks_uris == sources and doc.spec.key_sources == sources
    assert doc.body["spec"]["jwksUris"] == list(sources)
    # Without jwksUris: the one jwksUri, else the issuer's discovery document.
    [single] = parse_text(text.split("  jwksUris:")[0] + "  jwksUri: https://k.example/j\n")
    assert isinstance(single.spec, ClusterSpec)
    assert single.spec.key_sources == ("https://k.example/j",)
    [discovered] = parse_text(text.split("  jwksUris:")[0])
    assert isinstance(discovered.spec, ClusterSpec)
    assert discovered.spec.key_sources == (
        "https://oidc.west.example/id/.well-known/openid-configuration",
    )
    assert "jwksUris" not in discovered.body["spec"]  # old Clusters keep their hash


def test_cluster_with_discovery_and_loopback_http() -> None:
    text = CLUSTER.split("  jwks:")[0].replace("https://oidc.east.example", "http://127.0.0.1:9000")
    [doc] = parse_text(text)
    assert isinstance(doc.spec, ClusterSpec)
    assert doc.spec.jwks is None and doc.spec.jwks_uri is None
    assert doc.spec.issuer == "http://127.0.0.1:9000"
    assert "jwks" not in doc.body["spec"] and "jwksUri" not in doc.body["spec"]


def test_rsa_key_accepted() -> None:
    text = CLUSTER.split("      - kty")[0] + "      - {kty: RSA, n: sXch, e: AQAB, use: sig}\n"
    [doc] = parse_text(text)
    assert isinstance(doc.spec, ClusterSpec) and doc.spec.jwks is not None
    assert doc.spec.jwks["keys"] == [{"kty": "RSA", "use": "sig", "n": "sXch", "e": "AQAB"}]


def test_workload_defaults_filled() -> None:
    [doc] = parse_text(WORKLOAD)
    assert doc.spec == WorkloadSpec(
        selector=WorkloadSelector(cluster="east", namespace="payments", service_account="api"),
        spiffe_id=None,
        claims={"workload_id": "payments-api"},
        max_token_ttl=None,
    )
    assert doc.body["spec"] == {
        "selector": {"cluster": "east", "namespace": "payments", "serviceAccount": "api"},
        "claims": {"workload_id": "payments-api"},
    }


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [("300", 300), ("'300s'", 300), ("5m", 300), ("1h", 3600), ("0h30m15s", 1815), ("1", 1)],
)
def test_workload_full(ttl: str, seconds: int) -> None:
    text = (
        WORKLOAD
        + "  spiffeId: spiffe://corp.example/ns/payments/sa/api\n"
        + "  claims:\n    workload_id: pay\n    project: billing\n    team.name: core\n"
        + f"  maxTokenTTL: {ttl}\n"
    )
    [doc] = parse_text(text)
    assert isinstance(doc.spec, WorkloadSpec)
    assert doc.spec.spiffe_id == "spiffe://corp.example/ns/payments/sa/api"
    assert doc.spec.claims == {"workload_id": "pay", "project": "billing", "team.name": "core"}
    assert doc.spec.max_token_ttl == seconds
    assert doc.body["spec"]["maxTokenTTL"] == seconds


def test_multi_document_with_empty_documents() -> None:
    text = "---\n" + CLUSTER + "---\n" + WORKLOAD + "---\n---\n"
    docs = parse_text(text)
    assert [(d.kind, d.name, d.line) for d in docs] == [
        ("Cluster", "east", 2),
        ("Workload", "payments-api", 16),
    ]


def test_empty_text_is_no_documents() -> None:
    assert parse_text("") == []
    assert parse_text("---\n# only a comment\n---\n") == []


def test_directory_load_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b-workload.yml").write_text(WORKLOAD)
    (tmp_path / "a-cluster.yaml").write_text(CLUSTER)
    (tmp_path / "notes.txt").write_text("not a manifest: [")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.yaml").write_text("junk: [")
    (tmp_path / "c.json").write_text(
        '{"apiVersion": "trustmesh.io/v1alpha1", "kind": "Cluster",\n'
        ' "metadata": {"name": "json"}, "spec": {"issuer": "https://j.example"}}\n'
    )
    docs = load_paths([str(tmp_path)])
    assert [(d.name, Path(d.path).name) for d in docs] == [
        ("east", "a-cluster.yaml"),
        ("payments-api", "b-workload.yml"),
        ("json", "c.json"),
    ]


def test_load_paths_files_and_dirs(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(CLUSTER)
    d = tmp_path / "d"
    d.mkdir()
    (d / "w.yaml").write_text(WORKLOAD)
    docs = load_paths([str(tmp_path / "c.yaml"), str(d)])
    assert [d.kind for d in docs] == ["Cluster", "Workload"]
    assert load_paths([]) == []


def test_round_trip_through_body() -> None:
    text = (
        CLUSTER
        + "---\n"
        + WORKLOAD
        + "  claims: {tier: gold}\n  maxTokenTTL: 10m\n  spiffeId: spiffe://a.example/x\n"
    )
    for doc in parse_text(text):
        again = document_from_body(doc.body)
        assert again.spec == doc.spec
        assert again.body == doc.body
        assert (again.kind, again.name, again.path, again.line) == (
            doc.kind,
            doc.name,
            "<stored>",
            0,
        )


def test_document_from_body_validates() -> None:
    [doc] = parse_text(WORKLOAD)
    body = {**doc.body, "spec": {**doc.body["spec"], "maxTokenTTL": True}}
    with pytest.raises(ManifestError) as info:
        document_from_body(body)
    assert info.value.problems == [
        Problem("<stored>", 0, "spec.maxTokenTTL", info.value.problems[0].message)
    ]
    assert "got a boolean" in info.value.problems[0].message
    with pytest.raises(ManifestError):
        document_from_body([])  # type: ignore[arg-type]
    with pytest.raises(ManifestError):
        document_from_body({**doc.body, "extra": object()})


def test_body_is_not_shared_with_spec() -> None:
    [doc] = parse_text(CLUSTER)
    doc.body["spec"]["jwks"]["keys"].clear()
    assert isinstance(doc.spec, ClusterSpec) and doc.spec.jwks is not None
    assert len(doc.spec.jwks["keys"]) == 1


def test_shipped_examples_are_valid() -> None:
    from pathlib import Path

    from trustmesh.manifests import load_paths

    examples = Path(__file__).resolve().parents[2] / "examples"
    kinds = sorted(doc.kind for doc in load_paths([str(examples)]))
    assert kinds.count("Cluster") == 2 and kinds.count("Workload") == 1
    assert {"GlobalRole", "RoleBinding", "PolicyTest"} <= set(kinds)
