"""The agent's engine reads template-derived SPIFFE IDs back through the bundle's
``templates`` (what XFCC, SubjectAccessReview and admission validate rely on): the
claims are the ones the exchange mints, an account a Workload selects is never a
template identity, and an ID no template gives is unknown. Bundles are compiled from
manifests by the real compiler."""

from __future__ import annotations

from trustmesh.manifests import parse_text
from trustmesh.policy.compiler import PolicySet, compile_all
from trustmesh.policy.engine import Engine
from trustmesh.registry import Registry, build_registry

MANIFESTS = """apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata: {name: east}
spec: {issuer: "https://east.example", jwksUri: "https://east.example/jwks", labels: {env: prod}}
---
apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata: {name: west}
spec: {issuer: "https://west.example", jwksUri: "https://west.example/jwks"}
---
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: pinned}
spec:
  selector: {cluster: east, namespace: team-a, serviceAccount: pinned}
  spiffeId: spiffe://corp.example/pinned
---
apiVersion: trustmesh.io/v1alpha1
kind: WorkloadTemplate
metadata: {name: teams}
spec:
  clusters: {selector: {matchLabels: {env: prod}}}
  namespaces: ["team-*"]
  serviceAccounts: ["*"]
  claims: {project: "{namespace}", owner: "{cluster}-{serviceAccount}"}
"""


def engine_for(cluster: str) -> tuple[Engine, Registry]:
    documents = parse_text(MANIFESTS)
    registry = build_registry("corp.example", 1, documents)
    bundles = compile_all(PolicySet.from_documents(documents), registry, 1)
    return Engine(bundles[cluster]), registry


def test_a_derived_spiffe_id_reads_back_with_the_claims_the_exchange_mints() -> None:
    engine, registry = engine_for("west")  # another cluster's agent reads east's identities
    spiffe_id = "spiffe://corp.example/cluster/east/ns/team-a/sa/api"
    entry = engine.identity(spiffe_id)
    minted = registry.resolve("east", "team-a", "api")
    assert entry is not None and minted is not None
    assert entry["claims"] == minted.claims
    assert entry["claims"]["owner"] == "east-api" and entry["claims"]["project"] == "team-a"
    assert entry["workload"] == "teams/east/team-a/api" and entry["template"] == "teams"


def test_explicit_workloads_win_and_other_ids_are_unknown() -> None:
    engine, _ = engine_for("east")
    # the template's ID for the pinned account is nobody's: the Workload has its own
    assert engine.identity("spiffe://corp.example/cluster/east/ns/team-a/sa/pinned") is None
    assert engine.identity("spiffe://corp.example/pinned")["workload"] == "pinned"  # type: ignore[index]
    assert engine.account_identity("east", "team-a", "pinned") is None
    # west is not selected by the template; payments is not a team-* namespace
    assert engine.identity("spiffe://corp.example/cluster/west/ns/team-a/sa/api") is None
    assert engine.identity("spiffe://corp.example/cluster/east/ns/payments/sa/api") is None
    found = engine.account_identity("east", "team-b", "web")
    assert found is not None and found[0] == "spiffe://corp.example/cluster/east/ns/team-b/sa/web"
