"""The agent as a real process: verification of federated tokens, the attacks,
failover, persisted state, key rotation, credentials, clean stop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from attacks import (
    GARBAGE,
    alg_none,
    hs256_with_public_key,
    signed_by_stranger,
    swapped_payload,
    with_kid,
)
from helpers import (
    TRUST_DOMAIN,
    Agent,
    Federation,
    Server,
    register_federation,
    serve_cluster,
    signer_of,
    start_agent,
    start_server,
)
from trustmesh.identity.svid import mint_svid
from trustmesh.sim import SimulatedCluster


@pytest.fixture
def federation(shared_server: Server, sim_cluster: SimulatedCluster) -> Federation:
    return register_federation(shared_server, sim_cluster)


@pytest.fixture
def agent(federation: Federation, tmp_path: Path) -> Iterator[Agent]:
    server = federation.server
    agent = start_agent(
        federation.target_name,
        [server.url],
        tmp_path / "agent",
        server.credential(federation.target_name),
    )
    yield agent
    assert agent.stop() == 0, agent.process.stderr()


def claims_for(fed: Federation, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": fed.server.url,
        "sub": f"spiffe://{TRUST_DOMAIN}/cluster/{fed.origin_name}/ns/shop/sa/payments",
        "aud": [fed.audience],
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "crafted",
        "workload_id": fed.workload,
        "cluster": fed.origin_name,
        "namespace": "shop",
        "service_account": "payments",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def refused(agent: Agent, token: str) -> str:
    response = agent.authorize(token)
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["authenticated"] is False and body["error"] == "invalid_token"
    assert response.headers["www-authenticate"].startswith("Bearer")
    return str(body["reason"])


def test_verifies_a_federated_token_and_caches_it(federation: Federation, agent: Agent) -> None:
    token = federation.svid()
    for _ in range(3):
        response = agent.authorize(token, {"host": "api", "path": "/x", "method": "GET"})
        assert response.status_code == 200, response.text
    identity = response.json()["identity"]
    assert (
        identity["spiffe_id"]
        == f"spiffe://{TRUST_DOMAIN}/cluster/{federation.origin_name}/ns/shop/sa/payments"
    )
    assert (
        identity["workload_id"] == federation.workload
        and identity["cluster"] == federation.origin_name
    )
    assert identity["claims"]["tier"] == "gold"
    metrics = httpx.get(agent.url + "/metrics").text
    assert "trustmesh_agent_cache_entries 1.0" in metrics
    assert 'trustmesh_agent_authentications_total{result="ok"} 3.0' in metrics
    ready = httpx.get(agent.url + "/readyz").json()
    assert ready["ready"] is True and ready["keys"] >= 1 and ready["reasons"] == []
    assert "control_plane" not in ready  # no address or internal id on /readyz


def test_refuses_forged_and_misdirected_tokens(federation: Federation, agent: Agent) -> None:
    good = federation.svid()
    key = signer_of(federation.server)
    public = next(
        k
        for k in httpx.get(federation.server.url + "/.well-known/jwks.json").json()["keys"]
        if k["kid"] == key.kid
    )
    now = int(time.time())
    assert refused(agent, alg_none(good)) == "malformed"
    assert refused(agent, alg_none(good, keep_signature=True)) == "unsupported_alg"
    assert refused(agent, hs256_with_public_key(good, public)) == "unsupported_alg"
    assert (
        refused(agent, swapped_payload(good, sub=f"spiffe://{TRUST_DOMAIN}/admin"))
        == "bad_signature"
    )
    assert refused(agent, signed_by_stranger(good)) == "bad_signature"
    assert refused(agent, with_kid(good, "../../keys/admin")) == "unknown_kid"
    assert (
        refused(
            agent,
            mint_svid(key, claims_for(federation, exp=now - 60, iat=now - 400, nbf=now - 400)),
        )
        == "expired"
    )
    assert refused(agent, mint_svid(key, claims_for(federation, nbf=now + 120))) == "not_yet_valid"
    assert (
        refused(agent, mint_svid(key, claims_for(federation, iss="https://evil.example")))
        == "wrong_issuer"
    )
    assert refused(agent, mint_svid(key, claims_for(federation, jti=None))) == "missing_claim"
    other_cluster = f"spiffe://{TRUST_DOMAIN}/cluster/{federation.origin_name}"
    assert (
        refused(agent, mint_svid(key, claims_for(federation, aud=[other_cluster])))
        == "wrong_audience"
    )
    # A real token from the exchange, but for another cluster's agent.
    misdirected = federation.server.exchange(federation.sa_token(), other_cluster).json()[
        "access_token"
    ]
    assert refused(agent, misdirected) == "wrong_audience"
    for junk in GARBAGE[1:]:
        assert refused(agent, junk) in {"malformed", "unsupported_alg", "unknown_kid"}
    assert agent.authorize(good).status_code == 200  # still serving


def test_bad_requests_answer_json(agent: Agent) -> None:
    url = agent.url + "/v1/authorize"
    cases = [
        ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"json": {"request": {}}}, 400, "token"),
        ({"json": {"token": 5}}, 400, "token"),
        ({"json": {"token": "a.b.c", "request": []}}, 400, "request"),
        (
            {
                "content": b"token=x",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            400,
            "Content-Type",
        ),
        ({"json": {"token": "x" * (1024 * 1024)}}, 413, "larger than"),
    ]
    for kwargs, status, fragment in cases:
        response = httpx.post(url, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == status, response.text
        assert fragment in response.json()["error_description"]
    assert httpx.get(url).status_code == 405
    assert httpx.get(agent.url + "/healthz").json() == {"ok": True}


def test_failover_persistence_and_rotation(tmp_path: Path, db_url: str | None) -> None:
    server = start_server(tmp_path / "cp", db_url)
    cluster = serve_cluster("persist")
    try:
        fed = register_federation(server, cluster)
        credential = server.credential(fed.target_name)
        dead = "http://127.0.0.1:9"
        agent = start_agent(fed.target_name, [dead, server.url], tmp_path / "agent", credential)
        token = fed.svid()
        assert agent.authorize(token).status_code == 200
        assert httpx.get(agent.url + "/readyz").json()["failing"] == []

        # Rotation: the agent learns the new key the first time it sees its kid.
        server.admin.post("/v1/keys/rotate")
        time.sleep(
            1.1
        )  # the control plane's own refresh after rotation is immediate; give the agent's rate limit room
        rotated = fed.svid()
        assert rotated.split(".")[0] != token.split(".")[0]
        assert agent.authorize(rotated).status_code == 200
        assert agent.stop() == 0

        # Control plane down: a restarted agent enforces what it knew before reconnecting.
        assert server.stop() == 0
        agent = start_agent(fed.target_name, [dead, server.url], tmp_path / "agent", credential)
        assert "state restored from the data dir" in agent.ready_line
        assert agent.authorize(rotated).status_code == 200
        assert agent.authorize(token).status_code == 200
        assert refused(agent, swapped_payload(rotated, tier="platinum")) == "bad_signature"
        time.sleep(0.5)
        ready = httpx.get(agent.url + "/readyz").json()
        assert ready["ready"] is True and "keys" in ready["failing"]
        assert agent.stop() == 0
        assert "no control plane reachable" in agent.process.log_path.read_text()  # the log
    finally:
        cluster.stop()
        server.process.kill()


def test_refused_credentials_stop_the_agent_with_one_line(
    federation: Federation, tmp_path: Path
) -> None:
    from helpers import Process, trustmesh_cmd

    server = federation.server
    cases = [
        (
            federation.origin_name,
            server.credential(federation.target_name),
            f"not '{federation.origin_name}'",
        ),
        (federation.target_name, "tmc_forged", "refused the agent credential"),
    ]
    for index, (cluster, credential, fragment) in enumerate(cases):
        token_file = tmp_path / f"cred{index}"
        token_file.write_text(credential)
        process = Process(
            trustmesh_cmd(
                "agent",
                "--cluster",
                cluster,
                "--server",
                server.url,
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(tmp_path / f"a{index}"),
                "--token-file",
                str(token_file),
            ),
            tmp_path / f"a{index}.log",
        )
        assert process.proc.wait(30) == 1
        err = process.stderr()
        assert fragment in err and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: ")
