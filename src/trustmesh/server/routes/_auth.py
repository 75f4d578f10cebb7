"""Who is calling, and whether their role allows the route: the bearer credential of
the admin and agent APIs is looked up by its hash in ``server/credentials.py`` (revoked,
expired and past-overlap secrets are refused there, on every request), which is the one
place that maps a credential to a person (or cluster) and a role. Routes declare the
role they need with :meth:`Callers.require` (or :meth:`Callers.read` for anything a
person of any role may read); authorization meets authentication only at the verified
:class:`Principal`."""

from __future__ import annotations

from collections.abc import Collection

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from trustmesh.common.errors import Forbidden, Unauthenticated
from trustmesh.common.http import bearer_token
from trustmesh.server.credentials import ADMIN, READERS, CredentialStore, Principal


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
    def __init__(self, credentials: CredentialStore) -> None:
        self.credentials = credentials

    async def principal(self, request: Request) -> Principal:
        """Any valid credential (a person's or a cluster's); 401 otherwise."""
        secret = bearer_token(request)
        if secret is None:
            raise Unauthenticated("missing Authorization: Bearer credential")
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
