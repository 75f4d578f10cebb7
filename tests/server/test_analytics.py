"""Security analytics end to end (issue 15, DESIGN §11 "Anomalies and escalation"): real
control planes, real applies and access approvals, the ``escalation`` detector's findings
seen as ``anomaly.detected`` events, rows of ``trustmesh get anomalies``, the metric;
people acknowledging and resolving them (auditors refused); an AnomalyPolicy that
quarantines the workload an escalating approval named (its exchange refused); and two
replicas on one PostgreSQL database: one runner, the other taking over when it dies,
nothing reported twice."""

from __future__ import annotations

import json
import signal
import time
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
    start_replica,
    start_server,
    workload_yaml,
)

READER = """---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: pod-reader}
spec:
  rules: [{apiGroups: [''], resources: [pods], verbs: [get]}]
"""
SECRETS = """---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: secret-reader}
spec:
  rules: [{apiGroups: [''], resources: [secrets], verbs: [get]}]
"""
WILDCARD = """---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: everything}
spec:
  rules: [{apiGroups: ['*'], resources: ['*'], verbs: ['*']}]
"""
QUARANTINE = """---
apiVersion: trustmesh.io/v1alpha1
kind: AnomalyPolicy
metadata: {name: default}
spec:
  detectors:
    escalation: {enabled: true, quarantine: true}
"""


def bind(name: str, role: str, workload: str = "web") -> str:
    return f"""---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: {name}}}
spec:
  role: {role}
  subjects: [{{workload: {workload}}}]
  namespaces: [shop]
"""


def apply(server: Server, token: str, text: str) -> dict[str, Any]:
    answer = call(server, token, "POST", "/v1/apply", {"files": [{"path": "a.yaml", "content": text}]})  # fmt: skip
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def anomalies(server: Server, token: str, query: str = "") -> list[dict[str, Any]]:
    answer = call(server, token, "GET", f"/v1/anomalies{query}")
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


def published_index(server: Server, token: str, revision: int) -> int:
    answer = call(server, token, "GET", "/v1/audit/query?type=policy.published&limit=1000")
    assert answer.status_code == 200, answer.text
    (index,) = [
        e["index"]
        for e in answer.json()["entries"]
        if e["event"]["detail"]["policy_revision"] == revision
    ]
    return int(index)


def inventory(issuer: str = "https://east.example") -> str:
    return "---\n".join(
        [
            cluster_yaml("east", issuer),
            workload_yaml("web", "east", "shop", "web"),
            workload_yaml("db", "east", "shop", "db"),
            READER,
            SECRETS,
        ]
    )


