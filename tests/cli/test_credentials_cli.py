"""``trustmesh cluster credential``, ``trustmesh credentials list|rotate|revoke`` and
``trustmesh suspend|resume`` as people and scripts run them: real subprocesses against
a real control plane (issue 10, finding 6)."""

from __future__ import annotations

import json

import httpx
from test_cli import cli_env, one_line_error, run  # noqa: F401 (cli_env is a fixture)

from helpers import Server, register_federation
from trustmesh.sim import SimulatedCluster


def accepted(server: Server, secret: str) -> bool:
    response = httpx.get(
        server.url + "/v1/agent/config", headers={"Authorization": f"Bearer {secret}"}
    )
    return response.status_code == 200


def test_credentials_issue_list_rotate_revoke(
    cli_env: dict[str, str],  # noqa: F811
    shared_server: Server,
    sim_cluster: SimulatedCluster,
) -> None:
    cluster = register_federation(shared_server, sim_cluster).target_name
    issued = run("cluster", "credential", cluster, "--agent", "edge-1", "--expires", "30d",
                 env=cli_env)  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    secret = issued.stdout.strip()
    assert issued.stdout == secret + "\n"  # `> file` captures the secret alone
    assert "agent edge-1" in issued.stderr and "expires" in issued.stderr
    assert accepted(shared_server, secret)

    listed = run("credentials", "list", "--cluster", cluster, "-o", "json", env=cli_env)
    items = json.loads(listed.stdout)
    assert [(c["agent"], c["state"]) for c in items] == [("edge-1", "active")]
    credential_id = items[0]["id"]
    assert items[0]["expires_at"] is not None and secret not in listed.stdout
    table = run("credentials", "list", "--cluster", cluster, env={**cli_env, "COLUMNS": "250"})
    assert table.returncode == 0 and "edge-1" in table.stdout and "active" in table.stdout

    rotated = run("credentials", "rotate", credential_id, "--overlap", "0s", env=cli_env)
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert "stopped working now" in rotated.stderr
    assert accepted(shared_server, new) and not accepted(shared_server, secret)

    revoked = run("credentials", "revoke", credential_id, "--reason", "host gone", env=cli_env)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked: credential {credential_id} (agent edge-1 of cluster {cluster})" in (
        revoked.stdout
    )
    assert not accepted(shared_server, new)
    again = run("credentials", "revoke", credential_id, env=cli_env)
    assert "already revoked" in again.stdout

    for args, fragment in [
        (["cluster", "credential", cluster, "--expires", "soon"], "--expires must be a duration"),
        (["cluster", "credential", cluster, "--expires", "²d"], "--expires must be a duration"),
        (["cluster", "credential", cluster, "--agent", "a/b"], "agent must be"),
        (["credentials", "rotate", credential_id], "is revoked"),
        (["credentials", "revoke", "nope"], "no credential"),
        (["credentials", "rotate", "abc", "--overlap", "1y"], "--overlap must be a duration"),
    ]:
        one_line_error(run(*args, env=cli_env), fragment)


def test_suspend_and_resume(
    cli_env: dict[str, str],  # noqa: F811
    shared_server: Server,
    sim_cluster: SimulatedCluster,
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    suspended = run("suspend", "--workload", fed.workload, "--reason", "incident", env=cli_env)
    assert suspended.returncode == 0, suspended.stderr
    assert f"suspended: workload {fed.workload}" in suspended.stdout
    refused = shared_server.exchange(fed.sa_token(), fed.audience)
    assert refused.status_code == 400 and "suspended" in refused.json()["error_description"]
    workloads = run("get", "workloads", env={**cli_env, "COLUMNS": "250"})
    row = next(line for line in workloads.stdout.splitlines() if fed.workload in line)
    assert "SUSPENDED" in workloads.stdout and row.rstrip(" │").endswith("yes")
    listed = json.loads(run("get", "suspensions", "-o", "json", env=cli_env).stdout)
    assert {"kind": "workload", "value": fed.workload, "reason": "incident"}.items() <= next(
        s for s in listed if s["value"] == fed.workload
    ).items()
    repeat = run("suspend", "--workload", fed.workload, env=cli_env)
    assert "already suspended" in repeat.stdout

    resumed = run("resume", "--workload", fed.workload, env=cli_env)
    assert resumed.returncode == 0 and f"resumed: workload {fed.workload}" in resumed.stdout
    assert fed.svid()

    one_line_error(
        run("suspend", "--workload", fed.workload, "--cluster", fed.origin_name, env=cli_env),
        "exactly one of --workload, --cluster, --spiffe-id",
    )
    one_line_error(run("resume", "--workload", fed.workload, env=cli_env), "is not suspended")
