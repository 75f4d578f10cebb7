"""concurrent_use from real traffic, through the control plane's own analytics runner
(issue 15): a credential is bound to the one workload instance it was issued to, so
the signal of a copy is the same credential presented from two places at once.

Real agents of two clusters, one JWT-SVID issued for both. Presented by one address
(127.0.0.1) at both agents — a workload calling two clusters with a token of two
audiences — it is quiet. Another such token presented from 127.0.0.1 at one agent and
from 127.0.0.2 at the other (the agents read the address off the HTTP connection) is
a finding: a row of ``/v1/anomalies`` naming both clusters and both addresses, an
``anomaly.detected`` event whose evidence is the two decisions, and a signed SET pushed
to an EventReceiver that verifies it with PyJWT from the JWKS alone. Nothing here puts
a finding in by hand."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from anomaly_support import (
    TOKEN,
    Receivers,
    anomalies,
    entry,
    receiver_yaml,
    running_receivers,
    wait_for,
)

from helpers import (
    DEFAULT_REQUEST,
    TRUST_DOMAIN,
    Agent,
    Server,
    allow_gets_of,
    register_federation,
    start_agent,
    start_server,
)
from trustmesh.sim import SimulatedCluster


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    with running_receivers() as seen:
        yield seen


POLICY = """apiVersion: trustmesh.io/v1alpha1
kind: AnomalyPolicy
metadata: {name: test}
spec:
  detectors:
    concurrent_use: {warmup: 0, window: 600}
"""


def authorize_from(agent: Agent, token: str, address: str) -> dict[str, Any]:
    """``POST /v1/authorize`` from a connection bound to ``address`` (any 127/8 address
    is this host's loopback)."""
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, timeout=10) as client:
        answer = client.post(
            agent.url + "/v1/authorize", json={"token": token, "request": DEFAULT_REQUEST}
        )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["allowed"] is True, body
    return body


def decisions_of(server: Server, jti: str) -> list[dict[str, Any]]:
    """The log's entries (``index``, ``event``) of decisions about the token ``jti``."""
    answer = server.admin.get("/v1/audit/query", params={"type": "authz.decision", "limit": 1000})
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["entries"]
    assert answer.json()["next"] is None  # one page: a fresh control plane's log
    return [e for e in found if e["event"].get("identity", {}).get("jti") == jti]


def test_one_token_from_two_places_at_two_clusters_is_reported_and_from_one_is_not(
    tmp_path: Path,
    sim_cluster: SimulatedCluster,
    receivers: Receivers,
) -> None:
    server = start_server(tmp_path / "cp", analytics="process")
    agents: list[Agent] = []
    try:
        metadata = httpx.get(server.url + "/.well-known/ssf-configuration", timeout=10).json()
        receivers.issuer, receivers.jwks_uri = metadata["issuer"], metadata["jwks_uri"]
        token_file = tmp_path / "siem.token"
        token_file.write_text(TOKEN + "\n")
        os.chmod(token_file, 0o600)
        fed = register_federation(server, sim_cluster)
        server.apply(allow_gets_of(fed.workload))
        server.apply(POLICY + "---\n" + receiver_yaml("good", receivers.url("/good"),
                                                       token_file=str(token_file)))  # fmt: skip
        target, origin = (
            start_agent(name, [server.url], tmp_path / name, server.credential(name))
            for name in (fed.target_name, fed.origin_name)
        )
        agents += [target, origin]
        both = [fed.audience, f"spiffe://{TRUST_DOMAIN}/cluster/{fed.origin_name}"]

        def svid() -> tuple[str, str]:
            answer = server.exchange(fed.sa_token(), both)
            assert answer.status_code == 200, answer.text
            token: str = answer.json()["access_token"]
            return token, authorize_from(target, token, "127.0.0.1")["identity"]["jti"]

        # 1. one workload, one address, a token of two audiences used at both clusters
        quiet, quiet_jti = svid()
        authorize_from(origin, quiet, "127.0.0.1")
        authorize_from(target, quiet, "127.0.0.1")
        wait_for(
            "its three decisions in the log", lambda: len(decisions_of(server, quiet_jti)) == 3
        )
        sources = {e["event"]["request"]["source"] for e in decisions_of(server, quiet_jti)}
        assert sources == {"127.0.0.1"}

        # 2. another such token, also presented from another address at the other cluster
        copied, copied_jti = svid()
        authorize_from(origin, copied, "127.0.0.2")
        found = wait_for("a concurrent_use finding", lambda: anomalies(server, "concurrent_use"))
        (finding,) = found  # the copy only: the quiet token made none
        assert finding["key"] == f"concurrent_use:jti:{copied_jti}"
        assert finding["subject"] == {"spiffeId": f"spiffe://{TRUST_DOMAIN}/cluster/"
                                      f"{fed.origin_name}/ns/shop/sa/payments"}  # fmt: skip
        assert finding["severity"] == "high" and finding["state"] == "open"
        details = finding["details"]
        assert details["clusters"] == sorted([fed.origin_name, fed.target_name])
        assert details["sources"] == ["127.0.0.1", "127.0.0.2"]
        evidence = finding["evidence"]
        assert evidence == sorted(e["index"] for e in decisions_of(server, copied_jti))
        where = set()
        for index in evidence:  # provable: each is one of the two decisions
            decided = entry(server, index)
            assert decided["type"] == "authz.decision"
            assert decided["identity"]["jti"] == copied_jti
            where.add((decided["cluster"], decided["request"]["source"]))
        assert where == {(fed.target_name, "127.0.0.1"), (fed.origin_name, "127.0.0.2")}
        # the quiet token's decisions were read before the copy's, and made nothing
        assert max(e["index"] for e in decisions_of(server, quiet_jti)) < min(evidence)

        # the event, with the same evidence
        detected = server.admin.get("/v1/audit/query", params={"type": "anomaly.detected"})
        assert detected.status_code == 200, detected.text
        events = [e["event"] for e in detected.json()["entries"]]
        mine = [e for e in events if e["detail"]["detector"] == "concurrent_use"]
        assert len(mine) == 1 and mine[0]["detail"]["evidence"] == evidence
        assert mine[0]["detail"]["details"]["sources"] == ["127.0.0.1", "127.0.0.2"]

        # the SET, verified by the receiver from the JWKS alone
        def pushed() -> list[dict[str, Any]]:
            claims = receivers.accepted.get("/good", [])
            sets = [c["events"]["https://trustmesh.io/secevent/anomaly"] for c in claims]
            return [s for s in sets if s["detector"] == "concurrent_use"]

        (event,) = wait_for("the SET at the receiver", pushed)
        assert event["evidence"] == evidence
        assert event["details"]["clusters"] == details["clusters"]
        assert event["details"]["sources"] == ["127.0.0.1", "127.0.0.2"]
    finally:
        for agent in agents:
            agent.stop()
        server.stop()
