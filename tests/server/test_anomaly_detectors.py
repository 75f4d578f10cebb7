"""Three detectors fired by real traffic through real agents, found by the control
plane's own analytics runner (issue 15; docs/analytics.md): ``new_edge`` (quiet during
its warm-up, then a new cluster pair and a new service), ``wrong_cluster`` (a JWT-SVID
for one cluster presented at another cluster's agent; with ``quarantine: true``, the
workload suspended at every agent and at the exchange) and ``dormant_use`` (an identity
used again after longer than ``baselineWindow``, by the events' own times — no clock is
set in the server). For each: the row of ``/v1/anomalies?detector=``, evidence indexes
that are the triggering entries (read back through ``/v1/audit/query``), the
``anomaly.detected`` event with the same evidence, the counter, and the signed SET
pushed to a receiver that verifies it with PyJWT from the JWKS alone. Nothing here puts
a finding in by hand. (``concurrent_use`` is not here.)"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from anomaly_support import (
    Receivers,
    anomalies,
    counted,
    detected,
    entry,
    good_receiver,
    running_receivers,
    wait_for,
)

from helpers import (
    TRUST_DOMAIN,
    Agent,
    Federation,
    Server,
    allow_gets_of,
    cluster_yaml,
    register_federation,
    serve_cluster,
    start_agent,
    start_server,
    unique,
)
from trustmesh.sim import SimulatedCluster


def anomaly_policy(detectors: str) -> str:
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: AnomalyPolicy
metadata: {{name: test}}
spec:
  detectors:
{detectors}"""


