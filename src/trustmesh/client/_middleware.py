"""ASGI middleware that authorizes every HTTP request through the cluster's local agent
(``POST /v1/authorize``, DESIGN §4). Pure ASGI: works under Starlette, FastAPI, Quart,
Django's ASGI handler or a bare ASGI callable.

Outcomes (fail closed):

* no ``Authorization: Bearer`` header, or the agent says the token does not
  authenticate → 401 with ``WWW-Authenticate: Bearer``;
* the policy denies → 403 with ``{"error": "forbidden", "decision_id": ...}`` (the
  names of bindings and roles stay in the agent's answer and logs);
* the agent refuses the request (a path or ``Host`` its canonicalisation will not
  read: dot or empty segments, ``;``, encoded separators…, DESIGN §3) → 400 with its
  description; the agent is asked about the raw path, as the client sent it;
* the agent is unreachable, times out, is not ready, or answers something unexpected →
  503;
* allowed → the app runs with the :class:`Authorization` in ``scope["trustmesh"]`` and
  ``scope["state"]["trustmesh"]`` (Starlette: ``request.state.trustmesh``).

Paths in ``exempt_paths`` (exact matches) skip the check. WebSocket and lifespan scopes
pass through unchecked: protect WebSocket endpoints separately.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import httpx

from trustmesh.client._tokens import verify_for

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCOPE_KEY = "trustmesh"


@dataclass(frozen=True)
class Authorization:
    """An allowed request: who made it and the decision that let it through."""

    spiffe_id: str
    decision_id: str
    policy_revision: int | None
    """The policy revision that decided."""
    identity: dict[str, Any]
    """The agent's identity object: ``spiffe_id``, ``workload_id``, ``cluster``,
    ``namespace``, ``service_account``, ``jti``, ``expires_at``, ``claims``."""
    decision: dict[str, Any]
    """The agent's whole answer."""

    @property
    def claims(self) -> dict[str, Any]:
        claims = self.identity.get("claims")
        return claims if isinstance(claims, dict) else {}


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            text: str = value.decode("latin-1")
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _host(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"host":
            host = value.decode("latin-1").strip().lower()
            return host or None
    return None


def _raw_path(scope: Scope) -> str | None:
    """The path as the client sent it (``raw_path``, not the decoded ``path``): the
    agent canonicalises it — the one canonicalisation of DESIGN §3 — and refuses the
    spellings whose meaning depends on the reader (400, passed on). None when it is not
    UTF-8, which JSON cannot carry."""
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes):
        return str(scope.get("path") or "/")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class AuthorizationMiddleware:
    """Wrap ``app`` so that every HTTP request is authorized by the agent at
    ``agent_url`` (e.g. ``http://127.0.0.1:8181``) before the app sees it.

    ``exempt_paths``: exact paths served without a check (health probes).
    ``timeout``: seconds to wait for the agent before answering 503.
    ``http_client``: an ``httpx.AsyncClient`` to use (default: one is created on the
    first request and closed at lifespan shutdown or by :meth:`aclose`).
    ``ca_file``: for an agent serving HTTPS behind a private CA, trust only the CA
    certificates of this PEM file (default: ``TRUSTMESH_CA_FILE``, else the public
    roots); not with ``http_client``."""

    def __init__(
        self,
        app: ASGIApp,
        agent_url: str,
        *,
        exempt_paths: Iterable[str] = ("/healthz",),
        timeout: float = 1.0,
        http_client: httpx.AsyncClient | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.app = app
        self.authorize_url = agent_url.rstrip("/") + "/v1/authorize"
        self.exempt_paths = frozenset(exempt_paths)
        self.timeout = timeout
        self._verify = verify_for(http_client, ca_file)
        self._client = http_client
        self._owns_client = http_client is None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._closing_on_shutdown(send))
            return
        if scope["type"] != "http" or scope.get("path") in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        outcome = await self._authorize(scope)
        if isinstance(outcome, Authorization):
            state = dict(scope.get("state") or {})
            state[SCOPE_KEY] = outcome
            await self.app({**scope, "state": state, SCOPE_KEY: outcome}, receive, send)
            return
        status, body, headers = outcome
        await _respond(send, status, body, headers)

    async def _authorize(
        self, scope: Scope
    ) -> Authorization | tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
        token = _bearer(scope)
        if token is None:
            return (
                401,
                {"error": "unauthorized", "error_description": "a Bearer token is required"},
                [(b"www-authenticate", b'Bearer realm="trustmesh"')],
            )
        host = _host(scope)
        path = _raw_path(scope)
        if host is None or path is None:
            problem = "the request has no Host header" if host is None else "the path is not UTF-8"
            return 400, {"error": "invalid_request", "error_description": problem}, []
        question = {
            "token": token,
            "request": {"host": host, "path": path, "method": str(scope["method"]).upper()},
        }
        try:
            response = await self._http().post(self.authorize_url, json=question)
            answer = response.json()
        except (httpx.HTTPError, ValueError):
            return _unavailable("the authorization agent cannot be reached")
        if not isinstance(answer, dict):
            return _unavailable("the authorization agent answered something unexpected")
        if response.status_code == 401:
            reason = str(answer.get("reason") or "invalid")
            return (
                401,
                {"error": "invalid_token", "reason": reason},
                [(b"www-authenticate", b'Bearer realm="trustmesh", error="invalid_token"')],
            )
        if response.status_code == 400:
            description = str(answer.get("error_description") or "the request is malformed")
            return 400, {"error": "invalid_request", "error_description": description}, []
        if response.status_code != 200:
            return _unavailable("the authorization agent is not ready")
        identity = answer.get("identity")
        decision_id = str(answer.get("decision_id") or "")
        if answer.get("allowed") is not True or not isinstance(identity, dict):
            return 403, {"error": "forbidden", "decision_id": decision_id}, []
        revision = answer.get("policy_revision")
        return Authorization(
            spiffe_id=str(identity.get("spiffe_id") or ""),
            decision_id=decision_id,
            policy_revision=revision if isinstance(revision, int) else None,
            identity=identity,
            decision=answer,
        )

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout, trust_env=False, verify=self._verify
            )
        return self._client

    def _closing_on_shutdown(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message.get("type") in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.aclose()
            await send(message)

        return wrapped

    async def aclose(self) -> None:
        """Close the HTTP client if the middleware created it."""
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _unavailable(description: str) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
    return (
        503,
        {"error": "temporarily_unavailable", "error_description": description},
        [(b"retry-after", b"1")],
    )


async def _respond(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
