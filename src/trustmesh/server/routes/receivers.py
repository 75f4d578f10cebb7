"""Push delivery state (``server/push.py``, docs/ssf.md "Push delivery"), read with a
reading credential: ``GET /v1/receivers`` — the EventReceivers with their delivered,
pending and failed counts and last error — and ``GET /v1/deliveries[?receiver=&state=
&limit=]`` — the outbox rows, newest first."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.errors import InvalidRequest
from trustmesh.common.numbers import require_decimal
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.routes._auth import Callers

DELIVERY_QUERY = ("receiver", "state", "limit")


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    async def receivers(request: Request) -> Response:
        await callers.read(request)
        items = await run_in_threadpool(plane.push.status)
        return JSONResponse({"kind": "EventReceiverList", "items": items})

    async def deliveries(request: Request) -> Response:
        await callers.read(request)
        params = request.query_params
        unknown = sorted(set(params) - set(DELIVERY_QUERY))
        if unknown:
            raise InvalidRequest(f"unknown query parameter {unknown[0][:64]!r}")
        limit = require_decimal(params["limit"], "limit") if params.get("limit") else 100
        items = await run_in_threadpool(
            plane.push.deliveries,
            params.get("receiver") or None,
            params.get("state") or None,
            limit,
        )
        return JSONResponse({"kind": "DeliveryList", "items": items})

    return [
        Route("/v1/receivers", receivers, methods=["GET"]),
        Route("/v1/deliveries", deliveries, methods=["GET"]),
    ]
