"""What agents fetch (DESIGN §4): their configuration and, by long poll, their
cluster's signed policy bundle. A cluster credential acts for its own cluster only.
And what people read about the agents: ``GET /v1/overview`` (any role), every cluster
with its agents' applied revisions, drift and staleness in one answer
(``server/overview.py``)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.audit.events import AGENT_ID
from trustmesh.common.errors import Forbidden, InvalidRequest
from trustmesh.common.numbers import parse_decimal, require_seconds
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.credentials import ADMIN
from trustmesh.server.routes._auth import Callers, allowed

MAX_WAIT = 30.0


def long_poll_wait(request: Request) -> float:
    """``wait``: seconds a long poll may hold the request, at most 30."""
    return min(require_seconds(request.query_params.get("wait"), "wait"), MAX_WAIT)


def _version(value: str | None) -> tuple[int, int] | None:
    """``after=POLICY.REGISTRY``."""
    if not value:
        return None
    policy, registry = (parse_decimal(part) for part in value.partition(".")[::2])
    if policy is None or registry is None:
        raise InvalidRequest("after must be POLICY.REGISTRY revisions, e.g. 4.12")
    return policy, registry


def routes(plane: ControlPlane, callers: Callers) -> list[Route]:
    async def config(request: Request) -> Response:
        principal = await callers.principal(request)
        return JSONResponse(plane.agents.config(principal, request.query_params.get("cluster")))

    async def bundle(request: Request) -> Response:
        """Answers at once if the cluster's bundle is newer than ``after``, else when it
        changes, else 304 after ``wait`` seconds. The agent (its credential's; the admin
        may name one with ``agent=ID``) is recorded as applying ``after``."""
        principal = await callers.principal(request)
        query = request.query_params
        cluster = principal.cluster or query.get("cluster") or ""
        if principal.cluster is None:
            allowed(principal, {ADMIN})
        if not principal.may_act_for(cluster):
            raise Forbidden(f"this credential is for cluster {principal.cluster}")
        after = _version(query.get("after"))
        wait = long_poll_wait(request)
        # A cluster credential is one agent's: it reports as that agent, whatever it
        # names; the admin may name one.
        agent_id = principal.agent or query.get("agent", "")
        if after is not None and agent_id:
            if not AGENT_ID.fullmatch(agent_id):
                raise InvalidRequest("agent must be 1-64 letters, digits, '.', '_' or '-'")
            await run_in_threadpool(plane.agents.record, cluster, agent_id, after)
        snapshots = plane.snapshots
        if after is not None and not await snapshots.wait_until(
            lambda: snapshots.bundle_version() > after, wait, holder=principal.credential_id
        ):
            return Response(status_code=304)
        version, token = await run_in_threadpool(plane.bundles.signed_bundle, cluster)
        return JSONResponse({"version": list(version), "bundle": token})

    async def overview(request: Request) -> Response:
        await callers.read(request)
        return JSONResponse(await run_in_threadpool(plane.overview.build))

    return [
        Route("/v1/overview", overview, methods=["GET"]),
        Route("/v1/agent/config", config, methods=["GET"]),
        Route("/v1/agent/bundle", bundle, methods=["GET"]),
    ]
