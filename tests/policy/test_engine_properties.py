"""Property tests for the policy engine (DESIGN §3) on random small policies.

Policies are generated as manifest specs and compiled by the production compiler
(``compile_bundle``), so the engine sees bundles shaped exactly as agents receive
them. Checked: (a) a deny binding that matches and covers the request wins over any
allow; (b) without a matching allow nothing is allowed, and adding an allow never
takes an allow away nor a deny grant one; (c) path globs (``*`` one segment, ``**``
any number) against a segment-by-segment matcher written here; (d) every decision
agrees with a naive reference evaluator written here from the spec alone (every
binding, every subject, every rule; no index, no memo, no regex; no code shared with
``trustmesh.policy``), and does not depend on what the engine decided before.

Requests go through ``parse_request`` (canonical, DESIGN §3); what the engine adds for
its cluster — the cluster domain, short hosts expanded in a known namespace, every
reading of an ambiguous short host with deny winning — the reference does from the
spec (:func:`ref_readings`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_fixtures import registry

from trustmesh.manifests import (
    ClusterScope,
    Expression,
    GlobalRoleSpec,
    PolicyRule,
    RoleBindingSpec,
    SubjectSpec,
)
from trustmesh.policy.compiler import PolicySet, compile_bundle
from trustmesh.policy.engine import Decision, Engine
from trustmesh.policy.matching import compile_path_glob
from trustmesh.request import (
    KubernetesRequest,
    NonResourceRequest,
    Request,
    ServiceRequest,
    parse_request,
)

# Each scenario example costs hypothesis ~10 ms to draw: the two central properties get
# 200 examples, the ones (d) mostly implies get 100, so the file runs in seconds.
FAST = settings(max_examples=200, deadline=None)
QUICK = settings(max_examples=100, deadline=None)

REGISTRY = registry()
REVISION = 7
# Written out by hand (DESIGN §2 layout), not taken from the registry under test.
PAYMENTS = "spiffe://corp.example/cluster/prod-eu/ns/shop/sa/payments"
CI = "spiffe://corp.example/cluster/dev-us/ns/build/sa/ci"
STRANGER = "spiffe://corp.example/somewhere/else"
WORKLOAD_IDS = {"payments": PAYMENTS, "ci": CI}
CLUSTER_LABELS = {
    "prod-eu": {"environment": "prod", "region": "eu"},
    "dev-us": {"environment": "dev", "region": "us"},
}

CLAIM_KEYS = ("project", "tier", "env")
CLAIM_VALUES = ("a", "b", "shop")  # project: shop is registered (the index weighs it)
# What a token may carry: strings, but also null, a number and a list (unhashable).
TOKEN_VALUES = st.sampled_from(("a", "b", "shop", None, 7)) | st.just(["a"])


# Strategies are module constants where they can be: building them afresh inside
# every draw is what makes hypothesis slow.


def subset(items: tuple[str, ...], min_size: int = 1) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(
        st.sampled_from(items), min_size=min_size, max_size=len(items), unique=True
    ).map(tuple)


def expressions(keys: tuple[str, ...], values: tuple[str, ...]) -> st.SearchStrategy[Expression]:
    """Label-selector requirements as the manifest schema allows them: In and NotIn
    with values, Exists and DoesNotExist without."""
    key = st.sampled_from(keys)
    return st.builds(Expression, key, st.sampled_from(("In", "NotIn")), subset(values)) | st.builds(
        Expression, key, st.sampled_from(("Exists", "DoesNotExist")), st.just(())
    )


# --- policies ------------------------------------------------------------------------

CLAIM_EXPRESSIONS = st.lists(expressions(CLAIM_KEYS, CLAIM_VALUES), max_size=2).map(tuple)
SUBJECT_CLAIMS = st.dictionaries(
    st.sampled_from(CLAIM_KEYS), st.sampled_from(CLAIM_VALUES), max_size=2
)
SUBJECTS = (
    st.builds(
        SubjectSpec,
        st.sampled_from((PAYMENTS, CI, STRANGER)),
        st.none(),
        SUBJECT_CLAIMS,
        CLAIM_EXPRESSIONS,
    )
    | st.builds(
        SubjectSpec,
        st.none(),
        st.sampled_from(tuple(WORKLOAD_IDS)),
        SUBJECT_CLAIMS,
        CLAIM_EXPRESSIONS,
    )
    # By claims alone: at least one condition, as the schema requires.
    | st.builds(
        SubjectSpec,
        st.none(),
        st.none(),
        st.dictionaries(
            st.sampled_from(CLAIM_KEYS), st.sampled_from(CLAIM_VALUES), min_size=1, max_size=2
        ),
        CLAIM_EXPRESSIONS,
    )
    | st.builds(
        SubjectSpec,
        st.none(),
        st.none(),
        st.just({}),
        st.lists(expressions(CLAIM_KEYS, CLAIM_VALUES), min_size=1, max_size=2).map(tuple),
    )
)

RULE_RESOURCES = ("pods", "deployments", "pods/log", "deployments/scale", "*/scale", "*")
RULE_VERBS = ("get", "list", "*")
URL_PATTERNS = ("/healthz", "/healthz*", "/healthz/*", "/metrics", "/api/*", "*")
HOST_PATTERNS = (
    "api.shop.svc",
    "*.shop.svc",
    "*.svc",
    "web.build.svc",
    "api.shop",  # an external name, or api in shop: matched as written
    "api",
    "*",
)
GLOB_SEGMENTS = ("a", "b", "*", "**", "a*", "*b", "a*b", "a.b", "(", "[x]", "A")
# Canonical segments only (an empty one, "//", is refused before any engine).
PATH_SEGMENTS = ("a", "b", "ab", "aab", "a.b", "axb", "x", "(", "[x]", "A", "%41", "%5Bx%5D")

PATH_GLOBS = st.just("*") | st.lists(st.sampled_from(GLOB_SEGMENTS), max_size=4).map(
    lambda segments: "/" + "/".join(segments)
)
PATHS = st.builds(
    lambda segments, slash: "/" + "/".join(segments) + (slash if segments else ""),
    st.lists(st.sampled_from(PATH_SEGMENTS), max_size=5),
    st.sampled_from(("", "", "/")),
)

RESOURCE_RULES = st.builds(
    lambda groups, resources, verbs, names: PolicyRule(
        api_groups=groups, resources=resources, verbs=verbs, resource_names=names
    ),
    subset(("", "apps", "*")),
    subset(RULE_RESOURCES),
    subset(RULE_VERBS),
    st.just(()) | subset(("x", "y")),
)
NON_RESOURCE_RULES = st.builds(
    lambda urls, verbs: PolicyRule(non_resource_urls=urls, verbs=verbs),
    subset(URL_PATTERNS),
    subset(RULE_VERBS),
)
SERVICE_RULES = st.builds(
    lambda hosts, globs, methods, case: PolicyRule(
        services=hosts, paths=globs, methods=methods, path_case=case
    ),
    subset(HOST_PATTERNS),
    st.lists(PATH_GLOBS, min_size=1, max_size=2, unique=True).map(tuple),
    subset(("GET", "POST", "*")),
    st.sampled_from(("sensitive", "sensitive", "insensitive")),
)
RULE_LISTS = st.lists(
    RESOURCE_RULES | NON_RESOURCE_RULES | SERVICE_RULES, min_size=1, max_size=3
).map(tuple)

CLUSTER_NAMES = tuple(CLUSTER_LABELS)
CLUSTER_SCOPES = (
    st.none()
    | st.builds(ClusterScope, subset(CLUSTER_NAMES), st.just({}), st.just(()), st.just(False))
    | st.builds(
        ClusterScope,
        subset(CLUSTER_NAMES, min_size=0),
        st.dictionaries(
            st.sampled_from(("environment", "region")),
            st.sampled_from(("prod", "dev", "eu", "us")),
            max_size=1,
        ),
        st.lists(
            expressions(("environment", "region", "tier"), ("prod", "dev", "eu")), max_size=1
        ).map(tuple),
        st.just(True),
    )
)
ROLE_NAMES = ("r0", "r1", "r2")
# Roles include only roles after them, so includes never form a cycle.
INCLUDES = {
    i: st.lists(st.sampled_from(ROLE_NAMES[i + 1 :]), unique=True).map(tuple)
    for i in range(len(ROLE_NAMES) - 1)
}
BINDINGS = st.lists(
    st.builds(
        RoleBindingSpec,
        role=st.sampled_from(ROLE_NAMES),
        effect=st.sampled_from(("allow", "deny")),
        subjects=st.lists(SUBJECTS, min_size=1, max_size=2).map(tuple),
        clusters=CLUSTER_SCOPES,
        namespaces=st.none() | subset(("shop", "build")),
    ),
    min_size=1,
    max_size=4,
)


@st.composite
def policies(draw: st.DrawFn) -> PolicySet:
    roles = {
        name: GlobalRoleSpec(
            rules=draw(RULE_LISTS), include=draw(INCLUDES[i]) if i in INCLUDES else ()
        )
        for i, name in enumerate(ROLE_NAMES)
    }
    bindings = {f"b{i}": binding for i, binding in enumerate(draw(BINDINGS))}
    return PolicySet(roles=roles, bindings=bindings)


# --- identities and requests ----------------------------------------------------------

Identity = tuple[str, dict[str, Any]]

IDENTITIES: st.SearchStrategy[Identity] = st.tuples(
    st.sampled_from((PAYMENTS, CI, STRANGER)),
    st.dictionaries(st.sampled_from(CLAIM_KEYS), TOKEN_VALUES, max_size=3),
)


def variant(identity: Identity, change: tuple[str, str, Any]) -> Identity:
    """The same SPIFFE ID with one claim left out, set to null, or set to another
    value: what a per-identity memo must tell apart."""
    spiffe_id, claims = identity
    how, key, value = change
    claims = dict(claims)
    if how == "drop":
        claims.pop(key, None)
    else:
        claims[key] = None if how == "null" else value
    return spiffe_id, claims


CHANGES = st.tuples(
    st.sampled_from(("drop", "null", "set")), st.sampled_from(CLAIM_KEYS), TOKEN_VALUES
)

KUBERNETES_REQUESTS = st.fixed_dictionaries(
    {
        "verb": st.sampled_from(("get", "list", "delete")),
        "apiGroup": st.sampled_from(("", "apps", "batch")),
        "resource": st.sampled_from(("pods", "deployments", "secrets")),
        "subresource": st.sampled_from(("", "log", "scale")),
        "name": st.sampled_from(("", "x", "y")),
        "namespace": st.sampled_from(("", "shop", "build")),
    }
)
NON_RESOURCE_REQUESTS = st.fixed_dictionaries(
    {
        "verb": st.sampled_from(("get", "list", "delete")),
        "nonResourceURL": st.sampled_from(
            ("/healthz", "/healthz/ready", "/healthzx", "/metrics", "/api", "/api/v1", "/")
        ),
    }
)
SERVICE_REQUESTS = st.fixed_dictionaries(
    {
        "host": st.sampled_from(
            (
                "api.shop.svc",
                "API.Shop.svc",
                "api.shop.svc:8080",
                "api.shop.svc.",
                "api.shop.svc.cluster.local",
                "api.shop.svc.cluster.local.:443",
                "api.shop.svc.other.local",
                "x.api.shop.svc",
                "shop.svc",
                "web.build.svc:8080",
                "evil.example",
                "api.shop",
                "api",
                "web",
            )
        ),
        "path": st.builds(lambda p, q: p + q, PATHS, st.sampled_from(("", "?q=1", "?/a/b"))),
        "method": st.sampled_from(("GET", "post", "DELETE")),
        "namespace": st.sampled_from(("", "shop")),
    }
)
REQUESTS: st.SearchStrategy[Request] = (
    KUBERNETES_REQUESTS | NON_RESOURCE_REQUESTS | SERVICE_REQUESTS
).map(parse_request)


def identity_near(draw: st.DrawFn, subject: SubjectSpec) -> Identity:
    """An identity that a subject (nearly) names: its SPIFFE ID, its claims, and
    claims that meet its expressions (expressions that contradict each other, or a
    later random change, can still make it miss)."""
    spiffe_id = (
        WORKLOAD_IDS[subject.workload]
        if subject.workload
        else subject.spiffe_id or draw(st.sampled_from((PAYMENTS, CI, STRANGER)))
    )
    claims: dict[str, Any] = {**draw(IDENTITIES)[1], **subject.claims}
    for e in subject.match_expressions:
        if e.operator == "In":
            claims[e.key] = draw(st.sampled_from(e.values))
        elif e.operator == "NotIn" and claims.get(e.key) in e.values:
            claims[e.key] = draw(TOKEN_VALUES)
        elif e.operator == "Exists":
            claims.setdefault(e.key, draw(TOKEN_VALUES))
        elif e.operator == "DoesNotExist":
            claims.pop(e.key, None)
    return spiffe_id, claims


def _pick(draw: st.DrawFn, listed: tuple[str, ...], anything: tuple[str, ...]) -> str:
    value = draw(st.sampled_from(listed))
    return draw(st.sampled_from(anything)) if value == "*" else value


def _path_near(draw: st.DrawFn, glob: str) -> str:
    if glob == "*":
        return draw(PATHS)
    segments: list[str] = []
    for segment in glob.split("/")[1:]:
        if segment == "**":
            segments.extend(draw(st.lists(st.sampled_from(PATH_SEGMENTS), max_size=2)))
        else:
            segments.append(
                "".join(
                    part
                    + (draw(st.sampled_from(("", "a", "zz"))) if i < segment.count("*") else "")
                    for i, part in enumerate(segment.split("*"))
                )
            )
    # Only the last segment may be empty (a trailing /): "//" is refused before any engine.
    segments = [seg or "x" for seg in segments[:-1]] + segments[-1:]
    return "/" + "/".join(segments)


def _host_near(draw: st.DrawFn, pattern: str) -> str:
    if pattern == "*":
        return draw(st.sampled_from(("api.shop.svc", "evil.example:8080", "api")))
    name = pattern
    if name.startswith("*."):
        name = draw(st.sampled_from(("x", "a.b", ""))) + name[1:]
        name = name.lstrip(".")
    port = draw(st.sampled_from((None, "8080")))
    dot = draw(st.sampled_from(("", ".")))
    return f"{name}{dot}:{port}" if port else name + dot


def request_near(draw: st.DrawFn, rule: PolicyRule, namespaces: tuple[str, ...] = ()) -> Request:
    """A request that a rule (nearly) covers: each field taken from what the rule
    lists, a wildcard replaced by something concrete; most often in one of
    ``namespaces`` (a binding's) when there are any."""
    if rule.services:
        glob = draw(st.sampled_from(rule.paths))
        return parse_request(
            {
                "host": _host_near(draw, draw(st.sampled_from(rule.services))),
                "path": _path_near(draw, glob) + draw(st.sampled_from(("", "?q=1"))),
                "method": _pick(draw, rule.methods, ("GET", "POST", "DELETE")),
                "namespace": draw(st.sampled_from((*namespaces, *namespaces, "", "shop"))),
            }
        )
    if rule.non_resource_urls:
        url = draw(st.sampled_from(rule.non_resource_urls))
        if url.endswith("*"):
            url = url[:-1] + draw(
                st.sampled_from(("", "x", "ready" if url.endswith("/*") else "/ready"))
            )
        return parse_request(
            {
                "verb": _pick(draw, rule.verbs, ("get", "delete")),
                "nonResourceURL": url if url.startswith("/") else "/" + url,
            }
        )
    resource = draw(st.sampled_from(rule.resources))
    if resource == "*":
        resource += draw(st.sampled_from(("", "/log", "/scale")))
    name, _, subresource = resource.partition("/")
    return parse_request(
        {
            "verb": _pick(draw, rule.verbs, ("get", "list", "delete")),
            "apiGroup": _pick(draw, rule.api_groups, ("", "apps", "batch")),
            "resource": draw(st.sampled_from(("pods", "secrets"))) if name == "*" else name,
            "subresource": subresource,
            "name": _pick(draw, rule.resource_names or ("*",), ("", "x", "y")),
            "namespace": draw(st.sampled_from((*namespaces, *namespaces, "", "shop", "build"))),
        }
    )


@dataclass(frozen=True)
class Scenario:
    policy: PolicySet
    cluster: str
    queries: list[tuple[Identity, Request]]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """A policy, a cluster, and queries in the order an agent decides them: random
    ones, ones built near the policy's subjects and rules (so that bindings do match
    and boundaries get probed), and variants of earlier identities (same SPIFFE ID,
    one claim changed, nulled or dropped)."""
    policy = draw(policies())
    bindings = list(policy.bindings.values())  # at least one; every role has rules
    out: list[tuple[Identity, Request]] = []
    for _ in range(draw(st.integers(1, 8))):
        how = draw(st.sampled_from(("random", "near", "near", "variant")))
        if how == "variant" and out:
            # An earlier identity with one claim changed, asking the same again or
            # something else: the memo must not hand it the earlier identity's bindings.
            earlier, request = draw(st.sampled_from(out))
            identity = variant(earlier, draw(CHANGES))
            if draw(st.booleans()):
                request = draw(REQUESTS)
            out.append((identity, request))
            continue
        binding = draw(st.sampled_from(bindings))
        if how == "near":
            identity = identity_near(draw, draw(st.sampled_from(binding.subjects)))
        else:
            identity = draw(IDENTITIES)
        rules = ref_rules(policy, binding.role)
        if draw(st.integers(0, 3)):
            request = request_near(draw, draw(st.sampled_from(rules)), binding.namespaces or ())
        else:
            request = draw(REQUESTS)
        out.append((identity, request))
    return Scenario(policy, draw(st.sampled_from(CLUSTER_NAMES)), out)


SCENARIOS = scenarios()


# --- the naive reference evaluator ----------------------------------------------------


def ref_requirement(
    key: str, operator: str, values: tuple[str, ...], labels: Mapping[str, Any]
) -> bool:
    """A Kubernetes label-selector requirement; a claim that is not a string is never
    one of the (string) values."""
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    inside = key in labels and isinstance(labels[key], str) and labels[key] in values
    return inside if operator == "In" else not inside


def ref_subject(subject: SubjectSpec, spiffe_id: str, claims: Mapping[str, Any]) -> bool:
    wanted = WORKLOAD_IDS[subject.workload] if subject.workload else subject.spiffe_id
    if wanted is not None and wanted != spiffe_id:
        return False
    for key, value in subject.claims.items():
        if key not in claims or claims[key] != value:
            return False
    return all(
        ref_requirement(e.key, e.operator, e.values, claims) for e in subject.match_expressions
    )


def ref_cluster(scope: ClusterScope | None, cluster: str) -> bool:
    if scope is None or cluster in scope.names:
        return True
    if not scope.has_selector:
        return False
    labels = CLUSTER_LABELS[cluster]
    for key, value in scope.match_labels.items():
        if labels.get(key) != value:
            return False
    return all(
        ref_requirement(e.key, e.operator, e.values, labels) for e in scope.match_expressions
    )


def ref_segment(pattern: str, text: str) -> bool:
    """One path segment against one glob segment: ``*`` is any run of characters."""
    if not pattern:
        return not text
    if pattern[0] == "*":
        return any(ref_segment(pattern[1:], text[i:]) for i in range(len(text) + 1))
    return bool(text) and text[0] == pattern[0] and ref_segment(pattern[1:], text[1:])


def ref_glob(pattern: str, path: str) -> bool:
    """``*`` alone: any path; else segment by segment, ``**`` standing for any number
    of whole segments (zero included)."""
    if pattern == "*":
        return True
    globs = pattern.split("/")[1:]
    segments = path.split("/")[1:]

    def match(i: int, j: int) -> bool:
        if i == len(globs):
            return j == len(segments)
        if globs[i] == "**":
            return any(match(i + 1, k) for k in range(j, len(segments) + 1))
        return j < len(segments) and ref_segment(globs[i], segments[j]) and match(i + 1, j + 1)

    return match(0, 0)


def ref_host(pattern: str, host: str) -> bool:
    """Exact, ``*.suffix`` (any name below the suffix) or ``*``."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def ref_path(path: str, fold: bool) -> str:
    """What globs see: fully percent-decoded, case-folded for ``pathCase: insensitive``."""
    path = unquote(path)
    return path.casefold() if fold else path


def ref_rule(rule: PolicyRule, request: Request) -> bool:
    if rule.services:
        if not isinstance(request, ServiceRequest):
            return False
        fold = rule.path_case == "insensitive"
        return (
            ("*" in rule.methods or request.method in rule.methods)
            and any(ref_host(h, request.host) for h in rule.services)
            and any(
                ref_glob(ref_path(p, fold), ref_path(request.path, fold)) if p != "*" else True
                for p in rule.paths
            )
        )
    if rule.non_resource_urls:
        if not isinstance(request, NonResourceRequest):
            return False
        return ("*" in rule.verbs or request.verb in rule.verbs) and any(
            url == request.path or (url.endswith("*") and request.path.startswith(url[:-1]))
            for url in rule.non_resource_urls
        )
    if not isinstance(request, KubernetesRequest):
        return False
    if "*" not in rule.verbs and request.verb not in rule.verbs:
        return False
    if "*" not in rule.api_groups and request.api_group not in rule.api_groups:
        return False
    if "*" not in rule.resources:
        if request.subresource:
            sub = request.subresource
            if (
                f"{request.resource}/{sub}" not in rule.resources
                and f"*/{sub}" not in rule.resources
            ):
                return False
        elif request.resource not in rule.resources:
            return False
    return not rule.resource_names or request.name in rule.resource_names


def ref_rules(policy: PolicySet, role: str) -> list[PolicyRule]:
    spec = policy.roles[role]
    rules = list(spec.rules)
    for included in spec.include:
        rules.extend(ref_rules(policy, included))
    return rules


@dataclass(frozen=True)
class Expected:
    allowed: bool
    denied: bool
    bindings: frozenset[str]


def ref_resolve(request: Request) -> Request:
    """DESIGN §3 on a parsed request, for the fixture clusters (cluster.local): the
    cluster domain removed, a short host expanded in a known namespace, the namespace
    of a service host."""
    if not isinstance(request, ServiceRequest):
        return request
    host, namespace = request.host, request.namespace
    labels = host.split(".")
    if host.endswith(".svc.cluster.local") and len(labels) > 4:
        labels = labels[:-2]
    if namespace and len(labels) <= 2:
        labels = [*labels, "svc"] if len(labels) == 2 else [labels[0], namespace, "svc"]
    if not namespace and len(labels) >= 3 and labels[-1] == "svc":
        namespace = labels[-2]
    return ServiceRequest(".".join(labels), request.path, request.method, namespace)


def ref_readings(policy: PolicySet, cluster: str, request: Request) -> list[Request]:
    """The request as resolved, or for a short host without a namespace: as written,
    and as each ``<svc>.<ns>.svc`` some rule of the cluster's bindings names (a host
    pattern other than ``*`` that matches it, or ``*`` in a binding listing ``ns``)."""
    request = ref_resolve(request)
    if not isinstance(request, ServiceRequest) or request.namespace:
        return [request]
    labels = request.host.split(".")
    if len(labels) > 2:
        return [request]
    out: list[Request] = [request]
    spaces = [labels[1]] if len(labels) == 2 else ["shop", "build", "other", "*"]
    bindings = [b for b in policy.bindings.values() if ref_cluster(b.clusters, cluster)]
    for namespace in spaces:
        host = f"{labels[0]}.{namespace}.svc"
        named = any(
            any(
                (pattern != "*" and ref_host(pattern, host))
                or (pattern == "*" and namespace in (binding.namespaces or ()))
                for rule in ref_rules(policy, binding.role)
                for pattern in rule.services
            )
            for binding in bindings
        )
        if named:
            out.append(
                ServiceRequest(
                    host, request.path, request.method, "" if namespace == "*" else namespace
                )
            )
    return out


def reference(
    policy: PolicySet, cluster: str, spiffe_id: str, claims: Mapping[str, Any], request: Request
) -> Expected:
    """Every reading decided alone; allowed only under all of them, an explicit deny
    under any wins (the bindings named: those of every deciding reading)."""
    outcomes = [
        ref_one(policy, cluster, spiffe_id, claims, reading)
        for reading in ref_readings(policy, cluster, request)
    ]
    denied = [o for o in outcomes if o.denied]
    if denied:
        return Expected(False, True, frozenset().union(*(o.bindings for o in denied)))
    if all(o.allowed for o in outcomes):
        return Expected(True, False, frozenset().union(*(o.bindings for o in outcomes)))
    return Expected(False, False, frozenset())


def ref_one(
    policy: PolicySet, cluster: str, spiffe_id: str, claims: Mapping[str, Any], request: Request
) -> Expected:
    denies, allows = set(), set()
    for name, binding in policy.bindings.items():
        if not ref_cluster(binding.clusters, cluster):
            continue
        if not any(ref_subject(s, spiffe_id, claims) for s in binding.subjects):
            continue
        if binding.namespaces is not None and (
            not request.namespace or request.namespace not in binding.namespaces
        ):
            continue
        if not any(ref_rule(r, request) for r in ref_rules(policy, binding.role)):
            continue
        (denies if binding.effect == "deny" else allows).add(name)
    if denies:
        return Expected(False, True, frozenset(denies))
    if allows:
        return Expected(True, False, frozenset(allows))
    return Expected(False, False, frozenset())


def engine_for(policy: PolicySet, cluster: str) -> Engine:
    return Engine(compile_bundle(policy, REGISTRY, cluster, REVISION))


def check_agrees(policy: PolicySet, got: Decision, expected: Expected) -> None:
    assert (got.allowed, got.denied, frozenset(got.bindings)) == (
        expected.allowed,
        expected.denied,
        expected.bindings,
    )
    assert set(got.roles) == {policy.bindings[b].role for b in expected.bindings}
    assert len(got.roles) == len(set(got.roles))
    assert got.policy_revision == REVISION
    if expected.bindings:
        assert got.reason.split("RoleBinding ", 1)[1].split(" ", 1)[0] in expected.bindings
    else:
        assert got.reason.startswith("no RoleBinding allows this request (default deny)")


# --- (d) agreement with the reference --------------------------------------------------


@FAST
@given(scenario=SCENARIOS)
def test_engine_agrees_with_the_naive_reference(scenario: Scenario) -> None:
    # One engine answers every query in turn, as an agent does, so an index or the
    # per-identity memo carrying one identity's answer over to another would show.
    policy, cluster = scenario.policy, scenario.cluster
    engine = engine_for(policy, cluster)
    for (spiffe_id, claims), request in scenario.queries:
        expected = reference(policy, cluster, spiffe_id, claims, request)
        check_agrees(policy, engine.decide(spiffe_id, claims, request), expected)


@FAST
@given(scenario=SCENARIOS)
def test_a_decision_does_not_depend_on_the_decisions_before_it(scenario: Scenario) -> None:
    bundle = compile_bundle(scenario.policy, REGISTRY, scenario.cluster, REVISION)
    shared = Engine(bundle)
    for (spiffe_id, claims), request in scenario.queries:
        warm = shared.decide(spiffe_id, claims, request)
        cold = Engine(bundle).decide(spiffe_id, claims, request)
        assert (warm.allowed, warm.denied, warm.bindings, warm.reason) == (
            cold.allowed,
            cold.denied,
            cold.bindings,
            cold.reason,
        )


# --- (a) deny overrides allow ----------------------------------------------------------


def covering_rule(request: Request, exact: bool) -> PolicyRule:
    """A rule that covers ``request``: naming exactly what it asks for, or wildcards."""
    if isinstance(request, KubernetesRequest):
        if not exact:
            return PolicyRule(api_groups=("*",), resources=("*",), verbs=("*",))
        resource = request.resource
        if request.subresource:
            resource = f"{resource}/{request.subresource}"
        return PolicyRule(
            api_groups=(request.api_group,),
            resources=(resource,),
            verbs=(request.verb,),
            resource_names=(request.name,) if request.name else (),
        )
    if isinstance(request, NonResourceRequest):
        return PolicyRule(
            non_resource_urls=(request.path if exact else "*",),
            verbs=(request.verb if exact else "*",),
        )
    resolved = ref_resolve(request)
    assert isinstance(resolved, ServiceRequest)
    return PolicyRule(
        services=(resolved.host if exact else "*",),
        paths=(resolved.path if exact else "/**",),
        methods=(resolved.method if exact else "*",),
    )


@QUICK
@given(scenario=SCENARIOS, exact=st.booleans(), by_claim=st.booleans())
def test_a_covering_deny_binding_overrides_every_allow(
    scenario: Scenario, exact: bool, by_claim: bool
) -> None:
    (spiffe_id, claims), request = scenario.queries[-1]
    if by_claim and isinstance(claims.get("project"), str):
        subject = SubjectSpec(None, None, {"project": claims["project"]}, ())
    else:
        subject = SubjectSpec(spiffe_id, None, {}, ())
    covers = GlobalRoleSpec(rules=(covering_rule(request, exact),), include=())
    policy = PolicySet(
        roles={**scenario.policy.roles, "zz-covers": covers},
        bindings={
            **scenario.policy.bindings,
            "zz-deny": RoleBindingSpec("zz-covers", "deny", (subject,), None, None),
            # The same grant as an allow, so that an allow surely matches too.
            "zz-allow": RoleBindingSpec("zz-covers", "allow", (subject,), None, None),
        },
    )
    engine = engine_for(policy, scenario.cluster)
    for (other_id, other_claims), other_request in scenario.queries[:-1]:
        engine.decide(other_id, other_claims, other_request)  # a warm engine, as in an agent
    decision = engine.decide(spiffe_id, claims, request)
    assert not decision.allowed and decision.denied
    assert "zz-deny" in decision.bindings
    assert all(policy.bindings[name].effect == "deny" for name in decision.bindings)
    assert decision.reason.startswith("denied by RoleBinding ")


# --- (b) default deny ------------------------------------------------------------------


@QUICK
@given(scenario=SCENARIOS)
def test_without_a_matching_allow_binding_nothing_is_allowed(scenario: Scenario) -> None:
    policy, cluster = scenario.policy, scenario.cluster
    only_denies = PolicySet(
        roles=policy.roles,
        bindings={n: b for n, b in policy.bindings.items() if b.effect == "deny"},
    )
    with_allows, without_allows = engine_for(policy, cluster), engine_for(only_denies, cluster)
    for (spiffe_id, claims), request in scenario.queries:
        decision = without_allows.decide(spiffe_id, claims, request)
        assert not decision.allowed
        if not decision.denied:
            assert decision.bindings == () and decision.roles == ()
            assert decision.reason.startswith("no RoleBinding allows this request (default deny)")
            assert "; no allow RoleBinding names this identity" in decision.reason
        # With the allows back, an allow needs an allow binding that matches naively.
        if with_allows.decide(spiffe_id, claims, request).allowed:
            assert any(
                policy.bindings[name].effect == "allow"
                for name in reference(policy, cluster, spiffe_id, claims, request).bindings
            )


@QUICK
@given(scenario=SCENARIOS)
def test_an_allow_binding_never_takes_an_allow_away_and_a_deny_never_grants(
    scenario: Scenario,
) -> None:
    policy, cluster = scenario.policy, scenario.cluster
    allow_all = GlobalRoleSpec(
        rules=(
            PolicyRule(api_groups=("*",), resources=("*",), verbs=("*",)),
            PolicyRule(non_resource_urls=("*",), verbs=("*",)),
            PolicyRule(services=("*",), paths=("*",), methods=("*",)),
        ),
        include=(),
    )
    everyone = SubjectSpec(None, None, {}, (Expression("nobody-has-this", "DoesNotExist", ()),))
    roles = {**policy.roles, "zz-all": allow_all}
    more_allows = PolicySet(
        roles=roles,
        bindings={
            **policy.bindings,
            "zz-allow": RoleBindingSpec("zz-all", "allow", (everyone,), None, ("shop",)),
        },
    )
    more_denies = PolicySet(
        roles=roles,
        bindings={
            **policy.bindings,
            "zz-deny": RoleBindingSpec("zz-all", "deny", (everyone,), None, ("build",)),
        },
    )
    before = engine_for(policy, cluster)
    after_allow, after_deny = engine_for(more_allows, cluster), engine_for(more_denies, cluster)
    for (spiffe_id, claims), request in scenario.queries:
        if before.decide(spiffe_id, claims, request).allowed:
            assert after_allow.decide(spiffe_id, claims, request).allowed
        else:
            assert not after_deny.decide(spiffe_id, claims, request).allowed


# --- (c) path globs --------------------------------------------------------------------


@FAST
@given(pattern=PATH_GLOBS, path=PATHS)
def test_path_glob_agrees_with_the_segment_by_segment_reference(pattern: str, path: str) -> None:
    # Both sides in the form globs are matched in: fully percent-decoded.
    compiled = compile_path_glob(pattern)
    got = compiled is None or compiled.fullmatch(ref_path(path, False)) is not None
    assert got == ref_glob(ref_path(pattern, False), ref_path(path, False))


@FAST
@given(pattern=PATH_GLOBS, path=PATHS)
def test_an_insensitive_glob_matches_every_case_of_a_path(pattern: str, path: str) -> None:
    compiled = compile_path_glob(pattern, fold_case=True)
    for spelling in (path, path.upper(), path.lower(), path.swapcase()):
        got = compiled is None or compiled.fullmatch(ref_path(spelling, True)) is not None
        assert got == ref_glob(ref_path(pattern, True), ref_path(path, True))


@FAST
@given(path=PATHS, stars=st.integers(1, 5))
def test_a_star_is_exactly_one_segment(path: str, stars: int) -> None:
    compiled = compile_path_glob("/" + "/".join(["*"] * stars))
    assert compiled is not None
    assert (compiled.fullmatch(path) is not None) == (path.count("/") == stars)


@FAST
@given(
    head=st.lists(st.sampled_from(("a", "b", "a.b")), max_size=2),
    middle=st.lists(st.sampled_from(PATH_SEGMENTS), max_size=4),
    tail=st.lists(st.sampled_from(("a", "b", "a.b")), max_size=2),
)
def test_a_double_star_is_any_number_of_segments(
    head: list[str], middle: list[str], tail: list[str]
) -> None:
    compiled = compile_path_glob("/" + "/".join([*head, "**", *tail]))
    if compiled is None:  # /** alone: any path at all
        assert not head and not tail
    else:
        assert compiled.fullmatch("/" + "/".join([*head, *middle, *tail])) is not None
    assert compile_path_glob("*") is None


@FAST
@given(pattern=st.lists(st.sampled_from(PATH_SEGMENTS), max_size=4), path=PATHS)
def test_a_glob_without_stars_matches_only_itself(pattern: list[str], path: str) -> None:
    literal = "/" + "/".join(pattern)
    compiled = compile_path_glob(literal)
    assert compiled is not None
    assert (compiled.fullmatch(ref_path(path, False)) is not None) == (
        unquote(path) == unquote(literal)
    )
