"""Each detector family over a real log: real traffic through a real control plane and
real agents, the log read back through ``/v1/audit/query``, the detectors run over the
entries it returns; the finding and its evidence indexes are checked against the
entries. (The runner that does this inside the control plane is tested on its own.)"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from helpers import (
    DEFAULT_REQUEST,
    TRUST_DOMAIN,
    Agent,
    Federation,
    Server,
    allow_gets_of,
    eventually,
    register_federation,
    start_agent,
    start_server,
)
from trustmesh.analytics.detectors import (
    ConcurrentUse,
    DenialBurst,
    Detector,
    DormantUse,
    NewEdge,
    RefusalBurst,
    WrongCluster,
    observe_all,
)
from trustmesh.analytics.findings import Finding
from trustmesh.analytics.settings import AnomalySettings, DetectorSettings
from trustmesh.sim import SimulatedCluster

Entry = dict[str, Any]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = start_server(tmp_path_factory.mktemp("analytics") / "data")
    yield started
    assert started.stop() == 0, started.process.stderr()


@pytest.fixture
def setup(
    server: Server, sim_cluster: SimulatedCluster, tmp_path: Path
) -> Iterator[tuple[Federation, Agent]]:
    """A federation (origin cluster with one workload allowed to GET, a target
    cluster) and a real agent of the target cluster."""
    fed = register_federation(server, sim_cluster)
    server.apply(allow_gets_of(fed.workload))
    agent = start_agent(
        fed.target_name, [server.url], tmp_path / "agent", server.credential(fed.target_name)
    )
    yield fed, agent
    assert agent.stop() == 0, agent.process.stderr()


def entries(server: Server) -> list[Entry]:
    """Every entry of the log, in index order, as ``/v1/audit/query`` returns them."""
    found: list[Entry] = []
    after: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if after is not None:
            params["after"] = after
        answer = server.admin.get("/v1/audit/query", params=params)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        found.extend(body["entries"])
        if body["next"] is None:
            return found
        after = body["next"]


def logged(server: Server, check: Callable[[list[Entry]], list[Entry]], what: str) -> list[Entry]:
    """The entries ``check`` picks, once it picks some (agents ship their decisions
    a moment after answering)."""
    return list(eventually(lambda: check(entries(server)), what, timeout=30))


def run(detector: Detector, log: list[Entry], **named: DetectorSettings) -> list[Finding]:
    settings = AnomalySettings(detectors=named)
    return observe_all([detector], ((e["index"], e["event"]) for e in log), settings)


def of_type(log: list[Entry], kind: str, test: Callable[[Entry], bool]) -> list[Entry]:
    return [e for e in log if e["event"]["type"] == kind and test(e["event"])]


def spiffe_of(fed: Federation) -> str:
    return f"spiffe://{TRUST_DOMAIN}/cluster/{fed.origin_name}/ns/shop/sa/payments"


def audience(cluster: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/cluster/{cluster}"


NO_WARMUP = {"warmup": 0.0}


def test_new_edges_on_first_reach_then_quiet(
    setup: tuple[Federation, Agent], server: Server
) -> None:
    fed, agent = setup
    token = fed.svid()
    assert agent.authorize(token).json()["allowed"] is True
    decided = logged(
        server,
        lambda log: of_type(log, "authz.decision", lambda e: e.get("actor") == spiffe_of(fed)),
        "the decision in the log",
    )
    # the same traffic again: known edges
    assert agent.authorize(fed.svid()).json()["allowed"] is True
    log = logged(
        server,
        lambda log: (
            log
            if len(of_type(log, "authz.decision", lambda e: e.get("actor") == spiffe_of(fed))) == 2
            else []
        ),
        "the second decision",
    )
    settings = DetectorSettings(window=60, threshold=1, baseline_window=3600, **NO_WARMUP)
    findings = [
        f for f in run(NewEdge(), log, new_edge=settings) if f.subject["workload"] == fed.workload
    ]
    issued = of_type(log, "token.issued", lambda e: e["identity"].get("workload") == fed.workload)
    pair = f"new_edge:{fed.workload}|{fed.origin_name}->{fed.target_name}"
    assert [(f.key, f.evidence) for f in findings] == [
        (pair, [issued[0]["index"]]),  # reached first by the token issued for it
        (f"new_edge:{fed.workload}|host:api.test", [decided[0]["index"]]),
    ]
    assert findings[0].details["via"] == "token.issued"


def test_a_denial_storm_for_one_identity(setup: tuple[Federation, Agent], server: Server) -> None:
    fed, agent = setup
    token = fed.svid()
    for _ in range(8):  # the role allows GET only
        answer = agent.authorize(token, {"host": "api.test", "path": "/pay", "method": "POST"})
        assert answer.json()["allowed"] is False
    denied = logged(
        server,
        lambda log: (
            found
            if len(
                found := of_type(
                    log,
                    "authz.decision",
                    lambda e: e.get("actor") == spiffe_of(fed) and not e["decision"]["allowed"],
                )
            )
            == 8
            else []
        ),
        "eight denials in the log",
    )
    settings = DetectorSettings(window=600, threshold=5, baseline_window=3600, **NO_WARMUP)
    findings = run(DenialBurst(), entries(server), denial_burst=settings)
    mine = [f for f in findings if f.subject == {"spiffeId": spiffe_of(fed)}]
    assert len(mine) == 1  # once in the window, though the storm went on
    assert mine[0].key == f"denial_burst:identity:{spiffe_of(fed)}"
    assert mine[0].evidence == [e["index"] for e in denied[:6]]  # the 6th crossed 5
    assert mine[0].details["count"] == 6
    cluster = [f for f in findings if f.subject == {"cluster": fed.target_name}]
    assert len(cluster) == 1 and cluster[0].evidence == [e["index"] for e in denied[:6]]


def test_forged_tokens_and_a_token_at_the_wrong_cluster(
    setup: tuple[Federation, Agent], server: Server
) -> None:
    fed, agent = setup
    # forged: a real service-account token's claims signed with a key of the attacker's
    genuine = fed.sa_token()
    claims = jwt.decode(genuine, options={"verify_signature": False})
    kid = jwt.get_unverified_header(genuine).get("kid")
    forger = ec.generate_private_key(ec.SECP256R1())
    for _ in range(4):
        forged = jwt.encode(claims, forger, algorithm="ES256", headers={"kid": kid})
        assert server.exchange(forged, fed.audience).status_code in (400, 401)
    refused = logged(
        server,
        lambda log: (
            found
            if len(
                found := of_type(
                    log,
                    "token.exchange_failed",
                    lambda e: (
                        (e.get("detail") or {}).get("claimed", {}).get("iss") == fed.origin.issuer
                    ),
                )
            )
            == 4
            else []
        ),
        "four refused exchanges in the log",
    )
    settings = DetectorSettings(window=600, threshold=3, baseline_window=3600, **NO_WARMUP)
    findings = run(RefusalBurst(), entries(server), refusal_burst=settings)
    mine = [f for f in findings if f.subject == {"issuer": fed.origin.issuer}]
    assert [(f.key, f.evidence) for f in mine] == [
        (f"refusal_burst:issuer:{fed.origin.issuer}", [e["index"] for e in refused])
    ]

    # a genuine JWT-SVID for the origin cluster, presented at the target cluster's agent
    answer = server.exchange(fed.sa_token(), audience(fed.origin_name))
    assert answer.status_code == 200, answer.text
    wrong = answer.json()["access_token"]
    assert agent.authorize(wrong).status_code == 401
    refusal = logged(
        server,
        lambda log: of_type(
            log,
            "authz.decision",
            lambda e: (
                e["decision"]["reason"] == "unauthenticated: wrong_audience"
                and e.get("cluster") == fed.target_name
            ),
        ),
        "the agent's refusal in the log",
    )
    log = entries(server)
    issued = of_type(
        log,
        "token.issued",
        lambda e: (
            e["request"].get("audience") == [audience(fed.origin_name)]
            and e["identity"].get("workload") == fed.workload
        ),
    )
    findings = run(WrongCluster(), log, wrong_cluster=DetectorSettings(window=300, warmup=0))
    mine = [f for f in findings if f.subject == {"workload": fed.workload}]
    assert [(f.key, f.evidence) for f in mine] == [
        (
            f"wrong_cluster:{spiffe_of(fed)}|{fed.target_name}",
            [issued[0]["index"], refusal[0]["index"]],
        )
    ]
    assert mine[0].details["audiences"] == [fed.origin_name]


def test_dormant_and_concurrent_use(
    setup: tuple[Federation, Agent], server: Server, tmp_path: Path
) -> None:
    fed, target_agent = setup
    origin_agent = start_agent(
        fed.origin_name, [server.url], tmp_path / "origin", server.credential(fed.origin_name)
    )
    try:
        # one JWT-SVID for both clusters, used by its workload (one address) at an agent
        # of each: legitimate, not concurrent use
        answer = server.exchange(fed.sa_token(), [fed.audience, audience(fed.origin_name)])
        assert answer.status_code == 200, answer.text
        token = answer.json()["access_token"]
        assert target_agent.authorize(token).json()["allowed"] is True
        assert origin_agent.authorize(token).json()["allowed"] is True
        mine: Callable[[Entry], bool] = lambda e: e.get("actor") == spiffe_of(fed)  # noqa: E731
        both = logged(
            server,
            lambda log: found if len(found := of_type(log, "authz.decision", mine)) == 2 else [],
            "both decisions in the log",
        )
        time.sleep(2.5)  # longer than the dormancy window below: the identity rests
        assert target_agent.authorize(token).json()["allowed"] is True
        # then the same token from another address, at the other cluster: a copy
        elsewhere = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        with elsewhere:
            answer = elsewhere.post(
                origin_agent.url + "/v1/authorize",
                json={"token": token, "request": DEFAULT_REQUEST},
                timeout=10,
            )
        assert answer.json()["allowed"] is True, answer.text
        log = logged(
            server,
            lambda log: log if len(of_type(log, "authz.decision", mine)) == 4 else [],
            "the fourth decision in the log",
        )
    finally:
        assert origin_agent.stop() == 0
    # in the order they happened (two agents ship on their own: not the log's order)
    decisions = sorted(of_type(log, "authz.decision", mine), key=lambda e: e["event"]["time"])
    sources = [d["event"]["request"]["source"] for d in decisions]
    assert sources == ["127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2"]
    concurrent = run(ConcurrentUse(), log, concurrent_use=DetectorSettings(window=60, warmup=0))
    ours = [f for f in concurrent if f.subject == {"spiffeId": spiffe_of(fed)}]
    assert len(ours) == 1  # the copy only: the first three came from one place
    # the copy, and a use from the other place at the other cluster (which of the earlier
    # uses depends on the order the two agents' batches reached the log)
    by_index = {d["index"]: d["event"] for d in decisions}
    (first, second) = (by_index[i] for i in ours[0].evidence)
    assert decisions[3]["index"] in ours[0].evidence
    assert {first["request"]["source"], second["request"]["source"]} == {"127.0.0.1", "127.0.0.2"}
    assert first["cluster"] != second["cluster"]
    assert ours[0].details["clusters"] == sorted([fed.origin_name, fed.target_name])
    assert ours[0].details["sources"] == ["127.0.0.1", "127.0.0.2"]

    dormant = run(
        DormantUse(), log, dormant_use=DetectorSettings(window=60, baseline_window=2, warmup=0)
    )
    ours = [f for f in dormant if f.subject == {"spiffeId": spiffe_of(fed)}]
    assert len(ours) == 1
    rested = max(both, key=lambda e: (e["event"]["time"], e["index"]))  # the last use before
    first_after = min(decisions[2]["index"], decisions[3]["index"])  # the first logged
    assert ours[0].evidence == [rested["index"], first_after]
