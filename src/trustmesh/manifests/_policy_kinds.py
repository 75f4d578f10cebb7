"""The policy kinds (DESIGN §3): GlobalRole, RoleBinding, PolicyTest."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from trustmesh.common.errors import RequestError
from trustmesh.common.names import PERSON_NAME, PERSON_NAME_RULE
from trustmesh.request import KubernetesRequest, Request, parse_request

from ._errors import Sink
from ._nodes import MapNode, Node, ScalarNode, join
from ._schema import (
    INVALID,
    Checker,
    Field,
    Rule,
    choice,
    duration,
    exclusive,
    list_of,
    obj,
    string,
    string_map,
    type_problem,
)

_VERB = re.compile(r"^(\*|[a-z][a-z0-9-]{0,62})$")
_METHOD = re.compile(r"^(\*|[A-Z][A-Z0-9-]{0,31})$")
_HOST = re.compile(r"^(\*|(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?)$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_PART = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
# a Workload's name, or a template-derived identity's TEMPLATE/CLUSTER/NAMESPACE/SA
_WORKLOAD = re.compile(rf"^{_PART}(/{_PART}/{_PART}/{_PART})?$")
# RFC 3339 date-time: a time zone is required (Z or an offset), fractions allowed
_RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
DEFAULT_MAX_ACCESS_DURATION = 8 * 3600  # seconds: a GlobalRole's default maxAccessDuration
MAX_ACCESS_DURATION = 30 * 86400  # seconds: the longest maxAccessDuration a GlobalRole may set


def _pattern(rule: re.Pattern[str], what: str) -> Any:
    def validate(value: str) -> None:
        if not rule.match(value):
            raise ValueError(f"{value!r} is not a valid {what}")

    return validate


def _path_glob(value: str) -> None:
    if value == "*":
        return
    if not value.startswith("/"):
        raise ValueError(f"path {value!r} must start with / (or be * for any path)")
    for segment in value.split("/")[1:]:
        if "**" in segment and segment != "**":
            raise ValueError(f"path {value!r}: ** must be a whole segment (/**/)")


def _url_pattern(value: str) -> None:
    if not value.startswith("/") and value != "*":
        raise ValueError(
            f"nonResourceURL {value!r} must start with / (a trailing * matches a prefix)"
        )
    if "*" in value[:-1]:
        raise ValueError(f"nonResourceURL {value!r}: * is allowed only at the end")


def _resource(value: str) -> None:
    """RBAC resource names: ``pods``, ``pods/log``, ``*/scale``, ``*``. There is no
    ``pods/*`` in Kubernetes RBAC, so it is refused rather than given a meaning."""
    if value.endswith("/*"):
        raise ValueError(
            f"{value!r}: RBAC has no res/* form; list the subresources (e.g. pods/log) or use */sub"
        )
    if value != "*" and not re.match(r"^(\*|[a-z][a-z0-9.-]*)(/[a-z][a-z0-9.-]*)?$", value):
        raise ValueError(f"{value!r} is not a resource (e.g. pods, pods/log, */scale or *)")


def _person(value: str) -> None:
    if value.startswith("user:"):
        raise ValueError(f"{value!r}: write the person's name without the user: prefix")
    if not PERSON_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid person name ({PERSON_NAME_RULE})")


def parse_rfc3339(value: str) -> float:
    """Epoch seconds of an RFC 3339 timestamp with ``Z`` or an offset; ValueError
    otherwise (no local times: agents in any zone must read the same instant)."""
    if not _RFC3339.match(value):
        raise ValueError(
            f"{value!r} is not an RFC 3339 timestamp with a time zone (e.g. 2026-12-01T03:00:00Z "
            "or 2026-12-01T04:00:00+01:00)"
        )
    text = value[:-1] + "+00:00" if value[-1] in "Zz" else value
    text = text[:10] + "T" + text[11:]
    whole, dot, rest = text.partition(".")
    if dot:  # fromisoformat takes at most 6 fraction digits
        digits = rest[: len(rest) - 6]
        text = f"{whole}.{(digits + '000000')[:6]}{rest[len(digits) :]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"{value!r} is not a valid date and time") from None


