"""``trustmesh bench exchange``: RFC 8693 token exchanges per second over HTTP, side by
side with the physical limit of one core.

What runs, and why the comparison is fair:

- ``trustmesh server`` runs as its own process, exactly as deployed (uvicorn, one
  process, one event loop, SQLite in a temporary data dir, ES256 signing key), so
  the figure is what one server process serves.
- The origin cluster is a simulated kube-apiserver issuer (RSA-2048, RS256, like
  kube-apiserver's own keys) in another process, registered by issuer URL only: the
  server finds its keys through OIDC discovery, as in production. Its keys are fetched
  once during the warm-up and cached; it sits idle during the measurement.
- The requests carry a pool of distinct projected service-account tokens (distinct
  ``jti`` and pod names, spread over several Workloads), minted beforehand, with the
  form bodies encoded beforehand, so the load generator does no crypto and no
  encoding while it measures. Each token is presented again every ``pool_size``
  requests, as a pod presents its projected token until the kubelet refreshes it.
  The load comes from another process than the server's: by default a lean asyncio
  client on raw keep-alive sockets (``_load``) in the bench process; with ``wrk=True``
  (``--wrk``) from wrk, a separate C process, posting the same bodies from a Lua
  script. The CPU time of the server and of the load generator over the window is
  reported beside every figure, so it can be seen who was the bottleneck.
- Every issuance is audited before its token leaves. After the load the bench counts
  the ``token.issued`` events committed to the server's database (read from the
  SQLite file, not through the server) and compares them with the 200 answers: equal
  for the asyncio client, which reads every answer it asked for; with wrk, which drops
  the requests in flight when its time is up, the server's own count of tokens issued
  must equal the log's and wrk's 200 answers may be short of them by at most the
  connections.
- The limit is the work an exchange cannot avoid: one RS256 verification of the
  subject token plus one ES256 signature of the JWT-SVID, with ``cryptography``
  (OpenSSL) directly, in a loop on one core of this machine. It is measured in rounds
  before and after the load (with the server idle), and the median round is used, so a
  noisy neighbour moves both figures rather than one. ``ratio`` is HTTP exchanges/s
  divided by that limit: the fraction of one core's crypto capacity the whole HTTP
  path (HTTP parsing, routing, form and JSON, claim checks, metrics) lets through.

Goals: DESIGN asks at least 1,000 exchanges/s with p99 under 20 ms; issue 11 asks at
least 5,000 exchanges/s with p99 at most 10 ms, every issuance audited before its token
leaves. In a closed loop the mean latency is ``concurrency / throughput`` (Little's
law): at 16 connections and 5,000/s that is 3.2 ms."""

from __future__ import annotations

import json
import re
import resource
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256
from jwt.algorithms import RSAAlgorithm

from trustmesh.bench._federation import (
    TRUST_DOMAIN,
    Federation,
    address,
    cluster_doc,
    es256_key,
    federation,
    numbered_workloads,
    unverified_claims,
)
from trustmesh.bench._load import request_bytes, run_load
from trustmesh.bench._procs import cpu_seconds
from trustmesh.bench._stats import (
    Distribution,
    limit_note,
    median_of,
    row,
    summarise,
    timed,
    verdict,
)
from trustmesh.common.token_exchange import exchange_form
from trustmesh.identity.jws import b64decode
from trustmesh.identity.svid import mint_svid

__all__ = ["run"]

ORIGIN = "bench"
TARGET = "peer"
AUDIENCE = f"spiffe://{TRUST_DOMAIN}/cluster/{TARGET}"
GOAL_PER_S = 1000.0  # DESIGN
GOAL_P99_MS = 20.0
ISSUE11_PER_S = 5000.0  # issue 11: with every issuance audited before its token leaves
ISSUE11_P99_MS = 10.0


