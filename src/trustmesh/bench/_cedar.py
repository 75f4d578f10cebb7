"""The policy translated to Cedar (cedarpy), with the same semantics as ours.

* Every binding x rule is one policy: ``permit`` for an allow binding, ``forbid`` for a
  deny binding. Cedar's own rule (a matching ``forbid`` wins, no matching ``permit`` is
  deny) is exactly deny-overrides with default deny.
* The action is the request family (``Action::"resource"``, ``"nonResource"``,
  ``"service"``), in the policy head; a binding with one ``spiffeId`` subject also puts
  ``principal == Workload::"…"`` in the head.
* Principals are ``Workload`` entities whose ``claims`` attribute is the token's claims;
  subjects become ``when`` conditions over them (``has`` guards every access, so a
  missing claim never turns into an evaluation error: ``NotIn`` on an absent claim
  holds, as in Kubernetes selectors).
* The request's attributes are the ``context``. Cedar has no string concatenation or
  splitting, so the context also carries what a proxy would hand over anyway: the host
  without its port (``bareHost``), the path without its query string, its number of
  segments (``segs``) and its prefixes and suffixes of ``k`` segments (``pre.dk``,
  ``suf.dk``).
* Path globs: Cedar's ``like`` has one wildcard, ``*``, which also matches ``/``. A glob
  without ``**`` and with ``k`` segments becomes ``segs == k && path like <glob>``: the
  glob's literal text holds exactly ``k`` slashes, so no ``*`` can swallow one; that is
  the one-segment ``*``. A glob with one ``**`` (``P/**/S``, ``P`` of ``k`` segments,
  ``S`` of ``m``) becomes ``segs >= k + m && pre.dk like P && suf.dm like S``. Globs with
  two ``**`` are refused (the generator makes none).
* Kubernetes resources: ``res`` (no subresource), ``*/sub``, ``res/sub`` and ``res/*``
  become membership tests on ``context.resource``/``context.subresource`` (a record
  ``{r, s}`` for ``res/sub``), exactly our matcher's cases.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import cedarpy

from trustmesh.bench._translate import PeerBinding, bare_host, plain_path, rule_family
from trustmesh.request import KubernetesRequest, NonResourceRequest, Request, ServiceRequest


def _s(value: str) -> str:
    if any(ord(c) < 0x20 for c in value):
        raise ValueError(f"{value!r}: control characters are not translated")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _like(glob: str) -> str:
    """A like pattern: ``*`` stays the wildcard; quotes and backslashes are escaped."""
    return _s(glob)


def _set(values: Iterable[str]) -> str:
    return "[" + ", ".join(_s(v) for v in values) + "]"


def _any(parts: Sequence[str]) -> str:
    if not parts:
        return "false"
    return parts[0] if len(parts) == 1 else "(" + " || ".join(parts) + ")"


def _claim(key: str) -> str:
    return f"principal.claims[{_s(key)}]"


def _has(key: str) -> str:
    return f"principal.claims has {_s(key)}"


def _expression(e: dict[str, Any]) -> str:
    key, operator, values = e["key"], e["operator"], e.get("values", [])
    if operator == "Exists":
        return _has(key)
    if operator == "DoesNotExist":
        return f"!({_has(key)})"
    inside = f"({_has(key)} && {_set(values)}.contains({_claim(key)}))"
    return inside if operator == "In" else f"!{inside}"


def _subject(subject: dict[str, Any], in_head: bool) -> str:
    parts = []
    if "spiffeId" in subject and not in_head:
        parts.append(f"principal == Workload::{_s(subject['spiffeId'])}")
    for key, value in sorted(subject.get("claims", {}).items()):
        parts.append(f"({_has(key)} && {_claim(key)} == {_s(value)})")
    parts.extend(_expression(e) for e in subject.get("matchExpressions", ()))
    return "(" + " && ".join(parts) + ")" if parts else "true"


def _names(field: str, values: Sequence[str]) -> str | None:
    """None when ``*`` is among the values (anything matches)."""
    if "*" in values:
        return None
    return f"{_set(values)}.contains(context.{field})"


def _resource_rule(rule: dict[str, Any]) -> list[str]:
    conds = [c for c in (_names("verb", rule["verbs"]), _names("apiGroup", rule["apiGroups"])) if c]
    resources = rule["resources"]
    if "*" not in resources:
        plain = [r for r in resources if "/" not in r]
        any_res = [r[2:] for r in resources if r.startswith("*/")]
        any_sub = [r[:-2] for r in resources if r.endswith("/*") and not r.startswith("*/")]
        pairs = [
            r.split("/", 1)
            for r in resources
            if "/" in r and not r.startswith("*/") and not r.endswith("/*")
        ]
        sub_parts = []
        if any_res:
            sub_parts.append(f"{_set(any_res)}.contains(context.subresource)")
        if any_sub:
            sub_parts.append(f"{_set(any_sub)}.contains(context.resource)")
        if pairs:
            records = ", ".join(f"{{r: {_s(r)}, s: {_s(s)}}}" for r, s in pairs)
            sub_parts.append(
                f"[{records}].contains({{r: context.resource, s: context.subresource}})"
            )
        alternatives = []
        if plain:
            alternatives.append(
                f'(context.subresource == "" && {_set(plain)}.contains(context.resource))'
            )
        if sub_parts:
            alternatives.append(f'(context.subresource != "" && {_any(sub_parts)})')
        conds.append(_any(alternatives))
    if rule.get("resourceNames"):
        conds.append(f"{_set(rule['resourceNames'])}.contains(context.name)")
    return conds


def _non_resource_rule(rule: dict[str, Any]) -> list[str]:
    conds = [c for c in (_names("verb", rule["verbs"]),) if c]
    urls = rule["nonResourceURLs"]
    if not any(u == "*" for u in urls):
        exact = [u for u in urls if not u.endswith("*")]
        parts = [f"{_set(exact)}.contains(context.url)"] if exact else []
        parts.extend(f"context.url like {_like(u)}" for u in urls if u.endswith("*"))
        conds.append(_any(parts))
    return conds


def _glob(pattern: str) -> str | None:
    """None: any path."""
    if pattern in ("*", "/**"):
        return None
    segments = pattern.split("/")[1:]
    stars = [i for i, s in enumerate(segments) if s == "**"]
    if not stars:
        return f"(context.segs == {len(segments)} && context.path like {_like(pattern)})"
    if len(stars) > 1:
        raise NotImplementedError(
            f"path glob {pattern!r}: more than one ** is not translated to Cedar"
        )
    k, m = stars[0], len(segments) - stars[0] - 1
    conds = [f"context.segs >= {k + m}"]
    if k:
        conds.append(f'context.pre["d{k}"] like {_like("/" + "/".join(segments[:k]))}')
    if m:
        conds.append(f'context.suf["d{m}"] like {_like("/" + "/".join(segments[k + 1 :]))}')
    return "(" + " && ".join(conds) + ")"


def _service_rule(rule: dict[str, Any]) -> list[str]:
    conds = [c for c in (_names("method", rule["methods"]),) if c]
    hosts = [h.lower() for h in rule["services"]]
    if "*" not in hosts:
        exact = [h for h in hosts if not h.startswith("*")]
        parts = []
        if exact:
            parts.append(f"{_set(exact)}.contains(context.host)")
            parts.append(f"{_set(exact)}.contains(context.bareHost)")
        parts.extend(f"context.bareHost like {_like(h)}" for h in hosts if h.startswith("*."))
        conds.append(_any(parts))
    globs = [_glob(p) for p in rule["paths"]]
    if all(g is not None for g in globs):
        conds.append(_any([g for g in globs if g is not None]))
    return conds


_RULES = {"resource": _resource_rule, "nonResource": _non_resource_rule, "service": _service_rule}


FAMILIES = ("resource", "nonResource", "service")


def translate(bindings: Sequence[PeerBinding]) -> dict[str, str]:
    """Cedar policy text for one cluster's bindings, one policy set per request family."""
    policies: dict[str, list[str]] = {family: [] for family in FAMILIES}
    for binding in bindings:
        head_id = None
        if len(binding.subjects) == 1 and set(binding.subjects[0]) == {"spiffeId"}:
            head_id = binding.subjects[0]["spiffeId"]
        subject = _any([_subject(s, head_id is not None) for s in binding.subjects])
        principal = f"principal == Workload::{_s(head_id)}" if head_id else "principal"
        for index, rule in enumerate(binding.rules):
            family = rule_family(rule)
            conds = [subject] if subject != "true" else []
            if binding.namespaces is not None:
                conds.append(f"{_set(binding.namespaces)}.contains(context.namespace)")
            conds.extend(_RULES[family](rule))
            effect = "forbid" if binding.deny else "permit"
            when = " when { " + " && ".join(conds) + " }" if conds else ""
            policies[family].append(
                f'@id("{binding.name}#{index}")\n'
                f'{effect} ({principal}, action == Action::"{family}", resource){when};'
            )
    return {family: "\n".join(texts) for family, texts in policies.items()}