def timestamp(node: Node, path: str, sink: Sink) -> Any:
    """An RFC 3339 timestamp, kept as written (a YAML timestamp left unquoted is read
    from its source text, so ``expiresAt: 2026-12-01T03:00:00Z`` works quoted or not)."""
    if not isinstance(node, ScalarNode) or not (
        isinstance(node.value, str) or hasattr(node.value, "year")
    ):
        return type_problem(node, path, sink, "an RFC 3339 timestamp (2026-12-01T03:00:00Z)")
    text = node.value if isinstance(node.value, str) else node.raw.strip("'\"")
    try:
        parse_rfc3339(text)
    except ValueError as exc:
        sink.add(node.line, path, str(exc))
        return INVALID
    return text


def _access_duration(node: Node, path: str, sink: Sink) -> Any:
    """maxTokenTTL's duration syntax (``30m``, ``8h``, ``2d``), > 0 and at most 30 days."""
    return duration(1, MAX_ACCESS_DURATION)(node, path, sink)


def strings(*validators: Any) -> Checker:
    return list_of(string(*validators), min_items=1)


def _one_rule_family(node: MapNode, result: dict[str, Any], path: str, sink: Sink) -> bool:
    """A rule is a Kubernetes resource rule, a non-resource rule or a service rule."""
    has = set(result) | set(node.entries)
    families = {
        "resource": {"apiGroups", "resources", "resourceNames"} & has,
        "nonResource": {"nonResourceURLs"} & has,
        "service": {"services", "paths", "methods", "pathCase"} & has,
    }
    present = [name for name, fields in families.items() if fields]
    if "pathCase" in has and present != ["service"]:
        sink.add(
            node.entries["pathCase"].line if "pathCase" in node.entries else node.line,
            join(path, "pathCase"),
            "pathCase applies to service rules only (services+paths+methods)",
        )
        return False
    if len(present) != 1:
        sink.add(
            node.line,
            path,
            "a rule is exactly one of: apiGroups+resources+verbs (optional resourceNames), "
            "nonResourceURLs+verbs, or services+paths+methods",
        )
        return False
    needed = {
        "resource": ("apiGroups", "resources", "verbs"),
        "nonResource": ("nonResourceURLs", "verbs"),
        "service": ("services", "paths", "methods"),
    }[present[0]]
    ok = True
    for name in needed:
        if name not in node.entries:
            sink.add(
                node.line, join(path, name), f"required field is missing in a {present[0]} rule"
            )
            ok = False
    if present[0] == "service" and "verbs" in node.entries:
        sink.add(
            node.entries["verbs"].line, join(path, "verbs"), "a service rule has methods, not verbs"
        )
        ok = False
    return ok


RULE = obj(
    Field("apiGroups", list_of(string(allow_empty=True), min_items=1)),
    Field("resources", strings(_resource)),
    Field("resourceNames", strings()),
    Field("nonResourceURLs", strings(_url_pattern)),
    Field("verbs", strings(_pattern(_VERB, "verb (lowercase, or *)"))),
    # What canonical requests can never carry (a port, the cluster domain, a refused
    # path) is refused when the policy is checked as a whole (policy/compiler.py
    # check_policy): stored versions from before keep loading.
    Field("services", strings(_pattern(_HOST, "service host (name, *.suffix or *)"))),
    Field("paths", strings(_path_glob)),
    Field("methods", strings(_pattern(_METHOD, "HTTP method (uppercase, or *)"))),
    Field("pathCase", string(choice("sensitive", "insensitive"))),
    rules=(_one_rule_family,),
)


