"""``trustmesh bench svid``: X.509-SVIDs signed per second at the control plane over
HTTP (``POST /v1/x509-svid``: SA-token verification, CSR checks, the signature, the
``svid.issued`` audit commit), side by side with the single-core crypto limit.

Set-up as ``bench exchange`` (``bench/_federation.py``): ``trustmesh server`` as its own
process (SQLite, one event loop), a simulated kube-apiserver issuer (RS256) whose keys
the server fetches by OIDC discovery once, 20 Workloads. A pool of distinct SA tokens
and of distinct P-256 CSRs (each a fresh key, as sidecars make them) is built before the
load, and the request bytes encoded, so the load generator (``bench/_load.py``, raw
keep-alive sockets in this process) does no crypto while it measures.

The limit is the crypto an issuance cannot avoid, with ``cryptography`` in a loop on one
core in this process: the CSR's checks and self-signature verification
(``identity/x509svid.check_csr``, P-256 ECDSA) plus building and signing the leaf
(``sign_svid``, P-256 ECDSA by the root). It is measured in rounds before and after the
load and the median round is used, so a noisy neighbour moves both figures; ``ratio``
is HTTP SVIDs/s over that limit. The RS256 verification of the SA token is measured in
the same rounds and shown beside it (limit with the token: all three).

Goals (issue 12): at least 1,000 X.509-SVIDs/s and p99 under 20 ms."""

from __future__ import annotations

import json
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256
from jwt.algorithms import RSAAlgorithm

from trustmesh.bench._federation import (
    TRUST_DOMAIN,
    Federation,
    address,
    cluster_doc,
    federation,
    load_between_limits,
    numbered_workloads,
)
from trustmesh.bench._load import LoadResult, request_bytes
from trustmesh.bench._stats import (
    Distribution,
    limit_note,
    load_figures,
    median_of,
    row,
    timed,
    verdict,
)
from trustmesh.identity.jws import b64decode
from trustmesh.identity.x509ca import ActiveRoot, build_root, fingerprint
from trustmesh.identity.x509svid import check_csr, csr_pem, sign_svid

__all__ = ["run"]

ORIGIN = "bench"
PATH = "/v1/x509-svid"
GOAL_PER_S = 1000.0
GOAL_P99_MS = 20.0


def make_csr() -> str:
    """What a sidecar sends: a CSR over a fresh P-256 key."""
    return csr_pem(ec.generate_private_key(ec.SECP256R1()))


