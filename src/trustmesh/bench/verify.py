"""``trustmesh bench verify``: what the agent adds on top of the signature check when it
authenticates a federated JWT-SVID, and what a cached token costs.

Three per-call latency distributions, on the same key and the same kind of token as
the control plane issues (ES256, P-256, with the federation claims of DESIGN §2):

- **bare**: ``cryptography``'s ECDSA verification of one token's signature over its
  signing input, the JOSE ``r||s`` signature converted to DER once, outside the loop:
  the physical floor of any verification;
- **uncached**: ``Authenticator.authenticate`` on distinct tokens (distinct ``jti``),
  with the cache emptied before each pass, so every call does the whole work: digest,
  cache miss, header checks, PyJWT decode and signature verification, claim checks, the
  SPIFFE ``sub`` check, and the cache insertion;
- **cached**: ``Authenticator.authenticate`` on one token again and again (a hit).

Every call is timed alone with ``perf_counter_ns``; nothing is subtracted, and the cost
of the timer itself is reported next to the figures. The three passes are interleaved
and repeated for a few rounds, and each figure is the median over rounds, so a noisy
neighbour slows one round of every kind rather than all rounds of one kind.
``overhead_us`` is uncached p50 minus bare p50 (goal: at most 20 µs); the cached p50
has a goal of at most 3 µs."""

from __future__ import annotations

import gc
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256

from trustmesh.agent.authn import Authenticator
from trustmesh.bench._federation import TRUST_DOMAIN, es256_key
from trustmesh.bench._stats import Distribution, median, row, summarise, timer_overhead, verdict
from trustmesh.identity.jws import b64decode
from trustmesh.identity.svid import mint_svid
from trustmesh.spiffeid import cluster_audience

__all__ = ["run"]

ISSUER = "https://trustmesh.bench.example"
ORIGIN, TARGET = "a", "b"
GOAL_OVERHEAD_US = 20.0
GOAL_CACHED_US = 3.0


def _claims(now: int, jti: str) -> dict[str, Any]:
    """The claims the control plane puts in a JWT-SVID (see identity/rfc8693.py)."""
    return {
        "iss": ISSUER,
        "sub": f"spiffe://{TRUST_DOMAIN}/cluster/{ORIGIN}/ns/n/sa/s",
        "aud": [cluster_audience(TRUST_DOMAIN, TARGET)],
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": jti,
        "environment": "prod",
        "project": "shop",
        "tier": "gold",
        "workload_id": "payments",
        "cluster": ORIGIN,
        "namespace": "n",
        "service_account": "s",
    }


def _timed(call: Callable[[str], object], tokens: Sequence[str]) -> Distribution:
    clock = time.perf_counter_ns
    out = [0] * len(tokens)
    gc.collect()
    started = clock()
    for i, token in enumerate(tokens):
        t0 = clock()
        call(token)
        out[i] = clock() - t0
    return summarise(out, clock() - started)


def run(iterations: int = 20000, *, rounds: int = 3) -> dict[str, Any]:
    """Measure bare, uncached and cached verification, ``iterations`` calls per pass,
    ``rounds`` interleaved rounds (see the module docstring)."""
    if iterations < 1 or rounds < 1:
        raise ValueError("iterations and rounds must be positive")
    private, jwk, key = es256_key()
    now = int(time.time())
    tokens = [mint_svid(key, _claims(now, secrets.token_urlsafe(16))) for _ in range(iterations)]
    hot = mint_svid(key, _claims(now, secrets.token_urlsafe(16)))

    clock = time.time
    authn = Authenticator(cluster=TARGET, clock=clock, cache_size=max(100_000, iterations + 1))
    authn.configure(issuer=ISSUER, trust_domain=TRUST_DOMAIN, jwks={"keys": [jwk]})

    def authenticate(token: str) -> object:  # as the decision pipeline calls it
        return authn.authenticate(token, clock())

    expected = f"spiffe://{TRUST_DOMAIN}/cluster/{ORIGIN}/ns/n/sa/s"
    for token in (tokens[0], hot):  # correctness first: a benchmark of failures is no use
        if authn.authenticate(token, clock()).spiffe_id != expected:
            raise RuntimeError("the authenticator returned an unexpected identity")

    signing_input, _, signature = hot.rpartition(".")
    raw = b64decode(signature)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public = private.public_key()
    message, algorithm = signing_input.encode(), ec.ECDSA(SHA256())
    public.verify(der, message, algorithm)

    def bare(_: str) -> None:
        public.verify(der, message, algorithm)

    hot_tokens = [hot] * iterations
    results: dict[str, list[Distribution]] = {"bare": [], "uncached": [], "cached": []}
    for _ in range(rounds):
        results["bare"].append(_timed(bare, tokens))
        authn.cache.clear()
        results["uncached"].append(_timed(authenticate, tokens))
        authenticate(hot)  # the hot token is cached again after the clear
        results["cached"].append(_timed(authenticate, hot_tokens))
    timer = timer_overhead()
    return _report(results, timer, iterations, rounds, authn)


