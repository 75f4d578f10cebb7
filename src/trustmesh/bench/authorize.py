"""``trustmesh bench authorize``: decisions per second over HTTP at a real agent.

A control plane, a simulated origin cluster and the agent of the target cluster run as
their own processes. Workloads get federated tokens through the real exchange; the
policy gives each workload a service role. Two surfaces are driven, one after the
other:

* ``POST /v1/authorize`` with ``{token, request}`` JSON;
* ``/ext_authz/…`` as Envoy's HTTP ext_authz sends it (original method and path,
  ``Host``, ``Authorization: Bearer``);
* with ``--xfcc``, also ``/ext_authz/…`` from a client certificate: the agent runs with
  ``--trust-xfcc``, each workload gets an X.509-SVID through the real
  ``POST /v1/x509-svid``, and the checks carry no token but the
  ``x-forwarded-client-cert`` element Envoy's ``SANITIZE_SET`` writes for it
  (``Hash``, ``Cert``, ``URI``) — measured beside the bearer path in the same run
  (goal, issue 12: within 20 % of its decisions per second).

The load comes from one of two generators:

* ``--wrk`` (the goal's measurement): ``wrk -t1 -cN -dS --latency``, a separate C
  process, with a Lua script giving the ``/v1/authorize`` body, or the ext_authz
  headers, of one allowed request of one workload's token — so every answer is a 200
  and any other status is unexpected. Latencies are wrk's (its ``--latency``
  percentiles);
* otherwise this bench process (``bench/_load.py``: raw keep-alive HTTP/1.1 on uvloop),
  cycling over an allowed GET and a denied DELETE per workload (ext_authz answers
  those 200 and 403).

Both hit the verified-token cache after the first request per token, as they do in
production (tokens live minutes and are reused). Beside each figure: the CPU share of
the load generator, the agent (all its processes: the supervisor and every worker) and
the control plane over the window, in % of one core (2 cores: 200 %).

Every decision is an audit event in the agent's spool before its answer, shipped to
the control plane. After the runs the bench waits for the agent to ship everything
(its ``/readyz`` backlog at 0), then counts the events of the agent's sources in the
control plane's log (``GET /v1/audit/sources``): they must equal what the agent
spooled (its ``/metrics``), with no gaps, and be at least the answers the load
generator received.

Goals (issue 11, 2 cores, audit on): ≥ 10,000 decisions/s with p99 ≤ 5 ms at 32
connections, on both surfaces."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.agent.xfcc import HEADER as XFCC_HEADER
from trustmesh.agent.xfcc import forwarded_element
from trustmesh.bench._federation import (
    TRUST_DOMAIN,
    Agent,
    Federation,
    authorize_request,
    binding_doc,
    cluster_doc,
    federation,
    numbered_workloads,
    role_doc,
)
from trustmesh.bench._load import LoadResult, request_bytes, run_load
from trustmesh.bench._procs import cpu_seconds, stop, tree_cpu_seconds
from trustmesh.bench._stats import row, summarise, verdict
from trustmesh.identity.x509svid import csr_pem

ORIGIN, TARGET = "origin", "target"
GOAL_PER_S = 10_000.0
GOAL_P99_MS = 5.0
GOAL_CONNECTIONS = 32
AUTHORIZE, EXT_AUTHZ, EXT_AUTHZ_XFCC = "POST /v1/authorize", "ext_authz", "ext_authz (XFCC)"
XFCC_GOAL_RATIO = 0.8  # XFCC decisions/s at least 80 % of the bearer path's
SHIP_TIMEOUT = 60.0


def _cluster(workers: int) -> str:
    """The target cluster of the agent run with ``workers`` workers."""
    return f"{TARGET}-w{workers}"


def _manifests(issuer: str, workloads: int, targets: Sequence[str]) -> list[dict[str, Any]]:
    docs = [
        cluster_doc(ORIGIN, issuer),
        *[cluster_doc(target, labels={"environment": "prod"}) for target in targets],
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


def _requests(
    host: str, port: int, tokens: list[str], elements: list[str]
) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Per token: an allowed GET and a denied DELETE, as JSON and as ext_authz checks;
    the same checks from each workload's client certificate (XFCC ``elements``)."""
    authorize, ext, xfcc = [], [], []
    for i, token in enumerate(tokens):
        service = f"api-{i % 10}.svc"
        for method in ("GET", "DELETE"):
            request = {"host": service, "path": f"/api/items/{i}", "method": method}
            authorize.append(authorize_request(host, port, token, request))
            path = f"/ext_authz/api/items/{i}"
            ext.append(
                request_bytes(method, path, {"Host": service, "Authorization": f"Bearer {token}"})
            )
            if elements:
                headers = {"Host": service, XFCC_HEADER: elements[i]}
                xfcc.append(request_bytes(method, path, headers))
    return authorize, ext, xfcc


