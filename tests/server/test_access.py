"""Access requests from request to expiry (issue 14 item 5, DESIGN §11 "Access
requests"): people added with ``trustmesh user add``, requests made, listed, approved and
denied with the real CLI against a real control plane (SQLite and PostgreSQL); the
approval's binding in the current policy, its author, the audit events and the metric;
every refusal; a PolicyTest that vetoes the grant; the expiry recorded once by two
replicas on one PostgreSQL database."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_people import add, call, events, refused, run

from helpers import (
    TRUST_DOMAIN,
    Server,
    cluster_yaml,
    database_for,
    eventually,
    serve_cluster,
    start_agent,
    start_replica,
    start_server,
    workload_yaml,
)

ROLE = """---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: orders-reader}
spec:
  rules: [{services: [orders.test], paths: [/api/*], methods: [GET]}]
"""
SHORT = """---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: orders-writer}
spec:
  maxAccessDuration: 30m
  rules: [{services: [orders.test], paths: [/api/*], methods: [POST]}]
"""
VETO = """---
apiVersion: trustmesh.io/v1alpha1
kind: PolicyTest
metadata: {name: web-never-reads-orders}
spec:
  cases:
    - name: web is refused the orders API
      subject: {workload: web}
      cluster: east
      request: {host: orders.test, path: /api/orders, method: GET}
      expect: deny
"""


@dataclass
class People:
    """rita (auditor) and carol, dave (approvers) request; ada (admin) applies."""

    ada: str
    rita: str
    carol: str
    dave: str


def set_up(server: Server, extra: str = "") -> People:
    boot = server.admin_token
    rita = add(server, boot, "rita", "auditor")
    carol = add(server, boot, "carol", "approver")
    dave = add(server, boot, "dave", "approver")
    ada = add(server, boot, "ada", "admin")  # the bootstrap stops working from here on
    manifests = "---\n".join(
        [
            cluster_yaml("east", "https://east.example"),
            cluster_yaml("west", "https://west.example"),
            workload_yaml("web", "east", "shop", "web"),
            ROLE + extra,
        ]
    )
    answer = call(server, ada, "POST", "/v1/apply", {"files": [{"path": "a.yaml", "content": manifests}]})  # fmt: skip
    assert answer.status_code == 200, answer.text
    return People(ada=ada, rita=rita, carol=carol, dave=dave)


def request_access(server: Server, token: str, *extra: str, subject: str = "workload=web") -> str:
    result = run(
        server, token, "access", "request", "--role", "orders-reader", "--subject", subject,
        "--clusters", "east", "--duration", "1h", "--reason", "incident 42", *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    request_id = result.stdout.strip()
    assert len(request_id) == 10 and "is pending" in result.stderr
    return request_id


def shown(server: Server, token: str, request_id: str) -> dict[str, Any]:
    result = run(server, token, "access", "show", request_id, "-o", "json")
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def current_policy(server: Server, token: str) -> dict[str, Any]:
    answer = call(server, token, "GET", "/v1/policy/versions/current")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def access_bindings(policy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d
        for d in policy["documents"]
        if d["kind"] == "RoleBinding" and d["metadata"]["name"].startswith("access-")
    }


def post(server: Server, token: str, path: str, body: Any) -> httpx.Response:
    return call(server, token, "POST", path, body)


@pytest.mark.slow
def test_refusals_of_bad_requests(tmp_path: Path) -> None:
    """Every bad request is one clear error (CLI: one line, exit 1; API: a 4xx JSON
    body naming the problem), and none is stored. SQLite only: every refusal is decided
    before anything is written (what is stored, and how, runs on both engines in
    test_request_approve_deny_and_refused_decisions)."""
    server = start_server(tmp_path / "data", None)
    try:
        body = {"role": "orders-reader", "subject": {"workload": "web"}, "clusters": ["east"],
                "duration": 3600, "reason": "incident 42"}  # fmt: skip
        answer = post(server, server.admin_token, "/v1/access", body)  # before any person
        assert answer.status_code == 403, answer.text
        assert "bootstrap admin.token" in answer.json()["error_description"]
        people = set_up(server)
        rita = people.rita

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            base = ["access", "request", "--role", "orders-reader", "--subject", "workload=web",
                    "--clusters", "east", "--duration", "1h", "--reason", "incident 42"]  # fmt: skip
            changed = list(base)
            for flag, value in zip(args[::2], args[1::2], strict=True):
                changed[changed.index(flag) + 1] = value
            return run(server, rita, *changed)

        refused(cli("--duration", "0s"), "duration must be more than 0 seconds")
        refused(cli("--duration", "-1h"), "--duration must be a duration")
        refused(cli("--duration", "9h"), "9h", "orders-reader", "maxAccessDuration 8h")
        refused(cli("--role", "root"), "role 'root' does not exist in the current policy")
        refused(cli("--subject", "workload=nope"), "workload 'nope' is not registered")
        refused(cli("--subject", "user=zed"), "no person 'zed'")
        refused(cli("--subject", "spiffeId=https://x"), "must start with spiffe://")
        refused(cli("--subject", "spiffeId=spiffe://corp.example/**"), "not a pattern")
        refused(cli("--subject", "group=x"), "--subject must be")
        refused(cli("--clusters", "east,north"), "cluster north is not registered")
        refused(cli("--clusters", "east,east"), "east is given twice")
        refused(cli("--reason", " "), "reason is required")
        refused(cli("--reason", "x" * 1001), "1001 characters; at most 1000")
        refused(cli("--reason", "a\x1b[2Jb"), "printable")

        for change, fragment in [
            ({"duration": -5}, "more than 0 seconds"),
            ({"duration": 1.5}, "whole number of seconds"),
            ({"duration": True}, "whole number of seconds"),
            ({"clusters": [f"c{i}" for i in range(51)]}, "at most 50"),
            ({"namespaces": [f"n{i}" for i in range(51)]}, "at most 50"),
            ({"subject": {"workload": "web", "user": "rita"}}, "subject must be one of"),
            ({"extra": 1}, "unknown member 'extra'"),
        ]:
            answer = post(server, rita, "/v1/access", {**body, **change})
            assert answer.status_code == 400, answer.text
            assert fragment in answer.json()["error_description"], answer.text
        missing = {k: v for k, v in body.items() if k != "reason"}
        answer = post(server, rita, "/v1/access", missing)
        assert answer.status_code == 400 and "reason" in answer.json()["error_description"]
        twice = b'{"role": "a", "role": "orders-reader"}'
        answer = httpx.post(
            server.url + "/v1/access",
            content=twice,
            headers={"Authorization": f"Bearer {rita}", "Content-Type": "application/json"},
        )
        assert answer.status_code == 400 and "appears twice" in answer.text
        # a cluster credential is not a person
        cluster = call(server, people.ada, "POST", "/v1/clusters/east/credentials", {}).json()
        answer = post(server, cluster["token"], "/v1/access", body)
        assert answer.status_code == 403, answer.text
        assert call(server, rita, "GET", "/v1/access").json()["items"] == []
        # bounded: 20 pending requests per requester
        for _ in range(20):
            assert post(server, rita, "/v1/access", body).status_code == 201
        answer = post(server, rita, "/v1/access", body)
        assert answer.status_code == 409 and "20 pending" in answer.text
        unknown = run(server, rita, "access", "show", "nope0000")
        refused(unknown, "no access request nope0000")
        refused(run(server, rita, "access", "list", "--state", "odd"), "unknown state")
    finally:
        server.stop()


@pytest.mark.slow
def test_request_approve_deny_and_refused_decisions(db_url: str | None, tmp_path: Path) -> None:
    """carol requests, dave (another approver) approves: RoleBinding access-ID with
    expiresAt and the namespace in the current policy, authored by user:dave; the
    refused decisions (the requester, an auditor, an admin, the person who gains the
    access, a decided request); carol approves dave's own access (a user subject); a
    denial; the events; the metric."""
    server = start_server(tmp_path / "data", db_url)
    try:
        people = set_up(server, SHORT)
        # a role's own maxAccessDuration (wip-acc-policy's field), named with the duration
        over = run(
            server, people.rita, "access", "request", "--role", "orders-writer", "--subject",
            "workload=web", "--clusters", "east", "--duration", "1h", "--reason", "x",
        )  # fmt: skip
        refused(over, "duration 1h (3600 s) is over role orders-writer's maxAccessDuration 30m")
        first = request_access(server, people.carol, "--namespaces", "shop")
        pending = shown(server, people.rita, first)
        assert pending["state"] == "pending" and pending["requester"] == "user:carol"
        assert pending["subject"] == {"workload": "web"} and pending["duration"] == 3600
        listing = run(server, people.rita, "access", "list", "--state", "pending")
        assert listing.returncode == 0 and first in listing.stdout, listing.stderr

        # refused decisions: nothing changes
        refused(run(server, people.carol, "access", "approve", first), "user:carol requested")
        refused(
            run(server, people.rita, "access", "approve", first),
            "needs the approver role",
            "user:rita has the auditor role",
        )
        refused(run(server, people.ada, "access", "approve", first), "needs the approver role")
        for_dave = request_access(server, people.rita, subject="user=dave")
        refused(run(server, people.dave, "access", "approve", for_dave), "would give user:dave")
        refused(run(server, people.dave, "access", "deny", for_dave, "--reason", "no"), "user:dave")
        assert shown(server, people.rita, first)["state"] == "pending"

        before = current_policy(server, people.rita)["revision"]
        approved = run(server, people.dave, "access", "approve", first, "--reason", "ok")
        assert approved.returncode == 0, approved.stderr
        assert f"binding access-{first}" in approved.stdout
        item = shown(server, people.rita, first)
        assert item["state"] == "approved" and item["decidedBy"] == "user:dave"
        assert item["binding"] == f"access-{first}"
        assert item["policyRevision"] == before + 1
        assert 3590 < item["expiresIn"] <= 3600
        policy = current_policy(server, people.rita)
        assert policy["revision"] == before + 1 and policy["author"] == "user:dave"
        assert policy["source"] == f"access:{first}"
        binding = access_bindings(policy)[f"access-{first}"]
        assert binding["spec"]["role"] == "orders-reader"
        assert binding["spec"]["subjects"] == [{"workload": "web"}]
        assert binding["spec"]["clusters"]["names"] == ["east"]
        assert binding["spec"]["namespaces"] == ["shop"]
        assert binding["spec"]["expiresAt"].endswith("Z")
        table = run(server, people.rita, "access", "list")
        assert table.returncode == 0 and "59m" in table.stdout, table.stdout

        again = run(server, people.dave, "access", "approve", first)
        refused(again, f"access request {first} is approved, not pending")

        # carol (neither the requester nor dave) approves dave's access: a user subject
        approved = run(server, people.carol, "access", "approve", for_dave)
        assert approved.returncode == 0, approved.stderr
        policy = current_policy(server, people.rita)
        assert policy["author"] == "user:carol"
        binding = access_bindings(policy)[f"access-{for_dave}"]
        assert binding["spec"]["subjects"] == [{"user": "dave"}]
        assert f"access-{first}" in access_bindings(policy)  # still in force

        # a denial needs a reason
        later = request_access(server, people.rita)
        answer = post(server, people.carol, f"/v1/access/{later}/deny", {})
        assert answer.status_code == 400 and "reason" in answer.text
        denied = run(server, people.carol, "access", "deny", later, "--reason", "not now")
        assert denied.returncode == 0, denied.stderr
        assert shown(server, people.rita, later)["state"] == "denied"
        refused(run(server, people.dave, "access", "approve", later), "is denied")

        requested = events(server, people.rita, "access.requested")
        assert {e["detail"]["id"]: e["actor"] for e in requested} == {
            first: "user:carol",
            for_dave: "user:rita",
            later: "user:rita",
        }
        approvals = {e["detail"]["id"]: e for e in events(server, people.rita, "access.approved")}
        assert approvals[for_dave]["actor"] == "user:carol"
        event = approvals[first]
        assert event["actor"] == "user:dave"
        assert event["detail"]["id"] == first and event["detail"]["role"] == "orders-reader"
        assert event["detail"]["subject"] == {"workload": "web"}
        assert event["detail"]["policy_revision"] == before + 1
        assert event["detail"]["expires_at"].endswith("Z")
        assert event["detail"]["reason"] == "incident 42"
        (event,) = events(server, people.rita, "access.denied")
        assert event["actor"] == "user:carol" and event["detail"]["decision_reason"] == "not now"
        published = events(server, people.rita, "policy.published")
        assert [e["actor"] for e in published if e["detail"]["via"] == f"access:{first}"] == [
            "user:dave"
        ]
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert "trustmesh_access_request_fulfillment_seconds_count 2.0" in metrics
    finally:
        server.stop()


def test_a_policy_test_that_vetoes_the_grant_refuses_the_approval(
    db_url: str | None, tmp_path: Path
) -> None:
    """A PolicyTest says web never reads orders: the approval is refused naming the test,
    and nothing of it is applied (no binding, no new version, the request pending, no
    access.approved; policy.rejected says why)."""
    server = start_server(tmp_path / "data", db_url)
    try:
        people = set_up(server, VETO)
        request_id = request_access(server, people.carol)
        before = current_policy(server, people.rita)
        refused(
            run(server, people.dave, "access", "approve", request_id),
            "web-never-reads-orders",
            "policy_test_failed",
        )
        after = current_policy(server, people.rita)
        assert after["revision"] == before["revision"] and access_bindings(after) == {}
        assert shown(server, people.rita, request_id)["state"] == "pending"
        rejected = events(server, people.rita, "policy.rejected")
        assert [e["detail"]["via"] for e in rejected] == [f"access:{request_id}"]
        assert "web-never-reads-orders" in json.dumps(rejected[0]["detail"]["failed_tests"])
        assert (
            call(server, people.rita, "GET", "/v1/audit/query?type=access.approved").json()[
                "entries"
            ]
            == []
        )
    finally:
        server.stop()


@pytest.mark.slow
def test_expiry_is_recorded_once_across_two_replicas(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two replicas on one PostgreSQL database: an approval of 3 s turns expired on
    both, ``access.expired`` is recorded exactly once, and nothing is published at the
    expiry; the next approvals' publish drops the expired binding, and two approvals at
    once on the two replicas both stay in the policy."""
    first = start_server(tmp_path / "a", database_for("postgresql", request))
    second = start_replica(tmp_path / "b", first)
    try:
        people = set_up(first)
        short = request_access(first, people.carol)
        # a duration of 3 s: the requests' API takes seconds
        body = {"role": "orders-reader", "subject": {"workload": "web"}, "clusters": ["east"],
                "duration": 3, "reason": "a short look"}  # fmt: skip
        # the second replica knows web once its snapshot refreshed (every second)
        answer = eventually(
            lambda: (a := post(second, people.rita, "/v1/access", body)).status_code == 201 and a,
            "the second replica takes the request",
        )
        brief = answer.json()["id"]
        approved = post(second, people.dave, f"/v1/access/{brief}/approve", {})
        assert approved.status_code == 200, approved.text
        revision = approved.json()["policyRevision"]
        for replica in (first, second):
            eventually(
                lambda r=replica: shown(r, people.rita, brief)["state"] == "expired",
                "the request shown expired",
            )
        eventually(lambda: events(first, people.rita, "access.expired"), "access.expired recorded")
        # both replicas' loops have looked several times since: still exactly one event
        eventually(
            lambda: (
                len(events(first, people.rita, "access.expired")) == 1
                and call(first, people.rita, "GET", "/v1/access?state=expired").json()["items"]
            ),
            "one access.expired",
        )
        time.sleep(3)  # several more rounds of both replicas' expiry loops
        (event,) = events(first, people.rita, "access.expired")
        assert event["actor"] == "system" and event["detail"]["id"] == brief
        assert event["detail"]["approved_by"] == "user:dave"
        policy = current_policy(first, people.rita)
        assert policy["revision"] == revision  # nothing published at the expiry
        assert f"access-{brief}" in access_bindings(policy)
        # the next approvals drop the expired binding; two at once on the two replicas
        # both land (neither version is built on a policy without the other's binding)
        other = request_access(second, people.carol)
        with ThreadPoolExecutor(2) as pool:
            answers = list(
                pool.map(
                    lambda job: post(job[0], people.dave, f"/v1/access/{job[1]}/approve", {}),
                    [(first, short), (second, other)],
                )
            )
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        names = set(access_bindings(current_policy(first, people.rita)))
        assert names == {f"access-{short}", f"access-{other}"}
    finally:
        second.stop()
        first.stop()


@pytest.mark.slow
def test_an_approved_access_is_in_force_at_the_agent_until_its_expiry(tmp_path: Path) -> None:
    """A real agent of the target cluster: workload web's JWT-SVID is denied the orders
    API; an approved request of 8 s lets it in, and at the expiry the agent denies it
    again by itself — no policy version is published in between."""
    server = start_server(tmp_path / "cp")
    origin = serve_cluster("access")
    agent = None
    try:
        boot = server.admin_token
        rita = add(server, boot, "rita", "auditor")
        dave = add(server, boot, "dave", "approver")
        ada = add(server, boot, "ada", "admin")
        manifests = "---\n".join(
            [
                cluster_yaml("east", origin.issuer),
                cluster_yaml("target", "http://127.0.0.1:9/target"),
                workload_yaml("web", "east", "shop", "web"),
                ROLE,
            ]
        )
        answer = post(server, ada, "/v1/apply", {"files": [{"path": "a.yaml", "content": manifests}]})  # fmt: skip
        assert answer.status_code == 200, answer.text
        credential = post(server, ada, "/v1/clusters/target/credentials", {}).json()["token"]
        agent = start_agent("target", [server.url], tmp_path / "agent", credential)
        exchanged = server.exchange(
            origin.mint("shop", "web"), f"spiffe://{TRUST_DOMAIN}/cluster/target"
        )
        assert exchanged.status_code == 200, exchanged.text
        token = exchanged.json()["access_token"]
        orders = {"host": "orders.test", "path": "/api/orders", "method": "GET"}

        def allowed() -> bool:
            assert agent is not None
            answer = agent.authorize(token, orders)
            assert answer.status_code == 200, answer.text
            return bool(answer.json()["allowed"])

        assert allowed() is False
        body = {"role": "orders-reader", "subject": {"workload": "web"}, "clusters": ["target"],
                "duration": 8, "reason": "INC-7: read the orders"}  # fmt: skip
        created = post(server, rita, "/v1/access", body)
        assert created.status_code == 201, created.text
        request_id = created.json()["id"]
        approved = post(server, dave, f"/v1/access/{request_id}/approve", {})
        assert approved.status_code == 200, approved.text
        revision = approved.json()["policyRevision"]
        expires_at = approved.json()["expiresAt"]
        eventually(allowed, "the agent allows web once the approval reached it")
        eventually(lambda: not allowed(), "the agent denies web again at the expiry")
        assert time.time() >= expires_at - 1  # not before the expiry (clock granularity)
        assert current_policy(server, rita)["revision"] == revision  # no publish between
        eventually(
            lambda: shown(server, rita, request_id)["state"] == "expired", "the request expired"
        )
    finally:
        if agent is not None:
            agent.stop()
        origin.stop()
        server.stop()


def test_the_list_pages_on_the_server(tmp_path: Path) -> None:
    """``GET /v1/access?limit=&after=`` (what the console's list pages with): every
    request once across the pages, newest first, ``next`` null on the last page; a bad
    limit or cursor is one clear 400."""
    server = start_server(tmp_path / "data", None)
    try:
        people = set_up(server)
        body = {"role": "orders-reader", "subject": {"workload": "web"}, "clusters": ["east"],
                "duration": 600, "reason": "paging"}  # fmt: skip
        made = []
        for _ in range(5):
            created = post(server, people.rita, "/v1/access", body)
            assert created.status_code == 201, created.text
            made.append(created.json()["id"])
        whole = call(server, people.rita, "GET", "/v1/access").json()
        assert whole["next"] is None and len(whole["items"]) == 5
        seen: list[str] = []
        after = ""
        while True:
            page = call(server, people.rita, "GET", f"/v1/access?limit=2&after={after}")
            assert page.status_code == 200, page.text
            seen += [i["id"] for i in page.json()["items"]]
            after = page.json()["next"]
            if after is None:
                break
        assert seen == [i["id"] for i in whole["items"]] and sorted(seen) == sorted(made)
        for query, fragment in (
            ("limit=0", "limit must be 1 to 1000"),
            ("limit=1001", "limit must be 1 to 1000"),
            ("limit=x", "limit must be a non-negative integer"),
            ("after=zzzzzzzzzz", "after: no access request zzzzzzzzzz"),
            ("after=..", "is not an access request id"),
        ):
            answer = call(server, people.rita, "GET", f"/v1/access?{query}")
            assert answer.status_code == 400 and fragment in answer.json()["error_description"], (
                answer.text
            )
    finally:
        server.stop()