def entities_json(principals: Iterable[tuple[str, dict[str, Any]]]) -> str:
    return json.dumps(
        [
            {
                "uid": {"type": "Workload", "id": spiffe_id},
                "attrs": {"claims": dict(claims)},
                "parents": [],
            }
            for spiffe_id, claims in principals
        ]
    )


def _path_context(path: str) -> dict[str, Any]:
    segments = path.split("/")[1:]
    n = len(segments)
    return {
        "path": path,
        "segs": n,
        "pre": {f"d{k}": "/" + "/".join(segments[:k]) for k in range(1, n + 1)},
        "suf": {f"d{m}": "/" + "/".join(segments[n - m :]) for m in range(1, n + 1)},
    }


def cedar_request(spiffe_id: str, request: Request) -> dict[str, Any]:
    principal = {"type": "Workload", "id": spiffe_id}
    context: dict[str, Any]
    if isinstance(request, KubernetesRequest):
        family = "resource"
        context = {
            "namespace": request.namespace,
            "verb": request.verb,
            "apiGroup": request.api_group,
            "resource": request.resource,
            "subresource": request.subresource,
            "name": request.name,
        }
    elif isinstance(request, NonResourceRequest):
        family = "nonResource"
        context = {"namespace": request.namespace, "verb": request.verb, "url": request.path}
    else:
        assert isinstance(request, ServiceRequest)
        family = "service"
        context = {
            "namespace": request.namespace,
            "host": request.host,
            "bareHost": bare_host(request.host),
            "method": request.method,
            **_path_context(plain_path(request.path)),
        }
    action = {"type": "Action", "id": family}
    return {
        "principal": principal,
        "action": action,
        "resource": {"type": "Target", "id": family},
        "context": context,
    }


class CedarPeer:
    """One Cedar policy set per cluster and request family (Cedar evaluates every
    policy of a set, about 0.6 µs each even when the action in its head does not match,
    so the sets are split by the action, as our engine splits a binding's rules by
    family), one entity set for every principal."""

    def __init__(
        self, policies: dict[str, dict[str, str]], principals: Iterable[tuple[str, dict[str, Any]]]
    ) -> None:
        self.policy_counts = {
            cluster: sum(text.count("@id(") for text in texts.values())
            for cluster, texts in policies.items()
        }
        self.policy_sets = {
            (cluster, family): cedarpy.PolicySet.from_str(text)
            for cluster, texts in policies.items()
            for family, text in texts.items()
        }
        self.entities = cedarpy.Entities.from_json_str(entities_json(principals))

    def decide_batch(
        self, cluster: str, family: str, requests: list[dict[str, Any]]
    ) -> list[cedarpy.AuthzResult]:
        """One ``is_authorized_batch`` call; every request must be of ``family``. A result
        with ``diagnostics.errors`` means a policy failed to evaluate and was skipped (a
        faithful translation has none)."""
        return cedarpy.is_authorized_batch(
            requests, self.policy_sets[(cluster, family)], self.entities
        )
