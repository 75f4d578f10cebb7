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
from trustmesh.agent.decide import AUTHORIZE, EXT_AUTHZ, Credential, Decider, Outcome
from trustmesh.agent.envoy import ExtAuthzOptions
from trustmesh.agent.xfcc import HEADER as XFCC_HEADER
from trustmesh.agent.xfcc import XfccHeader
from trustmesh.common.addresses import caller_address
from trustmesh.common.errors import (
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
    RequestError,
    TrustmeshError,
)
from trustmesh.common.http import check_content_type, check_declared_length
from trustmesh.common.http import raw_header as header
from trustmesh.common.serving import FastAnswer, FastRequest, FastRoute
from trustmesh.identity.svid import VerifiedIdentity
from trustmesh.request import Request, parse_request

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
# whole paths (fullmatch): "$" would also match before a final newline, and "." would
# not match a newline, which sent an ext_authz check for /ext_authz/%0a… to a 404
_AUTHORIZE = re.compile(re.escape("/v1/authorize"))
_EXT_AUTHZ = re.compile(re.escape(envoy.PREFIX) + "/.*", re.DOTALL)
_NO_STORE = {"Cache-Control": "no-store"}
_NAMESPACE = envoy.NAMESPACE_HEADER.encode()
_SOURCE = envoy.SOURCE_HEADER.encode()
_XFCC = XFCC_HEADER.encode()


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


def header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in headers if key == name]


def check_json_headers(headers: list[tuple[bytes, bytes]], limit: int) -> None:
    """What ``common/http.py``'s ``read_json`` checks before it reads a body."""
    check_content_type(header(headers, b"content-type"), "application/json")
    check_declared_length(header(headers, b"content-length"), limit)


