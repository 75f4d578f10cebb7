"""People and time-bound bindings in the engine (issue 14 item 5): ``user`` subjects
match only ``Engine.decide_user`` for that person, no workload subject ever matches a
person, and a binding with ``expiresAt`` stops matching once the engine's clock reaches
it — without a new bundle — while an engine without a clock counts every binding."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_fixtures import binding, policy, registry, role

from trustmesh.manifests import PolicyTestSpec, parse_text
from trustmesh.policy.compiler import compile_all, identity_claims
from trustmesh.policy.diff import Grant, diff_policies
from trustmesh.policy.engine import Engine
from trustmesh.policy.testing import run_policy_tests
from trustmesh.request import parse_request

REGISTRY = registry()
READER = role("reader", "{apiGroups: [''], resources: [pods], verbs: [get, list]}")
GET_PODS = parse_request({"verb": "get", "resource": "pods", "namespace": "shop"})
EXPIRY = datetime(2026, 12, 1, 3, 0, tzinfo=UTC).timestamp()
AT = "expiresAt: 2026-12-01T03:00:00Z"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def bundles(*documents: str) -> dict[str, dict[str, Any]]:
    return compile_all(policy("".join(documents)), REGISTRY, 3)


def payments() -> tuple[str, dict[str, Any]]:
    return REGISTRY.spiffe_id_of("payments"), identity_claims(REGISTRY, "payments")


def test_a_user_binding_allows_that_person_only() -> None:
    bundle = bundles(READER, binding("ann-reads", "reader", "[{user: ann}]"))["prod-eu"]
    # spiffeId user:ann: an agent from before user subjects matches no workload with it
    assert bundle["bindings"][0]["subjects"] == [{"user": "ann", "spiffeId": "user:ann"}]
    engine = Engine(bundle)
    decision = engine.decide_user("ann", GET_PODS)
    assert decision.allowed and decision.bindings == ("ann-reads",)
    assert not engine.decide_user("bob", GET_PODS).allowed
    # the person's binding names no workload
    assert not engine.decide(*payments(), GET_PODS).allowed
    assert engine.people == ("ann",)


def test_a_deny_user_binding_denies_and_nothing_is_no_opinion() -> None:
    engine = Engine(
        bundles(
            READER,
            binding("ann-reads", "reader", "[{user: ann}]"),
            binding("ann-not", "reader", "[{user: ann}]", "effect: deny"),
        )["prod-eu"]
    )
    decision = engine.decide_user("ann", GET_PODS)
    assert decision.denied and not decision.allowed and decision.bindings == ("ann-not",)
    other = engine.decide_user("carol", GET_PODS)
    assert not other.allowed and not other.denied
    assert "no allow RoleBinding names this identity" in other.reason


def test_an_engine_reading_the_subject_without_user_matches_no_workload() -> None:
    """What an agent from before user subjects makes of one: a subject of SPIFFE ID
    user:ann, which no workload has."""
    bundle = bundles(READER, binding("ann-reads", "reader", "[{user: ann}]"))["prod-eu"]
    for subject in bundle["bindings"][0]["subjects"]:
        del subject["user"]
    assert not Engine(bundle).decide(*payments(), GET_PODS).allowed


def test_workload_subjects_never_match_a_person() -> None:
    """Even subjects every claim set without a key meets (DoesNotExist, NotIn)."""
    engine = Engine(
        bundles(
            READER,
            binding(
                "anyone",
                "reader",
                "[{matchExpressions: [{key: nothing, operator: DoesNotExist}]}, "
                "{matchExpressions: [{key: tier, operator: NotIn, values: [x]}]}, "
                "{spiffeId: 'spiffe://corp.example/**'}]",
            ),
        )["prod-eu"]
    )
    assert engine.decide(*payments(), GET_PODS).allowed
    decision = engine.decide_user("ann", GET_PODS)
    assert not decision.allowed and not decision.denied


def test_a_binding_expires_on_the_engines_clock_without_a_new_bundle() -> None:
    bundle = bundles(
        READER,
        binding("ann-reads", "reader", "[{user: ann}]", AT),
        binding("pay-reads", "reader", "[{workload: payments}]", AT),
    )["prod-eu"]
    assert bundle["bindings"][0]["expiresAt"] == EXPIRY
    clock = Clock(EXPIRY - 1)
    engine = Engine(bundle, clock=clock)
    assert engine.next_expiry == EXPIRY
    assert engine.decide_user("ann", GET_PODS).allowed
    assert engine.decide(*payments(), GET_PODS).allowed  # remembered in the memo
    clock.now = EXPIRY
    assert not engine.decide_user("ann", GET_PODS).allowed
    assert not engine.decide(*payments(), GET_PODS).allowed
    assert engine.expired("pay-reads") and engine.next_expiry is None
    # no clock: the control plane's gate and diff count every binding
    assert Engine(bundle).decide_user("ann", GET_PODS).allowed


def test_only_the_expired_binding_goes() -> None:
    later = "expiresAt: '2026-12-01T05:00:00+01:00'"  # 04:00Z
    bundle = bundles(
        READER,
        binding("short", "reader", "[{user: ann}]", AT),
        binding("long", "reader", "[{user: ann}]", later),
        binding("always", "reader", "[{workload: payments}]"),
    )["prod-eu"]
    clock = Clock(EXPIRY + 1)
    engine = Engine(bundle, clock=clock)
    assert engine.decide_user("ann", GET_PODS).bindings == ("long",)
    assert engine.next_expiry == EXPIRY + 3600
    clock.now = EXPIRY + 3600
    assert not engine.decide_user("ann", GET_PODS).allowed
    assert engine.decide(*payments(), GET_PODS).allowed


_PEOPLE = st.sampled_from(["ann", "bob", "carol"])
_SUBJECTS = st.lists(
    st.one_of(
        _PEOPLE.map(lambda name: f"{{user: {name}}}"),
        st.sampled_from(
            [
                "{workload: payments}",
                "{claims: {project: shop}}",
                "{matchExpressions: [{key: nothing, operator: DoesNotExist}]}",
                "{matchExpressions: [{key: tier, operator: NotIn, values: [x]}]}",
                "{spiffeId: 'spiffe://corp.example/**'}",
            ]
        ),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(
    subjects=_SUBJECTS,
    person=_PEOPLE,
    effect=st.sampled_from(["allow", "deny"]),
    offset=st.integers(min_value=-5, max_value=5),
    expires=st.booleans(),
)
def test_property_people_and_expiry(
    subjects: list[str], person: str, effect: str, offset: int, expires: bool
) -> None:
    """A person matches exactly the bindings naming them with ``user``; a workload only
    workload subjects; a binding past ``expiresAt`` matches nothing, before it, it does."""
    extra = f"effect: {effect}\n" + (AT if expires else "")
    bundle = bundles(READER, binding("b", "reader", f"[{', '.join(subjects)}]", extra))["prod-eu"]
    engine = Engine(bundle, clock=Clock(EXPIRY + offset))
    live = not expires or offset < 0
    names_person = f"{{user: {person}}}" in subjects
    names_workload = any("user" not in s for s in subjects)
    person_hit = engine.decide_user(person, GET_PODS)
    workload_hit = engine.decide(*payments(), GET_PODS)
    matched = person_hit.denied if effect == "deny" else person_hit.allowed
    assert matched == (live and names_person)
    matched = workload_hit.denied if effect == "deny" else workload_hit.allowed
    assert matched == (live and names_workload)
    # the same bindings, no clock: expiry does not count
    assert (Engine(bundle).decide_user(person, GET_PODS).bindings == ("b",)) == names_person


def test_policy_tests_with_people() -> None:
    text = (
        READER
        + binding("ann-reads", "reader", "[{user: ann}]")
        + """---
