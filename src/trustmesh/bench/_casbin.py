"""The policy translated to casbin (pycasbin), with the same semantics as ours.

One enforcer per cluster, one model with a request/policy/matcher per request family
(``r``/``p``/``m`` for Kubernetes resources, ``r2``/``p2``/``m2`` for non-resource
URLs, ``r3``/``p3``/``m3`` for services; chosen per call with an ``EnforceContext``), and
the effect ``some(where (p.eft == allow)) && !some(where (p.eft == deny))``: deny
overrides allow, no allow is deny. Every binding x rule is one policy line; list
fields are stored as JSON text in the line.

casbin has no claim selectors, no RBAC resource semantics and no ``**`` glob, so the
matchers call functions registered on the enforcer (each a few lines, parsing a line's
JSON once and then caching it): ``subjectMatch`` (SPIFFE ID, claims, matchExpressions),
``inList`` (``*`` = anything; an absent list = anything), ``resourceMatch``
(``res``, ``*/sub``, ``res/sub``, ``res/*``), ``urlMatch`` (casbin's ``keyMatch``:
exact, or prefix before a ``*``), ``hostMatch`` (exact with or without the port, or a
suffix of the bare host for ``*.suffix``) and ``pathMatch`` (casbin's ``regexMatch``
with the glob rewritten as an anchored regular expression: ``*`` is ``[^/]*``, ``**`` is
``(?:/[^/]*)*``).

casbin's own ``globMatch`` is not used: in pycasbin 1.43 it drops the character that
follows a ``*`` when that character is not ``/`` (``globMatch("internal", "*.internal")``
is true), which made it disagree on host suffixes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import casbin
from casbin.core_enforcer import EnforceContext
from casbin.util.builtin_operators import key_match, regex_match

from trustmesh.bench._translate import (
    PeerBinding,
    bare_host,
    label_requirement,
    plain_path,
    rule_family,
)
from trustmesh.request import KubernetesRequest, NonResourceRequest, Request, ServiceRequest

MODEL = """
[request_definition]
r = sub, ns, verb, grp, res, subres, name
r2 = sub, ns, verb, url
r3 = sub, ns, host, path, method

[policy_definition]
p = eft, subj, nss, verbs, grps, ress, names
p2 = eft, subj, nss, verbs, urls
p3 = eft, subj, nss, hosts, paths, methods

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))
e2 = some(where (p2.eft == allow)) && !some(where (p2.eft == deny))
e3 = some(where (p3.eft == allow)) && !some(where (p3.eft == deny))

