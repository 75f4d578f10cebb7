"""The X.509 surfaces of the control plane (DESIGN §9): ``POST /v1/x509-svid`` (no
credential: the SA token in the body is the proof), ``GET /v1/bundle.pem`` (public),
the CA's status and rotation for the admin (``GET /v1/ca``, ``POST /v1/ca/rotate``),
and the roots an agent holds (``POST /v1/agent/roots``, its cluster credential)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.errors import Forbidden, InvalidRequest
from trustmesh.common.http import read_body, read_json, require_content_type
from trustmesh.identity.x509ca import parse_fingerprints
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.roots import AGENT, AGENT_FORGET_AFTER
from trustmesh.server.routes._auth import Callers
from trustmesh.server.x509svids import MAX_BODY

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
PUBLIC_CACHE = {"Cache-Control": "public, max-age=60"}
MAX_REPORT_BODY = 8 * 1024


async def _svid_body(request: Request) -> bytes:
    require_content_type(request, "application/json")
    return await read_body(request, MAX_BODY)


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    async def x509_svid(request: Request) -> Response:
        """Every outcome is audited; the certificate leaves only once its
        ``svid.issued`` event is stored (``server/x509svids.py``)."""
        answer, traceparent = await plane.x509.issue(
            _svid_body(request),
            request.headers.get("traceparent"),
            request.client.host if request.client else None,
        )
        return JSONResponse(answer, headers={**NO_STORE, "traceparent": traceparent})

    async def bundle_pem(request: Request) -> Response:
        return Response(
            plane.snapshots.ca.bundle_pem,
            media_type="application/x-pem-file",
            headers=PUBLIC_CACHE,
        )

    async def ca_status(request: Request) -> Response:
        await callers.read(request)
        return JSONResponse(await run_in_threadpool(plane.ca_rotation.status))

    async def ca_rotate(request: Request) -> Response:
        principal = await callers.admin(request)
        document = await read_json(request, MAX_REPORT_BODY)
        force = document.get("force", False)
        if not isinstance(force, bool):
            raise InvalidRequest("force must be true or false")
        record = await run_in_threadpool(plane.ca_rotation.rotate, principal.name, force)
        plane.snapshots.notify_changes()
        status = await run_in_threadpool(plane.ca_rotation.status)
        return JSONResponse({"active": record.to_json(), **status})

    async def agent_roots(request: Request) -> Response:
        """An agent reports the roots it holds: the evidence ``keys rotate --ca``
        waits for. Only an agent's own cluster credential reports, as that agent."""
        principal = await callers.principal(request)
        if principal.cluster is None or principal.agent is None:
            raise Forbidden("only an agent's cluster credential reports the roots it holds")
        document = await read_json(request, MAX_REPORT_BODY)
        roots = parse_fingerprints(document.get("roots"), "roots")
        await run_in_threadpool(
            plane.root_holders.report,
            AGENT,
            principal.cluster,
            principal.agent,
            roots,
            AGENT_FORGET_AFTER,
        )
        return JSONResponse({"recorded": len(roots)})

    return [
        Route("/v1/x509-svid", x509_svid, methods=["POST"]),
        Route("/v1/bundle.pem", bundle_pem, methods=["GET"]),
        Route("/v1/ca", ca_status, methods=["GET"]),
        Route("/v1/ca/rotate", ca_rotate, methods=["POST"]),
        Route("/v1/agent/roots", agent_roots, methods=["POST"]),
    ]
