"""The audit log's HTTP surface (DESIGN §6). Reads need the admin credential; agents
send their spooled events with their cluster credential."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from trustmesh.audit import events as ev
from trustmesh.audit.canonical import CanonicalError, parse_time
from trustmesh.server.audit import (
    MAX_PAGE,
    AuditError,
    AuditLog,
    LogInconsistent,
    Record,
    SequenceConflict,
    SourceMismatch,
    record_of,
)
from trustmesh.server.credentials import Principal
from trustmesh.server.http import BadRequest, error_response, read_body, require_content_type

MAX_INGEST_EVENTS = 1000
MAX_INGEST_BODY = 8 * 1024 * 1024
NO_STORE = {"Cache-Control": "no-store"}

Authenticate = Callable[..., Awaitable[Principal]]


def _int(request: Request, name: str, default: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        if default is None:
            raise BadRequest(400, "invalid_request", f"query parameter {name} is required")
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise BadRequest(400, "invalid_request", f"{name} must be a non-negative integer")
    return int(raw)


def _b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


QUERY_FILTERS = {
    "type": "type",
    "cluster": "cluster",
    "subject": "subject",
    "identity": "subject",
    "trace_id": "trace_id",
    "decision": "decision",
    "source": "source",
}


def parse_ingest(body: bytes, principal: Principal) -> list[Record]:
    """``{"events": [...]}`` from an agent -> records, or BadRequest naming each problem.
    An agent may write only ``authz.decision`` events of its own cluster."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest(400, "invalid_request", "body is not valid JSON") from None
    items = document.get("events") if isinstance(document, dict) else None
    if not isinstance(items, list) or not items:
        raise BadRequest(400, "invalid_request", 'body must be {"events": [event, ...]}')
    if len(items) > MAX_INGEST_EVENTS:
        raise BadRequest(413, "too_many_events", f"at most {MAX_INGEST_EVENTS} events per request")
    records: list[Record] = []
    problems: list[str] = []
    for i, item in enumerate(items):
        try:
            record = record_of(item)
        except ev.EventError as exc:
            problems.append(f"events[{i}]: {exc}")
            continue
        if item["source"]["kind"] != "agent" or item["type"] not in ev.AGENT_TYPES:
            problems.append(f"events[{i}]: an agent may only send authz.decision events")
            continue
        if not principal.is_admin and item.get("cluster") != principal.cluster:
            raise BadRequest(
                403,
                "insufficient_scope",
                f"events[{i}] is for cluster {item.get('cluster')!r}; this credential is for "
                f"cluster {principal.cluster}",
            )
        records.append(record)
    if problems:
        raise BadRequest(
            400, "invalid_event", f"{len(problems)} event(s) are invalid", problems=problems[:100]
        )
    return records


def audit_routes(
    audit: AuditLog, authenticate: Authenticate, stopping: Callable[[], bool]
) -> list[Route]:
    async def ingest(request: Request) -> Response:
        principal = await authenticate(request, admin_only=False)
        require_content_type(request, "application/json")
        if stopping():
            return error_response(503, "stopping", "the control plane is shutting down; retry")
        records = parse_ingest(await read_body(request, MAX_INGEST_BODY), principal)
        try:
            result = await run_in_threadpool(audit.append, records)
        except SequenceConflict as exc:
            return error_response(409, "sequence_conflict", str(exc))
        except SourceMismatch as exc:
            return error_response(403, "insufficient_scope", str(exc))
        except LogInconsistent as exc:
            return error_response(503, "log_inconsistent", str(exc))
        return JSONResponse(
            {
                "accepted": result.accepted - len(result.gaps),
                "duplicates": result.duplicates,
                "tree_size": result.tree_size,
                "gaps": [{"source": s, "first": a, "last": b} for s, a, b in result.gaps],
            }
        )

    async def checkpoint(request: Request) -> Response:
        await authenticate(request)
        note = await run_in_threadpool(audit.latest_checkpoint)
        return PlainTextResponse(note, headers=NO_STORE)

    async def key(request: Request) -> Response:
        await authenticate(request)
        return PlainTextResponse(audit.verifier_key + "\n")

    async def checkpoints(request: Request) -> Response:
        await authenticate(request)
        after = request.query_params.get("after", "")
        found = await run_in_threadpool(
            audit.checkpoints, -1 if after == "" else _int(request, "after")
        )
        return JSONResponse({"checkpoints": found}, headers=NO_STORE)

    async def inclusion(request: Request) -> Response:
        await authenticate(request)
        index, size = _int(request, "index"), _int(request, "size")
        try:
            hashes = await run_in_threadpool(audit.inclusion, index, size)
        except AuditError as exc:
            return error_response(400, "invalid_request", str(exc))
        return JSONResponse({"leaf_index": index, "tree_size": size, "hashes": _b64(hashes)})

    async def consistency(request: Request) -> Response:
        await authenticate(request)
        first, second = _int(request, "first"), _int(request, "second")
        try:
            hashes = await run_in_threadpool(audit.consistency, first, second)
        except AuditError as exc:
            return error_response(400, "invalid_request", str(exc))
        return JSONResponse({"first": first, "second": second, "hashes": _b64(hashes)})

    async def entries(request: Request) -> Response:
        await authenticate(request)
        start = _int(request, "start")
        end = _int(request, "end", start + MAX_PAGE)
        try:
            found = await run_in_threadpool(audit.entries, start, end)
        except AuditError as exc:
            return error_response(400, "invalid_request", str(exc))
        return JSONResponse({"entries": found}, headers=NO_STORE)

    async def query(request: Request) -> Response:
        await authenticate(request)
        params = request.query_params
        filters: dict[str, str] = {}
        for name, column in QUERY_FILTERS.items():
            value = params.get(name)
            if value:
                filters[column] = value[:512]
        if filters.get("decision") not in (None, "allow", "deny"):
            raise BadRequest(400, "invalid_request", "decision must be allow or deny")
        for bound in ("since", "until"):
            value = params.get(bound)
            if value:
                try:
                    parse_time(value)
                except CanonicalError as exc:
                    raise BadRequest(400, "invalid_request", f"{bound}: {exc}") from None
                filters[bound] = value
        unknown = sorted(set(params) - set(QUERY_FILTERS) - {"since", "until", "after", "limit"})
        if unknown:
            raise BadRequest(400, "invalid_request", f"unknown query parameter {unknown[0]!r}")
        after = params.get("after")
        found, cursor = await run_in_threadpool(
            audit.query,
            filters,
            -1 if not after else _int(request, "after"),
            _int(request, "limit", 100),
        )
        return JSONResponse({"entries": found, "next": cursor}, headers=NO_STORE)

    async def sources(request: Request) -> Response:
        await authenticate(request)
        found: list[dict[str, Any]] = await run_in_threadpool(audit.sources)
        return JSONResponse({"sources": found}, headers=NO_STORE)

    return [
        Route("/v1/audit/events", ingest, methods=["POST"]),
        Route("/v1/audit/checkpoint", checkpoint, methods=["GET"]),
        Route("/v1/audit/checkpoints", checkpoints, methods=["GET"]),
        Route("/v1/audit/key", key, methods=["GET"]),
        Route("/v1/audit/proof/inclusion", inclusion, methods=["GET"]),
        Route("/v1/audit/proof/consistency", consistency, methods=["GET"]),
        Route("/v1/audit/entries", entries, methods=["GET"]),
        Route("/v1/audit/query", query, methods=["GET"]),
        Route("/v1/audit/sources", sources, methods=["GET"]),
    ]
