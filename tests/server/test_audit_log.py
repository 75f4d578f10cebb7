"""The central audit log on a real control plane (SQLite and PostgreSQL): every
control-plane event type lands in it, agents' batches are deduplicated and their gaps
reported, checkpoints and proofs verify, several replicas on one PostgreSQL database
sequence one consistent log."""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import (
    Federation,
    Server,
    cluster_yaml,
    new_postgres_database,
    register_federation,
    start_replica,
    start_server,
    unique,
)
from trustmesh.audit import events as ev
from trustmesh.audit.checkpoint import verify_checkpoint
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.proof import verify_consistency, verify_inclusion
from trustmesh.audit.rfc6962 import leaf_hash
from trustmesh.sim import SimulatedCluster

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def all_entries(server: Server) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    while True:
        response = server.admin.get(
            "/v1/audit/entries", params={"start": len(found), "end": len(found) + 1000}
        )
        assert response.status_code in (200, 400), response.text
        page = response.json().get("entries", []) if response.status_code == 200 else []
        if not page:
            return found
        found.extend(page)


def query(server: Server, **filters: str) -> list[dict[str, Any]]:
    response = server.admin.get("/v1/audit/query", params={"limit": "1000", **filters})
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["entries"]
    return entries


def checkpoint(server: Server, at_least: int = 0) -> Any:
    """The latest checkpoint, verified; waits (checkpoints are signed every 0.5 s) until
    it covers ``at_least`` entries."""
    key = server.admin.get("/v1/audit/key").text.strip()
    deadline = time.monotonic() + 10
    while True:
        parsed = verify_checkpoint(server.admin.get("/v1/audit/checkpoint").text, key)
        if parsed.size >= at_least or time.monotonic() > deadline:
            return parsed
        time.sleep(0.05)


def agent_event(cluster: str, source: str, seq: int, **extra: Any) -> dict[str, Any]:
    return ev.new_event(
        ev.AUTHZ_DECISION,
        source={"kind": "agent", "id": source, "agent": "a1", "seq": seq},
        cluster=cluster,
        actor="spiffe://example.org/x",
        identity={"spiffe_id": "spiffe://example.org/x", "token_sha256": "ab" * 32},
        request={"surface": "authorize", "verb": "get"},
        decision={"allowed": True, "reason": "test", "policy_revision": 1},
        **extra,
    )


def ship(server: Server, credential: str, events: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/audit/events",
        json={"events": events},
        headers={"Authorization": f"Bearer {credential}"},
        timeout=10,
    )


ROLE_AND_TEST = """apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: {role}}}
spec:
  rules:
  - {{services: [{host}], paths: [/api/**], methods: [GET]}}
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: {binding}}}
spec:
  role: {role}
  subjects: [{{workload: {workload}}}]
"""
POLICY_TEST = """apiVersion: trustmesh.io/v1alpha1
kind: PolicyTest
metadata: {{name: {test}}}
spec:
  cases:
  - {{subject: {{workload: {workload}}}, cluster: {cluster}, request: {{host: {host}, path: /api/x, method: {method}}}, expect: allow}}
"""


