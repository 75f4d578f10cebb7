"""HTTP plumbing shared by the control plane and the agent: bounded body reading, JSON
errors, bearer tokens, W3C-free plain helpers. Handlers stay thin: parse, call, render."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

MAX_FORM_BODY = 64 * 1024
MAX_JSON_BODY = 4 * 1024 * 1024


class BadRequest(Exception):
    """Rendered as ``{"error": code, "error_description": description}``."""

    def __init__(self, status: int, error: str, description: str, **extra: Any) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.extra = extra


def error_response(status: int, error: str, description: str, **extra: Any) -> JSONResponse:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = f'Bearer error="{error}"'
    return JSONResponse(
        {"error": error, "error_description": description, **extra}, status, headers=headers
    )


async def read_body(request: Request, limit: int) -> bytes:
    """Read at most ``limit`` bytes; refuse larger bodies from the Content-Length header
    or, failing that, as soon as the stream passes the limit (no parsing work first)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(400, "invalid_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise BadRequest(413, "invalid_request", f"request body is larger than {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, "invalid_request", f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def require_content_type(request: Request, expected: str) -> None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != expected:
        raise BadRequest(400, "invalid_request", f"Content-Type must be {expected}")


async def read_json(request: Request, limit: int = MAX_JSON_BODY) -> dict[str, Any]:
    require_content_type(request, "application/json")
    body = await read_body(request, limit)
    try:
        document = json.loads(body)
    except ValueError:
        raise BadRequest(400, "invalid_request", "request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise BadRequest(400, "invalid_request", "request body must be a JSON object")
    return document


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(
        404, "not_found", f"no such endpoint: {request.method} {request.url.path}"
    )


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(
        405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}"
    )


async def bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    return error_response(exc.status, exc.error, exc.description, **exc.extra)


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "server_error", "internal error; the server logged the details")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    404: not_found,
    405: method_not_allowed,
    BadRequest: bad_request,
    Exception: server_error,
}
