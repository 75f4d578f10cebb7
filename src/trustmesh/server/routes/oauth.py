"""The OAuth endpoints: RFC 8693 token exchange and RFC 7662 introspection."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.http import MAX_FORM_BODY, read_body, require_content_type
from trustmesh.oauth.rfc7662 import introspect
from trustmesh.oauth.rfc8693 import parse_form
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.routes._auth import Callers

FORM = "application/x-www-form-urlencoded"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1


async def read_form_body(request: Request) -> bytes:
    require_content_type(request, FORM)
    return await read_body(request, MAX_FORM_BODY)


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    async def token(request: Request) -> Response:
        """RFC 8693 exchange; every outcome is audited, and a token is returned only once
        its ``token.issued`` event is stored (``server/issuance.py``)."""
        issued = await plane.issuance.issue(
            read_form_body(request),
            request.headers.get("traceparent"),
            request.client.host if request.client else None,
        )
        return JSONResponse(
            issued.response, headers={**NO_STORE, "traceparent": issued.traceparent}
        )

    async def introspection(request: Request) -> Response:
        """RFC 7662 §2.1: any valid credential may ask."""
        await callers.principal(request)
        form = parse_form(await read_form_body(request))
        snapshots = plane.snapshots
        answer = introspect(form, snapshots.verifier, snapshots.revocation_of)
        return JSONResponse(answer, headers=NO_STORE)

    return [
        Route("/oauth2/token", token, methods=["POST"]),
        Route("/oauth2/introspect", introspection, methods=["POST"]),
    ]