def test_every_control_plane_event_type_lands_in_the_log(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    server = shared_server
    sa_token = fed.sa_token()
    response = httpx.post(
        server.url + "/oauth2/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": sa_token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": fed.audience,
        },
        headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"},
    )
    assert response.status_code == 200, response.text
    svid = response.json()["access_token"]
    assert response.headers["traceparent"].startswith(f"00-{TRACE}-")

    # from an address of its own: the first refusals of a source are events of their own,
    # whatever other tests sent this shared server from 127.0.0.1 (test_refusal_folding.py)
    not_a_token = unique("not-a-token-")
    address = (
        f"127.{secrets.randbelow(250) + 2}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"
    )
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address)) as http:
        refused = http.post(
            server.url + "/oauth2/token",
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": not_a_token,
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "audience": fed.audience,
            },
        )
    assert refused.status_code == 400
    names = {k: unique(k) for k in ("role", "binding")}
    host = f"{unique('svc-')}.test"
    policy = ROLE_AND_TEST.format(**names, host=host, workload=fed.workload)
    server.apply(policy)
    # a test that fails: rejected, and nothing of it stays in the shared server
    failing_test = unique("test")
    failing = "---\n".join(
        [
            ROLE_AND_TEST.format(**{k: unique(k) for k in names}, host=host, workload=fed.workload),
            POLICY_TEST.format(
                test=failing_test,
                workload=fed.workload,
                cluster=fed.target_name,
                host=host,
                method="DELETE",
            ),
        ]
    )
    server.apply(failing, expect=422)
    assert server.admin.post(
        "/v1/revocations", json={"kind": "jti", "value": unique("jti-"), "reason": "test"}
    ).status_code in (200, 201)
    server.credential(fed.target_name)

    # the issuance, with provenance and the trace, and never the tokens themselves
    issued = query(server, trace_id=TRACE)
    assert [e["event"]["type"] for e in issued] == [ev.TOKEN_ISSUED]
    event = issued[0]["event"]
    identity = event["identity"]
    assert identity["spiffe_id"].endswith(f"/cluster/{fed.origin_name}/ns/shop/sa/payments")
    assert identity["workload"] == fed.workload
    assert identity["origin_cluster"] == fed.origin_name
    assert identity["sa_issuer"] == sim_cluster.issuer
    assert identity["sa_subject"] == "system:serviceaccount:shop:payments"
    assert identity["token_sha256"] == ev.token_sha256(sa_token)
    assert event["detail"]["issued_token_sha256"] == ev.token_sha256(svid)
    assert identity["kid"] and identity["jti"]
    leaf = base64.b64decode(issued[0]["leaf"])
    assert sa_token.encode() not in leaf and svid.encode() not in leaf
    assert sa_token.split(".")[2].encode() not in leaf

    types = {e["event"]["type"] for e in all_entries(server)}
    for expected in (
        ev.TOKEN_ISSUED,
        ev.TOKEN_EXCHANGE_FAILED,
        ev.POLICY_PUBLISHED,
        ev.POLICY_REJECTED,
        ev.REVOCATION_CREATED,
        "admin.apply",
        "admin.credential_issued",
    ):
        assert expected in types, expected
    # the refusal of the failing apply, found by its test's name (a default deny's
    # reason names the nearest binding, which may be the first apply's)
    (rejected,) = [
        e["event"]
        for e in query(server, type=ev.POLICY_REJECTED)
        if failing_test in json.dumps(e["event"])
    ]
    assert any(failing_test in line for line in rejected["detail"]["failed_tests"])
    (failed,) = [
        e["event"]
        for e in query(server, type=ev.TOKEN_EXCHANGE_FAILED)
        if e["event"]["identity"].get("token_sha256") == ev.token_sha256(not_a_token)
    ]
    assert failed["decision"]["allowed"] is False


def test_token_issued_records_the_audiences_the_token_carries(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    """``audience`` and ``resource`` (RFC 8693 §2.1) both name the target; the event
    records the token's ``aud``, whichever parameter named it, once each."""
    fed = register_federation(shared_server, sim_cluster)
    trace = uuid.uuid4().hex
    response = httpx.post(
        shared_server.url + "/oauth2/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": fed.sa_token(),
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "resource": [fed.audience, fed.audience],
        },
        headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
    )
    assert response.status_code == 200, response.text
    carried = json.loads(
        base64.urlsafe_b64decode(response.json()["access_token"].split(".")[1] + "==")
    )["aud"]
    assert carried == [fed.audience]
    (issued,) = query(shared_server, trace_id=trace)
    assert issued["event"]["request"] == {"surface": "token", "audience": carried}


