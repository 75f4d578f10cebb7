"""Anomalies (DESIGN §11, ``server/analytics.py``): any person lists and reads them; a
person with the admin or approver role acknowledges or resolves one (``{"note"?}``);
auditors read only."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.errors import InvalidRequest
from trustmesh.common.http import NO_STORE
from trustmesh.server.analytics import Anomaly
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.credentials import ADMIN, APPROVER
from trustmesh.server.routes._auth import Callers
from trustmesh.server.routes.access import page_limit, strict_body


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    anomalies = plane.anomalies

    def render(found: Anomaly) -> Response:
        return JSONResponse(found.to_json(), headers=NO_STORE)

    async def listing(request: Request) -> Response:
        """``?state=&detector=&limit=&after=`` -> ``{"items", "next", "analyzedThrough"}``:
        a page, newest first, and how far the detectors have read."""
        await callers.read(request)
        params = request.query_params
        unknown = sorted(set(params) - {"state", "detector", "limit", "after"})
        if unknown:
            raise InvalidRequest(f"unknown query parameter {unknown[0][:64]!r}")
        found, after = await run_in_threadpool(
            anomalies.listing,
            params.get("state") or None,
            params.get("detector") or None,
            page_limit(params.get("limit")),
            params.get("after") or None,
        )
        through = await run_in_threadpool(anomalies.analyzed_through)
        return JSONResponse(
            {"items": [a.to_json() for a in found], "next": after, "analyzedThrough": through},
            headers=NO_STORE,
        )

    async def show(request: Request) -> Response:
        await callers.read(request)
        return render(await run_in_threadpool(anomalies.get, request.path_params["id"]))

    async def acknowledge(request: Request) -> Response:
        principal = await callers.require(request, ADMIN, APPROVER)
        body = await strict_body(request, {"note"})
        found = await run_in_threadpool(
            anomalies.acknowledge, request.path_params["id"], principal.name, body.get("note")
        )
        return render(found)

    async def resolve(request: Request) -> Response:
        principal = await callers.require(request, ADMIN, APPROVER)
        body = await strict_body(request, {"note"})
        found = await run_in_threadpool(
            anomalies.resolve, request.path_params["id"], principal.name, body.get("note")
        )
        return render(found)

    return [
        Route("/v1/anomalies", listing, methods=["GET"]),
        Route("/v1/anomalies/{id}", show, methods=["GET"]),
        Route("/v1/anomalies/{id}/acknowledge", acknowledge, methods=["POST"]),
        Route("/v1/anomalies/{id}/resolve", resolve, methods=["POST"]),
    ]
