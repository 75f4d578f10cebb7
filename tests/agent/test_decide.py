"""The decision pipeline in-process, on a clock the test moves: the verified-token cache
and its expiry, revocations, the staleness bound in strict and fail-open mode, the
key-set refresh on an unknown kid, and that every answer is audited. The agent is built
exactly as ``trustmesh agent`` builds it (``build_agent``); only the clock is fake and
the control plane is absent, and the state it would send (key set, signed bundle,
revocation list) is installed through the same holders the sync loops use."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from agent_support import FakeClock, client_of, local_agent, reason

from trustmesh.agent.decide import AUTHORIZE, Decider, Outcome
from trustmesh.agent.main import Agent
from trustmesh.agent.spool import segment_name
from trustmesh.common.tracing import Span
from trustmesh.identity.keys import ActiveKey, generate_private_key, public_jwk
from trustmesh.identity.svid import mint_svid
from trustmesh.policy.bundle import sign_bundle
from trustmesh.policy.compiler import BUNDLE_KIND
from trustmesh.request import ServiceRequest, parse_request
from trustmesh.revocation import Revocation
from trustmesh.revocation.model import revocation_expiry
from trustmesh.spiffeid import cluster_audience

TRUST_DOMAIN = "corp.example"
ISSUER = "https://trustmesh.test"
CLUSTER = "east"
SUBJECT = f"spiffe://{TRUST_DOMAIN}/cluster/west/ns/shop/sa/payments"
BOUND = 300.0
GET_ORDERS = parse_request({"host": "orders.shop.svc", "path": "/api/orders", "method": "GET"})
SPAN = Span(trace_id="a" * 32, span_id="b" * 16, parent_span_id=None)


def signing_key() -> tuple[ActiveKey, dict[str, Any]]:
    private = generate_private_key("ES256")
    jwk = public_jwk(private, "ES256")
    return ActiveKey(jwk["kid"], "ES256", private), jwk


def bundle(revision: int = 7) -> dict[str, Any]:
    return {
        "apiVersion": "trustmesh.io/v1alpha1",
        "kind": BUNDLE_KIND,
        "cluster": CLUSTER,
        "revision": revision,
        "registryRevision": 1,
        "roles": {
            "reader": [{"services": ["orders.shop.svc"], "paths": ["/api/**"], "methods": ["GET"]}]
        },
        "bindings": [
            {
                "name": "shop-reads",
                "role": "reader",
                "effect": "allow",
                "subjects": [{"claims": {"project": "shop"}}],
                "namespaces": None,
            }
        ],
        "identities": {},
    }


class Federation:
    """An agent, and what its control plane would have sent it."""

    def __init__(self, tmp_path: Path, clock: FakeClock, **config: object) -> None:
        self.clock = clock
        self.key, jwk = signing_key()
        self.agent: Agent = local_agent(tmp_path / "agent", CLUSTER, clock, **config)
        self.agent.decider.authn.configure(
            issuer=ISSUER, trust_domain=TRUST_DOMAIN, jwks={"keys": [jwk]}
        )
        assert self.agent.policy.install(sign_bundle(bundle(), self.key))
        self.agent.revocations.apply(1, [], full=True)  # synced now

    @property
    def decider(self) -> Decider:
        return self.agent.decider

    def svid(self, ttl: int = 300, key: ActiveKey | None = None) -> str:
        now = int(self.clock())
        return mint_svid(
            key or self.key,
            {
                "iss": ISSUER,
                "sub": SUBJECT,
                "aud": [cluster_audience(TRUST_DOMAIN, CLUSTER)],
                "iat": now,
                "nbf": now,
                "exp": now + ttl,
                "jti": secrets.token_urlsafe(12),
                "workload_id": "payments",
                "cluster": "west",
                "namespace": "shop",
                "service_account": "payments",
                "project": "shop",
            },
        )

    def decide(self, token: str | None, request: ServiceRequest = GET_ORDERS) -> Outcome:
        return asyncio.run(self.decider.decide(token, request, AUTHORIZE, SPAN))

    def spooled(self) -> list[dict[str, Any]]:
        self.agent.spool.sync()
        path = self.agent.config.data_dir / "audit-spool" / segment_name(1)
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def federation(tmp_path: Path, clock: FakeClock) -> Iterator[Federation]:
    federation = Federation(tmp_path, clock, staleness_bound=BOUND)
    yield federation
    federation.agent.spool.close()


def test_allows_by_policy_and_audits_before_answering(federation: Federation) -> None:
    token = federation.svid()
    outcome = federation.decide(token)
    assert outcome.allowed and outcome.identity is not None
    assert outcome.decision is not None and outcome.decision.policy_revision == 7
    denied = federation.decide(
        token, parse_request({"host": "orders.shop.svc", "path": "/api/x", "method": "DELETE"})
    )
    assert not denied.allowed and denied.refusal is None
    events = federation.spooled()
    assert [e["decision"]["allowed"] for e in events] == [True, False]
    assert events[0]["decision"]["decision_id"] == outcome.decision.decision_id
    assert token not in str(events)


def test_the_audit_event_holds_the_request_as_the_cluster_reads_it(
    federation: Federation,
) -> None:
    """The host with the cluster domain (the bundle has none: cluster.local) is read as
    the service it names, in its namespace — and that is what the event records."""
    outcome = federation.decide(
        federation.svid(),
        parse_request(
            {
                "host": "Orders.shop.svc.cluster.local.:8080",
                "path": "/api/%6Frders?x",
                "method": "GET",
            }
        ),
    )
    assert outcome.allowed
    [event] = federation.spooled()
    assert {k: event["request"][k] for k in ("host", "path", "method", "namespace")} == {
        "host": "orders.shop.svc",
        "path": "/api/orders",
        "method": "GET",
        "namespace": "shop",
    }


def test_a_cached_token_expires_on_the_clock(federation: Federation, clock: FakeClock) -> None:
    token = federation.svid(ttl=60)
    assert federation.decide(token).allowed
    cache = federation.decider.authn.cache
    assert len(cache) == 1 and cache.misses == 1
    clock.advance(30)
    assert federation.decide(token).allowed and cache.hits == 1
    clock.advance(30 + federation.decider.authn.leeway + 1)  # past exp + leeway
    assert reason(federation.decide(token)) == "expired"
    assert len(cache) == 0  # the expired entry is gone


def test_a_removed_key_drops_every_cached_verification(federation: Federation) -> None:
    token = federation.svid()
    assert federation.decide(token).allowed
    _, other = signing_key()
    federation.decider.authn.configure(
        issuer=ISSUER, trust_domain=TRUST_DOMAIN, jwks={"keys": [other]}
    )
    assert len(federation.decider.authn.cache) == 0
    assert reason(federation.decide(token)) == "unknown_kid"


def test_revocations_refuse_cached_tokens(federation: Federation, clock: FakeClock) -> None:
    token, bystander = federation.svid(), federation.svid()
    assert federation.decide(token).allowed and federation.decide(bystander).allowed
    identity = federation.decide(token).identity
    assert identity is not None
    revoked_at = clock()
    entry = Revocation(
        2, "jti", identity.jti, revoked_at, revocation_expiry(revoked_at), "leaked", "admin"
    )
    federation.agent.revocations.apply(2, [entry], full=False)
    assert reason(federation.decide(token)) == "revoked"
    assert federation.decide(bystander).allowed
    clock.advance(1)
    subject = Revocation(3, "subject", SUBJECT, clock(), revocation_expiry(clock()), "", "admin")
    federation.agent.revocations.apply(3, [subject], full=False)
    assert reason(federation.decide(bystander)) == "revoked"
    clock.advance(1)
    assert federation.decide(federation.svid()).allowed  # issued after the cut-off


def test_strict_mode_refuses_everything_once_the_list_is_stale(
    federation: Federation, clock: FakeClock
) -> None:
    token = federation.svid(ttl=3600)
    clock.advance(BOUND - 1)
    assert federation.decide(token).allowed
    ready, detail = federation.agent.surfaces.readiness()
    assert detail["revocation_stale"] is False
    clock.advance(2)
    assert reason(federation.decide(token)) == "revocation_state_stale"
    ready, detail = federation.agent.surfaces.readiness()
    assert (
        not ready and detail["revocation_stale"] is True and detail["revocation_mode"] == "strict"
    )
    federation.agent.revocations.apply(1, [], full=True)  # the control plane is back
    assert federation.decide(token).allowed
    assert federation.agent.surfaces.readiness()[0]


def test_fail_open_keeps_answering_from_a_stale_list(tmp_path: Path, clock: FakeClock) -> None:
    federation = Federation(tmp_path, clock, staleness_bound=BOUND, fail_open=True)
    token = federation.svid(ttl=3600)
    clock.advance(BOUND + 60)
    assert federation.decide(token).allowed
    ready, detail = federation.agent.surfaces.readiness()
    assert ready and detail["revocation_stale"] is True and detail["revocation_mode"] == "fail-open"
    federation.agent.spool.close()


def test_an_unknown_kid_refreshes_the_key_set_once(federation: Federation) -> None:
    """A token signed by a key the agent has not seen yet: one refresh, one retry."""
    rotated, rotated_jwk = signing_key()
    refreshes = []

    async def refresh() -> bool:  # what KeySync.request_refresh does when the sync succeeds
        refreshes.append(1)
        federation.decider.authn.configure(
            issuer=ISSUER, trust_domain=TRUST_DOMAIN, jwks={"keys": [rotated_jwk]}
        )
        return True

    federation.decider.refresh_keys = refresh
    assert federation.decide(federation.svid(key=rotated)).allowed
    assert len(refreshes) == 1

    async def refused() -> bool:  # rate-limited: no refresh now
        return False

    federation.decider.refresh_keys = refused
    stranger, _ = signing_key()
    assert reason(federation.decide(federation.svid(key=stranger))) == "unknown_kid"


def test_no_credential_is_a_refusal_that_is_audited(federation: Federation) -> None:
    assert reason(federation.decide(None)) == "missing_token"
    (event,) = federation.spooled()
    assert event["decision"] == {
        "allowed": False,
        "reason": "unauthenticated: missing_token",
        "policy_revision": 7,
    }


def test_readyz_and_metrics_over_http(federation: Federation, clock: FakeClock) -> None:
    token = federation.svid()

    async def ask() -> tuple[int, int, str]:
        async with client_of(federation.agent) as http:
            answer = await http.post(
                "/v1/authorize", json={"token": token, "request": GET_ORDERS.to_json()}
            )
            clock.advance(BOUND + 1)
            stale = await http.get("/readyz")
            metrics = (await http.get("/metrics")).text
        return answer.status_code, stale.status_code, metrics

    allowed, stale, metrics = asyncio.run(ask())
    assert allowed == 200 and stale == 503
    assert "trustmesh_agent_revocation_stale 1.0" in metrics
    assert 'trustmesh_agent_decisions_total{outcome="allow"} 1.0' in metrics