def _svids(fed: Federation, workloads: int, target: str) -> list[str]:
    audience = f"spiffe://{TRUST_DOMAIN}/cluster/{target}"
    return [
        fed.exchange(fed.cluster.mint(f"ns-{i}", f"sa-{i}"), audience, lifetime=3600)
        for i in range(workloads)
    ]


def _xfcc_elements(fed: Federation, workloads: int) -> list[str]:
    """Per workload: an X.509-SVID from ``POST /v1/x509-svid``, as the XFCC element the
    Envoy in front would forward."""
    elements = []
    for i in range(workloads):
        answer = fed.http.post(
            fed.url + "/v1/x509-svid",
            json={
                "subject_token": fed.cluster.mint(f"ns-{i}", f"sa-{i}"),
                "csr": csr_pem(ec.generate_private_key(ec.SECP256R1())),
            },
        )
        if answer.status_code != 200:
            raise RuntimeError(f"no X.509-SVID: HTTP {answer.status_code} {answer.text[:300]}")
        document = answer.json()
        elements.append(forwarded_element(document["svid"][0], document["spiffe_id"]))
    return elements


def run(
    seconds: float = 10.0,
    concurrency: int = GOAL_CONNECTIONS,
    workloads: int = 100,
    warmup: int = 500,
    *,
    wrk: bool = False,
    workers: Sequence[int] = (1,),
    xfcc: bool = False,
) -> dict[str, Any]:
    """Both surfaces at an agent run with each of ``workers`` (its ``--workers``), one
    after the other; ``wrk``: load from wrk instead of this process; ``xfcc``: ext_authz
    from client certificates too."""
    if seconds <= 0 or concurrency < 1 or workloads < 1:
        raise ValueError("seconds, concurrency and workloads must be positive")
    if not workers or min(workers) < 1 or len(set(workers)) != len(workers):
        raise ValueError("workers: distinct counts, each at least 1")
    wrk_path = shutil.which("wrk") if wrk else None
    if wrk and wrk_path is None:
        raise RuntimeError("--wrk needs wrk on the PATH (e.g. apt-get install wrk)")
    runs: list[Run] = []
    audits: list[Audited] = []
    with federation(ORIGIN) as fed:
        fed.apply(_manifests(fed.cluster.issuer, workloads, [_cluster(n) for n in workers]))
        for count in workers:
            target = _cluster(count)
            flags = ["--workers", str(count), *(["--trust-xfcc"] if xfcc else [])]
            (agent,) = fed.start_agents([target], extra_args=flags)
            tokens = _svids(fed, workloads, target)
            elements = _xfcc_elements(fed, workloads) if xfcc else []
            usage = _Usage(fed, agent)
            if wrk_path is not None:
                measured = _run_wrk(
                    fed, agent, tokens[0], elements[:1], wrk_path, seconds, concurrency, usage
                )
            else:
                measured = _run_own(agent, tokens, elements, seconds, concurrency, warmup, usage)
            if len(workers) > 1:
                label = f"{count} worker{'s' if count > 1 else ''}"
                for one in measured:
                    one.name = f"{one.name}, {label}"
            runs += measured
            audits.append(_audited(fed, agent, target, sum(r.answered for r in measured)))
            stop(agent.child)  # the next configuration has the cores to itself
    return _report(runs, audits, seconds, concurrency, workloads, wrk, workers)


# -- measurement ------------------------------------------------------------------------


@dataclass
class Run:
    """One surface's figures, whichever generator produced them."""

    name: str
    per_s: float
    p50_ms: float
    p99_ms: float
    answered: int
    statuses: dict[int | str, int]  # by status; wrk only tells 2xx from the rest
    unexpected: int
    cpu: dict[str, float]  # % of one core over the window: load, agent, control plane


