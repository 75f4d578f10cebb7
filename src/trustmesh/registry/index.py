"""An immutable snapshot of the registry, indexed for the token-exchange hot path:
cluster by SA-token issuer, workload by (cluster, namespace, service account); and the
federated trust domains by name and by trust domain."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from trustmesh.common.errors import RegistryConflict
from trustmesh.manifests import ClusterSpec, Document, FederatedTrustDomainSpec, WorkloadSpec
from trustmesh.spiffeid import parse_spiffe_id, workload_spiffe_id


@dataclass(frozen=True)
class Registry:
    revision: int
    trust_domain: str
    clusters: dict[str, ClusterSpec]
    workloads: dict[str, WorkloadSpec]
    cluster_by_issuer: dict[str, str]
    workload_by_selector: dict[tuple[str, str, str], str]
    federations: dict[str, FederatedTrustDomainSpec] = field(default_factory=dict)
    federation_by_domain: dict[str, str] = field(default_factory=dict)
    """Trust domain -> the FederatedTrustDomain that names it."""

    def federation_of(self, trust_domain: str) -> FederatedTrustDomainSpec | None:
        name = self.federation_by_domain.get(trust_domain)
        return self.federations[name] if name is not None else None

    def spiffe_id_of(self, name: str) -> str:
        spec = self.workloads[name]
        if spec.spiffe_id:
            return spec.spiffe_id
        sel = spec.selector
        return workload_spiffe_id(
            self.trust_domain, sel.cluster, sel.namespace, sel.service_account
        )


def build_registry(trust_domain: str, revision: int, documents: Iterable[Document]) -> Registry:
    """Index the documents; raise RegistryConflict naming every cross-document problem:
    a workload selecting an unknown cluster, two clusters with one issuer, two workloads
    with one selector or one SPIFFE ID, a SPIFFE ID outside the trust domain, a
    FederatedTrustDomain naming our own trust domain or one another already names."""
    clusters: dict[str, ClusterSpec] = {}
    workloads: dict[str, WorkloadSpec] = {}
    federations: dict[str, FederatedTrustDomainSpec] = {}
    where: dict[tuple[str, str], str] = {}
    for doc in documents:
        where[(doc.kind, doc.name)] = f"{doc.path}:{doc.line}" if doc.line else doc.path
        if isinstance(doc.spec, ClusterSpec):
            clusters[doc.name] = doc.spec
        elif isinstance(doc.spec, WorkloadSpec):
            workloads[doc.name] = doc.spec
        elif isinstance(doc.spec, FederatedTrustDomainSpec):
            federations[doc.name] = doc.spec
    problems: list[str] = []
    by_issuer: dict[str, str] = {}
    for name, cluster in sorted(clusters.items()):
        other = by_issuer.setdefault(cluster.issuer, name)
        if other != name:
            problems.append(
                f"{where[('Cluster', name)]}: Cluster {name}: issuer {cluster.issuer} is already the issuer of Cluster {other}"
            )
    by_selector: dict[tuple[str, str, str], str] = {}
    by_spiffe: dict[str, str] = {}
    for name, workload in sorted(workloads.items()):
        sel = workload.selector
        at = f"{where[('Workload', name)]}: Workload {name}"
        if sel.cluster not in clusters:
            problems.append(
                f"{at}: spec.selector.cluster {sel.cluster!r} is not a registered Cluster"
            )
        key = (sel.cluster, sel.namespace, sel.service_account)
        other = by_selector.setdefault(key, name)
        if other != name:
            problems.append(
                f"{at}: selector (cluster {sel.cluster}, namespace {sel.namespace}, serviceAccount "
                f"{sel.service_account}) already selects Workload {other}; a service account maps to one workload"
            )
        spiffe_id = workload.spiffe_id or workload_spiffe_id(trust_domain, *key)
        if workload.spiffe_id:
            domain, _ = parse_spiffe_id(workload.spiffe_id)
            if domain != trust_domain:
                problems.append(
                    f"{at}: spec.spiffeId {workload.spiffe_id} is outside trust domain {trust_domain}"
                )
        other = by_spiffe.setdefault(spiffe_id, name)
        if other != name:
            problems.append(
                f"{at}: SPIFFE ID {spiffe_id} is already the identity of Workload {other}"
            )
    by_domain: dict[str, str] = {}
    for name, federation in sorted(federations.items()):
        at = f"{where[('FederatedTrustDomain', name)]}: FederatedTrustDomain {name}"
        domain = federation.trust_domain
        if domain == trust_domain:
            problems.append(
                f"{at}: spec.trustDomain {domain} is our own trust domain; federation is "
                "with other trust domains"
            )
            continue
        other = by_domain.setdefault(domain, name)
        if other != name:
            problems.append(
                f"{at}: spec.trustDomain {domain} is already federated by FederatedTrustDomain {other}"
            )
    if problems:
        raise RegistryConflict(problems)
    return Registry(
        revision=revision,
        trust_domain=trust_domain,
        clusters=clusters,
        workloads=workloads,
        cluster_by_issuer=by_issuer,
        workload_by_selector=by_selector,
        federations=federations,
        federation_by_domain=by_domain,
    )
