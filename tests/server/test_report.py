"""``trustmesh report`` (issue 15 item 3, DESIGN §11) over a real control plane and a
real agent: a workload's JWT-SVID allowed and denied at the agent, a grant it never
uses, a workload with no binding, a gap forced through the ingest endpoint, a real
access request approved. The report's coverage, least-privilege suggestion (its
evidence indexes are ``authz.decision`` entries of that binding), completeness and
fulfilment are checked, and the HTML file parses, holds the three charts and no token."""

from __future__ import annotations

import json
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
from test_audit_log import agent_event, ship
from test_people import add, call, run

from helpers import (
    TRUST_DOMAIN,
    Server,
    cluster_yaml,
    eventually,
    serve_cluster,
    start_agent,
    start_server,
    workload_yaml,
)

POLICY = """---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: orders-api}
spec:
  rules: [{services: [orders.test], paths: [/api/*], methods: [GET, POST, DELETE]}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: web-uses-orders}
spec:
  role: orders-api
  subjects: [{workload: web}]
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: admin-api}
spec:
  rules: [{services: [admin.test], paths: ["/**"], methods: ["*"]}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: web-admin}
spec:
  role: admin-api
  subjects: [{workload: web}]
---
apiVersion: trustmesh.io/v1alpha1
kind: PolicyTest
metadata: {name: web-reads-orders}
spec:
  cases:
    - name: web reads an order
      subject: {workload: web}
      cluster: target
      request: {host: orders.test, path: /api/orders, method: GET}
      expect: allow
"""


def report(server: Server, token: str, *args: str) -> dict[str, Any]:
    result = run(server, token, "report", "-o", "json", "--since", "1h", *args)
    assert result.returncode == 0, result.stderr
    body: dict[str, Any] = json.loads(result.stdout)
    return body


def entry(server: Server, token: str, index: int) -> dict[str, Any]:
    answer = call(server, token, "GET", f"/v1/audit/entries?start={index}&end={index + 1}")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()["entries"][0]["event"]
    return found


class Svgs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.svgs: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "svg":
            self.svgs.append(found.get("id") or "")
        for name in ("src", "href"):
            if found.get(name):
                self.external.append(str(found[name]))