def _manifests(issuer: str, workloads: int) -> list[dict[str, Any]]:
    """The origin cluster by issuer only (keys through discovery), a peer cluster as the
    audience (never contacted: no token comes from it), and ``workloads`` Workloads."""
    return [
        cluster_doc(ORIGIN, issuer),
        cluster_doc(TARGET),
        *numbered_workloads(ORIGIN, workloads, projects=4),
    ]


def _form_body(token: str) -> bytes:
    return urlencode(exchange_form(token, AUDIENCE)).encode()


def _request_bytes(host: str, port: int, token: str) -> bytes:
    body = _form_body(token)
    headers = {
        "Host": f"{host}:{port}",
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
    }
    return request_bytes("POST", "/oauth2/token", headers, body)


def _check_exchange(fed: Federation, token: str) -> None:
    """One exchange through a real HTTP client before the load: the set-up works and
    the answer is a JWT-SVID for the target cluster."""
    claims = unverified_claims(fed.exchange(token, AUDIENCE))
    if not str(claims.get("sub", "")).startswith(
        f"spiffe://{TRUST_DOMAIN}/"
    ) or AUDIENCE not in claims.get("aud", []):
        raise RuntimeError(f"sanity exchange returned unexpected claims: {claims}")


# -- the single-core limit ------------------------------------------------------------


class _Limit:
    """RS256 verification of real SA tokens and ES256 signing of a realistic JWT-SVID
    signing input, with every argument object built once outside the loops."""

    def __init__(self, jwks: dict[str, Any], tokens: list[str]) -> None:
        public = RSAAlgorithm.from_jwk(jwks["keys"][-1])
        if not isinstance(public, rsa.RSAPublicKey):
            raise TypeError("the simulated cluster's signing key is not an RSA public key")
        self.public = public
        self.inputs = [
            (b64decode(t.rsplit(".", 1)[1]), t.rsplit(".", 1)[0].encode()) for t in tokens[:64]
        ]
        self.private, _, key = es256_key()
        now = int(time.time())
        svid = mint_svid(
            key,
            {
                "iss": "http://127.0.0.1:8443",
                "sub": f"spiffe://{TRUST_DOMAIN}/cluster/{ORIGIN}/ns/ns-0/sa/sa-0",
                "aud": [AUDIENCE],
                "iat": now,
                "nbf": now,
                "exp": now + 300,
                "jti": "b" * 22,
                "environment": "prod",
                "project": "project-0",
                "tier": "gold",
                "workload_id": "svc-0",
                "cluster": ORIGIN,
                "namespace": "ns-0",
                "service_account": "sa-0",
            },
        )
        self.svid_input = svid.rsplit(".", 1)[0].encode()
        self.padding = PKCS1v15()
        self.hash = SHA256()
        self.ecdsa = ec.ECDSA(SHA256())

    def verify(self, i: int) -> None:
        signature, signing_input = self.inputs[i % len(self.inputs)]
        self.public.verify(signature, signing_input, self.padding, self.hash)

    def sign(self, i: int) -> None:
        self.private.sign(self.svid_input, self.ecdsa)

    def both(self, i: int) -> None:
        signature, signing_input = self.inputs[i % len(self.inputs)]
        self.public.verify(signature, signing_input, self.padding, self.hash)
        self.private.sign(self.svid_input, self.ecdsa)

    def round(self, budget_s: float) -> dict[str, Distribution]:
        """One round: verify alone, sign alone, then both in one loop, each sized to
        about a third of ``budget_s`` from a short calibration."""
        probe = timed(self.both, 20)
        per_op_s = max(probe.mean_ns / 1e9, 1e-6)
        n = max(50, int(budget_s / 3 / per_op_s))
        return {
            "verify": timed(self.verify, 2 * n),
            "sign": timed(self.sign, 2 * n),
            "both": timed(self.both, n),
        }


# -- what a load generator measured -----------------------------------------------------