def audience(cluster: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/cluster/{cluster}"


def spiffe_of(fed: Federation) -> str:
    return f"spiffe://{TRUST_DOMAIN}/cluster/{fed.origin_name}/ns/shop/sa/payments"


@dataclass
class Plane:
    """A control plane pushing to the ``good`` receiver; a federation of two served
    simulated clusters (the workload in the origin), the workload allowed any GET, and
    an agent of each cluster."""

    server: Server
    fed: Federation
    target: Agent  # an agent of the cluster the workload's tokens are for
    origin: Agent  # an agent of the workload's own cluster

    def decision(self, check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The first ``authz.decision`` entry (index and event) ``check`` accepts,
        once the agent has shipped it."""

        def found() -> dict[str, Any] | None:
            answer = self.server.admin.get(
                "/v1/audit/query", params={"type": "authz.decision", "limit": 1000}
            )
            assert answer.status_code == 200, answer.text
            return next((e for e in answer.json()["entries"] if check(e["event"])), None)

        decided: dict[str, Any] = wait_for(what, found)
        return decided


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    with running_receivers() as seen:
        yield seen


@pytest.fixture
def plane_with(tmp_path: Path, receivers: Receivers) -> Iterator[Callable[[str], Plane]]:
    """Start a :class:`Plane` under an AnomalyPolicy (``plane_with(detectors_yaml)``);
    everything started is stopped after the test."""
    started: list[Server | Agent] = []
    clusters: list[SimulatedCluster] = []

    def start(detectors: str) -> Plane:
        server = start_server(tmp_path / "cp", analytics="process")
        started.append(server)
        server.apply(
            anomaly_policy(detectors) + "---\n" + good_receiver(receivers, server, tmp_path)
        )
        clusters.extend([serve_cluster("east"), serve_cluster("west")])
        fed = register_federation(server, clusters[0], clusters[1])
        server.apply(allow_gets_of(fed.workload))
        agents = []
        for name in (fed.target_name, fed.origin_name):
            agent = start_agent(name, [server.url], tmp_path / name, server.credential(name))
            started.append(agent)
            agents.append(agent)
        return Plane(server, fed, agents[0], agents[1])

    try:
        yield start
    finally:
        for process in reversed(started):
            process.stop()
        for cluster in clusters:
            cluster.stop()


def escalated(plane: Plane, receivers: Receivers, finding: dict[str, Any]) -> dict[str, Any]:
    """The finding escalated: its ``anomaly.detected`` event (returned) and the SET at
    the receiver carry its subject and evidence."""
    event = detected(plane.server, finding["id"])
    assert event["detector"] == finding["detector"] and event["key"] == finding["key"]
    assert event["subject"] == finding["subject"] and event["evidence"] == finding["evidence"]
    assert event.get("quarantined") == finding["quarantined"]  # the log keeps no nulls
    pushed = wait_for(
        f"the SET of {finding['detector']} at the receiver",
        lambda: receivers.anomaly("/good", finding["id"]),
    )
    assert pushed["detector"] == finding["detector"] and pushed["key"] == finding["key"]
    assert pushed["subject"] == finding["subject"] and pushed["evidence"] == finding["evidence"]
    return event


def test_new_edge_is_quiet_in_its_warm_up_then_finds_a_new_pair_and_a_new_service(
    plane_with: Callable[[str], Plane], receivers: Receivers
) -> None:
    plane = plane_with("    new_edge: {warmup: 1d, baselineWindow: 1h}\n")
    server, fed = plane.server, plane.fed
    mine = fed.workload

    # 1. warm-up: the first sightings (origin -> target, the service orders.test) are learned
    token = fed.svid()
    orders = {"host": "orders.test", "path": "/", "method": "GET"}
    assert plane.target.authorize(token, orders).json()["allowed"] is True
    plane.decision(
        lambda e: e["request"]["host"] == "orders.test", "the warm-up decision in the log"
    )
    # a marker after them: a wrong_cluster finding (no warm-up) means the runner has
    # read every entry before it — under the warm-up's settings
    assert plane.origin.authorize(token).status_code == 401
    wait_for("the marker finding", lambda: anomalies(server, "wrong_cluster"))
    assert [a for a in anomalies(server, "new_edge") if a["subject"] == {"workload": mine}] == []

    # 2. the warm-up over: the edges it learned are known, new ones are findings
    server.apply(anomaly_policy("    new_edge: {warmup: 0, baselineWindow: 1h}\n"))
    third = unique("north-")
    server.apply(cluster_yaml(third, f"http://127.0.0.1:9/{third}"))
    assert plane.target.authorize(fed.svid(), orders).json()["allowed"] is True  # known
    ledger = {"host": "ledger.test", "path": "/", "method": "GET"}
    assert plane.target.authorize(token, ledger).json()["allowed"] is True  # a new service
    issued = server.exchange(fed.sa_token(), audience(third))  # a new cluster pair
    assert issued.status_code == 200, issued.text

    found = wait_for(
        "two new_edge findings", lambda: (f := anomalies(server, "new_edge"))[1:] and f
    )
    by_key = {a["key"]: a for a in found}
    pair, host = f"new_edge:{mine}|{fed.origin_name}->{third}", f"new_edge:{mine}|host:ledger.test"
    assert sorted(by_key) == sorted([pair, host]), by_key  # warm-up and known edges: quiet

    # the pair: reached by the token issued for the third cluster
    (index,) = by_key[pair]["evidence"]
    event = entry(server, index)
    assert event["type"] == "token.issued" and event["identity"]["workload"] == mine
    assert event["request"]["audience"] == [audience(third)]
    assert by_key[pair]["subject"] == {"workload": mine} and by_key[pair]["severity"] == "medium"
    assert by_key[pair]["details"]["from"] == fed.origin_name
    # the service: reached by the decision the target's agent allowed
    (index,) = by_key[host]["evidence"]
    event = entry(server, index)
    assert event["type"] == "authz.decision" and event["decision"]["allowed"] is True
    assert event["request"]["host"] == "ledger.test" and event["cluster"] == fed.target_name
    assert event["identity"]["workload"] == mine and by_key[host]["severity"] == "low"

    for finding in found:
        escalated(plane, receivers, finding)
    assert counted(server, "new_edge") == "2.0"


def test_a_token_at_the_wrong_cluster_quarantines_its_workload_at_every_agent(
    plane_with: Callable[[str], Plane], receivers: Receivers
) -> None:
    plane = plane_with("    wrong_cluster: {quarantine: true}\n")
    server, fed = plane.server, plane.fed
    # a token for each cluster, both accepted where they belong
    for_target = fed.svid()
    own = server.exchange(fed.sa_token(), audience(fed.origin_name))
    assert own.status_code == 200, own.text
    for_origin = own.json()["access_token"]
    assert plane.target.authorize(for_target).json()["allowed"] is True
    assert plane.origin.authorize(for_origin).json()["allowed"] is True

    # the target's token presented at the origin cluster's agent
    refused = plane.origin.authorize(for_target)
    assert refused.status_code == 401 and refused.json()["reason"] == "wrong_audience"

    (finding,) = wait_for("a wrong_cluster finding", lambda: anomalies(server, "wrong_cluster"))
    assert finding["subject"] == {"workload": fed.workload}
    assert finding["key"] == f"wrong_cluster:{spiffe_of(fed)}|{fed.origin_name}"
    assert finding["details"]["audiences"] == [fed.target_name]
    digest = hashlib.sha256(for_target.encode()).hexdigest()
    issuance, refusal = (entry(server, i) for i in finding["evidence"])
    assert issuance["type"] == "token.issued" and issuance["identity"]["workload"] == fed.workload
    assert issuance["detail"]["issued_token_sha256"] == digest
    assert issuance["request"]["audience"] == [fed.audience]
    assert refusal["type"] == "authz.decision" and refusal["cluster"] == fed.origin_name
    assert refusal["decision"]["reason"] == "unauthenticated: wrong_audience"
    assert refusal["identity"]["token_sha256"] == digest

    # quarantined, in the finding, its event and the SET
    assert finding["quarantined"] == {"kind": "workload", "value": fed.workload, "created": True}
    escalated(plane, receivers, finding)
    assert counted(server, "wrong_cluster") == "1.0"
    suspended = server.audit_events_until("admin.suspended", lambda events: bool(events))
    (suspension,) = suspended
    assert suspension["actor"] == "system"
    assert f"quarantined by anomaly {finding['id']} (wrong_cluster)" in str(suspension["detail"])

    # the suspension reaches both agents (what was issued is revoked) and the exchange
    for agent, token in ((plane.target, for_target), (plane.origin, for_origin)):

        def refusing(agent: Agent = agent, token: str = token) -> httpx.Response | None:
            answer = agent.authorize(token)
            return answer if answer.status_code == 401 else None

        cut = wait_for(f"the agent of {agent.cluster} refusing the quarantined workload", refusing)
        assert cut.json()["reason"] == "revoked", cut.text
    again = server.exchange(fed.sa_token(), fed.audience)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant", again.text


BASELINE = 3  # seconds: dormant_use's baselineWindow below


def test_an_identity_used_after_its_baseline_window_is_dormant_use(
    plane_with: Callable[[str], Plane], receivers: Receivers
) -> None:
    plane = plane_with(f"    dormant_use: {{warmup: 0, baselineWindow: {BASELINE}s}}\n")
    server, fed = plane.server, plane.fed
    # used at once twice: issued, then presented (within the window: not dormant)
    token = fed.svid()
    assert plane.target.authorize(token).json()["allowed"] is True
    first = plane.decision(lambda e: e.get("actor") == spiffe_of(fed), "the first decision")

    time.sleep(BASELINE + 1.5)  # the identity rests longer than the baseline window
    ledger = {"host": "ledger.test", "path": "/", "method": "GET"}
    assert plane.target.authorize(token, ledger).json()["allowed"] is True

    (finding,) = wait_for("a dormant_use finding", lambda: anomalies(server, "dormant_use"))
    assert finding["subject"] == {"spiffeId": spiffe_of(fed)}
    assert finding["key"] == f"dormant_use:{spiffe_of(fed)}"
    previous, again = finding["evidence"]
    assert previous == first["index"]  # the last use before the rest
    used = entry(server, again)
    assert used["type"] == "authz.decision" and used["request"]["host"] == "ledger.test"
    assert used["identity"]["spiffe_id"] == spiffe_of(fed) and used["cluster"] == fed.target_name
    assert finding["details"]["idle"] > BASELINE
    assert finding["quarantined"] is None
    escalated(plane, receivers, finding)
    assert counted(server, "dormant_use") == "1.0"
