"""Rule matching, compiled once per bundle.

Kubernetes rules follow RBAC (``rbac/v1`` PolicyRule semantics): ``*`` matches any
verb, API group or resource; a resource ``res/sub`` names a subresource and ``*/sub``
that subresource of any resource (a plain ``res`` does not cover its subresources);
``resourceNames`` narrows to named objects; ``nonResourceURLs`` match exactly or, with a
trailing ``*``, by prefix. Service rules match the canonical host (exact, ``*.suffix``
or ``*``; hosts carry no port: DESIGN §3), the path by glob (``*`` is one segment,
``**`` any number of segments, ``*`` alone any path) and the method.

Requests reach the matcher canonical (``request/canonical.py``). Globs are matched
against the canonical path fully percent-decoded (``canonical.match_form``): a rule
naming ``/files/a+b`` also covers ``/files/a%2Bb``, which an upstream decodes alike.
Paths match case-sensitively (RFC 3986 §6.2.2.1) unless the rule sets ``pathCase:
insensitive``, for upstreams that fold case; then both sides are case-folded.

``explain`` (on default denies only) says which conditions of a rule a request misses."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from trustmesh.request import KubernetesRequest, NonResourceRequest, Request, ServiceRequest
from trustmesh.request.canonical import match_form

PATH_CASE_INSENSITIVE = "insensitive"


def compile_path_glob(pattern: str, fold_case: bool = False) -> re.Pattern[str] | None:
    """None means "any path". The literal parts are compiled in the form requests are
    matched in (``canonical.match_form``), each on its own: a ``%2A`` in a rule is a
    literal ``*``, never a wildcard."""
    if pattern in ("*", "/**"):
        return None
    out = []
    for segment in pattern.split("/")[1:]:
        if segment == "**":
            out.append("(?:/[^/]*)*")
        else:
            literals = (re.escape(match_form(part, fold_case)) for part in segment.split("*"))
            out.append("/" + "[^/]*".join(literals))
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
        if not self._resource_matches(request):
            return False
        return not self.names or request.name in self.names

    def _resource_matches(self, request: KubernetesRequest) -> bool:
        resources = self.resources
        if resources.any:
            return True
        if request.subresource:
            names = resources.names
            combined = f"{request.resource}/{request.subresource}"
            return combined in names or f"*/{request.subresource}" in names
        return request.resource in resources.names

    def explain(self, request: KubernetesRequest) -> list[str]:
        missed = []
        if request.verb not in self.verbs:
            missed.append(f"verb {request.verb}")
        if request.api_group not in self.groups:
            missed.append(f"apiGroup {request.api_group!r}")
        if not self._resource_matches(request):
            sub = f"/{request.subresource}" if request.subresource else ""
            missed.append(f"resource {request.resource}{sub}")
        if self.names and request.name not in self.names:
            missed.append(f"name {request.name!r}")
        return missed


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
        return self._url_matches(request.path)

    def _url_matches(self, path: str) -> bool:
        return path in self.exact or any(path.startswith(p) for p in self.prefixes)

    def explain(self, request: NonResourceRequest) -> list[str]:
        missed = []
        if request.verb not in self.verbs:
            missed.append(f"verb {request.verb}")
        if not self._url_matches(request.path):
            missed.append(f"URL {request.path}")
        return missed


class ServiceRule:
    family = "service"
    __slots__ = ("any_host", "any_path", "fold_case", "hosts", "methods", "paths", "suffixes")

    def __init__(self, body: dict[str, Any]) -> None:
        hosts = [h.lower() for h in body.get("services", ())]
        self.any_host = "*" in hosts
        self.hosts = frozenset(h for h in hosts if not h.startswith("*"))
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))
        self.fold_case = body.get("pathCase") == PATH_CASE_INSENSITIVE
        globs = [compile_path_glob(p, self.fold_case) for p in body.get("paths", ())]
        self.any_path = any(g is None for g in globs)
        self.paths = tuple(g for g in globs if g is not None)
        self.methods = _Names.of(body.get("methods", ()))

    def host_matches(self, host: str) -> bool:
        if self.any_host or host in self.hosts:
            return True
        for suffix in self.suffixes:  # noqa: SIM110 (no generator per call on the hot path)
            if host.endswith(suffix):
                return True
        return False

    def _path_matches(self, path: str) -> bool:
        if self.any_path:
            return True
        if "%" in path or self.fold_case:  # canonical.match_form, inlined on the hot path
            path = match_form(path, self.fold_case)
        for glob in self.paths:  # noqa: SIM110 (no generator per call on the hot path)
            if glob.fullmatch(path):
                return True
        return False

    def matches(self, request: ServiceRequest) -> bool:
        if request.method not in self.methods or not self.host_matches(request.host):
            return False
        return self._path_matches(request.path)

    def explain(self, request: ServiceRequest) -> list[str]:
        missed = []
        if not self.host_matches(request.host):
            missed.append(f"host {request.host}")
        if not self._path_matches(request.path):
            missed.append(f"path {request.path}")
        if request.method not in self.methods:
            missed.append(f"method {request.method}")
        return missed


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


def explain_rule(rule: CompiledRule, request: Request) -> list[str]:
    """The conditions of ``rule`` that ``request`` (of the rule's family) misses."""
    return rule.explain(request)  # type: ignore[arg-type]


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
