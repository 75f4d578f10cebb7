"""HTTPS (DESIGN §7: ``--tls-cert FILE --tls-key FILE``; ``common/tls.py``,
``common/serving.py``): the control plane and the agent serve TLS with a certificate of
a private CA made here with ``cryptography``; the CLI, the agent and the SDK trust that
CA with ``--ca-file`` / ``TRUSTMESH_CA_FILE`` and refuse the server without it, in one
line that says what to do; the bounds of docs/security.md hold over TLS (head size,
a slowloris after the handshake, a peer that stalls in the handshake); bad key files
stop the server before it binds; a renewed certificate is served without a restart.

Real processes on loopback; raw TLS sockets from the standard library for the attacks."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from helpers import (
    Agent,
    Process,
    Server,
    cluster_yaml,
    register_federation,
    start_agent,
    start_server,
    trustmesh_cmd,
    unique,
)
from tls_support import Tls, make_ca, make_tls
from trustmesh.client import TokenSource, TokenUnavailable
from trustmesh.sim import SimulatedCluster

HEADER_TIMEOUT = 1.0
HEADER_BYTES = 4096
LIMITS = (f"--header-timeout={HEADER_TIMEOUT}", f"--max-header-bytes={HEADER_BYTES}")


def trusting(tls: Tls) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls.ca))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tls: Tls) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("tls-server") / "server",
        None,
        *tls.flags(),
        *LIMITS,
        verify=trusting(tls),
    )
    yield running
    assert running.stop() == 0, running.process.stderr()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, server: Server, tls: Tls) -> Iterator[Agent]:
    name = unique("tls-")
    server.apply(cluster_yaml(name, f"http://127.0.0.1:9/{name}"))
    running = start_agent(
        name,
        [server.url],
        tmp_path_factory.mktemp("tls-agent") / "data",
        server.credential(name),
        "--ca-file",
        str(tls.ca),
        *tls.flags(),
        *LIMITS,
    )
    yield running
    assert running.stop() == 0, running.process.stderr()


def cli(
    server: Server, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "TRUSTMESH_CA_FILE"}
    environment.update(TRUSTMESH_SERVER=server.url, TRUSTMESH_TOKEN=server.admin_token)
    environment.update(env or {})
    return subprocess.run(
        trustmesh_cmd(*args), capture_output=True, text=True, timeout=60, env=environment
    )


# -- serving ---------------------------------------------------------------------------------
def test_the_server_and_the_agent_serve_https_with_the_given_certificate(
    server: Server, agent: Agent, tls: Tls
) -> None:
    assert server.url.startswith("https://127.0.0.1:")
    assert agent.url.startswith("https://127.0.0.1:")
    discovery = server.admin.get("/.well-known/openid-configuration").json()
    assert discovery["issuer"] == server.url  # the default issuer is the https URL
    for url in (server.url, agent.url):
        host, port = url.removeprefix("https://").rsplit(":", 1)
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            trusting(tls).wrap_socket(raw, server_hostname=host) as secure,
        ):
            served = secure.getpeercert(binary_form=True)
            assert secure.version() in ("TLSv1.2", "TLSv1.3")
        assert served == tls.leaf().public_bytes(serialization.Encoding.DER)
    ready = httpx.get(agent.url + "/readyz", verify=trusting(tls), timeout=10)
    assert ready.status_code == 200, ready.text  # the agent synced over HTTPS with --ca-file


def test_the_cli_trusts_a_private_ca_with_ca_file_the_environment_or_its_config(
    server: Server, tls: Tls, tmp_path: Path
) -> None:
    flag = cli(server, "--ca-file", str(tls.ca), "get", "clusters", "-o", "json")
    assert flag.returncode == 0, flag.stderr
    env = cli(server, "get", "clusters", "-o", "json", env={"TRUSTMESH_CA_FILE": str(tls.ca)})
    assert env.returncode == 0, env.stderr
    config = tmp_path / "config.yaml"
    config.write_text(f"ca_file: {tls.ca}\n")
    configured = cli(server, "get", "clusters", "-o", "json", env={"TRUSTMESH_CONFIG": str(config)})
    assert configured.returncode == 0, configured.stderr
    assert flag.stdout == env.stdout == configured.stdout


def test_a_cli_without_the_ca_is_refused_in_one_line_that_says_what_to_do(
    server: Server, tmp_path: Path
) -> None:
    refused = cli(server, "get", "clusters")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith(
        f"error: cannot reach {server.url}: the server's TLS certificate is not trusted"
    )
    assert "--ca-file" in lines[0] and "TRUSTMESH_CA_FILE" in lines[0]
    other_ca, _ = make_ca("another CA")
    other = tmp_path / "other.pem"
    other.write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    wrong = cli(server, "--ca-file", str(other), "get", "clusters")
    assert wrong.returncode == 1 and "not trusted" in wrong.stderr
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    unusable = cli(server, "--ca-file", str(not_pem), "get", "clusters")
    assert unusable.stderr.strip() == f"error: CA file {not_pem} holds no PEM certificate"


def test_an_agent_without_the_ca_does_not_sync_and_says_why(server: Server, tmp_path: Path) -> None:
    name = unique("tls-noca-")
    server.apply(cluster_yaml(name, f"http://127.0.0.1:9/{name}"))
    token_file = tmp_path / "credential"
    token_file.write_text(server.credential(name))
    token_file.chmod(0o600)
    args = ["agent", "--cluster", name, "--server", server.url, "--listen", "127.0.0.1:0"]
    args += ["--data-dir", str(tmp_path / "data"), "--token-file", str(token_file)]
    process = Process(trustmesh_cmd(*args), tmp_path / "agent.log")
    try:
        deadline = time.monotonic() + 30
        while "TLS certificate is not trusted" not in process.stderr():
            assert process.proc.poll() is None, process.stderr()
            assert time.monotonic() < deadline, process.stderr()
            time.sleep(0.1)
        assert "--ca-file" in process.stderr()
        assert process.lines.empty()  # no ready line: nothing was synced
    finally:
        process.stop()


def test_the_sdk_exchanges_over_https_with_ca_file(server: Server, tls: Tls) -> None:
    with SimulatedCluster(unique("tls-origin-")) as origin:
        federation = register_federation(server, origin)
        with TokenSource(
            [server.url], federation.sa_token, [federation.audience], ca_file=tls.ca
        ) as source:
            assert source.token().count(".") == 2
        with (
            TokenSource([server.url], federation.sa_token, [federation.audience]) as untrusting,
            pytest.raises(TokenUnavailable, match="TLS certificate is not trusted"),
        ):
            untrusting.token()


def audit_sources(server: Server, cluster: str) -> list[dict[str, Any]]:
    sources = server.admin.get("/v1/audit/sources").json()["sources"]
    return [source for source in sources if source["cluster"] == cluster]


def test_every_worker_of_the_server_and_of_the_agent_serves_https_and_decides(
    tmp_path: Path, tls: Tls, sim_cluster: SimulatedCluster
) -> None:
    """``--workers 2`` with ``--tls-cert``: each worker loads the certificate, so every
    connection the kernel hands to either worker is served over HTTPS — exchanges at
    the control plane, decisions on both of the agent's surfaces (its fast paths)."""
    verify = trusting(tls)
    cp = start_server(tmp_path / "server", None, "--workers", "2", *tls.flags(), verify=verify)
    try:
        assert cp.url.startswith("https://")
        federation = register_federation(cp, sim_cluster)
        deadline, streak = time.monotonic() + 60, 0
        while streak < 20:  # each on a new connection: the kernel picks the worker
            assert time.monotonic() < deadline, cp.process.stderr()
            answer = cp.exchange(federation.sa_token(), federation.audience)
            streak = streak + 1 if answer.status_code == 200 else 0
        agent = start_agent(
            federation.target_name,
            [cp.url],
            tmp_path / "agent",
            cp.credential(federation.target_name),
            "--workers",
            "2",
            "--ca-file",
            str(tls.ca),
            *tls.flags(),
        )
        try:
            assert agent.url.startswith("https://") and "(2 workers; " in agent.ready_line
            token = federation.svid()
            for _ in range(20):  # each on a new connection, as above
                native = httpx.post(
                    agent.url + "/v1/authorize",
                    json={
                        "token": token,
                        "request": {"host": "a.svc", "path": "/", "method": "GET"},
                    },
                    verify=verify,
                    timeout=10,
                )
                assert native.status_code == 200 and "allowed" in native.json(), native.text
                check = httpx.get(
                    agent.url + "/ext_authz/",
                    headers={"host": "a.svc", "authorization": f"Bearer {token}"},
                    verify=verify,
                    timeout=10,
                )
                assert check.status_code in (200, 403) and "allowed" in check.json(), check.text
            deadline = time.monotonic() + 60
            while not (
                len(sources := audit_sources(cp, federation.target_name)) == 2
                and all(source["next_seq"] > 1 for source in sources)
            ):  # both agent workers decided (each ships its own spool)
                assert time.monotonic() < deadline, sources
                time.sleep(0.2)
        finally:
            assert agent.stop() == 0, agent.process.stderr()
    finally:
        assert cp.stop() == 0, cp.process.stderr()