@dataclass(frozen=True)
class PolicyRule:
    """One rule, canonical: absent lists are empty tuples."""

    api_groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    path_case: str = "sensitive"  # or "insensitive", for upstreams that fold case

    @property
    def family(self) -> str:
        if self.services:
            return "service"
        if self.non_resource_urls:
            return "nonResource"
        return "resource"

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> PolicyRule:
        return cls(
            api_groups=tuple(body.get("apiGroups", ())),
            resources=tuple(body.get("resources", ())),
            resource_names=tuple(body.get("resourceNames", ())),
            non_resource_urls=tuple(body.get("nonResourceURLs", ())),
            verbs=tuple(body.get("verbs", ())),
            services=tuple(body.get("services", ())),
            paths=tuple(body.get("paths", ())),
            methods=tuple(body.get("methods", ())),
            path_case=body.get("pathCase", "sensitive"),
        )


@dataclass(frozen=True)
class GlobalRoleSpec:
    rules: tuple[PolicyRule, ...]
    include: tuple[str, ...]
    # seconds: the longest access request for this role may be granted for
    max_access_duration: int = DEFAULT_MAX_ACCESS_DURATION


# maxAccessDuration has no default in the canonical body (a stored role without it
# keeps its policy hash); build_global_role fills the default in.
GLOBAL_ROLE_SPEC = obj(
    Field("rules", list_of(RULE), default=list),
    Field("include", list_of(string(_pattern(_NAME, "role name"))), default=list),
    Field("maxAccessDuration", _access_duration),
)


def build_global_role(spec: dict[str, Any]) -> GlobalRoleSpec:
    return GlobalRoleSpec(
        rules=tuple(PolicyRule.from_body(r) for r in spec["rules"]),
        include=tuple(spec["include"]),
        max_access_duration=spec.get("maxAccessDuration", DEFAULT_MAX_ACCESS_DURATION),
    )


# --- selectors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Expression:
    """A Kubernetes label-selector requirement."""

    key: str
    operator: str
    values: tuple[str, ...]


def _values_fit_operator(node: MapNode, result: dict[str, Any], path: str, sink: Sink) -> bool:
    operator = result.get("operator")
    values = result.get("values", [])
    if operator in ("In", "NotIn") and not values:
        sink.add(node.line, join(path, "values"), f"operator {operator} needs at least one value")
        return False
    if operator in ("Exists", "DoesNotExist") and values:
        sink.add(node.line, join(path, "values"), f"operator {operator} takes no values")
        return False
    return True


EXPRESSION = obj(
    Field("key", string(), required=True),
    Field("operator", string(choice("In", "NotIn", "Exists", "DoesNotExist")), required=True),
    Field("values", list_of(string(allow_empty=True)), default=list),
    rules=(_values_fit_operator,),
)


def _expressions(body: list[dict[str, Any]]) -> tuple[Expression, ...]:
    return tuple(Expression(e["key"], e["operator"], tuple(e["values"])) for e in body)


@dataclass(frozen=True)
class SubjectSpec:
    """All given conditions must hold. ``user``: a person (exclusive with the rest, which
    name workloads)."""

    spiffe_id: str | None
    workload: str | None
    claims: dict[str, str]
    match_expressions: tuple[Expression, ...]
    user: str | None = None


_WORKLOAD_CONDITIONS = ("spiffeId", "workload", "claims", "matchExpressions")


def _user_alone(node: MapNode, result: dict[str, Any], path: str, sink: Sink) -> bool:
    if "user" not in node.entries:
        return True
    others = [name for name in node.entries if name in _WORKLOAD_CONDITIONS]
    for other in others:
        sink.add(
            node.entries[other].line,
            join(path, other),
            f"'user' and {other!r} are mutually exclusive: a user subject names a person, "
            "the other fields name workloads",
        )
    return not others


def _some_condition(node: MapNode, result: dict[str, Any], path: str, sink: Sink) -> bool:
    if not ({"user", *_WORKLOAD_CONDITIONS} & set(node.entries)):
        sink.add(
            node.line, path, "a subject needs user, spiffeId, workload, claims or matchExpressions"
        )
        return False
    if "claims" in result and not result["claims"]:
        sink.add(node.line, join(path, "claims"), "claims must list at least one claim")
        return False
    return True


def _spiffe(value: str) -> None:
    from trustmesh.spiffeid import parse_spiffe_id

    parse_spiffe_id(value)


