"""Access requests (DESIGN §11, ``server/access.py``): any person requests, lists and
reads them; a person with the approver role approves or denies. Bodies are strict JSON
(``common/strictjson.py``: a member twice, NaN or unknown members are refused)."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.errors import InvalidRequest
from trustmesh.common.http import NO_STORE, read_body, require_content_type
from trustmesh.common.numbers import require_decimal
from trustmesh.common.strictjson import loads_strict
from trustmesh.server.access import MAX_LISTED
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.credentials import APPROVER
from trustmesh.server.routes._auth import Callers

MAX_ACCESS_BODY = 64 * 1024
REQUEST_MEMBERS = {"role", "subject", "clusters", "namespaces", "duration", "reason"}


async def strict_body(
    request: Request, allowed: set[str], required: set[str] | None = None
) -> dict[str, Any]:
    """The JSON object of the body, strictly; no body is ``{}`` where nothing is required."""
    empty = request.headers.get("content-length", "0") in ("", "0")
    if not required and empty and request.headers.get("content-type") is None:
        return {}
    require_content_type(request, "application/json")
    document = loads_strict(await read_body(request, MAX_ACCESS_BODY))
    if not isinstance(document, dict):
        raise InvalidRequest("request body must be a JSON object")
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise InvalidRequest(
            f"unknown member {unknown[0][:64]!r} (known: {', '.join(sorted(allowed))})"
        )
    missing = sorted((required or set()) - set(document))
    if missing:
        raise InvalidRequest(f"missing required member {missing[0]}")
    return document


def page_limit(raw: str | None) -> int:
    """A list's ``limit`` query parameter: 1 to 1000, 1000 when absent."""
    if raw is None or raw == "":
        return MAX_LISTED
    limit = require_decimal(raw, "limit")
    if not 1 <= limit <= MAX_LISTED:
        raise InvalidRequest(f"limit must be 1 to {MAX_LISTED}, not {limit}")
    return limit


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    access = plane.access

    def render(found: Any, status: int = 200) -> Response:
        return JSONResponse(found.to_json(plane.clock()), status_code=status, headers=NO_STORE)

    async def create(request: Request) -> Response:
        """``{"role", "subject": {KIND: VALUE}, "clusters", "namespaces"?, "duration"
        (seconds), "reason"}`` -> the pending request (201)."""
        principal = await callers.read(request)
        body = await strict_body(
            request, REQUEST_MEMBERS, {"role", "subject", "clusters", "duration", "reason"}
        )
        found = await run_in_threadpool(
            access.request,
            principal,
            body["role"],
            body["subject"],
            body["clusters"],
            body.get("namespaces"),
            body["duration"],
            body["reason"],
        )
        return render(found, 201)

    async def listing(request: Request) -> Response:
        """``?state=&limit=&after=`` -> ``{"items", "next"}``: a page, newest first."""
        await callers.read(request)
        params = request.query_params
        unknown = sorted(set(params) - {"state", "limit", "after"})
        if unknown:
            raise InvalidRequest(f"unknown query parameter {unknown[0][:64]!r}")
        found, after = await run_in_threadpool(
            access.listing,
            params.get("state") or None,
            page_limit(params.get("limit")),
            params.get("after") or None,
        )
        now = plane.clock()
        return JSONResponse(
            {"items": [r.to_json(now) for r in found], "next": after}, headers=NO_STORE
        )

    async def show(request: Request) -> Response:
        await callers.read(request)
        return render(await run_in_threadpool(access.get, request.path_params["id"]))

    async def approve(request: Request) -> Response:
        """``{"reason"?}`` -> the approved request (its binding published)."""
        principal = await callers.require(request, APPROVER)
        body = await strict_body(request, {"reason"})
        found = await run_in_threadpool(
            access.approve, principal, request.path_params["id"], body.get("reason")
        )
        return render(found)

    async def deny(request: Request) -> Response:
        """``{"reason"}`` -> the denied request."""
        principal = await callers.require(request, APPROVER)
        body = await strict_body(request, {"reason"}, {"reason"})
        found = await run_in_threadpool(
            access.deny, principal, request.path_params["id"], body["reason"]
        )
        return render(found)

    return [
        Route("/v1/access", create, methods=["POST"]),
        Route("/v1/access", listing, methods=["GET"]),
        Route("/v1/access/{id}", show, methods=["GET"]),
        Route("/v1/access/{id}/approve", approve, methods=["POST"]),
        Route("/v1/access/{id}/deny", deny, methods=["POST"]),
    ]
