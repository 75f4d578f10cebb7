"""Federation with other trust domains (DESIGN §9, ``docs/federation.md``):
``GET /v1/federation/bundles`` — public, as the bundles themselves are: what agents and
sidecars trust for each federated trust domain — and ``GET /v1/trustdomains`` (the
admin credential): the FederatedTrustDomains with the state of their bundles."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.routes._auth import Callers

# Short: a bundle dropped at maxStale must stop being served soon after.
PUBLIC_CACHE = {"Cache-Control": "public, max-age=5"}


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    async def bundles(request: Request) -> Response:
        return JSONResponse(plane.federation.published(plane.clock()), headers=PUBLIC_CACHE)

    async def trust_domains(request: Request) -> Response:
        await callers.read(request)
        items = await run_in_threadpool(plane.federation.status)
        return JSONResponse({"kind": "FederatedTrustDomainList", "items": items})

    return [
        Route("/v1/federation/bundles", bundles, methods=["GET"]),
        Route("/v1/trustdomains", trust_domains, methods=["GET"]),
    ]