# -- the bounds over TLS -----------------------------------------------------------------------
@dataclass
class Target:
    host: str
    port: int
    context: ssl.SSLContext

    def tls_connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=10)
        return self.context.wrap_socket(raw, server_hostname=self.host)


@pytest.fixture(params=["server", "agent"])
def target(request: pytest.FixtureRequest, tls: Tls) -> Target:
    url = request.getfixturevalue(request.param).url
    host, port = url.removeprefix("https://").rsplit(":", 1)
    return Target(host, int(port), trusting(tls))


def read_head(sock: socket.socket) -> tuple[int, bytes]:
    """The status and what came of one response, or (0, b"") when closed first."""
    data = b""
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        return 0, b""
    return int(data.split()[1]), data


def test_a_head_over_the_bound_is_refused_431_over_tls(target: Target) -> None:
    with target.tls_connect() as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * HEADER_BYTES) + b"\r\n\r\n"
        )
        status, data = read_head(sock)
    assert status == 431, data
    assert b"headers_too_large" in data
    with target.tls_connect() as sock:  # and the next connection is served
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_head(sock)[0] == 200


def test_a_slowloris_over_tls_is_answered_408_within_the_header_timeout(target: Target) -> None:
    with target.tls_connect() as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        status, data = read_head(sock)
        waited = time.monotonic() - started
    assert status == 408, data
    assert b"request_timeout" in data
    assert waited < HEADER_TIMEOUT + 5, waited  # the bound, not an hour


