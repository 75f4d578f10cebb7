"""The engine's fast paths against the plain definitions they stand for, on a generated
federation (the ``bench engine`` generator at a small size: every rule, subject and
scope shape it makes) and on hand-written cases:

- the candidate index (``matching.CandidateIndex``) is a superset: no binding that
  covers a request is left out of its candidates;
- the per-identity lookup (subjects indexed, their residual conditions) finds exactly
  the bindings one of whose subjects matches the identity;
- a decision equals the plain scan (``Engine._match`` over every binding that names
  the identity), with the same bindings in the same order and the same reason, the
  default deny's explanation (written when read) included;
- the compiler's ``compile_all`` writes byte for byte the bundles ``compile_bundle``
  writes cluster by cluster, and ``sign_bundle`` signs the bytes ``jwt.encode`` would;
- building an engine or compiling leaves the garbage collector as it found it."""

from __future__ import annotations

import gc
import json
from typing import Any

import jwt
import pytest
from policy_fixtures import binding, policy, registry, role

from trustmesh.bench._federation import es256_key
from trustmesh.bench._policygen import Sizes, generate_bodies, generate_requests, load_world
from trustmesh.identity.svid import KeyRing
from trustmesh.policy.bundle import BUNDLE_TYP, sign_bundle, verify_bundle
from trustmesh.policy.compiler import compile_all, compile_bundle
from trustmesh.policy.engine import DEFAULT_DENY, Decision, Engine
from trustmesh.policy.matching import family_of
from trustmesh.request import ServiceRequest, parse_request

SIZES = Sizes(clusters=5, workloads=400, projects=15, roles=60, bindings=300)
WORLD = load_world(generate_bodies(SIZES, 5))
BUNDLES = compile_all(WORLD.policy, WORLD.registry, 1)
REQUESTS = generate_requests(WORLD, 3_000, 5, SIZES, bundles=BUNDLES)


def _read(engine: Engine, request: Any) -> Any:
    """The request as the engine decides it (a service host read in its cluster)."""
    return engine.resolve(request) if type(request) is ServiceRequest else request


def test_candidates_include_every_binding_that_covers_the_request() -> None:
    engines = {name: Engine(bundle) for name, bundle in BUNDLES.items()}
    checked = 0
    for r in REQUESTS:
        engine = engines[r.cluster]
        request = _read(engine, r.request)
        family = family_of(request)
        candidates = engine._candidates.of(request, family)
        for b in engine.bindings:
            if b.covers(request, family):
                assert b.bit & candidates, (b.name, request)
                checked += 1
    assert checked > 500


def test_the_lookup_finds_exactly_the_bindings_whose_subjects_match() -> None:
    engines = {name: Engine(bundle) for name, bundle in BUNDLES.items()}
    for identity in WORLD.identities[:150]:
        for cluster, engine in engines.items():
            denies, allows = engine.applicable(identity.spiffe_id, identity.claims)
            plain = {
                b
                for b in engine.bindings
                if any(s.matches(identity.spiffe_id, identity.claims) for s in b.subjects)
            }
            assert set(denies) | set(allows) == plain, (identity.workload, cluster)
            assert all(b.deny for b in denies) and not any(b.deny for b in allows)
            assert len(denies) + len(allows) == len(plain)  # each binding once


def _plain(engine: Engine, spiffe_id: str, claims: dict[str, Any], request: Any) -> tuple:
    """What ``decide`` must answer, by the plain scan (one reading: no short host)."""
    denies, allows = engine.applicable(spiffe_id, claims)
    family = family_of(request)
    denied, matched = engine._match(denies, allows, request, family)
    names = tuple(b.name for b in matched)
    if denied:
        return (
            False,
            True,
            names,
            f"denied by RoleBinding {matched[0].name} (role {matched[0].role})",
        )
    if matched:
        return (
            True,
            False,
            names,
            f"allowed by RoleBinding {matched[0].name} (role {matched[0].role})",
        )
    return False, False, (), DEFAULT_DENY + engine._explain(allows, request, family)


def test_decisions_equal_the_plain_scan_with_reasons() -> None:
    engines = {name: Engine(bundle) for name, bundle in BUNDLES.items()}
    plain_engines = {name: Engine(bundle) for name, bundle in BUNDLES.items()}
    outcomes = set()
    for r in REQUESTS:
        engine = engines[r.cluster]
        request = _read(engine, r.request)
        if type(request) is ServiceRequest and not request.namespace and "." not in request.host:
            continue  # several readings: the vectors and properties cover those
        got = engine.decide(r.identity.spiffe_id, r.identity.claims, r.request)
        want = _plain(plain_engines[r.cluster], r.identity.spiffe_id, r.identity.claims, request)
        assert (got.allowed, got.denied, got.bindings, got.reason) == want, r.request
        outcomes.add((got.allowed, got.denied))
    assert outcomes == {(True, False), (False, True), (False, False)}


