"""Named people with roles (issue 14 item 4, DESIGN §11 "People and credentials"):
``trustmesh user add|list|remove``, what each role may do on every admin surface, the
bootstrap ``admin.token`` for the first start only, ``user:NAME`` as the audit actor
and the policy author, and ``trustmesh credentials list|rotate|revoke`` over people
and clusters alike. A real control plane (SQLite and PostgreSQL), the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import Server, cluster_yaml, start_server, trustmesh_cmd, unique, workload_yaml

# Every route that changes something, with a body it would accept from an admin: each
# must refuse an auditor and an approver with 403 naming the role.
MUTATIONS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/apply", {"files": [{"path": "x.yaml", "content": "kind: Nope\n"}]}),
    ("POST", "/v1/policy/rollback", {"revision": 0}),
    ("POST", "/v1/keys/rotate", None),
    ("POST", "/v1/ca/rotate", {}),
    ("POST", "/v1/clusters/east/credentials", {}),
    ("POST", "/v1/credentials/0123456789abcdef/rotate", {}),
    ("POST", "/v1/credentials/0123456789abcdef/revoke", {}),
    ("POST", "/v1/revocations", {"kind": "jti", "value": "x", "reason": "r"}),
    ("POST", "/v1/suspensions", {"kind": "cluster", "value": "east", "reason": "r"}),
    ("POST", "/v1/suspensions/resume", {"kind": "cluster", "value": "east"}),
    ("POST", "/v1/people", {"name": "mallory", "role": "admin"}),
    ("POST", "/v1/people/alice/remove", {}),
    ("POST", "/v1/audit/events", {"events": []}),
    ("GET", "/v1/agent/config?cluster=east", None),
]
READS = [
    "/v1/clusters",
    "/v1/workloads",
    "/v1/workloadtemplates",
    "/v1/pending",
    "/v1/reports/stale?days=30",
    "/v1/keys",
    "/v1/policy/versions",
    "/v1/policy/versions/current",
    "/v1/audit/query?limit=5",
    "/v1/audit/checkpoint",
    "/v1/audit/sources",
    "/v1/credentials",
    "/v1/people",
    "/v1/suspensions",
    "/v1/ca",
    "/v1/trustdomains",
    "/readyz",
]


def role_yaml(path: str) -> str:
    """A GlobalRole named after the test: applying it publishes a policy version."""
    return f"""---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: people-reader}}
spec:
  rules: [{{services: [x.test], paths: [/{path}], methods: [GET]}}]
"""


def run(server: Server, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TRUSTMESH_CONFIG": "/nonexistent",
        "TRUSTMESH_SERVER": server.url,
        "TRUSTMESH_TOKEN": token,
        "COLUMNS": "400",
    }
    return subprocess.run(
        trustmesh_cmd(*args),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def refused(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A one-line error naming every fragment, exit 1."""
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(f in lines[0] for f in fragments), result.stderr


def add(server: Server, token: str, name: str, role: str, *extra: str) -> str:
    result = run(server, token, "user", "add", name, "--role", role, *extra)
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert secret.startswith("tmu_") and len(secret.splitlines()) == 1
    assert f"user:{name} ({role})" in result.stderr and secret not in result.stderr
    return secret


