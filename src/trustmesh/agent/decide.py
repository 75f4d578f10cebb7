"""The agent's one decision pipeline (DESIGN §1, §4).

Every question any surface asks — the JSON authorize API, Envoy ext_authz, the
Kubernetes TokenReview and SubjectAccessReview webhooks — goes through the same steps,
in this order, on one clock reading:

1. **authenticate** the credential — a bearer JWT-SVID: the verified-token cache, else
   the JWT-SVID verifier; a token naming an unknown ``kid`` triggers one rate-limited
   refresh of the key set and one retry (``agent/authn.py``); or, on ext_authz with
   ``--trust-xfcc``, the client certificate Envoy forwarded (:class:`XfccHeader`): the
   verified-certificate cache, else X.509-SVID validation against the roots held, with
   the claims of the bundle's inventory (``agent/xfcc.py``);
2. **refuse what is revoked** — the token, its subject, cluster or key — and, in strict
   mode, every identity while the revocation list is staler than its bound
   (``agent/revocations.py``);
3. **decide** with the engine of the cluster's verified policy bundle: deny overrides
   allow, no allow is deny (``policy/engine.py``);
4. **audit**: the ``authz.decision`` event is in the spool before the answer leaves;
   when it cannot be written, :class:`~trustmesh.common.errors.AuditUnavailable`
   (answered 503) replaces the answer (``agent/audit.py``). Refusals of tokens that
   did not verify in step 1 (or of no token) beyond the window's quota are folded into
   a summary instead, on every surface alike; what the engine decided about a verified
   identity, and a verified token refused in step 2, are never folded;
5. **count** it in the metrics, and its time in the surface's latency histogram
   (``time.perf_counter`` around steps 1-4; no lock, ``common/histogram.py``).

A surface parses its own format, opens the span, calls one method here and renders
the :class:`Outcome` in its own format. Authentication and authorization meet only at
the :class:`~trustmesh.identity.svid.VerifiedIdentity`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from trustmesh.agent.audit import DecisionAudit
from trustmesh.agent.authn import Authenticator
from trustmesh.agent.metrics import AgentMetrics
from trustmesh.agent.policy import PolicyHolder
from trustmesh.agent.revocations import RevocationHolder
from trustmesh.agent.xfcc import CertificateAuthenticator, XfccHeader
from trustmesh.common.clock import Clock
from trustmesh.common.errors import InvalidToken, NotReady
from trustmesh.common.names import person_of
from trustmesh.common.tracing import Span, Tracing
from trustmesh.identity.login import is_login_token
from trustmesh.identity.svid import VerifiedIdentity
from trustmesh.identity.x509validate import VerifiedSvid
from trustmesh.policy.engine import Decision, Engine
from trustmesh.request import Request

# The surfaces, as audit events and spans name them.
AUTHORIZE = "authorize"
EXT_AUTHZ = "ext_authz"
TOKEN_REVIEW = "tokenreview"  # noqa: S105 (a surface name, not a secret)
ACCESS_REVIEW = "subjectaccessreview"
SURFACES = (AUTHORIZE, EXT_AUTHZ, TOKEN_REVIEW, ACCESS_REVIEW)

SPAN_NAME = "authz.decision"
_SPAN_ATTRIBUTES = {surface: {"trustmesh.surface": surface} for surface in SURFACES}
NO_BUNDLE = "the agent has no verified policy bundle yet"

Credential = str | XfccHeader | None
"""What a question presents: a bearer token, the client certificate Envoy forwarded, or
nothing."""

RefreshKeys = Callable[[], Awaitable[bool]]
"""Ask for the control plane's key set now; whether a refresh happened."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to an authorization question: an engine decision about a verified
    identity, or the reason the credential did not authenticate."""

    identity: VerifiedIdentity | None
    decision: Decision | None
    refusal: InvalidToken | None

    @property
    def allowed(self) -> bool:
        return self.decision is not None and self.decision.allowed


@dataclass(frozen=True, slots=True)
class TokenOutcome:
    """The answer to a TokenReview. ``audiences``: those the API server asked for that
    the token carries; a token that verifies but carries none of them does not
    authenticate."""

    identity: VerifiedIdentity | None
    refusal: InvalidToken | None
    audiences: tuple[str, ...]
    authenticated: bool


@dataclass(frozen=True, slots=True)
class AccessOutcome:
    """The answer to a SubjectAccessReview: the engine's decision about a registered
    identity, or None (no opinion: not a registered trustmesh identity)."""

    decision: Decision | None
    policy_revision: int


def registered_claims(engine: Engine, username: str) -> Mapping[str, Any] | None:
    """The claims the policy evaluates for a SubjectAccessReview's user: those of the
    registered identity whose SPIFFE ID is the username, from the bundle's inventory
    (what the compiler derived from the Workload entry), or None for anyone else.

    Only ``spec.user`` is trusted, and only as a key into the inventory. ``spec.groups``
    and ``spec.extra`` are never read as claims: the API server fills them from
    whatever authenticated the request, and a user allowed to impersonate can set them
    freely (``Impersonate-Group``, ``Impersonate-Extra-<key>`` headers) — taking
    ``project`` or ``environment`` from ``extra`` would let such a caller pick the
    claims its policy is evaluated with. The username alone is as strong as a native
    RBAC ``User`` subject; impersonating a user needs ``impersonate`` on that very
    user name."""
    entry = engine.identity(username) if username else None
    if entry is None:
        return None
    claims = entry.get("claims")
    return claims if isinstance(claims, Mapping) else {}


def token_audiences(identity: VerifiedIdentity) -> list[str]:
    carried = identity.claims.get("aud")
    return [carried] if isinstance(carried, str) else list(carried or ())


class Decider:
    """The pipeline above, over the agent's state. Every dependency is given here, none
    is optional and none is set after construction."""

    def __init__(
        self,
        *,
        authn: Authenticator,
        certificates: CertificateAuthenticator,
        refresh_keys: RefreshKeys,
        revocations: RevocationHolder,
        policy: PolicyHolder,
        audit: DecisionAudit,
        metrics: AgentMetrics,
        tracing: Tracing,
        clock: Clock,
    ) -> None:
        self.authn = authn
        self.certificates = certificates
        self.refresh_keys = refresh_keys
        self.revocations = revocations
        self.policy = policy
        self.audit = audit
        self.metrics = metrics
        self.tracing = tracing
        self.clock = clock

    def span(self, surface: str, traceparent: str | None) -> AbstractContextManager[Span]:
        """The ``authz.decision`` span of one question, continuing the caller's trace."""
        return self.tracing.span(SPAN_NAME, traceparent, _SPAN_ATTRIBUTES[surface])

    def _engine(self) -> Engine:
        engine = self.policy.engine
        if engine is None:
            raise NotReady(NO_BUNDLE)
        return engine

    async def _verify(self, token: str, now: float) -> VerifiedIdentity:
        """Step 1 for a TokenReview: a JWT-SVID, or a person's login token for this
        cluster (its header's type chooses the verifier); InvalidToken: the token did
        not authenticate."""
        authenticate = (
            self.authn.authenticate_person if is_login_token(token) else self.authn.authenticate
        )
        try:
            return authenticate(token, now)
        except InvalidToken as exc:
            if exc.reason != "unknown_kid" or not await self.refresh_keys():
                raise
            return authenticate(token, now)  # with the refreshed key set

    def _refused(
        self,
        span: Span,
        asked: Mapping[str, Any],
        token: Credential,
        exc: InvalidToken,
        revision: int | None,
        verified: bool,
    ) -> None:
        """A refusal in step 1 (the token did not authenticate: may be folded) or step
        2 (``verified``: a verified token revoked or refused by a stale list)."""
        self.metrics.authentications.labels(exc.reason).inc()
        span.set("trustmesh.allowed", False)
        self.audit.unauthenticated(
            span, asked, token, exc.reason, revision, exc.description, verified=verified
        )

    def decide_now(
        self,
        credential: Credential,
        request: Request,
        surface: str,
        span: Span,
        source: str | None = None,
    ) -> Outcome | None:
        """:meth:`decide` without awaiting anything, or None (nothing done, nothing
        recorded) when the token names a key the agent does not know: then call
        :meth:`decide`, which refreshes the key set once and decides."""
        started = time.perf_counter()
        now = self.clock()
        outcome = self._decide(credential, request, surface, span, now, source, refreshed=False)
        if outcome is not None:
            self.metrics.decision_seconds[surface].observe(time.perf_counter() - started)
        return outcome

    async def decide(
        self,
        credential: Credential,
        request: Request,
        surface: str,
        span: Span,
        source: str | None = None,
    ) -> Outcome:
        """A bearer token or a forwarded client certificate (None: the caller presented
        neither) and what it asks for -> the outcome. ``source``: the caller's address,
        canonical (``common/addresses.py``), recorded as ``request.source``; None for
        none known. Raises NotReady before the first verified bundle."""
        started = time.perf_counter()
        now = self.clock()
        outcome = self._decide(credential, request, surface, span, now, source, refreshed=False)
        if outcome is None:  # an unknown kid: one key-set refresh (rate-limited), one retry
            await self.refresh_keys()
            outcome = self._decide(credential, request, surface, span, now, source, refreshed=True)
            assert outcome is not None
        self.metrics.decision_seconds[surface].observe(time.perf_counter() - started)
        return outcome

    def _decide(
        self,
        credential: Credential,
        request: Request,
        surface: str,
        span: Span,
        now: float,
        source: str | None,
        *,
        refreshed: bool,
    ) -> Outcome | None:
        """Steps 1-5 on the clock reading ``now``. None: step 1 met an unknown kid and
        the key set was not ``refreshed`` yet (nothing recorded)."""
        engine = self._engine()
        request = engine.resolve(request)  # as the cluster reads it, also in the audit event
        asked = {"surface": surface, **request.to_json()}
        if source is not None:
            asked["source"] = source
        identity: VerifiedIdentity | None = None
        proof: str | VerifiedSvid
        try:
            if credential is None:
                raise InvalidToken("missing_token", "no Authorization: Bearer token")
            if isinstance(credential, str):
                try:
                    identity = self.authn.authenticate(credential, now)
                except InvalidToken as exc:
                    if exc.reason == "unknown_kid" and not refreshed:
                        return None
                    raise
                proof = credential
            else:
                verified = self.certificates.authenticate(credential, now)
                identity = verified.identity_under(engine)
                proof = verified.svid
            self.revocations.check(identity, now)
        except InvalidToken as exc:
            self._refused(span, asked, credential, exc, engine.revision, identity is not None)
            return Outcome(None, None, exc)
        self.metrics.authenticated.inc()
        decision = engine.decide(identity.spiffe_id, identity.claims, request)
        span.set("trustmesh.allowed", decision.allowed)
        span.set("trustmesh.decision_id", decision.decision_id)
        self.audit.decided(span, asked, identity, proof, decision)
        (self.metrics.allowed if decision.allowed else self.metrics.denied).inc()
        return Outcome(identity, decision, None)

    async def review_token(
        self, token: str, audiences: tuple[str, ...], span: Span
    ) -> TokenOutcome:
        """A TokenReview: does the token authenticate, for one of ``audiences`` when
        the API server names any? Raises NotReady while the agent has no keys."""
        started = time.perf_counter()
        engine = self.policy.engine
        revision = engine.revision if engine is not None else None
        asked = {"surface": TOKEN_REVIEW, "audiences": list(audiences) or None}
        identity: VerifiedIdentity | None = None
        try:
            now = self.clock()
            identity = await self._verify(token, now)
            self.revocations.check(identity, now)
        except InvalidToken as exc:
            if exc.reason == "not_ready":
                raise NotReady(exc.description) from None
            self._refused(span, asked, token, exc, revision, identity is not None)
            self.metrics.decision_seconds[TOKEN_REVIEW].observe(time.perf_counter() - started)
            return TokenOutcome(None, exc, (), False)
        carried = token_audiences(identity)
        shared = tuple(a for a in audiences if a in carried)
        authenticated = not audiences or bool(shared)
        span.set("trustmesh.allowed", authenticated)
        self.audit.token_reviewed(span, asked, identity, token, authenticated, revision)
        self.metrics.authentications.labels("ok" if authenticated else "audience_mismatch").inc()
        self.metrics.decision_seconds[TOKEN_REVIEW].observe(time.perf_counter() - started)
        return TokenOutcome(identity, None, shared, authenticated)

    def review_access(self, user: str, request: Request, span: Span) -> AccessOutcome:
        """A SubjectAccessReview of ``user`` (the API server authenticated it): the
        engine decides for a registered identity, with the claims the registry gives it
        (:func:`registered_claims`), and for a person ``user:NAME`` with the bindings
        naming that person (``Engine.decide_user``; a workload subject never matches a
        person); anyone else gets no opinion. Raises NotReady
        before the first verified bundle."""
        started = time.perf_counter()
        engine = self._engine()
        asked = {"surface": ACCESS_REVIEW, "user": user or None, **request.to_json()}
        person = person_of(user)
        if person is not None:  # user:NAME: the bindings naming that person only
            verdict = engine.decide_user(person, request)
            (self.metrics.allowed if verdict.allowed else self.metrics.denied).inc()
            span.set("trustmesh.decision_id", verdict.decision_id)
            span.set("trustmesh.allowed", verdict.allowed)
            self.audit.person_reviewed(span, asked, user, verdict)
            self.metrics.decision_seconds[ACCESS_REVIEW].observe(time.perf_counter() - started)
            return AccessOutcome(verdict, engine.revision)
        claims = registered_claims(engine, user)
        decision = None
        if claims is not None:
            decision = engine.decide(user, claims, request)
            (self.metrics.allowed if decision.allowed else self.metrics.denied).inc()
            span.set("trustmesh.decision_id", decision.decision_id)
        span.set("trustmesh.allowed", decision is not None and decision.allowed)
        self.audit.access_reviewed(span, asked, engine, user, claims, decision)
        self.metrics.decision_seconds[ACCESS_REVIEW].observe(time.perf_counter() - started)
        return AccessOutcome(decision, engine.revision)
