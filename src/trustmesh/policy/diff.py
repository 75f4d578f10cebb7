"""The *effective* policy diff (DESIGN §3, ``trustmesh policy diff A B``).

A policy is reduced to the set of grants it makes over the registered inventory: for
every registered Workload identity and every identity a WorkloadTemplate gave (as
observed at its first credential; ``Registry.inventory_identities``, with the claims a
token of it carries) and every registered Cluster, each allow RoleBinding that
applies to the cluster (``compiler.cluster_selected``) and names the identity (the
engine's own subject matching, ``Engine.applicable``) contributes one :class:`Grant`
per (namespace, verb or method, resource or path) its role's rules spell out. Two
policies are then compared as sets, so a refactoring that moves rules between roles
or bindings shows no change, and a new label on a Workload that pulls it into a
claims-selected binding does.

Deny overrides allow (DESIGN §3), so a grant is dropped when a deny binding naming the
same identity on the same cluster *covers all of it*:

* A concrete grant (no ``*`` anywhere: one namespace, verb, API group, resource, name,
  URL, host, path, method) becomes the request it describes and the real engine decides
  it (``Engine.decide(...).denied``).
* A wildcard grant is probed through the same engine with each wildcard part replaced
  by a sentinel value that no literal in a rule can equal (``verbs: ["*"]`` becomes a
  sentinel verb, ``/api/*`` becomes ``/api/<sentinel>``, ``*.example.com`` becomes
  ``<sentinel>.example.com``, a namespace-less binding becomes a sentinel namespace, a
  path segment ``v*`` becomes ``v<sentinel>``). Only a deny that is at least as wide in
  that part matches the probe, and because a single probe is decided by the engine,
  a deny spread over several rules is honoured exactly when one of them is as wide.
* A ``**`` path segment (and the any-path globs ``*`` and ``/**``) matches any number
  of segments, which one probe cannot stand for. Those grants are probed with each
  ``**`` replaced by zero, one and two sentinel segments, and a deny covers them only
  when **one** of its path patterns matches every probe (checked with the engine's
  compiled service rule, ``matching.compile_rule``, narrowed to that one path). A
  single glob that matches zero, one and two arbitrary segments at a place matches any
  number there, so this is exact for one deny path; denies that only add up to the
  grant across several paths (``/a``, ``/a/*``, ``/a/*/*``) are not taken as covering,
  which errs on the side of reporting a grant.

Approximations, all on the side of showing more grants rather than fewer:

* A grant is kept whole unless a deny covers all of it; a partial deny (say, ``get
  pods`` in every namespace minus a deny in ``kube-system``) leaves the grant listed as
  ``namespace *``. The diff lists what a role spells out, not the set difference.
* The API group ``*`` is written ``*/<resource>`` and a named group ``<group>/
  <resource>`` (``apps/deployments``), while a core resource is written as is
  (``pods``, ``pods/log``, ``*/scale``); only ``*`` + ``scale`` and core ``*/scale`` can
  print alike. Named objects (``resourceNames``) are written ``<resource> name=<n>``.
* Non-resource rules in a binding that lists namespaces grant nothing (a non-resource
  request has no namespace, and the engine requires it to be listed), so they make no
  grant; a non-resource grant's namespace is ``*``.
* People: each person a ``user`` subject names (on a cluster whose bundle has the
  binding) is a subject of the diff too, written ``user:NAME`` in the workload column;
  their grants are found and denied by the engine's person lookup
  (``Engine.applicable_user``), never by workload subjects.
* A grant that only a time-bound binding makes carries its ``expiresAt`` (``expires``,
  RFC 3339 UTC; the latest when several make it; empty when a binding without one
  makes it too). The diff is of policies, not of a moment: a binding past its expiry
  still shows, marked.
* References the current inventory no longer has (a binding subject naming a deleted
  Workload, a cluster name no longer registered) match nothing, so they are dropped
  before compiling instead of failing the diff of an old revision.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

from trustmesh.common.errors import PolicyError
from trustmesh.policy.compiler import (
    PolicySet,
    check_policy,
    compile_all,
    compile_bundle,
    flatten_roles,
)
from trustmesh.policy.engine import Decision, Engine
from trustmesh.policy.matching import compile_rule
from trustmesh.registry import Registry
from trustmesh.request import (
    KubernetesRequest,
    NonResourceRequest,
    Request,
    ServiceRequest,
)

ANY = "\x00any\x00"
"""The sentinel standing for a wildcard part in a probe: no rule literal can equal it
(verbs, groups, resources, hosts and namespaces are validated to exclude NUL)."""

ESCALATION_VERBS = ("bind", "escalate", "impersonate")
_ESCALATING_RESOURCES = {
    "roles": ("bind", "escalate"),
    "clusterroles": ("bind", "escalate"),
    "users": ("impersonate",),
    "groups": ("impersonate",),
    "serviceaccounts": ("impersonate",),
    "uids": ("impersonate",),
    "userextras": ("impersonate",),
}


class Grant(NamedTuple):
    """One thing a workload may do on a cluster. ``namespace`` is ``*`` when the
    binding lists none; ``action`` is a Kubernetes verb or an HTTP method; ``target`` is
    a resource (``pods``, ``pods/log``, ``apps/deployments``, ``*``), a non-resource URL
    or ``"<host> <path-glob>"``; ``kind`` is ``resource``, ``nonResource`` or
    ``service``. ``workload`` is ``user:NAME`` for a person; ``expires`` the RFC 3339
    time a time-bound grant ends (empty: it does not)."""

    workload: str
    cluster: str
    namespace: str
    action: str
    target: str
    kind: str
    expires: str = ""

    def to_json(self) -> dict[str, str]:
        body = self._asdict()
        if not self.expires:
            del body["expires"]
        return body


@dataclass(frozen=True)
class _Detail:
    """What a grant was expanded from, for escalation flags (the printed target is not
    always parseable back into group and resource)."""

    api_group: str = ""
    resource: str = ""


@dataclass
class PolicyDiff:
    appeared: list[Grant] = field(default_factory=list)
    disappeared: list[Grant] = field(default_factory=list)
    escalations: list[tuple[Grant, list[str]]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.appeared and not self.disappeared

    def flags_of(self, grant: Grant) -> list[str]:
        for escalated, flags in self.escalations:
            if escalated == grant:
                return flags
        return []

    def to_json(self) -> dict[str, Any]:
        return {
            "appeared": [g.to_json() for g in self.appeared],
            "disappeared": [g.to_json() for g in self.disappeared],
            "escalations": [
                {"grant": g.to_json(), "flags": list(flags)} for g, flags in self.escalations
            ],
        }


# --- compiling over today's inventory ------------------------------------------------------


def _for_inventory(policy: PolicySet, registry: Registry) -> PolicySet:
    """The policy without references the registry no longer has (they match nothing) and
    without PolicyTests (they make no grant)."""
    bindings = {}
    for name, binding in policy.bindings.items():
        subjects = tuple(
            s
            for s in binding.subjects
            if not s.workload or registry.identity_named(s.workload) is not None
        )
        if not subjects:
            continue
        clusters = binding.clusters
        if clusters is not None:
            clusters = dataclasses.replace(
                clusters, names=tuple(n for n in clusters.names if n in registry.clusters)
            )
        bindings[name] = dataclasses.replace(binding, subjects=subjects, clusters=clusters)
    return PolicySet(roles=dict(policy.roles), bindings=bindings, bodies=list(policy.bodies))


def _check_roles(policy: PolicySet) -> None:
    """Raise compiler.PolicyError for unknown roles and include cycles, which no
    inventory can make sense of."""
    _, problems = flatten_roles(policy.roles)
    problems += [
        f"RoleBinding {name}: role {b.role!r} is not a GlobalRole"
        for name, b in sorted(policy.bindings.items())
        if b.role not in policy.roles
    ]
    if problems:
        raise PolicyError(problems)


def inventory_bundles(policy: PolicySet, registry: Registry) -> dict[str, dict[str, Any]]:
    """Every registered cluster's bundle (``compiler.compile_all``) for the policy as it
    applies to today's inventory; raises compiler.PolicyError for unknown roles and
    include cycles, which no inventory can make sense of."""
    _check_roles(policy)
    return compile_all(_for_inventory(policy, registry), registry, 0)


def inventory_bundle(
    policy: PolicySet, registry: Registry, cluster: str, revision: int = 0
) -> dict[str, Any]:
    """One registered cluster's bundle of :func:`inventory_bundles`, compiled alone and
    carrying ``revision`` ("explain this decision" over any revision: the current one's
    bundle is the one its agents hold)."""
    _check_roles(policy)
    fitted = _for_inventory(policy, registry)
    problems = check_policy(fitted, registry)
    if problems:
        raise PolicyError(problems)
    return compile_bundle(fitted, registry, cluster, revision)


# --- expanding rules into grants -----------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    grant: Grant
    detail: _Detail
    probes: tuple[Request, ...]  # one, or several for ** paths (see the module docstring)


def _any(value: str) -> str:
    return ANY if value == "*" else value


def _resource_target(group: str, resource: str, name: str | None) -> str:
    target = resource if group == "" else f"{group}/{resource}"
    return f"{target} name={name}" if name is not None else target


def _resource_probe(verb: str, group: str, resource: str, name: str, namespace: str) -> Request:
    base, _, sub = resource.partition("/")
    return KubernetesRequest(
        verb=_any(verb),
        api_group=_any(group),
        resource=_any(base),
        subresource=_any(sub),
        name=name,
        namespace=_any(namespace),
    )


def _url_probe(url: str) -> str:
    return url[:-1] + ANY if url.endswith("*") else url


def _host_probe(host: str) -> str:
    return ANY + host[1:] if host.startswith("*") else host


def _path_probes(glob: str) -> tuple[str, ...]:
    if glob in ("*", "/**"):
        glob = "/**"
    segments = glob.split("/")[1:]
    stars = segments.count("**")
    probes = []
    for depths in itertools.product((0, 1, 2), repeat=stars):
        out: list[str] = []
        widths = iter(depths)
        for segment in segments:
            if segment == "**":
                out.extend([ANY] * next(widths))
            else:
                out.append(segment.replace("*", ANY))
        probes.append("/" + "/".join(out))
    return tuple(dict.fromkeys(probes))


def _expand(
    workload: str, cluster: str, rule: Mapping[str, Any], namespaces: list[str] | None
) -> Iterator[_Candidate]:
    spaces = namespaces if namespaces is not None else ["*"]
    if rule.get("services"):
        for ns, method, host, path in itertools.product(
            spaces, rule["methods"], rule["services"], rule["paths"]
        ):
            host = host.lower()
            grant = Grant(workload, cluster, ns, method, f"{host} {path}", "service")
            probes = tuple(
                ServiceRequest(
                    host=_host_probe(host), path=p, method=_any(method), namespace=_any(ns)
                )
                for p in _path_probes(path)
            )
            yield _Candidate(grant, _Detail(), probes)
        return
    if rule.get("nonResourceURLs"):
        if namespaces is not None:
            return  # a non-resource request has no namespace: never covered (docstring)
        for verb, url in itertools.product(rule["verbs"], rule["nonResourceURLs"]):
            grant = Grant(workload, cluster, "*", verb, url, "nonResource")
            url_probe = NonResourceRequest(verb=_any(verb), path=_url_probe(url))
            yield _Candidate(grant, _Detail(), (url_probe,))
        return
    names: list[str | None] = list(rule.get("resourceNames", ())) or [None]
    for ns, verb, group, resource, name in itertools.product(
        spaces, rule["verbs"], rule["apiGroups"], rule["resources"], names
    ):
        grant = Grant(
            workload, cluster, ns, verb, _resource_target(group, resource, name), "resource"
        )
        probe = _resource_probe(verb, group, resource, name or "", ns)
        yield _Candidate(grant, _Detail(group, resource), (probe,))


def _denied(
    decide: Callable[[Request], Decision],
    denies: tuple[Any, ...],
    bundle: Mapping[str, Any],
    candidate: _Candidate,
) -> bool:
    """``decide``: the subject's decision on one probe as given (``decide_reading``);
    ``denies``: the subject's deny bindings."""
    if len(candidate.probes) == 1:
        return decide(candidate.probes[0]).denied
    # ** paths: one deny path pattern must match every probe (module docstring).
    for deny in denies:
        if deny.namespaces is not None and not all(
            p.namespace in deny.namespaces for p in candidate.probes
        ):
            continue
        for body in bundle["roles"][deny.role]:
            for path in body.get("paths", ()) if body.get("services") else ():
                narrowed = compile_rule({**body, "paths": [path]})
                if all(narrowed.matches(p) for p in candidate.probes):  # type: ignore[arg-type]
                    return True
    return False


