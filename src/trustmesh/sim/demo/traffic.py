"""The demo's traffic: every workload mints a service-account token from its own
cluster, trades it (RFC 8693) for a JWT-SVID per cluster it calls, keeps both as leases
renewed at 80 % of their lifetime, and presents the JWT-SVID with its request to the
target cluster's agent; each answer is counted and checked against the policy in force.
Also the intruder's two attempts every round, and the probes that present a held token
without counting it as traffic."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from trustmesh.common.token_exchange import exchange_form
from trustmesh.common.tracing import format_traceparent, new_span_id, new_trace_id
from trustmesh.sim.cluster import SimulatedCluster
from trustmesh.sim.demo._http import json_body
from trustmesh.sim.demo.display import (
    Events,
    decision_detail,
    resumed_text,
    short_decision,
    short_kid,
)
from trustmesh.sim.demo.scenario import (
    FORGED_AUDIENCE,
    LEDGER_WRITE,
    TRUST_DOMAIN,
    WORKLOADS,
    DemoWorkload,
)
from trustmesh.sim.demo.scoreboard import IntruderStats, PairStats, Scoreboard
from trustmesh.spiffeid import cluster_audience

SA_TOKEN_TTL = 3600  # projected service-account tokens, as the kubelet requests them
RENEW_AT = 0.8  # renew tokens at 80 % of their lifetime


@dataclass
class Lease:
    token: str
    renew_at: float  # time.time() after which a new one is fetched
    issued_at: float | None = None  # the token's iat (JWT-SVIDs), to tell revoked ones
    trace_id: str | None = None  # W3C trace of this token: its issuance and every use


class Refused(Exception):
    """The control plane or an agent said no to a token (as opposed to a transport
    failure, or a decision that denies the request)."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status, self.error, self.description = status, error, description