@dataclass(frozen=True)
class _Figure:
    """One kind of measurement over all rounds: each figure is the median of rounds."""

    p50_us: float
    p99_us: float
    per_s: float
    rounds_p50_us: list[float]

    @classmethod
    def of(cls, dists: list[Distribution]) -> _Figure:
        return cls(
            p50_us=median([d.p50_us for d in dists]),
            p99_us=median([d.p99_us for d in dists]),
            per_s=median([d.per_s for d in dists]),
            rounds_p50_us=[round(d.p50_us, 2) for d in dists],
        )


def _report(
    results: dict[str, list[Distribution]],
    timer: Distribution,
    iterations: int,
    rounds: int,
    authn: Authenticator,
) -> dict[str, Any]:
    figures = {name: _Figure.of(dists) for name, dists in results.items()}
    bare, uncached, cached = figures["bare"], figures["uncached"], figures["cached"]
    overhead = uncached.p50_us - bare.p50_us
    overhead_ok = overhead <= GOAL_OVERHEAD_US
    cached_ok = cached.p50_us <= GOAL_CACHED_US
    notes = {
        "bare": "cryptography ECDSA P-256 verify, DER signature prepared once",
        "uncached": f"Authenticator.authenticate, {iterations:,} distinct tokens, cache emptied",
        "cached": "Authenticator.authenticate, one token (cache hit)",
    }
    rows = [
        row(
            f"{name}",
            p50_us=fig.p50_us,
            p99_us=fig.p99_us,
            per_s=fig.per_s,
            note=notes[name],
        )
        for name, fig in figures.items()
    ]
    rows.append(
        row(
            "timer overhead",
            p50_us=timer.p50_us,
            p99_us=timer.p99_us,
            note="one perf_counter_ns pair, included in every figure above",
        )
    )

    summary = [
        f"overhead of the agent over a bare signature check: {overhead:.1f} µs at p50 "
        f"(uncached {uncached.p50_us:.1f} µs minus bare {bare.p50_us:.1f} µs); "
        f"goal ≤ {GOAL_OVERHEAD_US:.0f} µs: {verdict(overhead_ok)}",
        f"cached verification: {cached.p50_us:.2f} µs at p50; goal ≤ {GOAL_CACHED_US:.0f} µs: "
        f"{verdict(cached_ok)}",
        f"median of {rounds} interleaved rounds of {iterations:,} calls each; timer overhead "
        f"{timer.p50_us * 1000:.0f} ns per call, not subtracted",
    ]
    return {
        "title": "Agent verification of a federated JWT-SVID (ES256) vs. a bare signature check",
        "results": rows,
        "summary": summary,
        "bare_p50_us": round(bare.p50_us, 2),
        "uncached_p50_us": round(uncached.p50_us, 2),
        "uncached_p99_us": round(uncached.p99_us, 2),
        "cached_p50_us": round(cached.p50_us, 3),
        "cached_p99_us": round(cached.p99_us, 3),
        "overhead_us": round(overhead, 2),
        "timer_overhead_ns": timer.p50_ns,
        "per_s": {name: round(fig.per_s, 1) for name, fig in figures.items()},
        "rounds_p50_us": {name: fig.rounds_p50_us for name, fig in figures.items()},
        "iterations": iterations,
        "rounds": rounds,
        "errors": 0,
        "cache_hits": authn.cache.hits,
        "cache_misses": authn.cache.misses,
        "goals": {
            "overhead_us": GOAL_OVERHEAD_US,
            "cached_p50_us": GOAL_CACHED_US,
            "overhead_met": overhead_ok,
            "cached_met": cached_ok,
        },
    }