def _spiffe_or_pattern(value: str) -> None:
    """One SPIFFE ID, or a pattern of one trust domain: ``*`` is one path segment,
    ``**`` any number (``spiffe://partner.example/**``; DESIGN §9)."""
    from trustmesh.spiffeid import is_spiffe_id_pattern, parse_spiffe_id, parse_spiffe_id_pattern

    if is_spiffe_id_pattern(value):
        parse_spiffe_id_pattern(value)
    else:
        parse_spiffe_id(value)


SUBJECT = obj(
    Field("spiffeId", string(_spiffe_or_pattern)),
    Field("workload", string(_pattern(_WORKLOAD, "workload name"))),
    Field("claims", string_map()),
    Field("matchExpressions", list_of(EXPRESSION)),
    Field("user", string(_person)),
    rules=(_user_alone, exclusive("spiffeId", "workload"), _some_condition),
)


def build_subject(body: dict[str, Any]) -> SubjectSpec:
    return SubjectSpec(
        spiffe_id=body.get("spiffeId"),
        workload=body.get("workload"),
        claims=dict(body.get("claims", {})),
        match_expressions=_expressions(body.get("matchExpressions", [])),
        user=body.get("user"),
    )


@dataclass(frozen=True)
class ClusterScope:
    names: tuple[str, ...]
    match_labels: dict[str, str]
    match_expressions: tuple[Expression, ...]
    has_selector: bool


CLUSTER_FIELDS = (
    Field("names", strings(_pattern(_NAME, "cluster name"))),
    Field(
        "selector",
        obj(Field("matchLabels", string_map()), Field("matchExpressions", list_of(EXPRESSION))),
    ),
)
CLUSTERS = obj(*CLUSTER_FIELDS)


def build_cluster_scope(clusters: dict[str, Any]) -> ClusterScope:
    selector = clusters.get("selector") or {}
    return ClusterScope(
        names=tuple(clusters.get("names", ())),
        match_labels=dict(selector.get("matchLabels", {})),
        match_expressions=_expressions(selector.get("matchExpressions", [])),
        has_selector="selector" in clusters,
    )


@dataclass(frozen=True)
class RoleBindingSpec:
    role: str
    effect: str
    subjects: tuple[SubjectSpec, ...]
    clusters: ClusterScope | None
    namespaces: tuple[str, ...] | None
    # epoch seconds of expiresAt (as written in the manifest: expires_at_text)
    expires_at: float | None = None
    expires_at_text: str | None = None


ROLE_BINDING_SPEC = obj(
    Field("role", string(_pattern(_NAME, "role name")), required=True),
    Field("effect", string(choice("allow", "deny")), default=lambda: "allow"),
    Field("subjects", list_of(SUBJECT, min_items=1), required=True),
    Field("clusters", CLUSTERS),
    Field("namespaces", strings(_pattern(_NAME, "namespace"))),
    Field("expiresAt", timestamp),
)


def build_role_binding(spec: dict[str, Any]) -> RoleBindingSpec:
    clusters = spec.get("clusters")
    scope = build_cluster_scope(clusters) if clusters is not None else None
    namespaces = spec.get("namespaces")
    return RoleBindingSpec(
        role=spec["role"],
        effect=spec["effect"],
        subjects=tuple(build_subject(s) for s in spec["subjects"]),
        clusters=scope,
        namespaces=tuple(namespaces) if namespaces is not None else None,
        expires_at=parse_rfc3339(spec["expiresAt"]) if "expiresAt" in spec else None,
        expires_at_text=spec.get("expiresAt"),
    )


# --- PolicyTest --------------------------------------------------------------------------


def _request(node: Node, path: str, sink: Sink) -> Any:
    from ._nodes import to_python

    if not isinstance(node, MapNode):
        return type_problem(node, path, sink, "a mapping")
    value = to_python(node)
    try:
        parse_request(value)
    except RequestError as exc:
        sink.add(
            node.line,
            path,
            str(exc).replace("request.", "field ", 1)
            if str(exc).startswith("request.")
            else str(exc),
        )
        return INVALID
    return value


