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
  encoding while it measures. It is a lean asyncio client on raw keep-alive sockets
  (see ``_load``), in this process, not the server's; both processes' CPU time is
  reported so it can be seen that the client was not the bottleneck.
- The limit is the work an exchange cannot avoid: one RS256 verification of the
  subject token plus one ES256 signature of the JWT-SVID, with ``cryptography``
  (OpenSSL) directly, in a loop on one core of this machine. It is measured in rounds
  before and after the load (with the server idle), and the median round is used, so a
  noisy neighbour moves both figures rather than one. ``ratio`` is HTTP exchanges/s
  divided by that limit: the fraction of one core's crypto capacity the whole HTTP
  path (HTTP parsing, routing, form and JSON, claim checks, metrics) lets through.

Goals (DESIGN): at least 1,000 exchanges/s with p99 under 20 ms. In a closed loop the
mean latency is ``concurrency / throughput`` (Little's law), so with 16 connections a
p99 under 20 ms already needs well over 800 exchanges/s."""

from __future__ import annotations

import time
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
    load_between_limits,
    numbered_workloads,
    unverified_claims,
)
from trustmesh.bench._load import LoadResult, request_bytes
from trustmesh.bench._stats import Distribution, load_figures, median_of, row, timed, verdict
from trustmesh.common.token_exchange import exchange_form
from trustmesh.identity.jws import b64decode
from trustmesh.identity.svid import mint_svid

__all__ = ["run"]

ORIGIN = "bench"
TARGET = "peer"
AUDIENCE = f"spiffe://{TRUST_DOMAIN}/cluster/{TARGET}"
GOAL_PER_S = 1000.0
GOAL_P99_MS = 20.0


def _manifests(issuer: str, workloads: int) -> list[dict[str, Any]]:
    """The origin cluster by issuer only (keys through discovery), a peer cluster as the
    audience (never contacted: no token comes from it), and ``workloads`` Workloads."""
    return [
        cluster_doc(ORIGIN, issuer),
        cluster_doc(TARGET),
        *numbered_workloads(ORIGIN, workloads, projects=4),
    ]


def _request_bytes(host: str, port: int, token: str) -> bytes:
    body = urlencode(exchange_form(token, AUDIENCE)).encode()
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


# -- the run --------------------------------------------------------------------------


def run(
    seconds: float = 10.0,
    concurrency: int = 16,
    *,
    workloads: int = 20,
    pool_size: int = 2000,
    warmup: int = 300,
    limit_rounds: int = 4,
) -> dict[str, Any]:
    """Measure exchanges/s, p50 and p99 over HTTP for ``seconds`` with ``concurrency``
    keep-alive connections, next to the single-core crypto limit (see the module
    docstring). Starts and always stops its own server and cluster processes."""
    if seconds <= 0 or concurrency < 1 or workloads < 1 or pool_size < 1 or limit_rounds < 1:
        raise ValueError(
            "seconds, concurrency, workloads, pool_size and limit_rounds must be positive"
        )
    with federation(ORIGIN) as fed:
        fed.apply(_manifests(fed.cluster.issuer, workloads))
        minted_at = time.perf_counter()
        tokens = [
            fed.cluster.mint(f"ns-{i % workloads}", f"sa-{i % workloads}") for i in range(pool_size)
        ]
        mint_s = time.perf_counter() - minted_at
        host, port = address(fed.url)
        requests = [_request_bytes(host, port, token) for token in tokens]
        _check_exchange(fed, tokens[0])

        limit = _Limit(fed.cluster.jwks(), tokens)
        load, loop_name, rounds = load_between_limits(
            fed,
            requests,
            limit.round,
            seconds=seconds,
            concurrency=concurrency,
            warmup=warmup,
            limit_rounds=limit_rounds,
        )
    return _report(load, loop_name, rounds, seconds, concurrency, workloads, pool_size, mint_s)


def _report(
    load: LoadResult,
    loop_name: str,
    rounds: list[dict[str, Distribution]],
    seconds: float,
    concurrency: int,
    workloads: int,
    pool_size: int,
    mint_s: float,
) -> dict[str, Any]:
    figures = load_figures(load, "exchange", GOAL_PER_S, GOAL_P99_MS)
    http, window_s, server_cpu = figures.http, figures.window_s, figures.server_cpu
    both_p50, both_p99, limit_per_s = median_of(rounds, "both")
    verify_p50, verify_p99, verify_per_s = median_of(rounds, "verify")
    sign_p50, sign_p99, sign_per_s = median_of(rounds, "sign")
    limits = sorted(r["both"].per_s for r in rounds)
    ratio = http.per_s / limit_per_s
    p99_ms = http.p99_us / 1000.0
    errors = figures.errors

    cpu_note = "" if server_cpu is None else f", server CPU {server_cpu:.0f}% of a core"
    results = [
        row(
            "exchange over HTTP",
            p50_us=http.p50_us,
            p99_us=http.p99_us,
            per_s=http.per_s,
            note=f"{concurrency} conns, {http.n} reqs, {errors} errors{cpu_note}",
        ),
        row(
            "limit: RS256 verify + ES256 sign",
            p50_us=both_p50,
            p99_us=both_p99,
            per_s=limit_per_s,
            note=f"one core, median of {len(rounds)} rounds "
            f"({limits[0]:,.0f} to {limits[-1]:,.0f}/s)",
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

    summary = [
        f"exchanges/s over HTTP: {http.per_s:,.0f} "
        f"(p50 {http.p50_us / 1000:.2f} ms, p99 {p99_ms:.2f} ms; "
        f"{http.n:,} requests in {window_s:.1f} s over {concurrency} keep-alive connections)",
        figures.errors_line(load),
        f"single-core limit (one RS256 verify + one ES256 sign): {limit_per_s:,.0f}/s, "
        f"{1e6 / limit_per_s:.1f} µs per exchange; "
        f"HTTP reaches {ratio:.1%} of it (ratio {ratio:.3f})",
        figures.cpu_line(loop_name),
        f"goal ≥ {GOAL_PER_S:,.0f} exchanges/s: {verdict(figures.rate_ok)}; "
        f"goal p99 < {GOAL_P99_MS:.0f} ms: {verdict(figures.p99_ok)}",
    ]
    if server_cpu is not None and server_cpu < 60.0 and http.p50_us > 30_000:
        summary.append(
            f"hint: the server was {100 - server_cpu:.0f}% idle while requests took "
            f"{http.p50_us / 1000:.0f} ms: the signature of Nagle's algorithm meeting delayed "
            "ACKs (responses written in two sends on sockets without TCP_NODELAY)"
        )
    return {
        "title": "Token exchange (RFC 8693) over HTTP vs. one core's crypto limit",
        "results": results,
        "summary": summary,
        "exchanges_per_s": round(http.per_s, 1),
        **figures.members(load, loop_name, GOAL_PER_S, GOAL_P99_MS),
        "limit_per_s": round(limit_per_s, 1),
        "limit_us_per_exchange": round(1e6 / limit_per_s, 2),
        "limit_rounds_per_s": [round(x, 1) for x in limits],
        "rs256_verify_us": round(verify_p50, 2),
        "es256_sign_us": round(sign_p50, 2),
        "ratio": round(ratio, 4),
        "seconds": seconds,
        "concurrency": concurrency,
        "workloads": workloads,
        "pool_size": pool_size,
        "mint_seconds": round(mint_s, 2),
    }