def test_a_default_deny_explains_itself_when_read_and_stays_the_same() -> None:
    engine = Engine(BUNDLES[REQUESTS[0].cluster])
    denied = []
    for r in REQUESTS:
        if r.cluster == REQUESTS[0].cluster:
            decision = engine.decide(r.identity.spiffe_id, r.identity.claims, r.request)
            if not decision.allowed and not decision.denied:
                denied.append(decision)
    assert denied
    for decision in denied[:50]:
        first = decision.reason
        assert first.startswith(DEFAULT_DENY + "; ")
        assert decision.reason == first
        assert decision.to_json()["reason"] == first
        assert repr(first) in repr(decision)


def test_decisions_compare_by_their_fields() -> None:
    a = Decision(True, False, "allowed by x", ("x",), ("r",), 3, "id-1")
    b = Decision(True, False, "allowed by x", ("x",), ("r",), 3, "id-1")
    assert a == b and hash(a) == hash(b)
    assert a != Decision(True, False, "allowed by x", ("x",), ("r",), 3, "id-2")
    assert a.to_json() == {
        "allowed": True,
        "denied": False,
        "reason": "allowed by x",
        "bindings": ["x"],
        "roles": ["r"],
        "policy_revision": 3,
        "decision_id": "id-1",
    }


REGISTRY = registry()
PAYMENTS = "spiffe://corp.example/cluster/prod-eu/ns/shop/sa/payments"


def test_one_spiffe_id_alternating_claims_and_unhashable_claim_values() -> None:
    engine = Engine(
        compile_all(
            policy(
                role("reader", "{apiGroups: [''], resources: [pods], verbs: [get]}")
                + binding(
                    "gold",
                    "reader",
                    "[{matchExpressions: [{key: tier, operator: In, values: [gold]}]}]",
                )
            ),
            REGISTRY,
            1,
        )["prod-eu"]
    )
    get_pods = parse_request({"verb": "get", "resource": "pods", "namespace": "shop"})
    for _ in range(3):  # the memo keeps one entry per SPIFFE ID: each change looks again
        assert engine.decide(PAYMENTS, {"tier": "gold"}, get_pods).allowed
        assert not engine.decide(PAYMENTS, {"tier": ["gold"]}, get_pods).allowed
        assert not engine.decide(PAYMENTS, {}, get_pods).allowed


def test_a_service_host_reads_the_same_every_time() -> None:
    engine = Engine(
        compile_all(
            policy(
                role("api", "{services: [orders.shop.svc], paths: ['/**'], methods: [GET]}")
                + binding("b", "api", "[{workload: payments}]")
            ),
            REGISTRY,
            1,
        )["prod-eu"]
    )
    claims = {"project": "shop", "environment": "prod", "tier": "gold"}
    cases = [
        ({"host": "orders.shop.svc.cluster.local", "path": "/a", "method": "GET"}, True),
        ({"host": "orders", "path": "/a", "method": "GET", "namespace": "shop"}, True),
        ({"host": "orders", "path": "/a", "method": "GET", "namespace": "web"}, False),
        ({"host": "orders.shop", "path": "/a", "method": "GET"}, False),  # two readings
        ({"host": "orders.shop.svc", "path": "/a", "method": "POST"}, False),
    ]
    for _ in range(2):
        for body, expected in cases:
            assert engine.decide(PAYMENTS, claims, parse_request(body)).allowed is expected, body


def test_compile_all_writes_the_bundles_compile_bundle_writes() -> None:
    for name, bundle in BUNDLES.items():
        alone = compile_bundle(WORLD.policy, WORLD.registry, name, 1)
        assert json.dumps(bundle, separators=(",", ":")) == json.dumps(alone, separators=(",", ":"))
    assert {len(b["bindings"]) for b in BUNDLES.values()} != {SIZES.bindings}  # scopes select


@pytest.mark.parametrize("text", ["ascii", "ünïcode ✓"])
def test_sign_bundle_signs_the_bytes_jwt_encode_would(text: str) -> None:
    _, jwk, key = es256_key()
    name = sorted(BUNDLES)[0]
    bundle = {**BUNDLES[name], "identities": {"x": {"workload": text, "claims": {}}}}
    ours = sign_bundle(bundle, key)
    theirs = jwt.encode(
        bundle, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": BUNDLE_TYP}
    )
    assert ours.split(".")[:2] == theirs.split(".")[:2]
    assert verify_bundle(ours, KeyRing({"keys": [jwk]}), name) == bundle


@pytest.mark.parametrize("enabled", [True, False])
def test_building_and_compiling_leave_the_collector_as_they_found_it(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        Engine(BUNDLES[sorted(BUNDLES)[0]])
        compile_all(WORLD.policy, WORLD.registry, 2)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
