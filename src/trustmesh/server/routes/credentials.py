"""Credentials of the control plane's APIs (DESIGN §7): a new credential for one agent
instance of a cluster, people (``trustmesh user add|list|remove``), and listing,
rotating and revoking any credential. Listing needs a person of any role; every change
the admin role; every change is an audit event (``admin.credential_*``)
committed with it (``server/credentials.py``). Secrets appear once, in the answer that
creates them, never cached."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.errors import InvalidRequest
from trustmesh.common.http import NO_STORE, read_json
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.credentials import (
    DEFAULT_OVERLAP,
    MAX_LIFETIME,
    MAX_OVERLAP,
    check_agent_id,
    check_person,
    check_role,
    check_seconds,
)
from trustmesh.server.login import check_login
from trustmesh.server.routes._auth import Callers

MAX_CREDENTIAL_BODY = 16 * 1024


async def optional_json(request: Request, allowed: set[str]) -> dict[str, Any]:
    """The JSON body, or ``{}`` when there is none; members outside ``allowed`` are
    refused by name."""
    if request.headers.get("content-type") is None and request.headers.get(
        "content-length", "0"
    ) in ("", "0"):
        return {}
    document = await read_json(request, MAX_CREDENTIAL_BODY)
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise InvalidRequest(
            f"unknown member {unknown[0][:64]!r} (known: {', '.join(sorted(allowed))})"
        )
    return document


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    async def issue(request: Request) -> Response:
        """``{"agent"?, "expires_in"?}`` -> the new credential of that agent instance."""
        principal = await callers.admin(request)
        document = await optional_json(request, {"agent", "expires_in"})
        agent = document.get("agent")
        if agent is not None:
            check_agent_id(agent)
        expires_in = document.get("expires_in")
        if expires_in is not None:
            expires_in = check_seconds(expires_in, "expires_in", 1, MAX_LIFETIME)
        name = request.path_params["name"]
        record, secret = await run_in_threadpool(
            plane.agents.issue_credential, name, principal.name, agent, expires_in
        )
        return JSONResponse(
            {
                "cluster": name,
                "agent": record.agent,
                "id": record.id,
                "expires_at": record.expires_at,
                "token": secret,
            },
            headers=NO_STORE,
        )

    async def listing(request: Request) -> Response:
        await callers.read(request)
        cluster = request.query_params.get("cluster") or None
        unknown = sorted(set(request.query_params) - {"cluster"})
        if unknown:
            raise InvalidRequest(f"unknown query parameter {unknown[0][:64]!r}")
        found = await run_in_threadpool(plane.credential_admin.listing, cluster)
        return JSONResponse({"credentials": found}, headers=NO_STORE)

    async def rotate(request: Request) -> Response:
        """``{"overlap"?}``: seconds the replaced secret keeps working (default 3600)."""
        principal = await callers.admin(request)
        document = await optional_json(request, {"overlap"})
        overlap = document.get("overlap", DEFAULT_OVERLAP)
        overlap = check_seconds(overlap, "overlap", 0, MAX_OVERLAP)
        record, secret = await run_in_threadpool(
            plane.credential_admin.rotate,
            request.path_params["id"],
            principal.name,
            overlap,
        )
        body = {"credential": record.to_json(plane.clock()), "token": secret}
        return JSONResponse(body, headers=NO_STORE)

    async def revoke(request: Request) -> Response:
        """``{"reason"?}``; 200 with ``revoked: false`` when it was revoked already."""
        principal = await callers.admin(request)
        document = await optional_json(request, {"reason"})
        reason = document.get("reason", "")
        if not isinstance(reason, str):
            raise InvalidRequest("reason must be a string")
        record, revoked = await run_in_threadpool(
            plane.credential_admin.revoke, request.path_params["id"], principal.name, reason
        )
        return JSONResponse(
            {"revoked": revoked, "credential": record.to_json(plane.clock())}, headers=NO_STORE
        )

    async def add_person(request: Request) -> Response:
        """``{"name", "role", "expires_in"?}`` -> the person's credential, once."""
        principal = await callers.admin(request)
        document = await optional_json(request, {"name", "role", "expires_in"})
        name = check_person(document.get("name"))
        role = check_role(document.get("role"))
        expires_in = document.get("expires_in")
        if expires_in is not None:
            expires_in = check_seconds(expires_in, "expires_in", 1, MAX_LIFETIME)
        record, secret = await run_in_threadpool(
            plane.credential_admin.add_person, name, role, principal.name, expires_in
        )
        return JSONResponse(
            {
                "person": name,
                "role": role,
                "id": record.id,
                "expires_at": record.expires_at,
                "token": secret,
            },
            headers=NO_STORE,
        )

    async def people(request: Request) -> Response:
        await callers.read(request)
        found = await run_in_threadpool(plane.credential_admin.people)
        return JSONResponse({"people": found}, headers=NO_STORE)

    async def remove_person(request: Request) -> Response:
        """``{"reason"?}``: the person's credential is revoked now."""
        principal = await callers.admin(request)
        document = await optional_json(request, {"reason"})
        reason = document.get("reason", "")
        if not isinstance(reason, str):
            raise InvalidRequest("reason must be a string")
        record = await run_in_threadpool(
            plane.remove_person,
            request.path_params["name"],
            principal.name,
            reason,
        )
        return JSONResponse({"credential": record.to_json(plane.clock())}, headers=NO_STORE)

    async def login(request: Request) -> Response:
        """``{"cluster", "ttl"?}`` -> a person's login token for that cluster."""
        principal = await callers.read(request)
        cluster, ttl = check_login(await optional_json(request, {"cluster", "ttl"}))
        answer = await plane.logins.login(principal, cluster, ttl)
        return JSONResponse(answer, headers=NO_STORE)

    return [
        Route("/v1/login", login, methods=["POST"]),
        Route("/v1/people", add_person, methods=["POST"]),
        Route("/v1/people", people, methods=["GET"]),
        Route("/v1/people/{name}/remove", remove_person, methods=["POST"]),
        Route("/v1/clusters/{name}/credentials", issue, methods=["POST"]),
        Route("/v1/credentials", listing, methods=["GET"]),
        Route("/v1/credentials/{id}/rotate", rotate, methods=["POST"]),
        Route("/v1/credentials/{id}/revoke", revoke, methods=["POST"]),
    ]
