"""Onboarding from refusals and the last use of identities (DESIGN §11), on real
control-plane and agent processes over HTTP, SQLite and PostgreSQL: a service account
refused for want of a Workload is listed by ``trustmesh get pending`` (counted, first
and last seen, from both the token endpoint and ``POST /v1/x509-svid``), its suggested
manifest is accepted by ``trustmesh apply`` and admits it, after which the row is gone;
the list is bounded per cluster; every Workload shows its last credential and its last
decision (from the agent's shipped ``authz.decision`` events); ``trustmesh report stale``
lists the unused ones; a WorkloadTemplate clears the pending rows it matches and the
identities it gives show their last use."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_x509_svid import make_csr, request_svid

from helpers import (
    TRUST_DOMAIN,
    Server,
    cluster_yaml,
    new_postgres_database,
    serve_cluster,
    start_agent,
    start_replica,
    start_server,
    trustmesh_cmd,
    unique,
    workload_yaml,
)


@pytest.fixture
def server(tmp_path: Path, db_url: str | None) -> Iterator[Server]:
    started = start_server(tmp_path / "data", db_url, "--pending-per-cluster", "3")
    yield started
    assert started.stop() == 0, started.process.stderr()


def cli(server: Server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRUSTMESH_CONFIG": "/nonexistent", "COLUMNS": "300"}
    env.update(TRUSTMESH_SERVER=server.url, TRUSTMESH_TOKEN=server.admin_token)
    return subprocess.run(
        trustmesh_cmd(*args), capture_output=True, text=True, timeout=60, env=env, input=stdin
    )


def until(what: Callable[[], Any], timeout: float = 30.0) -> Any:
    """``what()`` once it is truthy (the flush is every 2 s), else its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def pending(server: Server) -> dict[tuple[str, str, str], dict[str, Any]]:
    answer = server.admin.get("/v1/pending")
    assert answer.status_code == 200, answer.text
    return {(i["cluster"], i["namespace"], i["serviceAccount"]): i for i in answer.json()["items"]}


def workload_status(server: Server, name: str) -> dict[str, Any]:
    answer = server.admin.get("/v1/workloads")
    assert answer.status_code == 200, answer.text
    (item,) = [i for i in answer.json()["items"] if i["metadata"]["name"] == name]
    status: dict[str, Any] = item["status"]
    return status