def json_object(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body: orjson, and the stdlib for what orjson
    refuses (NaN, big integers, UTF-16…), so what parses is what parsed before."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            document = json.loads(body)
        except ValueError:
            raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequest("request body must be a JSON object")
    return document


def _acceptable(headers: list[tuple[bytes, bytes]], limit: int) -> bool:
    try:
        check_json_headers(headers, limit)
    except InvalidRequest:
        return False
    return True


async def read_body(receive: Receive, limit: int) -> bytes:
    """The body of an ASGI request, refused past ``limit`` bytes as it streams."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk: bytes = message.get("body", b"")
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(f"request body is larger than {limit} bytes")
            if not message.get("more_body", False):
                return body
        elif message["type"] == "http.disconnect":
            raise ClientGone


def fast_answer(answer: Answer) -> FastAnswer:
    body = json_bytes(answer.body)
    return FastAnswer(answer.status, raw_headers(answer, len(body)), body)


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


def _guarded(request: FastRequest, exc: Exception) -> Answer:
    """The answer to an error raised while answering ``request``."""
    if isinstance(exc, TrustmeshError):
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.description)
        return error_answer(exc)
    log.error("%s %s failed", request.method, request.path, exc_info=exc)
    return _refusal(500, "server_error", "internal error; the server logged the details")


Question = tuple[Credential, Request, str | None, str | None]
"""The credential, the request, the traceparent and the caller's address."""


def ext_authz_source(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The client's address Envoy added to the check (:data:`envoy.SOURCE_HEADER`): one
    IP address in canonical form, else None (absent, repeated, or not an address)."""
    values = header_values(headers, _SOURCE)
    return caller_address(values[0]) if len(values) == 1 else None


class HotSurfaces:
    """The agent's ASGI app: the two decision surfaces here, everything else (and the
    lifespan) to ``rest``. Also the server's fast paths for the same two surfaces
    (``common/serving.py``: answered without ASGI, in one write), which answer exactly
    as the ASGI ones: both run the functions below. A fast answer is given without
    awaiting anything unless the token names a key the agent does not know (a key-set
    refresh), or an OpenTelemetry exporter is on (a span must not be begun twice).

    ``options``: whether ext_authz reads a forwarded client certificate
    (``--trust-xfcc``), and the gateway claims it sends upstream."""

    def __init__(
        self, decider: Decider, rest: ASGIApp, options: ExtAuthzOptions | None = None
    ) -> None:
        self.decider = decider
        self.rest = rest
        self.options = options or ExtAuthzOptions()
        self._trust_xfcc = self.options.trust_xfcc
        self._claims = self.options.claim_headers
        self._at_once = decider.tracing.exporter == "none"
        self._authorize_with_body = FastRoute(self._authorize_fast, read_body=True)
        self._authorize_at_once = FastRoute(self._authorize_fast, read_body=False)
        self._ext_authz_route = FastRoute(self._ext_authz_fast, read_body=False)

    # -- ASGI --------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if _AUTHORIZE.fullmatch(path):
                await self._asgi(self._authorize_later, True, scope, receive, send)
                return
            if _EXT_AUTHZ.fullmatch(path):
                await self._asgi(self._ext_authz_later, False, scope, receive, send)
                return
        await self.rest(scope, receive, send)

    async def _asgi(
        self,
        handler: Callable[[FastRequest], Awaitable[Answer]],
        reads_body: bool,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        method, path = scope["method"], scope["path"]
        body = None
        try:
            if reads_body and method == "POST" and _acceptable(headers, MAX_AUTHORIZE_BODY):
                body = await read_body(receive, MAX_AUTHORIZE_BODY)
            client = scope.get("client")
            peer = client[0] if client else None
            raw_path = scope.get("raw_path") or b""
            request = FastRequest(method, path, raw_path, headers, body, peer)
            answer = await handler(request)
        except ClientGone:  # nobody reads this answer
            answer = _refusal(400, "invalid_request", "the client left before its body arrived")
        except Exception as exc:
            answer = _guarded(FastRequest(method, path, b"", headers, None), exc)
        await send_answer(send, answer)

    # -- fast paths (common/serving.py) ------------------------------------------------
    def route(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> FastRoute | None:
        if _AUTHORIZE.fullmatch(path):
            if method == "POST" and _acceptable(headers, MAX_AUTHORIZE_BODY):
                return self._authorize_with_body
            return self._authorize_at_once  # refused before any body is read
        if _EXT_AUTHZ.fullmatch(path):
            return self._ext_authz_route
        return None

    def _authorize_fast(self, request: FastRequest) -> FastAnswer | Awaitable[FastAnswer]:
        return self._fast(self._authorize_now, self._authorize_later, request)

    def _ext_authz_fast(self, request: FastRequest) -> FastAnswer | Awaitable[FastAnswer]:
        return self._fast(self._ext_authz_now, self._ext_authz_later, request)

    def _fast(
        self,
        now: Callable[[FastRequest], Answer | None],
        later: Callable[[FastRequest], Awaitable[Answer]],
        request: FastRequest,
    ) -> FastAnswer | Awaitable[FastAnswer]:
        """Answered at once when ``now`` can (no await needed), else by ``later``."""
        if self._at_once:
            try:
                answer = now(request)
            except Exception as exc:
                answer = _guarded(request, exc)
            if answer is not None:
                return fast_answer(answer)
        return self._fast_later(later, request)

    async def _fast_later(
        self, handler: Callable[[FastRequest], Awaitable[Answer]], request: FastRequest
    ) -> FastAnswer:
        try:
            answer = await handler(request)
        except Exception as exc:
            answer = _guarded(request, exc)
        return fast_answer(answer)

    # -- POST /v1/authorize --------------------------------------------------------------
    def _authorize_question(self, request: FastRequest) -> Question | Answer:
        if request.method != "POST":
            return _refusal(
                405, "method_not_allowed", f"{request.method} is not allowed on {request.path}"
            )
        check_json_headers(request.headers, MAX_AUTHORIZE_BODY)
        assert request.body is not None
        document = json_object(request.body)
        token = document.get("token")
        if not isinstance(token, str) or not token:
            raise InvalidRequest("body needs a string field token")
        attributes = parse_request(document.get("request"))
        source = caller_address(request.client)  # the HTTP peer (no forwarding header)
        return token, attributes, header(request.headers, b"traceparent"), source

    def _authorize_now(self, request: FastRequest) -> Answer | None:
        """``{token, request}`` -> the decision (200 whether allowed or denied), 401
        when the token does not authenticate, 503 before a bundle; None: ask
        :meth:`_authorize_later`."""
        question = self._authorize_question(request)
        if isinstance(question, Answer):
            return question
        token, attributes, traceparent, source = question
        decider = self.decider
        with decider.span(AUTHORIZE, traceparent) as span:
            outcome = decider.decide_now(token, attributes, AUTHORIZE, span, source)
        return None if outcome is None else _authorized(outcome)

    async def _authorize_later(self, request: FastRequest) -> Answer:
        question = self._authorize_question(request)
        if isinstance(question, Answer):
            return question
        token, attributes, traceparent, source = question
        decider = self.decider
        with decider.span(AUTHORIZE, traceparent) as span:
            outcome = await decider.decide(token, attributes, AUTHORIZE, span, source)
        return _authorized(outcome)

    # -- Envoy ext_authz -------------------------------------------------------------------
    def _ext_authz_question(self, request: FastRequest) -> Question | Answer:
        headers = request.headers
        try:
            attributes = envoy.check_request(
                request.method,
                header_values(headers, b"host"),
                header_values(headers, _NAMESPACE),
                {"raw_path": request.raw_path, "path": request.path},
            )
        except RequestError as exc:
            return envoy.refused(exc.description)
        credential: Credential = envoy.bearer(header(headers, b"authorization"))
        if credential is None and self._trust_xfcc:
            lines = tuple(value for key, value in headers if key == _XFCC)
            if lines:
                credential = XfccHeader(lines)
        return credential, attributes, header(headers, b"traceparent"), ext_authz_source(headers)

    def _ext_authz_now(self, request: FastRequest) -> Answer | None:
        """Envoy HTTP ext_authz check (any method, body ignored): 200 allow, 401 no or
        bad token, 403 denied or refused (a request the canonicalisation refuses), 503
        before a bundle (``agent/envoy.py``); None: ask :meth:`_ext_authz_later`."""
        question = self._ext_authz_question(request)
        if isinstance(question, Answer):
            return question
        credential, attributes, traceparent, source = question
        decider = self.decider
        with decider.span(EXT_AUTHZ, traceparent) as span:
            try:
                outcome = decider.decide_now(credential, attributes, EXT_AUTHZ, span, source)
            except NotReady:
                return envoy.not_ready()
            if outcome is None:
                return None
            return envoy.response(outcome, span.traceparent(), self._claims)

    async def _ext_authz_later(self, request: FastRequest) -> Answer:
        question = self._ext_authz_question(request)
        if isinstance(question, Answer):
            return question
        credential, attributes, traceparent, source = question
        decider = self.decider
        with decider.span(EXT_AUTHZ, traceparent) as span:
            try:
                outcome = await decider.decide(credential, attributes, EXT_AUTHZ, span, source)
            except NotReady:
                return envoy.not_ready()
            return envoy.response(outcome, span.traceparent(), self._claims)


def _authorized(outcome: Outcome) -> Answer:
    if outcome.refusal is not None:
        return unauthenticated(outcome.refusal.reason, outcome.refusal.description)
    assert outcome.identity is not None and outcome.decision is not None
    body = outcome.decision.to_json()
    body["authenticated"] = True
    body["identity"] = identity_json(outcome.identity)
    return Answer(200, body)
