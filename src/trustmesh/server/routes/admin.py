"""The admin API (DESIGN §3, §7): apply, policy versions and rollback, the registry's
objects, signing keys. Reading needs a person of any role (auditors and approvers
included); every change needs the admin role. ``GET /v1/policy/diff`` and ``POST /v1/policy/explain`` (a read: any person) are
``server/policy_views.py``; ``GET /v1/workloads`` with a query is one page
(``Inventory.page``). The actor of a change is
always the authenticated principal; an ``author`` in the body is kept beside it as the
claimed author (the policy version's ``claimedAuthor``, the audit event's
``detail.claimed_author``), never in its place. Credentials are in ``credentials.py``,
suspensions in ``revocations.py``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.errors import InvalidRequest, NotFound
from trustmesh.common.http import read_json
from trustmesh.common.numbers import parse_decimal, require_decimal
from trustmesh.identity.keys import KeyRecord
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.inventory import MAX_PAGE, WORKLOAD_SOURCES, WorkloadQuery
from trustmesh.server.routes._auth import Callers

MAX_MESSAGE = 2000


MAX_AUTHOR = 200


def claimed_author(document: dict[str, Any]) -> str | None:
    """The ``author`` a caller named: a string of at most 200 printable characters."""
    author = document.get("author")
    if author is None or author == "":
        return None
    if (
        not isinstance(author, str)
        or len(author) > MAX_AUTHOR
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in author)
    ):
        raise InvalidRequest(
            f"author must be a string of at most {MAX_AUTHOR} characters without control characters"
        )
    return author


def _message(document: dict[str, Any]) -> str:
    return str(document.get("message") or "")[:MAX_MESSAGE]


def _files(document: dict[str, Any]) -> list[tuple[str, str]]:
    files = document.get("files")
    if not isinstance(files, list) or not files:
        raise InvalidRequest('body must be {"files": [{"path": …, "content": …}, …]}')
    pairs = []
    for item in files:
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise InvalidRequest("each file needs a string content")
        pairs.append((str(item.get("path") or "<request>"), item["content"]))
    return pairs


def key_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "kid": record.kid,
        "alg": record.alg,
        "state": record.state,
        "created_at": record.created_at,
        "activated_at": record.activated_at,
        "retired_at": record.retired_at,
        "remove_after": record.remove_after,
    }


def _revision_param(value: str | None, name: str) -> int | str:
    if value == "current":
        return value
    number = parse_decimal(value, 18)
    if number is None:
        raise InvalidRequest(f"{name} must be a policy revision (0 = empty policy) or 'current'")
    return number


WORKLOAD_QUERY = ("limit", "after", "source", "cluster", "q", "staleDays")


def _text_param(params: Mapping[str, str], name: str, limit: int) -> str | None:
    value = params.get(name) or None
    if value is not None and (
        len(value) > limit or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    ):
        raise InvalidRequest(
            f"{name} must be at most {limit} characters without control characters"
        )
    return value


def workload_query(params: Mapping[str, str]) -> WorkloadQuery:
    """``GET /v1/workloads?limit=&after=&source=explicit|template&cluster=&q=&staleDays=``
    (any of them asks for a page: ``Inventory.page``)."""
    unknown = sorted(set(params) - set(WORKLOAD_QUERY))
    if unknown:
        raise InvalidRequest(f"unknown query parameter {unknown[0][:64]!r}")
    limit = 100
    if params.get("limit"):
        limit = require_decimal(params["limit"], "limit", 4)
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be from 1 to {MAX_PAGE}")
    source = params.get("source") or None
    if source is not None and source not in WORKLOAD_SOURCES:
        raise InvalidRequest(f"source must be one of {', '.join(WORKLOAD_SOURCES)}")
    stale_days = None
    if params.get("staleDays"):
        days = parse_decimal(params["staleDays"], 6)
        if days is None or not 0 <= days <= 36500:
            raise InvalidRequest("staleDays must be a number of days from 0 to 36500")
        stale_days = float(days)
    return WorkloadQuery(
        limit=limit,
        after=_text_param(params, "after", 1024),
        source=source,
        cluster=_text_param(params, "cluster", 253),
        contains=_text_param(params, "q", 200),
        stale_days=stale_days,
    )


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    async def apply(request: Request) -> Response:
        principal = await callers.admin(request)
        document = await read_json(request)
        result = await run_in_threadpool(
            plane.changes.apply,
            _files(document),
            principal.name,
            bool(document.get("dryRun", False)),
            _message(document),
            claimed_author(document),
        )
        plane.snapshots.notify_changes()
        return JSONResponse(result.to_json())

    async def policy_versions(request: Request) -> Response:
        await callers.read(request)
        versions = await run_in_threadpool(plane.catalog.history)
        return JSONResponse({"versions": [v.summary() for v in versions]})

    async def policy_version(request: Request) -> Response:
        await callers.read(request)
        wanted = request.path_params["revision"]
        if wanted == "current":
            version = await run_in_threadpool(plane.catalog.current)
        elif (number := parse_decimal(wanted)) is not None:
            found = await run_in_threadpool(plane.catalog.get, number)
            if found is None:
                raise NotFound(f"policy revision {wanted} does not exist")
            version = found
        else:
            raise InvalidRequest("revision must be a number or 'current'")
        return JSONResponse(version.to_json())

    async def policy_rollback(request: Request) -> Response:
        principal = await callers.admin(request)
        document = await read_json(request)
        revision = document.get("revision")
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise InvalidRequest("revision must be a non-negative integer")
        result = await run_in_threadpool(
            plane.changes.rollback,
            revision,
            principal.name,
            _message(document),
            claimed_author(document),
        )
        plane.snapshots.notify_changes()
        return JSONResponse(result.to_json())

    async def policy_diff(request: Request) -> Response:
        await callers.read(request)
        params = request.query_params
        unknown = sorted(set(params) - {"from", "to"})
        if unknown:
            raise InvalidRequest(f"unknown query parameter {unknown[0][:64]!r}")
        old = _revision_param(params.get("from"), "from")
        new = _revision_param(params.get("to"), "to")
        body = await run_in_threadpool(plane.policy_views.diff, old, new)
        return JSONResponse(body)

    async def policy_explain(request: Request) -> Response:
        await callers.read(request)
        document = await read_json(request)
        body = await run_in_threadpool(plane.policy_views.explain, document)
        return JSONResponse(body)

    def lister(kind: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            await callers.read(request)
            items = await run_in_threadpool(plane.inventory.list, kind)
            return JSONResponse({"kind": f"{kind}List", "items": items})

        return handler

    async def workloads(request: Request) -> Response:
        await callers.read(request)
        if not request.query_params:
            items = await run_in_threadpool(plane.inventory.list, "Workload")
            return JSONResponse({"kind": "WorkloadList", "items": items})
        query = workload_query(request.query_params)
        body = await run_in_threadpool(plane.inventory.page, query, plane.clock())
        return JSONResponse(body)

    async def pending(request: Request) -> Response:
        await callers.read(request)
        accounts = await run_in_threadpool(plane.usage.pending)
        return JSONResponse(
            {
                "kind": "PendingServiceAccountList",
                "items": [a.to_json() for a in accounts],
                "limits": {
                    "perCluster": plane.usage.per_cluster,
                    "total": plane.usage.total,
                    "droppedByThisReplica": plane.usage.dropped,
                },
            }
        )

    async def stale(request: Request) -> Response:
        await callers.read(request)
        days = parse_decimal(request.query_params.get("days", ""), 6)
        if days is None or not 0 <= days <= 36500:
            raise InvalidRequest("days must be a number of days from 0 to 36500")
        items = await run_in_threadpool(plane.inventory.stale, float(days), plane.clock())
        return JSONResponse({"kind": "StaleIdentityReport", "days": days, "items": items})

    async def report(request: Request) -> Response:
        await callers.read(request)
        params = request.query_params
        days = parse_decimal(params.get("stale_days", "30"), 6)
        if days is None or not 0 <= days <= 36500:
            raise InvalidRequest("stale_days must be a number of days from 0 to 36500")
        body = await run_in_threadpool(
            plane.reports.report,
            params.get("since") or None,
            params.get("until") or None,
            plane.clock(),
            float(days),
        )
        return JSONResponse(body)

    async def list_keys(request: Request) -> Response:
        await callers.read(request)
        records = await run_in_threadpool(plane.keys.list_keys)
        return JSONResponse({"keys": [key_json(r) for r in records]})

    async def rotate_keys(request: Request) -> Response:
        principal = await callers.admin(request)
        record = await run_in_threadpool(plane.rotation.rotate, principal.name)
        plane.snapshots.notify_changes()
        records = await run_in_threadpool(plane.keys.list_keys)
        return JSONResponse({"active": key_json(record), "keys": [key_json(r) for r in records]})

    return [
        Route("/v1/apply", apply, methods=["POST"]),
        Route("/v1/clusters", lister("Cluster"), methods=["GET"]),
        Route("/v1/workloads", workloads, methods=["GET"]),
        Route("/v1/workloadtemplates", lister("WorkloadTemplate"), methods=["GET"]),
        Route("/v1/pending", pending, methods=["GET"]),
        Route("/v1/reports/stale", stale, methods=["GET"]),
        Route("/v1/report", report, methods=["GET"]),
        Route("/v1/keys", list_keys, methods=["GET"]),
        Route("/v1/keys/rotate", rotate_keys, methods=["POST"]),
        Route("/v1/policy/versions", policy_versions, methods=["GET"]),
        Route("/v1/policy/versions/{revision}", policy_version, methods=["GET"]),
        Route("/v1/policy/rollback", policy_rollback, methods=["POST"]),
        Route("/v1/policy/diff", policy_diff, methods=["GET"]),
        Route("/v1/policy/explain", policy_explain, methods=["POST"]),
    ]