@dataclass
class _Measured:
    loader: str  # which load generator, and on what
    per_s: float
    p50_us: float
    p99_us: float
    mean_us: float | None
    requests: int
    window_s: float
    non_200: int
    connection_errors: int
    loader_cpu_s: float
    server_cpu_s: float | None
    answered_200: int  # 200 answers the load generator read, warm-up included
    drops_in_flight: bool  # wrk: requests in flight when time is up are not read
    statuses: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None
    warmup_requests: int = 0


def _asyncio_load(
    host: str,
    port: int,
    requests: Sequence[bytes],
    seconds: float,
    concurrency: int,
    warmup: int,
    server_pid: int,
) -> _Measured:
    load, loop_name = run_load(
        host,
        port,
        requests,
        seconds=seconds,
        concurrency=concurrency,
        warmup=warmup,
        server_cpu=lambda: _tree_cpu(server_pid),
    )
    if not load.latencies_ns:
        raise RuntimeError(f"no exchange completed in the measurement window ({load.first_error})")
    http = summarise(load.latencies_ns, load.window_ns)
    return _Measured(
        loader=f"asyncio client ({loop_name}), in the bench process",
        per_s=http.per_s,
        p50_us=http.p50_us,
        p99_us=http.p99_us,
        mean_us=http.mean_ns / 1000,
        requests=http.n,
        window_s=load.window_ns / 1e9,
        non_200=load.non_200,
        connection_errors=load.connection_errors,
        loader_cpu_s=load.client_cpu_s,
        server_cpu_s=load.server_cpu_s,
        answered_200=load.answered_200,
        drops_in_flight=False,
        statuses={str(k): v for k, v in load.statuses.items()},
        first_error=load.first_error,
        warmup_requests=load.warmup_requests,
    )


_WRK_SCRIPT = """-- trustmesh bench exchange --wrk: POST /oauth2/token with pre-encoded form bodies
local bodies = %s
local requests = {}
local n = 0
function init(args)
  for i, body in ipairs(bodies) do
    requests[i] = wrk.format("POST", "/oauth2/token",
      {["Content-Type"] = "application/x-www-form-urlencoded"}, body)
  end
end
function request()
  n = n + 1
  return requests[(n %% #requests) + 1]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("trustmesh-wrk %%d %%d %%d %%d %%.0f %%.0f %%.0f\\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""
_WRK_RESULT = re.compile(r"trustmesh-wrk (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)")


def wrk_script(bodies: Sequence[bytes]) -> str:
    """The Lua script wrk runs: every body formatted into a request once (``init``),
    then cycled; ``done`` prints one line of figures (latencies in µs)."""
    table = "{" + ",".join(json.dumps(body.decode("ascii")) for body in bodies) + "}"
    return _WRK_SCRIPT % table


def _run_wrk(
    wrk: str, url: str, script: Path, seconds: float, concurrency: int
) -> tuple[dict[str, float], float]:
    """One wrk run -> (its figures, its CPU seconds: user + system of the child)."""
    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "-s", str(script)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([*argv, url + "/oauth2/token"], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = _WRK_RESULT.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {(done.stderr or done.stdout)[-500:]}")
    names = ("requests", "duration_us", "non_2xx", "socket_errors", "p50_us", "p99_us", "mean_us")
    figures = {name: float(value) for name, value in zip(names, match.groups(), strict=True)}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return figures, cpu


def _wrk_load(
    url: str,
    bodies: Sequence[bytes],
    seconds: float,
    concurrency: int,
    server_pid: int,
    workdir: Path,
) -> _Measured:
    """wrk (a separate C process) posting the bodies: a warm-up run, then the measured
    one, with the server's CPU time read around it and wrk's from its rusage."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("--wrk needs wrk on the PATH (Debian/Ubuntu: apt-get install wrk)")
    script = workdir / "exchange.lua"
    script.write_text(wrk_script(bodies), encoding="utf-8")
    warm, _ = _run_wrk(wrk, url, script, max(1.0, min(3.0, seconds / 5)), concurrency)
    server_before = _tree_cpu(server_pid)
    figures, loader_cpu = _run_wrk(wrk, url, script, seconds, concurrency)
    server_after = _tree_cpu(server_pid)
    window_s = figures["duration_us"] / 1e6
    non_2xx = int(figures["non_2xx"])
    return _Measured(
        loader=f"wrk -t1 -c{concurrency} (C, a process of its own)",
        per_s=figures["requests"] / window_s,
        p50_us=figures["p50_us"],
        p99_us=figures["p99_us"],
        mean_us=figures["mean_us"],
        requests=int(figures["requests"]),
        window_s=window_s,
        non_200=non_2xx,
        connection_errors=int(figures["socket_errors"]),
        loader_cpu_s=loader_cpu,
        server_cpu_s=(
            None if server_before is None or server_after is None else server_after - server_before
        ),
        answered_200=int(warm["requests"] - warm["non_2xx"] + figures["requests"] - non_2xx),
        drops_in_flight=True,
        warmup_requests=int(warm["requests"]),
    )


