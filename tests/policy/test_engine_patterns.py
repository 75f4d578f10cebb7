"""SPIFFE ID patterns in RoleBinding subjects (DESIGN §9): ``*`` one path segment,
``**`` any number, the trust domain always literal — parsed by ``spiffeid``, checked
with file and line by the manifests, matched by the engine after its exact index, and
expanded by the RBAC export. A pattern of one trust domain never matches another."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_fixtures import binding, policy, registry, role

from trustmesh.common.errors import ManifestError, SpiffeIdError
from trustmesh.policy.compiler import compile_all
from trustmesh.policy.engine import Engine
from trustmesh.policy.rbac import export_rbac
from trustmesh.request import parse_request
from trustmesh.spiffeid import is_spiffe_id_pattern, parse_spiffe_id, parse_spiffe_id_pattern

PARTNER = "spiffe://partner.example"
READ = {"host": "api.test", "path": "/reports", "method": "GET"}
READER = role("reader", "{services: [api.test], paths: [/reports], methods: [GET]}")


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        (
            f"{PARTNER}/**",
            [f"{PARTNER}/a", f"{PARTNER}/a/b/c"],
            ["spiffe://partner.example2/a", "spiffe://corp.example/a"],
        ),
        (
            f"{PARTNER}/ns/*/sa/web",
            [f"{PARTNER}/ns/shop/sa/web"],
            [f"{PARTNER}/ns/shop/sa/db", f"{PARTNER}/ns/a/b/sa/web"],
        ),
        (
            f"{PARTNER}/ns/shop/**",
            [f"{PARTNER}/ns/shop/sa/web", f"{PARTNER}/ns/shop"],
            [f"{PARTNER}/ns/shopping/x"],
        ),
        (
            f"{PARTNER}/**/web",
            [f"{PARTNER}/web", f"{PARTNER}/ns/shop/sa/web"],
            [f"{PARTNER}/web/x"],
        ),
        (f"{PARTNER}/a.b/*", [f"{PARTNER}/a.b/c"], [f"{PARTNER}/aXb/c"]),  # dots are literal
    ],
)
def test_patterns_match_segments(
    pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    compiled = parse_spiffe_id_pattern(pattern)
    assert is_spiffe_id_pattern(pattern) and compiled.trust_domain == "partner.example"
    assert all(compiled.matches(i) for i in matching)
    assert not any(compiled.matches(i) for i in not_matching)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("spiffe://*.example/**", "must name its trust domain exactly"),
        ("spiffe://partner.example", "must have a path"),
        ("spiffe://partner.example/web-*", "a wildcard is a whole path segment"),
        ("spiffe://partner.example/a//**", "invalid path segment ''"),
        ("spiffe://partner.example/../**", "invalid path segment '..'"),
        ("https://partner.example/**", "must start with spiffe://"),
    ],
)
def test_bad_patterns_are_refused(pattern: str, message: str) -> None:
    with pytest.raises(SpiffeIdError, match=message):
        parse_spiffe_id_pattern(pattern)


SEGMENT = st.from_regex(r"[A-Za-z0-9._-]{1,6}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)


@given(
    st.lists(SEGMENT, min_size=1, max_size=5), st.sampled_from(["corp.example", "partner.example"])
)
def test_double_star_matches_exactly_the_ids_of_its_domain(path: list[str], domain: str) -> None:
    spiffe_id = f"spiffe://{domain}/{'/'.join(path)}"
    parse_spiffe_id(spiffe_id)
    assert parse_spiffe_id_pattern(f"{PARTNER}/**").matches(spiffe_id) == (
        domain == "partner.example"
    )
    assert parse_spiffe_id_pattern(f"spiffe://{domain}/{'/'.join('*' for _ in path)}").matches(
        spiffe_id
    )


def test_a_bad_pattern_in_a_binding_is_refused_with_file_and_line() -> None:
    text = READER + binding("b", "reader", '[{spiffeId: "spiffe://partner.example/web-*"}]')
    with pytest.raises(ManifestError) as refused:
        policy(text)
    problem = str(refused.value.problems[0])
    assert problem.startswith("policy.yaml:14") and "whole path segment" in problem


def engine_for(*documents: str) -> Engine:
    return Engine(compile_all(policy("".join(documents)), registry(), 3)["prod-eu"])


def allowed(engine: Engine, spiffe_id: str, **claims: str) -> bool:
    return engine.decide(spiffe_id, claims, parse_request(READ)).allowed


def test_the_engine_matches_pattern_subjects_and_only_in_their_domain() -> None:
    engine = engine_for(
        READER,
        binding("partners", "reader", f'[{{spiffeId: "{PARTNER}/ns/*/sa/web"}}]'),
        binding("exact", "reader", '[{spiffeId: "spiffe://corp.example/only/me"}]'),
    )
    assert allowed(engine, f"{PARTNER}/ns/shop/sa/web")
    assert engine.decide(f"{PARTNER}/ns/shop/sa/web", {}, parse_request(READ)).bindings == (
        "partners",
    )
    assert not allowed(engine, f"{PARTNER}/ns/shop/sa/db")
    assert not allowed(engine, "spiffe://corp.example/ns/shop/sa/web")
    assert not allowed(engine, "spiffe://third.example/ns/shop/sa/web")
    assert allowed(engine, "spiffe://corp.example/only/me")  # the exact index still works
    assert not allowed(engine, "system:serviceaccount:kube-system:default")


def test_a_pattern_with_claims_needs_both_and_a_deny_pattern_wins() -> None:
    engine = engine_for(
        READER,
        binding(
            "gold-partners", "reader", f'[{{spiffeId: "{PARTNER}/**", claims: {{tier: gold}}}}]'
        ),
        binding("no-test", "reader", f'[{{spiffeId: "{PARTNER}/test/**"}}]', "effect: deny"),
    )
    assert allowed(engine, f"{PARTNER}/prod/web", tier="gold")
    assert not allowed(engine, f"{PARTNER}/prod/web", tier="bronze")
    assert not allowed(engine, f"{PARTNER}/prod/web")
    denied = engine.decide(f"{PARTNER}/test/web", {"tier": "gold"}, parse_request(READ))
    assert denied.denied and denied.bindings == ("no-test",)


def test_rbac_export_expands_a_pattern_instead_of_naming_it_as_a_user() -> None:
    k8s_reader = role("k8s-reader", "{apiGroups: [''], resources: [pods], verbs: [get]}")
    text = k8s_reader + binding("ours", "k8s-reader", '[{spiffeId: "spiffe://corp.example/**"}]')
    exported = export_rbac(policy(text), registry(), "prod-eu")
    users = [s["name"] for doc in exported for s in doc.get("subjects", [])]
    assert users and "spiffe://corp.example/**" not in users
    assert all(u.startswith("spiffe://corp.example/") for u in users)
