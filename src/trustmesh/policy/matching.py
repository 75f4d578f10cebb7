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
from collections.abc import Iterable
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


def _hot(names: _Names) -> frozenset[str] | None:
    """``names`` for the hot path: None for ``*``, else the set (a ``value in set``
    test costs no Python call, ``_Names.__contains__`` does)."""
    return None if names.any else names.names


class ResourceRule:
    family = "resource"
    __slots__ = (
        "_groups",
        "_resources",
        "_verbs",
        "groups",
        "names",
        "resources",
        "verbs",
    )

    def __init__(self, body: dict[str, Any]) -> None:
        self.groups = _Names.of(body.get("apiGroups", ()))
        self.resources = _Names.of(body.get("resources", ()))
        self.verbs = _Names.of(body.get("verbs", ()))
        self.names = frozenset(body.get("resourceNames", ()))
        # The hot path's forms of the same sets: None stands for ``*`` (anything).
        self._verbs = _hot(self.verbs)
        self._groups = _hot(self.groups)
        self._resources = _hot(self.resources)

    def matches(self, request: KubernetesRequest) -> bool:
        verbs = self._verbs
        if verbs is not None and request.verb not in verbs:
            return False
        groups = self._groups
        if groups is not None and request.api_group not in groups:
            return False
        resources = self._resources
        if resources is not None:
            subresource = request.subresource
            if subresource:
                if (
                    f"{request.resource}/{subresource}" not in resources
                    and f"*/{subresource}" not in resources
                ):
                    return False
            elif request.resource not in resources:
                return False
        return not self.names or request.name in self.names

    def _resource_matches(self, request: KubernetesRequest) -> bool:
        resources = self._resources
        if resources is None:
            return True
        if request.subresource:
            combined = f"{request.resource}/{request.subresource}"
            return combined in resources or f"*/{request.subresource}" in resources
        return request.resource in resources

    def explain(self, request: KubernetesRequest) -> list[str]:
        missed = []
        if self._verbs is not None and request.verb not in self._verbs:
            missed.append(f"verb {request.verb}")
        if self._groups is not None and request.api_group not in self._groups:
            missed.append(f"apiGroup {request.api_group!r}")
        if not self._resource_matches(request):
            sub = f"/{request.subresource}" if request.subresource else ""
            missed.append(f"resource {request.resource}{sub}")
        if self.names and request.name not in self.names:
            missed.append(f"name {request.name!r}")
        return missed


class NonResourceRule:
    family = "nonResource"
    __slots__ = ("_prefixes", "_verbs", "exact", "prefixes", "verbs")

    def __init__(self, body: dict[str, Any]) -> None:
        urls = body.get("nonResourceURLs", ())
        self.exact = frozenset(u for u in urls if not u.endswith("*"))
        self.prefixes = tuple(u[:-1] for u in urls if u.endswith("*"))
        self.verbs = _Names.of(body.get("verbs", ()))
        self._verbs = _hot(self.verbs)
        # str.startswith takes a tuple: one call for every prefix (none: no call)
        self._prefixes = self.prefixes or None

    def matches(self, request: NonResourceRequest) -> bool:
        verbs = self._verbs
        if verbs is not None and request.verb not in verbs:
            return False
        return self._url_matches(request.path)

    def _url_matches(self, path: str) -> bool:
        if path in self.exact:
            return True
        prefixes = self._prefixes
        return prefixes is not None and path.startswith(prefixes)

    def explain(self, request: NonResourceRequest) -> list[str]:
        missed = []
        if self._verbs is not None and request.verb not in self._verbs:
            missed.append(f"verb {request.verb}")
        if not self._url_matches(request.path):
            missed.append(f"URL {request.path}")
        return missed


class ServiceRule:
    family = "service"
    __slots__ = (
        "_methods",
        "_path",
        "any_host",
        "any_path",
        "fold_case",
        "hosts",
        "methods",
        "paths",
        "suffixes",
    )

    def __init__(self, body: dict[str, Any]) -> None:
        hosts = [h.lower() for h in body.get("services", ())]
        self.any_host = "*" in hosts
        self.hosts = frozenset(h for h in hosts if not h.startswith("*"))
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))
        self.fold_case = body.get("pathCase") == PATH_CASE_INSENSITIVE
        globs = [compile_path_glob(p, self.fold_case) for p in body.get("paths", ())]
        self.any_path = any(g is None for g in globs)
        self.paths = tuple(g for g in globs if g is not None)
        # One pattern for all the rule's globs: a path matches the alternation in full
        # exactly when it matches one of them in full (one regex call, not one each).
        self._path = (
            re.compile("|".join(f"(?:{g.pattern})" for g in self.paths))
            if self.paths and not self.any_path
            else None
        )
        self.methods = _Names.of(body.get("methods", ()))
        self._methods = _hot(self.methods)

    def host_matches(self, host: str) -> bool:
        if self.any_host or host in self.hosts:
            return True
        suffixes = self.suffixes
        return bool(suffixes) and host.endswith(suffixes)

    def _path_matches(self, path: str) -> bool:
        if self.any_path:
            return True
        pattern = self._path
        if pattern is None:  # no path at all: nothing matches
            return False
        if "%" in path or self.fold_case:  # canonical.match_form, inlined on the hot path
            path = match_form(path, self.fold_case)
        return pattern.fullmatch(path) is not None

    def matches(self, request: ServiceRequest) -> bool:
        methods = self._methods
        if methods is not None and request.method not in methods:
            return False
        if not self.any_host and request.host not in self.hosts:
            suffixes = self.suffixes
            if not suffixes or not request.host.endswith(suffixes):
                return False
        return self._path_matches(request.path)

    def explain(self, request: ServiceRequest) -> list[str]:
        missed = []
        if not self.host_matches(request.host):
            missed.append(f"host {request.host}")
        if not self._path_matches(request.path):
            missed.append(f"path {request.path}")
        if self._methods is not None and request.method not in self._methods:
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