class Traffic:
    """Workloads minting, exchanging and presenting tokens; and the intruder."""

    def __init__(
        self,
        board: Scoreboard,
        http: httpx.Client,
        clusters: dict[str, SimulatedCluster],
        rogue: SimulatedCluster,
        events: Events,
        lease_seconds: int,
    ) -> None:
        self.board, self.http, self.clusters, self.rogue = board, http, clusters, rogue
        self.events, self.lease_seconds = events, lease_seconds
        self.sa_tokens: dict[str, Lease] = {}
        self.svids: dict[tuple[str, str], Lease] = {}
        self.round = 0
        self.new_key_seen = False

    # -- legitimate traffic

    def run_round(self) -> None:
        for pair in self.board.pairs:
            self.call(pair)
        self.forge_exchange()
        self.tamper()
        self.round += 1

    def sa_token(self, wl: DemoWorkload) -> str:
        lease = self.sa_tokens.get(wl.name)
        if lease is None or time.time() >= lease.renew_at:
            token = self.clusters[wl.cluster].mint(
                wl.namespace, wl.service_account, ttl=SA_TOKEN_TTL
            )
            lease = Lease(token, time.time() + RENEW_AT * SA_TOKEN_TTL)
            self.sa_tokens[wl.name] = lease
        return lease.token

    def svid(self, pair: PairStats) -> Lease:
        """The JWT-SVID the workload holds for the pair's target (exchanged when it has
        none, or when the one it has is due for renewal)."""
        key = (pair.workload.name, pair.target)
        lease = self.svids.get(key)
        if lease is None or time.time() >= lease.renew_at:
            trace_id = new_trace_id()
            token, expires_in = self.exchange(self.sa_token(pair.workload), pair.target, trace_id)
            pair.exchanges += 1
            lease = Lease(token, time.time() + RENEW_AT * expires_in, issued_at(token), trace_id)
            self.svids[key] = lease
        return lease

    def exchange(
        self, subject_token: str, target: str, trace_id: str | None = None
    ) -> tuple[str, float]:
        form = exchange_form(
            subject_token, cluster_audience(TRUST_DOMAIN, target), self.lease_seconds
        )
        response = self.http.post(
            self.board.server_url + "/oauth2/token", data=form, headers=trace_headers(trace_id)
        )
        body = json_body(response)
        if response.status_code != 200:
            raise Refused(
                response.status_code, str(body.get("error")), str(body.get("error_description"))
            )
        return str(body["access_token"]), float(body["expires_in"])

    def authorize(
        self, target: str, token: str, request: dict[str, str], trace_id: str | None = None
    ) -> dict[str, Any]:
        """The agent's decision (allowed or denied); Refused when the token does not
        authenticate (401) or the agent cannot decide."""
        response = self.http.post(
            self.board.agent_urls[target] + "/v1/authorize",
            json={"token": token, "request": request},
            headers=trace_headers(trace_id),
        )
        body = json_body(response)
        if response.status_code != 200 or body.get("authenticated") is not True:
            reason = str(body.get("reason") or body.get("error_description") or "")
            raise Refused(response.status_code, str(body.get("error") or "refused"), reason)
        return body

    def call(self, pair: PairStats) -> None:
        lease: Lease | None = None
        try:
            lease = self.svid(pair)
            started = time.perf_counter()
            body = self.authorize(
                pair.target, lease.token, pair.route.call.request(), lease.trace_id
            )
            pair.last_latency_ms = (time.perf_counter() - started) * 1000
            revision = int(body["policy_revision"])
        except Refused as exc:
            self.svids.pop((pair.workload.name, pair.target), None)  # exchange again
            self.refused(pair, lease, exc)
            return
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            pair.errors += 1
            self.outcome(
                pair, f"error: {type(exc).__name__}", f"{pair.name}: request failed ({exc!r})"
            )
            return
        self.authenticated(pair, body["identity"])
        self.decided(pair, body, revision)
        if self.board.sample_trace is None and body.get("allowed") and lease.trace_id:
            self.board.sample_trace = lease.trace_id
        self.resumed(pair, lease)

    def refused(self, pair: PairStats, lease: Lease | None, exc: Refused) -> None:
        """A refusal is expected only for a token the demo revoked (reason ``revoked``,
        token issued no later than the revocation); any other is a failure."""
        revocation = self.board.revocation
        if (
            lease is not None
            and exc.status == 401
            and exc.description == "revoked"
            and revocation is not None
            and revocation.covers(pair.workload.name, lease.issued_at)
        ):
            pair.revoked += 1
            self.outcome(
                pair,
                "revoked",
                f"{pair.name}: REFUSED as expected ({exc}): its token was issued before the "
                f"revocation; it exchanges its service-account token for a new one",
            )
            return
        pair.refused += 1
        self.outcome(pair, f"refused: {exc}", f"{pair.name}: REFUSED ({exc})")

    def resumed(self, pair: PairStats, lease: Lease) -> None:
        """Note the revoked workload's first accepted call, per target, with a token
        issued after its revocation; say so once it has been accepted again everywhere."""
        revocation = self.board.revocation
        if (
            revocation is None
            or revocation.revoked_at is None
            or pair.workload.name != revocation.workload
            or pair.target in revocation.resumed
            or revocation.covers(pair.workload.name, lease.issued_at)
        ):
            return
        revocation.resumed[pair.target] = self.board.elapsed() - revocation.at
        if set(revocation.resumed) >= set(revocation.targets):
            self.events.event(resumed_text(revocation))

    def decided(self, pair: PairStats, body: dict[str, Any], revision: int) -> None:
        """Count the decision and check it against the policy in force at ``revision``."""
        allowed = body.get("allowed") is True
        if allowed:
            pair.allowed += 1
        else:
            pair.denied += 1
        self.board.by_revision[revision] += 1
        pair.last_decision = short_decision(body)
        verdict = f"{'ALLOWED' if allowed else 'DENIED'} at revision {revision}"
        expect = self.board.policy.expected(pair.route, revision)
        if expect is not None and expect.matches(body):
            who = f"authenticated as {pair.spiffe_id} (kid {short_kid(pair.last_kid)}, "
            text = f"{pair.name}: {verdict} ({decision_detail(body)}); {who}{pair.last_latency_ms or 0:.1f} ms)"
            self.outcome(pair, verdict.split()[0], text)
            return
        pair.unexpected += 1
        wanted = f"expected {expect}" if expect else "no policy with that revision was applied"
        mismatch = f"{pair.name}: {verdict} ({body.get('reason')}), {wanted}"
        self.board.policy.first_mismatch = self.board.policy.first_mismatch or mismatch
        self.outcome(pair, f"unexpected {verdict}", f"UNEXPECTED DECISION: {mismatch}")

    def authenticated(self, pair: PairStats, identity: dict[str, Any]) -> None:
        pair.spiffe_id = str(identity.get("spiffe_id") or pair.spiffe_id)
        pair.last_kid = str(identity.get("kid") or "")
        rotation = self.board.rotation
        if rotation is None:
            return
        if pair.last_kid == rotation.new_kid:
            rotation.new_key_calls += 1
            if not self.new_key_seen:
                self.new_key_seen = True
                self.events.event(
                    f"{pair.name}: first call verified with the new key "
                    f"(kid {short_kid(rotation.new_kid)}); "
                    "tokens signed before the rotation keep verifying with the retired key"
                )
        else:
            rotation.old_key_calls += 1

    def outcome(self, pair: PairStats, outcome: str, text: str) -> None:
        """Report a flow's outcome when it changes: the first decision, a decision that
        changes with the policy, a failure, a recovery."""
        if outcome != pair.outcome:
            pair.outcome = outcome
            self.events.event(text)

    # -- the intruder

    def forge_exchange(self) -> None:
        """A token for shop/payments from a cluster nobody registered."""
        stats = self.board.forged
        stats.attempts += 1
        forged = self.rogue.mint("shop", "payments", ttl=600)
        try:
            self.exchange(forged, FORGED_AUDIENCE)
        except Refused as exc:
            self.intruder_refused(stats, exc, exc.error, f"refused at exchange: {exc}")
            return
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            stats.errors += 1
            self.events.event(f"intruder: forged exchange failed in transport ({exc!r})")
            return
        stats.accepted += 1
        self.events.event("intruder: forged SA token was ACCEPTED by the control plane")

    def tamper(self) -> None:
        """Rewrite a legitimate JWT-SVID's payload to claim another workload."""
        stolen = self.steal()
        if stolen is None:
            return
        target, token = stolen
        stats = self.board.tampered
        stats.target = target
        stats.attempts += 1
        try:
            self.authorize(target, swap_payload(token, WORKLOADS[0]), LEDGER_WRITE.request())
        except Refused as exc:
            reason = exc.description or exc.error
            self.intruder_refused(stats, exc, reason, f"refused by agent {target}: {exc}")
            return
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            stats.errors += 1
            self.events.event(f"intruder: tampered call failed in transport ({exc!r})")
            return
        stats.accepted += 1
        self.events.event(f"intruder: tampered JWT-SVID was ACCEPTED by agent {target}")

    def steal(self) -> tuple[str, str] | None:
        """A current JWT-SVID of some workload other than the one impersonated."""
        candidates = sorted(
            (key, lease.token) for key, lease in self.svids.items() if key[0] != WORKLOADS[0].name
        )
        if not candidates:
            return None
        (_, target), token = candidates[self.round % len(candidates)]
        return target, token

    def intruder_refused(self, stats: IntruderStats, exc: Refused, reason: str, text: str) -> None:
        stats.refused += 1
        if exc.error != stats.expected_error:
            stats.unexpected += 1
        if reason != stats.last_reason:
            stats.last_reason = reason
            self.events.event(f"intruder: {stats.label} {text}")