def audience(cluster: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/cluster/{cluster}"


def test_a_refused_service_account_is_listed_and_its_suggestion_admits_it(
    server: Server, tmp_path: Path
) -> None:
    with serve_cluster("pending") as origin:
        name = unique("origin-")
        server.apply(cluster_yaml(name, origin.issuer))
        token = origin.mint("checkout", "cart.v2")
        for _ in range(3):
            refused = server.exchange(token, audience(name))
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"] == "unauthorized_client"
        by_x509 = request_svid(server, token, make_csr())
        assert by_x509.json()["error"] == "unauthorized_client"
        key = (name, "checkout", "cart.v2")
        row = until(lambda: pending(server).get(key, {}).get("count") == 4 and pending(server))
        assert row, pending(server)
        item = row[key]
        assert item["firstSeen"] <= item["lastSeen"]

        table = cli(server, "get", "pending")
        assert table.returncode == 0, table.stderr
        assert "FIRST SEEN" in table.stdout and "cart.v2" in table.stdout

        printed = cli(server, "get", "pending", "-o", "yaml")
        assert printed.returncode == 0, printed.stderr
        manifests = list(yaml.safe_load_all(printed.stdout))
        (mine,) = [m for m in manifests if m["spec"]["selector"]["cluster"] == name]
        assert mine["kind"] == "Workload"
        assert mine["spec"]["selector"] == {
            "cluster": name,
            "namespace": "checkout",
            "serviceAccount": "cart.v2",
        }
        suggestion = tmp_path / "suggested.yaml"
        suggestion.write_text(yaml.safe_dump(mine, sort_keys=False))
        applied = cli(server, "apply", "-f", str(suggestion))
        assert applied.returncode == 0, applied.stderr
        assert f"workload/{mine['metadata']['name']} created" in applied.stdout

        admitted = server.exchange(token, audience(name))
        assert admitted.status_code == 200, admitted.text
        assert key not in pending(server)  # cleared once a Workload admits it
        status = until(
            lambda: (
                (s := workload_status(server, mine["metadata"]["name"]))["usage"][
                    "lastCredentialAt"
                ]
                and s
            )
        )
        assert status["usage"]["lastCredentialKind"] == "jwt-svid"
        assert status["usage"]["lastDecisionAt"] is None


def test_the_pending_list_is_capped_per_cluster(server: Server) -> None:
    """The server was started with ``--pending-per-cluster 3``: a fourth service account
    of the same cluster is dropped (and said so), while listed ones keep counting."""
    with serve_cluster("capped") as origin:
        name = unique("origin-")
        server.apply(cluster_yaml(name, origin.issuer))
        for account in ("a", "b", "c"):
            server.exchange(origin.mint("ns", account), audience(name))
        assert until(lambda: len([k for k in pending(server) if k[0] == name]) == 3)
        server.exchange(origin.mint("ns", "d"), audience(name))
        server.exchange(origin.mint("ns", "a"), audience(name))
        assert until(lambda: pending(server).get((name, "ns", "a"), {}).get("count") == 2)
        listed = [k for k in pending(server) if k[0] == name]
        assert sorted(k[2] for k in listed) == ["a", "b", "c"]
        answer = server.admin.get("/v1/pending").json()
        assert answer["limits"]["perCluster"] == 3
        assert answer["limits"]["droppedByThisReplica"] >= 1
        table = cli(server, "get", "pending")
        assert "dropped" in table.stderr


def test_last_credential_and_last_decision_and_the_stale_report(
    server: Server, tmp_path: Path
) -> None:
    with serve_cluster("usage") as origin:
        name, target = unique("origin-"), unique("target-")
        used, idle = unique("used-"), unique("idle-")
        server.apply(
            "---\n".join(
                [
                    cluster_yaml(name, origin.issuer),
                    cluster_yaml(target, f"http://127.0.0.1:9/{target}"),
                    workload_yaml(used, name, "shop", "payments"),
                    workload_yaml(idle, name, "shop", "ledger"),
                ]
            )
        )
        agent = start_agent(target, [server.url], tmp_path / "agent", server.credential(target))
        try:
            response = server.exchange(origin.mint("shop", "payments"), audience(target))
            assert response.status_code == 200, response.text
            token = response.json()["access_token"]
            decided = agent.authorize(token)
            assert decided.status_code == 200, decided.text
            status = until(
                lambda: (s := workload_status(server, used))["usage"]["lastDecisionAt"] and s
            )
            assert status, workload_status(server, used)
            assert status["usage"]["lastDecisionCluster"] == target
            assert status["usage"]["lastCredentialAt"] is not None
        finally:
            assert agent.stop() == 0
        never = workload_status(server, idle)["usage"]
        assert never["lastCredentialAt"] is None and never["lastDecisionAt"] is None

        workloads = cli(server, "get", "workloads", "-o", "wide")
        assert workloads.returncode == 0, workloads.stderr
        assert "LAST DECISION" in workloads.stdout and "never" in workloads.stdout

        none_stale = cli(server, "report", "stale", "--days", "1", "-o", "json")
        assert none_stale.returncode == 0, none_stale.stderr
        names = [i["name"] for i in json.loads(none_stale.stdout)["items"]]
        assert used not in names and idle not in names
        everything = json.loads(cli(server, "report", "stale", "--days", "0", "-o", "json").stdout)
        rows = {i["name"]: i for i in everything["items"]}
        assert rows[idle]["lastUsed"] is None and rows[used]["lastUsed"] is not None
        order = [i["name"] for i in everything["items"]]
        assert order.index(idle) < order.index(used)  # longest idle first

        bad = cli(server, "report", "stale", "--days", "-1")
        assert bad.returncode != 0
        raw = server.admin.get("/v1/reports/stale", params={"days": "x"})
        assert raw.status_code == 400 and "days" in raw.json()["error_description"]


def test_an_unused_workload_retires_and_an_apply_restores_it(
    server: Server, tmp_path: Path
) -> None:
    """``retireAfterUnused: 4s``: once its last credential is 4 s old the workload is
    retired — ``workload.retired``, no JWT-SVID nor X.509-SVID (a clear error), the
    agent denies the token it still holds — and applying its manifest again restores it
    as a registry revision of its own."""
    with serve_cluster("retire") as origin:
        name, target, workload = unique("origin-"), unique("target-"), unique("old-")
        manifest = workload_yaml(workload, name, "shop", "legacy", "  retireAfterUnused: 4s\n")
        server.apply(
            "---\n".join(
                [
                    cluster_yaml(name, origin.issuer),
                    cluster_yaml(target, f"http://127.0.0.1:9/{target}"),
                    manifest,
                ]
            )
        )
        assert workload_status(server, workload)["suspended"] is None
        agent = start_agent(target, [server.url], tmp_path / "agent", server.credential(target))
        try:
            sa_token = origin.mint("shop", "legacy")
            issued = server.exchange(sa_token, audience(target))
            assert issued.status_code == 200, issued.text
            token = issued.json()["access_token"]
            assert agent.authorize(token).json()["reason"] != "revoked"

            retired = until(lambda: workload_status(server, workload)["suspended"] or {})
            assert retired.get("retired") is True, retired
            assert retired["actor"] == "trustmesh:retirement"
            assert retired["reason"] == "unused for 4s"

            refused = server.exchange(sa_token, audience(target))
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"] == "invalid_grant"
            assert "retired" in refused.json()["error_description"]
            assert "applied again" in refused.json()["error_description"]
            by_x509 = request_svid(server, sa_token, make_csr())
            assert by_x509.status_code == 400
            assert "retired" in by_x509.json()["error_description"]
            assert until(lambda: agent.authorize(token).json()["reason"] == "revoked")

            events = server.audit_events_until(
                "workload.retired", lambda es: any(e["detail"]["workload"] == workload for e in es)
            )
            (event,) = [e for e in events if e["detail"]["workload"] == workload]
            assert event["actor"] == "system"
            assert event["detail"]["retire_after_unused"] == 4
            listing = cli(server, "get", "workloads")
            assert "retired" in listing.stdout

            before = server.admin.get("/v1/workloads").json()
            revision_before = next(
                i["status"]["generation"]
                for i in before["items"]
                if i["metadata"]["name"] == workload
            )
            again = server.apply(manifest)
            assert {"kind": "Workload", "name": workload, "action": "restored"} in again["changes"]
            admitted = server.exchange(sa_token, audience(target))
            assert admitted.status_code == 200, admitted.text
            status = workload_status(server, workload)
            assert status["generation"] == revision_before + 1
            restored = server.audit_events_until(
                "workload.restored",
                lambda es: any(e["detail"]["workload"] == workload for e in es),
            )
            assert any(e["detail"]["workload"] == workload for e in restored)
            fresh = admitted.json()["access_token"]
            assert agent.authorize(fresh).json()["reason"] != "revoked"
            verified = cli(server, "audit", "verify")
            assert verified.returncode == 0, verified.stdout + verified.stderr
        finally:
            assert agent.stop() == 0


def test_a_template_admits_pending_accounts_and_its_identities_show_last_use(
    server: Server,
) -> None:
    """Where templates and the life cycle meet: applying a WorkloadTemplate clears the
    pending service accounts it matches (not the others); those it matches are issued
    at once, never listed again, and their last use — a JWT-SVID, then an X.509-SVID —
    shows on the template-derived identity in ``get workloads``; ``report stale`` stays
    for explicit Workloads."""
    with serve_cluster("templated") as origin:
        name, template = unique("origin-"), unique("tpl-")
        server.apply(cluster_yaml(name, origin.issuer))
        matched, other = origin.mint("team-z", "api"), origin.mint("payments", "api")
        for token in (matched, other):
            refused = server.exchange(token, audience(name))
            assert refused.json()["error"] == "unauthorized_client", refused.text
        keys = {(name, "team-z", "api"), (name, "payments", "api")}
        assert until(lambda: keys <= set(pending(server))), pending(server)

        server.apply(
            f"""apiVersion: trustmesh.io/v1alpha1
kind: WorkloadTemplate
metadata:
  name: {template}
spec:
  clusters: {{names: [{name}]}}
  namespaces: ["team-*"]
  serviceAccounts: ["*"]
"""
        )
        listed = set(pending(server))
        assert (name, "team-z", "api") not in listed  # the template admits it
        assert (name, "payments", "api") in listed  # it matches no template

        issued = server.exchange(matched, audience(name))
        assert issued.status_code == 200, issued.text
        again = server.exchange(other, audience(name))
        assert again.json()["error"] == "unauthorized_client"
        identity = f"{template}/{name}/team-z/api"
        status = until(
            lambda: (s := workload_status(server, identity))["usage"]["lastCredentialAt"] and s
        )
        assert status, workload_status(server, identity)
        assert status["template"] == template
        assert status["spiffeId"] == f"spiffe://{TRUST_DOMAIN}/cluster/{name}/ns/team-z/sa/api"
        assert status["usage"]["lastCredentialKind"] == "jwt-svid"

        certificate = request_svid(server, matched, make_csr())
        assert certificate.status_code == 200, certificate.text
        assert until(
            lambda: workload_status(server, identity)["usage"]["lastCredentialKind"] == "x509-svid"
        ), workload_status(server, identity)
        # the exchange never refused it again, so a later read does not list it either
        assert until(lambda: pending(server).get((name, "payments", "api"), {}).get("count") == 2)
        assert (name, "team-z", "api") not in pending(server)

        wide = cli(server, "get", "workloads", "-o", "wide")
        assert wide.returncode == 0, wide.stderr
        assert "TEMPLATE" in wide.stdout and "LAST CREDENTIAL" in wide.stdout
        stale = json.loads(cli(server, "report", "stale", "--days", "0", "-o", "json").stdout)
        assert identity not in [i["name"] for i in stale["items"]]  # explicit Workloads only


def test_retire_after_unused_must_be_a_duration(server: Server) -> None:
    bad = workload_yaml(unique("w-"), "c", "ns", "sa", "  retireAfterUnused: soon\n")
    answer = server.apply(bad, expect=400)
    assert "retireAfterUnused" in json.dumps(answer)


def test_replicas_share_the_pending_list_and_the_last_use(
    tmp_path: Path, postgres_base_url: str
) -> None:
    """Two replicas on one PostgreSQL: refusals at each add to one row, a credential
    issued by one shows in the other's listing, and a Workload applied through one
    clears the row for both."""
    first = start_server(tmp_path / "a", new_postgres_database(postgres_base_url))
    second = start_replica(tmp_path / "b", first)
    try:
        with serve_cluster("replicas") as origin:
            name = unique("origin-")
            first.apply(cluster_yaml(name, origin.issuer))
            token = origin.mint("team", "batch")
            # The second replica knows the cluster once its snapshot refreshes (1 s).
            assert until(
                lambda: (
                    second.exchange(token, audience(name)).json()["error"] == "unauthorized_client"
                )
            )
            for replica in (first, second):
                refused = replica.exchange(token, audience(name))
                assert refused.json()["error"] == "unauthorized_client"
            key = (name, "team", "batch")
            assert until(lambda: pending(first).get(key, {}).get("count") == 3)
            assert pending(second)[key]["count"] == 3

            workload = unique("batch-")
            second.apply(workload_yaml(workload, name, "team", "batch"))
            assert key not in pending(first)
            assert until(lambda: second.exchange(token, audience(name)).status_code == 200)
            status = until(
                lambda: (s := workload_status(first, workload))["usage"]["lastCredentialAt"] and s
            )
            assert status, workload_status(first, workload)
    finally:
        assert second.stop() == 0, second.process.stderr()
        assert first.stop() == 0, first.process.stderr()
