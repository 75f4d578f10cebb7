"""Envoy HTTP ext_authz (DESIGN §4): what a check request means and how to answer it.

Envoy's HTTP ext_authz service (``envoy.filters.http.ext_authz`` with ``http_service``)
sends one request per client request, to ``path_prefix`` + the original path (query
included), with the original method, the original ``Host`` and the headers its config
allows, and no body. Envoy uses only the status and the headers of the answer:

* 200 — allow; ``x-trustmesh-spiffe-id``, ``x-trustmesh-decision-id`` and
  ``traceparent`` (the decision span as parent) reach the upstream when listed in
  ``authorization_response.allowed_upstream_headers`` (Envoy then overwrites any
  value the client sent itself);
* 401 with ``WWW-Authenticate: Bearer`` — missing, malformed or invalid token;
* 403 — the policy denies the request;
* 400 — a path the agent refuses to interpret (see :func:`check_request`);
* 503 — the agent has no verified policy bundle yet.

Envoy forwards the status, the body and the headers of a denial to the client, so a
denial says only that it is one and carries the decision id, never the names of the
bindings or roles involved (those are in ``/v1/authorize`` answers and the logs).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import request_response
from starlette.types import Receive, Scope, Send

from trustmesh.agent.decide import Outcome
from trustmesh.common.errors import RequestError
from trustmesh.identity.svid import VerifiedIdentity
from trustmesh.policy.engine import Decision
from trustmesh.request import ServiceRequest, parse_request

PREFIX = "/ext_authz"
SPIFFE_ID_HEADER = "x-trustmesh-spiffe-id"
DECISION_ID_HEADER = "x-trustmesh-decision-id"
TRACEPARENT_HEADER = "traceparent"
REALM = "trustmesh"

# %2F, %5C, %3F, %23 (an encoded /, backslash, ? or #) change which path a request names
# depending on who decodes it: refuse rather than guess what the upstream will see.
_ENCODED_SEPARATOR = re.compile(r"%(?:2f|5c|3f|23)", re.IGNORECASE)
_NO_STORE = {"Cache-Control": "no-store"}


class AnyMethod:
    """An endpoint for every HTTP method, extension methods included. Starlette limits
    a plain function endpoint to GET when given no ``methods``; an ASGI app it routes
    without looking at the method."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self._app = request_response(endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def original_path(scope: Mapping[str, Any]) -> str:
    """The client's path (without the query) from the check request's raw target.

    Raises RequestError for paths whose meaning depends on normalisation: dot segments
    (``/a/../b``, also percent-encoded), an encoded ``/``, ``\\``, ``?`` or ``#``,
    backslashes, control characters. Envoy normally rejects or normalises these first (``normalize_path``,
    ``path_with_escaped_slashes_action``); the agent does not rely on it."""
    raw = scope.get("raw_path")
    target = raw.decode("latin-1") if isinstance(raw, bytes) else str(scope.get("path", ""))
    target = target.split("?", 1)[0]
    if target != PREFIX and not target.startswith(PREFIX + "/"):
        raise RequestError(f"the check path must start with {PREFIX}/")
    raw_path = target[len(PREFIX) :] or "/"
    if _ENCODED_SEPARATOR.search(raw_path):
        raise RequestError("the path contains an encoded /, \\, ? or #")
    path = unquote(raw_path, errors="strict")
    if "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise RequestError("the path contains a backslash or a control character")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise RequestError("the path contains a dot segment")
    return path


def check_request(method: str, host: str | None, scope: Mapping[str, Any]) -> ServiceRequest:
    """The service request an ext_authz check stands for; RequestError when malformed."""
    if not host:
        raise RequestError("the check request has no Host header")
    try:
        path = original_path(scope)
    except UnicodeDecodeError:
        raise RequestError("the path is not valid UTF-8 once percent-decoded") from None
    request = parse_request({"host": host.lower(), "path": path, "method": method})
    assert isinstance(request, ServiceRequest)
    return request


def response(outcome: Outcome, traceparent: str) -> Response:
    """The answer Envoy acts on: 200 allow, 401 no or bad token, 403 denied."""
    if outcome.refusal is not None:
        return unauthenticated(outcome.refusal.reason, outcome.refusal.description)
    assert outcome.identity is not None and outcome.decision is not None
    if outcome.decision.allowed:
        return allowed(outcome.identity, outcome.decision, traceparent)
    return denied(outcome.decision)


def allowed(
    identity: VerifiedIdentity, decision: Decision, traceparent: str | None = None
) -> Response:
    """``traceparent`` (the decision's span as the parent) reaches the upstream when
    ``allowed_upstream_headers`` lists it, so the upstream's spans join the trace."""
    headers = {
        SPIFFE_ID_HEADER: identity.spiffe_id,
        DECISION_ID_HEADER: decision.decision_id,
        **_NO_STORE,
    }
    if traceparent is not None:
        headers[TRACEPARENT_HEADER] = traceparent
    return JSONResponse(
        {"allowed": True, "decision_id": decision.decision_id}, 200, headers=headers
    )


def denied(decision: Decision) -> Response:
    return JSONResponse(
        {
            "allowed": False,
            "error": "forbidden",
            "error_description": "the trustmesh policy does not allow this request",
            "decision_id": decision.decision_id,
        },
        403,
        headers={DECISION_ID_HEADER: decision.decision_id, **_NO_STORE},
    )


def unauthenticated(reason: str, description: str) -> Response:
    """RFC 6750 §3: no ``error`` attribute when the request carried no token at all."""
    challenge = f'Bearer realm="{REALM}"'
    if reason != "missing_token":
        challenge += ', error="invalid_token"'
    return JSONResponse(
        {
            "allowed": False,
            "error": "invalid_token" if reason != "missing_token" else "missing_token",
            "reason": reason,
            "error_description": description,
        },
        401,
        headers={"WWW-Authenticate": challenge, **_NO_STORE},
    )


def bad_check(description: str) -> Response:
    return JSONResponse(
        {"allowed": False, "error": "invalid_request", "error_description": description},
        400,
        headers=_NO_STORE,
    )


def not_ready() -> Response:
    return JSONResponse(
        {
            "allowed": False,
            "error": "not_ready",
            "error_description": "the agent has no verified policy bundle yet",
        },
        503,
        headers={"Retry-After": "1", **_NO_STORE},
    )
