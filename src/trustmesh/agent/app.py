"""The agent's HTTP surface (DESIGN §4): the JSON authorize API, Envoy ext_authz and
the Kubernetes webhooks share one path — authenticate the token (identity), then ask
the engine (decision). Nothing else crosses between the two.

Every answer to an authorization question is an ``authz.decision`` audit event, spooled
before the answer is sent (agent/audit.py), inside an ``authz.decision`` span whose
trace continues the caller's ``traceparent``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.agent import envoy, kubernetes
from trustmesh.agent.audit import (
    ACCESS_REVIEW,
    AUTHORIZE,
    EXT_AUTHZ,
    TOKEN_REVIEW,
    AuditShipper,
    AuditUnavailable,
    DecisionAudit,
)
from trustmesh.agent.authn import Authenticator
from trustmesh.agent.policy import PolicyHolder
from trustmesh.agent.sync import Synchronizer
from trustmesh.common.tracing import Span, Tracing
from trustmesh.identity.svid import InvalidToken, VerifiedIdentity
from trustmesh.policy.engine import Decision
from trustmesh.policy.request import RequestError, parse_request
from trustmesh.server.http import (
    EXCEPTION_HANDLERS,
    BadRequest,
    bearer_token,
    error_response,
    read_json,
)

MAX_AUTHORIZE_BODY = 64 * 1024
SPAN_NAME = "authz.decision"
# span attributes, read only when spans are exported
_SPAN_ATTRIBUTES = {
    surface: {"trustmesh.surface": surface}
    for surface in (AUTHORIZE, EXT_AUTHZ, TOKEN_REVIEW, ACCESS_REVIEW)
}


def identity_json(identity: VerifiedIdentity) -> dict[str, Any]:
    claims = identity.claims
    return {
        "spiffe_id": identity.spiffe_id,
        "workload_id": claims.get("workload_id"),
        "cluster": claims.get("cluster"),
        "namespace": claims.get("namespace"),
        "service_account": claims.get("service_account"),
        "jti": identity.jti,
        "kid": identity.kid,
        "expires_at": identity.expires_at,
        "claims": claims,
    }


class AuditCollector(Collector):
    """The spool's figures, read at scrape time: the hot path only bumps plain ints."""

    def __init__(self, shipper: AuditShipper) -> None:
        self.shipper = shipper

    def collect(self) -> Any:
        spool = self.shipper.spool
        yield CounterMetricFamily(
            "trustmesh_agent_audit_spooled",
            "Decision events written to the audit spool by this process",
            value=spool.appended,
        )
        yield CounterMetricFamily(
            "trustmesh_agent_audit_shipped",
            "Audit events the control plane acknowledged (duplicates of a resend included)",
            value=self.shipper.shipped,
        )
        yield CounterMetricFamily(
            "trustmesh_agent_audit_ship_failures",
            "Audit batches the control plane did not take (unreachable, 5xx, refused)",
            value=self.shipper.failures,
        )
        yield GaugeMetricFamily(
            "trustmesh_agent_audit_spool_backlog",
            "Audit events spooled but not yet acknowledged by the control plane",
            value=spool.backlog,
        )
        yield GaugeMetricFamily(
            "trustmesh_agent_audit_spool_segments",
            "Segment files in the audit spool",
            value=len(spool.segments()),
        )


