"""``trustmesh policy diff`` and ``export-rbac`` against a real control plane."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import yaml
from policy_fixtures import INVENTORY, binding, role
from typer.testing import CliRunner

from helpers import Server, start_server
from trustmesh.cli._common import CliError
from trustmesh.cli.policy_reports import register

POLICY = (
    role("reader", "{apiGroups: [''], resources: [pods], verbs: [get]}")
    + binding("read", "reader", "[{claims: {project: shop}}]", "namespaces: [shop]")
    + role("root", "{apiGroups: ['*'], resources: ['*'], verbs: ['*']}")
    + binding("ci-root", "root", "[{workload: ci}]", "clusters: {names: [dev-us]}")
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("policy-reports") / "data")
    try:
        running.apply(INVENTORY, path="inventory.yaml")
        running.apply(INVENTORY + POLICY, path="policy.yaml")
        yield running
    finally:
        assert running.stop() == 0, running.process.stderr()


def run(server: Server, *args: str) -> str:
    app = typer.Typer()
    policy_app = typer.Typer()
    register(policy_app)
    app.add_typer(policy_app, name="policy")

    @app.callback()
    def root() -> None:
        """Make ``policy`` a sub-command even with one group."""

    env = {"TRUSTMESH_SERVER": server.url, "TRUSTMESH_TOKEN": server.admin_token}
    result = CliRunner().invoke(app, ["policy", *args], env=env, catch_exceptions=True)
    if isinstance(result.exception, CliError):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_reports_read_policy_versions_from_the_server(server: Server) -> None:
    # The commands below fetch GET /v1/policy/versions/{revision}; if the route went
    # missing this fails here, by name, rather than in each command.
    response = server.admin.get("/v1/policy/versions/current")
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["revision"], int) and body["revision"] > 0
    names = {(d["kind"], d["metadata"]["name"]) for d in body["documents"]}
    assert {("GlobalRole", "reader"), ("RoleBinding", "ci-root")} <= names
    assert server.admin.get(f"/v1/policy/versions/{body['revision']}").json() == body


def test_diff_from_the_empty_policy_lists_grants_and_flags(server: Server) -> None:
    body = json.loads(run(server, "diff", "0", "current", "-o", "json"))
    assert body["from"] == 0 and body["disappeared"] == []
    appeared = {
        (g["workload"], g["cluster"], g["namespace"], g["action"], g["target"])
        for g in body["appeared"]
    }
    assert ("payments", "prod-eu", "shop", "get", "pods") in appeared
    assert ("ci", "dev-us", "*", "*", "*/*") in appeared  # any group, any resource
    flags = {
        e["grant"]["workload"]: e["flags"]
        for e in body["escalations"]
        if e["grant"]["target"] == "*/*"
    }
    assert flags["ci"] == ["wildcard", "secrets", "bind", "escalate", "impersonate"]
    table = run(server, "diff", "0", "current")
    assert "payments" in table and "+" in table
    assert "no effective change" in run(server, "diff", "current", "current")


def test_export_rbac_prints_yaml(server: Server) -> None:
    docs = [d for d in yaml.safe_load_all(run(server, "export-rbac", "--cluster", "prod-eu")) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("ClusterRole", "trustmesh:reader"),
        ("RoleBinding", "trustmesh:read"),
    ]
    assert docs[1]["subjects"][0]["name"] == "trustmesh:project:shop"


def test_errors_are_one_line(server: Server, tmp_path: Path) -> None:
    with pytest.raises(CliError, match="not a registered Cluster"):
        run(server, "export-rbac", "--cluster", "nowhere")
    with pytest.raises(CliError, match="is not a number"):
        run(server, "diff", "one", "current")
    with pytest.raises(CliError, match="HTTP 404"):
        run(server, "diff", "0", "999999")
