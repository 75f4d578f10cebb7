"""``python -m trustmesh.sim.cli``: real processes, real HTTP, real signals."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from trustmesh.sim import SimulatedCluster

SIM = [sys.executable, "-m", "trustmesh.sim.cli"]


def run_sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIM, *args], capture_output=True, text=True, timeout=60)


def read_line(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no ready line within {timeout} s")
    return proc.stdout.readline().rstrip("\n")


def verify(issuer: str, token: str, audience: str = "trustmesh") -> dict[str, Any]:
    discovery = httpx.get(issuer + "/.well-known/openid-configuration").json()
    key = jwt.PyJWKClient(discovery["jwks_uri"]).get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=discovery["id_token_signing_alg_values_supported"],
        audience=audience,
        issuer=discovery["issuer"],
    )
    return claims


@pytest.fixture
def cluster_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    data_dir = tmp_path / "east"
    proc = subprocess.Popen(
        [*SIM, "cluster", "--name", "east", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, data_dir
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_cluster_command_serves_discovery_and_stops_cleanly_on_sigterm(
    cluster_process: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, data_dir = cluster_process
    line = read_line(proc)
    prefix = "simulated cluster east issuer "
    assert line.startswith(prefix)
    issuer = line.removeprefix(prefix)
    assert issuer.startswith("http://127.0.0.1:")
    assert (data_dir / "issuer").read_text().strip() == issuer
    assert oct((data_dir / "keys.pem").stat().st_mode & 0o777) == "0o600"

    discovery = httpx.get(issuer + "/.well-known/openid-configuration").json()
    assert discovery["issuer"] == issuer
    assert discovery["jwks_uri"] == issuer + "/openid/v1/jwks"

    # A token minted by another process from the same data dir verifies against the
    # running issuer's JWKS: the CLI pair behaves like kube-apiserver + kubectl create token.
    minted = run_sim(
        "token", "--data-dir", str(data_dir), "--namespace", "payments",
        "--service-account", "api", "--audience", "trustmesh", "--audience", "vault",
        "--ttl", "120",
    )  # fmt: skip
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert "\n" not in token
    claims = verify(issuer, token, audience="vault")
    assert claims["sub"] == "system:serviceaccount:payments:api"
    assert claims["aud"] == ["trustmesh", "vault"]
    assert claims["exp"] - claims["iat"] == 120
    assert claims["kubernetes.io"]["node"]["name"] == "east-node-1"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert proc.stdout is not None and proc.stdout.read() == ""
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


def test_cluster_command_stops_cleanly_on_sigint(
    cluster_process: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, _ = cluster_process
    read_line(proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


def test_restarted_cluster_command_keeps_its_keys(tmp_path: Path) -> None:
    data_dir = tmp_path / "east"
    kids = SimulatedCluster("east", data_dir=data_dir, alg="ES256").kids
    proc = subprocess.Popen(
        [*SIM, "cluster", "--name", "east", "--listen", ":0", "--data-dir", str(data_dir),
         "--alg", "ES256"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        issuer = read_line(proc).rsplit(" ", 1)[1]
        jwks = httpx.get(issuer + "/openid/v1/jwks").json()
        assert [k["kid"] for k in jwks["keys"]] == kids
        assert jwks["keys"][0]["alg"] == "ES256"
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


def test_token_command_uses_the_keys_and_issuer_in_the_data_dir(tmp_path: Path) -> None:
    with SimulatedCluster("west", data_dir=tmp_path, alg="ES256") as cluster:
        result = run_sim(
            "token", "--data-dir", str(tmp_path), "--namespace", "default",
            "--service-account", "web",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        token = result.stdout.strip()
        assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": cluster.signing_kid}
        claims = verify(cluster.issuer, token)
        assert claims["aud"] == ["trustmesh"]
        assert claims["exp"] - claims["iat"] == 3600
        sa = claims["kubernetes.io"]["serviceaccount"]
        assert sa == {"name": "web", "uid": cluster.service_account_uid("default", "web")}


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("empty", [], "holds no simulated-cluster keys"),
        ("keys-only", [], "holds no issuer URL"),
        ("served", ["--ttl", "0"], "ttl must be positive"),
        ("served", ["--namespace", "Not_Valid"], "is not a valid Kubernetes name"),
    ],
)
def test_token_command_errors_are_one_line_without_traceback(
    tmp_path: Path, setup: str, args: list[str], message: str
) -> None:
    if setup == "keys-only":
        SimulatedCluster("east", data_dir=tmp_path)
    elif setup == "served":
        SimulatedCluster("east", data_dir=tmp_path).set_issuer("http://127.0.0.1:1")
    base = ["--namespace", "ns", "--service-account", "sa", *args]
    result = run_sim("token", "--data-dir", str(tmp_path), *base)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "nonsense"], "is not HOST:PORT"),
        (["--listen", "127.0.0.1:0", "--alg", "HS256"], "not supported"),
        (["--listen", "203.0.113.9:0"], "error: "),  # not a local address: bind fails
    ],
)
def test_cluster_command_errors_are_one_line_without_traceback(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run_sim("cluster", "--name", "east", "--data-dir", str(tmp_path / "d"), *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with SimulatedCluster("busy") as busy:
        port = busy.issuer.rsplit(":", 1)[1]
        result = run_sim(
            "cluster", "--name", "east", "--listen", f"127.0.0.1:{port}",
            "--data-dir", str(tmp_path),
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
