"""deploy/monitoring/: the Prometheus alert rules and the Grafana dashboard (issue 15
item 4), held to the processes they watch.

The rules are checked by Prometheus' own ``promtool`` (Debian's ``prometheus``
package; the README's test command installs it): they parse, and their unit tests
(``prometheus-rules.test.yaml``: synthetic series in, the alerts expected out) pass.
The dashboard is checked for the shape Grafana imports (panels with targets, every
query on the datasource variable). Then a real control plane and a real agent are
driven through every surface the metrics cover — token exchange, ``/v1/authorize``,
ext_authz, TokenReview, SubjectAccessReview, admission, a policy change, a revocation,
audit shipping — and both ``/metrics`` are scraped: every ``trustmesh_*`` name the rules
and the dashboard use is one these processes expose, and the end-to-end histograms
counted what the traffic did."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    Agent,
    Federation,
    Server,
    allow_gets_of,
    eventually,
    register_federation,
    start_agent,
    start_server,
)
from trustmesh.common.histogram import Histogram
from trustmesh.sim import SimulatedCluster

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES = MONITORING / "prometheus-rules.yaml"
RULE_TESTS = MONITORING / "prometheus-rules.test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
NAME = re.compile(r"\btrustmesh_[a-z0-9_]+")

SURFACES = ("authorize", "ext_authz", "tokenreview", "subjectaccessreview", "admission")


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    """The agent's lock-free histogram exposes what Prometheus' own would: ``le``
    buckets counting values at or below the bound, cumulative, ending with +Inf."""
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    buckets, total = histogram.samples()
    assert buckets == [("0.1", 2.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert total == pytest.approx(8.65) and histogram.count == 5
    with pytest.raises(ValueError, match="increase"):
        Histogram((1.0, 0.5))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_rules_parse_with_promtool() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_fire_on_their_conditions() -> None:
    """``promtool test rules``: each alert fires on the series that should fire it
    (and the unit file covers every alert of the rules file)."""
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts - tested == set(), "alerts no unit test fires"


def test_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}", variable["name"]
    panels = dashboard["panels"]
    assert len(panels) >= 8
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    for panel in panels:
        assert panel["type"] and panel["title"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert NAME.search(target["expr"]), (panel["title"], target["expr"])
            for used in re.findall(r"\$(\w+)", target["expr"]):
                assert used in variables or used.startswith("__"), (panel["title"], used)


def referenced_names() -> set[str]:
    rules = yaml.safe_load(RULES.read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return {name for expr in exprs for name in NAME.findall(expr)}


def exposed(text: str) -> dict[str, list[Any]]:
    """Every name a ``/metrics`` answer declares (families, with the suffixes their type
    gives samples) -> its samples."""
    names: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
        }.get(family.type, [""])
        for suffix in suffixes:
            names.setdefault(family.name + suffix, [])
        for sample in family.samples:
            names.setdefault(sample.name, []).append(sample)
    return names


def scrape(url: str) -> dict[str, list[Any]]:
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return exposed(response.text)


def count(names: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in names.get(name, [])
        if all(s.labels.get(key) == value for key, value in labels.items())
    )


@pytest.fixture
def running(
    tmp_path: Path, sim_cluster: SimulatedCluster
) -> Iterator[tuple[Server, Federation, Agent]]:
    server = start_server(tmp_path / "cp")
    fed = register_federation(server, sim_cluster)
    server.apply(allow_gets_of(fed.workload))
    agent = start_agent(
        fed.target_name, [server.url], tmp_path / "agent", server.credential(fed.target_name)
    )
    yield server, fed, agent
    assert agent.stop() == 0, agent.process.stderr()
    assert server.stop() == 0, server.process.stderr()


def drive_every_surface(fed: Federation, agent: Agent) -> str:
    """One question on each surface the agent times; returns the SVID used."""
    svid = fed.svid()
    response = agent.authorize(svid)
    assert response.status_code == 200 and response.json()["allowed"], response.text
    check = httpx.get(
        agent.url + "/ext_authz/",
        headers={"Authorization": f"Bearer {svid}", "Host": "api.test"},
        timeout=10,
    )
    assert check.status_code == 200, check.text
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": svid},
    }
    answer = httpx.post(agent.url + "/k8s/authenticate", json=review, timeout=10)
    assert answer.status_code == 200 and answer.json()["status"]["authenticated"], answer.text
    access = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": "someone-else",
            "resourceAttributes": {"verb": "get", "resource": "pods", "namespace": "shop"},
        },
    }
    answer = httpx.post(agent.url + "/k8s/authorize", json=access, timeout=10)
    assert answer.status_code == 200 and answer.json()["status"]["allowed"] is False, answer.text
    admission = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "metrics-1",
            "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
            "operation": "UPDATE",
            "object": {},
        },
    }
    answer = httpx.post(agent.url + "/k8s/admission/validate", json=admission, timeout=10)
    assert answer.status_code == 200 and answer.json()["response"]["allowed"], answer.text
    return svid


def test_every_name_the_rules_and_dashboard_use_is_exposed(
    running: tuple[Server, Federation, Agent],
) -> None:
    server, fed, agent = running
    svid = drive_every_surface(fed, agent)

    # A policy change after the agent started: its propagation is observed.
    server.apply(allow_gets_of(fed.workload))
    eventually(
        lambda: count(scrape(agent.url), "trustmesh_agent_policy_propagation_seconds_count") >= 1,
        "the agent observes a bundle's propagation",
    )
    # A revocation, carried by the long poll: its propagation is observed.
    jti = jwt.decode(svid, options={"verify_signature": False})["jti"]
    revoked = server.admin.post(
        "/v1/revocations", json={"kind": "jti", "value": jti, "reason": "metrics test"}
    )
    assert revoked.status_code == 201, revoked.text
    assert revoked.json()["revocation"]["published_at"] is not None
    eventually(
        lambda: (
            count(scrape(agent.url), "trustmesh_agent_revocation_propagation_seconds_count") >= 1
        ),
        "the agent observes a revocation's propagation",
    )
    assert agent.authorize(svid).status_code == 401  # and enforces it

    # The agent's audit events reach the log: the control plane times their sequencing.
    eventually(
        lambda: count(scrape(server.url), "trustmesh_audit_sequencing_lag_seconds_count") >= 5,
        "the control plane sequences the agent's events",
    )

    # The agent reports the revision it applies (every bundle poll), in sync.
    def in_sync() -> dict[str, list[Any]] | None:
        found = scrape(server.url)
        lags = [
            s
            for s in found.get("trustmesh_agent_status_policy_lag_seconds", [])
            if s.labels["cluster"] == fed.target_name
        ]
        return found if len(lags) == 1 and lags[0].value == 0 else None

    plane = eventually(in_sync, "the agent's report names the bundle in force")
    ages = plane["trustmesh_agent_status_report_age_seconds"]
    assert [s.labels["cluster"] for s in ages].count(fed.target_name) == 1, ages
    assert (
        count(plane, "trustmesh_agent_status_policy_revisions_behind", cluster=fed.target_name) == 0
    )
    assert count(plane, "trustmesh_token_exchanges_total", result="issued") >= 1
    assert count(plane, "trustmesh_token_exchange_seconds_count") >= 1

    at_agent = scrape(agent.url)
    for surface in SURFACES:
        assert count(at_agent, "trustmesh_agent_decision_seconds_count", surface=surface) >= 1, (
            surface
        )
    assert count(at_agent, "trustmesh_agent_policy_revision") >= 1
    assert count(at_agent, "trustmesh_agent_revocation_revision") >= 1

    names = set(at_agent) | set(plane)
    missing = referenced_names() - names
    assert missing == set(), (
        f"referenced by the rules or the dashboard, exposed by no process: {missing}"
    )

    # An agent that stops polling falls behind the next change: the control plane says
    # by how many revisions, and that it is lagging.
    assert agent.stop() == 0, agent.process.stderr()
    server.apply(allow_gets_of(fed.workload))

    def behind() -> bool:
        found = scrape(server.url)
        revisions = count(
            found, "trustmesh_agent_status_policy_revisions_behind", cluster=fed.target_name
        )
        lag = count(found, "trustmesh_agent_status_policy_lag_seconds", cluster=fed.target_name)
        return revisions == 1 and lag > 0

    eventually(behind, "the control plane reports the stopped agent behind")