# -- the audit check -------------------------------------------------------------------


def _server_issued(fed: Federation) -> int:
    """The server's own count of tokens issued (each after its event was committed)."""
    text = fed.http.get(fed.url + "/metrics").text
    found = re.search(
        r'^trustmesh_token_exchanges_total\{result="issued"\} ([0-9.e+]+)$', text, re.M
    )
    return int(float(found.group(1))) if found else 0


def _logged(fed: Federation) -> int:
    """``token.issued`` events committed to the server's SQLite database, read from
    the file (a reader of the WAL never blocks the server's writer)."""
    database = fed.root / "server" / "trustmesh.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM audit_entries WHERE type = 'token.issued'"
        ).fetchone()
    return int(count)


def _audited(fed: Federation, answered_200: int, slack: int, workers: int) -> dict[str, Any]:
    """``token.issued`` events committed to the database against the 200 answers, once
    the server has finished what was in flight (the log stops growing). With one
    process the server's own count of tokens issued must equal the log's; with
    several, ``/metrics`` is one worker's, so only the 200 answers are compared."""
    logged, deadline = _logged(fed), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = _logged(fed)
        if now == logged:
            break
        logged = now
    issued = _server_issued(fed) if workers == 1 else None
    verified = (issued is None or logged == issued) and 0 <= logged - answered_200 <= slack
    return {
        "token_issued_in_log": logged,
        "server_issued": issued,
        "answered_200": answered_200,
        "verified": verified,
    }


