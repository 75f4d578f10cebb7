"""The control plane's HTTP surface (Starlette). Each handler parses, calls one
ControlPlane method, renders; errors are JSON, never stack traces."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.identity.rfc7662 import introspect
from trustmesh.identity.rfc8693 import OAuthError, parse_form
from trustmesh.manifests import ManifestError
from trustmesh.registry import RegistryConflict
from trustmesh.server.controlplane import ControlPlane, NotFound
from trustmesh.server.credentials import Principal
from trustmesh.server.http import (
    EXCEPTION_HANDLERS,
    MAX_FORM_BODY,
    BadRequest,
    bearer_token,
    error_response,
    read_body,
    read_json,
    require_content_type,
)

log = logging.getLogger("trustmesh.server")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.exchanges = Counter(
            "trustmesh_token_exchanges_total",
            "Token exchanges by result",
            ["result"],
            registry=self.registry,
        )
        self.exchange_seconds = Histogram(
            "trustmesh_token_exchange_seconds",
            "Token exchange latency inside the server",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
            registry=self.registry,
        )


def build_app(plane: ControlPlane) -> Starlette:
    metrics = Metrics()

    async def authenticate(request: Request, admin_only: bool = True) -> Principal:
        secret = bearer_token(request)
        if secret is None:
            raise BadRequest(401, "invalid_token", "missing Authorization: Bearer credential")
        principal = await run_in_threadpool(plane.credentials.authenticate, secret)
        if principal is None:
            raise BadRequest(401, "invalid_token", "credential is not valid")
        if admin_only and not principal.is_admin:
            raise BadRequest(403, "insufficient_scope", "this endpoint needs the admin credential")
        return principal

    # -- OAuth endpoints ---------------------------------------------------------------
    async def token(request: Request) -> Response:
        started = time.perf_counter()
        try:
            require_content_type(request, "application/x-www-form-urlencoded")
            form = parse_form(await read_body(request, MAX_FORM_BODY))
            result = await plane.exchange.exchange(form)
        except BadRequest as exc:
            metrics.exchanges.labels("invalid_request").inc()
            return error_response(exc.status, "invalid_request", exc.description)
        except OAuthError as exc:
            metrics.exchanges.labels(exc.error).inc()
            return JSONResponse(exc.body(), exc.status, headers=NO_STORE)
        metrics.exchanges.labels("issued").inc()
        metrics.exchange_seconds.observe(time.perf_counter() - started)
        return JSONResponse(result.response, headers=NO_STORE)

    async def introspection(request: Request) -> Response:
        await authenticate(request, admin_only=False)
        require_content_type(request, "application/x-www-form-urlencoded")
        try:
            form = parse_form(await read_body(request, MAX_FORM_BODY))
            return JSONResponse(introspect(form, plane.verifier), headers=NO_STORE)
        except OAuthError as exc:
            return JSONResponse(exc.body(), exc.status, headers=NO_STORE)

    # -- public documents --------------------------------------------------------------
    async def discovery(request: Request) -> Response:
        return JSONResponse(plane.discovery(), headers={"Cache-Control": "public, max-age=60"})

    async def jwks(request: Request) -> Response:
        return JSONResponse(plane.jwks(), headers={"Cache-Control": "public, max-age=60"})

    async def spiffe_bundle(request: Request) -> Response:
        return JSONResponse(plane.spiffe_bundle(), headers={"Cache-Control": "public, max-age=60"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(request: Request) -> Response:
        ready, detail = plane.ready()
        return JSONResponse(detail, 200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- admin API ---------------------------------------------------------------------
    async def apply(request: Request) -> Response:
        principal = await authenticate(request)
        document = await read_json(request)
        files = document.get("files")
        if not isinstance(files, list) or not files:
            raise BadRequest(
                400, "invalid_request", 'body must be {"files": [{"path": …, "content": …}, …]}'
            )
        pairs = []
        for item in files:
            if not isinstance(item, dict) or not isinstance(item.get("content"), str):
                raise BadRequest(400, "invalid_request", "each file needs a string content")
            pairs.append((str(item.get("path") or "<request>"), item["content"]))
        actor = str(document.get("author") or principal.name)[:200]
        dry_run = bool(document.get("dryRun", False))
        try:
            revision, changes = await run_in_threadpool(plane.apply, pairs, actor, dry_run)
        except ManifestError as exc:
            return error_response(
                400, "invalid_manifest", str(exc), problems=[str(p) for p in exc.problems]
            )
        except RegistryConflict as exc:
            return error_response(409, "conflict", str(exc), problems=exc.problems)
        return JSONResponse(
            {"revision": revision, "dryRun": dry_run, "changes": [c.as_dict() for c in changes]}
        )

    def lister(kind: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            await authenticate(request)
            items = await run_in_threadpool(plane.list_objects, kind)
            return JSONResponse({"kind": f"{kind}List", "items": items})

        return handler

    async def list_keys(request: Request) -> Response:
        await authenticate(request)
        records = await run_in_threadpool(plane.list_keys)
        return JSONResponse({"keys": [_key_json(r) for r in records]})

    async def rotate_keys(request: Request) -> Response:
        await authenticate(request)
        record = await run_in_threadpool(plane.rotate_keys)
        return JSONResponse(
            {"active": _key_json(record), "keys": [_key_json(r) for r in plane.list_keys()]}
        )

    async def cluster_credential(request: Request) -> Response:
        principal = await authenticate(request)
        name = request.path_params["name"]
        try:
            secret = await run_in_threadpool(plane.cluster_credential, name, principal.name)
        except NotFound as exc:
            return error_response(404, "not_found", str(exc))
        return JSONResponse({"cluster": name, "token": secret}, headers=NO_STORE)

    async def agent_config(request: Request) -> Response:
        principal = await authenticate(request, admin_only=False)
        try:
            return JSONResponse(plane.agent_config(principal, request.query_params.get("cluster")))
        except NotFound as exc:
            return error_response(404, "not_found", str(exc))
        except PermissionError as exc:
            return error_response(403, "insufficient_scope", str(exc))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await plane.start()
        try:
            yield
        finally:
            await plane.stop()

    routes = [
        Route("/oauth2/token", token, methods=["POST"]),
        Route("/oauth2/introspect", introspection, methods=["POST"]),
        Route("/.well-known/openid-configuration", discovery, methods=["GET"]),
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
        Route("/.well-known/spiffe-bundle", spiffe_bundle, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/apply", apply, methods=["POST"]),
        Route("/v1/clusters", lister("Cluster"), methods=["GET"]),
        Route("/v1/workloads", lister("Workload"), methods=["GET"]),
        Route("/v1/keys", list_keys, methods=["GET"]),
        Route("/v1/keys/rotate", rotate_keys, methods=["POST"]),
        Route("/v1/clusters/{name}/credentials", cluster_credential, methods=["POST"]),
        Route("/v1/agent/config", agent_config, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)


def _key_json(record: Any) -> dict[str, Any]:
    return {
        "kid": record.kid,
        "alg": record.alg,
        "state": record.state,
        "created_at": record.created_at,
        "activated_at": record.activated_at,
        "retired_at": record.retired_at,
        "remove_after": record.remove_after,
    }
