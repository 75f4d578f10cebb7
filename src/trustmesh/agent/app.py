"""The agent's HTTP surfaces (DESIGN §4, §9): the JSON authorize API and Envoy ext_authz
(plain ASGI in ``agent/hot.py``, in front of this app), the Kubernetes webhooks
(TokenReview, SubjectAccessReview, admission), plus health, readiness and metrics
(Starlette, here).

Each handler parses its format, opens the decision's span (continuing the caller's
``traceparent``), calls the one pipeline (:class:`~trustmesh.agent.decide.Decider`) and
renders its outcome. Errors — a malformed body, no bundle yet, an unwritable audit
spool — are raised as :mod:`trustmesh.common.errors` and answered by the one exception
handler (``common/http.py``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.agent import kubernetes
from trustmesh.agent.admission import MAX_ADMISSION_BODY, MUTATE_PATH, VALIDATE_PATH, Admission
from trustmesh.agent.audit import AuditShipper
from trustmesh.agent.decide import ACCESS_REVIEW, TOKEN_REVIEW, Decider
from trustmesh.agent.envoy import ExtAuthzOptions
from trustmesh.agent.hot import HotSurfaces
from trustmesh.agent.keys import KeySync
from trustmesh.agent.metrics import ADMISSION
from trustmesh.agent.workers import WorkerStatus
from trustmesh.common.http import EXCEPTION_HANDLERS, read_body, read_json, require_content_type


def readiness(
    decider: Decider, keys: KeySync, shipper: AuditShipper
) -> tuple[bool, dict[str, Any]]:
    """``/readyz`` of one agent process: ready only with keys, a verified bundle and a
    fresh revocation list.

    ``/readyz`` is unauthenticated, so it says what an orchestrator needs and no
    more: ready or not and why (``reasons``), the revisions and staleness in force,
    the audit backlog, and which syncs last failed (``failing``, fixed words). No
    internal id (spool, agent instance, credential), no control-plane address and
    no error text: those are in the agent's log and metrics."""
    revocations, policy = decider.revocations, decider.policy
    reasons = []
    if not decider.authn.configured:
        reasons.append("no key set from the control plane yet")
    if policy.engine is None:
        reasons.append("no verified policy bundle yet")
    if revocations.synced_at is None:
        reasons.append("no revocation list yet")
    elif revocations.enforcing_denial():
        reasons.append("the revocation list is older than its bound (strict mode denies)")
    failing = [
        name
        for name, error in (
            ("keys", keys.last_error),
            ("policy", policy.last_error),
            ("revocations", revocations.last_error),
            ("audit", shipper.last_error),
        )
        if error is not None
    ]
    ready = not reasons
    age = keys.age()
    revocation = revocations.status()
    shipping = shipper.status()
    return ready, {
        "ready": ready,
        "reasons": reasons,
        "failing": failing,
        "cluster": decider.authn.cluster,
        **{k: v for k, v in policy.status().items() if k != "bundle_error"},
        **{k: v for k, v in revocation.items() if k != "revocation_error"},
        "keys": len(decider.authn.keys),
        "last_sync_age_seconds": round(age, 3) if age is not None else None,
        "audit": {
            "backlog": shipping["backlog"],
            "last_ship_age_seconds": shipping["last_ship_age_seconds"],
        },
    }


@dataclass
class AgentApp:
    """What the routes need: the pipeline, and the state ``/readyz`` reports on."""

    decider: Decider
    keys: KeySync
    shipper: AuditShipper
    workers: WorkerStatus | None = None  # a worker answers for all of them
    ext_authz: ExtAuthzOptions = field(default_factory=ExtAuthzOptions)
    admission: Admission | None = None

    # -- questions (the two decision surfaces are in agent/hot.py) -------------------
    async def token_review(self, request: Request) -> Response:
        """Kubernetes TokenReview webhook: 200 whether or not the token authenticates;
        503 while the agent has no keys at all."""
        body = await read_json(request, kubernetes.MAX_REVIEW_BODY)
        review = kubernetes.parse_token_review(body)
        with self.decider.span(TOKEN_REVIEW, request.headers.get("traceparent")) as span:
            outcome = await self.decider.review_token(review.token, review.audiences, span)
        return JSONResponse(kubernetes.token_review_response(review, outcome))

    async def access_review(self, request: Request) -> Response:
        """Kubernetes SubjectAccessReview webhook: allow, explicit deny (``denied:
        true``) or no opinion; 503 before a bundle."""
        body = await read_json(request, kubernetes.MAX_REVIEW_BODY)
        review = kubernetes.parse_subject_access_review(body)
        with self.decider.span(ACCESS_REVIEW, request.headers.get("traceparent")) as span:
            outcome = self.decider.review_access(review.username, review.request, span)
        return JSONResponse(kubernetes.access_review_response(review, outcome))

    async def admission_mutate(self, request: Request) -> Response:
        return await self._admission_review(request, "mutate")

    async def admission_validate(self, request: Request) -> Response:
        return await self._admission_review(request, "validate")

    async def _admission_review(self, request: Request, webhook: str) -> Response:
        """Kubernetes AdmissionReview (``agent/admission.py``): 200 with the review's
        answer, 400/413 for a body that is not one, 503 when it cannot be audited."""
        assert self.admission is not None
        require_content_type(request, "application/json")
        async with self.admission.slot():
            body = await read_body(request, MAX_ADMISSION_BODY)
            started = time.perf_counter()
            answer = self.admission.review(webhook, body, request.headers.get("traceparent"))
            self.decider.metrics.decision_seconds[ADMISSION].observe(time.perf_counter() - started)
        return JSONResponse(answer)

    # -- operations --------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """This process's readiness (:func:`readiness`)."""
        return readiness(self.decider, self.keys, self.shipper)

    async def readyz(self, request: Request) -> Response:
        if self.workers is None:
            ready, detail = self.readiness()
        else:
            ready, detail = await run_in_threadpool(self.workers.merged_readiness)
        return JSONResponse(detail, 200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        if self.workers is None:
            body = generate_latest(self.decider.metrics.registry)
        else:
            body = await run_in_threadpool(self.workers.merged_metrics)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def build_agent_app(
    agent: AgentApp,
    on_start: Callable[[], Awaitable[Any]],
    on_stop: Callable[[], Awaitable[Any]],
) -> HotSurfaces:
    """The agent's ASGI app: the decision surfaces (``agent/hot.py``) in front of the
    Starlette app of the rest, which also runs the lifespan."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await on_start()
        try:
            yield
        finally:
            await on_stop()

    app = Starlette(
        routes=[
            Route("/k8s/authenticate", agent.token_review, methods=["POST"]),
            Route("/k8s/authorize", agent.access_review, methods=["POST"]),
            Route(MUTATE_PATH, agent.admission_mutate, methods=["POST"]),
            Route(VALIDATE_PATH, agent.admission_validate, methods=["POST"]),
            Route("/healthz", agent.healthz, methods=["GET"]),
            Route("/readyz", agent.readyz, methods=["GET"]),
            Route("/metrics", agent.metrics, methods=["GET"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    # Envoy hands a non-200 check answer to the client: a redirect would send it to a
    # Location of the agent's making. An unknown path is a 404, never a redirect.
    app.router.redirect_slashes = False
    return HotSurfaces(agent.decider, app, agent.ext_authz)