def test_an_escalating_apply_is_a_finding_people_acknowledge_and_resolve(tmp_path: Path) -> None:
    """An apply that grants nothing escalating is no finding; one that lets web read
    secrets is: an ``anomaly.detected`` event (actor system) whose evidence is the
    ``policy.published`` entry, a row of ``get anomalies`` (table, wide, json), the
    counter. Auditors read it but cannot acknowledge or resolve it; an approver
    acknowledges, an admin resolves with a note; a second resolve is a conflict."""
    server = start_server(tmp_path / "cp", analytics="process")
    try:
        boot = server.admin_token
        rita = add(server, boot, "rita", "auditor")
        carol = add(server, boot, "carol", "approver")
        ada = add(server, boot, "ada", "admin")
        apply(server, ada, inventory() + bind("web-pods", "pod-reader"))
        escalating = apply(server, ada, bind("web-secrets", "secret-reader"))
        revision = escalating["policyRevision"]
        (found,) = eventually(lambda: anomalies(server, rita), "the escalation found")
        assert found["detector"] == "escalation" and found["state"] == "open"
        assert found["key"] == f"escalation:policy:{revision}"
        assert found["subject"] == {"user": "ada"} and found["severity"] == "high"
        assert found["evidence"] == [published_index(server, rita, revision)]
        assert "secrets" in found["details"]["flags"] and found["quarantined"] is None
        assert {"workload": "web", "cluster": "east", "namespace": "shop", "action": "get",
                "target": "secrets", "kind": "resource"} in [
            g["grant"] for g in found["details"]["grants"]
        ]  # fmt: skip
        assert f"policy revision {revision} published by user:ada" in found["summary"]

        (event,) = eventually(
            lambda: events(server, rita, "anomaly.detected"), "anomaly.detected logged"
        )
        assert event["actor"] == "system" and event["detail"]["id"] == found["id"]
        assert event["detail"]["evidence"] == found["evidence"]
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert 'trustmesh_anomalies_total{detector="escalation"} 1.0' in metrics

        table = run(server, rita, "get", "anomalies")
        assert table.returncode == 0, table.stderr
        assert found["id"] in table.stdout and "escalation" in table.stdout
        wide = run(server, rita, "get", "anomalies", "-o", "wide")
        assert wide.returncode == 0 and "EVIDENCE" in wide.stdout, wide.stderr
        as_json = run(server, rita, "get", "anomalies", "-o", "json", "--state", "open")
        assert json.loads(as_json.stdout)["items"] == [found]
        assert call(server, rita, "GET", "/v1/anomalies?state=bogus").status_code == 400
        assert call(server, rita, "GET", "/v1/anomalies?detector=bogus").status_code == 400
        assert call(server, rita, "GET", "/v1/anomalies?bogus=1").status_code == 400
        one = call(server, rita, "GET", "/v1/anomalies?limit=1").json()  # a page, the last
        assert one["items"] == [found] and one["next"] is None
        assert one["analyzedThrough"] > max(found["evidence"])
        assert call(server, rita, "GET", "/v1/anomalies?limit=0").status_code == 400
        assert call(server, rita, "GET", "/v1/anomalies?after=nope").status_code == 400
        assert call(server, rita, "GET", "/v1/anomalies?detector=new_edge").json()["items"] == []
        assert call(server, rita, "GET", f"/v1/anomalies/{found['id']}").json() == found
        assert call(server, rita, "GET", "/v1/anomalies/nope").status_code == 404

        path = f"/v1/anomalies/{found['id']}"
        assert call(server, rita, "POST", f"{path}/acknowledge", {}).status_code == 403
        refused(run(server, rita, "anomalies", "resolve", found["id"]), "auditor")
        acked = run(server, carol, "anomalies", "ack", found["id"], "--note", "looking")
        assert acked.returncode == 0, acked.stderr
        assert f"acknowledged: anomaly {found['id']} (escalation) by user:carol" in acked.stdout
        resolved = call(server, ada, "POST", f"{path}/resolve", {"note": "intended: INC-9"})
        assert resolved.status_code == 200, resolved.text
        done = resolved.json()
        assert (done["state"], done["acknowledgedBy"], done["resolvedBy"], done["note"]) == (
            "resolved", "user:carol", "user:ada", "intended: INC-9",
        )  # fmt: skip
        assert call(server, ada, "POST", f"{path}/resolve", {}).status_code == 409
        assert call(server, ada, "POST", f"{path}/resolve", {"bogus": 1}).status_code == 400
        (ack_event,) = events(server, rita, "admin.anomaly_acknowledged")
        assert ack_event["actor"] == "user:carol" and ack_event["detail"]["id"] == found["id"]
        # a change that escalates nothing is no finding
        apply(server, ada, bind("db-pods", "pod-reader", "db"))
        time.sleep(3)  # several rounds of the runner
        assert len(anomalies(server, rita)) == 1
    finally:
        server.stop()