apiVersion: trustmesh.io/v1alpha1
kind: PolicyTest
metadata: {name: people}
spec:
  cases:
  - name: ann reads pods
    subject: {user: ann}
    cluster: prod-eu
    request: {verb: get, resource: pods, namespace: shop}
    expect: allow
  - name: bob does not
    subject: {user: bob}
    cluster: prod-eu
    request: {verb: get, resource: pods, namespace: shop}
    expect: allow
"""
    )
    docs = parse_text(text)
    assert isinstance(docs[-1].spec, PolicyTestSpec)
    results = run_policy_tests(policy(text), REGISTRY)
    assert [r.passed for r in results] == [True, False]
    assert "PolicyTest people, bob does not" in results[1].describe()


def test_diff_shows_people_and_expiry() -> None:
    old = policy(READER + binding("pay-reads", "reader", "[{workload: payments}]"))
    new = policy(
        READER
        + binding("pay-reads", "reader", "[{workload: payments}]")
        + binding("ann-reads", "reader", "[{user: ann}]", AT + "\nclusters: {names: [prod-eu]}")
        + binding("bob-reads", "reader", "[{user: bob}]", "clusters: {names: [prod-eu]}")
    )
    result = diff_policies(old, new, REGISTRY)
    until = "2026-12-01T03:00:00Z"
    assert set(result.appeared) == {
        Grant("user:ann", "prod-eu", "*", verb, "pods", "resource", until)
        for verb in ("get", "list")
    } | {Grant("user:bob", "prod-eu", "*", verb, "pods", "resource") for verb in ("get", "list")}
    shown = result.to_json()["appeared"]
    assert {g.get("expires") for g in shown} == {until, None}
    # a lasting binding making the same grant: no expiry shown
    both = policy(
        READER
        + binding("ann-reads", "reader", "[{user: ann}]", AT + "\nclusters: {names: [prod-eu]}")
        + binding("ann-always", "reader", "[{user: ann}]", "clusters: {names: [prod-eu]}")
    )
    grants = diff_policies(policy(READER), both, REGISTRY).appeared
    assert grants and all(g.expires == "" for g in grants)


def test_rbac_export_names_people_and_warns_of_expiry() -> None:
    from trustmesh.policy.rbac import export_rbac

    exported = export_rbac(
        policy(READER + binding("ann-reads", "reader", "[{user: ann}, {workload: payments}]", AT)),
        REGISTRY,
        "prod-eu",
    )
    (manifest,) = [m for m in exported if m["kind"] == "ClusterRoleBinding"]
    assert manifest["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "user:ann"},
        {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "User",
            "name": REGISTRY.spiffe_id_of("payments"),
        },
    ]
    assert any("expires at 2026-12-01T03:00:00Z" in w for w in exported.warnings)