def test_checkpoints_and_proofs_verify(tmp_path: Path, sim_cluster: SimulatedCluster) -> None:
    server = start_server(tmp_path / "data")
    try:
        fed = register_federation(server, sim_cluster)
        for _ in range(5):
            fed.svid()
        first = checkpoint(server, at_least=6)
        assert first.size >= 6
        rotated = server.admin.post("/v1/keys/rotate")
        assert rotated.status_code == 200
        for _ in range(4):
            fed.svid()
        entries = all_entries(server)
        second = checkpoint(server, at_least=len(entries))
        assert second.size == len(entries) > first.size
        assert ev.KEY_ROTATED in {e["event"]["type"] for e in entries}

        tree = MerkleLog()
        for entry in entries:
            raw = base64.b64decode(entry["leaf"])
            assert ev.check_event(json.loads(raw)) == raw  # the leaf is canonical JSON
            tree.append(raw)
        assert tree.root(second.size) == second.root_hash
        for index in (0, len(entries) // 2, len(entries) - 1):
            proof = server.admin.get(
                "/v1/audit/proof/inclusion", params={"index": index, "size": second.size}
            ).json()
            hashes = [base64.b64decode(h) for h in proof["hashes"]]
            raw = base64.b64decode(entries[index]["leaf"])
            verify_inclusion(leaf_hash(raw), index, second.size, hashes, second.root_hash)
        proof = server.admin.get(
            "/v1/audit/proof/consistency", params={"first": first.size, "second": second.size}
        ).json()
        verify_consistency(
            first.size,
            second.size,
            first.root_hash,
            second.root_hash,
            [base64.b64decode(h) for h in proof["hashes"]],
        )
        # every stored checkpoint is signed and describes a prefix of the same tree
        stored = server.admin.get("/v1/audit/checkpoints").json()["checkpoints"]
        key = server.admin.get("/v1/audit/key").text.strip()
        for item in stored:
            parsed = verify_checkpoint(item["note"], key)
            assert tree.root(parsed.size) == parsed.root_hash

        for path, params in [
            ("/v1/audit/proof/inclusion", {"index": "5", "size": "5"}),
            ("/v1/audit/proof/inclusion", {"index": "0", "size": str(10**9)}),
            ("/v1/audit/proof/inclusion", {"index": "-1", "size": "3"}),
            ("/v1/audit/proof/consistency", {"first": "4", "second": "2"}),
            ("/v1/audit/entries", {"start": "x"}),
            ("/v1/audit/query", {"decision": "maybe"}),
            ("/v1/audit/query", {"since": "yesterday"}),
            ("/v1/audit/query", {"colour": "red"}),
        ]:
            bad = server.admin.get(path, params=params)
            assert bad.status_code == 400, (path, params, bad.text)
            assert bad.json()["error_description"]
        cluster_credential = server.credential(fed.target_name)
        denied = httpx.get(
            server.url + "/v1/audit/entries?start=0",
            headers={"Authorization": f"Bearer {cluster_credential}"},
        )
        assert denied.status_code == 403
        assert httpx.get(server.url + "/v1/audit/checkpoint").status_code == 401
    finally:
        assert server.stop() == 0, server.process.stderr()


def test_agent_batches_are_deduplicated_and_gaps_reported(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    server = shared_server
    issued = server.admin.post(
        f"/v1/clusters/{fed.target_name}/credentials", json={"agent": "agent-one"}
    ).json()
    credential = issued["token"]
    spool = uuid.uuid4().hex
    source = f"{fed.target_name}/agent-one/{spool}"  # the credential's own source
    batch = [agent_event(fed.target_name, spool, seq) for seq in (1, 2, 3)]
    first = ship(server, credential, batch)
    assert first.status_code == 200, first.text
    assert first.json()["accepted"] == 3 and first.json()["duplicates"] == 0
    again = ship(server, credential, batch)  # a resend after a crash
    assert again.json() | {"tree_size": 0} == {
        "accepted": 0,
        "duplicates": 3,
        "tree_size": 0,
        "gaps": [],
    }
    conflict = ship(server, credential, [agent_event(fed.target_name, spool, 2)])
    assert conflict.status_code == 409 and conflict.json()["error"] == "sequence_conflict"

    skipped = ship(server, credential, [agent_event(fed.target_name, spool, 7)])
    assert skipped.status_code == 200
    assert skipped.json()["gaps"] == [{"source": source, "first": 4, "last": 6}]
    sources = {s["source"]: s for s in server.admin.get("/v1/audit/sources").json()["sources"]}
    assert sources[source]["gaps"] == [[4, 6]] and sources[source]["next_seq"] == 8
    assert sources[source]["agent"] == "agent-one"
    gap_events = [
        e["event"]
        for e in query(server, type=ev.AUDIT_GAP)
        if e["event"]["detail"]["source"] == source
    ]
    assert gap_events[0]["detail"]["missing"] == 3
    stored = query(server, source=source)
    assert [e["event"]["source"]["seq"] for e in stored] == [1, 2, 3, 7]
    assert {e["event"]["source"]["agent"] for e in stored} == {"agent-one"}

    other = unique("target-")
    server.apply(cluster_yaml(other, f"http://127.0.0.1:9/{other}"))
    wrong_cluster = ship(server, credential, [agent_event(other, spool, 8)])
    assert wrong_cluster.status_code == 403
    # Another credential using the same spool id writes into its own source: it can
    # neither claim this one nor collide with it (issue 10, finding 1).
    for squatter, cluster in ((server.credential(other), other),
                              (server.credential(fed.target_name), fed.target_name)):  # fmt: skip
        squat = ship(server, squatter, [agent_event(cluster, spool, 8)])
        assert squat.status_code == 200, squat.text
    mine = ship(server, credential, [agent_event(fed.target_name, spool, 8)])
    assert mine.status_code == 200 and mine.json()["accepted"] == 1
    assert [e["event"]["source"]["seq"] for e in query(server, source=source)] == [1, 2, 3, 7, 8]
    slashed = agent_event(fed.target_name, f"{other}/x/{spool}", 1)
    assert ship(server, credential, [slashed]).status_code == 400  # a spool id, not a key
    forged = agent_event(fed.target_name, uuid.uuid4().hex, 1)
    forged["type"] = ev.TOKEN_ISSUED
    invalid = agent_event(fed.target_name, uuid.uuid4().hex, 1)
    invalid["time"] = "yesterday"
    refused = ship(server, credential, [forged, invalid])
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_event"
    assert [p.split(":")[0] for p in refused.json()["problems"]] == ["events[0]", "events[1]"]
    for body in (b"[]", b"{not json", b'{"events": []}'):
        response = httpx.post(
            server.url + "/v1/audit/events",
            content=body,
            headers={"Authorization": f"Bearer {credential}", "Content-Type": "application/json"},
        )
        assert response.status_code == 400, body


def test_a_raw_token_never_reaches_the_log(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed: Federation = register_federation(shared_server, sim_cluster)
    secret_looking = fed.sa_token()
    shared_server.exchange(secret_looking, "spiffe://example.org/cluster/nowhere")
    for entry in all_entries(shared_server):
        raw = base64.b64decode(entry["leaf"])
        assert secret_looking.encode() not in raw


def test_replicas_on_one_postgresql_database_sequence_one_log(
    tmp_path: Path, postgres_base_url: str, sim_cluster: SimulatedCluster
) -> None:
    db = new_postgres_database(postgres_base_url)
    first = start_server(tmp_path / "a", db)
    second = start_replica(tmp_path / "b", first)
    try:
        fed = register_federation(first, sim_cluster)
        credential = first.credential(fed.target_name)
        errors: list[str] = []

        def send(server: Server, source: str) -> None:
            for start in range(1, 201, 20):
                batch = [
                    agent_event(fed.target_name, source, seq) for seq in range(start, start + 20)
                ]
                response = ship(server, credential, batch)
                if response.status_code != 200:
                    errors.append(response.text)

        threads = [
            threading.Thread(target=send, args=(server, uuid.uuid4().hex))
            for server in (first, second, first, second)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        entries = all_entries(first)
        assert [e["index"] for e in entries] == list(range(len(entries)))
        assert sum(e["event"]["type"] == ev.AUTHZ_DECISION for e in entries) == 800
        tree = MerkleLog()
        for entry in entries:
            tree.append(base64.b64decode(entry["leaf"]))
        for server in (first, second):
            cp = checkpoint(server, at_least=len(entries))
            assert tree.root(cp.size) == cp.root_hash
        key = first.admin.get("/v1/audit/key").text.strip()
        assert second.admin.get("/v1/audit/key").text.strip() == key
        for item in first.admin.get("/v1/audit/checkpoints").json()["checkpoints"]:
            parsed = verify_checkpoint(item["note"], key)
            assert tree.root(parsed.size) == parsed.root_hash
    finally:
        assert first.stop() == 0, first.process.stderr()
        assert second.stop() == 0, second.process.stderr()


def test_a_log_altered_under_the_server_gets_no_new_checkpoint(
    tmp_path: Path, sim_cluster: SimulatedCluster
) -> None:
    server = start_server(tmp_path / "data")
    fed = register_federation(server, sim_cluster)
    fed.svid()
    before = checkpoint(server, at_least=2)  # admin.apply, token.issued
    assert server.stop() == 0
    with sqlite3.connect(tmp_path / "data" / "trustmesh.db") as conn:
        conn.execute("UPDATE audit_entries SET leaf_hash = ? WHERE idx = 0", (b"\x00" * 32,))
    server = fed.server = start_server(tmp_path / "data")
    try:
        fed.svid()  # events are still stored...
        ready = server.admin.get("/readyz").json()
        assert ready["audit_size"] > before.size
        assert "refusing to sign" in ready["audit_inconsistent"]
        metrics = httpx.get(server.url + "/metrics").text
        assert "trustmesh_audit_inconsistent 1.0" in metrics
        assert checkpoint(server) == before  # ...but no checkpoint extends the altered log
    finally:
        assert server.stop() == 0, server.process.stderr()


@pytest.mark.parametrize("exporter", ["bogus"])
def test_an_unknown_trace_exporter_is_one_clear_line(tmp_path: Path, exporter: str) -> None:
    import subprocess

    from helpers import trustmesh_cmd

    result = subprocess.run(
        trustmesh_cmd(
            "server",
            "--data-dir",
            str(tmp_path / "d"),
            "--listen",
            "127.0.0.1:0",
            "--trust-domain",
            "example.org",
            "--otel-exporter",
            exporter,
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--otel-exporter must be one of none, console, otlp" in result.stderr
    assert "Traceback" not in result.stderr


def test_exchange_spans_are_exported_with_the_callers_trace(
    tmp_path: Path, sim_cluster: SimulatedCluster
) -> None:
    """--otel-exporter console: the exchange span is exported (on SIGTERM at the
    latest), a child of the caller's traceparent, with the ids the audit event holds."""
    server = start_server(tmp_path / "data", None, "--otel-exporter", "console")
    fed = register_federation(server, sim_cluster)
    response = httpx.post(
        server.url + "/oauth2/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": fed.sa_token(),
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": fed.audience,
        },
        headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"},
    )
    assert response.status_code == 200, response.text
    event = query(server, trace_id=TRACE)[0]["event"]
    assert server.stop() == 0
    lines = []
    while (line := server.process.lines.get(timeout=5)) is not None:
        lines.append(line)
    spans = json.loads("[" + ",".join(_json_objects("\n".join(lines))) + "]")
    exchange = next(s for s in spans if s["name"] == "token.exchange")
    assert exchange["context"]["trace_id"] == "0x" + TRACE
    assert exchange["context"]["span_id"] == "0x" + event["span_id"]
    assert exchange["parent_id"] == "0x00f067aa0ba902b7"
    assert exchange["attributes"]["trustmesh.outcome"] == "issued"


def _json_objects(text: str) -> list[str]:
    """The top-level JSON objects the console exporter printed, one after another."""
    objects, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "{":
            depth, start = depth + 1, (i if depth == 0 else start)
        elif char == "}":
            depth -= 1
            if depth == 0:
                objects.append(text[start : i + 1])
    return objects