def _request_bytes(host: str, port: int, token: str, csr: str) -> bytes:
    body = json.dumps({"subject_token": token, "csr": csr}).encode()
    headers = {
        "Host": f"{host}:{port}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    return request_bytes("POST", PATH, headers, body)


def _check_issuance(fed: Federation, token: str, csr: str) -> None:
    """One request through a real HTTP client before the load: the set-up works and
    the answer is a leaf for a SPIFFE ID of the trust domain."""
    answer = fed.http.post(fed.url + PATH, json={"subject_token": token, "csr": csr})
    if answer.status_code != 200:
        raise RuntimeError(f"sanity issuance answered HTTP {answer.status_code}: {answer.text}")
    body = answer.json()
    leaf = x509.load_pem_x509_certificate(body["svid"][0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [body["spiffe_id"]] or not body["spiffe_id"].startswith(f"spiffe://{TRUST_DOMAIN}/"):
        raise RuntimeError(f"sanity issuance returned an unexpected certificate: {uris}")


# -- the single-core limit ------------------------------------------------------------


class _Limit:
    """CSR check + leaf signature (and the SA token's RS256 verification beside them),
    every argument built once outside the loops."""

    def __init__(self, jwks: dict[str, Any], tokens: list[str], csrs: list[str]) -> None:
        public = RSAAlgorithm.from_jwk(jwks["keys"][-1])
        if not isinstance(public, rsa.RSAPublicKey):
            raise TypeError("the simulated cluster's signing key is not an RSA public key")
        self.public = public
        self.inputs = [
            (b64decode(t.rsplit(".", 1)[1]), t.rsplit(".", 1)[0].encode()) for t in tokens[:64]
        ]
        self.csrs = csrs[:64]
        self.keys = [check_csr(c, "spiffe://x/y") for c in self.csrs]
        private = ec.generate_private_key(ec.SECP256R1())
        now = time.time()
        certificate = build_root(private, TRUST_DOMAIN, now)
        self.root = ActiveRoot(
            fingerprint(certificate),
            certificate,
            private,
            certificate.not_valid_after_utc.timestamp(),
        )
        self.spiffe_id = f"spiffe://{TRUST_DOMAIN}/cluster/{ORIGIN}/ns/ns-0/sa/sa-0"
        self.now = now
        self.padding = PKCS1v15()
        self.hash = SHA256()

    def token(self, i: int) -> None:
        signature, signing_input = self.inputs[i % len(self.inputs)]
        self.public.verify(signature, signing_input, self.padding, self.hash)

    def csr(self, i: int) -> None:
        check_csr(self.csrs[i % len(self.csrs)], self.spiffe_id)

    def sign(self, i: int) -> None:
        key = self.keys[i % len(self.keys)]
        sign_svid(self.root, key, self.spiffe_id, self.now - 30, self.now + 3600)

    def both(self, i: int) -> None:
        key = check_csr(self.csrs[i % len(self.csrs)], self.spiffe_id)
        sign_svid(self.root, key, self.spiffe_id, self.now - 30, self.now + 3600)

    def all(self, i: int) -> None:
        self.token(i)
        self.both(i)

    def round(self, budget_s: float) -> dict[str, Distribution]:
        """One round, each loop sized to about a fifth of ``budget_s``."""
        probe = timed(self.all, 20)
        n = max(50, int(budget_s / 5 / max(probe.mean_ns / 1e9, 1e-6)))
        return {
            "token": timed(self.token, n),
            "csr": timed(self.csr, n),
            "sign": timed(self.sign, n),
            "both": timed(self.both, n),
            "all": timed(self.all, n),
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
    """Measure X.509-SVIDs/s, p50 and p99 over HTTP for ``seconds`` with
    ``concurrency`` keep-alive connections, next to the single-core crypto limit.
    Starts and always stops its own server and cluster processes."""
    if seconds <= 0 or concurrency < 1 or workloads < 1 or pool_size < 1 or limit_rounds < 1:
        raise ValueError(
            "seconds, concurrency, workloads, pool_size and limit_rounds must be positive"
        )
    with federation(ORIGIN) as fed:
        fed.apply(
            [
                cluster_doc(ORIGIN, fed.cluster.issuer),
                *numbered_workloads(ORIGIN, workloads, projects=4),
            ]
        )
        prepared_at = time.perf_counter()
        tokens = [
            fed.cluster.mint(f"ns-{i % workloads}", f"sa-{i % workloads}") for i in range(pool_size)
        ]
        csrs = [make_csr() for _ in range(pool_size)]
        prepare_s = time.perf_counter() - prepared_at
        host, port = address(fed.url)
        requests = [_request_bytes(host, port, t, c) for t, c in zip(tokens, csrs, strict=True)]
        _check_issuance(fed, tokens[0], csrs[0])

        limit = _Limit(fed.cluster.jwks(), tokens, csrs)
        load, loop_name, rounds = load_between_limits(
            fed,
            requests,
            limit.round,
            seconds=seconds,
            concurrency=concurrency,
            warmup=warmup,
            limit_rounds=limit_rounds,
        )
    return _report(load, loop_name, rounds, seconds, concurrency, workloads, pool_size, prepare_s)


def _report(
    load: LoadResult,
    loop_name: str,
    rounds: list[dict[str, Distribution]],
    seconds: float,
    concurrency: int,
    workloads: int,
    pool_size: int,
    prepare_s: float,
) -> dict[str, Any]:
    figures = load_figures(load, "X.509-SVID", GOAL_PER_S, GOAL_P99_MS)
    http, window_s, server_cpu = figures.http, figures.window_s, figures.server_cpu
    both_p50, both_p99, limit_per_s = median_of(rounds, "both")
    all_p50, all_p99, all_per_s = median_of(rounds, "all")
    token_p50, _, token_per_s = median_of(rounds, "token")
    csr_p50, csr_p99, csr_per_s = median_of(rounds, "csr")
    sign_p50, sign_p99, sign_per_s = median_of(rounds, "sign")
    limits = sorted(r["both"].per_s for r in rounds)
    ratio = http.per_s / limit_per_s
    errors = figures.errors
    cpu_note = "" if server_cpu is None else f", server CPU {server_cpu:.0f}% of a core"
    results = [
        row(
            "X.509-SVID over HTTP",
            p50_us=http.p50_us,
            p99_us=http.p99_us,
            per_s=http.per_s,
            note=f"{concurrency} conns, {http.n} reqs, {errors} errors{cpu_note}",
        ),
        row(
            "limit: CSR verify + sign",
            p50_us=both_p50,
            p99_us=both_p99,
            per_s=limit_per_s,
            note=limit_note(rounds),
        ),
        row(
            "  CSR checks + verify",
            p50_us=csr_p50,
            p99_us=csr_p99,
            per_s=csr_per_s,
            note="check_csr: PEM, DER, P-256 ECDSA",
        ),
        row(
            "  leaf build + sign",
            p50_us=sign_p50,
            p99_us=sign_p99,
            per_s=sign_per_s,
            note="sign_svid: P-256 ECDSA",
        ),
        row(
            "limit with the SA token",
            p50_us=all_p50,
            p99_us=all_p99,
            per_s=all_per_s,
            note=f"+ RS256 verify ({token_p50:.0f} µs, {token_per_s:,.0f}/s alone)",
        ),
    ]
    summary = [
        f"X.509-SVIDs/s over HTTP: {http.per_s:,.0f} "
        f"(p50 {http.p50_us / 1000:.2f} ms, p99 {http.p99_us / 1000:.2f} ms; "
        f"{http.n:,} requests in {window_s:.1f} s over {concurrency} keep-alive connections)",
        figures.errors_line(load),
        f"single-core limit (CSR verify + sign): {limit_per_s:,.0f}/s, "
        f"{1e6 / limit_per_s:.1f} µs per SVID; HTTP reaches {ratio:.1%} of it "
        f"(ratio {ratio:.3f}); with the SA token's RS256 verify: {all_per_s:,.0f}/s",
        figures.cpu_line(loop_name),
        f"goal ≥ {GOAL_PER_S:,.0f} X.509-SVIDs/s: {verdict(figures.rate_ok)}; "
        f"goal p99 < {GOAL_P99_MS:.0f} ms: {verdict(figures.p99_ok)}",
    ]
    return {
        "title": "X.509-SVID issuance over HTTP vs. one core's crypto limit",
        "results": results,
        "summary": summary,
        "svids_per_s": round(http.per_s, 1),
        **figures.members(load, loop_name, GOAL_PER_S, GOAL_P99_MS),
        "limit_per_s": round(limit_per_s, 1),
        "limit_us_per_svid": round(1e6 / limit_per_s, 2),
        "limit_rounds_per_s": [round(x, 1) for x in limits],
        "limit_with_token_per_s": round(all_per_s, 1),
        "csr_verify_us": round(csr_p50, 2),
        "sign_us": round(sign_p50, 2),
        "rs256_verify_us": round(token_p50, 2),
        "ratio": round(ratio, 4),
        "seconds": seconds,
        "concurrency": concurrency,
        "workloads": workloads,
        "pool_size": pool_size,
        "prepare_seconds": round(prepare_s, 2),
    }