def _tree_cpu(pid: int) -> float | None:
    """CPU seconds of a process and every descendant (the server and its workers)."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return own + sum(_tree_cpu(int(child)) or 0.0 for child in children)


# -- the run --------------------------------------------------------------------------


def run(
    seconds: float = 10.0,
    concurrency: int = 16,
    *,
    workloads: int = 20,
    pool_size: int = 2000,
    warmup: int = 300,
    limit_rounds: int = 4,
    wrk: bool = False,
    server_workers: int = 1,
) -> dict[str, Any]:
    """Measure exchanges/s, p50 and p99 over HTTP for ``seconds`` with ``concurrency``
    keep-alive connections, next to the single-core crypto limit (see the module
    docstring). ``wrk``: the load from wrk instead of the asyncio client;
    ``server_workers``: ``trustmesh server --workers``. Starts and always stops its own
    server and cluster processes."""
    if seconds <= 0 or min(concurrency, workloads, pool_size, limit_rounds, server_workers) < 1:
        raise ValueError(
            "seconds, concurrency, workloads, pool_size and limit_rounds must be positive"
        )
    server_args = ["--workers", str(server_workers)] if server_workers > 1 else []
    with federation(ORIGIN, server_args) as fed:
        fed.apply(_manifests(fed.cluster.issuer, workloads))
        minted_at = time.perf_counter()
        tokens = [
            fed.cluster.mint(f"ns-{i % workloads}", f"sa-{i % workloads}") for i in range(pool_size)
        ]
        mint_s = time.perf_counter() - minted_at
        host, port = address(fed.url)
        _check_exchange(fed, tokens[0])

        limit = _Limit(fed.cluster.jwks(), tokens)
        budget = max(0.2, min(1.0, seconds / 10))
        before = [limit.round(budget) for _ in range((limit_rounds + 1) // 2)]
        server = fed.server
        if wrk:
            measured = _wrk_load(
                fed.url,
                [_form_body(token) for token in tokens],
                seconds,
                concurrency,
                server.proc.pid,
                fed.root,
            )
        else:
            requests = [_request_bytes(host, port, token) for token in tokens]
            measured = _asyncio_load(
                host, port, requests, seconds, concurrency, warmup, server.proc.pid
            )
        audit = _audited(
            fed,
            measured.answered_200 + 1,  # the sanity exchange
            2 * concurrency if measured.drops_in_flight else 0,
            server_workers,
        )
        after = [limit.round(budget) for _ in range(limit_rounds // 2)]
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server exited during the load: {server.tail()}")
    return _report(
        measured,
        audit,
        before + after,
        seconds,
        concurrency,
        workloads,
        pool_size,
        mint_s,
        server_workers,
    )


def _report(
    measured: _Measured,
    audit: dict[str, Any],
    rounds: list[dict[str, Distribution]],
    seconds: float,
    concurrency: int,
    workloads: int,
    pool_size: int,
    mint_s: float,
    server_workers: int = 1,
) -> dict[str, Any]:
    window_s = measured.window_s
    both_p50, both_p99, limit_per_s = median_of(rounds, "both")
    verify_p50, verify_p99, verify_per_s = median_of(rounds, "verify")
    sign_p50, sign_p99, sign_per_s = median_of(rounds, "sign")
    limits = sorted(r["both"].per_s for r in rounds)
    ratio = measured.per_s / limit_per_s
    server_cpu = None if measured.server_cpu_s is None else 100.0 * measured.server_cpu_s / window_s
    loader_cpu = 100.0 * measured.loader_cpu_s / window_s
    p99_ms = measured.p99_us / 1000.0
    rate_ok, p99_ok = measured.per_s >= GOAL_PER_S, p99_ms < GOAL_P99_MS
    rate11_ok, p9911_ok = measured.per_s >= ISSUE11_PER_S, p99_ms <= ISSUE11_P99_MS
    errors = measured.non_200 + measured.connection_errors
    cpu_note = (
        "" if server_cpu is None else f"CPU: server {server_cpu:.0f}%, "
    ) + f"load generator {loader_cpu:.0f}% of a core"
    results = [
        row(
            "exchange over HTTP",
            p50_us=measured.p50_us,
            p99_us=measured.p99_us,
            per_s=measured.per_s,
            note=f"{concurrency} conns, {measured.requests} reqs, {errors} errors; {cpu_note}",
        ),
        row(
            "limit: RS256 verify + ES256 sign",
            p50_us=both_p50,
            p99_us=both_p99,
            per_s=limit_per_s,
            note=limit_note(rounds),
        ),
        row(
            "  RS256 verify (SA token)",
            p50_us=verify_p50,
            p99_us=verify_p99,
            per_s=verify_per_s,
            note="cryptography, RSA-2048 PKCS#1 v1.5",
        ),
        row(
            "  ES256 sign (JWT-SVID)",
            p50_us=sign_p50,
            p99_us=sign_p99,
            per_s=sign_per_s,
            note="cryptography, P-256 ECDSA",
        ),
    ]
    server_issued = audit["server_issued"]
    audit_line = (
        f"audit: {audit['token_issued_in_log']:,} token.issued events committed to the log, "
        + ("" if server_issued is None else f"{server_issued:,} tokens the server issued, ")
        + f"{audit['answered_200']:,} 200 answers read"
        + (
            " (wrk drops the requests in flight when its time is up)"
            if measured.drops_in_flight
            else ""
        )
        + f": {'verified' if audit['verified'] else 'MISMATCH'}"
    )
    summary = [
        f"exchanges/s over HTTP: {measured.per_s:,.0f} "
        f"(p50 {measured.p50_us / 1000:.2f} ms, p99 {p99_ms:.2f} ms; "
        f"{measured.requests:,} requests in {window_s:.1f} s over {concurrency} keep-alive "
        f"connections)",
        f"load generator: {measured.loader}",
        f"errors: {measured.non_200} non-200 answers, {measured.connection_errors} connection errors"
        + (f" (first: {measured.first_error})" if measured.first_error else ""),
        (
            f"CPU over the window: server ({server_workers} "
            f"process{'es' if server_workers > 1 else ''}) {server_cpu:.0f}% of one core, "
            if server_cpu is not None
            else "CPU over the window: "
        )
        + f"load generator {loader_cpu:.0f}% of one core",
        audit_line,
        f"single-core limit (one RS256 verify + one ES256 sign): {limit_per_s:,.0f}/s, "
        f"{1e6 / limit_per_s:.1f} µs per exchange; "
        f"HTTP reaches {ratio:.1%} of it (ratio {ratio:.3f})",
        f"goals (DESIGN): ≥ {GOAL_PER_S:,.0f} exchanges/s: {verdict(rate_ok)}; "
        f"p99 < {GOAL_P99_MS:.0f} ms: {verdict(p99_ok)}",
        f"goals (issue 11, audited): ≥ {ISSUE11_PER_S:,.0f} exchanges/s: {verdict(rate11_ok)}; "
        f"p99 ≤ {ISSUE11_P99_MS:.0f} ms: {verdict(p9911_ok)}",
    ]
    if server_cpu is not None and server_cpu < 60.0 and measured.p50_us > 30_000:
        summary.append(
            f"hint: the server was {100 - server_cpu:.0f}% idle while requests took "
            f"{measured.p50_us / 1000:.0f} ms: the signature of Nagle's algorithm meeting delayed "
            "ACKs (responses written in two sends on sockets without TCP_NODELAY)"
        )
    return {
        "title": "Token exchange (RFC 8693) over HTTP vs. one core's crypto limit",
        "results": results,
        "summary": summary,
        "exchanges_per_s": round(measured.per_s, 1),
        "p50_us": round(measured.p50_us, 1),
        "p99_us": round(measured.p99_us, 1),
        "mean_us": None if measured.mean_us is None else round(measured.mean_us, 1),
        "requests": measured.requests,
        "window_s": round(window_s, 3),
        "non_200": measured.non_200,
        "connection_errors": measured.connection_errors,
        "statuses": measured.statuses,
        "first_error": measured.first_error,
        "warmup_requests": measured.warmup_requests,
        "load_generator": measured.loader,
        "limit_per_s": round(limit_per_s, 1),
        "limit_us_per_exchange": round(1e6 / limit_per_s, 2),
        "limit_rounds_per_s": [round(x, 1) for x in limits],
        "rs256_verify_us": round(verify_p50, 2),
        "es256_sign_us": round(sign_p50, 2),
        "ratio": round(ratio, 4),
        "server_cpu_percent": None if server_cpu is None else round(server_cpu, 1),
        "client_cpu_percent": round(loader_cpu, 1),
        "load_generator_cpu_percent": round(loader_cpu, 1),
        "audit": audit,
        "seconds": seconds,
        "concurrency": concurrency,
        "server_workers": server_workers,
        "workloads": workloads,
        "pool_size": pool_size,
        "mint_seconds": round(mint_s, 2),
        "goals": {
            "per_s": GOAL_PER_S,
            "p99_ms": GOAL_P99_MS,
            "per_s_met": rate_ok,
            "p99_met": p99_ok,
            "issue11_per_s": ISSUE11_PER_S,
            "issue11_p99_ms": ISSUE11_P99_MS,
            "issue11_per_s_met": rate11_ok,
            "issue11_p99_met": p9911_ok,
            "audit_verified": audit["verified"],
        },
    }