def _until(expires_at: float | None) -> str:
    if expires_at is None:
        return ""
    return datetime.fromtimestamp(expires_at, UTC).isoformat().replace("+00:00", "Z")


def _subject_grants(
    grants: dict[Grant, _Detail],
    subject: str,
    cluster: str,
    bundle: Mapping[str, Any],
    found: tuple[tuple[Any, ...], tuple[Any, ...]],
    decide: Callable[[Request], Decision],
) -> None:
    """The grants of one subject (a workload identity or a person) on one cluster."""
    denies, allows = found
    for binding in allows:
        namespaces = sorted(binding.namespaces) if binding.namespaces is not None else None
        until = _until(binding.expires_at)
        for rule in bundle["roles"][binding.role]:
            for candidate in _expand(subject, cluster, rule, namespaces):
                grant = candidate.grant._replace(expires=until)
                if grant in grants:
                    continue
                if not _denied(decide, denies, bundle, candidate):
                    grants[grant] = candidate.detail


def _settle_expiries(grants: dict[Grant, _Detail]) -> dict[Grant, _Detail]:
    """One entry per grant: without ``expires`` when a lasting binding makes it, else
    with the latest expiry."""
    best: dict[Grant, Grant] = {}
    for grant in grants:
        key = grant._replace(expires="")
        held = best.get(key)
        if held is None or (held.expires and (not grant.expires or grant.expires > held.expires)):
            best[key] = grant
    return {grant: grants[grant] for grant in best.values()}


