"""The agent's HTTP surface (DESIGN §4): the JSON authorize API, Envoy ext_authz and
the Kubernetes webhooks share one path — authenticate the token (identity), then ask
the engine (decision). Nothing else crosses between the two."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.agent import envoy, kubernetes
from trustmesh.agent.authn import Authenticator
from trustmesh.agent.policy import PolicyHolder
from trustmesh.agent.sync import Synchronizer
from trustmesh.identity.svid import InvalidToken, VerifiedIdentity
from trustmesh.policy.request import RequestError, parse_request
from trustmesh.server.http import (
    EXCEPTION_HANDLERS,
    BadRequest,
    bearer_token,
    error_response,
    read_json,
)

MAX_AUTHORIZE_BODY = 64 * 1024


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


class AgentMetrics:
    def __init__(self, authn: Authenticator, sync: Synchronizer) -> None:
        self.registry = CollectorRegistry()
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
) -> Starlette:
    metrics = AgentMetrics(authn, sync)

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
        try:
            identity = await authenticate(token)
        except InvalidToken as exc:
            return unauthenticated(exc)
        metrics.authentications.labels("ok").inc()
        decision = engine.decide(identity.spiffe_id, identity.claims, attributes)
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
        token = bearer_token(request)
        if token is None:
            metrics.authentications.labels("missing_token").inc()
            return envoy.unauthenticated("missing_token", "no Authorization: Bearer token")
        try:
            identity = await authenticate(token)
        except InvalidToken as exc:
            metrics.authentications.labels(exc.reason).inc()
            return envoy.unauthenticated(exc.reason, exc.description)
        metrics.authentications.labels("ok").inc()
        decision = engine.decide(identity.spiffe_id, identity.claims, attributes)
        metrics.decisions.labels("allow" if decision.allowed else "deny").inc()
        if decision.allowed:
            return envoy.allowed(identity, decision)
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
        try:
            identity = await authenticate(review.token)
        except InvalidToken as exc:
            if exc.reason == "not_ready":
                return error_response(503, "not_ready", exc.description)
            metrics.authentications.labels(exc.reason).inc()
            return JSONResponse(kubernetes.token_unauthenticated(review, exc.description))
        answer = kubernetes.token_authenticated(review, identity)
        metrics.authentications.labels(
            "ok" if answer["status"]["authenticated"] else "audience_mismatch"
        ).inc()
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
        claims = kubernetes.registered_claims(engine, review.username)
        if claims is None:
            status = kubernetes.unknown_user_status(engine, review.username)
        else:
            decision = engine.decide(review.username, claims, review.request)
            metrics.decisions.labels("allow" if decision.allowed else "deny").inc()
            status = kubernetes.decision_status(decision)
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
        return JSONResponse(detail, 200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