def test_a_quarantining_policy_suspends_the_workload_an_escalating_approval_names(
    tmp_path: Path,
) -> None:
    """With ``escalation: {quarantine: true}``, an approved access request that gives
    workload web the secret-reader role is a finding whose subject is web, and web is
    suspended by ``system`` in the finding's transaction: its exchange is refused."""
    server = start_server(tmp_path / "cp", analytics="process")
    origin = serve_cluster("analytics")
    try:
        boot = server.admin_token
        rita = add(server, boot, "rita", "auditor")
        dave = add(server, boot, "dave", "approver")
        ada = add(server, boot, "ada", "admin")
        apply(server, ada, inventory(origin.issuer) + QUARANTINE)
        audience = f"spiffe://{TRUST_DOMAIN}/cluster/east"
        exchanged = server.exchange(origin.mint("shop", "web"), audience)
        assert exchanged.status_code == 200, exchanged.text
        body = {"role": "secret-reader", "subject": {"workload": "web"}, "clusters": ["east"],
                "duration": 3600, "reason": "INC-7: read the tls secret"}  # fmt: skip
        created = call(server, rita, "POST", "/v1/access", body)
        assert created.status_code == 201, created.text
        request_id = created.json()["id"]
        approved = call(server, dave, "POST", f"/v1/access/{request_id}/approve", {})
        assert approved.status_code == 200, approved.text
        revision = approved.json()["policyRevision"]

        (found,) = eventually(lambda: anomalies(server, rita), "the escalation found")
        assert found["key"] == f"escalation:access:{request_id}"
        assert found["subject"] == {"workload": "web"}
        assert found["quarantined"] == {"kind": "workload", "value": "web", "created": True}
        approval = events(server, rita, "access.approved")
        approval_index = call(
            server, rita, "GET", "/v1/audit/query?type=access.approved&limit=10"
        ).json()["entries"][0]["index"]
        assert approval and found["evidence"] == [
            published_index(server, rita, revision), approval_index,
        ]  # fmt: skip

        def suspended() -> list[dict[str, Any]]:  # made by the analytics process: the
            # serving process's snapshots have it within a refresh (about a second)
            listed = call(server, ada, "GET", "/v1/suspensions").json()["suspensions"]
            return [s for s in listed if s["value"] == "web"]

        (suspension,) = eventually(suspended, "the suspension served")
        assert suspension["actor"] == "system" and found["id"] in suspension["reason"]
        refused_exchange = eventually(
            lambda: (
                (r := server.exchange(origin.mint("shop", "web"), audience)).status_code == 400
                and r
            ),
            "web's exchange refused",
        )
        assert refused_exchange.json()["error"] == "invalid_grant"
        wide = run(server, rita, "get", "anomalies", "-o", "wide")
        assert "workload web suspended" in wide.stdout, wide.stdout
        (event,) = events(server, rita, "anomaly.detected")
        assert event["detail"]["quarantined"]["created"] is True
    finally:
        server.stop()
        origin.stop()


def _runner(replicas: list[Server]) -> Server:
    """The replica whose runner recorded a finding (it logs each one)."""
    (holder,) = [r for r in replicas if "anomaly " in r.process.stderr()]
    return holder


@pytest.mark.slow
def test_one_runner_across_replicas_survives_a_kill_and_reports_nothing_twice(
    request: Any, tmp_path: Path
) -> None:
    """Two replicas on one PostgreSQL database: one runner records the first finding;
    killed (SIGKILL, its lease left to lapse), the other takes over from the stored
    cursor and records the next change's finding; a restarted replica joins. Each
    finding exactly once, in the table and in the log."""
    first = start_server(tmp_path / "a", database_for("postgresql", request), analytics="process")
    second = start_replica(tmp_path / "b", first, analytics="process")
    third: Server | None = None
    try:
        boot = first.admin_token
        rita = add(first, boot, "rita", "auditor")
        ada = add(first, boot, "ada", "admin")
        apply(first, ada, inventory())
        apply(first, ada, bind("web-secrets", "secret-reader"))
        eventually(lambda: anomalies(first, rita), "the first finding")
        holder = _runner([first, second])
        survivor = second if holder is first else first
        holder.process.stop(signal.SIGKILL)
        apply(survivor, ada, bind("db-secrets", "secret-reader", "db"))
        eventually(lambda: len(anomalies(survivor, rita)) == 2, "the survivor's finding")
        third = start_replica(
            tmp_path / "c", first if holder is second else second, analytics="process"
        )
        apply(third, ada, WILDCARD + bind("web-everything", "everything"))
        found = eventually(lambda: len(a := anomalies(third, rita)) == 3 and a, "the third finding")
        time.sleep(4)  # several rounds of both runners' loops
        found = anomalies(survivor, rita)
        keys = sorted(a["key"] for a in found)
        assert len(keys) == 3 == len(set(keys))
        logged = events(survivor, rita, "anomaly.detected")
        assert sorted(e["detail"]["key"] for e in logged) == keys
    finally:
        for server in (first, second, third):
            if server is not None:
                server.stop()