class _Usage:
    """CPU seconds of the agent (all its processes) and of the control plane."""

    def __init__(self, fed: Federation, agent: Agent) -> None:
        self.agent_pid = agent.child.proc.pid
        self.server_pid = fed.server.proc.pid

    def sample(self) -> tuple[float, float]:
        return tree_cpu_seconds(self.agent_pid) or 0.0, cpu_seconds(self.server_pid) or 0.0

    @staticmethod
    def shares(
        before: tuple[float, float], after: tuple[float, float], load_s: float, window: float
    ) -> dict[str, float]:
        return {
            "load": round(100 * load_s / window, 1),
            "agent": round(100 * (after[0] - before[0]) / window, 1),
            "control_plane": round(100 * (after[1] - before[1]) / window, 1),
        }


def _run_own(
    agent: Agent,
    tokens: list[str],
    elements: list[str],
    seconds: float,
    concurrency: int,
    warmup: int,
    usage: _Usage,
) -> list[Run]:
    authorize_requests, ext_requests, xfcc_requests = _requests(
        agent.host, agent.port, tokens, elements
    )
    runs = []
    surfaces = [
        (AUTHORIZE, authorize_requests, {200}),
        (EXT_AUTHZ, ext_requests, {200, 403}),
    ]
    if xfcc_requests:
        surfaces.append((EXT_AUTHZ_XFCC, xfcc_requests, {200, 403}))
    for name, requests, expected in surfaces:
        samples: list[tuple[float, float]] = []

        def sample(samples: list[tuple[float, float]] = samples) -> float:
            samples.append(usage.sample())
            return 0.0

        load, _ = run_load(agent.host, agent.port, requests, seconds=seconds,
                           concurrency=concurrency, warmup=warmup, server_cpu=sample)  # fmt: skip
        if not load.latencies_ns:
            raise RuntimeError(f"{name}: nothing completed ({load.first_error})")
        runs.append(_own_run(name, load, expected, samples))
    return runs


def _own_run(
    name: str, load: LoadResult, expected: set[int], samples: list[tuple[float, float]]
) -> Run:
    dist = summarise(load.latencies_ns, load.window_ns)
    window = load.window_ns / 1e9
    unexpected = (
        sum(n for status, n in load.statuses.items() if status not in expected)
        + load.connection_errors
    )
    return Run(
        name=name,
        per_s=dist.per_s,
        p50_ms=dist.p50_us / 1000,
        p99_ms=dist.p99_us / 1000,
        answered=load.requests + load.warmup_requests,
        statuses=dict(sorted(load.statuses.items())),
        unexpected=unexpected,
        cpu=_Usage.shares(samples[0], samples[-1], load.client_cpu_s, window),
    )


def _lua_string(text: str) -> str:
    """A Lua string literal (JSON's escapes are Lua's for what a token and a JSON body
    hold)."""
    return json.dumps(text)