class CandidateIndex:
    """Which owners (bindings, each one bit of an int) have a rule that may cover a
    request: a superset, from the attributes rules name exactly — the verb (method),
    the resource entry, the host — so that only candidates are matched in full. Built
    once per bundle; :meth:`of` answers with a few dictionary lookups and ``&``.

    Exactness of the superset: a rule is indexed under each verb it names (``*``: under
    every verb), each resource entry (``*``: every), each host (``*``: every) and each
    ``*.suffix`` under the suffix; a request looks up its verb, its resource entries
    (``res``, or ``res/sub`` and ``*/sub``) and its host and the host's every suffix
    from a dot. The verb and resource (host) lookups are ANDed per owner, not per
    rule: an owner with one rule for the verb and another for the resource is a
    candidate that the full match then refuses."""

    __slots__ = (
        "_hosts",
        "_named_hosts",
        "_suffixes",
        "any_host",
        "any_method",
        "any_nonresource_verb",
        "any_resource",
        "any_verb",
        "methods",
        "nonresource_verbs",
        "resources",
        "verbs",
    )
    HOST_MEMO = 100_000

    def __init__(self, owners: Iterable[tuple[int, Iterable[CompiledRule]]]) -> None:
        self.verbs: dict[str, int] = {}
        self.resources: dict[str, int] = {}
        self.nonresource_verbs: dict[str, int] = {}
        self.methods: dict[str, int] = {}
        self._named_hosts: dict[str, int] = {}
        self._suffixes: dict[str, int] = {}
        self.any_verb = self.any_resource = self.any_nonresource_verb = 0
        self.any_method = self.any_host = 0
        for bit, rules in owners:
            for rule in rules:
                if isinstance(rule, ResourceRule):
                    self.any_verb |= _index(self.verbs, rule._verbs, bit)
                    self.any_resource |= _index(self.resources, rule._resources, bit)
                elif isinstance(rule, NonResourceRule):
                    self.any_nonresource_verb |= _index(self.nonresource_verbs, rule._verbs, bit)
                else:
                    self.any_method |= _index(self.methods, rule._methods, bit)
                    if rule.any_host:
                        self.any_host |= bit
                    _index(self._named_hosts, rule.hosts, bit)
                    _index(self._suffixes, frozenset(rule.suffixes), bit)
        # a name's entry includes the owners that name everything: one lookup each
        for table, every in (
            (self.verbs, self.any_verb),
            (self.resources, self.any_resource),
            (self.nonresource_verbs, self.any_nonresource_verb),
            (self.methods, self.any_method),
        ):
            for key in table:
                table[key] |= every
        self._hosts: dict[str, int] = {}

    def resource(self, request: KubernetesRequest) -> int:
        verbs = self.verbs.get(request.verb, self.any_verb)
        if not verbs:
            return 0
        subresource = request.subresource
        if subresource:
            resources = self.resources
            every = self.any_resource
            return verbs & (
                resources.get(f"{request.resource}/{subresource}", every)
                | resources.get(f"*/{subresource}", every)
            )
        return verbs & self.resources.get(request.resource, self.any_resource)

    def nonresource(self, request: NonResourceRequest) -> int:
        return self.nonresource_verbs.get(request.verb, self.any_nonresource_verb)

    def service(self, request: ServiceRequest) -> int:
        methods = self.methods.get(request.method, self.any_method)
        if not methods:
            return 0
        host = request.host
        hosts = self._hosts.get(host)
        if hosts is None:  # a pure function of the host, remembered (bounded)
            hosts = self.host(host)
            if len(self._hosts) >= self.HOST_MEMO:
                self._hosts.clear()
            self._hosts[host] = hosts
        return methods & hosts

    def host(self, host: str) -> int:
        """The owners with a service rule that may name ``host``."""
        hosts = self.any_host | self._named_hosts.get(host, 0)
        suffixes = self._suffixes
        if suffixes:
            at = host.find(".")
            while at >= 0:
                hosts |= suffixes.get(host[at:], 0)
                at = host.find(".", at + 1)
        return hosts

    def of(self, request: Request, family: str) -> int:
        if family == "service":
            return self.service(request)  # type: ignore[arg-type]
        if family == "nonResource":
            return self.nonresource(request)  # type: ignore[arg-type]
        return self.resource(request)  # type: ignore[arg-type]


def _index(table: dict[str, int], names: frozenset[str] | None, bit: int) -> int:
    """Adds ``bit`` under each of ``names``; returns ``bit`` when ``names`` is None
    (``*``: the owner goes with every name), else 0."""
    if names is None:
        return bit
    for name in names:
        table[name] = table.get(name, 0) | bit
    return 0


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