def test_report_over_real_traffic(tmp_path: Path) -> None:
    server = start_server(tmp_path / "cp")
    origin = serve_cluster("east")
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
                workload_yaml("batch", "east", "jobs", "batch"),
                POLICY,
            ]
        )
        applied = call(server, ada, "POST", "/v1/apply", {"files": [{"path": "a.yaml", "content": manifests}]})  # fmt: skip
        assert applied.status_code == 200, applied.text
        credential = call(server, ada, "POST", "/v1/clusters/target/credentials", {})
        agent = start_agent("target", [server.url], tmp_path / "agent", credential.json()["token"])
        exchanged = server.exchange(
            origin.mint("shop", "web"), f"spiffe://{TRUST_DOMAIN}/cluster/target"
        )
        assert exchanged.status_code == 200, exchanged.text
        token = exchanged.json()["access_token"]
        asked = [
            ("/api/orders", "GET", True),
            ("/api/orders", "GET", True),
            ("/api/items", "GET", True),
            ("/internal", "GET", False),
        ]
        for path, method, expected in asked:
            answer = agent.authorize(token, {"host": "orders.test", "path": path, "method": method})
            assert answer.status_code == 200, answer.text
            assert answer.json()["allowed"] is expected

        # A gap: an agent credential ships seq 1, then seq 5 (2-4 never arrive).
        shipper = call(server, ada, "POST", "/v1/clusters/target/credentials", {"agent": "gappy"})
        spool = uuid.uuid4().hex
        for seq in (1, 5):
            shipped = ship(server, shipper.json()["token"], [agent_event("target", spool, seq)])
            assert shipped.status_code == 200, shipped.text

        body = {"role": "orders-api", "subject": {"workload": "web"}, "clusters": ["target"],
                "duration": 600, "reason": "INC-9"}  # fmt: skip
        created = call(server, rita, "POST", "/v1/access", body)
        assert created.status_code == 201, created.text
        approved = call(server, dave, "POST", f"/v1/access/{created.json()['id']}/approve", {})
        assert approved.status_code == 200, approved.text

        def shipped_decisions() -> dict[str, Any] | None:
            found = report(server, rita, "--stale-days", "0")
            shipped = found["decisions"]["total"] >= len(asked) + 2
            # and the analytics runner reported the escalation the policy's wildcard role is
            return found if shipped and found["anomalies"]["total"] >= 1 else None

        found = eventually(shipped_decisions, "the agent shipped its decisions")
        assert isinstance(found, dict)

        coverage = found["coverage"]
        assert (coverage["workloads"], coverage["covered"], coverage["percent"]) == (2, 1, 50.0)
        assert coverage["uncovered"] == ["batch"]
        # the approved access binding grants the same, so the case matches it too
        assert "web-uses-orders" in coverage["exercised"]
        assert "web-admin" in coverage["unexercised"]
        assert "web-admin" not in coverage["exercised"]
        tested = {b["name"]: b["testedBy"] for b in coverage["bindings"]}
        assert tested["web-uses-orders"] == [
            {"test": "web-reads-orders", "case": "web reads an order", "cluster": "target"}
        ]

        decisions = found["decisions"]
        # the agent's four, and the two shipped with the gap (allowed, by no binding)
        assert (decisions["allowed"], decisions["denied"]) == (3 + 2, 1)
        assert decisions["deniedByCluster"] == {"target": 1}
        assert decisions["crossCluster"] == [{"from": "east", "to": "target", "count": 4}]

        lp = {i["binding"]: i for i in found["leastPrivilege"]["bindings"]}
        assert lp["web-admin"]["unused"] is True and lp["web-admin"]["decisions"] == 0
        used = lp["web-uses-orders"]
        assert used["unused"] is False and used["decisions"] == 3
        assert set(used["narrower"]) == {"clusters", "rules"}
        role, binding = used["manifests"]
        assert role["spec"]["rules"] == [
            {
                "services": ["orders.test"],
                "methods": ["GET"],
                "paths": ["/api/items", "/api/orders"],
            }
        ]
        assert binding["spec"]["subjects"] == [{"workload": "web"}]
        assert binding["spec"]["clusters"] == {"names": ["target"]}
        assert len(used["evidence"]) == 3
        for index in used["evidence"]:
            event = entry(server, rita, index)
            assert event["type"] == "authz.decision"
            assert "web-uses-orders" in event["decision"]["bindings"]
            assert event["decision"]["allowed"] is True

        # The suggestion is a policy the control plane accepts, and it still allows web.
        narrowed = "\n---\n".join(json.dumps(m) for m in used["manifests"])
        check = call(server, ada, "POST", "/v1/apply", {"files": [{"path": "n.yaml", "content": narrowed}]})  # fmt: skip
        assert check.status_code == 200, check.text

        completeness = found["completeness"]
        gappy = [s for s in completeness["sources"] if s["agent"] == "gappy"]
        assert gappy and gappy[0]["nextSeq"] == 6
        gaps = [g for g in completeness["gaps"] if g["source"] == gappy[0]["source"]]
        assert [(g["firstSeq"], g["lastSeq"], g["missing"]) for g in gaps] == [(2, 4, 3)]
        assert completeness["gapsInWindow"] >= 1 and completeness["gapEvents"] >= 1
        assert any(s["agent"] != "gappy" and s["reporting"] for s in completeness["sources"])
        assert completeness["checkpoint"]["size"] > 0
        assert completeness["checkpoint"]["ageSeconds"] is not None

        access = found["access"]
        assert (access["requested"], access["approved"], access["fulfilled"]) == (1, 1, 1)
        assert access["p50Seconds"] is not None and access["p50Seconds"] >= 0
        assert access["p95Seconds"] >= access["p50Seconds"]

        assert {i["name"] for i in found["stale"]["items"]} >= {"batch"}
        # the policy applied above grants a wildcard role (web-admin): the runner's
        # escalation detector found it, and the report counts it by kind
        assert found["anomalies"] == {"total": 1, "byDetector": {"escalation": 1}}

        table = run(server, rita, "report", "--since", "1h")
        assert table.returncode == 0, table.stderr
        assert "50.0%" in table.stdout and "web-admin" in table.stdout
        assert "batch" in table.stdout  # the uncovered workload

        out = tmp_path / "report.html"
        result = run(server, rita, "report", "--since", "1h", "-o", "html", "--out", str(out))
        assert result.returncode == 0, result.stderr
        page = out.read_text()
        parser = Svgs()
        parser.feed(page)
        parser.close()
        assert parser.svgs == ["decisions-over-time", "denials-by-cluster", "cross-cluster-calls"]
        assert parser.external == []
        assert "@media print" in page and "web-uses-orders" in page
        for secret in (token, rita, dave, ada, boot, credential.json()["token"]):
            assert secret not in page
    finally:
        if agent is not None:
            agent.stop()
        origin.stop()
        server.stop()


def test_report_refuses_a_bad_window(tmp_path: Path) -> None:
    server = start_server(tmp_path / "cp")
    try:
        for args, problem in (
            (["--since", "yesterday"], "since must be an RFC 3339 time"),
            (["--since", "1h", "--until", "2h"], "since must be before until"),
            (["--since", "2026-11-30T00:00:00"], "since must name its time zone"),
        ):
            result = run(server, server.admin_token, "report", *args)
            assert result.returncode == 1
            assert problem in result.stderr and len(result.stderr.strip().splitlines()) == 1
        answer = httpx.get(server.url + "/v1/report", timeout=10)
        assert answer.status_code == 401
    finally:
        server.stop()
