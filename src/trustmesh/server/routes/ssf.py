"""The SSF transmitter's routes (``oauth/ssf.py``): metadata, the caller's stream and
its status, and RFC 8936 poll delivery with acknowledgements."""

from __future__ import annotations

import contextlib
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.errors import NotFound, PollError, TrustmeshError
from trustmesh.common.http import read_body, require_content_type
from trustmesh.oauth.rfc8936 import (
    LONG_POLL_SECONDS,
    MAX_POLL_BODY,
    PollRequest,
    parse_poll_request,
)
from trustmesh.oauth.ssf import SsfStore, stream_configuration, transmitter_configuration
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.credentials import Principal
from trustmesh.server.routes._auth import Callers

NO_STORE = {"Cache-Control": "no-store"}


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    store = SsfStore(plane.db)
    snapshots = plane.snapshots

    def own_stream(request: Request, principal: Principal) -> None:
        wanted = request.query_params.get("stream_id")
        if wanted is not None and wanted != principal.credential_id:
            raise NotFound(f"no stream {wanted[:64]!r} for this credential")

    async def configuration(request: Request) -> Response:
        return JSONResponse(
            transmitter_configuration(plane.issuer),
            headers={"Cache-Control": "public, max-age=60"},
        )

    async def stream(request: Request) -> Response:
        """SSF 1.0 "Reading a Stream's Configuration": without ``stream_id``, the list
        of the caller's streams (here always one)."""
        principal = await callers.principal(request)
        own_stream(request, principal)
        config = stream_configuration(plane.issuer, principal.credential_id, principal.name)
        if request.query_params.get("stream_id") is None:
            return JSONResponse([config], headers=NO_STORE)
        return JSONResponse(config, headers=NO_STORE)

    async def status(request: Request) -> Response:
        """SSF 1.0 "Reading a Stream's Status": implicit streams are always enabled."""
        principal = await callers.principal(request)
        own_stream(request, principal)
        return JSONResponse(
            {"stream_id": principal.credential_id, "status": "enabled"}, headers=NO_STORE
        )

    def deliver(receiver: str, limit: int) -> tuple[dict[str, str], bool]:
        return store.deliver(receiver, limit, plane.issuer, snapshots.keyset.active, time.time())

    async def poll(request: Request) -> Response:
        """RFC 8936 §2.4: acknowledge, record errors, then answer with up to
        ``maxEvents`` unacknowledged SETs; unless ``returnImmediately``, wait up to 25 s
        for one to appear (§2.4: the transmitter MAY hold the request open)."""
        principal = await callers.principal(request)
        try:
            require_content_type(request, "application/json")
            body = await read_body(request, MAX_POLL_BODY)
        except TrustmeshError as exc:  # answered in the RFC 8935 §2.3 shape too
            raise PollError(exc.description, status=exc.status) from None
        poll_request = parse_poll_request(body)
        receiver = principal.credential_id
        waits = not poll_request.return_immediately and poll_request.max_events != 0
        with snapshots.long_polls.hold(receiver) if waits else contextlib.nullcontext():
            return await answer(receiver, poll_request)

    async def answer(receiver: str, poll_request: PollRequest) -> Response:
        await run_in_threadpool(store.record, receiver, poll_request.ack, poll_request.set_errs)
        deadline = time.monotonic() + LONG_POLL_SECONDS
        while True:
            seen = snapshots.revocations.revision

            def moved(seen: int = seen) -> bool:
                return snapshots.revocations.revision != seen

            sets, more = await run_in_threadpool(deliver, receiver, poll_request.max_events)
            if (
                sets
                or poll_request.return_immediately
                or poll_request.max_events == 0
                or snapshots.stopping
                or time.monotonic() >= deadline
            ):
                break
            await snapshots.wait_until(moved, deadline - time.monotonic())
        return JSONResponse(
            {"sets": sets, "moreAvailable": more},
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    return [
        Route("/.well-known/ssf-configuration", configuration, methods=["GET"]),
        Route("/v1/ssf/stream", stream, methods=["GET"]),
        Route("/v1/ssf/status", status, methods=["GET"]),
        Route("/v1/ssf/poll", poll, methods=["POST"]),
    ]
