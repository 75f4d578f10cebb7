"""``trustmesh bench authorize``: decisions per second over HTTP at a real agent.

A control plane, a simulated origin cluster and the agent of the target cluster run as
their own processes. Workloads get federated tokens through the real exchange; the
policy gives each workload a service role (so requests mix allows and denies, by
method and path). The load generator (a separate process from the agent: this bench
process, raw keep-alive HTTP/1.1 on uvloop) then drives, one after the other:

* ``POST /v1/authorize`` with ``{token, request}`` JSON;
* ``/ext_authz/…`` as Envoy's HTTP ext_authz sends it (original method and path,
  ``Host``, ``Authorization: Bearer``), answered 200 or 403.

Both hit the verified-token cache after the first request per token, as they do in
production (tokens live minutes and are reused). Goal: ≥ 3,000 decisions/s with
p99 ≤ 10 ms on 2 cores."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from trustmesh.bench._load import LoadResult, run_load
from trustmesh.bench._procs import Child, cpu_seconds, start, stop
from trustmesh.bench._stats import row, summarise, verdict
from trustmesh.common.urns import JWT_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT
from trustmesh.sim import SimulatedCluster

TRUST_DOMAIN = "bench.example"
ORIGIN, TARGET = "origin", "target"
GOAL_PER_S = 3000.0
GOAL_P99_MS = 10.0


def _manifests(issuer: str, workloads: int) -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "trustmesh.io/v1alpha1", "kind": "Cluster", "metadata": {"name": ORIGIN}, "spec": {"issuer": issuer}},
        {"apiVersion": "trustmesh.io/v1alpha1", "kind": "Cluster", "metadata": {"name": TARGET},
         "spec": {"issuer": "https://target.bench.example", "labels": {"environment": "prod"}}},
    ]  # fmt: skip
    for i in range(workloads):
        docs.append(
            {
                "apiVersion": "trustmesh.io/v1alpha1",
                "kind": "Workload",
                "metadata": {"name": f"svc-{i}"},
                "spec": {
                    "selector": {
                        "cluster": ORIGIN,
                        "namespace": f"ns-{i}",
                        "serviceAccount": f"sa-{i}",
                    },
                    "claims": {
                        "project": f"project-{i % 10}",
                        "environment": "prod",
                        "tier": "gold",
                    },
                },
            }
        )
    for p in range(10):
        docs.append(
            {
                "apiVersion": "trustmesh.io/v1alpha1",
                "kind": "GlobalRole",
                "metadata": {"name": f"reader-{p}"},
                "spec": {
                    "rules": [
                        {"services": [f"api-{p}.svc"], "paths": ["/api/**"], "methods": ["GET"]}
                    ]
                },
            }
        )
        docs.append(
            {
                "apiVersion": "trustmesh.io/v1alpha1",
                "kind": "RoleBinding",
                "metadata": {"name": f"project-{p}-reads"},
                "spec": {
                    "role": f"reader-{p}",
                    "subjects": [{"claims": {"project": f"project-{p}"}}],
                },
            }
        )
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


def _requests(host: str, port: int, tokens: list[str]) -> tuple[list[bytes], list[bytes]]:
    """Per token: an allowed GET and a denied DELETE, as JSON and as ext_authz checks."""
    authorize, ext = [], []
    for i, token in enumerate(tokens):
        service = f"api-{i % 10}.svc"
        for method in ("GET", "DELETE"):
            body = json.dumps(
                {
                    "token": token,
                    "request": {"host": service, "path": f"/api/items/{i}", "method": method},
                }
            ).encode()
            authorize.append(
                f"POST /v1/authorize HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            ext.append(
                f"{method} /ext_authz/api/items/{i} HTTP/1.1\r\nHost: {service}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n".encode()
            )
    return authorize, ext


def _exchange(url: str, tokens: list[str]) -> list[str]:
    out = []
    with httpx.Client(timeout=30, trust_env=False) as client:
        for sa_token in tokens:
            response = client.post(
                url + "/oauth2/token",
                data={"grant_type": TOKEN_EXCHANGE_GRANT, "subject_token": sa_token, "subject_token_type": JWT_TOKEN_TYPE,
                      "audience": f"spiffe://{TRUST_DOMAIN}/cluster/{TARGET}", "lifetime": "3600"},
            )  # fmt: skip
            if response.status_code != 200:
                raise RuntimeError(
                    f"exchange failed: HTTP {response.status_code} {response.text[:200]}"
                )
            out.append(response.json()["access_token"])
    return out


def run(
    seconds: float = 10.0, concurrency: int = 16, workloads: int = 100, warmup: int = 500
) -> dict[str, Any]:
    if seconds <= 0 or concurrency < 1 or workloads < 1:
        raise ValueError("seconds, concurrency and workloads must be positive")
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-") as tmp:
        root = Path(tmp)
        children: list[Child] = []
        try:
            sim = start("cluster", [sys.executable, "-m", "trustmesh.sim.cli", "cluster", "--name", ORIGIN,
                                    "--listen", "127.0.0.1:0", "--data-dir", str(root / "cluster")], root / "logs")  # fmt: skip
            children.append(sim)
            server = start("server", [sys.executable, "-m", "trustmesh.cli.main", "server", "--data-dir",
                                      str(root / "server"), "--listen", "127.0.0.1:0", "--trust-domain", TRUST_DOMAIN],
                           root / "logs")  # fmt: skip
            children.append(server)
            sim.wait_ready(f"simulated cluster {ORIGIN} issuer ")
            url = server.wait_ready("trustmesh server listening on ").split()[4]
            cluster = SimulatedCluster.from_data_dir(root / "cluster")
            admin = {
                "Authorization": "Bearer " + (root / "server" / "admin.token").read_text().strip()
            }
            applied = httpx.post(url + "/v1/apply", headers=admin, timeout=60, trust_env=False,
                                 json={"files": [{"path": "bench.yaml", "content": _manifests(cluster.issuer, workloads)}]})  # fmt: skip
            if applied.status_code != 200:
                raise RuntimeError(f"applying the bench manifests failed: {applied.text[:300]}")
            credential = httpx.post(
                url + f"/v1/clusters/{TARGET}/credentials", headers=admin, trust_env=False
            ).json()["token"]
            (root / "agent.credential").write_text(credential)
            agent = start("agent", [sys.executable, "-m", "trustmesh.cli.main", "agent", "--cluster", TARGET, "--server", url,
                                    "--listen", "127.0.0.1:0", "--data-dir", str(root / "agent"), "--token-file",
                                    str(root / "agent.credential")], root / "logs")  # fmt: skip
            children.append(agent)
            agent_url = agent.wait_ready(f"trustmesh agent for cluster {TARGET} ready on ").split()[
                7
            ]
            tokens = _exchange(url, [cluster.mint(f"ns-{i}", f"sa-{i}") for i in range(workloads)])
            parts = urlsplit(agent_url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            authorize_requests, ext_requests = _requests(host, port, tokens)
            results: dict[str, LoadResult] = {}
            for name, requests in (
                ("POST /v1/authorize", authorize_requests),
                ("ext_authz", ext_requests),
            ):
                results[name], _ = run_load(host, port, requests, seconds=seconds, concurrency=concurrency,
                                            warmup=warmup, server_cpu=lambda: cpu_seconds(agent.proc.pid))  # fmt: skip
            return _report(results, seconds, concurrency, workloads)
        finally:
            for child in reversed(children):
                stop(child)


def _report(
    results: dict[str, LoadResult], seconds: float, concurrency: int, workloads: int
) -> dict[str, Any]:
    rows, summary, json_results = [], [], []
    for name, load in results.items():
        if not load.latencies_ns:
            raise RuntimeError(f"{name}: nothing completed ({load.first_error})")
        dist = summarise(load.latencies_ns, load.window_ns)
        statuses = dict(sorted(load.statuses.items()))
        expected = {200} if name.startswith("POST") else {200, 403}
        unexpected = (
            sum(n for status, n in statuses.items() if status not in expected)
            + load.connection_errors
        )
        window = load.window_ns / 1e9
        cpu = (
            ""
            if load.server_cpu_s is None
            else f", agent CPU {100 * load.server_cpu_s / window:.0f}%"
        )
        rows.append(row(name, p50_us=dist.p50_us, p99_us=dist.p99_us, per_s=dist.per_s,
                        note=f"{concurrency} conns, statuses {statuses}, {unexpected} unexpected{cpu}"))  # fmt: skip
        json_results.append({"name": name, "p50_us": dist.p50_us, "p99_us": dist.p99_us, "decisions_per_s": dist.per_s,
                             "statuses": statuses, "unexpected": unexpected})  # fmt: skip
        ok_rate, ok_p99 = dist.per_s >= GOAL_PER_S, dist.p99_us / 1000 <= GOAL_P99_MS
        summary.append(
            f"{name}: {dist.per_s:,.0f} decisions/s, p50 {dist.p50_us / 1000:.2f} ms, p99 {dist.p99_us / 1000:.2f} ms; "
            f"goal ≥ {GOAL_PER_S:,.0f}/s {verdict(ok_rate)}, p99 ≤ {GOAL_P99_MS:.0f} ms "
            f"{verdict(ok_p99)}"
        )
    return {
        "title": f"Agent decisions over HTTP ({workloads} workloads, {concurrency} connections, {seconds:.0f} s each)",
        "results": rows,
        "http": json_results,
        "summary": summary,
    }
