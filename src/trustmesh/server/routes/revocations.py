"""The revocation list (DESIGN §5): revoke (admin), and the list agents follow, by long
poll (``GET /v1/revocations?since=R&wait=S&held=H``: an agent's credential reports
with ``held`` the revision its list is at, for the overview's revocation lag) or as
server-sent events (``GET /v1/revocations/stream``, which ends once its credential is
no longer valid);
and suspensions (admin): ``POST /v1/suspensions``, ``POST /v1/suspensions/resume``,
``GET /v1/suspensions``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from trustmesh.common.errors import InvalidRequest
from trustmesh.common.http import read_json
from trustmesh.common.numbers import parse_decimal
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.revoke import ALIASES, KINDS, SUSPENSION_KINDS
from trustmesh.server.routes._auth import Callers
from trustmesh.server.routes.agents import long_poll_wait

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
MAX_REVOCATION_BODY = 64 * 1024
KEEP_ALIVE = 15.0


class _HeldStream(StreamingResponse):
    """A stream that gives its long-poll slot back however it ends (the event generator
    may never start, so its own ``finally`` cannot)."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    snapshots = plane.snapshots

    def since(request: Request) -> int:
        value = parse_decimal(request.query_params.get("since", "0"))
        if value is None:
            raise InvalidRequest("since must be a revocation revision (a non-negative integer)")
        current = snapshots.revocations.revision
        if value > current:
            raise InvalidRequest(
                f"since={value} is ahead of this control plane's revocation revision {current}; resync with since=0"
            )
        return value

    def held(request: Request) -> int | None:
        """``held=H``: the revocation revision the caller's list is at (absent: not said)."""
        text = request.query_params.get("held")
        if text is None:
            return None
        value = parse_decimal(text)
        if value is None:
            raise InvalidRequest("held must be a revocation revision (a non-negative integer)")
        current = snapshots.revocations.revision
        if value > current:
            raise InvalidRequest(
                f"held={value} is ahead of this control plane's revocation revision {current}"
            )
        return value

    async def create(request: Request) -> Response:
        principal = await callers.admin(request)
        document = await read_json(request, MAX_REVOCATION_BODY)
        kind, value, reason = (
            document.get("kind"),
            document.get("value"),
            document.get("reason", ""),
        )
        kind = ALIASES.get(str(kind), kind)
        if kind not in KINDS:
            raise InvalidRequest(
                "kind must be jti, subject (or spiffeId), workload, cluster or key"
            )
        if not isinstance(value, str) or not value:
            raise InvalidRequest("value must be a non-empty string")
        if not isinstance(reason, str):
            raise InvalidRequest("reason must be a string")
        entry, created = await run_in_threadpool(
            plane.revoker.revoke, kind, value, reason, principal.name
        )
        snapshots.notify_changes()
        return JSONResponse(
            {"created": created, "revocation": entry.to_json()}, 201 if created else 200
        )

    async def listing(request: Request) -> Response:
        """Entries after ``since`` (all in force for 0). With ``wait``, a long poll:
        answers as soon as there is something newer, else empty after ``wait`` s. An
        agent's credential reporting ``held`` is recorded as holding that revision (the
        admin's is checked, not recorded: it is no agent)."""
        principal = await callers.principal(request)
        after = since(request)
        holding = held(request)
        if holding is not None and principal.cluster is not None and principal.agent:
            await run_in_threadpool(
                plane.agents.record_revocations, principal.cluster, principal.agent, holding
            )
        await snapshots.wait_until(
            lambda: snapshots.revocations.revision > after,
            long_poll_wait(request),
            holder=principal.credential_id,
        )
        current, entries = await run_in_threadpool(plane.revocation_store.since, after)
        return JSONResponse(
            {"revision": current, "since": after, "entries": [e.to_json() for e in entries]},
            headers=NO_STORE,
        )

    async def stream(request: Request) -> Response:
        """Server-sent events (text/event-stream): one ``revocation`` event per entry,
        its ``id`` the revision, so ``Last-Event-ID`` (or ``since``) resumes. The
        credential is checked again every ``KEEP_ALIVE`` seconds: revoked or expired,
        the stream ends."""
        principal = await callers.principal(request)
        last_event = request.headers.get("last-event-id")
        resumed = parse_decimal(last_event)
        start = resumed if resumed is not None else since(request)

        async def events() -> AsyncIterator[bytes]:
            cursor = start
            checked = time.monotonic()
            yield b": trustmesh revocations\n\n"
            while not snapshots.stopping:
                if time.monotonic() - checked >= KEEP_ALIVE:
                    if not await callers.still_valid(request):
                        return
                    checked = time.monotonic()
                if snapshots.revocations.revision > cursor:
                    _, entries = await run_in_threadpool(plane.revocation_store.since, cursor)
                    for entry in entries:
                        data = json.dumps(entry.to_json())
                        yield f"id: {entry.revision}\nevent: revocation\ndata: {data}\n\n".encode()
                        cursor = max(cursor, entry.revision)
                    cursor = max(cursor, snapshots.revocations.revision)
                    continue
                until_check = KEEP_ALIVE - (time.monotonic() - checked)
                if not await snapshots.next_change(max(until_check, 0.0)):
                    yield b": keep-alive\n\n"

        release = snapshots.long_polls.acquire(principal.credential_id)  # a stream is one
        return _HeldStream(
            release, events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    def suspension_target(document: dict[str, Any]) -> tuple[str, str]:
        kind, value = document.get("kind"), document.get("value")
        kind = ALIASES.get(str(kind), kind)
        if kind not in SUSPENSION_KINDS:
            raise InvalidRequest("kind must be workload, subject (or spiffeId) or cluster")
        if not isinstance(value, str) or not value or len(value) > 512:
            raise InvalidRequest("value must be a non-empty string of at most 512 characters")
        return str(kind), value

    async def suspend(request: Request) -> Response:
        """``{"kind": workload|subject|cluster, "value", "reason"?}`` -> 201 with the
        suspension, the revocation written with it and the agent credentials revoked
        (200 and the suspension in force when it exists already)."""
        principal = await callers.admin(request)
        document = await read_json(request, MAX_REVOCATION_BODY)
        kind, value = suspension_target(document)
        reason = document.get("reason", "")
        if not isinstance(reason, str):
            raise InvalidRequest("reason must be a string")
        result = await run_in_threadpool(
            plane.suspender.suspend, kind, value, reason, principal.name
        )
        snapshots.notify_changes()
        return JSONResponse(result, 201 if result["created"] else 200)

    async def resume(request: Request) -> Response:
        """``{"kind", "value"}`` -> the suspension ended; 404 if there was none."""
        principal = await callers.admin(request)
        kind, value = suspension_target(await read_json(request, MAX_REVOCATION_BODY))
        result = await run_in_threadpool(plane.suspender.resume, kind, value, principal.name)
        return JSONResponse(result)

    async def suspensions(request: Request) -> Response:
        await callers.read(request)
        return JSONResponse({"suspensions": plane.suspender.listing()}, headers=NO_STORE)

    return [
        Route("/v1/suspensions", suspensions, methods=["GET"]),
        Route("/v1/suspensions", suspend, methods=["POST"]),
        Route("/v1/suspensions/resume", resume, methods=["POST"]),
        Route("/v1/revocations", listing, methods=["GET"]),
        Route("/v1/revocations", create, methods=["POST"]),
        Route("/v1/revocations/stream", stream, methods=["GET"]),
    ]
