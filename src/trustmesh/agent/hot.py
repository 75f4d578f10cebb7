"""The agent's two hot surfaces — ``POST /v1/authorize`` and Envoy's ext_authz
(``/ext_authz/…``) — as plain ASGI, in front of the Starlette app that serves the
rest (``agent/app.py``: the Kubernetes webhooks, health, readiness, metrics).

They answer as the Starlette routes did — the same status codes, JSON bodies,
headers, refusals and errors, on exactly the paths those routes matched — without
what a decision does not need: matching the path against every route, Request and
Response objects, the middleware stack, and the stdlib JSON codec (orjson reads the
body; one orjson refuses is read again by the stdlib, so what parses is unchanged).
The bounds of docs/security.md — head size and field count, header, body and idle
timeouts, connection caps — are the server's (``common/serving.py``) and hold below
this layer alike; the body bound of ``/v1/authorize`` is enforced here.

Each handler parses its format, opens the decision's span, calls the one pipeline
(:class:`~trustmesh.agent.decide.Decider`) and renders the outcome as an
:class:`~trustmesh.agent.answer.Answer`. Errors are the :mod:`trustmesh.common.errors`
types, answered as ``common/http.py`` answers them."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from trustmesh.agent import envoy
from trustmesh.agent.answer import Answer, json_bytes, raw_headers
from trustmesh.agent.decide import AUTHORIZE, EXT_AUTHZ, Decider
from trustmesh.common.errors import (
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
    RequestError,
    TrustmeshError,
)
from trustmesh.common.numbers import parse_decimal
from trustmesh.identity.svid import VerifiedIdentity
from trustmesh.request import parse_request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("trustmesh.http")  # the logger of common/http.py's handlers

MAX_AUTHORIZE_BODY = 64 * 1024
AUTHORIZE_PATH = "/v1/authorize"
# The patterns Starlette compiled for the routes these surfaces replace ("$" also
# matches before a final newline, as it did there).
_AUTHORIZE = re.compile("^/v1/authorize$")
_EXT_AUTHZ = re.compile("^" + envoy.PREFIX + "/(.*)$")
_NO_STORE = {"Cache-Control": "no-store"}


class ClientGone(Exception):
    """The peer left before its body arrived."""


def identity_json(identity: VerifiedIdentity) -> dict[str, Any]:
    claims = identity.claims
    return {
        "spiffe_id": identity.spiffe_id,
        "workload_id": claims.get("workload_id"),
        "cluster": claims.get("cluster"),
        "namespace": claims.get("namespace"),
        "service_account": claims.get("service_account"),
        "jti": identity.jti,
        "kid": identity.kid,
        "expires_at": identity.expires_at,
        "claims": claims,
    }


def unauthenticated(reason: str, description: str) -> Answer:
    return Answer(
        401,
        {
            "authenticated": False,
            "allowed": False,
            "error": "invalid_token",
            "reason": reason,
            "error_description": description,
        },
        {"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def error_answer(exc: TrustmeshError) -> Answer:
    """As ``common/http.py`` renders an error."""
    headers = {**_NO_STORE, **exc.headers}
    if exc.status == 401:
        headers.setdefault("WWW-Authenticate", f'Bearer error="{exc.error}"')
    return Answer(exc.status, exc.to_json(), headers)


def _refusal(status: int, error: str, description: str) -> Answer:
    return Answer(status, {"error": error, "error_description": description}, _NO_STORE)


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lowercase), as Starlette's ``Headers.get``."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def headers(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


async def read_json(scope: Scope, receive: Receive, limit: int) -> dict[str, Any]:
    """The JSON object of a request body (``common/http.py``'s ``read_json``, on ASGI)."""
    content_type = header(scope, b"content-type") or ""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise InvalidRequest("Content-Type must be application/json")
    declared = header(scope, b"content-length")
    if declared is not None:
        length = parse_decimal(declared)
        if length is None:
            raise InvalidRequest("Content-Length is not a number")
        if length > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.request":
            body += message.get("body", b"")
            if len(body) > limit:
                raise PayloadTooLarge(f"request body is larger than {limit} bytes")
            if not message.get("more_body", False):
                break
        elif message["type"] == "http.disconnect":
            raise ClientGone
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses and the stdlib takes (NaN, big integers, UTF-16…)
            document = json.loads(body)
        except ValueError:
            raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequest("request body must be a JSON object")
    return document


async def send_answer(send: Send, answer: Answer) -> None:
    body = json_bytes(answer.body)
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": raw_headers(answer, len(body)),
        }
    )
    await send({"type": "http.response.body", "body": body})


class HotSurfaces:
    """The ASGI app the agent serves: the two decision surfaces here, everything else
    (and the lifespan) to ``rest``."""

    def __init__(self, decider: Decider, rest: ASGIApp) -> None:
        self.decider = decider
        self.rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if _AUTHORIZE.match(path):
                await self._answer(self.authorize, scope, receive, send)
                return
            if _EXT_AUTHZ.match(path):
                await self._answer(self.ext_authz, scope, receive, send)
                return
        await self.rest(scope, receive, send)

    async def _answer(
        self,
        handler: Callable[[Scope, Receive], Awaitable[Answer]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        try:
            answer = await handler(scope, receive)
        except TrustmeshError as exc:
            if exc.status >= 500:
                log.warning("%s %s: %s", scope["method"], scope["path"], exc.description)
            answer = error_answer(exc)
        except ClientGone:  # nobody reads this answer
            answer = _refusal(400, "invalid_request", "the client left before its body arrived")
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            answer = _refusal(500, "server_error", "internal error; the server logged the details")
        await send_answer(send, answer)

    async def authorize(self, scope: Scope, receive: Receive) -> Answer:
        """``{token, request}`` -> the decision (200 whether allowed or denied), 401
        when the token does not authenticate, 503 before a bundle."""
        if scope["method"] != "POST":
            return _refusal(
                405,
                "method_not_allowed",
                f"{scope['method']} is not allowed on {scope['path']}",
            )
        document = await read_json(scope, receive, MAX_AUTHORIZE_BODY)
        token = document.get("token")
        if not isinstance(token, str) or not token:
            raise InvalidRequest("body needs a string field token")
        attributes = parse_request(document.get("request"))
        decider = self.decider
        with decider.span(AUTHORIZE, header(scope, b"traceparent")) as span:
            outcome = await decider.decide(token, attributes, AUTHORIZE, span)
        if outcome.refusal is not None:
            return unauthenticated(outcome.refusal.reason, outcome.refusal.description)
        assert outcome.identity is not None and outcome.decision is not None
        body = outcome.decision.to_json()
        body["authenticated"] = True
        body["identity"] = identity_json(outcome.identity)
        return Answer(200, body)

    async def ext_authz(self, scope: Scope, receive: Receive) -> Answer:
        """Envoy HTTP ext_authz check (any method, body ignored): 200 allow, 401 no or
        bad token, 403 denied or refused (a request the canonicalisation refuses), 503
        before a bundle (``agent/envoy.py``)."""
        try:
            attributes = envoy.check_request(
                scope["method"],
                headers(scope, b"host"),
                headers(scope, envoy.NAMESPACE_HEADER.encode()),
                scope,
            )
        except RequestError as exc:
            return envoy.refused(exc.description)
        decider = self.decider
        with decider.span(EXT_AUTHZ, header(scope, b"traceparent")) as span:
            try:
                outcome = await decider.decide(
                    envoy.bearer(header(scope, b"authorization")), attributes, EXT_AUTHZ, span
                )
            except NotReady:
                return envoy.not_ready()
        return envoy.response(outcome, span.traceparent())
