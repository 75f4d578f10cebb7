"""Revocation end to end: every kind reaches a real agent within a second, shows in
introspection, survives agent restarts; the staleness bound both ways."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from helpers import (
    Agent,
    Federation,
    Server,
    allow_gets_of,
    register_federation,
    start_agent,
    start_server,
)
from trustmesh.sim import SimulatedCluster

ALLOW_ALL = """apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: any-get}
spec:
  rules: [{services: ['*'], paths: ['*'], methods: [GET]}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: everyone-gets}
spec:
  role: any-get
  subjects: [{matchExpressions: [{key: workload_id, operator: Exists}]}]
"""


@pytest.fixture
def setup(
    shared_server: Server, sim_cluster: SimulatedCluster, tmp_path: Path
) -> Iterator[tuple[Federation, Agent]]:
    fed = register_federation(shared_server, sim_cluster)
    shared_server.apply(allow_gets_of(fed.workload))
    agent = start_agent(
        fed.target_name,
        [shared_server.url],
        tmp_path / "agent",
        shared_server.credential(fed.target_name),
    )
    yield fed, agent
    assert agent.stop() == 0


def revoke(
    server: Server, kind: str, value: str, expect: int = 201, reason: str = "test"
) -> dict[str, Any]:
    response = server.admin.post(
        "/v1/revocations", json={"kind": kind, "value": value, "reason": reason}
    )
    assert response.status_code == expect, response.text
    body: dict[str, Any] = response.json()
    return body


def until_refused(agent: Agent, token: str, limit: float = 1.0) -> float:
    """Seconds until the agent refuses the token as revoked (fails after ``limit``)."""
    started = time.monotonic()
    while True:
        response = agent.authorize(token)
        if response.status_code == 401:
            assert response.json()["reason"] == "revoked", response.text
            return time.monotonic() - started
        assert response.json()["allowed"] is True, response.text
        assert time.monotonic() - started < limit, "revocation did not arrive in time"
        time.sleep(0.01)


def introspect(server: Server, token: str) -> bool:
    return bool(server.admin.post("/oauth2/introspect", data={"token": token}).json()["active"])


def test_revoke_one_token(setup: tuple[Federation, Agent]) -> None:
    fed, agent = setup
    server = fed.server
    victim, bystander = fed.svid(), fed.svid()
    jti = jwt.decode(victim, options={"verify_signature": False})["jti"]
    created = revoke(server, "jti", jti, reason="leaked in a log")
    assert created["created"] is True and created["revocation"]["actor"] == "user:bootstrap"
    assert until_refused(agent, victim) < 1.0
    assert agent.authorize(bystander).status_code == 200
    assert introspect(server, victim) is False and introspect(server, bystander) is True
    again = revoke(server, "jti", jti, expect=200)
    assert (
        again["created"] is False
        and again["revocation"]["revision"] == created["revocation"]["revision"]
    )
    listed = server.admin.get("/v1/revocations").json()
    assert any(e["value"] == jti and e["reason"] == "leaked in a log" for e in listed["entries"])


def test_revoke_workload_then_new_tokens_work(setup: tuple[Federation, Agent]) -> None:
    fed, agent = setup
    old = fed.svid()
    revoke(fed.server, "workload", fed.workload)
    until_refused(agent, old)
    fresh = fed.svid()  # issued after the revocation: valid again
    assert (
        jwt.decode(fresh, options={"verify_signature": False})["iat"]
        > jwt.decode(old, options={"verify_signature": False})["iat"] - 1
    )
    response = agent.authorize(fresh)
    assert response.status_code == 200 and response.json()["allowed"] is True
    assert introspect(fed.server, old) is False and introspect(fed.server, fresh) is True


def test_revoke_cluster(setup: tuple[Federation, Agent]) -> None:
    fed, agent = setup
    token = fed.svid()
    revoke(fed.server, "cluster", fed.origin_name)
    until_refused(agent, token)
    assert agent.authorize(fed.svid()).status_code == 200


def test_revoke_key(tmp_path: Path, sim_cluster: SimulatedCluster) -> None:
    server = start_server(tmp_path / "cp")
    try:
        fed = register_federation(server, sim_cluster)
        server.apply(ALLOW_ALL)
        agent = start_agent(
            fed.target_name, [server.url], tmp_path / "agent", server.credential(fed.target_name)
        )
        token = fed.svid()
        kid = jwt.get_unverified_header(token)["kid"]
        revoke(server, "key", kid, reason="key compromised")
        until_refused(agent, token)
        jwks = {k["kid"] for k in httpx.get(server.url + "/.well-known/jwks.json").json()["keys"]}
        assert kid not in jwks
        states = {k["kid"]: k["state"] for k in server.admin.get("/v1/keys").json()["keys"]}
        assert kid not in states and "active" in states.values() and "prepared" in states.values()
        fresh = fed.svid()
        assert jwt.get_unverified_header(fresh)["kid"] != kid
        assert agent.authorize(fresh).status_code == 200
        assert revoke(server, "key", kid, expect=200)["created"] is False
        assert agent.stop() == 0
    finally:
        server.stop()


def test_bad_revocation_requests(shared_server: Server) -> None:
    for body, status, fragment in [
        ({"kind": "workload", "value": "ghost"}, 404, "not registered"),
        ({"kind": "cluster", "value": "ghost"}, 404, "not registered"),
        ({"kind": "key", "value": "no-such-kid"}, 404, "no published signing key"),
        ({"kind": "subject", "value": "not-a-spiffe-id"}, 400, "spiffe://"),
        ({"kind": "subject", "value": "spiffe://other.example/x"}, 400, "trust domain"),
        ({"kind": "colour", "value": "x"}, 400, "kind must be"),
        ({"kind": "jti", "value": ""}, 400, "non-empty"),
        ({"kind": "jti", "value": "has space"}, 400, "printable"),
    ]:
        response = shared_server.admin.post("/v1/revocations", json=body)
        assert response.status_code == status, (body, response.text)
        assert fragment in response.json()["error_description"]
    for query, fragment in [
        ("since=abc", "since must be"),
        ("since=99999999", "ahead of"),
        ("since=0&wait=x", "wait"),
    ]:
        response = shared_server.admin.get(f"/v1/revocations?{query}")
        assert response.status_code == 400 and fragment in response.json()["error_description"]
    assert (
        httpx.post(
            shared_server.url + "/v1/revocations", json={"kind": "jti", "value": "x"}
        ).status_code
        == 401
    )


def test_stream_is_resumable(shared_server: Server) -> None:
    first = revoke(shared_server, "jti", f"stream-{time.time_ns()}")["revocation"]["revision"]
    second = revoke(shared_server, "jti", f"stream-{time.time_ns()}")["revocation"]["revision"]
    headers = {"Authorization": f"Bearer {shared_server.admin_token}", "Last-Event-ID": str(first)}
    seen: list[int] = []
    with httpx.stream(
        "GET", shared_server.url + "/v1/revocations/stream", headers=headers, timeout=10
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("id: "):
                seen.append(int(line[4:]))
                if second in seen:
                    break
    assert first not in seen and second in seen


BOUND = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_staleness_bound(tmp_path: Path, sim_cluster: SimulatedCluster) -> None:
    """End to end, strict mode: the control plane goes away, the agent process refuses
    once its list is staler than the bound, and catches up when the control plane
    returns with a revocation it missed. (Both modes, on a clock the test moves, are in
    tests/agent/test_decide.py.)"""
    port = free_port()
    pinned = ("--listen", f"127.0.0.1:{port}", "--issuer", f"http://127.0.0.1:{port}")
    server = start_server(tmp_path / "cp", None, *pinned)
    fed = register_federation(server, sim_cluster)
    server.apply(ALLOW_ALL)
    from helpers import Process, trustmesh_cmd

    (tmp_path / "cred").write_text(server.credential(fed.target_name))
    args = [
        "agent",
        "--cluster",
        fed.target_name,
        "--server",
        server.url,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / "agent"),
        "--token-file",
        str(tmp_path / "cred"),
        "--staleness-bound",
        str(BOUND),
    ]
    process = Process(trustmesh_cmd(*args), tmp_path / "agent.log")
    agent = Agent(
        process, process.wait_line("trustmesh agent for cluster ").split()[7], fed.target_name, ""
    )
    token, doomed = fed.svid(), fed.svid()
    doomed_jti = jwt.decode(doomed, options={"verify_signature": False})["jti"]
    try:
        assert server.stop() == 0  # the control plane goes away
        ready = httpx.get(agent.url + "/readyz").json()
        if ready["revocation_age_seconds"] < BOUND - 1:  # a loaded machine may be slower
            assert ready["revocation_stale"] is False
            assert agent.authorize(token).status_code == 200  # cached answers within the bound
        deadline = time.monotonic() + BOUND + 10
        while not httpx.get(agent.url + "/readyz").json()["revocation_stale"]:
            assert time.monotonic() < deadline, "the revocation list never became stale"
            time.sleep(0.1)
        response = agent.authorize(token)
        ready_response = httpx.get(agent.url + "/readyz")
        metrics = httpx.get(agent.url + "/metrics").text
        assert "trustmesh_agent_revocation_stale 1.0" in metrics
        assert response.status_code == 401 and response.json()["reason"] == "revocation_state_stale"
        assert ready_response.status_code == 503

        # The control plane comes back with a revocation the agent missed.
        server = start_server(tmp_path / "cp", None, *pinned)
        revoke(server, "jti", doomed_jti)
        deadline = time.monotonic() + 15  # reconnect backoff is capped at 5 s
        while agent.authorize(doomed).json().get("reason") != "revoked":
            assert time.monotonic() < deadline, "the agent did not catch up"
            time.sleep(0.05)
        assert agent.authorize(token).status_code == 200
        assert httpx.get(agent.url + "/readyz").json()["revocation_stale"] is False
    finally:
        agent.stop()
        server.process.kill()


def test_restarted_agent_enforces_known_revocations(
    setup: tuple[Federation, Agent], tmp_path: Path
) -> None:
    fed, agent = setup
    token = fed.svid()
    revoke(fed.server, "jti", jwt.decode(token, options={"verify_signature": False})["jti"])
    until_refused(agent, token)
    assert agent.stop() == 0
    credential = fed.server.credential(fed.target_name)
    restarted = start_agent(fed.target_name, ["http://127.0.0.1:9"], tmp_path / "agent", credential)
    try:
        assert "state restored" in restarted.ready_line
        response = restarted.authorize(token)
        assert response.status_code == 401 and response.json()["reason"] == "revoked"
    finally:
        restarted.stop()
