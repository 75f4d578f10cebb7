"""Policy end to end on a real control plane (SQLite and PostgreSQL) and real agents:
versions, tests gating publication, rollback, propagation, drift, bad input."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import (
    Agent,
    Federation,
    Server,
    register_federation,
    start_agent,
    trustmesh_cmd,
    unique,
)
from trustmesh.sim import SimulatedCluster


def role(name: str, rules: str) -> str:
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: {name}}}
spec:
  rules:
{rules}"""


def binding(name: str, role_name: str, subjects: str, extra: str = "") -> str:
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: {name}}}
spec:
  role: {role_name}
  subjects: {subjects}
{extra}"""


def policy_test(name: str, cases: str) -> str:
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: PolicyTest
metadata: {{name: {name}}}
spec:
  cases:
{cases}"""


class Policy:
    """A uniquely named policy for one federation: a service role, a binding by workload
    and a test that GET is allowed and DELETE denied."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.role, self.binding, self.test = unique("role-"), unique("bind-"), unique("test-")
        self.host = f"{unique('svc-')}.test"

    def documents(self, methods: str = "[GET]", expect_post: str = "deny") -> str:
        return "---\n".join(
            [
                role(
                    self.role,
                    f"  - {{services: [{self.host}], paths: [/api/**], methods: {methods}}}\n",
                ),
                binding(self.binding, self.role, f"[{{workload: {self.fed.workload}}}]"),
                policy_test(
                    self.test,
                    f"  - {{subject: {{workload: {self.fed.workload}}}, cluster: {self.fed.target_name}, "
                    f"request: {{host: {self.host}, path: /api/x, method: GET}}, expect: allow}}\n"
                    f"  - {{subject: {{workload: {self.fed.workload}}}, cluster: {self.fed.target_name}, "
                    f"request: {{host: {self.host}, path: /api/x, method: POST}}, expect: {expect_post}}}\n",
                ),
            ]
        )

    def request(self, method: str) -> dict[str, str]:
        return {"host": self.host, "path": "/api/orders/1", "method": method}


def apply(server: Server, text: str, expect: int = 200, **extra: Any) -> dict[str, Any]:
    response = server.admin.post(
        "/v1/apply", json={"files": [{"path": "policy.yaml", "content": text}], **extra}
    )
    assert response.status_code == expect, response.text
    body: dict[str, Any] = response.json()
    return body


def test_versions_gate_and_rollback(shared_server: Server, sim_cluster: SimulatedCluster) -> None:
    fed = register_federation(shared_server, sim_cluster)
    policy = Policy(fed)
    first = apply(shared_server, policy.documents(), author="alice", message="orders read access")
    assert first["tests"] == {"passed": 2, "total": 2}
    rev1 = first["policyRevision"]
    version = shared_server.admin.get(f"/v1/policy/versions/{rev1}").json()
    assert version["author"] == "user:bootstrap" and version["claimedAuthor"] == "alice"
    assert version["message"] == "orders read access"
    assert {(c["kind"], c["name"], c["action"]) for c in version["changes"]} >= {
        ("GlobalRole", policy.role, "created"),
        ("RoleBinding", policy.binding, "created"),
    }
    assert len(version["contentHash"]) == 64

    # A change that breaks a PolicyTest is refused; the version in force does not move.
    refused = apply(shared_server, policy.documents(methods="[GET, POST]"), expect=422)
    assert refused["error"] == "policy_test_failed"
    assert f"PolicyTest {policy.test}" in refused["error_description"]
    assert "expected deny, got allow" in refused["error_description"]
    assert shared_server.admin.get("/v1/policy/versions/current").json()["revision"] == rev1

    # With the test updated in the same apply, the change is published.
    second = apply(
        shared_server,
        policy.documents(methods="[GET, POST]", expect_post="allow"),
        message="allow POST",
    )
    rev2 = second["policyRevision"]
    assert rev2 == rev1 + 1
    diff = shared_server.admin.get(f"/v1/policy/versions/{rev2}").json()["diff"]
    changed = {d["name"]: d for d in diff}
    assert changed[policy.role]["action"] == "configured"
    assert changed[policy.role]["before"]["spec"]["rules"][0]["methods"] == ["GET"]
    assert changed[policy.role]["after"]["spec"]["rules"][0]["methods"] == ["GET", "POST"]

    # An unchanged apply makes no version.
    assert (
        apply(shared_server, policy.documents(methods="[GET, POST]", expect_post="allow"))[
            "policyRevision"
        ]
        == rev2
    )

    # Rollback to rev1 fails its own tests now? No: rev1's tests expect POST denied, which rev1 gives.
    rolled = shared_server.admin.post(
        "/v1/policy/rollback", json={"revision": rev1, "message": "undo"}
    )
    assert rolled.status_code == 200, rolled.text
    rev3 = rolled.json()["policyRevision"]
    assert rev3 == rev2 + 1
    current = shared_server.admin.get("/v1/policy/versions/current").json()
    assert current["source"] == f"rollback:{rev1}" and current["message"] == "undo"
    assert (
        current["contentHash"]
        == shared_server.admin.get(f"/v1/policy/versions/{rev1}").json()["contentHash"]
    )
    history = shared_server.admin.get("/v1/policy/versions").json()["versions"]
    assert [v["revision"] for v in history[:3]] == [rev3, rev2, rev1]
    missing = shared_server.admin.post("/v1/policy/rollback", json={"revision": 999999})
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (
            lambda p: binding(unique("b-"), "no-such-role", "[{claims: {project: shop}}]"),
            "is not a GlobalRole",
        ),
        (
            lambda p: (
                role(
                    "cyc-a-" + p,
                    "  - {services: [a], paths: ['*'], methods: [GET]}\n  include: [cyc-b-"
                    + p
                    + "]\n",
                ).replace("spec:\n  rules:", "spec:\n  rules:")
                + "---\n"
                + role(
                    "cyc-b-" + p,
                    "  - {services: [b], paths: ['*'], methods: [GET]}\n  include: [cyc-a-"
                    + p
                    + "]\n",
                )
            ),
            "include cycle",
        ),
        (
            lambda p: (
                role(unique("r-"), "  - {services: [a], paths: ['*'], methods: [GET]}\n")
                + "---\n"
                + binding(unique("b-"), "r", "[{workload: ghost}]")
            ),
            "is not",
        ),
    ],
    ids=["unknown-role", "include-cycle", "unknown-workload"],
)
def test_inconsistent_policy_is_refused_whole(
    shared_server: Server, make: Any, fragment: str
) -> None:
    before = shared_server.admin.get("/v1/policy/versions/current").json()["revision"]
    cluster = unique("c-")
    text = f"""apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata: {{name: {cluster}}}
