"""No spelling of a denied path or host is allowed (issue 10, finding 2; DESIGN §3
"Canonical requests").

Hypothesis writes aliases of requests a policy denies — every spelling the
canonicalisation makes equivalent (host case, a trailing dot, a port,
``.svc.cluster.local``, the short forms ``<svc>.<ns>`` and ``<svc>``, percent-encoded
unreserved characters, hex case, a query) or refuses (``//``, ``;params``, dot
segments plain and percent-encoded, encoded separators, a trailing dot or space in a
segment, double encodings) — and sends each the way ``POST /v1/authorize`` does:
``parse_request``, then the engine of the cluster's bundle, in process. None may be
allowed: a refused spelling is a 400 before any engine; an equivalent one is read
canonically and meets the explicit deny.

The policy: an identity may do anything anywhere, except anything on the service
``admin.shop.svc`` and anything under ``/admin`` on any host (``pathCase:
insensitive``, so case changes of the path are aliases too)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_fixtures import registry

from trustmesh.common.errors import RequestError
from trustmesh.manifests import parse_text
from trustmesh.policy.compiler import PolicySet, compile_all
from trustmesh.policy.engine import Decision, Engine
from trustmesh.request import parse_request

POLICY = """
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: everything}
spec:
  rules:
  - {services: ["*"], paths: ["*"], methods: ["*"]}
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: admin-service}
spec:
  rules:
  - {services: [admin.shop.svc], paths: ["*"], methods: ["*"]}
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: admin-paths}
spec:
  rules:
  - {services: ["*"], paths: [/admin, /admin/**], methods: ["*"], pathCase: insensitive}
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: all}
spec:
  role: everything
  subjects: [{workload: payments}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: no-admin-service}
spec:
  role: admin-service
  effect: deny
  subjects: [{workload: payments}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: no-admin-paths}
spec:
  role: admin-paths
  effect: deny
  subjects: [{workload: payments}]
"""
REGISTRY = registry()
BUNDLE = compile_all(PolicySet.from_documents(parse_text(POLICY, "aliases.yaml")), REGISTRY, 1)[
    "prod-eu"
]
PAYMENTS = REGISTRY.spiffe_id_of("payments")
CLAIMS = {"project": "shop", "environment": "prod", "tier": "gold"}
ALIASES = settings(max_examples=400, deadline=None)


def authorize(engine: Engine, request: dict[str, Any]) -> Decision | None:
    """What ``/v1/authorize`` does with the request: None for a 400 (refused before any
    engine), else the engine's decision."""
    try:
        parsed = parse_request(request)
    except RequestError:
        return None
    return engine.decide(PAYMENTS, CLAIMS, parsed)


def test_the_policy_allows_what_is_neither_admin() -> None:
    engine = Engine(BUNDLE)
    for host, path in [
        ("orders.shop.svc", "/api/x"),
        ("orders.shop.svc", "/administrator"),
        ("admin.build.svc", "/api/x"),
        ("administrator.shop.svc", "/api/x"),
        ("orders", "/api/x"),
    ]:
        decision = authorize(engine, {"host": host, "path": path, "method": "GET"})
        assert decision is not None and decision.allowed, (host, path, decision)


# --- hosts ------------------------------------------------------------------------------


def case_changes(draw: st.DrawFn, text: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c for c in text)


@st.composite
def admin_host_aliases(draw: st.DrawFn) -> tuple[str, str]:
    """(host, namespace) that name the service admin.shop.svc."""
    form = draw(
        st.sampled_from(
            (
                ("admin.shop.svc", ""),
                ("admin.shop.svc", "shop"),
                ("admin.shop.svc", "build"),  # a namespace elsewhere: the host still names it
                ("admin.shop.svc.cluster.local", ""),
                ("admin.shop.svc.cluster.local", "build"),
                ("admin.shop", ""),  # ambiguous: the admin.shop.svc reading denies
                ("admin.shop", "shop"),
                ("admin.shop", "build"),
                ("admin", ""),  # ambiguous: the admin.shop.svc reading denies
                ("admin", "shop"),
            )
        )
    )
    host, namespace = form
    host = case_changes(draw, host)
    host += draw(st.sampled_from(("", ".", "..")))
    host += draw(st.sampled_from(("", ":80", ":8080", ":65535", ":0", ":", ":99999")))
    return host, namespace


@ALIASES
@given(alias=admin_host_aliases(), path=st.sampled_from(("/", "/api/x", "/x?y=1")))
def test_no_alias_of_a_denied_host_is_allowed(alias: tuple[str, str], path: str) -> None:
    engine = Engine(BUNDLE)
    host, namespace = alias
    request = {"host": host, "path": path, "method": "GET", "namespace": namespace}
    decision = authorize(engine, request)
    if decision is not None:
        assert not decision.allowed, (request, decision)
        assert decision.denied and "no-admin-service" in decision.bindings, (request, decision)


# --- paths ------------------------------------------------------------------------------

TAILS = st.lists(st.sampled_from(("users", "x", "a.b", "7", "~t")), max_size=3)
EQUIVALENT = ("encode", "hex-case", "query", "case")
REFUSED = (
    "empty-segment",
    "parameter",
    "dot-segment",
    "encoded-dot-segment",
    "encoded-separator",
    "trailing-dot",
    "trailing-space",
    "double-encoding",
    "backslash",
)


UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def encode_unreserved(draw: st.DrawFn, path: str) -> str:
    """Some unreserved characters percent-encoded (RFC 3986 §2.3: equivalent)."""
    out = []
    i = 0
    while i < len(path):
        if path[i] == "%":  # an existing encoding stays as it is
            out.append(path[i : i + 3])
            i += 3
            continue
        char = path[i]
        if char in UNRESERVED and draw(st.booleans()):
            code = f"{ord(char):02X}"
            out.append("%" + (code.lower() if draw(st.booleans()) else code))
        else:
            out.append(char)
        i += 1
    return "".join(out)


def insert_at(draw: st.DrawFn, segments: list[str], what: str) -> list[str]:
    at = draw(st.integers(0, len(segments)))
    return [*segments[:at], what, *segments[at:]]


@st.composite
def admin_path_aliases(draw: st.DrawFn) -> str:
    """Spellings of /admin or a path under it: equivalent ones, and ones with one or
    more refused features."""
    segments = ["admin", *draw(TAILS)]
    changes = draw(st.lists(st.sampled_from(EQUIVALENT + REFUSED), min_size=1, max_size=3))
    for change in changes:
        if change == "case":
            segments = [case_changes(draw, s) for s in segments]
        elif change == "empty-segment":
            segments = insert_at(draw, segments, "")
        elif change == "parameter":
            at = draw(st.integers(0, len(segments) - 1))
            segments[at] += draw(st.sampled_from((";", ";jsessionid=x", ";a=b;c")))
        elif change == "dot-segment":
            dots = draw(st.sampled_from((".", "..")))
            segments = insert_at(draw, segments, dots)
            if dots == "..":
                segments = ["api", *segments]
        elif change == "encoded-dot-segment":
            segments = [
                "api",
                draw(st.sampled_from(("%2e%2e", "%2E%2E", ".%2e", "%2e."))),
                *segments,
            ]
        elif change == "encoded-separator":
            at = draw(st.integers(0, len(segments) - 1))
            segments[at] += draw(st.sampled_from(("%2f", "%2F", "%5c", "%5C"))) + "x"
        elif change == "trailing-dot":
            at = draw(st.integers(0, len(segments) - 1))
            segments[at] += draw(st.sampled_from((".", "%2e", "..")))
        elif change == "trailing-space":
            at = draw(st.integers(0, len(segments) - 1))
            segments[at] += draw(st.sampled_from(("%20", " ")))
        elif change == "double-encoding":
            at = draw(st.integers(0, len(segments) - 1))
            segments[at] += draw(st.sampled_from(("%252f", "%252e%252e", "%2561")))
        elif change == "backslash":
            segments = [draw(st.sampled_from(("api\\..", "api\\admin"))), *segments]
    path = "/" + "/".join(segments)
    if "encode" in changes:
        path = encode_unreserved(draw, path)
    if "hex-case" in changes:
        path = path.replace("%2e", "%2E") if draw(st.booleans()) else path.lower()
    if "query" in changes:
        path += draw(st.sampled_from(("?x=1", "?/../admin", "?")))
    return path


@ALIASES
@given(
    path=admin_path_aliases(),
    host=st.sampled_from(("orders.shop.svc", "orders.shop.svc:8080", "api.example.com")),
    method=st.sampled_from(("GET", "post", "DELETE")),
)
def test_no_alias_of_a_denied_path_is_allowed(path: str, host: str, method: str) -> None:
    engine = Engine(BUNDLE)
    request = {"host": host, "path": path, "method": method}
    decision = authorize(engine, request)
    if decision is not None:
        assert not decision.allowed, (request, decision)
        assert decision.denied and "no-admin-paths" in decision.bindings, (request, decision)


@ALIASES
@given(path=admin_path_aliases())
def test_an_alias_is_refused_exactly_when_it_has_a_refused_feature(path: str) -> None:
    """The equivalent spellings are read, not refused: refusing everything would also
    pass the property above."""
    refused = authorize(Engine(BUNDLE), {"host": "orders.shop.svc", "path": path, "method": "GET"})
    features = (
        "//" in path.split("?")[0]
        or ";" in path.split("?")[0]
        or "\\" in path
        or any(m in path.lower() for m in ("%2f", "%5c", "%25", "%20", " "))
        or any(
            s.lower().replace("%2e", ".") in (".", "..") or s.lower().endswith((".", "%2e"))
            for s in path.split("?")[0].split("/")[1:]
        )
    )
    assert (refused is None) == features, path
