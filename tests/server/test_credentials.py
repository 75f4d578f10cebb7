"""Credentials of the control plane's APIs have a life cycle (issue 10, finding 6;
DESIGN §7): one per agent instance, an expiry, a last use, rotation with overlap and
revocation, each an audit event; and suspension (DESIGN §5) stops every new credential
of a workload, SPIFFE ID or cluster and revokes what was issued. A real control plane
on SQLite and PostgreSQL, real HTTP."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from helpers import TRUST_DOMAIN, Federation, Server, register_federation, unique
from trustmesh.audit import events as ev
from trustmesh.sim import SimulatedCluster

AGENT_PATHS = [  # what an agent's credential reads and writes
    ("GET", "/v1/agent/config"),
    ("GET", "/v1/revocations"),
    ("GET", "/v1/agent/bundle"),
]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def works(server: Server, secret: str) -> bool:
    """Whether the credential is accepted by every endpoint an agent uses."""
    codes = {
        httpx.request(method, server.url + path, headers=bearer(secret)).status_code
        for method, path in AGENT_PATHS
    }
    assert codes in ({200}, {401}), codes
    return codes == {200}


def issue(server: Server, cluster: str, expect: int = 200, **body: Any) -> dict[str, Any]:
    response = server.admin.post(f"/v1/clusters/{cluster}/credentials", json=body)
    assert response.status_code == expect, response.text
    answer: dict[str, Any] = response.json()
    return answer


def listed(server: Server, cluster: str) -> dict[str, dict[str, Any]]:
    response = server.admin.get("/v1/credentials", params={"cluster": cluster})
    assert response.status_code == 200, response.text
    return {c["id"]: c for c in response.json()["credentials"]}


def events_of(server: Server, type_: str, cluster: str | None = None) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        params = {"type": type_, "limit": "1000", **({"cluster": cluster} if cluster else {})}
        entries = server.admin.get("/v1/audit/query", params=params).json()["entries"]
        if entries or time.monotonic() > deadline:
            return [e["event"] for e in entries]
        time.sleep(0.1)


def test_one_credential_per_agent_with_expiry_last_use_and_audit(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    server = shared_server
    fed = register_federation(server, sim_cluster)
    cluster = fed.target_name
    first = issue(server, cluster, agent="agent-a")
    assert first["agent"] == "agent-a" and first["expires_at"] is None
    assert first["token"].startswith(f"tmc_{first['id']}_")
    clash = issue(server, cluster, expect=409, agent="agent-a")
    assert "live credential" in clash["error_description"]
    second = issue(server, cluster, agent="agent-b", expires_in=2)
    default = issue(server, cluster)  # no --agent: its own id names the agent
    assert default["agent"] == default["id"]
    for bad in ({"agent": "a/b"}, {"agent": ""}, {"expires_in": 0}, {"expires_in": "1"},
                {"expires_in": True}, {"nope": 1}):  # fmt: skip
        assert "error_description" in issue(server, cluster, expect=400, **bad)

    before = listed(server, cluster)[first["id"]]
    assert before["state"] == "active" and before["last_used_at"] is None
    assert works(server, first["token"]) and works(server, second["token"])
    after = listed(server, cluster)
    assert after[first["id"]]["last_used_at"] is not None
    assert after[first["id"]]["agent"] == "agent-a" and after[first["id"]]["kind"] == "cluster"
    assert "token" not in str(after) and first["token"] not in str(after)

    time.sleep(2.2)  # agent-b's credential expires
    assert not works(server, second["token"])
    assert listed(server, cluster)[second["id"]]["state"] == "expired"
    assert works(server, first["token"])

    issued = [
        e for e in events_of(server, "admin.credential_issued", cluster)
        if e["detail"]["credential_id"] == first["id"]
    ]  # fmt: skip
    assert len(issued) == 1 and issued[0]["actor"] == "user:bootstrap"
    assert issued[0]["detail"]["agent"] == "agent-a"
    assert issued[0]["detail"]["credential_sha256"] == ev.token_sha256(first["token"])


def test_rotation_overlaps_then_the_old_secret_stops(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    server = shared_server
    cluster = register_federation(server, sim_cluster).target_name
    issued = issue(server, cluster, agent="rotating")
    old = issued["token"]
    rotated = server.admin.post(f"/v1/credentials/{issued['id']}/rotate", json={"overlap": 2})
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["token"]
    assert rotated.json()["credential"]["previous_valid_until"] is not None
    assert new != old and works(server, new) and works(server, old)  # both, during the overlap
    time.sleep(2.2)
    assert works(server, new) and not works(server, old)
    assert listed(server, cluster)[issued["id"]]["agent"] == "rotating"  # same identity

    again = server.admin.post(f"/v1/credentials/{issued['id']}/rotate", json={"overlap": 0})
    newest = again.json()["token"]
    assert works(server, newest) and not works(server, new)  # overlap 0: stops at once
    for body in ({"overlap": -1}, {"overlap": 8 * 86400}, {"overlap": "1h"}):
        refused = server.admin.post(f"/v1/credentials/{issued['id']}/rotate", json=body)
        assert refused.status_code == 400, refused.text
    unknown = server.admin.post("/v1/credentials/0000000000000000/rotate")
    assert unknown.status_code == 404

    event = next(
        e for e in events_of(server, "admin.credential_rotated", cluster)
        if e["detail"]["credential_id"] == issued["id"]
    )  # fmt: skip
    assert event["detail"]["overlap_seconds"] == 2
    assert event["detail"]["credential_sha256"] == ev.token_sha256(new)
    assert new not in str(event) and old not in str(event)


def test_revocation_stops_a_credential_everywhere_but_revoke_cluster_does_not(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    server = shared_server
    fed = register_federation(server, sim_cluster)
    cluster = fed.target_name
    issued = issue(server, cluster, agent="doomed")
    secret = issued["token"]

    # `revoke --cluster` is about tokens that originated there, not agents' credentials
    revoked_tokens = server.admin.post(
        "/v1/revocations", json={"kind": "cluster", "value": cluster, "reason": "test"}
    )
    assert revoked_tokens.status_code == 201
    assert works(server, secret)

    answer = server.admin.post(
        f"/v1/credentials/{issued['id']}/revoke", json={"reason": "agent host retired"}
    )
    assert answer.status_code == 200 and answer.json()["revoked"] is True
    assert not works(server, secret)
    event = {"events": [{"type": "authz.decision"}]}
    ingest = httpx.post(server.url + "/v1/audit/events", json=event, headers=bearer(secret))
    assert ingest.status_code == 401
    state = listed(server, cluster)[issued["id"]]
    assert state["state"] == "revoked" and state["revoked_by"] == "user:bootstrap"
    assert state["revoke_reason"] == "agent host retired"
    repeat = server.admin.post(f"/v1/credentials/{issued['id']}/revoke")
    assert repeat.status_code == 200 and repeat.json()["revoked"] is False
    assert server.admin.post(f"/v1/credentials/{issued['id']}/rotate").status_code == 409
    replacement = issue(server, cluster, agent="doomed")  # the agent id is free again
    assert works(server, replacement["token"])

    revoked = events_of(server, "admin.credential_revoked", cluster)
    mine = [e for e in revoked if e["detail"]["credential_id"] == issued["id"]]
    assert len(mine) == 1 and mine[0]["detail"]["reason"] == "agent host retired"

    admins = [c for c in server.admin.get("/v1/credentials").json()["credentials"]
              if c["kind"] == "admin" and c["state"] == "active"]  # fmt: skip
    if len(admins) == 1:
        last = server.admin.post(f"/v1/credentials/{admins[0]['id']}/revoke")
        assert last.status_code == 409 and "last live admin" in last.json()["error_description"]
    as_cluster = httpx.get(server.url + "/v1/credentials", headers=bearer(replacement["token"]))
    assert as_cluster.status_code == 403


def exchange_error(fed: Federation) -> tuple[int, dict[str, Any]]:
    response = fed.server.exchange(fed.sa_token(), fed.audience)
    return response.status_code, response.json()


def introspect(server: Server, token: str) -> bool:
    return bool(server.admin.post("/oauth2/introspect", data={"token": token}).json()["active"])


def suspend(server: Server, kind: str, value: str, expect: int = 201) -> dict[str, Any]:
    response = server.admin.post(
        "/v1/suspensions", json={"kind": kind, "value": value, "reason": "incident 42"}
    )
    assert response.status_code == expect, response.text
    answer: dict[str, Any] = response.json()
    return answer


def resume(server: Server, kind: str, value: str, expect: int = 200) -> dict[str, Any]:
    response = server.admin.post("/v1/suspensions/resume", json={"kind": kind, "value": value})
    assert response.status_code == expect, response.text
    answer: dict[str, Any] = response.json()
    return answer


def workload_status(server: Server, name: str) -> dict[str, Any]:
    items = server.admin.get("/v1/workloads").json()["items"]
    status: dict[str, Any] = next(i for i in items if i["metadata"]["name"] == name)["status"]
    return status


def test_suspending_a_workload_stops_new_tokens_and_revokes_old_ones(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    server = shared_server
    fed = register_federation(server, sim_cluster)
    before = fed.svid()
    assert workload_status(server, fed.workload)["suspended"] is None

    asked = time.time()
    answer = suspend(server, "workload", fed.workload)
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/cluster/{fed.origin_name}/ns/shop/sa/payments"
    assert answer["revocation"]["kind"] == "subject" and answer["revocation"]["value"] == spiffe_id
    # the cut-off reaches ahead (2 s): tokens a lagging replica issues are covered too
    assert answer["revocation"]["revoked_at"] >= asked + 1
    status, error = exchange_error(fed)
    assert status == 400 and error["error"] == "invalid_grant"
    assert f"workload {fed.workload} is suspended" in error["error_description"]
    assert "incident 42" not in error["error_description"]  # the reason is for admins
    assert not introspect(server, before)
    suspended = workload_status(server, fed.workload)["suspended"]
    assert suspended["kind"] == "workload" and suspended["reason"] == "incident 42"
    assert suspend(server, "workload", fed.workload, expect=200)["created"] is False
    listing = server.admin.get("/v1/suspensions").json()["suspensions"]
    assert {"kind": "workload", "value": fed.workload} in [
        {"kind": s["kind"], "value": s["value"]} for s in listing
    ]

    resume(server, "workload", fed.workload)
    after = fed.svid()  # credentials again; what was revoked stays revoked
    assert introspect(server, after) and not introspect(server, before)
    assert workload_status(server, fed.workload)["suspended"] is None
    resume(server, "workload", fed.workload, expect=404)

    suspend(server, "spiffeId", spiffe_id)
    status, error = exchange_error(fed)
    assert status == 400 and f"SPIFFE ID {spiffe_id} is suspended" in error["error_description"]
    assert not introspect(server, after)
    assert workload_status(server, fed.workload)["suspended"]["kind"] == "subject"
    resume(server, "subject", spiffe_id)
    fed.svid()

    failed = events_of(server, ev.TOKEN_EXCHANGE_FAILED)
    assert any("is suspended" in e["decision"]["reason"] for e in failed)
    began = [
        e for e in events_of(server, "admin.suspended") if e["detail"]["value"] == fed.workload
    ]
    ended = [e for e in events_of(server, "admin.resumed") if e["detail"]["value"] == fed.workload]
    assert len(began) == 1 and len(ended) == 1 and began[0]["detail"]["reason"] == "incident 42"

    for body in ({"kind": "workload", "value": unique("nope-")}, {"kind": "key", "value": "x"},
                 {"kind": "subject", "value": "spiffe://elsewhere.example/x"},
                 {"kind": "cluster", "value": fed.origin_name, "reason": "a\x1b[2Jb"}):  # fmt: skip
        refused = server.admin.post("/v1/suspensions", json=body)
        assert refused.status_code in (400, 404), refused.text


def test_suspending_a_cluster_revokes_its_agents_credentials_until_resumed(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    server = shared_server
    fed = register_federation(server, sim_cluster)
    origin = fed.origin_name
    agent = issue(server, origin, agent="agent-1")
    other = issue(server, fed.target_name, agent="agent-1")
    token = fed.svid()

    answer = suspend(server, "cluster", origin)
    assert answer["credentials_revoked"] == [agent["id"]]
    assert not works(server, agent["token"]) and works(server, other["token"])
    assert not introspect(server, token)
    status, error = exchange_error(fed)
    assert status == 400 and f"cluster {origin}" in error["error_description"]
    refused = issue(server, origin, expect=409, agent="agent-2")
    assert "suspended" in refused["error_description"]
    clusters = server.admin.get("/v1/clusters").json()["items"]
    mine = next(c for c in clusters if c["metadata"]["name"] == origin)
    assert mine["status"]["suspended"]["kind"] == "cluster"
    assert workload_status(server, fed.workload)["suspended"]["kind"] == "cluster"
    revoked = [
        e for e in events_of(server, "admin.credential_revoked", origin)
        if e["detail"]["credential_id"] == agent["id"]
    ]  # fmt: skip
    assert revoked and revoked[0]["detail"]["via"] == "suspend"

    resume(server, "cluster", origin)
    fed.svid()
    assert not works(server, agent["token"])  # stays revoked: agents get new credentials
    assert works(server, issue(server, origin, agent="agent-1")["token"])


@pytest.mark.slow
def test_a_revoked_credential_loses_its_revocation_stream(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    """The SSE stream is authenticated once, when it opens; it checks its credential
    again every 15 s (its keep-alive) and ends once the credential is revoked."""
    server = shared_server
    cluster = register_federation(server, sim_cluster).target_name
    issued = issue(server, cluster, agent="streaming")
    started = time.monotonic()
    with httpx.stream(
        "GET",
        server.url + "/v1/revocations/stream",
        headers=bearer(issued["token"]),
        timeout=httpx.Timeout(5.0, read=30.0),
    ) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines).startswith(": trustmesh revocations")
        revoked = server.admin.post(f"/v1/credentials/{issued['id']}/revoke")
        assert revoked.json()["revoked"] is True
        rest = list(lines)  # returns when the server ends the stream
    assert time.monotonic() - started < 25
    assert all(line == "" or line.startswith((":", "id:", "event:", "data:")) for line in rest)