spec: {{issuer: "http://127.0.0.1:9/{cluster}"}}
---
""" + make(unique(""))
    body = apply(shared_server, text, expect=409)
    assert body["error"] == "conflict" and fragment in body["error_description"], body
    names = {c["metadata"]["name"] for c in shared_server.admin.get("/v1/clusters").json()["items"]}
    assert cluster not in names  # the registry part was not applied either
    assert shared_server.admin.get("/v1/policy/versions/current").json()["revision"] == before


def test_malformed_policy_manifests_name_file_and_line(shared_server: Server) -> None:
    text = role(unique("r-"), "  - {services: [a], paths: [api], methods: [GET]}\n")
    body = apply(shared_server, text, expect=400)
    assert body["error"] == "invalid_manifest"
    assert body["error_description"].startswith("policy.yaml:6: spec.rules[0].paths[0]")
    text = binding(unique("b-"), "r", "[{claims: {project: shop}}]", "  effect: maybe\n")
    assert (
        "'maybe' is not one of allow, deny"
        in apply(shared_server, text, expect=400)["error_description"]
    )
    text = policy_test(
        unique("t-"),
        "  - {subject: {workload: w}, cluster: c, request: {verb: get}, expect: allow}\n",
    )
    assert "resource is required" in apply(shared_server, text, expect=400)["error_description"]


def decide(agent: Agent, token: str, request: dict[str, str]) -> dict[str, Any]:
    response = agent.authorize(token, request)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_propagation_decisions_and_drift(
    shared_server: Server, sim_cluster: SimulatedCluster, tmp_path: Path
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    policy = Policy(fed)
    rev1 = apply(shared_server, policy.documents())["policyRevision"]
    agent = start_agent(
        fed.target_name,
        [shared_server.url],
        tmp_path / "agent",
        shared_server.credential(fed.target_name),
    )
    try:
        token = fed.svid()
        allowed = decide(agent, token, policy.request("GET"))
        assert allowed["allowed"] is True and allowed["policy_revision"] >= rev1
        assert allowed["bindings"] == [policy.binding] and allowed["roles"] == [policy.role]
        assert allowed["reason"] == f"allowed by RoleBinding {policy.binding} (role {policy.role})"
        denied = decide(agent, token, policy.request("POST"))
        assert denied["allowed"] is False and denied["denied"] is False
        assert (
            "default deny" in denied["reason"] and denied["decision_id"] != allowed["decision_id"]
        )

        started = time.monotonic()
        rev2 = apply(shared_server, policy.documents("[GET, POST]", "allow"))["policyRevision"]
        while not decide(agent, token, policy.request("POST"))["allowed"]:
            assert time.monotonic() - started < 2.0, "the new revision did not arrive within 2 s"
            time.sleep(0.02)
        assert httpx.get(agent.url + "/readyz").json()["policy_revision"] == rev2

        time.sleep(0.3)  # the agent reports the revision it applied with its next poll
        clusters = {
            c["metadata"]["name"]: c
            for c in shared_server.admin.get("/v1/clusters").json()["items"]
        }
        status = clusters[fed.target_name]["status"]["policy"]
        assert status["desiredRevision"] == rev2 and status["appliedRevisions"] == [rev2]
        assert status["drift"] is False and status["agentsReporting"] == 1
    finally:
        assert agent.stop() == 0
    # The agent is gone; a new revision leaves its last report behind: drift.
    rev3 = apply(shared_server, policy.documents("[GET]", "deny"))["policyRevision"]
    clusters = {
        c["metadata"]["name"]: c for c in shared_server.admin.get("/v1/clusters").json()["items"]
    }
    status = clusters[fed.target_name]["status"]["policy"]
    assert status["desiredRevision"] == rev3 and status["drift"] is True


def test_agent_restart_enforces_persisted_policy(
    shared_server: Server, sim_cluster: SimulatedCluster, tmp_path: Path
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    policy = Policy(fed)
    apply(shared_server, policy.documents())
    credential = shared_server.credential(fed.target_name)
    agent = start_agent(fed.target_name, [shared_server.url], tmp_path / "agent", credential)
    token = fed.svid()
    assert decide(agent, token, policy.request("GET"))["allowed"] is True
    assert agent.stop() == 0
    # Restarted with no control plane reachable: the persisted bundle is enforced.
    agent = start_agent(fed.target_name, ["http://127.0.0.1:9"], tmp_path / "agent", credential)
    try:
        assert "state restored" in agent.ready_line
        assert decide(agent, token, policy.request("GET"))["allowed"] is True
        assert decide(agent, token, policy.request("DELETE"))["allowed"] is False
    finally:
        assert agent.stop() == 0


def test_authorize_bad_requests(
    shared_server: Server, sim_cluster: SimulatedCluster, tmp_path: Path
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    agent = start_agent(
        fed.target_name,
        [shared_server.url],
        tmp_path / "agent",
        shared_server.credential(fed.target_name),
    )
    token = fed.svid()
    try:
        for request, fragment in [
            ({}, "request is empty"),
            ({"verb": "get"}, "request.resource is required"),
            ({"host": "a", "path": "no-slash", "method": "GET"}, "must start with /"),
            ({"host": "a", "path": "/", "method": "GET", "colour": "red"}, "request.colour"),
            ({"verb": "get", "resource": "pods", "name": 7}, "request.name must be a string"),
            ({"nonResourceURL": "/healthz"}, "request.verb is required"),
        ]:
            response = httpx.post(
                agent.url + "/v1/authorize", json={"token": token, "request": request}
            )
            assert response.status_code == 400, (request, response.text)
            assert fragment in response.json()["error_description"]
        response = httpx.post(agent.url + "/v1/authorize", json={"token": token})
        assert response.status_code == 400 and "object" in response.json()["error_description"]
    finally:
        assert agent.stop() == 0


def test_offline_policy_test_command(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    ok = subprocess.run(
        trustmesh_cmd("policy", "test", str(root / "examples"), "-o", "json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["passed"] == report["total"] >= 4
    broken = (
        (root / "examples" / "policy.yaml").read_text().replace("expect: deny", "expect: allow", 1)
    )
    for name in ("clusters.yaml", "workloads.yaml"):
        (tmp_path / name).write_text((root / "examples" / name).read_text())
    (tmp_path / "policy.yaml").write_text(broken)
    failed = subprocess.run(
        trustmesh_cmd("policy", "test", str(tmp_path)), capture_output=True, text=True, timeout=60
    )
    assert failed.returncode == 1
    assert "FAIL PolicyTest shop-basics, nobody deletes orders" in failed.stdout
    assert "3/4 policy test cases passed" in failed.stdout
