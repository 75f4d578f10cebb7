"""Rule matching, compiled once per bundle.

Kubernetes rules follow RBAC (``rbac/v1`` PolicyRule semantics): ``*`` matches any
verb, API group or resource; a resource ``res/sub`` names a subresource and ``*/sub``
that subresource of any resource (a plain ``res`` does not cover its subresources);
``resourceNames`` narrows to named objects; ``nonResourceURLs`` match exactly or, with a
trailing ``*``, by prefix. Service rules match the host (exact, ``*.suffix`` or ``*``;
a rule host without a port ignores the request's port), the path by glob (``*`` is
one segment, ``**`` any number of segments, ``*`` alone any path) and the method."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from trustmesh.request import KubernetesRequest, NonResourceRequest, Request, ServiceRequest


def compile_path_glob(pattern: str) -> re.Pattern[str] | None:
    """None means "any path"."""
    if pattern in ("*", "/**"):
        return None
    out = []
    for segment in pattern.split("/")[1:]:
        if segment == "**":
            out.append("(?:/[^/]*)*")
        else:
            out.append("/" + re.escape(segment).replace(r"\*", "[^/]*"))
    return re.compile("".join(out))


@dataclass(frozen=True, slots=True)
class _Names:
    """A set of names with ``*`` as "anything"."""

    any: bool
    names: frozenset[str]

    @classmethod
    def of(cls, values: Any) -> _Names:
        values = frozenset(values)
        return cls("*" in values, values)

    def __contains__(self, value: str) -> bool:
        return self.any or value in self.names


class ResourceRule:
    family = "resource"
    __slots__ = ("groups", "names", "resources", "verbs")

    def __init__(self, body: dict[str, Any]) -> None:
        self.groups = _Names.of(body.get("apiGroups", ()))
        self.resources = _Names.of(body.get("resources", ()))
        self.verbs = _Names.of(body.get("verbs", ()))
        self.names = frozenset(body.get("resourceNames", ()))

    def matches(self, request: KubernetesRequest) -> bool:
        if request.verb not in self.verbs or request.api_group not in self.groups:
            return False
        resources = self.resources
        if not resources.any:
            if request.subresource:
                combined = f"{request.resource}/{request.subresource}"
                names = resources.names
                if combined not in names and f"*/{request.subresource}" not in names:
                    return False
            elif request.resource not in resources.names:
                return False
        return not self.names or request.name in self.names


class NonResourceRule:
    family = "nonResource"
    __slots__ = ("exact", "prefixes", "verbs")

    def __init__(self, body: dict[str, Any]) -> None:
        urls = body.get("nonResourceURLs", ())
        self.exact = frozenset(u for u in urls if not u.endswith("*"))
        self.prefixes = tuple(u[:-1] for u in urls if u.endswith("*"))
        self.verbs = _Names.of(body.get("verbs", ()))

    def matches(self, request: NonResourceRequest) -> bool:
        if request.verb not in self.verbs:
            return False
        return request.path in self.exact or any(request.path.startswith(p) for p in self.prefixes)


class ServiceRule:
    family = "service"
    __slots__ = ("any_host", "any_path", "hosts", "methods", "paths", "suffixes")

    def __init__(self, body: dict[str, Any]) -> None:
        hosts = [h.lower() for h in body.get("services", ())]
        self.any_host = "*" in hosts
        self.hosts = frozenset(h for h in hosts if not h.startswith("*"))
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))
        globs = [compile_path_glob(p) for p in body.get("paths", ())]
        self.any_path = any(g is None for g in globs)
        self.paths = tuple(g for g in globs if g is not None)
        self.methods = _Names.of(body.get("methods", ()))

    def _host_matches(self, host: str) -> bool:
        if self.any_host or host in self.hosts:
            return True
        bare = host.rsplit(":", 1)[0] if ":" in host else host
        if bare in self.hosts:
            return True
        return any(host.endswith(suffix) or bare.endswith(suffix) for suffix in self.suffixes)

    def matches(self, request: ServiceRequest) -> bool:
        if request.method not in self.methods or not self._host_matches(request.host):
            return False
        if self.any_path:
            return True
        path = request.path.split("?", 1)[0]
        return any(p.fullmatch(path) for p in self.paths)


CompiledRule = ResourceRule | NonResourceRule | ServiceRule


_COMPILED: dict[bytes, CompiledRule] = {}


def compile_rule(body: dict[str, Any]) -> CompiledRule:
    """Compiled rules are immutable, so engines share them (bundles of many clusters
    repeat the same roles)."""
    key = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    found = _COMPILED.get(key)
    if found is None:
        if len(_COMPILED) > 100_000:
            _COMPILED.clear()
        found = _COMPILED[key] = _compile_rule(body)
    return found


def _compile_rule(body: dict[str, Any]) -> CompiledRule:
    if body.get("services"):
        return ServiceRule(body)
    if body.get("nonResourceURLs"):
        return NonResourceRule(body)
    return ResourceRule(body)


def family_of(request: Request) -> str:
    if isinstance(request, KubernetesRequest):
        return "resource"
    if isinstance(request, NonResourceRequest):
        return "nonResource"
    return "service"


def requirement_matches(key: str, operator: str, values: frozenset[str], labels: Any) -> bool:
    """Kubernetes label-selector requirement semantics (NotIn matches an absent key);
    only string values can be In a set of strings."""
    present = key in labels
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    value = labels.get(key) if present else None
    inside = isinstance(value, str) and value in values
    return inside if operator == "In" else not inside


def expression_matches(expression: dict[str, Any], labels: Any) -> bool:
    return requirement_matches(
        expression["key"], expression["operator"], frozenset(expression.get("values", ())), labels
    )