[matchers]
m = subjectMatch(r.sub, p.subj) && inList(r.ns, p.nss) && inList(r.verb, p.verbs) && inList(r.grp, p.grps) && resourceMatch(r.res, r.subres, p.ress) && inList(r.name, p.names)
m2 = subjectMatch(r2.sub, p2.subj) && inList(r2.ns, p2.nss) && inList(r2.verb, p2.verbs) && urlMatch(r2.url, p2.urls)
m3 = subjectMatch(r3.sub, p3.subj) && inList(r3.ns, p3.nss) && inList(r3.method, p3.methods) && hostMatch(r3.host, p3.hosts) && pathMatch(r3.path, p3.paths)
"""

ABSENT = "null"  # a list field the rule or binding does not have: anything matches


@dataclass(frozen=True, slots=True)
class Principal:
    spiffe_id: str
    claims: dict[str, Any]


def _parsed() -> Callable[[str], Any]:
    cache: dict[str, Any] = {}

    def load(text: str) -> Any:
        found = cache.get(text)
        if found is None:
            found = cache[text] = json.loads(text)
        return found

    return load


def _glob_regex(pattern: str) -> str:
    out = []
    for segment in pattern.split("/")[1:]:
        if segment == "**":
            out.append("(?:/[^/]*)*")
        else:
            out.append("/" + re.escape(segment).replace(r"\*", "[^/]*"))
    return "^" + "".join(out) + "$"


def _functions() -> dict[str, Callable[..., bool]]:
    load = _parsed()
    sets: dict[str, frozenset[str] | None] = {}

    def as_set(text: str) -> frozenset[str] | None:
        if text not in sets:
            values = load(text)
            sets[text] = None if values is None or "*" in values else frozenset(values)
        return sets[text]

    def subject_match(principal: Principal, subjects: str) -> bool:
        if not subjects:  # casbin runs the matcher once with empty fields when it has no lines
            return False
        claims = principal.claims
        for subject in load(subjects):
            if "spiffeId" in subject and subject["spiffeId"] != principal.spiffe_id:
                continue
            if any(claims.get(k) != v for k, v in subject.get("claims", {}).items()):
                continue
            if all(label_requirement(e, claims) for e in subject.get("matchExpressions", ())):
                return True
        return False

    def in_list(value: str, values: str) -> bool:
        allowed = as_set(values)
        return allowed is None or value in allowed

    def resource_match(resource: str, subresource: str, resources: str) -> bool:
        allowed = as_set(resources)
        if allowed is None:
            return True
        if not subresource:
            return resource in allowed
        return (
            f"{resource}/{subresource}" in allowed
            or f"*/{subresource}" in allowed
            or f"{resource}/*" in allowed
        )

    def url_match(url: str, urls: str) -> bool:
        return any(key_match(url, pattern) for pattern in load(urls))

    def host_match(host: str, hosts: str) -> bool:
        bare = bare_host(host)
        for pattern in load(hosts):
            if pattern == "*" or pattern in (host, bare):
                return True
            if pattern.startswith("*.") and bare.endswith(pattern[1:]):
                return True
        return False

    def path_match(path: str, paths: str) -> bool:
        for kind, pattern in load(paths):
            if kind == "any":
                return True
            if kind == "regex" and regex_match(path, pattern):
                return True
        return False

    return {
        "subjectMatch": subject_match,
        "inList": in_list,
        "resourceMatch": resource_match,
        "urlMatch": url_match,
        "hostMatch": host_match,
        "pathMatch": path_match,
    }


def _j(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _path_line(pattern: str) -> list[str]:
    if pattern in ("*", "/**"):
        return ["any", ""]
    return ["regex", _glob_regex(pattern)]


def policy_lines(bindings: Sequence[PeerBinding]) -> dict[str, list[list[str]]]:
    """Policy lines by policy type (``p``, ``p2``, ``p3``) for one cluster."""
    lines: dict[str, list[list[str]]] = {"p": [], "p2": [], "p3": []}
    for binding in bindings:
        eft = "deny" if binding.deny else "allow"
        subjects = _j(list(binding.subjects))
        nss = _j(list(binding.namespaces)) if binding.namespaces is not None else ABSENT
        for rule in binding.rules:
            family = rule_family(rule)
            if family == "resource":
                names = _j(rule["resourceNames"]) if rule.get("resourceNames") else ABSENT
                lines["p"].append(
                    [
                        eft,
                        subjects,
                        nss,
                        _j(rule["verbs"]),
                        _j(rule["apiGroups"]),
                        _j(rule["resources"]),
                        names,
                    ]
                )
            elif family == "nonResource":
                lines["p2"].append(
                    [eft, subjects, nss, _j(rule["verbs"]), _j(rule["nonResourceURLs"])]
                )
            else:
                hosts = [h.lower() for h in rule["services"]]
                paths = [_path_line(p) for p in rule["paths"]]
                lines["p3"].append([eft, subjects, nss, _j(hosts), _j(paths), _j(rule["methods"])])
    # casbin refuses a line it already has; two bindings can translate to the same line
    return {
        ptype: [list(t) for t in dict.fromkeys(tuple(line) for line in found)]
        for ptype, found in lines.items()
    }


def new_enforcer(lines: dict[str, list[list[str]]]) -> casbin.Enforcer:
    model = casbin.Model()
    model.load_model_from_text(MODEL)
    enforcer = casbin.Enforcer(model)
    for name, function in _functions().items():
        enforcer.add_function(name, function)
    for ptype, found in lines.items():
        if found:
            enforcer.add_named_policies(ptype, found)
    return enforcer


class CasbinPeer:
    def __init__(self, lines: dict[str, dict[str, list[list[str]]]]) -> None:
        self.line_counts = {
            cluster: sum(len(v) for v in found.values()) for cluster, found in lines.items()
        }
        self.enforcers = {cluster: new_enforcer(found) for cluster, found in lines.items()}
        self.contexts = {
            "resource": EnforceContext("r", "p", "e", "m"),
            "nonResource": EnforceContext("r2", "p2", "e2", "m2"),
            "service": EnforceContext("r3", "p3", "e3", "m3"),
        }

    def arguments(
        self, spiffe_id: str, claims: dict[str, Any], request: Request
    ) -> tuple[Any, ...]:
        """What one ``enforce`` call takes for this request (built outside the timing)."""
        principal = Principal(spiffe_id, claims)
        if isinstance(request, KubernetesRequest):
            return (
                self.contexts["resource"],
                principal,
                request.namespace,
                request.verb,
                request.api_group,
                request.resource,
                request.subresource,
                request.name,
            )
        if isinstance(request, NonResourceRequest):
            return (
                self.contexts["nonResource"],
                principal,
                request.namespace,
                request.verb,
                request.path,
            )
        assert isinstance(request, ServiceRequest)
        return (
            self.contexts["service"],
            principal,
            request.namespace,
            request.host,
            plain_path(request.path),
            request.method,
        )

    def decide(self, cluster: str, arguments: tuple[Any, ...]) -> bool:
        return bool(self.enforcers[cluster].enforce(*arguments))
