"""HTTP plumbing shared by every trustmesh app (control plane, agent): bounded body
reading, bearer credentials, and the one exception handler map that answers every
:class:`~trustmesh.common.errors.TrustmeshError` with its status and JSON body, and
anything else with a 500 that says nothing of the inside. Handlers stay thin: parse,
call one function, render."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from trustmesh.common.errors import InvalidRequest, PayloadTooLarge, TrustmeshError
from trustmesh.common.numbers import parse_decimal

log = logging.getLogger("trustmesh.http")

MAX_FORM_BODY = 64 * 1024
MAX_JSON_BODY = 4 * 1024 * 1024
NO_STORE = {"Cache-Control": "no-store"}


def error_response(
    status: int, error: str, description: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """``{"error": code, "error_description": text, …}``, never cached; a 401 carries
    its RFC 6750 §3 challenge."""
    merged = {**NO_STORE, **(headers or {})}
    if status == 401:
        merged.setdefault("WWW-Authenticate", f'Bearer error="{error}"')
    return JSONResponse(
        {"error": error, "error_description": description, **extra}, status, headers=merged
    )


def render_error(exc: TrustmeshError) -> JSONResponse:
    headers = {**NO_STORE, **exc.headers}
    if exc.status == 401:
        headers.setdefault("WWW-Authenticate", f'Bearer error="{exc.error}"')
    return JSONResponse(exc.to_json(), exc.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """Read at most ``limit`` bytes; refuse larger bodies from the Content-Length header
    or, failing that, as soon as the stream passes the limit (no parsing work first)."""
    check_declared_length(request.headers.get("content-length"), limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def require_content_type(request: Request, expected: str) -> None:
    check_content_type(request.headers.get("content-type"), expected)


# -- the same checks on raw ASGI headers (the routes that skip Starlette's Request) --------


def raw_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), as Starlette's ``Headers.get``."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def check_content_type(value: str | None, expected: str) -> None:
    """The media type of a ``Content-Type`` value is ``expected`` (parameters ignored)."""
    if (value or "").split(";")[0].strip().lower() != expected:
        raise InvalidRequest(f"Content-Type must be {expected}")


def check_declared_length(declared: str | None, limit: int) -> None:
    """A declared ``Content-Length`` is a number no larger than ``limit``: a larger body
    is refused before a byte of it is read."""
    if declared is not None:
        length = parse_decimal(declared)
        if length is None:
            raise InvalidRequest("Content-Length is not a number")
        if length > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")


async def read_json(request: Request, limit: int = MAX_JSON_BODY) -> dict[str, Any]:
    require_content_type(request, "application/json")
    body = await read_body(request, limit)
    try:
        document = json.loads(body)
    except ValueError:
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequest("request body must be a JSON object")
    return document


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(
        404, "not_found", f"no such endpoint: {request.method} {request.url.path}"
    )


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(
        405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}"
    )


async def _trustmesh_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TrustmeshError)
    if exc.status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc.description)
    return render_error(exc)


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The peer left (or was cut off by a bound of ``common/serving.py``) before its body
    arrived: nobody reads this answer, and it is not a server error to log."""
    return error_response(400, "invalid_request", "the client left before its body arrived")


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "server_error", "internal error; the server logged the details")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    404: _not_found,
    405: _method_not_allowed,
    TrustmeshError: _trustmesh_error,
    ClientDisconnect: _client_gone,
    Exception: _server_error,
}
"""The one exception handler map of every app."""