@dataclass(frozen=True)
class TestSubject:
    workload: str | None
    spiffe_id: str | None
    claims: dict[str, str]
    user: str | None = None  # a person (Kubernetes requests only)


@dataclass(frozen=True)
class PolicyTestCase:
    name: str
    subject: TestSubject
    cluster: str
    request: Request
    expect: str


@dataclass(frozen=True)
class PolicyTestSpec:
    cases: tuple[PolicyTestCase, ...]


def _workload_or_claims(node: MapNode, result: dict[str, Any], path: str, sink: Sink) -> bool:
    if not ({"workload", "claims", "user"} & set(node.entries)):
        sink.add(
            node.line,
            path,
            "a test subject needs workload, user, or claims (with an optional spiffeId)",
        )
        return False
    return True


def _test_user_alone(node: MapNode, result: dict[str, Any], path: str, sink: Sink) -> bool:
    if "user" not in node.entries:
        return True
    others = [name for name in node.entries if name in ("workload", "spiffeId", "claims")]
    for other in others:
        sink.add(
            node.entries[other].line,
            join(path, other),
            f"'user' and {other!r} are mutually exclusive: a test subject is a person or a workload",
        )
    return not others


def _people_ask_kubernetes(node: MapNode, result: dict[str, Any], path: str, sink: Sink) -> bool:
    """People reach a cluster only through its Kubernetes API server."""
    subject, request = result.get("subject"), result.get("request")
    if not isinstance(subject, dict) or "user" not in subject or not isinstance(request, dict):
        return True
    if isinstance(parse_request(request), KubernetesRequest):
        return True
    where = node.entries.get("request", node)
    sink.add(
        where.line,
        join(path, "request"),
        "a case with a user subject asks a Kubernetes request (people reach a cluster only "
        "through its API server)",
    )
    return False


TEST_CASE = obj(
    Field("name", string()),
    Field(
        "subject",
        obj(
            Field("workload", string(_pattern(_WORKLOAD, "workload name"))),
            Field("spiffeId", string(_spiffe)),
            Field("claims", string_map()),
            Field("user", string(_person)),
            rules=(
                _test_user_alone,
                exclusive("workload", "claims"),
                exclusive("workload", "spiffeId"),
                _workload_or_claims,
            ),
        ),
        required=True,
    ),
    Field("cluster", string(_pattern(_NAME, "cluster name")), required=True),
    Field("request", _request, required=True),
    Field("expect", string(choice("allow", "deny")), required=True),
    rules=(_people_ask_kubernetes,),
)

POLICY_TEST_SPEC = obj(Field("cases", list_of(TEST_CASE, min_items=1), required=True))


def build_policy_test(spec: dict[str, Any]) -> PolicyTestSpec:
    cases = []
    for index, case in enumerate(spec["cases"]):
        subject = case["subject"]
        cases.append(
            PolicyTestCase(
                name=case.get("name") or f"case {index + 1}",
                subject=TestSubject(
                    workload=subject.get("workload"),
                    spiffe_id=subject.get("spiffeId"),
                    claims=dict(subject.get("claims", {})),
                    user=subject.get("user"),
                ),
                cluster=case["cluster"],
                request=parse_request(case["request"]),
                expect=case["expect"],
            )
        )
    return PolicyTestSpec(cases=tuple(cases))


__all__ = [
    "DEFAULT_MAX_ACCESS_DURATION",
    "GLOBAL_ROLE_SPEC",
    "MAX_ACCESS_DURATION",
    "POLICY_TEST_SPEC",
    "ROLE_BINDING_SPEC",
    "ClusterScope",
    "Expression",
    "GlobalRoleSpec",
    "PolicyRule",
    "PolicyTestCase",
    "PolicyTestSpec",
    "RoleBindingSpec",
    "Rule",
    "SubjectSpec",
    "TestSubject",
    "build_global_role",
    "build_policy_test",
    "build_role_binding",
    "parse_rfc3339",
]
