"""The OAuth endpoints: RFC 8693 token exchange and RFC 7662 introspection.

The token endpoint is the control plane's hot path, so it is served on raw ASGI
(:func:`token_endpoint`, dispatched ahead of the Starlette router by ``server/app.py``)
rather than through Starlette's router, middleware, ``Request`` and ``JSONResponse``.
It keeps every bound and answer of the Starlette route it replaces: the
``Content-Type`` check, the 64 KiB body bound (from ``Content-Length`` or while the
body streams), the strict form, 405 for another method, 400 when the client leaves
before its body arrives, and every error rendered by ``common/http.py`` — the same
status, headers and RFC 6749 §5.2 JSON body as any other endpoint."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from sqlalchemy.exc import OperationalError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.errors import PayloadTooLarge, TrustmeshError
from trustmesh.common.http import (
    MAX_FORM_BODY,
    check_content_type,
    check_declared_length,
    error_response,
    raw_header,
    read_body,
    render_error,
    require_content_type,
)
from trustmesh.oauth.rfc7662 import introspect
from trustmesh.oauth.rfc8693 import parse_form
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.health import DATABASE_DOWN
from trustmesh.server.routes._auth import Callers

log = logging.getLogger("trustmesh.http")

FORM = "application/x-www-form-urlencoded"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
TOKEN_PATH = "/oauth2/token"  # noqa: S105 (a path, not a secret)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def read_form_body(request: Request) -> bytes:
    require_content_type(request, FORM)
    return await read_body(request, MAX_FORM_BODY)


class _ClientGone(Exception):
    """The peer left before its body arrived (Starlette's ``ClientDisconnect``)."""


async def _form_body(headers: list[tuple[bytes, bytes]], receive: Receive) -> bytes:
    """``read_form_body`` on raw ASGI: the content type, then at most 64 KiB of body,
    refused from ``Content-Length`` or as soon as the stream passes the bound."""
    check_content_type(raw_header(headers, b"content-type"), FORM)
    check_declared_length(raw_header(headers, b"content-length"), MAX_FORM_BODY)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_FORM_BODY:
                raise PayloadTooLarge(f"request body is larger than {MAX_FORM_BODY} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise _ClientGone


def token_endpoint(plane: ControlPlane) -> ASGIApp:
    """``POST /oauth2/token``: RFC 8693 exchange; every outcome is audited, and a token
    is returned only once its ``token.issued`` event is committed
    (``server/issuance.py``)."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method != "POST":
            answer: Response = error_response(
                405, "method_not_allowed", f"{method} is not allowed on {scope['path']}"
            )
            await answer(scope, receive, send)
            return
        headers = scope["headers"]
        client = scope.get("client")
        try:
            issued = await plane.issuance.issue(
                _form_body(headers, receive),
                raw_header(headers, b"traceparent"),
                client[0] if client else None,
            )
        except TrustmeshError as exc:
            if exc.status >= 500:
                log.warning("%s %s: %s", method, scope["path"], exc.description)
            await render_error(exc)(scope, receive, send)
            return
        except _ClientGone:
            answer = error_response(
                400, "invalid_request", "the client left before its body arrived"
            )
            await answer(scope, receive, send)
            return
        except OperationalError:  # the database is down: fail over, as on any 503
            answer = error_response(503, "temporarily_unavailable", DATABASE_DOWN)
            await answer(scope, receive, send)
            return
        except Exception:
            log.exception("%s %s failed", method, scope["path"])
            answer = error_response(
                500, "server_error", "internal error; the server logged the details"
            )
            await answer(scope, receive, send)
            return
        body = orjson.dumps(issued.response)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"cache-control", b"no-store"),
                    (b"pragma", b"no-cache"),
                    (b"traceparent", issued.traceparent.encode("latin-1")),
                    (b"content-length", str(len(body)).encode("latin-1")),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return endpoint


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    async def introspection(request: Request) -> Response:
        """RFC 7662 §2.1: any valid credential may ask."""
        await callers.principal(request)
        form = parse_form(await read_form_body(request))
        snapshots = plane.snapshots
        answer = introspect(form, snapshots.verifier, snapshots.revocation_of)
        return JSONResponse(answer, headers=NO_STORE)

    return [Route("/oauth2/introspect", introspection, methods=["POST"])]