def unverified_claims(token: str) -> dict[str, Any]:
    """A JWT's payload, read without verifying it (the workload's own token)."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims if isinstance(claims, dict) else {}


def issued_at(token: str) -> float | None:
    try:
        return float(unverified_claims(token)["iat"])
    except (IndexError, KeyError, TypeError, ValueError):
        return None


def swap_payload(token: str, victim: DemoWorkload) -> str:
    """The same header and signature over a payload rewritten to claim ``victim``."""
    header, _, signature = token.split(".")
    claims = unverified_claims(token)
    claims.update(
        sub=victim.spiffe_id,
        workload_id=victim.name,
        namespace=victim.namespace,
        service_account=victim.service_account,
        tier=victim.tier,
    )
    raw = json.dumps(claims, separators=(",", ":")).encode()
    forged = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    return f"{header}.{forged}.{signature}"


def trace_headers(trace_id: str | None) -> dict[str, str]:
    """A W3C ``traceparent`` naming the token's trace and a new span for this call."""
    return {"traceparent": format_traceparent(trace_id, new_span_id())} if trace_id else {}


def probe(traffic: Traffic, pair: PairStats, token: str) -> str:
    """Present ``token`` with the pair's request: ``accepted``, ``revoked``, or what
    else happened. Not counted as traffic."""
    try:
        traffic.authorize(pair.target, token, pair.route.call.request())
    except Refused as exc:
        return (
            "revoked" if exc.status == 401 and exc.description == "revoked" else f"refused ({exc})"
        )
    except (httpx.HTTPError, ValueError) as exc:
        return f"not checked ({exc!r})"
    return "accepted"
