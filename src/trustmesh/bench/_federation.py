"""The federation the HTTP benchmarks measure, set up one way for all of them.

``federation(origin)`` starts a control plane (``trustmesh server``: SQLite in a
temporary data dir, the trust domain ``bench.example``) and a simulated origin cluster
(a kube-apiserver-like OIDC issuer of service-account tokens, found by the server
through discovery) as child processes (``_procs``: output in log files, ready lines
awaited). On it a benchmark applies its manifests (``cluster_doc``, ``workload_doc``…),
starts agents — each with its own cluster credential and data dir — and exchanges
service-account tokens for JWT-SVIDs (RFC 8693). Leaving the block stops every child
at once (each drains in parallel) and removes the data dirs.

Also here, so the benchmarks build them alike: the exchange form and its answer, the
raw ``POST /v1/authorize`` the load generators send, and an ES256 key of the kind the
control plane signs with, for benchmarks that mint JWT-SVIDs in process."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.bench._load import LoadResult, request_bytes, run_load
from trustmesh.bench._procs import Child, cpu_seconds, start, stop_all
from trustmesh.bench._stats import Distribution
from trustmesh.common.token_exchange import exchange_form
from trustmesh.identity.jws import b64decode
from trustmesh.identity.keys import ActiveKey, generate_private_key, public_jwk
from trustmesh.manifests import API_VERSION
from trustmesh.sim import SimulatedCluster

__all__ = [
    "TRUST_DOMAIN",
    "Agent",
    "Federation",
    "address",
    "authorize_request",
    "binding_doc",
    "cluster_doc",
    "es256_key",
    "exchanged",
    "federation",
    "numbered_workloads",
    "role_doc",
    "unverified_claims",
    "workload_doc",
]

TRUST_DOMAIN = "bench.example"


# -- manifests ------------------------------------------------------------------------


def _doc(kind: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def cluster_doc(name: str, issuer: str | None = None, **spec: Any) -> dict[str, Any]:
    """A Cluster by issuer URL (its keys through OIDC discovery). Without ``issuer``, a
    peer that is only ever an audience: ``https://NAME.bench.example``, never contacted."""
    return _doc("Cluster", name, {"issuer": issuer or f"https://{name}.{TRUST_DOMAIN}", **spec})


def workload_doc(
    name: str,
    *,
    cluster: str,
    namespace: str,
    service_account: str,
    claims: Mapping[str, str],
    **spec: Any,
) -> dict[str, Any]:
    """A Workload; ``spec`` adds fields such as ``maxTokenTTL``."""
    selector = {"cluster": cluster, "namespace": namespace, "serviceAccount": service_account}
    return _doc("Workload", name, {"selector": selector, "claims": dict(claims), **spec})


def numbered_workloads(cluster: str, count: int, projects: int) -> list[dict[str, Any]]:
    """Workloads ``svc-I`` (namespace ``ns-I``, service account ``sa-I``) of ``cluster``,
    spread over ``projects`` projects, all ``environment: prod``, ``tier: gold``."""
    return [
        workload_doc(
            f"svc-{i}",
            cluster=cluster,
            namespace=f"ns-{i}",
            service_account=f"sa-{i}",
            claims={"project": f"project-{i % projects}", "environment": "prod", "tier": "gold"},
        )
        for i in range(count)
    ]