def test_a_peer_that_stalls_in_the_tls_handshake_is_cut_off_unanswered(target: Target) -> None:
    with socket.create_connection((target.host, target.port), timeout=10) as raw:
        started = time.monotonic()
        raw.sendall(b"\x16\x03\x01\x02\x00")  # the start of a ClientHello record, no more
        try:
            answer = raw.recv(1024)
        except ConnectionResetError:
            answer = b""
        waited = time.monotonic() - started
    assert answer == b""  # closed without a byte: nothing is written in clear into TLS
    assert waited < HEADER_TIMEOUT + 5, waited


def test_plain_http_to_an_https_port_gets_no_answer(target: Target) -> None:
    with socket.create_connection((target.host, target.port), timeout=10) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(1024)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200")


# -- configuration -------------------------------------------------------------------------------
def server_fails(tmp_path: Path, *flags: str) -> str:
    """The one line ``trustmesh server`` prints when it refuses to start."""
    args = ["server", "--data-dir", str(tmp_path / "cp"), "--listen", "127.0.0.1:0"]
    result = subprocess.run(
        trustmesh_cmd(*args, "--trust-domain", "corp.example", *flags),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_tls_files_that_cannot_be_used_stop_the_server_with_one_line(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    assert "--tls-cert needs --tls-key" in server_fails(tmp_path, "--tls-cert", str(tls.cert))
    tls.key.chmod(0o666)
    assert "writable by others" in server_fails(tmp_path, *tls.flags())
    tls.key.chmod(0o600)
    other = make_tls(tmp_path / "other")
    mismatch = server_fails(tmp_path, "--tls-cert", str(tls.cert), "--tls-key", str(other.key))
    assert "is not the key of the first certificate" in mismatch
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(tls.key.read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    encrypted.chmod(0o600)
    assert "is encrypted" in server_fails(
        tmp_path, "--tls-cert", str(tls.cert), "--tls-key", str(encrypted)
    )
    missing = server_fails(
        tmp_path, "--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(tls.key)
    )
    assert "cannot read TLS file" in missing and "nope.crt" in missing
    assert not (tmp_path / "cp" / "admin.token").exists()  # refused before anything was set up


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    running = start_server(tmp_path / "server", None, *tls.flags(), verify=trusting(tls))
    try:
        host, port = running.url.removeprefix("https://").rsplit(":", 1)

        def served() -> x509.Certificate:
            with (
                socket.create_connection((host, int(port)), timeout=10) as raw,
                trusting(tls).wrap_socket(raw, server_hostname=host) as secure,
            ):
                der = secure.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der)

        first = served()
        renewed = tls.reissue()
        assert renewed.serial_number != first.serial_number
        deadline = time.monotonic() + 15
        while served().serial_number != renewed.serial_number:
            assert time.monotonic() < deadline, running.process.stderr()
            time.sleep(0.2)
        assert running.admin.get("/v1/clusters").status_code == 200
        assert "reloaded the certificate" in running.process.stderr()
    finally:
        assert running.stop() == 0
