"""The audit log's HTTP surface (DESIGN §6). Reads need the admin credential; agents
send their spooled events with their cluster credential, into the source that
credential owns (``audit/log.py``, ``agent_records``)."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from trustmesh.analytics.callgraph import DEFAULT_LIMIT, MAX_LIMIT, call_graph
from trustmesh.analytics.report import window
from trustmesh.audit import events as ev
from trustmesh.audit.canonical import parse_time
from trustmesh.audit.log import MAX_PAGE, AuditLog, agent_records
from trustmesh.common.clock import Clock, system_clock
from trustmesh.common.errors import CanonicalError, InvalidRequest, Unavailable
from trustmesh.common.http import NO_STORE, read_body, require_content_type
from trustmesh.common.numbers import require_decimal
from trustmesh.server.credentials import ADMIN
from trustmesh.server.routes._auth import Callers, allowed

MAX_INGEST_BODY = 8 * 1024 * 1024


def _int(request: Request, name: str, default: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        if default is None:
            raise InvalidRequest(f"query parameter {name} is required")
        return default
    return require_decimal(raw, name)


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
QUERY_PAGING = {"since", "until", "after", "limit", "order"}


def routes(
    audit: AuditLog,
    callers: Callers,
    stopping: Callable[[], bool],
    decided: Callable[[Iterable[Mapping[str, Any]]], None] = lambda events: None,
    *,
    clock: Clock = system_clock,
) -> list[Route]:
    """``decided``: told the events of every batch the log accepted (the last-use record
    of identities, ``server/usage.py``)."""

    async def ingest(request: Request) -> Response:
        """An agent's batch of spooled events (its cluster credential; the admin's for
        any cluster)."""
        principal = await callers.principal(request)
        if principal.cluster is None:  # a person: only an admin writes for any cluster
            allowed(principal, {ADMIN})
        require_content_type(request, "application/json")
        if stopping():
            raise Unavailable("the control plane is shutting down; retry", error="stopping")
        body = await read_body(request, MAX_INGEST_BODY)
        if principal.is_admin:
            records = agent_records(body, None, None)
        else:  # the credential's own source: CLUSTER/AGENT/SPOOL
            records = agent_records(body, principal.cluster, principal.agent)
        result = await run_in_threadpool(audit.append, records)
        decided(record.event for record in records)
        return JSONResponse(
            {
                "accepted": result.accepted - len(result.gaps),
                "duplicates": result.duplicates,
                "tree_size": result.tree_size,
                "gaps": [{"source": s, "first": a, "last": b} for s, a, b in result.gaps],
            }
        )

    async def checkpoint(request: Request) -> Response:
        await callers.read(request)
        note = await run_in_threadpool(audit.latest_checkpoint)
        return PlainTextResponse(note, headers=NO_STORE)

    async def key(request: Request) -> Response:
        await callers.read(request)
        return PlainTextResponse(audit.verifier_key + "\n")

    async def checkpoints(request: Request) -> Response:
        await callers.read(request)
        after = request.query_params.get("after", "")
        found = await run_in_threadpool(
            audit.checkpoints, -1 if after == "" else _int(request, "after")
        )
        return JSONResponse({"checkpoints": found}, headers=NO_STORE)

    async def inclusion(request: Request) -> Response:
        await callers.read(request)
        index, size = _int(request, "index"), _int(request, "size")
        hashes = await run_in_threadpool(audit.inclusion, index, size)
        return JSONResponse({"leaf_index": index, "tree_size": size, "hashes": _b64(hashes)})

    async def consistency(request: Request) -> Response:
        await callers.read(request)
        first, second = _int(request, "first"), _int(request, "second")
        hashes = await run_in_threadpool(audit.consistency, first, second)
        return JSONResponse({"first": first, "second": second, "hashes": _b64(hashes)})

    async def entries(request: Request) -> Response:
        await callers.read(request)
        start = _int(request, "start")
        end = _int(request, "end", start + MAX_PAGE)
        found = await run_in_threadpool(audit.entries, start, end)
        return JSONResponse({"entries": found}, headers=NO_STORE)

    async def query(request: Request) -> Response:
        await callers.read(request)
        params = request.query_params
        filters: dict[str, str] = {}
        for name, column in QUERY_FILTERS.items():
            value = params.get(name)
            if value:
                filters[column] = value[:512]
        if filters.get("decision") not in (None, "allow", "deny"):
            raise InvalidRequest("decision must be allow or deny")
        for bound in ("since", "until"):
            value = params.get(bound)
            if value:
                try:
                    parse_time(value)
                except CanonicalError as exc:
                    raise InvalidRequest(f"{bound}: {exc}") from None
                filters[bound] = value
        unknown = sorted(set(params) - set(QUERY_FILTERS) - QUERY_PAGING)
        if unknown:
            raise InvalidRequest(f"unknown query parameter {unknown[0][:64]!r}")
        order = params.get("order") or "asc"
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be asc or desc")
        after = params.get("after")
        found, cursor = await run_in_threadpool(
            partial(audit.query, descending=order == "desc"),
            filters,
            -1 if not after else _int(request, "after"),
            _int(request, "limit", 100),
        )
        return JSONResponse({"entries": found, "next": cursor}, headers=NO_STORE)

    async def graph(request: Request) -> Response:
        """Who calls whom in a window (``analytics/callgraph.py``): ``since``/``until`` as
        ``trustmesh report`` takes them (RFC 3339 or a time ago; the last 7 days), the
        newest ``limit`` decisions of it."""
        await callers.read(request)
        params = request.query_params
        unknown = sorted(set(params) - {"since", "until", "limit"})
        if unknown:
            raise InvalidRequest(f"unknown query parameter {unknown[0][:64]!r}")
        start, end = window(params.get("since") or None, params.get("until") or None, clock())
        limit = _int(request, "limit", DEFAULT_LIMIT)
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequest(f"limit must be 1 to {MAX_LIMIT}")
        found = await run_in_threadpool(
            call_graph, audit.db, ev.now_time(start), ev.now_time(end), limit
        )
        return JSONResponse(found, headers=NO_STORE)

    async def sources(request: Request) -> Response:
        await callers.read(request)
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
        Route("/v1/audit/graph", graph, methods=["GET"]),
    ]