def role_doc(name: str, rules: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return _doc("GlobalRole", name, {"rules": [dict(rule) for rule in rules]})


def binding_doc(name: str, role: str, subjects: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return _doc("RoleBinding", name, {"role": role, "subjects": [dict(s) for s in subjects]})


# -- the exchange (RFC 8693) and the agent's request --------------------------------------


def exchanged(response: httpx.Response) -> str:
    """The JWT-SVID of a successful exchange (RFC 8693 §2.2.1 ``access_token``)."""
    if response.status_code != 200:
        raise RuntimeError(f"exchange failed: HTTP {response.status_code} {response.text[:300]}")
    return str(response.json()["access_token"])


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT the benchmark was just given by its own server (unverified:
    only to read its ``jti`` or check its audience)."""
    claims: dict[str, Any] = json.loads(b64decode(token.split(".")[1]))
    return claims


def authorize_request(host: str, port: int, token: str, request: Mapping[str, str]) -> bytes:
    """``POST /v1/authorize`` with ``{token, request}``, as raw HTTP/1.1 bytes."""
    body = json.dumps({"token": token, "request": request}).encode()
    headers = {"Host": f"{host}:{port}", "Content-Type": "application/json"}
    return request_bytes("POST", "/v1/authorize", headers, body)


def address(url: str) -> tuple[str, int]:
    """(host, port) of a child's ``http://HOST:PORT`` URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def es256_key() -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any], ActiveKey]:
    """A fresh P-256 key as the control plane signs JWT-SVIDs with: (private key, its
    public JWK, the signing key)."""
    private = generate_private_key("ES256")
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    jwk = public_jwk(private, "ES256")
    return private, jwk, ActiveKey(kid=jwk["kid"], alg="ES256", private_key=private)


# -- the processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Agent:
    cluster: str
    child: Child
    host: str
    port: int


@dataclass
class Federation:
    """A running control plane and origin cluster; see ``federation``."""

    root: Path
    origin: str
    http: httpx.Client
    server: Child
    url: str
    admin: dict[str, str]  # the admin's Authorization header
    cluster: SimulatedCluster  # the origin, reopened here to mint SA tokens
    children: list[Child]  # every process started, agents too: stopped on exit

    def apply(self, docs: Iterable[Mapping[str, Any]]) -> None:
        """``trustmesh apply`` of ``docs`` (as one JSON-per-document YAML stream)."""
        content = "\n---\n".join(json.dumps(doc) for doc in docs) + "\n"
        response = self.http.post(
            self.url + "/v1/apply",
            headers=self.admin,
            json={"files": [{"path": "bench.yaml", "content": content}]},
        )
        if response.status_code != 200:
            raise RuntimeError(
                f"applying the bench manifests failed: HTTP {response.status_code} "
                f"{response.text[:300]}"
            )

    def exchange(
        self, subject_token: str, audience: str | Sequence[str], lifetime: int | None = None
    ) -> str:
        """One token exchange -> the JWT-SVID."""
        form = exchange_form(subject_token, audience, lifetime)
        return exchanged(self.http.post(self.url + "/oauth2/token", data=form))

    def start_agents(
        self,
        clusters: Sequence[str],
        ready_timeout: float = 60.0,
        extra_args: Sequence[str] = (),
    ) -> list[Agent]:
        """An agent for each of ``clusters``, all started at once (``trustmesh agent``
        with ``extra_args`` added), then every ready line awaited within
        ``ready_timeout`` in all."""
        started: list[tuple[str, Child]] = []
        for name in clusters:
            response = self.http.post(
                self.url + f"/v1/clusters/{name}/credentials", headers=self.admin
            )
            if response.status_code != 200:
                raise RuntimeError(f"no credential for {name}: {response.text[:200]}")
            credential = self.root / f"{name}.credential"
            credential.write_text(response.json()["token"])
            credential.chmod(0o600)
            child = start(f"agent-{name}", [sys.executable, "-m", "trustmesh.cli.main", "agent",
                                            "--cluster", name, "--server", self.url,
                                            "--listen", "127.0.0.1:0",
                                            "--data-dir", str(self.root / "agents" / name),
                                            "--token-file", str(credential), *extra_args],
                          self.root / "logs")  # fmt: skip
            self.children.append(child)
            started.append((name, child))
        deadline = time.monotonic() + ready_timeout
        agents = []
        for name, child in started:
            line = child.wait_ready(
                f"trustmesh agent for cluster {name} ready on ",
                timeout=max(1.0, deadline - time.monotonic()),
            )
            agents.append(Agent(name, child, *address(line.split()[7])))
        return agents

    def add_cluster(self, name: str) -> SimulatedCluster:
        """One more simulated cluster ``name`` (its own OIDC issuer process), ready;
        stopped with the rest. Register it with ``cluster_doc(name, cluster.issuer)``."""
        child = _start_cluster(self.root, name, self.children)
        child.wait_ready(f"simulated cluster {name} issuer ")
        return SimulatedCluster.from_data_dir(self.root / "clusters" / name)


@contextlib.contextmanager
def federation(origin: str, server_args: Sequence[str] = ()) -> Iterator[Federation]:
    """A control plane and the simulated cluster ``origin``, both ready; every child
    process (agents too) stopped and reaped on exit. ``server_args``: more flags for
    ``trustmesh server`` (e.g. ``--workers 2``)."""
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-") as tmp:
        root = Path(tmp)
        children: list[Child] = []
        try:
            with httpx.Client(timeout=60, trust_env=False) as http:
                yield _start(root, origin, http, children, server_args)
        finally:
            stop_all(children)


def _start_cluster(root: Path, name: str, children: list[Child]) -> Child:
    """A further simulated cluster's issuer process (data in ``root/clusters/NAME``)."""
    child = start(f"cluster-{name}", [sys.executable, "-m", "trustmesh.sim.cli", "cluster",
                                      "--name", name, "--listen", "127.0.0.1:0",
                                      "--data-dir", str(root / "clusters" / name)],
                  root / "logs")  # fmt: skip
    children.append(child)
    return child


def _start(
    root: Path,
    origin: str,
    http: httpx.Client,
    children: list[Child],
    server_args: Sequence[str] = (),
) -> Federation:
    logs = root / "logs"
    sim = start("cluster", [sys.executable, "-m", "trustmesh.sim.cli", "cluster",
                            "--name", origin, "--listen", "127.0.0.1:0",
                            "--data-dir", str(root / "cluster")], logs)  # fmt: skip
    children.append(sim)
    server = start("server", [sys.executable, "-m", "trustmesh.cli.main", "server",
                              "--data-dir", str(root / "server"), "--listen", "127.0.0.1:0",
                              "--trust-domain", TRUST_DOMAIN, *server_args], logs)  # fmt: skip
    children.append(server)
    sim.wait_ready(f"simulated cluster {origin} issuer ")
    url = server.wait_ready("trustmesh server listening on ").split()[4]
    admin = (root / "server" / "admin.token").read_text(encoding="utf-8").strip()
    return Federation(
        root=root,
        origin=origin,
        http=http,
        server=server,
        url=url,
        admin={"Authorization": f"Bearer {admin}"},
        cluster=SimulatedCluster.from_data_dir(root / "cluster"),
        children=children,
    )


def load_between_limits(
    fed: Federation,
    requests: Sequence[bytes],
    limit_round: Callable[[float], dict[str, Distribution]],
    *,
    seconds: float,
    concurrency: int,
    warmup: int,
    limit_rounds: int,
) -> tuple[LoadResult, str, list[dict[str, Distribution]]]:
    """The HTTP load on the federation's server, between rounds of its single-core
    limit (half before, half after, with the server idle), so a noisy neighbour moves
    both figures. Returns the load, the client's event loop and every limit round;
    RuntimeError if the server died under the load."""
    host, port = address(fed.url)
    budget = max(0.2, min(1.0, seconds / 10))
    before = [limit_round(budget) for _ in range((limit_rounds + 1) // 2)]
    server = fed.server
    load, loop_name = run_load(
        host,
        port,
        list(requests),
        seconds=seconds,
        concurrency=concurrency,
        warmup=warmup,
        server_cpu=lambda: cpu_seconds(server.proc.pid),
    )
    after = [limit_round(budget) for _ in range(limit_rounds // 2)]
    if server.proc.poll() is not None:
        raise RuntimeError(f"the server exited during the load: {server.tail()}")
    return load, loop_name, before + after
