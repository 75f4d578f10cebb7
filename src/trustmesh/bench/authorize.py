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

from typing import Any

from trustmesh.bench._federation import (
    TRUST_DOMAIN,
    Federation,
    authorize_request,
    binding_doc,
    cluster_doc,
    federation,
    numbered_workloads,
    role_doc,
)
from trustmesh.bench._load import LoadResult, request_bytes, run_load
from trustmesh.bench._procs import cpu_seconds
from trustmesh.bench._stats import row, summarise, verdict

ORIGIN, TARGET = "origin", "target"
GOAL_PER_S = 3000.0
GOAL_P99_MS = 10.0


def _manifests(issuer: str, workloads: int) -> list[dict[str, Any]]:
    docs = [
        cluster_doc(ORIGIN, issuer),
        cluster_doc(TARGET, labels={"environment": "prod"}),
        *numbered_workloads(ORIGIN, workloads, projects=10),
    ]
    for p in range(10):
        docs.append(
            role_doc(
                f"reader-{p}",
                [{"services": [f"api-{p}.svc"], "paths": ["/api/**"], "methods": ["GET"]}],
            )
        )
        docs.append(
            binding_doc(
                f"project-{p}-reads", f"reader-{p}", [{"claims": {"project": f"project-{p}"}}]
            )
        )
    return docs


def _requests(host: str, port: int, tokens: list[str]) -> tuple[list[bytes], list[bytes]]:
    """Per token: an allowed GET and a denied DELETE, as JSON and as ext_authz checks."""
    authorize, ext = [], []
    for i, token in enumerate(tokens):
        service = f"api-{i % 10}.svc"
        for method in ("GET", "DELETE"):
            request = {"host": service, "path": f"/api/items/{i}", "method": method}
            authorize.append(authorize_request(host, port, token, request))
            ext.append(
                request_bytes(
                    method,
                    f"/ext_authz/api/items/{i}",
                    {"Host": service, "Authorization": f"Bearer {token}"},
                )
            )
    return authorize, ext


def _svids(fed: Federation, workloads: int) -> list[str]:
    audience = f"spiffe://{TRUST_DOMAIN}/cluster/{TARGET}"
    return [
        fed.exchange(fed.cluster.mint(f"ns-{i}", f"sa-{i}"), audience, lifetime=3600)
        for i in range(workloads)
    ]


def run(
    seconds: float = 10.0, concurrency: int = 16, workloads: int = 100, warmup: int = 500
) -> dict[str, Any]:
    if seconds <= 0 or concurrency < 1 or workloads < 1:
        raise ValueError("seconds, concurrency and workloads must be positive")
    with federation(ORIGIN) as fed:
        fed.apply(_manifests(fed.cluster.issuer, workloads))
        (agent,) = fed.start_agents([TARGET])
        authorize_requests, ext_requests = _requests(agent.host, agent.port, _svids(fed, workloads))
        results: dict[str, LoadResult] = {}
        for name, requests in (
            ("POST /v1/authorize", authorize_requests),
            ("ext_authz", ext_requests),
        ):
            results[name], _ = run_load(agent.host, agent.port, requests, seconds=seconds,
                                        concurrency=concurrency, warmup=warmup,
                                        server_cpu=lambda: cpu_seconds(agent.child.proc.pid))  # fmt: skip
    return _report(results, seconds, concurrency, workloads)


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
