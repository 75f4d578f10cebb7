"""The agent's quota for refusals of unauthenticated questions, in-process on a clock the
test moves (the agent is built as ``trustmesh agent`` builds it, ``build_agent``): a
flood of questions with no token or a bad one, on every surface, spools a bounded
number of events whose summaries add up exactly; decisions about identities whose
token verified — allowed, denied or revoked — are all spooled one by one; what was
folded survives a restart, and a summary that cannot be spooled is reported, with its
counts, as dropped before the next event."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from agent_support import FakeClock, client_of, local_agent

from trustmesh.agent.main import Agent
from trustmesh.agent.spool import SPOOL_DIR, AuditSpool
from trustmesh.audit import events as ev
from trustmesh.audit.folding import FoldingLimits
from trustmesh.identity.keys import ActiveKey, generate_private_key, public_jwk
from trustmesh.identity.svid import mint_svid
from trustmesh.policy.bundle import sign_bundle
from trustmesh.policy.compiler import BUNDLE_KIND
from trustmesh.revocation import Revocation
from trustmesh.revocation.model import revocation_expiry
from trustmesh.spiffeid import cluster_audience

TRUST_DOMAIN = "corp.example"
ISSUER = "https://trustmesh.test"
CLUSTER = "east"
SUBJECT = f"spiffe://{TRUST_DOMAIN}/cluster/west/ns/shop/sa/payments"
QUOTA = 20
WINDOW = 10.0
READ = {"host": "orders.shop.svc", "path": "/api/orders", "method": "GET"}
DELETE = {"host": "orders.shop.svc", "path": "/api/orders", "method": "DELETE"}


def bundle() -> dict[str, Any]:
    return {
        "apiVersion": "trustmesh.io/v1alpha1",
        "kind": BUNDLE_KIND,
        "cluster": CLUSTER,
        "revision": 7,
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
    """An agent with a quota of ``QUOTA`` refusals a ``WINDOW``, and the key, bundle and
    revocation list its control plane would have sent."""

    def __init__(self, data_dir: Path, clock: FakeClock) -> None:
        self.clock = clock
        self.data_dir = data_dir
        private = generate_private_key("ES256")
        jwk = public_jwk(private, "ES256")
        self.key = ActiveKey(jwk["kid"], "ES256", private)
        self.agent = self.start(jwk)

    def start(self, jwk: dict[str, Any] | None = None) -> Agent:
        agent = local_agent(
            self.data_dir,
            CLUSTER,
            self.clock,
            audit_refusals=FoldingLimits(window=WINDOW, quota=QUOTA, per_source=None),
        )
        jwk = jwk or public_jwk(self.key.private_key, "ES256")
        agent.decider.authn.configure(
            issuer=ISSUER, trust_domain=TRUST_DOMAIN, jwks={"keys": [jwk]}
        )
        assert agent.policy.install(sign_bundle(bundle(), self.key))
        agent.revocations.apply(1, [], full=True)
        return agent

    def restart(self) -> None:
        asyncio.run(self.agent.stop())  # SIGTERM's path: summary spooled, then the spool closed
        self.agent = self.start()

    def svid(self) -> str:
        now = int(self.clock())
        return mint_svid(
            self.key,
            {
                "iss": ISSUER,
                "sub": SUBJECT,
                "aud": [cluster_audience(TRUST_DOMAIN, CLUSTER)],
                "iat": now,
                "nbf": now,
                "exp": now + 3600,
                "jti": secrets.token_urlsafe(12),
                "workload_id": "payments",
                "cluster": "west",
                "namespace": "shop",
                "service_account": "payments",
                "project": "shop",
            },
        )

    def spooled(self) -> list[dict[str, Any]]:
        self.agent.spool.sync()
        directory = self.data_dir / SPOOL_DIR
        return [
            orjson.loads(line)
            for path in sorted(directory.glob("segment-*.jsonl"))
            for line in path.read_bytes().splitlines()
        ]


@pytest.fixture
def federation(tmp_path: Path, clock: FakeClock) -> Iterator[Federation]:
    federation = Federation(tmp_path / "agent", clock)
    yield federation
    federation.agent.spool.close()


def token_review(token: str) -> dict[str, Any]:
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token},
    }


async def ask(http: httpx.AsyncClient, surface: str, token: str | None) -> httpx.Response:
    """One question on ``surface`` with ``token`` (None: no token at all)."""
    if surface == "authorize":
        return await http.post("/v1/authorize", json={"token": token or "x", "request": READ})
    if surface == "ext_authz":
        headers = {"host": "orders.shop.svc"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return await http.get("/ext_authz/api/orders", headers=headers)
    return await http.post("/k8s/authenticate", json=token_review(token or "x"))


def flood(federation: Federation, questions: list[tuple[str, str | None]]) -> list[int]:
    async def run() -> list[int]:
        async with client_of(federation.agent) as http:
            return [(await ask(http, surface, token)).status_code for surface, token in questions]

    return asyncio.run(run())


def refusals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["type"] == ev.AUTHZ_DECISION
        and str(e["decision"]["reason"]).startswith("unauthenticated: ")
    ]


def summaries(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = [e for e in events if e["type"] == ev.REFUSALS_FOLDED]
    for event in found:
        ev.check_event(event)  # valid events of the one schema, counts included
        assert event["cluster"] == CLUSTER and event["source"]["kind"] == "agent"
    return found


def test_a_flood_of_unauthenticated_questions_is_bounded_on_every_surface(
    federation: Federation, clock: FakeClock
) -> None:
    surfaces = ("authorize", "ext_authz", "tokenreview")
    questions = [
        (surface, token) for n in range(300) for surface in surfaces for token in ("a.b.c", None)
    ]
    statuses = flood(federation, questions)
    # every question is still answered as what it is: the quota changes the log only
    assert Counter(zip((s for s, _ in questions), statuses, strict=True)) == {
        ("authorize", 401): 600,
        ("ext_authz", 401): 600,
        ("tokenreview", 200): 600,
    }
    events = federation.spooled()
    assert len(refusals(events)) == QUOTA and summaries(events) == []  # the window is open

    clock.advance(WINDOW)
    federation.agent.decider.audit.tick()  # what the agent's timer does
    events = federation.spooled()
    individual = refusals(events)
    (summary,) = summaries(events)
    detail = summary["detail"]
    assert len(events) == QUOTA + 1
    assert detail["folded_type"] == ev.AUTHZ_DECISION
    assert detail["folded"] == len(questions) - QUOTA == 1_780
    spooled_by_surface = Counter(e["request"]["surface"] for e in individual)
    folded_by_surface = detail["by"]["surface"]["values"]
    for surface in surfaces:
        assert spooled_by_surface[surface] + folded_by_surface.get(surface, 0) == 600
    assert sum(detail["by"]["error"]["values"].values()) == detail["folded"]
    assert set(detail["by"]["error"]["values"]) <= {"malformed", "missing_token"}
    assert detail["limits"] == {"window_ms": 10_000, "quota": QUOTA}
    # the two tokens presented, "a.b.c" and "x": of each only its SHA-256
    assert set(detail["sample_token_sha256"]) <= {ev.token_sha256("a.b.c"), ev.token_sha256("x")}
    assert "a.b.c" not in orjson.dumps(events).decode()

    metrics = asyncio.run(metrics_of(federation))
    assert "trustmesh_agent_audit_refusals_folded_total 1780.0" in metrics


async def metrics_of(federation: Federation) -> str:
    async with client_of(federation.agent) as http:
        return (await http.get("/metrics")).text


def test_a_single_refusal_on_each_surface_is_an_event_of_its_own(
    federation: Federation, clock: FakeClock
) -> None:
    for surface in ("authorize", "ext_authz", "tokenreview"):
        clock.advance(WINDOW)  # a new window each time
        flood(federation, [(surface, "a.b.c")])
    federation.restart()
    events = federation.spooled()
    assert [e["request"]["surface"] for e in refusals(events)] == [
        "authorize",
        "ext_authz",
        "tokenreview",
    ]
    assert summaries(events) == []


def test_decisions_about_authenticated_identities_are_never_folded(
    federation: Federation, clock: FakeClock
) -> None:
    token = federation.svid()
    questions: list[tuple[str, str | None]] = []
    for _ in range(100):
        questions += [("authorize", "a.b.c"), ("ext_authz", None)]
    flood(federation, questions)  # the quota is used up

    async def decide() -> list[int]:
        answers = []
        async with client_of(federation.agent) as http:
            for n in range(150):
                request = DELETE if n % 3 else READ
                answer = await http.post("/v1/authorize", json={"token": token, "request": request})
                answers.append(answer.status_code)
                answers.append((await ask(http, "ext_authz", "a.b.c")).status_code)
        return answers

    decide_answers = asyncio.run(decide())
    assert decide_answers.count(200) == 150  # allowed or denied: 200 with the decision
    # a verified token that is revoked: refused, and each refusal recorded
    identity = federation.agent.decider.authn.authenticate(token, clock())
    revoked = Revocation(2, "jti", identity.jti, clock(), revocation_expiry(clock()), "", "admin")
    federation.agent.revocations.apply(2, [revoked], full=False)
    assert flood(federation, [("authorize", token)] * 40) == [401] * 40

    clock.advance(WINDOW)
    federation.agent.decider.audit.tick()
    events = federation.spooled()
    decided = [e for e in events if e.get("actor") == SUBJECT]
    assert len(decided) == 150
    verdicts = Counter(e["decision"]["allowed"] for e in decided)
    assert verdicts == {False: 100, True: 50}
    revoked_refusals = [
        e for e in events if e.get("decision", {}).get("reason") == "unauthenticated: revoked"
    ]
    assert len(revoked_refusals) == 40
    unauthenticated = [e for e in refusals(events) if e not in revoked_refusals]
    (summary,) = summaries(events)
    assert len(unauthenticated) == QUOTA
    assert summary["detail"]["folded"] == 200 + 150 - QUOTA


def test_what_was_folded_is_spooled_at_shutdown_and_survives_a_restart(
    federation: Federation, clock: FakeClock
) -> None:
    flood(federation, [("ext_authz", None)] * 75)
    federation.restart()  # within the window: the summary is written on the way down
    events = federation.spooled()
    (summary,) = summaries(events)
    assert len(refusals(events)) == QUOTA and summary["detail"]["folded"] == 75 - QUOTA
    # the restarted agent numbers on, and starts a new window
    flood(federation, [("ext_authz", None)] * 3)
    events = federation.spooled()
    assert len(refusals(events)) == QUOTA + 3
    assert [e["source"]["seq"] for e in events] == list(range(1, len(events) + 1))


def test_a_summary_that_cannot_be_spooled_is_reported_as_dropped_before_the_next_event(
    federation: Federation, clock: FakeClock
) -> None:
    flood(federation, [("authorize", "a.b.c")] * 50)  # 20 spooled, 30 folded
    spool = federation.agent.spool
    spool.close()  # from now on every write fails
    clock.advance(WINDOW)
    federation.agent.decider.audit.tick()  # the summary of 30 cannot be spooled
    # a refusal within the new window's quota cannot be spooled either: 503, counted
    assert flood(federation, [("authorize", "d.e.f")]) == [503]
    assert federation.agent.decider.audit.folder.dropped_total == 31

    reopened = AuditSpool.open(federation.data_dir / SPOOL_DIR, fsync_interval=0)
    federation.agent.spool = federation.agent.decider.audit.spool = reopened
    assert flood(federation, [("authorize", federation.svid())]) == [200]
    events = federation.spooled()
    *_, summary, decision = events
    assert summary["type"] == ev.REFUSALS_FOLDED and decision["actor"] == SUBJECT
    assert summary["source"]["seq"] + 1 == decision["source"]["seq"]
    ev.check_event(summary)
    detail = summary["detail"]
    assert detail["folded"] == 0 and detail["dropped"]["count"] == 31
    assert detail["dropped"]["by"]["error"]["values"] == {"malformed": 31}
    assert len(refusals(events)) == QUOTA
