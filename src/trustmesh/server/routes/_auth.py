"""Who is calling: the bearer credential of the admin and agent APIs, looked up by its
hash (``server/credentials.py``: revoked, expired and past-overlap secrets are refused
there, on every request)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from trustmesh.common.errors import Forbidden, Unauthenticated
from trustmesh.common.http import bearer_token
from trustmesh.server.credentials import CredentialStore, Principal


class Callers:
    def __init__(self, credentials: CredentialStore) -> None:
        self.credentials = credentials

    async def principal(self, request: Request) -> Principal:
        """Any valid credential (admin or cluster); 401 otherwise."""
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

    async def admin(self, request: Request) -> Principal:
        """The admin credential; 403 for a cluster credential."""
        principal = await self.principal(request)
        if not principal.is_admin:
            raise Forbidden("this endpoint needs the admin credential")
        return principal
