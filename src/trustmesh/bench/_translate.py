"""What the peer translations (``_cedar``, ``_casbin``) share: the policy read from the
manifests, written independently of ``trustmesh.policy`` so that agreement between the
engines checks our compiler and engine rather than reusing them.

Like our compiler, each peer gets one policy per cluster holding the bindings whose
``clusters`` scope selects that cluster (names, or a label selector with
``matchLabels`` and ``matchExpressions``; absent = every cluster), as an agent holds
its cluster's bundle. ``workload`` subjects become SPIFFE IDs; role ``include`` lists
are expanded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trustmesh.registry import Registry


@dataclass(frozen=True)
class PeerBinding:
    name: str
    deny: bool
    subjects: tuple[dict[str, Any], ...]  # spiffeId?, claims?, matchExpressions?
    namespaces: tuple[str, ...] | None
    rules: tuple[dict[str, Any], ...]


def label_requirement(expression: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label-selector requirement (``NotIn`` holds when the key is absent)."""
    key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    raise ValueError(f"unknown operator {operator}")


def selects_cluster(scope: dict[str, Any] | None, name: str, labels: dict[str, str]) -> bool:
    if scope is None:
        return True
    if name in scope.get("names", ()):
        return True
    selector = scope.get("selector")
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(label_requirement(e, labels) for e in selector.get("matchExpressions", ()))


def role_rules(
    roles: dict[str, dict[str, Any]], name: str, seen: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    spec = roles[name]
    rules = list(spec.get("rules", ()))
    for included in spec.get("include", ()):
        if included not in seen and included != name:
            rules.extend(role_rules(roles, included, (*seen, name)))
    return rules


def peer_bindings(
    roles: dict[str, dict[str, Any]],
    bindings: dict[str, dict[str, Any]],
    registry: Registry,
    cluster: str,
) -> list[PeerBinding]:
    """The bindings of one cluster, from the manifests' ``spec`` bodies."""
    labels = dict(registry.clusters[cluster].labels)
    out = []
    for name, spec in sorted(bindings.items()):
        if not selects_cluster(spec.get("clusters"), cluster, labels):
            continue
        subjects = []
        for subject in spec["subjects"]:
            body = {k: v for k, v in subject.items() if k != "workload"}
            if "workload" in subject:
                body["spiffeId"] = registry.spiffe_id_of(subject["workload"])
            subjects.append(body)
        namespaces = spec.get("namespaces")
        out.append(
            PeerBinding(
                name=name,
                deny=spec.get("effect", "allow") == "deny",
                subjects=tuple(subjects),
                namespaces=tuple(namespaces) if namespaces is not None else None,
                rules=tuple(role_rules(roles, spec["role"])),
            )
        )
    return out


def rule_family(rule: dict[str, Any]) -> str:
    if rule.get("services"):
        return "service"
    if rule.get("nonResourceURLs"):
        return "nonResource"
    return "resource"


def bare_host(host: str) -> str:
    """The host without its port (what a rule host without a port is compared with)."""
    return host.rsplit(":", 1)[0] if ":" in host else host


def plain_path(path: str) -> str:
    """The path without its query string (globs match the path only)."""
    return path.split("?", 1)[0]
