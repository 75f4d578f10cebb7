"""Who is calling, and whether their role allows the route: the bearer credential of
the admin and agent APIs is looked up by its hash in ``server/credentials.py`` (revoked,
expired and past-overlap secrets are refused there, on every request), which is the one
place that maps a credential to a person (or cluster) and a role. Routes declare the
role they need with :meth:`Callers.require` (or :meth:`Callers.read` for anything a
person of any role may read); authorization meets authentication only at the verified
:class:`Principal`.

A request without an Authorization header may instead carry the web console's session
cookie (``server/sessions.py``): it acts as the signed-in person. Browsers send cookies
on their own, so a cookie-authenticated request that may change something (any method
but GET and HEAD) must also prove it comes from the console's own page: an
``X-CSRF-Token`` header equal to the session's token (a cross-site page cannot read
it), and an ``Origin``, when the browser sends one, equal to this server's own; else
403 ``csrf_failed``. A bearer credential needs neither (no browser adds it by itself)."""

from __future__ import annotations

import hmac
from collections.abc import Collection

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from trustmesh.common.errors import Forbidden, Unauthenticated
from trustmesh.common.http import bearer_token
from trustmesh.server.credentials import ADMIN, READERS, CredentialStore, Principal
from trustmesh.server.sessions import Session, SessionStore

# The session cookie: with the __Host- prefix over HTTPS (the browser then insists on
# Secure, Path=/ and no Domain); without it over plain HTTP, which the console allows
# from loopback only (a prefixed cookie cannot be set without Secure).
COOKIE_HTTPS = "__Host-trustmesh_session"
COOKIE_HTTP = "trustmesh_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD"})


def cookie_name(request: Request) -> str:
    return COOKIE_HTTPS if request.url.scheme == "https" else COOKIE_HTTP


def session_cookie(request: Request) -> str | None:
    return request.cookies.get(cookie_name(request))


def own_origin(request: Request) -> str:
    """This server's origin as the browser addressed it (scheme and Host)."""
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def check_origin(request: Request) -> None:
    """403 ``csrf_failed`` if the browser says the request comes from another origin."""
    origin = request.headers.get("origin")
    if origin is not None and origin != own_origin(request):
        raise Forbidden(
            "csrf: this request comes from another origin than the console's",
            error="csrf_failed",
        )


def check_csrf(request: Request, session: Session) -> None:
    """A change made with the session cookie comes from the console's own page."""
    if request.method in SAFE_METHODS:
        return
    check_origin(request)
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        raise Forbidden(
            "csrf: a change made with the console's session needs its X-CSRF-Token header",
            error="csrf_failed",
        )


def allowed(principal: Principal, roles: Collection[str]) -> None:
    """Forbidden (naming the role needed and the caller's) unless the caller's role is
    one of ``roles``."""
    if principal.role in roles:
        return
    needed = " or ".join(sorted(roles))
    if principal.role is None:
        raise Forbidden(
            f"this endpoint needs a person with the {needed} role; "
            f"{principal.name} is a cluster credential"
        )
    raise Forbidden(
        f"this endpoint needs the {needed} role; {principal.name} has the {principal.role} role"
    )


class Callers:
    def __init__(self, credentials: CredentialStore, sessions: SessionStore) -> None:
        self.credentials = credentials
        self.sessions = sessions

    async def session(self, request: Request) -> Session:
        """The console session the request's cookie names; 401 without a live one."""
        cookie = session_cookie(request)
        session = None if cookie is None else await run_in_threadpool(self.sessions.resume, cookie)
        if session is None:
            raise Unauthenticated("not signed in to the console (or the session ended)")
        return session

    async def principal(self, request: Request) -> Principal:
        """Any valid credential (a person's or a cluster's), or a console session (with
        the CSRF checks for a change); 401 otherwise."""
        secret = bearer_token(request)
        if secret is None:
            if session_cookie(request) is None:
                raise Unauthenticated("missing Authorization: Bearer credential")
            session = await self.session(request)
            check_csrf(request, session)
            return session.principal()
        principal = await run_in_threadpool(self.credentials.authenticate, secret)
        if principal is None:
            raise Unauthenticated("credential is not valid (unknown, expired or revoked)")
        return principal

    async def still_valid(self, request: Request) -> bool:
        """Whether the request's credential is still valid (a long-lived stream asks
        again from time to time, so a revocation or expiry ends it)."""
        try:
            await self.principal(request)
        except Unauthenticated:
            return False
        return True

    async def require(self, request: Request, *roles: str) -> Principal:
        """A person whose role is one of ``roles``; 401 without a valid credential, 403
        naming the role otherwise (e.g. ``require(request, APPROVER)`` for deciding
        access requests)."""
        principal = await self.principal(request)
        allowed(principal, roles)
        return principal

    async def read(self, request: Request) -> Principal:
        """A person of any role (admin, approver, auditor): the read-only surfaces."""
        return await self.require(request, *READERS)

    async def admin(self, request: Request) -> Principal:
        """A person with the admin role: every surface that changes something."""
        return await self.require(request, ADMIN)
