"""The web console (DESIGN §12): its sessions, its live events and its static pages.

* ``POST /console/session`` ``{"credential"}`` signs a person in (``server/sessions.py``)
  and sets the session cookie: HttpOnly, SameSite=Strict, Path=/, Secure with the
  ``__Host-`` prefix over HTTPS; over plain HTTP only for a browser on loopback. It
  answers ``{"person", "role", "csrf", "expiresAt"}``; ``GET /console/session`` the same
  (or 401); ``POST /console/session/end`` signs out (CSRF checked, cookie cleared).
* ``GET /console/events``: server-sent events, ``overview`` and ``anomalies``
  (``data: {"revision": N}``) when what those pages show changed (``server/live.py``),
  a comment every 15 s, and the end of the stream once the session ends.
* ``GET /console/…``: the assets shipped in the package (``console/static/``), read once
  at start and served by exact name only (no path is ever joined from the request).

Every answer under ``/console`` carries the security headers (a strict CSP: no inline
script or style, nothing from another origin; no framing; no referrer; no caching);
API answers to a request carrying a cookie are not cached either (:func:`secured`)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from importlib.resources.abc import Traversable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trustmesh.common.errors import Forbidden, InvalidRequest, NotFound
from trustmesh.common.http import read_json
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.routes._auth import (
    Callers,
    check_csrf,
    check_origin,
    cookie_name,
    session_cookie,
)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
CONSOLE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
API_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
MAX_SESSION_BODY = 16 * 1024
HEARTBEAT = 15.0  # seconds between comments on an idle event stream
SESSION_RECHECK = 5.0  # seconds between checks that the stream's session still lives
LIVE_TICK = 1.0  # seconds between looks at the live revisions
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}


def _is_console(path: str) -> bool:
    return path == "/console" or path.startswith("/console/")


def secured(app: ASGIApp) -> ASGIApp:
    """The console's headers on every answer under ``/console`` (errors included), and
    no caching of API answers to a browser (a request with a cookie)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        path = scope["path"]
        if _is_console(path):
            extra = CONSOLE_HEADERS
        elif path.startswith("/v1/") and any(k == b"cookie" for k, _ in scope["headers"]):
            extra = API_HEADERS
        else:
            await app(scope, receive, send)
            return
        names = {name for name, _ in extra}

        async def send_with(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + extra}
            await send(message)

        await app(scope, receive, send_with)

    return wrapped


def _assets() -> dict[str, tuple[bytes, str]]:
    """``/console/NAME`` -> (content, type) for every file shipped in console/static."""
    root = resources.files("trustmesh").joinpath("console", "static")
    found: dict[str, tuple[bytes, str]] = {}

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, name + "/")
                continue
            kind = TYPES.get("." + child.name.rpartition(".")[2])
            if kind is not None:
                found[name] = (child.read_bytes(), kind)

    if root.is_dir():
        walk(root, "")
    return found


def _from_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    assets = _assets()
    sessions = plane.sessions

    async def sign_in(request: Request) -> Response:
        check_origin(request)
        secure = request.url.scheme == "https"
        if not secure and not _from_loopback(request):
            raise Forbidden(
                "the console signs in over HTTPS only (plain HTTP from this machine's "
                "loopback only): start the server with --tls-cert and --tls-key"
            )
        document = await read_json(request, MAX_SESSION_BODY)
        unknown = sorted(set(document) - {"credential"})
        if unknown:
            raise InvalidRequest(f"unknown member {unknown[0][:64]!r} (known: credential)")
        credential = document.get("credential")
        if not isinstance(credential, str):
            raise InvalidRequest('body must be {"credential": "<your personal credential>"}')
        peer = request.client.host if request.client else None
        session_id, session = await sessions.sign_in(credential, peer)
        response = JSONResponse(session.to_json(sessions.idle))
        response.set_cookie(
            cookie_name(request),
            session_id,
            path="/",
            secure=secure,
            httponly=True,
            samesite="strict",
        )
        return response

    async def current(request: Request) -> Response:
        session = await callers.session(request)
        return JSONResponse(session.to_json(sessions.idle))

    async def sign_out(request: Request) -> Response:
        session = await callers.session(request)
        check_csrf(request, session)
        cookie = session_cookie(request) or ""
        await run_in_threadpool(sessions.end, cookie)
        response = JSONResponse({"signedOut": True})
        response.delete_cookie(
            cookie_name(request),
            path="/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def events(request: Request) -> Response:
        await callers.session(request)
        cookie = session_cookie(request) or ""
        return StreamingResponse(
            _stream(plane, cookie),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
        )

    async def asset(request: Request) -> Response:
        name = request.path_params.get("name") or "index.html"
        found = assets.get(name)
        if found is None:
            raise NotFound(f"no such console file: {name[:100]}")
        content, kind = found
        return Response(content, media_type=kind)

    async def to_index(request: Request) -> Response:
        return RedirectResponse("/console/", status_code=308)

    return [
        Route("/console/session", sign_in, methods=["POST"]),
        Route("/console/session", current, methods=["GET"]),
        Route("/console/session/end", sign_out, methods=["POST"]),
        Route("/console/events", events, methods=["GET"]),
        Route("/console", to_index, methods=["GET"]),
        Route("/console/", asset, methods=["GET"]),
        Route("/console/{name:path}", asset, methods=["GET"]),
    ]


async def _stream(plane: ControlPlane, cookie: str) -> AsyncIterator[str]:
    """The event stream of one session: an event per kind whose revision moved, a
    comment every ``HEARTBEAT`` seconds, and the end once the session ends (or the
    replica stops)."""
    live = plane.live
    seen = await run_in_threadpool(live.revisions)
    yield "retry: 3000\n\n"
    last_beat = last_check = time.monotonic()
    while not plane.snapshots.stopping:
        await asyncio.sleep(LIVE_TICK)
        now = time.monotonic()
        if now - last_check >= SESSION_RECHECK:
            last_check = now
            if await run_in_threadpool(plane.sessions.resume, cookie, False) is None:
                yield 'event: ended\ndata: {"reason": "session ended"}\n\n'
                return
        revisions = await run_in_threadpool(live.revisions)
        for kind, revision in revisions.items():
            if seen.get(kind) != revision:
                yield f"event: {kind}\ndata: {json.dumps({'revision': revision})}\n\n"
        seen = revisions
        if now - last_beat >= HEARTBEAT:
            last_beat = now
            yield ": heartbeat\n\n"
