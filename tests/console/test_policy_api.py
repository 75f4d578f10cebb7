"""The endpoints behind the console's workloads and policy pages, over HTTP against a
real control plane (``policy_scenario.py``): ``GET /v1/policy/diff``, ``POST
/v1/policy/explain`` and ``GET /v1/workloads`` with paging and filters — what they
answer, that any person may read them (an auditor here) and nothing else may, and that
every bad input is refused with a 400 naming what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from policy_scenario import FILLER, HOST, Scenario, populate

from helpers import start_server, trustmesh_cmd


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    server = start_server(tmp_path_factory.mktemp("policy-api") / "data")
    try:
        built = populate(server)
        try:
            yield built
        finally:
            built.stop()
    finally:
        assert server.stop() == 0, server.process.stderr()


@pytest.fixture(scope="module")
def auditor(scenario: Scenario) -> httpx.Client:
    answer = scenario.server.admin.post("/v1/people", json={"name": "ava", "role": "auditor"})
    assert answer.status_code == 200, answer.text
    return httpx.Client(
        base_url=scenario.server.url,
        headers={"Authorization": f"Bearer {answer.json()['token']}"},
        timeout=30,
    )


def refused(answer: httpx.Response, status: int, *fragments: str) -> None:
    assert answer.status_code == status, answer.text
    error = answer.json()["error_description"]
    assert all(f in error for f in fragments), error


def explain(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/policy/explain", json=body)


# --- the diff ----------------------------------------------------------------------------


def test_diff_between_two_applied_revisions_flags_the_escalation(
    scenario: Scenario, auditor: httpx.Client
) -> None:
    answer = auditor.get("/v1/policy/diff", params={"from": scenario.before, "to": scenario.after})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["from"], body["to"]) == (scenario.before, scenario.after)
    assert body["disappeared"] == []
    wide = {"workload": "ci", "cluster": scenario.dev, "namespace": "*", "action": "*"}
    assert {**wide, "target": "*/*", "kind": "resource"} in body["appeared"]
    flags = {
        e["grant"]["target"]: e["flags"]
        for e in body["escalations"]
        if e["grant"]["workload"] == "ci"
    }
    assert flags["*/*"] == ["wildcard", "secrets", "bind", "escalate", "impersonate"]
    # nothing of payments changed, and the reverse diff takes it all away again
    assert not [g for g in body["appeared"] if g["workload"] == "payments"]
    back = auditor.get("/v1/policy/diff", params={"from": scenario.after, "to": scenario.before})
    assert back.json()["disappeared"] == body["appeared"] and back.json()["escalations"] == []


def test_diff_counts_the_observed_template_identity(
    scenario: Scenario, auditor: httpx.Client
) -> None:
    body = auditor.get("/v1/policy/diff", params={"from": 0, "to": "current"}).json()
    assert body["to"] == scenario.after
    derived = {
        (g["namespace"], g["action"], g["target"])
        for g in body["appeared"]
        if g["workload"] == scenario.derived
    }
    # project: team-a is not shop: the template's identity has no grant but from ...
    assert derived == set()
    payments = {
        (g["namespace"], g["action"], g["target"])
        for g in body["appeared"]
        if g["workload"] == "payments"
    }
    assert ("shop", "get", "pods") in payments
    assert ("*", "GET", f"{HOST} /api/**") in payments


def test_the_cli_prints_the_servers_diff(scenario: Scenario) -> None:
    env = {
        **os.environ,
        "TRUSTMESH_CONFIG": "/nonexistent",
        "TRUSTMESH_SERVER": scenario.server.url,
        "TRUSTMESH_TOKEN": scenario.server.admin_token,
        "COLUMNS": "300",
    }
    args = ["policy", "diff", str(scenario.before), str(scenario.after)]

    def run(*extra: str) -> str:
        done = subprocess.run(
            trustmesh_cmd(*args, *extra), capture_output=True, text=True, env=env, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    served = scenario.server.admin.get(
        "/v1/policy/diff", params={"from": scenario.before, "to": scenario.after}
    )
    assert json.loads(run("-o", "json")) == served.json()
    assert "wildcard,secrets,bind,escalate,impersonate" in run()


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ({"to": "current"}, "from must be a policy revision"),
        ({"from": "0"}, "to must be a policy revision"),
        ({"from": "one", "to": "2"}, "from must be"),
        ({"from": "-1", "to": "2"}, "from must be"),
        ({"from": "0", "to": "1", "color": "red"}, "unknown query parameter 'color'"),
    ],
)
def test_diff_refuses_bad_revisions(
    scenario: Scenario, auditor: httpx.Client, query: dict[str, str], fragment: str
) -> None:
    refused(auditor.get("/v1/policy/diff", params=query), 400, fragment)


def test_diff_of_a_revision_that_does_not_exist_is_404(auditor: httpx.Client) -> None:
    refused(auditor.get("/v1/policy/diff?from=0&to=999999"), 404, "revision 999999 does not exist")


# --- explain ------------------------------------------------------------------------------


def test_explain_allow_names_the_binding_and_its_rule(
    scenario: Scenario, auditor: httpx.Client
) -> None:
    body = {
        "cluster": scenario.prod,
        "identity": {"workload": "payments"},
        "request": {"verb": "get", "resource": "pods", "namespace": "shop"},
    }
    answer = explain(auditor, body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["decision"] == "allow" and result["allowed"] is True
    assert result["revision"] == scenario.after
    assert result["identity"]["spiffeId"].endswith(f"/cluster/{scenario.prod}/ns/shop/sa/payments")
    [decider] = result["bindings"]
    assert decider["name"] == "shop-reads-pods" and decider["effect"] == "allow"
    assert decider["role"] == "pod-reader" and decider["namespaces"] == ["shop"]
    assert decider["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}
    ]
    assert "allowed by RoleBinding shop-reads-pods" in result["reason"]
    # asked by SPIFFE ID, the claims come from the bundle's inventory: the same answer
    by_id = explain(auditor, {**body, "identity": {"spiffeId": result["identity"]["spiffeId"]}})
    assert by_id.json()["bindings"] == result["bindings"]
    assert by_id.json()["identity"]["workload"] == "payments"


def test_explain_service_request_names_the_path_rule(
    scenario: Scenario, auditor: httpx.Client
) -> None:
    request = {"host": HOST, "path": "/api/orders/7", "method": "GET"}
    result = explain(
        auditor,
        {"cluster": scenario.prod, "identity": {"workload": "payments"}, "request": request},
    ).json()
    assert result["decision"] == "allow"
    assert [b["name"] for b in result["bindings"]] == ["payments-orders"]
    assert result["bindings"][0]["rules"][0]["paths"] == ["/api/**"]
    assert result["request"]["namespace"] == "shop"  # as the cluster reads the host


def test_explain_deny_without_a_binding_says_why(scenario: Scenario, auditor: httpx.Client) -> None:
    # default deny: the nearest binding named, no deciding binding
    result = explain(
        auditor,
        {
            "cluster": scenario.prod,
            "identity": {"workload": "payments"},
            "request": {"verb": "delete", "resource": "pods", "namespace": "shop"},
        },
    ).json()
    assert result["decision"] == "deny" and result["explicitDeny"] is False
    assert result["bindings"] == []
    assert "default deny" in result["reason"] and "; nearest: RoleBinding" in result["reason"]
    assert sorted(result["naming"]["allow"]) == ["payments-orders", "shop-reads-pods"]
    assert result["naming"]["deny"] == ["no-secrets-for-payments"]
    # an explicit deny wins over nothing and is the deciding binding
    denied = explain(
        auditor,
        {
            "cluster": scenario.prod,
            "identity": {"workload": "payments"},
            "request": {"verb": "get", "resource": "secrets", "namespace": "shop"},
        },
    ).json()
    assert denied["decision"] == "deny" and denied["explicitDeny"] is True
    assert [b["name"] for b in denied["bindings"]] == ["no-secrets-for-payments"]
    assert denied["bindings"][0]["effect"] == "deny"


def test_explain_over_an_older_revision_and_another_cluster(
    scenario: Scenario, auditor: httpx.Client
) -> None:
    request = {"verb": "delete", "resource": "nodes"}
    now = explain(
        auditor, {"cluster": scenario.dev, "identity": {"workload": "ci"}, "request": request}
    ).json()
    assert now["decision"] == "allow" and now["bindings"][0]["name"] == "ci-everything"
    then = explain(
        auditor,
        {
            "cluster": scenario.dev,
            "identity": {"workload": "ci"},
            "request": request,
            "revision": scenario.before,
        },
    ).json()
    assert then["revision"] == scenario.before and then["decision"] == "deny"
    assert then["naming"] == {"allow": [], "deny": [], "allowCount": 0, "denyCount": 0}
    # ci-everything is scoped to dev: on prod the same question is denied
    prod = explain(
        auditor, {"cluster": scenario.prod, "identity": {"workload": "ci"}, "request": request}
    ).json()
    assert prod["decision"] == "deny"


def test_explain_a_template_derived_and_an_unregistered_identity(
    scenario: Scenario, auditor: httpx.Client
) -> None:
    request = {"verb": "get", "resource": "pods", "namespace": "team-a"}
    derived = explain(
        auditor,
        {"cluster": scenario.prod, "identity": {"workload": scenario.derived}, "request": request},
    ).json()
    assert derived["identity"]["claims"]["project"] == "team-a"
    assert derived["decision"] == "deny"
    stranger = "spiffe://partner.example/ns/x/sa/y"
    answer = explain(
        auditor,
        {"cluster": scenario.prod, "identity": {"spiffeId": stranger}, "request": request},
    ).json()
    assert answer["identity"] == {
        "workload": None,
        "spiffeId": stranger,
        "registered": False,
        "claims": {},
    }
    assert answer["decision"] == "deny"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"cluster": None}, "cluster must be a non-empty string"),
        ({"cluster": "x" * 300}, "cluster is longer than 253"),
        ({"cluster": "nowhere"}, "cluster 'nowhere' is not a registered Cluster"),
        ({"identity": "payments"}, "identity must be"),
        ({"identity": {}}, "identity must be"),
        ({"identity": {"workload": "payments", "spiffeId": "spiffe://a/b"}}, "identity must be"),
        ({"identity": {"workload": "ghost"}}, "identity.workload 'ghost' is not a registered"),
        ({"identity": {"workload": "a\x07b"}}, "identity.workload must not contain control"),
        ({"identity": {"spiffeId": "https://x/y"}}, "identity.spiffeId"),
        ({"identity": {"spiffeId": 7}}, "identity.spiffeId must be a string"),
        ({"identity": {"pod": "x"}}, "identity must be"),
        ({"request": {}}, "request is empty"),
        ({"request": {"verb": "get"}}, "request.resource is required"),
        ({"request": {"host": "a", "path": "/", "method": "GET", "port": 1}}, "request.port"),
        ({"request": {"verb": "get", "resource": "p" * 2000}}, "request.resource is longer"),
        ({"request": "get pods"}, "request must be an object"),
        ({"revision": -1}, "revision must be a non-negative integer"),
        ({"revision": "2"}, "revision must be"),
        ({"revision": True}, "revision must be"),
        ({"colour": "red"}, "unknown member 'colour'"),
    ],
)
def test_explain_refuses_bad_input_naming_the_member(
    scenario: Scenario, auditor: httpx.Client, change: dict[str, Any], fragment: str
) -> None:
    body: dict[str, Any] = {
        "cluster": scenario.prod,
        "identity": {"workload": "payments"},
        "request": {"verb": "get", "resource": "pods", "namespace": "shop"},
        **change,
    }
    if change.get("cluster", "") is None:
        del body["cluster"]
    refused(explain(auditor, body), 400, fragment)


def test_explain_without_request_and_of_a_missing_revision(
    scenario: Scenario, auditor: httpx.Client
) -> None:
    body = {"cluster": scenario.prod, "identity": {"workload": "payments"}}
    refused(explain(auditor, body), 400, "request is required")
    asked = {**body, "request": {"verb": "get", "resource": "pods"}, "revision": 999999}
    refused(explain(auditor, asked), 404, "revision 999999 does not exist")
    refused(auditor.post("/v1/policy/explain", content=b"[1,2"), 400)


# --- workloads, paged ---------------------------------------------------------------------


def test_workloads_page_on_the_server(scenario: Scenario, auditor: httpx.Client) -> None:
    names: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 50, **({"after": after} if after else {})}
        page = auditor.get("/v1/workloads", params=params).json()
        assert len(page["items"]) <= 50 and page["total"] == FILLER + 3
        names += [i["metadata"]["name"] for i in page["items"]]
        pages += 1
        after = page["next"]
        if after is None:
            break
    assert pages == 3 and names == sorted(names) and len(set(names)) == FILLER + 3
    assert scenario.derived in names
    # the unpaged listing (get workloads, policy export-rbac) is unchanged
    full = auditor.get("/v1/workloads").json()
    assert "next" not in full and sorted(i["metadata"]["name"] for i in full["items"]) == names


def test_workloads_filters(scenario: Scenario, auditor: httpx.Client) -> None:
    def names(**params: Any) -> list[str]:
        answer = auditor.get("/v1/workloads", params=params)
        assert answer.status_code == 200, answer.text
        return [i["metadata"]["name"] for i in answer.json()["items"]]

    assert names(source="template") == [scenario.derived]
    [derived] = auditor.get("/v1/workloads", params={"source": "template"}).json()["items"]
    assert derived["status"]["template"] == "teams"
    assert derived["status"]["usage"]["lastCredentialAt"] is not None  # last seen
    assert names(cluster=scenario.dev) == ["ci"]
    assert names(q="PAYM") == ["payments"]
    assert names(q="/sa/ci") == ["ci"]  # a part of the SPIFFE ID
    assert scenario.derived not in names(source="explicit", limit=1000)
    # nothing has been idle for 30 days yet; every explicit Workload has for 0 days
    assert names(staleDays=30) == []
    assert len(names(staleDays=0, limit=1000)) == FILLER + 2
    [payments] = auditor.get("/v1/workloads", params={"q": "payments"}).json()["items"]
    assert payments["status"]["spiffeId"].endswith("/sa/payments")
    assert set(payments["status"]["usage"]) >= {"lastCredentialAt", "lastDecisionAt"}


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("limit=0", "limit must be from 1 to 1000"),
        ("limit=1001", "limit must be from 1 to 1000"),
        ("limit=ten", "limit must be a non-negative integer"),
        ("source=cronjob", "source must be one of explicit, template"),
        ("staleDays=-1", "staleDays must be a number of days"),
        ("q=" + "x" * 201, "q must be at most 200 characters"),
        ("cluster=a%01b", "cluster must be at most 253 characters without control"),
        ("sort=name", "unknown query parameter 'sort'"),
    ],
)
def test_workloads_refuse_bad_queries(auditor: httpx.Client, query: str, fragment: str) -> None:
    refused(auditor.get(f"/v1/workloads?{query}"), 400, fragment)


# --- who may ask --------------------------------------------------------------------------


def test_only_people_may_read_them(scenario: Scenario) -> None:
    url = scenario.server.url
    cluster_token = scenario.server.credential(scenario.dev)
    asks = [
        ("GET", "/v1/policy/diff?from=0&to=current", None),
        ("POST", "/v1/policy/explain", {"cluster": scenario.dev}),
        ("GET", "/v1/workloads?limit=5", None),
    ]
    for method, path, body in asks:
        anonymous = httpx.request(method, url + path, json=body, timeout=10)
        assert anonymous.status_code == 401, (path, anonymous.text)
        machine = httpx.request(
            method,
            url + path,
            json=body,
            headers={"Authorization": f"Bearer {cluster_token}"},
            timeout=10,
        )
        assert machine.status_code == 403, (path, machine.text)
