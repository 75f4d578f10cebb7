"""From real traffic to escalation, through the control plane's own analytics runner
(issue 15): forged service-account tokens refused at the exchange become a
``refusal_burst`` finding — a row in ``get anomalies``, an ``anomaly.detected`` event
whose evidence indexes are those refusals, the ``trustmesh_anomalies_total`` counter,
and a signed SET pushed to an EventReceiver that verifies it with PyJWT from the JWKS
alone; and a denial storm by one workload, with ``quarantine: true``, suspends it: its
next exchange is refused. Nothing here puts a finding in by hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from anomaly_support import Receivers, anomalies, entry, good_receiver, running_receivers, wait_for
from cryptography.hazmat.primitives.asymmetric import ec

from helpers import register_federation, start_agent, start_server
from trustmesh.sim import SimulatedCluster

POLICY = """apiVersion: trustmesh.io/v1alpha1
kind: AnomalyPolicy
metadata: {name: test}
spec:
  detectors:
    refusal_burst: {warmup: 0, threshold: 3, window: 600, baselineWindow: 3600}
    denial_burst: {warmup: 0, threshold: 5, window: 600, baselineWindow: 3600, quarantine: true}
"""


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    with running_receivers() as seen:
        yield seen


def test_forged_tokens_and_a_denial_storm_reach_people_receivers_and_the_agents(
    tmp_path: Path, sim_cluster: SimulatedCluster, receivers: Receivers
) -> None:
    server = start_server(tmp_path / "cp", analytics="process")
    agent = None
    try:
        fed = register_federation(server, sim_cluster)
        server.apply(POLICY + "---\n" + good_receiver(receivers, server, tmp_path))

        # 1. forged service-account tokens: a real token's claims, the attacker's key
        genuine = fed.sa_token()
        claims = jwt.decode(genuine, options={"verify_signature": False})
        kid = jwt.get_unverified_header(genuine).get("kid")
        forger = ec.generate_private_key(ec.SECP256R1())
        for _ in range(4):
            forged = jwt.encode(claims, forger, algorithm="ES256", headers={"kid": kid})
            assert server.exchange(forged, fed.audience).status_code in (400, 401)

        found = wait_for("a refusal_burst finding", lambda: anomalies(server, "refusal_burst"))
        (finding,) = found
        assert finding["subject"] == {"issuer": fed.origin.issuer}
        assert finding["state"] == "open"
        evidence = finding["evidence"]
        assert len(evidence) >= 3
        for index in evidence:  # provable: each is one of the refused exchanges
            refused = entry(server, index)
            assert refused["type"] == "token.exchange_failed"
            assert refused["detail"]["claimed"]["iss"] == fed.origin.issuer

        # the event, with the same evidence
        detected = server.admin.get("/v1/audit/query", params={"type": "anomaly.detected"})
        assert detected.status_code == 200, detected.text
        events = [e["event"] for e in detected.json()["entries"]]
        mine = [e for e in events if e["detail"]["detector"] == "refusal_burst"]
        assert len(mine) == 1 and mine[0]["detail"]["evidence"] == evidence

        # the counter
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert 'trustmesh_anomalies_total{detector="refusal_burst"} 1.0' in metrics

        # the SET, verified by the receiver from the JWKS alone
        pushed = wait_for("the SET at the receiver", lambda: receivers.accepted.get("/good"))
        event = pushed[0]["events"]["https://trustmesh.io/secevent/anomaly"]
        assert event["detector"] == "refusal_burst" and event["evidence"] == evidence

        # 2. a denial storm by one workload: quarantined (suspended) by the runner
        agent = start_agent(
            fed.target_name, [server.url], tmp_path / "agent", server.credential(fed.target_name)
        )
        svid = server.exchange(fed.sa_token(), fed.audience)
        assert svid.status_code == 200, svid.text
        token = svid.json()["access_token"]
        for _ in range(6):  # no binding: every call is denied
            answer = agent.authorize(token)
            assert answer.status_code == 200 and answer.json()["allowed"] is False, answer.text
        storm = wait_for("a denial_burst finding", lambda: anomalies(server, "denial_burst"))
        assert storm[0]["quarantined"], storm[0]
        refused = wait_for(
            "the quarantined workload refused at the exchange",
            lambda: (r := server.exchange(fed.sa_token(), fed.audience)).status_code == 400 and r,
        )
        assert refused.json()["error"] == "invalid_grant", refused.text
        # and the agent refuses the token it holds: the suspension revoked what was issued
        cut = wait_for(
            "the agent refusing the quarantined workload's token",
            lambda: (a := agent.authorize(token)).status_code == 401 and a,
        )
        assert cut.json()["reason"] == "revoked", cut.text
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
