"""The CLI as users run it: real subprocesses against a real control plane."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import TRUST_DOMAIN, Server, cluster_yaml, trustmesh_cmd, unique, workload_yaml
from trustmesh.sim import SimulatedCluster


def run(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trustmesh_cmd(*args),
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        env={**os.environ, "TRUSTMESH_CONFIG": "/nonexistent", **(env or {})},
    )


@pytest.fixture
def cli_env(shared_server: Server) -> dict[str, str]:
    return {"TRUSTMESH_SERVER": shared_server.url, "TRUSTMESH_TOKEN": shared_server.admin_token}


def one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_apply_get_and_exchange(
    cli_env: dict[str, str], tmp_path: Path, sim_cluster: SimulatedCluster
) -> None:
    origin, target, workload = unique("cli-o-"), unique("cli-t-"), unique("cli-w-")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "10-clusters.yaml").write_text(
        cluster_yaml(origin, sim_cluster.issuer)
        + "---\n"
        + cluster_yaml(target, f"http://127.0.0.1:9/{target}")
    )
    (manifests / "20-workloads.yaml").write_text(
        workload_yaml(workload, origin, "shop", "payments")
    )
    (manifests / "README.txt").write_text("ignored")
    result = run("apply", "-f", str(manifests), env=cli_env)
    assert result.returncode == 0, result.stderr
    assert (
        f"cluster/{origin} created" in result.stdout
        and f"workload/{workload} created" in result.stdout
    )
    assert f"cluster/{origin} unchanged" in run("apply", "-f", str(manifests), env=cli_env).stdout

    clusters = json.loads(run("get", "clusters", "-o", "json", env=cli_env).stdout)
    assert {origin, target} <= {c["metadata"]["name"] for c in clusters}
    table = run("get", "workloads", env=cli_env)
    assert table.returncode == 0 and workload[:8] in table.stdout

    token_file = tmp_path / "sa.token"
    token_file.write_text(sim_cluster.mint("shop", "payments"))
    audience = f"spiffe://{TRUST_DOMAIN}/cluster/{target}"
    server_only = {"TRUSTMESH_SERVER": cli_env["TRUSTMESH_SERVER"]}  # no admin credential needed
    exchanged = run(
        "token",
        "exchange",
        "--subject-token-file",
        str(token_file),
        "--audience",
        audience,
        env=server_only,
    )
    assert exchanged.returncode == 0, exchanged.stderr
    assert exchanged.stdout.count(".") == 2
    as_json = run(
        "token",
        "exchange",
        "--subject-token-file",
        "-",
        "-a",
        audience,
        "--lifetime",
        "60",
        "-o",
        "json",
        env=server_only,
        stdin=token_file.read_text(),
    )
    assert json.loads(as_json.stdout)["expires_in"] == 60

    refused = run(
        "token",
        "exchange",
        "--subject-token-file",
        str(token_file),
        "--audience",
        "spiffe://x.example/y",
        env=server_only,
    )
    one_line_error(refused, "invalid_target")

    credential = run("cluster", "credential", target, env=cli_env)
    assert credential.returncode == 0 and credential.stdout.startswith("tmc_")
    one_line_error(run("cluster", "credential", "no-such", env=cli_env), "not registered")


def test_apply_errors_are_one_clear_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(cluster_yaml(unique("x-"), "http://127.0.0.1:9/x") + "  audiance: x\n")
    result = run("apply", "-f", str(bad), env=cli_env)
    one_line_error(result, f"{bad}:7: spec.audiance")
    one_line_error(
        run("apply", "-f", str(tmp_path / "missing.yaml"), env=cli_env), "does not exist"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run("apply", "-f", str(empty), env=cli_env), "holds no .yaml")


def test_keys_list_and_rotate(tmp_path: Path) -> None:
    from helpers import start_server

    server = start_server(tmp_path / "cp")
    token_file = tmp_path / "admin.token"
    token_file.write_text(server.admin_token)
    try:
        env = {"TRUSTMESH_SERVER": server.url}
        listed = json.loads(
            run("keys", "list", "--token-file", str(token_file), "-o", "json", env=env).stdout
        )
        assert sorted(k["state"] for k in listed) == ["active", "prepared"]
        rotated = run("keys", "rotate", "--token-file", str(token_file), env=env)
        assert rotated.returncode == 0 and "active signing key is now" in rotated.stdout
        assert "retired" in run("keys", "list", "--token-file", str(token_file), env=env).stdout
    finally:
        assert server.stop() == 0


def test_configuration_errors(tmp_path: Path, cli_env: dict[str, str]) -> None:
    one_line_error(
        run("get", "clusters", env={"TRUSTMESH_SERVER": "", "TRUSTMESH_TOKEN": ""}), "--server"
    )
    one_line_error(
        run(
            "get",
            "clusters",
            env={"TRUSTMESH_SERVER": "http://127.0.0.1:9", "TRUSTMESH_TOKEN": "x"},
        ),
        "cannot reach",
    )
    one_line_error(
        run("get", "clusters", env={**cli_env, "TRUSTMESH_TOKEN": "wrong"}),
        "credential is not valid",
    )
    one_line_error(
        run(
            "get",
            "clusters",
            "--token-file",
            str(tmp_path / "nope"),
            env={"TRUSTMESH_SERVER": cli_env["TRUSTMESH_SERVER"], "TRUSTMESH_TOKEN": ""},
        ),
        "cannot read token file",
    )
    config = tmp_path / "config.yaml"
    config.write_text(f"server: {cli_env['TRUSTMESH_SERVER']}\ntoken_file: {tmp_path / 'admin'}\n")
    (tmp_path / "admin").write_text(cli_env["TRUSTMESH_TOKEN"])
    from_config = run(
        "get",
        "clusters",
        "-o",
        "json",
        env={"TRUSTMESH_CONFIG": str(config), "TRUSTMESH_SERVER": "", "TRUSTMESH_TOKEN": ""},
    )
    assert from_config.returncode == 0, from_config.stderr
    config.write_text("sever: x\n")
    one_line_error(
        run("get", "clusters", env={"TRUSTMESH_CONFIG": str(config), "TRUSTMESH_SERVER": ""}),
        "unknown key 'sever'",
    )
    one_line_error(
        run(
            "server",
            "--data-dir",
            str(tmp_path / "d"),
            "--trust-domain",
            "Bad Domain!",
            "--listen",
            "127.0.0.1:0",
        ),
        "trust domain",
    )
    one_line_error(
        run(
            "server",
            "--data-dir",
            str(tmp_path / "d"),
            "--trust-domain",
            "ok.example",
            "--listen",
            "nonsense",
        ),
        "HOST:PORT",
    )
    one_line_error(
        run(
            "server",
            "--data-dir",
            str(tmp_path / "d2"),
            "--trust-domain",
            "ok.example",
            "--listen",
            "127.0.0.1:0",
            "--db",
            "mysql://x",
        ),
        "not supported",
    )
    one_line_error(
        run(
            "server",
            "--data-dir",
            str(tmp_path / "d3"),
            "--trust-domain",
            "ok.example",
            "--listen",
            "127.0.0.1:0",
            "--db",
            "postgresql://nobody@127.0.0.1:9/x",
        ),
        "cannot use the database",
    )
    one_line_error(
        run(
            "agent",
            "--cluster",
            "a",
            "--server",
            "http://127.0.0.1:9",
            "--data-dir",
            str(tmp_path / "ag"),
            "--token-file",
            str(tmp_path / "none"),
        ),
        "cannot read token file",
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["server"],
        ["agent"],
        ["demo"],
        ["apply"],
        ["get", "clusters"],
        ["keys", "rotate"],
        ["cluster", "credential"],
        ["credentials", "list"],
        ["credentials", "rotate"],
        ["credentials", "revoke"],
        ["suspend"],
        ["resume"],
        ["get", "suspensions"],
        ["token", "exchange"],
        ["bench", "exchange"],
        ["bench", "verify"],
        ["bench", "analytics"],
        ["sim", "cluster"],
        ["backup"],
        ["restore"],
        ["drill"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["revoke", "--bogus"], "No such option: --bogus"),
        (["get", "nothing"], "No such command 'nothing'"),
        (["bench", "rotation", "--ttl", "5"], "Invalid value for '--ttl'"),
        (["bench", "analytics", "--events", "10"], "Invalid value for '--events'"),
        (["audit", "query", "--limit", "many"], "Invalid value for '--limit'"),
    ],
)
def test_a_usage_error_is_one_line(command: list[str], says: str) -> None:
    """Click's usage errors too: one line naming the problem and the help, exit 2."""
    result = run(*command)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert "--help" in lines[0]


def test_a_group_alone_prints_its_help() -> None:
    result = run("get")
    assert "Usage:" in result.stdout and "clusters" in result.stdout