def _scripts(fed: Federation, token: str, elements: list[str]) -> dict[str, tuple[str, Path]]:
    """(path, Lua script) per surface: one allowed request of one workload."""
    request = {"host": "api-0.svc", "path": "/api/items/0", "method": "GET"}
    body = json.dumps({"token": token, "request": request})
    post = fed.root / "authorize.lua"
    post.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {_lua_string(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    ext = fed.root / "ext_authz.lua"
    ext.write_text(
        f'wrk.headers["Host"] = "api-0.svc"\n'
        f'wrk.headers["Authorization"] = {_lua_string("Bearer " + token)}\n'
    )
    scripts = {AUTHORIZE: ("/v1/authorize", post), EXT_AUTHZ: ("/ext_authz/api/items/0", ext)}
    if elements:
        xfcc = fed.root / "ext_authz_xfcc.lua"
        xfcc.write_text(
            f'wrk.headers["Host"] = "api-0.svc"\n'
            f'wrk.headers["{XFCC_HEADER}"] = {_lua_string(elements[0])}\n'
        )
        scripts[EXT_AUTHZ_XFCC] = ("/ext_authz/api/items/0", xfcc)
    return scripts


def _check_allowed(fed: Federation, agent: Agent, token: str, elements: list[str]) -> None:
    """One request per surface first: the scripts' requests are allowed."""
    base = f"http://{agent.host}:{agent.port}"
    request = {"host": "api-0.svc", "path": "/api/items/0", "method": "GET"}
    answer = fed.http.post(base + "/v1/authorize", json={"token": token, "request": request})
    if answer.status_code != 200 or answer.json().get("allowed") is not True:
        raise RuntimeError(f"the bench request is not allowed: {answer.text[:300]}")
    answer = fed.http.get(
        base + "/ext_authz/api/items/0",
        headers={"Host": "api-0.svc", "Authorization": f"Bearer {token}"},
    )
    if answer.status_code != 200:
        raise RuntimeError(f"the bench check is not allowed: HTTP {answer.status_code}")
    for element in elements:
        answer = fed.http.get(
            base + "/ext_authz/api/items/0", headers={"Host": "api-0.svc", XFCC_HEADER: element}
        )
        if answer.status_code != 200:
            raise RuntimeError(f"the XFCC check is not allowed: {answer.text[:300]}")


def _run_wrk(
    fed: Federation,
    agent: Agent,
    token: str,
    elements: list[str],
    wrk: str,
    seconds: float,
    connections: int,
    usage: _Usage,
) -> list[Run]:
    _check_allowed(fed, agent, token, elements)
    runs = []
    for name, (path, script) in _scripts(fed, token, elements).items():
        command = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
                   "-s", str(script), f"http://{agent.host}:{agent.port}{path}"]  # fmt: skip
        before, started = usage.sample(), time.monotonic()
        out, wrk_cpu = _wrk(command)
        window = time.monotonic() - started
        after = usage.sample()
        figures = parse_wrk(out)
        runs.append(
            Run(
                name=name,
                per_s=figures.per_s,
                p50_ms=figures.p50_ms,
                p99_ms=figures.p99_ms,
                answered=figures.requests + 1,  # and its check in _check_allowed
                statuses={"2xx": figures.requests - figures.non_2xx, "non-2xx": figures.non_2xx},
                unexpected=figures.non_2xx + figures.socket_errors,
                cpu=_Usage.shares(before, after, wrk_cpu, window),
            )
        )
    return runs


def _wrk(command: list[str]) -> tuple[str, float]:
    """Run wrk to its end -> (its output, its CPU seconds)."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        out = proc.stdout.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out[-500:]}")
    return out, usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class WrkFigures:
    requests: int
    per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _latency_ms(out: str, percent: int) -> float:
    match = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
    if match is None:
        raise ValueError(f"no {percent}% latency in the wrk output (run it with --latency)")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(out: str) -> WrkFigures:
    """The figures of ``wrk --latency`` output. ValueError if a figure is missing."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in ", out, re.MULTILINE)
    if rate is None or total is None:
        raise ValueError(f"not wrk output: {out[:200]!r}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkFigures(
        requests=int(total.group(1)),
        per_s=float(rate.group(1)),
        p50_ms=_latency_ms(out, 50),
        p99_ms=_latency_ms(out, 99),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


# -- the audit trail ----------------------------------------------------------------------


@dataclass(frozen=True)
class Audited:
    workers: int
    answered: int  # answers the load generators received (and the bench's own checks)
    spooled: int  # events the agent wrote to its spool(s)
    logged: int  # events of the agent's sources in the control plane's log
    sources: int
    gaps: int
    backlog: int | None  # still unshipped when the bench stopped waiting (None: 0)

    @property
    def complete(self) -> bool:
        return (
            self.backlog is None
            and self.gaps == 0
            and self.logged == self.spooled
            and self.spooled >= self.answered
        )


# one line, or one per worker (``{worker="K"}``)
_SPOOLED = re.compile(r"^trustmesh_agent_audit_spooled_total(?:\{[^}]*\})? ([\d.e+]+)$", re.M)


def _audited(fed: Federation, agent: Agent, target: str, answered: int) -> Audited:
    base = f"http://{agent.host}:{agent.port}"
    deadline = time.monotonic() + SHIP_TIMEOUT
    backlog: int | None = None
    zero_since: float | None = None
    while time.monotonic() < deadline:
        # Several workers answer from snapshots up to a second old: 0 twice, 1.5 s apart.
        backlog = _backlog(fed.http, base)
        if backlog != 0:
            zero_since = None
        elif zero_since is None:
            zero_since = time.monotonic()
        elif time.monotonic() - zero_since >= 1.5:
            break
        time.sleep(0.25)
    metrics = fed.http.get(base + "/metrics").text
    counts = _SPOOLED.findall(metrics)
    spooled = sum(int(float(count)) for count in counts) if counts else -1
    sources = fed.http.get(fed.url + "/v1/audit/sources", headers=fed.admin).json()["sources"]
    ours = [s for s in sources if s.get("cluster") == target]
    return Audited(
        workers=_workers_of(agent),
        answered=answered,
        spooled=spooled,
        logged=sum(int(s["next_seq"]) - 1 for s in ours),
        sources=len(ours),
        gaps=sum(len(s.get("gaps") or ()) for s in ours),
        backlog=None if backlog == 0 else backlog,
    )


def _backlog(http: httpx.Client, base: str) -> int | None:
    try:
        detail = http.get(base + "/readyz").json()
    except (httpx.HTTPError, ValueError):
        return None
    value = detail.get("audit", {}).get("backlog")
    return value if isinstance(value, int) else None


# -- the report ---------------------------------------------------------------------------


def _workers_of(agent: Agent) -> int:
    command = agent.child.proc.args
    assert isinstance(command, list)
    return int(command[command.index("--workers") + 1])


def _report(
    runs: list[Run],
    audits: list[Audited],
    seconds: float,
    concurrency: int,
    workloads: int,
    wrk: bool,
    workers: Sequence[int],
) -> dict[str, Any]:
    generator = "wrk -t1" if wrk else "this process"
    rows, summary, json_results = [], [], []
    for run in runs:
        cpu = run.cpu
        note = (
            f"statuses {run.statuses}, {run.unexpected} unexpected; CPU % of a core: "
            f"load {cpu['load']:.0f}, agent {cpu['agent']:.0f}, "
            f"control plane {cpu['control_plane']:.0f}"
        )
        rows.append(
            row(
                run.name,
                p50_us=run.p50_ms * 1000,
                p99_us=run.p99_ms * 1000,
                per_s=run.per_s,
                note=note,
            )
        )
        json_results.append(
            {
                "name": run.name,
                "p50_us": run.p50_ms * 1000,
                "p99_us": run.p99_ms * 1000,
                "decisions_per_s": run.per_s,
                "statuses": run.statuses,
                "unexpected": run.unexpected,
                "cpu_percent": cpu,
            }
        )
        ok_rate, ok_p99 = run.per_s >= GOAL_PER_S, run.p99_ms <= GOAL_P99_MS
        summary.append(
            f"{run.name}: {run.per_s:,.0f} decisions/s (goal ≥ {GOAL_PER_S:,.0f}: "
            f"{verdict(ok_rate)}), p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms (goal ≤ "
            f"{GOAL_P99_MS:g} ms: {verdict(ok_p99)}) at {concurrency} connections"
            + ("" if concurrency == GOAL_CONNECTIONS else f" (the goal is at {GOAL_CONNECTIONS})")
            + f"; {run.unexpected} unexpected answers; CPU % of one core: load "
            f"{cpu['load']:.0f}, agent {cpu['agent']:.0f}, control plane "
            f"{cpu['control_plane']:.0f}"
        )
    bearer = {
        run.name.replace(EXT_AUTHZ, "", 1): run
        for run in runs
        if run.name.startswith(EXT_AUTHZ) and not run.name.startswith(EXT_AUTHZ_XFCC)
    }
    for run in runs:
        if not run.name.startswith(EXT_AUTHZ_XFCC):
            continue
        base = bearer.get(run.name.replace(EXT_AUTHZ_XFCC, "", 1))
        if base is not None and base.per_s > 0:
            ratio = run.per_s / base.per_s
            summary.append(
                f"{run.name} vs {base.name}: {ratio:.0%} of the bearer path's decisions/s "
                f"(goal ≥ {XFCC_GOAL_RATIO:.0%}: {verdict(ratio >= XFCC_GOAL_RATIO)}), p99 "
                f"{run.p99_ms:.2f} ms vs {base.p99_ms:.2f} ms"
            )
    for audit in audits:
        summary.append(
            f"audit, {audit.workers} worker(s): {audit.logged:,} events in the control plane's "
            f"log from {audit.sources} source(s) of the agent, {audit.spooled:,} spooled, "
            f"{audit.answered:,} answers received, {audit.gaps} gaps"
            + ("" if audit.backlog is None else f", {audit.backlog} still unshipped")
            + f" — every decision audited and shipped: {verdict(audit.complete)}"
        )
    return {
        "title": f"Agent decisions over HTTP (load from {generator}, {concurrency} connections, "
        f"{seconds:g} s each, {workloads} workloads, agent --workers "
        f"{', '.join(map(str, workers))})",
        "results": rows,
        "http": json_results,
        "audit": [
            {
                "workers": audit.workers,
                "answered": audit.answered,
                "spooled": audit.spooled,
                "logged": audit.logged,
                "sources": audit.sources,
                "gaps": audit.gaps,
                "backlog": audit.backlog or 0,
                "complete": audit.complete,
            }
            for audit in audits
        ],
        "goals": {
            "decisions_per_s": GOAL_PER_S,
            "p99_ms": GOAL_P99_MS,
            "connections": GOAL_CONNECTIONS,
        },
        "summary": summary,
    }
