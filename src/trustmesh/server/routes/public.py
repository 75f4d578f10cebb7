"""Public documents (OIDC discovery, JWKS, the SPIFFE bundle) and health. ``/readyz``
tells anyone whether the replica is ready and why not (``?check=issue``: ready to
issue, ``server/health.py``); its detail needs the admin credential."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.errors import InvalidRequest
from trustmesh.common.http import bearer_token
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.discovery import discovery, spiffe_bundle
from trustmesh.server.health import parse_check
from trustmesh.server.routes._auth import Callers

PUBLIC_CACHE = {"Cache-Control": "public, max-age=60"}


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    snapshots = plane.snapshots

    async def openid_configuration(request: Request) -> Response:
        document = discovery(plane.issuer, plane.trust_domain, snapshots.keyset)
        return JSONResponse(document, headers=PUBLIC_CACHE)

    async def jwks(request: Request) -> Response:
        return JSONResponse(snapshots.keyset.jwks(), headers=PUBLIC_CACHE)

    async def bundle(request: Request) -> Response:
        return JSONResponse(spiffe_bundle(snapshots.keyset, snapshots.ca), headers=PUBLIC_CACHE)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(request: Request) -> Response:
        """Ready or not, and why, for anyone; the revisions and the log's size only for
        the admin credential (a request that sends another is refused)."""
        try:
            check = parse_check(request.query_params.get("check"))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        detail = bearer_token(request) is not None
        if detail:
            await callers.read(request)
        ready, body = plane.ready(detail, check)
        return JSONResponse(body, 200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(plane.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
        Route("/.well-known/spiffe-bundle", bundle, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
