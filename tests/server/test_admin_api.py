"""The admin API and credentials against a real control plane (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import pytest

from helpers import (
    TRUST_DOMAIN,
    Server,
    cluster_yaml,
    log_entries,
    register_federation,
    serve_cluster,
    start_server,
    unique,
    workload_yaml,
)
from trustmesh.sim import SimulatedCluster


def test_apply_refuses_unknown_fields_with_file_and_line(shared_server: Server) -> None:
    name = unique("typo-")
    text = cluster_yaml(name, "http://127.0.0.1:9/x") + "  audiance: trustmesh\n"
    body = shared_server.apply(text, path="clusters/typo.yaml", expect=400)
    assert body["error"] == "invalid_manifest"
    assert body["error_description"].startswith("clusters/typo.yaml:7: spec.audiance")
    assert "did you mean 'audience'" in body["error_description"]
    listed = shared_server.admin.get("/v1/clusters").json()["items"]
    assert name not in {item["metadata"]["name"] for item in listed}


def test_apply_is_all_or_nothing(shared_server: Server) -> None:
    good, bad = unique("good-"), unique("bad-")
    before = shared_server.admin.get("/v1/clusters").json()["items"]
    text = "---\n".join(
        [
            cluster_yaml(good, f"http://127.0.0.1:9/{good}"),
            workload_yaml(bad, "no-such-cluster", "ns", "sa"),
        ]
    )
    body = shared_server.apply(text, expect=409)
    assert body["error"] == "conflict"
    assert (
        "no-such-cluster" in body["error_description"]
        and "is not a registered Cluster" in body["error_description"]
    )
    assert shared_server.admin.get("/v1/clusters").json()["items"] == before

    # Two workloads for one service account are a conflict too, and so is a shared issuer.
    cluster = unique("c-")
    shared_server.apply(cluster_yaml(cluster, f"http://127.0.0.1:9/{cluster}"))
    text = "---\n".join(
        [
            workload_yaml(unique("w-"), cluster, "ns", "sa"),
            workload_yaml(unique("w-"), cluster, "ns", "sa"),
        ]
    )
    assert "already selects" in shared_server.apply(text, expect=409)["error_description"]
    text = cluster_yaml(unique("c-"), f"http://127.0.0.1:9/{cluster}")
    assert "already the issuer" in shared_server.apply(text, expect=409)["error_description"]
    # Duplicates across files of one apply are named with both places.
    files = [
        {"path": "a.yaml", "content": cluster_yaml(cluster + "x", "http://127.0.0.1:9/a")},
        {"path": "b.yaml", "content": cluster_yaml(cluster + "x", "http://127.0.0.1:9/b")},
    ]
    response = shared_server.admin.post("/v1/apply", json={"files": files})
    assert (
        response.status_code == 400
        and "also defined at a.yaml" in response.json()["error_description"]
    )


def test_apply_reports_created_configured_unchanged_and_dry_run(shared_server: Server) -> None:
    name = unique("c-")
    text = cluster_yaml(name, f"http://127.0.0.1:9/{name}")
    first = shared_server.apply(text)
    assert first["changes"] == [{"kind": "Cluster", "name": name, "action": "created"}]
    again = shared_server.apply(text)
    assert again["changes"][0]["action"] == "unchanged" and again["revision"] == first["revision"]
    changed = text.replace("issuer:", "labels: {region: eu}\n  issuer:")
    dry = shared_server.admin.post(
        "/v1/apply", json={"files": [{"path": "x", "content": changed}], "dryRun": True}
    ).json()
    assert dry["changes"][0]["action"] == "configured" and dry["dryRun"] is True
    assert (
        shared_server.apply(text)["changes"][0]["action"] == "unchanged"
    )  # dry run changed nothing
    configured = shared_server.apply(changed)
    assert (
        configured["changes"][0]["action"] == "configured"
        and configured["revision"] > first["revision"]
    )
    items = {
        i["metadata"]["name"]: i for i in shared_server.admin.get("/v1/clusters").json()["items"]
    }
    assert items[name]["spec"]["labels"] == {"region": "eu"}
    assert items[name]["status"]["generation"] == 2


def test_a_large_apply_is_recorded_in_bounded_events_every_change_in_one(
    shared_server: Server,
) -> None:
    """An event is at most 16 KiB: 600 Workloads in one apply are recorded as several
    ``admin.apply`` parts that together name every change; a publish of 300 roles is one
    ``policy.published`` naming the changes that fit, their total and the digest of all."""
    cluster = unique("big-")
    workloads = [unique("w-") + "-" + "x" * 40 for _ in range(600)]
    text = cluster_yaml(cluster, f"http://127.0.0.1:9/{cluster}") + "".join(
        "---\n" + workload_yaml(name, cluster, "ns", name[:60]) for name in workloads
    )
    result = shared_server.apply(text)
    revision = result["registryRevision"]
    roles = [unique("role-") + "-" + "r" * 40 for _ in range(300)]
    policy = "".join(
        f"---\napiVersion: trustmesh.io/v1alpha1\nkind: GlobalRole\nmetadata: {{name: {r}}}\n"
        "spec: {rules: [{apiGroups: [''], verbs: [get], resources: [pods]}]}\n"
        for r in roles
    )
    published = shared_server.apply(policy)["policyRevision"]
    entries = log_entries(shared_server)
    parts = [
        e["event"]["detail"]
        for e in entries
        if e["event"]["type"] == "admin.apply"
        and e["event"]["detail"]["registry_revision"] == revision
    ]
    assert len(parts) > 1 and all(len(base64.b64decode(e["leaf"])) <= 16384 for e in entries)
    assert [p["part"] for p in parts] == list(range(1, len(parts) + 1))
    assert {p["parts"] for p in parts} == {len(parts)}
    named = [c["name"] for p in parts for c in p["changes"]]
    assert sorted(named) == sorted([cluster, *workloads])
    (publish,) = [
        e["event"]["detail"]
        for e in entries
        if e["event"]["type"] == "policy.published"
        and e["event"]["detail"]["policy_revision"] == published
    ]
    assert publish["changes_total"] >= 300 > len(publish["changes"]) > 0
    assert len(publish["changes_sha256"]) == 64


def test_workload_listing_shows_spiffe_id(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    items = {
        i["metadata"]["name"]: i for i in shared_server.admin.get("/v1/workloads").json()["items"]
    }
    expected = f"spiffe://{TRUST_DOMAIN}/cluster/{fed.origin_name}/ns/shop/sa/payments"
    assert items[fed.workload]["status"]["spiffeId"] == expected
    assert items[fed.workload]["spec"]["claims"]["workload_id"] == fed.workload


def test_authentication_and_scoping(shared_server: Server, sim_cluster: SimulatedCluster) -> None:
    fed = register_federation(shared_server, sim_cluster)
    url = shared_server.url
    for method, path in [
        ("GET", "/v1/clusters"),
        ("POST", "/v1/apply"),
        ("GET", "/v1/keys"),
        ("POST", "/v1/keys/rotate"),
    ]:
        response = httpx.request(method, url + path)
        assert response.status_code == 401 and response.json()["error"] == "invalid_token"
        assert response.headers["www-authenticate"].startswith("Bearer")
        bad = httpx.request(method, url + path, headers={"Authorization": "Bearer tma_nope"})
        assert bad.status_code == 401
    credential = shared_server.credential(fed.origin_name)
    as_cluster = {"Authorization": f"Bearer {credential}"}
    assert httpx.get(url + "/v1/clusters", headers=as_cluster).status_code == 403
    assert (
        httpx.post(
            url + f"/v1/clusters/{fed.target_name}/credentials", headers=as_cluster
        ).status_code
        == 403
    )
    config = httpx.get(url + "/v1/agent/config", headers=as_cluster)
    assert config.status_code == 200
    assert config.json() == {
        "cluster": fed.origin_name,
        "trust_domain": TRUST_DOMAIN,
        "issuer": url,
        "audience": f"spiffe://{TRUST_DOMAIN}/cluster/{fed.origin_name}",
        "service_account_audience": "trustmesh",  # the Cluster's audience (its default)
        "agent": config.json()["agent"],  # the agent instance the credential is for
    }
    other = httpx.get(url + f"/v1/agent/config?cluster={fed.target_name}", headers=as_cluster)
    assert (
        other.status_code == 403 and "not " + fed.target_name in other.json()["error_description"]
    )
    missing = shared_server.admin.post("/v1/clusters/no-such-cluster/credentials")
    assert missing.status_code == 404 and "not registered" in missing.json()["error_description"]


def test_introspection(shared_server: Server, sim_cluster: SimulatedCluster) -> None:
    fed = register_federation(shared_server, sim_cluster)
    token = fed.svid()
    endpoint = shared_server.url + "/oauth2/introspect"
    assert httpx.post(endpoint, data={"token": token}).status_code == 401
    credential = shared_server.credential(fed.origin_name)
    for auth in (shared_server.admin_token, credential):
        answer = httpx.post(
            endpoint, data={"token": token}, headers={"Authorization": f"Bearer {auth}"}
        ).json()
        assert answer["active"] is True and answer["sub"].endswith("/ns/shop/sa/payments")
        assert answer["aud"] == [fed.audience]
    head, payload, sig = token.split(".")
    for dead in ("garbage", f"{head}.{payload}.{sig[:-4]}AAAA", fed.sa_token()):
        answer = shared_server.admin.post("/oauth2/introspect", data={"token": dead}).json()
        assert answer == {"active": False}
    missing = shared_server.admin.post("/oauth2/introspect", data={})
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"


def test_bad_bodies_and_routes_answer_json(shared_server: Server) -> None:
    admin = shared_server.admin
    for kwargs, fragment in [
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            "not valid JSON",
        ),
        ({"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, "JSON object"),
        (
            {
                "content": b"files=1",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            "Content-Type",
        ),
        ({"json": {"files": []}}, "files"),
        ({"json": {"files": [{"path": "x"}]}}, "content"),
        ({"json": {"files": [{"path": "x", "content": "{{{{"}]}}, "x:1"),
    ]:
        response = admin.post("/v1/apply", **kwargs)
        assert response.status_code == 400, response.text
        assert fragment in response.json()["error_description"], response.text
    huge = admin.post(
        "/v1/apply", content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413
    assert admin.get("/v1/nothing").json()["error"] == "not_found"
    assert admin.delete("/oauth2/token").status_code == 405
    assert httpx.get(shared_server.url + "/healthz").json() == {"ok": True}


def test_key_rotation_keeps_old_tokens_verifiable(tmp_path: Path, db_url: str | None) -> None:
    server = start_server(tmp_path / "cp", db_url)
    cluster = serve_cluster("rot")
    try:
        fed = register_federation(server, cluster)
        old_token = fed.svid()
        before = server.admin.get("/v1/keys").json()["keys"]
        assert sorted(k["state"] for k in before) == ["active", "prepared"]
        rotated = server.admin.post("/v1/keys/rotate").json()
        prepared = next(k["kid"] for k in before if k["state"] == "prepared")
        assert rotated["active"]["kid"] == prepared
        states = {k["kid"]: k["state"] for k in rotated["keys"]}
        assert (
            list(states.values()).count("retired") == 1
            and list(states.values()).count("prepared") == 1
        )
        jwks = {k["kid"] for k in httpx.get(server.url + "/.well-known/jwks.json").json()["keys"]}
        assert set(states) == jwks  # every key a valid token may carry, and the next one
        new_token = fed.svid()
        assert new_token.split(".")[0] != old_token.split(".")[0]  # different kid
        for token in (old_token, new_token):
            answer = server.admin.post("/oauth2/introspect", data={"token": token}).json()
            assert answer["active"] is True
        bundle = httpx.get(server.url + "/.well-known/spiffe-bundle").json()
        assert {k["use"] for k in bundle["keys"]} == {"jwt-svid", "x509-svid"}
        assert bundle["spiffe_refresh_hint"] > 0 and bundle["spiffe_sequence"] >= 2
    finally:
        cluster.stop()
        assert server.stop() == 0


def test_state_survives_restart_and_trust_domain_is_fixed(
    tmp_path: Path, db_url: str | None
) -> None:
    issuer = ("--issuer", "https://tm.corp.example")  # the listen port changes; the issuer must not
    server = start_server(tmp_path / "cp", db_url, *issuer)
    cluster = serve_cluster("restart")
    try:
        fed = register_federation(server, cluster)
        token = fed.svid()
        assert server.stop() == 0
        server = start_server(tmp_path / "cp", db_url, *issuer)
        answer = server.admin.post("/oauth2/introspect", data={"token": token}).json()
        assert answer["active"] is True  # same keys, same admin credential
        assert server.exchange(fed.sa_token(), fed.audience).status_code == 200
        assert server.stop() == 0
        from helpers import Process, trustmesh_cmd

        args = [
            "server",
            "--data-dir",
            str(tmp_path / "cp"),
            "--listen",
            "127.0.0.1:0",
            "--trust-domain",
            "other.example",
        ]
        if db_url:
            args += ["--db", db_url]
        proc = Process(trustmesh_cmd(*args), tmp_path / "wrong.log")
        assert proc.proc.wait(30) == 1
        err = proc.stderr()
        assert "belongs to trust domain corp.example" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    finally:
        cluster.stop()
        server.process.kill()


@pytest.mark.parametrize("interval", [0.5])
def test_replicas_share_state_through_the_database(
    tmp_path: Path, postgres_base_url: str, interval: float
) -> None:
    """Two stateless replicas on one PostgreSQL database: a change through one is seen by
    the other within the refresh interval, and both sign with the same active key."""
    from helpers import new_postgres_database, start_replica

    db = new_postgres_database(postgres_base_url)
    first = start_server(tmp_path / "r1", db)
    second = start_replica(tmp_path / "r2", first)
    cluster = serve_cluster("replicas")
    try:
        fed = register_federation(first, cluster)
        deadline = time.monotonic() + 5
        while True:
            response = second.exchange(fed.sa_token(), fed.audience)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(interval)
        assert response.status_code == 200, response.text
        second.admin.post("/v1/keys/rotate")
        time.sleep(2.5)
        kid_first = (
            first.exchange(fed.sa_token(), fed.audience).json()["access_token"].split(".")[0]
        )
        kid_second = (
            second.exchange(fed.sa_token(), fed.audience).json()["access_token"].split(".")[0]
        )
        assert kid_first == kid_second
    finally:
        cluster.stop()
        assert second.stop() == 0
        assert first.stop() == 0


def test_readiness_tells_anyone_why_and_only_the_admin_the_detail(shared_server: Server) -> None:
    anonymous = httpx.get(shared_server.url + "/readyz")
    assert anonymous.status_code == 200
    assert set(anonymous.json()) == {
        "ready",
        "check",
        "checks",
        "state_age_seconds",
        "audit_inconsistent",
    }
    detailed = shared_server.admin.get("/readyz").json()
    assert detailed["audit_size"] >= 0 and detailed["active_kid"]
    wrong = httpx.get(shared_server.url + "/readyz", headers={"Authorization": "Bearer tma_nope"})
    assert wrong.status_code == 401


def test_the_actor_is_the_credential_and_the_claimed_author_is_kept_apart(
    shared_server: Server,
) -> None:
    """Issue 10, finding 9: ``author`` used to replace the authenticated principal as the
    actor; now the actor is the credential's and the claimed author is kept apart."""
    server = shared_server
    role = unique("claimed-role-")
    manifest = f"""apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: {role}}}
spec:
  rules: [{{services: [x.test], paths: [/a], methods: [GET]}}]
"""
    applied = server.admin.post(
        "/v1/apply",
        json={"files": [{"path": "r.yaml", "content": manifest}], "author": "alice@corp"},
    )
    assert applied.status_code == 200, applied.text
    revision = applied.json()["policyRevision"]
    version = server.admin.get(f"/v1/policy/versions/{revision}").json()
    assert version["author"] == "user:bootstrap" and version["claimedAuthor"] == "alice@corp"
    entries = server.admin.get(
        "/v1/audit/query", params={"type": "policy.published", "limit": "1000"}
    ).json()["entries"]
    published = [e["event"] for e in entries if e["event"]["detail"]["policy_revision"] == revision]
    assert published[0]["actor"] == "user:bootstrap"
    assert published[0]["detail"]["claimed_author"] == "alice@corp"
    rolled = server.admin.post(
        "/v1/policy/rollback", json={"revision": revision - 1, "author": "bob"}
    )
    assert rolled.status_code == 200, rolled.text
    back = server.admin.get(f"/v1/policy/versions/{rolled.json()['policyRevision']}").json()
    assert back["author"] == "user:bootstrap" and back["claimedAuthor"] == "bob"
    for author in ("x" * 201, "a\nb", 7):
        bad = server.admin.post(
            "/v1/apply",
            json={"files": [{"path": "r.yaml", "content": manifest}], "author": author},
        )
        assert bad.status_code == 400 and "author" in bad.json()["error_description"]
