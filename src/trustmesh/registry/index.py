"""An immutable snapshot of the registry, indexed for the token-exchange hot path:
cluster by SA-token issuer, workload by (cluster, namespace, service account); and the
federated trust domains by name and by trust domain."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from trustmesh.common.errors import RegistryConflict
from trustmesh.manifests import (
    ClusterScope,
    ClusterSpec,
    CompiledTemplate,
    Document,
    EventReceiverSpec,
    FederatedTrustDomainSpec,
    TemplateIndex,
    WorkloadSpec,
    WorkloadTemplateSpec,
    compile_template,
    spiffe_ids_can_meet,
    template_workload_name,
    templates_overlap,
)
from trustmesh.spiffeid import parse_spiffe_id, workload_spiffe_id

RESOLVED_MEMO = 100_000


@dataclass(frozen=True)
class Identity:
    """What a (cluster, namespace, service account) is: an explicit Workload's identity,
    or one a WorkloadTemplate derives (``template`` names it)."""

    workload: str
    spiffe_id: str
    claims: dict[str, str]
    """The claims a token carries, ``cluster``/``namespace``/``service_account`` included."""
    max_token_ttl: int | None
    template: str | None = None


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
    templates: dict[str, WorkloadTemplateSpec] = field(default_factory=dict)
    compiled_templates: tuple[CompiledTemplate, ...] = ()
    """By name; each with the registered clusters it selects."""
    template_index: TemplateIndex = field(default_factory=lambda: TemplateIndex(()))
    templates_json: tuple[dict[str, Any], ...] = ()
    """What every cluster's bundle carries (``templates``), built once."""
    observed: tuple[tuple[str, str, str], ...] = ()
    """(cluster, namespace, service account) of the identities templates gave, as
    observed at their first credential (``policy diff`` counts them in the inventory)."""
    receivers: dict[str, EventReceiverSpec] = field(default_factory=dict)
    """EventReceivers by name: where findings are pushed (``server/push.py``)."""
    _resolved: dict[tuple[str, str, str], Identity | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    def identity_named(self, name: str) -> Identity | None:
        """A Workload by name, or a template-derived identity by its workload name
        ``TEMPLATE/CLUSTER/NAMESPACE/SERVICE-ACCOUNT`` (as the template gives it today)."""
        if name in self.workloads:
            sel = self.workloads[name].selector
            return self.resolve(sel.cluster, sel.namespace, sel.service_account)
        parts = name.split("/")
        if len(parts) != 4:
            return None
        found = self.resolve(parts[1], parts[2], parts[3])
        return found if found is not None and found.template == parts[0] else None

    def inventory_identities(self) -> list[Identity]:
        """Every Workload's identity, then those of the observed template-derived
        service accounts a template still gives (each once)."""
        out = [self.identity_named(name) for name in sorted(self.workloads)]
        seen = set(self.workload_by_selector)
        for account in sorted(set(self.observed)):
            if account not in seen:
                out.append(self.resolve(*account))
        return [identity for identity in out if identity is not None]

    def resolve(self, cluster: str, namespace: str, service_account: str) -> Identity | None:
        """The identity of a canonical (cluster, namespace, service account): the
        Workload that selects it, else the one template that matches it, else None."""
        key = (cluster, namespace, service_account)
        if key in self._resolved:
            return self._resolved[key]
        name = self.workload_by_selector.get(key)
        found: Identity | None = None
        if name is not None:
            spec = self.workloads[name]
            found = Identity(
                name,
                self.spiffe_id_of(name),
                {
                    **spec.claims,
                    "cluster": cluster,
                    "namespace": namespace,
                    "service_account": service_account,
                },
                spec.max_token_ttl,
            )
        else:
            template = self.template_index.match(*key)
            if template is not None:
                found = Identity(
                    template_workload_name(template.name, *key),
                    template.spiffe_id(*key),
                    template.claims_for(*key),
                    template.max_token_ttl,
                    template.name,
                )
        if len(self._resolved) >= RESOLVED_MEMO:
            self._resolved.clear()
        self._resolved[key] = found
        return found

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
    templates: dict[str, WorkloadTemplateSpec] = {}
    receivers: dict[str, EventReceiverSpec] = {}
    where: dict[tuple[str, str], str] = {}
    for doc in documents:
        where[(doc.kind, doc.name)] = f"{doc.path}:{doc.line}" if doc.line else doc.path
        if isinstance(doc.spec, ClusterSpec):
            clusters[doc.name] = doc.spec
        elif isinstance(doc.spec, WorkloadSpec):
            workloads[doc.name] = doc.spec
        elif isinstance(doc.spec, FederatedTrustDomainSpec):
            federations[doc.name] = doc.spec
        elif isinstance(doc.spec, WorkloadTemplateSpec):
            templates[doc.name] = doc.spec
        elif isinstance(doc.spec, EventReceiverSpec):
            receivers[doc.name] = doc.spec
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
    compiled = _compile_templates(trust_domain, clusters, templates, where, problems)
    index = TemplateIndex(compiled)
    problems.extend(_template_conflicts(compiled, index, by_selector, by_spiffe, where))
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
        templates=templates,
        receivers=receivers,
        compiled_templates=compiled,
        template_index=index,
        templates_json=tuple(t.as_json() for t in compiled),
    )


