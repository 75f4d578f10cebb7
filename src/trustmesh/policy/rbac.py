"""Native Kubernetes RBAC equivalent of a cluster's policy (DESIGN §4,
``trustmesh policy export-rbac --cluster C``), and the groups the agent's TokenReview
answers carry.

The agent's ``/k8s/authenticate`` webhook answers username = the SPIFFE ID and the
groups :func:`groups_for_claims` derives from the token's claims
(``trustmesh:<claim>:<value>`` for ``project``, ``environment``, ``tier``,
``workload_id`` and ``cluster``). An API server that authenticates trustmesh tokens
that way can then authorize them with plain ``rbac.authorization.k8s.io/v1`` objects:

* one ``ClusterRole`` ``trustmesh:<role>`` per GlobalRole that an allow binding
  applying to the cluster uses, holding the role's Kubernetes rules (``include``
  flattened). Service rules (``services``/``paths``/``methods``) have no RBAC
  equivalent; they are left out and the ClusterRole's annotation says so.
* per allow RoleBinding, a ``ClusterRoleBinding`` ``trustmesh:<binding>`` when it lists
  no namespaces, else one ``RoleBinding`` ``trustmesh:<binding>`` in each listed
  namespace (RBAC semantics then match the engine's: a namespaced binding grants
  neither cluster-scoped resources nor non-resource URLs).
* subjects: ``spiffeId``/``workload`` → ``User <SPIFFE ID>``; ``user: NAME`` (a person)
  → ``User user:NAME`` (the username the agent's TokenReview gives a login token); exactly one claim that
  has a group, without ``matchExpressions`` → ``Group trustmesh:<claim>:<value>``;
  anything RBAC cannot express (several claims ANDed, ``matchExpressions``, a claim
  without a group, a workload ANDed with claims, a ``spiffeId`` pattern) is expanded into ``User`` subjects
  over the registered identities it matches today, decided by the engine's own
  subject matching, and the binding's annotation says it was expanded (re-export
  after the registry changes).

What RBAC cannot express is returned as warnings, never silently dropped: a binding's
``expiresAt`` (RBAC objects do not expire), deny bindings (RBAC only grants; the trustmesh authorizer webhook's ``denied: true`` is
what enforces them, so native RBAC alone is *more* permissive), and resources written
``<resource>/*`` (the engine reads "every subresource", RBAC matches only ``*`` and
``*/<subresource>``, so natively they grant nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import yaml

from trustmesh.policy.compiler import PolicySet
from trustmesh.policy.diff import inventory_bundles
from trustmesh.policy.engine import Engine
from trustmesh.registry import Registry
from trustmesh.spiffeid import is_spiffe_id_pattern

RBAC_API_VERSION = "rbac.authorization.k8s.io/v1"
RBAC_GROUP = "rbac.authorization.k8s.io"
GROUP_PREFIX = "trustmesh"
GROUP_CLAIMS = ("cluster", "environment", "project", "tier", "workload_id")
"""Claims that become TokenReview groups. ``cluster`` is the origin cluster."""

MANAGED_BY = {"app.kubernetes.io/managed-by": "trustmesh"}
SKIPPED_SERVICE_RULES = "trustmesh.io/skipped-service-rules"
EXPANDED_SUBJECTS = "trustmesh.io/expanded-subjects"


def groups_for_claims(claims: Mapping[str, Any]) -> list[str]:
    """The Kubernetes groups of an identity with these claims (DESIGN §4 TokenReview):
    ``trustmesh:<claim>:<value>`` for each of :data:`GROUP_CLAIMS` present as a
    non-empty string, sorted. The single source of truth for the agent's TokenReview
    answer and for :func:`export_rbac`."""
    return sorted(
        f"{GROUP_PREFIX}:{key}:{value}"
        for key in GROUP_CLAIMS
        if isinstance(value := claims.get(key), str) and value
    )


class RbacExport(list[dict[str, Any]]):
    """The manifests (a list of dicts), with ``warnings``: what RBAC cannot express."""

    def __init__(self, manifests: list[dict[str, Any]], warnings: list[str]) -> None:
        super().__init__(manifests)
        self.warnings = warnings


def _metadata(
    name: str, annotations: dict[str, str], namespace: str | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = dict(MANAGED_BY)
    if annotations:
        meta["annotations"] = annotations
    return meta


def _cluster_role(role: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    exported: list[dict[str, Any]] = []
    skipped = 0
    for rule in rules:
        if rule.get("services"):
            skipped += 1
            continue
        if rule.get("nonResourceURLs"):
            exported.append(
                {"nonResourceURLs": list(rule["nonResourceURLs"]), "verbs": list(rule["verbs"])}
            )
            continue
        body: dict[str, Any] = {
            "apiGroups": list(rule["apiGroups"]),
            "resources": list(rule["resources"]),
            "verbs": list(rule["verbs"]),
        }
        if rule.get("resourceNames"):
            body["resourceNames"] = list(rule["resourceNames"])
        exported.append(body)
    annotations = {"trustmesh.io/global-role": role}
    if skipped:
        annotations[SKIPPED_SERVICE_RULES] = (
            f"{skipped} service rule(s) (services/paths/methods) have no Kubernetes RBAC "
            "equivalent; the trustmesh agent's ext_authz enforces them"
        )
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "ClusterRole",
        "metadata": _metadata(f"{GROUP_PREFIX}:{role}", annotations),
        "rules": exported,
    }


def _subject(kind: str, name: str) -> dict[str, str]:
    return {"kind": kind, "apiGroup": RBAC_GROUP, "name": name}


def _describe(body: Mapping[str, Any]) -> str:
    parts = []
    if "spiffeId" in body:
        parts.append(f"spiffeId {body['spiffeId']}")
    parts += [f"{k}={v}" for k, v in sorted(body.get("claims", {}).items())]
    for e in body.get("matchExpressions", ()):
        values = f" ({','.join(e['values'])})" if e.get("values") else ""
        parts.append(f"{e['key']} {e['operator']}{values}")
    return " and ".join(parts)


def _matching_identities(
    cluster: str, body: Mapping[str, Any], identities: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """The registered SPIFFE IDs one subject names, decided by the engine itself (a
    one-binding bundle whose only subject is this one)."""
    probe = Engine(
        {
            "cluster": cluster,
            "revision": 0,
            "roles": {"subject": []},
            "bindings": [
                {
                    "name": "subject",
                    "role": "subject",
                    "effect": "allow",
                    "subjects": [dict(body)],
                    "namespaces": None,
                }
            ],
        }
    )
    return sorted(
        spiffe_id
        for spiffe_id, identity in identities.items()
        if probe.applicable(spiffe_id, identity["claims"])[1]
    )


def _subjects(
    cluster: str, bodies: list[dict[str, Any]], identities: Mapping[str, Mapping[str, Any]]
) -> tuple[list[dict[str, str]], list[str]]:
    """(RBAC subjects, notes on the subjects that had to be expanded)."""
    subjects: list[dict[str, str]] = []
    notes: list[str] = []
    for index, body in enumerate(bodies, 1):
        claims = body.get("claims", {})
        expressions = body.get("matchExpressions", ())
        exact = "spiffeId" in body and not is_spiffe_id_pattern(body["spiffeId"])
        if "user" in body:  # a person: the agent's TokenReview username user:NAME
            subjects += [s for s in [_subject("User", f"user:{body['user']}")] if s not in subjects]
            continue
        if exact and not claims and not expressions:
            found = [_subject("User", body["spiffeId"])]
        elif "spiffeId" not in body and not expressions and len(claims) == 1:
            ((key, value),) = claims.items()
            if key in GROUP_CLAIMS:
                found = [_subject("Group", f"{GROUP_PREFIX}:{key}:{value}")]
            else:
                found = []
        else:
            found = []
        if not found:
            users = _matching_identities(cluster, body, identities)
            found = [_subject("User", u) for u in users]
            notes.append(
                f"subject {index} ({_describe(body)}) expanded to {len(users)} registered "
                "workload(s); re-export when the registry changes"
            )
        subjects += [s for s in found if s not in subjects]
    return subjects, notes


def export_rbac(policy: PolicySet, registry: Registry, cluster: str) -> RbacExport:
    """The RBAC manifests equivalent to the policy on ``cluster`` (module docstring):
    ClusterRoles, then ClusterRoleBindings, then RoleBindings, each sorted by name;
    ``.warnings`` lists what RBAC cannot express (deny bindings, ``<resource>/*``).
    Raises ValueError for an unregistered cluster, compiler.PolicyError for roles that
    do not fit together."""
    if cluster not in registry.clusters:
        raise ValueError(f"cluster {cluster!r} is not a registered Cluster")
    bundle = inventory_bundles(policy, registry)[cluster]
    identities: dict[str, dict[str, Any]] = bundle["identities"]
    warnings: list[str] = []
    roles: dict[str, dict[str, Any]] = {}
    cluster_bindings: list[dict[str, Any]] = []
    role_bindings: list[dict[str, Any]] = []
    for binding in bundle["bindings"]:  # sorted by name by the compiler
        name, role = binding["name"], binding["role"]
        if binding["effect"] == "deny":
            warnings.append(
                f"RoleBinding {name} (deny, role {role}) is not exported: Kubernetes RBAC can "
                "only grant; without the trustmesh authorizer webhook these RBAC objects "
                "allow what it denies"
            )
            continue
        if "expiresAt" in binding:
            warnings.append(
                f"RoleBinding {name} expires at {_rfc3339(binding['expiresAt'])}; RBAC has no "
                "expiry: delete its exported binding then (the trustmesh authorizer webhook "
                "stops matching it on its own)"
            )
        if role not in roles:
            roles[role] = _cluster_role(role, bundle["roles"][role])
        subjects, notes = _subjects(cluster, binding["subjects"], identities)
        annotations = {"trustmesh.io/role-binding": name}
        if notes:
            annotations[EXPANDED_SUBJECTS] = "; ".join(notes)
        ref = {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": f"{GROUP_PREFIX}:{role}"}
        namespaces = binding["namespaces"]
        spaces: list[str | None] = [None] if namespaces is None else sorted(namespaces)
        for namespace in spaces:
            manifest: dict[str, Any] = {
                "apiVersion": RBAC_API_VERSION,
                "kind": "ClusterRoleBinding" if namespace is None else "RoleBinding",
                "metadata": _metadata(f"{GROUP_PREFIX}:{name}", dict(annotations), namespace),
                "roleRef": dict(ref),
            }
            if subjects:
                manifest["subjects"] = [dict(s) for s in subjects]
            (cluster_bindings if namespace is None else role_bindings).append(manifest)
    role_bindings.sort(key=lambda m: (m["metadata"]["name"], m["metadata"]["namespace"]))
    manifests = [roles[r] for r in sorted(roles)] + cluster_bindings + role_bindings
    return RbacExport(manifests, warnings)


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_yaml(manifests: list[dict[str, Any]], warnings: list[str] | None = None) -> str:
    """Multi-document YAML, warnings first as ``# `` comment lines (``kubectl apply -f``
    ignores them). ``warnings`` defaults to an :class:`RbacExport`'s own."""
    if warnings is None:
        warnings = getattr(manifests, "warnings", [])
    lines = [f"# {GROUP_PREFIX} export-rbac: native Kubernetes RBAC ({RBAC_API_VERSION})"]
    for warning in warnings:
        lines += [f"# warning: {line}" for line in warning.splitlines() or [""]]
    head = "\n".join(lines) + "\n"
    if not manifests:
        return head
    return head + yaml.safe_dump_all(
        list(manifests),
        sort_keys=False,
        explicit_start=True,
        default_flow_style=False,
        width=100_000,
    )