def call(server: Server, token: str, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(
        method,
        server.url + path,
        headers={"Authorization": f"Bearer {token}"},
        json=body,
        timeout=10,
    )


def events(server: Server, token: str, type_: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        answer = call(server, token, "GET", f"/v1/audit/query?type={type_}&limit=1000")
        assert answer.status_code == 200, answer.text
        found = [e["event"] for e in answer.json()["entries"]]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.slow
def test_people_roles_bootstrap_and_credentials(db_url: str | None, tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", db_url)
    boot = server.admin_token
    try:
        # -- bad input: one line each, nothing added ------------------------------------
        refused(run(server, boot, "user", "add", "alice", "--role", "root"), "unknown role")
        refused(run(server, boot, "user", "add", "Bad/Name", "--role", "auditor"), "not valid")
        refused(run(server, boot, "user", "add", "bootstrap", "--role", "admin"), "reserved")
        refused(run(server, boot, "user", "add", "x" * 70, "--role", "admin"), "person name")
        refused(
            run(server, boot, "user", "add", "eve", "--role", "admin", "--expires", "0x"),
            "--expires",
        )
        assert call(server, boot, "GET", "/v1/people").json()["people"] == []

        alice = add(server, boot, "alice", "auditor")
        carol = add(server, boot, "carol", "approver")
        dora = add(server, boot, "dora", "auditor", "--expires", "2s")
        refused(run(server, boot, "user", "add", "alice", "--role", "admin"), "exists already")

        # -- auditors and approvers read everything and change nothing -------------------
        for token, role in ((alice, "auditor"), (carol, "approver")):
            for path in READS:
                answer = call(server, token, "GET", path)
                assert answer.status_code in (200, 503), (path, answer.text)
            for method, path, body in MUTATIONS:
                answer = call(server, token, method, path, body)
                assert answer.status_code == 403, (role, path, answer.text)
                description = answer.json()["error_description"]
                assert "admin role" in description and f"the {role} role" in description
        manifests = tmp_path / "m.yaml"
        manifests.write_text(cluster_yaml(unique("people-x-"), "http://127.0.0.1:9/x"))
        as_auditor = run(server, alice, "apply", "-f", str(manifests))
        refused(as_auditor, "admin role", "user:alice has the auditor role")

        # -- the bootstrap token acts as user:bootstrap until an admin person exists -----
        origin = unique("people-o-")
        manifests.write_text(cluster_yaml(origin, "http://127.0.0.1:9/o") + role_yaml("a"))
        assert run(server, boot, "apply", "-f", str(manifests)).returncode == 0
        first = call(server, boot, "GET", "/v1/policy/versions/current").json()
        assert first["author"] == "user:bootstrap"

        bob = add(server, boot, "bob", "admin")
        refused(run(server, boot, "get", "clusters"), "first start only", "user:bob")
        manifests.write_text(
            cluster_yaml(origin, "http://127.0.0.1:9/o")
            + "---\n"
            + workload_yaml(unique("people-w-"), origin, "shop", "payments")
            + role_yaml("b")
        )
        applied = run(server, bob, "apply", "-f", str(manifests), "--author", "someone else")
        assert applied.returncode == 0, applied.stderr
        version = call(server, alice, "GET", "/v1/policy/versions/current").json()
        assert version["author"] == "user:bob" and version["claimedAuthor"] == "someone else"
        published = events(server, alice, "policy.published")
        assert published[-1]["actor"] == "user:bob"
        by_bob = run(server, alice, "audit", "query", "--identity", "user:bob", "-o", "json")
        assert by_bob.returncode == 0, by_bob.stderr
        assert "policy.published" in by_bob.stdout and "user:bootstrap" not in by_bob.stdout
        added = {e["detail"]["person"]: e for e in events(server, bob, "admin.user_added")}
        assert added["bob"]["actor"] == "user:bootstrap" and added["bob"]["detail"]["role"]
        assert alice not in json.dumps(added)  # only a hash of the secret is recorded

        # -- credentials list|rotate|revoke over people and clusters alike ---------------
        cluster_secret = run(server, bob, "cluster", "credential", origin, "--agent", "a1")
        assert cluster_secret.returncode == 0, cluster_secret.stderr
        listing = json.loads(run(server, alice, "credentials", "list", "-o", "json").stdout)
        by_owner = {(c["kind"], c["person"] or c["agent"]): c for c in listing}
        assert by_owner[("person", "alice")]["role"] == "auditor"
        assert by_owner[("person", "alice")]["last_used_at"] is not None
        assert by_owner[("person", "dora")]["expires_at"] is not None
        assert by_owner[("cluster", "a1")]["cluster"] == origin
        table = run(server, alice, "credentials", "list")
        assert "user:alice, auditor" in table.stdout and f"of cluster {origin}" in table.stdout

        alice_id = by_owner[("person", "alice")]["id"]
        rotated = run(server, bob, "credentials", "rotate", alice_id, "--overlap", "0s")
        assert rotated.returncode == 0, rotated.stderr
        new_alice = rotated.stdout.strip()
        assert new_alice.startswith(f"tmu_{alice_id}_")
        refused(run(server, alice, "get", "clusters"), "replaced by a rotation")
        assert run(server, new_alice, "get", "clusters").returncode == 0

        carol_id = by_owner[("person", "carol")]["id"]
        revoked = run(server, bob, "credentials", "revoke", carol_id, "--reason", "left")
        assert revoked.returncode == 0 and "user:carol, approver" in revoked.stdout
        refused(run(server, carol, "get", "clusters"), "(user:carol) was revoked")

        time.sleep(2.2)  # dora's credential expires
        refused(run(server, dora, "get", "clusters"), "(user:dora) expired at")
        people = json.loads(run(server, new_alice, "user", "list", "-o", "json").stdout)
        states = {p["person"]: (p["role"], p["state"]) for p in people}
        assert states == {
            "alice": ("auditor", "active"),
            "dora": ("auditor", "expired"),
            "bob": ("admin", "active"),
        }

        # -- never locked out: the last live admin cannot go -----------------------------
        erin = add(server, bob, "erin", "admin")
        removed = run(server, erin, "user", "remove", "bob", "--reason", "moved on")
        assert removed.returncode == 0 and "user:bob" in removed.stdout
        refused(run(server, bob, "get", "clusters"), "(user:bob) was revoked")
        assert events(server, erin, "admin.user_removed")[-1]["actor"] == "user:erin"
        boot_id = by_owner[("admin", None)]["id"]
        gone = run(server, erin, "credentials", "revoke", boot_id, "--reason", "bootstrapped")
        assert gone.returncode == 0, gone.stderr
        refused(run(server, erin, "user", "remove", "erin"), "last live admin")
        refused(run(server, erin, "user", "remove", "nobody"), "no person")
        # an admin whose credential expires is the only one left: then none is live
        fay_until = time.monotonic() + 10
        fay = add(server, erin, "fay", "admin", "--expires", "10s")
        assert run(server, erin, "user", "remove", "erin").returncode == 0
        refused(run(server, erin, "get", "clusters"), "(user:erin) was revoked")
        time.sleep(max(0.0, fay_until - time.monotonic()) + 0.5)
        refused(run(server, fay, "get", "clusters"), "(user:fay) expired at")
    finally:
        assert server.stop() == 0, server.process.stderr()

    # a restart without a live admin writes a new bootstrap credential
    restarted = start_server(tmp_path / "data", db_url)
    try:
        assert restarted.admin_token != boot
        assert run(restarted, restarted.admin_token, "user", "list").returncode == 0
        # an expired person is removed like any other, and the name is free again
        again = run(restarted, restarted.admin_token, "user", "remove", "fay")
        assert again.returncode == 0, again.stderr
        add(restarted, restarted.admin_token, "fay", "auditor")
        refused(run(restarted, boot, "get", "clusters"), "(user:bootstrap) was revoked")
    finally:
        assert restarted.stop() == 0, restarted.process.stderr()