class AgentMetrics:
    def __init__(
        self, authn: Authenticator, sync: Synchronizer, shipper: AuditShipper | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        if shipper is not None:
            self.registry.register(AuditCollector(shipper))
        self.audit_unavailable = Counter(
            "trustmesh_agent_audit_unavailable",
            "Questions answered 503 because their decision could not be spooled",
            registry=self.registry,
        )
        self.authentications = Counter(
            "trustmesh_agent_authentications_total",
            "Token authentications by result",
            ["result"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "trustmesh_agent_decisions_total",
            "Authorization decisions by outcome",
            ["outcome"],
            registry=self.registry,
        )
        Gauge(
            "trustmesh_agent_cache_entries", "Verified-token cache entries", registry=self.registry
        ).set_function(lambda: len(authn.cache))
        Gauge(
            "trustmesh_agent_revocation_age_seconds",
            "Seconds since the revocation list was last confirmed with the control plane",
            registry=self.registry,
        ).set_function(lambda: authn.revocations.age() if authn.revocations else float("inf"))
        Gauge(
            "trustmesh_agent_revocation_stale",
            "1 when the revocation list is older than its staleness bound",
            registry=self.registry,
        ).set_function(lambda: 1.0 if authn.revocations and authn.revocations.stale() else 0.0)
        Gauge(
            "trustmesh_agent_revocation_fail_open",
            "1 when the agent keeps answering from a stale revocation list",
            registry=self.registry,
        ).set_function(lambda: 1.0 if authn.revocations and authn.revocations.fail_open else 0.0)
        Gauge(
            "trustmesh_agent_state_age_seconds",
            "Seconds since the last successful sync with the control plane",
            registry=self.registry,
        ).set_function(
            lambda: time.monotonic() - sync.last_success if sync.last_success else float("inf")
        )


def build_agent_app(
    authn: Authenticator,
    sync: Synchronizer,
    policy: PolicyHolder,
    on_start: Callable[[], Any],
    on_stop: Callable[[], Any],
    *,
    audit: DecisionAudit | None = None,
    shipper: AuditShipper | None = None,
    tracing: Tracing | None = None,
) -> Starlette:
    """The agent's routes. ``audit`` is None only where a test exercises the HTTP
    surface alone; ``trustmesh agent`` always spools its decisions."""
    metrics = AgentMetrics(authn, sync, shipper)
    tracer = tracing if tracing is not None else Tracing("trustmesh-agent")

    def span_for(request: Request, surface: str) -> AbstractContextManager[Span]:
        return tracer.span(SPAN_NAME, request.headers.get("traceparent"), _SPAN_ATTRIBUTES[surface])

    def audit_decision(
        span: Span,
        asked: dict[str, Any],
        identity: VerifiedIdentity,
        token: str | None,
        decision: Decision,
    ) -> None:
        span.set("trustmesh.allowed", decision.allowed)
        span.set("trustmesh.decision_id", decision.decision_id)
        if audit is not None:
            audit.decided(span, asked, identity, token, decision)

    def audit_refusal(
        span: Span, asked: dict[str, Any], token: str | None, reason: str, revision: int | None
    ) -> None:
        span.set("trustmesh.allowed", False)
        if audit is not None:
            audit.unauthenticated(span, asked, token, reason, revision)

    def revision() -> int | None:
        engine = policy.engine
        return engine.revision if engine is not None else None

    async def authenticate(token: str) -> VerifiedIdentity:
        try:
            return authn.authenticate(token)
        except InvalidToken as exc:
            if exc.reason != "unknown_kid" or not await sync.request_refresh():
                raise
        return authn.authenticate(token)  # once more, with the refreshed key set

    def unauthenticated(exc: InvalidToken) -> Response:
        metrics.authentications.labels(exc.reason).inc()
        return JSONResponse(
            {
                "authenticated": False,
                "allowed": False,
                "error": "invalid_token",
                "reason": exc.reason,
                "error_description": exc.description,
            },
            401,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )

    async def authorize(request: Request) -> Response:
        """DESIGN §4: ``{token, request}`` -> the decision (200 whether allowed or
        denied), 401 when the token does not authenticate, 503 before a bundle."""
        document = await read_json(request, MAX_AUTHORIZE_BODY)
        token = document.get("token")
        if not isinstance(token, str) or not token:
            raise BadRequest(400, "invalid_request", "body needs a string field token")
        try:
            attributes = parse_request(document.get("request"))
        except RequestError as exc:
            raise BadRequest(400, "invalid_request", str(exc)) from None
        engine = policy.engine
        if engine is None:
            return error_response(503, "not_ready", "the agent has no verified policy bundle yet")
        with span_for(request, AUTHORIZE) as span:
            asked = {"surface": AUTHORIZE, **attributes.to_json()}
            try:
                identity = await authenticate(token)
            except InvalidToken as exc:
                audit_refusal(span, asked, token, exc.reason, engine.revision)
                return unauthenticated(exc)
            metrics.authentications.labels("ok").inc()
            decision = engine.decide(identity.spiffe_id, identity.claims, attributes)
            audit_decision(span, asked, identity, token, decision)
        metrics.decisions.labels("allow" if decision.allowed else "deny").inc()
        body = decision.to_json()
        body["authenticated"] = True
        body["identity"] = identity_json(identity)
        return JSONResponse(body)

    async def ext_authz(request: Request) -> Response:
        """Envoy HTTP ext_authz check (any method, body ignored): 200 allow, 401 no or
        bad token, 403 denied, 503 before a bundle (agent/envoy.py)."""
        try:
            attributes = envoy.check_request(
                request.method, request.headers.get("host"), request.scope
            )
        except RequestError as exc:
            return envoy.bad_check(str(exc))
        engine = policy.engine
        if engine is None:
            return envoy.not_ready()
        with span_for(request, EXT_AUTHZ) as span:
            asked = {"surface": EXT_AUTHZ, **attributes.to_json()}
            token = bearer_token(request)
            if token is None:
                metrics.authentications.labels("missing_token").inc()
                audit_refusal(span, asked, None, "missing_token", engine.revision)
                return envoy.unauthenticated("missing_token", "no Authorization: Bearer token")
            try:
                identity = await authenticate(token)
            except InvalidToken as exc:
                metrics.authentications.labels(exc.reason).inc()
                audit_refusal(span, asked, token, exc.reason, engine.revision)
                return envoy.unauthenticated(exc.reason, exc.description)
            metrics.authentications.labels("ok").inc()
            decision = engine.decide(identity.spiffe_id, identity.claims, attributes)
            audit_decision(span, asked, identity, token, decision)
        metrics.decisions.labels("allow" if decision.allowed else "deny").inc()
        if decision.allowed:
            return envoy.allowed(identity, decision, span.traceparent())
        return envoy.denied(decision)

    async def token_review(request: Request) -> Response:
        """Kubernetes TokenReview webhook (agent/kubernetes.py): 200 whether or not the
        token authenticates; 503 while the agent has no keys at all."""
        try:
            review = kubernetes.parse_token_review(
                await read_json(request, kubernetes.MAX_REVIEW_BODY)
            )
        except kubernetes.ReviewError as exc:
            raise BadRequest(400, "invalid_request", str(exc)) from None
        with span_for(request, TOKEN_REVIEW) as span:
            asked = {"surface": TOKEN_REVIEW, "audiences": list(review.audiences) or None}
            try:
                identity = await authenticate(review.token)
            except InvalidToken as exc:
                if exc.reason == "not_ready":
                    return error_response(503, "not_ready", exc.description)
                metrics.authentications.labels(exc.reason).inc()
                audit_refusal(span, asked, review.token, exc.reason, revision())
                return JSONResponse(kubernetes.token_unauthenticated(review, exc.description))
            answer = kubernetes.token_authenticated(review, identity)
            authenticated = bool(answer["status"]["authenticated"])
            span.set("trustmesh.allowed", authenticated)
            if audit is not None:
                audit.token_reviewed(span, asked, identity, review.token, authenticated, revision())
        metrics.authentications.labels("ok" if authenticated else "audience_mismatch").inc()
        return JSONResponse(answer)

    async def access_review(request: Request) -> Response:
        """Kubernetes SubjectAccessReview webhook (agent/kubernetes.py): allow, explicit
        deny (``denied: true``) or no opinion; 503 before a bundle."""
        try:
            review = kubernetes.parse_subject_access_review(
                await read_json(request, kubernetes.MAX_REVIEW_BODY)
            )
        except kubernetes.ReviewError as exc:
            raise BadRequest(400, "invalid_request", str(exc)) from None
        engine = policy.engine
        if engine is None:
            return error_response(503, "not_ready", "the agent has no verified policy bundle yet")
        with span_for(request, ACCESS_REVIEW) as span:
            asked = {
                "surface": ACCESS_REVIEW,
                "user": review.username or None,
                **review.request.to_json(),
            }
            claims = kubernetes.registered_claims(engine, review.username)
            decision = None
            if claims is None:
                status = kubernetes.unknown_user_status(engine, review.username)
            else:
                decision = engine.decide(review.username, claims, review.request)
                metrics.decisions.labels("allow" if decision.allowed else "deny").inc()
                status = kubernetes.decision_status(decision)
                span.set("trustmesh.decision_id", decision.decision_id)
            span.set("trustmesh.allowed", bool(status["allowed"]))
            if audit is not None:
                audit.access_reviewed(span, asked, engine, review.username, claims, decision)
        return JSONResponse(kubernetes.access_review_response(review, status))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(request: Request) -> Response:
        state = sync.state
        holder = authn.revocations
        ready = (
            authn.configured
            and policy.engine is not None
            and (holder is None or (holder.synced_at is not None and not holder.enforcing_denial()))
        )
        detail = {
            "ready": ready,
            **policy.status(),
            **(holder.status() if holder is not None else {}),
            "cluster": authn.cluster,
            "keys": len(authn.keys),
            "bundle_sequence": state.sequence if state else None,
            "control_plane": state.server if state else None,
            "last_sync_age_seconds": round(time.monotonic() - sync.last_success, 3)
            if sync.last_success
            else None,
            "last_error": sync.last_error,
        }
        if shipper is not None:
            detail["audit"] = shipper.status()
        return JSONResponse(detail, 200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def audit_unavailable(request: Request, exc: Exception) -> Response:
        metrics.audit_unavailable.inc()
        response = error_response(
            503,
            "audit_unavailable",
            "the decision cannot be written to the audit spool; no answer is given without its audit record",
        )
        response.headers["Retry-After"] = "1"
        return response

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await on_start()
        try:
            yield
        finally:
            await on_stop()

    return Starlette(
        routes=[
            Route("/v1/authorize", authorize, methods=["POST"]),
            # every method: Envoy checks with the client's own
            Route(envoy.PREFIX + "/{path:path}", envoy.AnyMethod(ext_authz)),
            Route("/k8s/authenticate", token_review, methods=["POST"]),
            Route("/k8s/authorize", access_review, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        exception_handlers={**EXCEPTION_HANDLERS, AuditUnavailable: audit_unavailable},
        lifespan=lifespan,
    )