def _labels_selected(scope: ClusterScope, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (NotIn matches an absent key)."""
    if not scope.has_selector:
        return False
    if any(labels.get(k) != v for k, v in scope.match_labels.items()):
        return False
    for e in scope.match_expressions:
        present = e.key in labels
        if e.operator == "Exists" and not present:
            return False
        if e.operator == "DoesNotExist" and present:
            return False
        inside = present and labels[e.key] in e.values
        if e.operator == "In" and not inside:
            return False
        if e.operator == "NotIn" and inside:
            return False
    return True


def _compile_templates(
    trust_domain: str,
    clusters: dict[str, ClusterSpec],
    templates: dict[str, WorkloadTemplateSpec],
    where: dict[tuple[str, str], str],
    problems: list[str],
) -> tuple[CompiledTemplate, ...]:
    compiled = []
    for name, spec in sorted(templates.items()):
        at = f"{where[('WorkloadTemplate', name)]}: WorkloadTemplate {name}"
        for cluster in spec.clusters.names:
            if cluster not in clusters:
                problems.append(
                    f"{at}: spec.clusters.names: {cluster!r} is not a registered Cluster"
                )
        chosen = [
            c
            for c, cspec in clusters.items()
            if c in spec.clusters.names or _labels_selected(spec.clusters, cspec.labels)
        ]
        template = compile_template(name, spec, trust_domain, chosen)
        domain, _ = parse_spiffe_id(template.spiffe_id(*(["x"] * 3)))
        if domain != trust_domain:
            problems.append(
                f"{at}: spec.spiffeIdTemplate {template.spiffe_id_template} is outside trust "
                f"domain {trust_domain}"
            )
        compiled.append(template)
    return tuple(compiled)


def _template_conflicts(
    compiled: tuple[CompiledTemplate, ...],
    index: TemplateIndex,
    by_selector: dict[tuple[str, str, str], str],
    by_spiffe: dict[str, str],
    where: dict[tuple[str, str], str],
) -> list[str]:
    """Two templates that can match one service account (whatever their results: a
    derived identity records its template) or give two service accounts one SPIFFE ID,
    and a template that would give a service account a Workload's SPIFFE ID."""
    problems = []
    for position, a in enumerate(compiled):
        at = f"{where[('WorkloadTemplate', a.name)]}: WorkloadTemplate {a.name}"
        for b in compiled[position + 1 :]:
            both = templates_overlap(a, b)
            if both is not None:
                problems.append(
                    f"{at} and WorkloadTemplate {b.name} ({where[('WorkloadTemplate', b.name)]}) "
                    f"can both match one service account, e.g. cluster {both[0]}, namespace "
                    f"{both[1]}, serviceAccount {both[2]}; a service account maps to one "
                    "template: make their clusters, namespaces or serviceAccounts disjoint"
                )
            elif spiffe_ids_can_meet(a, b):
                problems.append(
                    f"{at} and WorkloadTemplate {b.name}: spec.spiffeIdTemplate "
                    f"{a.spiffe_id_template} and {b.spiffe_id_template} can give one SPIFFE ID "
                    "to two service accounts; give them different literal path segments"
                )
    if index:
        for spiffe_id, workload in sorted(by_spiffe.items()):
            found = index.read_back(spiffe_id)
            if found is not None and found[1] not in by_selector:
                template, account = found
                problems.append(
                    f"{where[('WorkloadTemplate', template.name)]}: WorkloadTemplate "
                    f"{template.name}: would give {spiffe_id}, the SPIFFE ID of Workload "
                    f"{workload}, to service account {account[1]}/{account[2]} of cluster "
                    f"{account[0]}"
                )
    return problems