def _effective(policy: PolicySet, registry: Registry) -> dict[Grant, _Detail]:
    bundles = inventory_bundles(policy, registry)
    identities = registry.inventory_identities()
    grants: dict[Grant, _Detail] = {}
    for cluster, bundle in sorted(bundles.items()):
        engine = Engine(bundle)
        for identity in identities:
            spiffe_id, claims = identity.spiffe_id, identity.claims
            _subject_grants(
                grants,
                identity.workload,
                cluster,
                bundle,
                engine.applicable(spiffe_id, claims),
                partial(engine.decide_reading, spiffe_id, claims),
            )
        for person in engine.people:
            _subject_grants(
                grants,
                f"user:{person}",
                cluster,
                bundle,
                engine.applicable_user(person),
                partial(engine.decide_reading_user, person),
            )
    return _settle_expiries(grants)


def effective_grants(policy: PolicySet, registry: Registry) -> set[Grant]:
    """Every grant the policy makes over the registered inventory, after denies (module
    docstring); raises compiler.PolicyError when the policy's roles do not fit together.
    """
    return set(_effective(policy, registry))


# --- escalations ---------------------------------------------------------------------------


def _escalation_flags(grant: Grant, detail: _Detail, registry: Registry) -> list[str]:
    """Why an appearing grant deserves a second look: ``wildcard`` (a ``*`` in its
    namespace, action or target, which includes ``**`` paths), ``secrets`` (it reaches
    core ``secrets``, by name or through a ``*`` resource), ``escalate``/``bind``/
    ``impersonate`` (the RBAC verbs that step around RBAC's own escalation checks, or a
    ``*`` verb on roles, clusterroles, users, groups, serviceaccounts or ``*``), and
    ``cross-environment`` (the workload's ``environment`` claim differs from the
    cluster's ``environment`` label; flagged only when both are present)."""
    flags: list[str] = []
    if "*" in grant.namespace or "*" in grant.action or "*" in grant.target:
        flags.append("wildcard")
    if grant.kind == "resource":
        base = detail.resource.partition("/")[0]
        if detail.api_group in ("", "*") and base in ("secrets", "*"):
            flags.append("secrets")
        verbs: set[str] = set()
        if grant.action in ESCALATION_VERBS:
            verbs.add(grant.action)
        elif grant.action == "*":
            if base == "*":
                verbs.update(ESCALATION_VERBS)
            else:
                verbs.update(_ESCALATING_RESOURCES.get(base, ()))
        flags.extend(v for v in ESCALATION_VERBS if v in verbs)
    named = registry.identity_named(grant.workload)
    if named is not None and grant.cluster in registry.clusters:
        mine = named.claims.get("environment")
        theirs = registry.clusters[grant.cluster].labels.get("environment")
        if mine is not None and theirs is not None and mine != theirs:
            flags.append("cross-environment")
    return flags


def diff_policies(old: PolicySet, new: PolicySet, registry: Registry) -> PolicyDiff:
    """The effective change from ``old`` to ``new`` over today's inventory, with the
    escalation flags (wildcard, secrets, escalate, bind, impersonate, cross-environment) of every grant that appears."""
    before = _effective(old, registry)
    after = _effective(new, registry)
    appeared = sorted(set(after) - set(before))
    disappeared = sorted(set(before) - set(after))
    escalations = []
    for grant in appeared:
        flags = _escalation_flags(grant, after[grant], registry)
        if flags:
            escalations.append((grant, flags))
    return PolicyDiff(appeared=appeared, disappeared=disappeared, escalations=escalations)
