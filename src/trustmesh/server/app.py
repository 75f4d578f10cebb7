"""The control plane's HTTP app (Starlette): the routes of ``server/routes/``, the one
exception handler of ``common/http.py``, and the control plane's start and stop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from trustmesh.common.http import EXCEPTION_HANDLERS, error_response
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.health import DATABASE_DOWN
from trustmesh.server.routes import (
    access,
    admin,
    agents,
    analytics,
    audit,
    console,
    credentials,
    federation,
    oauth,
    public,
    receivers,
    revocations,
    ssf,
    x509,
)
from trustmesh.server.routes._auth import Callers


def build_app(plane: ControlPlane) -> oauth.ASGIApp:
    """The app: ``POST /oauth2/token`` on raw ASGI (``routes/oauth.py``), everything
    else, the lifespan included, through Starlette."""
    framework = console.secured(_starlette_app(plane))
    token = oauth.token_endpoint(plane)

    async def app(scope: oauth.Scope, receive: oauth.Receive, send: oauth.Send) -> None:
        if scope["type"] == "http" and scope["path"] == oauth.TOKEN_PATH:
            await token(scope, receive, send)
        else:
            await framework(scope, receive, send)

    return app


def _starlette_app(plane: ControlPlane) -> Starlette:
    callers = Callers(plane.credentials, plane.sessions)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await plane.start()
        try:
            yield
        finally:
            await plane.stop()

    routes = [
        *oauth.routes(plane, callers),
        *public.routes(plane, callers),
        *admin.routes(plane, callers),
        *credentials.routes(plane, callers),
        *access.routes(plane, callers),
        *analytics.routes(plane, callers),
        *agents.routes(plane, callers),
        *revocations.routes(plane, callers),
        *ssf.routes(plane, callers),
        *x509.routes(plane, callers),
        *federation.routes(plane, callers),
        *receivers.routes(plane, callers),
        *console.routes(plane, callers),
        *audit.routes(plane.audit, callers, lambda: plane.snapshots.stopping, plane.audit_accepted),
    ]
    handlers = {**EXCEPTION_HANDLERS, OperationalError: _database_unavailable}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.router.redirect_slashes = False  # an unknown path is a 404, never a redirect
    return app


async def _database_unavailable(request: Request, exc: Exception) -> Response:
    """A database outage is a 503 a client fails over on, not a 500 (DESIGN §10)."""
    return error_response(503, "temporarily_unavailable", DATABASE_DOWN)
