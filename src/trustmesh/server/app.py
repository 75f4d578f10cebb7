"""The control plane's HTTP surface (Starlette). Each handler parses, calls one
ControlPlane method, renders; errors are JSON, never stack traces."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from trustmesh.identity.rfc7662 import introspect
from trustmesh.identity.rfc8693 import OAuthError, parse_form
from trustmesh.manifests import ManifestError
from trustmesh.policy.compiler import PolicyError
from trustmesh.registry import RegistryConflict
from trustmesh.revocation import RevocationError
from trustmesh.server.audit_routes import audit_routes
from trustmesh.server.controlplane import ControlPlane, NotFound, PolicyTestFailed
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
from trustmesh.server.recorder import exchange_failed_event, issued_event
from trustmesh.server.ssf import ssf_routes

log = logging.getLogger("trustmesh.server")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class Metrics:
    def __init__(self, plane: ControlPlane) -> None:
        self.registry = CollectorRegistry()
        Gauge(
            "trustmesh_audit_entries",
            "Entries in the audit log (this replica's view)",
            registry=self.registry,
        ).set_function(lambda: plane.audit.size)
        Gauge(
            "trustmesh_audit_inconsistent",
            "1 when the stored audit log no longer extends its last signed checkpoint",
            registry=self.registry,
        ).set_function(lambda: 1.0 if plane.audit.inconsistent else 0.0)
        Gauge(
            "trustmesh_audit_write_failures",
            "Control-plane audit events that could not be written (since start)",
            registry=self.registry,
        ).set_function(lambda: plane.recorder.failures)
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
    metrics = Metrics(plane)

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
        """RFC 8693 exchange. Every outcome is audited; a token is returned only once its
        ``token.issued`` event is stored (503 if the audit log cannot be written)."""
        started = time.perf_counter()
        source = plane.audit.source
        with plane.tracing.span("token.exchange", request.headers.get("traceparent")) as span:
            form: dict[str, list[str]] = {}
            try:
                require_content_type(request, "application/x-www-form-urlencoded")
                form = parse_form(await read_body(request, MAX_FORM_BODY))
                result = await plane.exchange.exchange(form)
            except (BadRequest, OAuthError) as exc:
                error = exc.error if isinstance(exc, OAuthError) else "invalid_request"
                metrics.exchanges.labels(error).inc()
                span.set("trustmesh.outcome", error)
                subject = form.get("subject_token", [None])[0]
                plane.recorder.submit(
                    exchange_failed_event(
                        source, error, exc.description, subject, span.trace_id, span.span_id
                    )
                )
                if isinstance(exc, OAuthError):
                    return JSONResponse(exc.body(), exc.status, headers=NO_STORE)
                return error_response(exc.status, "invalid_request", exc.description)
            span.set("trustmesh.spiffe_id", result.spiffe_id)
            span.set("trustmesh.outcome", "issued")
            audiences = list(result.response.get("audience", [])) or form.get("audience", [])
            try:
                await plane.recorder.record(
                    issued_event(
                        source,
                        result,
                        form["subject_token"][0],
                        audiences,
                        span.trace_id,
                        span.span_id,
                    )
                )
            except Exception:
                metrics.exchanges.labels("audit_unavailable").inc()
                return JSONResponse(
                    {
                        "error": "temporarily_unavailable",
                        "error_description": "the audit log cannot be written; no token is issued without its audit record",
                    },
                    503,
                    headers=NO_STORE,
                )
        metrics.exchanges.labels("issued").inc()
        metrics.exchange_seconds.observe(time.perf_counter() - started)
        return JSONResponse(
            result.response, headers={**NO_STORE, "traceparent": span.traceparent()}
        )

    async def introspection(request: Request) -> Response:
        await authenticate(request, admin_only=False)
        require_content_type(request, "application/x-www-form-urlencoded")
        try:
            form = parse_form(await read_body(request, MAX_FORM_BODY))
            return JSONResponse(
                introspect(form, plane.verifier, plane.revocation_of), headers=NO_STORE
            )
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
        actor = _actor(document, principal)
        message = str(document.get("message") or "")[:2000]
        dry_run = bool(document.get("dryRun", False))
        try:
            result = await run_in_threadpool(plane.apply, pairs, actor, dry_run, message)
        except ManifestError as exc:
            return error_response(
                400, "invalid_manifest", str(exc), problems=[str(p) for p in exc.problems]
            )
        except (RegistryConflict, PolicyError) as exc:
            return error_response(409, "conflict", str(exc), problems=exc.problems)
        except PolicyTestFailed as exc:
            return _tests_failed(exc)
        plane.notify_changes()
        return JSONResponse(result.to_json())

    async def policy_versions(request: Request) -> Response:
        await authenticate(request)
        versions = await run_in_threadpool(plane.catalog.history)
        return JSONResponse({"versions": [v.summary() for v in versions]})

    async def policy_version(request: Request) -> Response:
        await authenticate(request)
        wanted = request.path_params["revision"]
        if wanted == "current":
            version = await run_in_threadpool(plane.catalog.current)
        elif wanted.isdigit():
            found = await run_in_threadpool(plane.catalog.get, int(wanted))
            if found is None:
                return error_response(404, "not_found", f"policy revision {wanted} does not exist")
            version = found
        else:
            return error_response(400, "invalid_request", "revision must be a number or 'current'")
        return JSONResponse(version.to_json())

    async def policy_rollback(request: Request) -> Response:
        principal = await authenticate(request)
        document = await read_json(request)
        revision = document.get("revision")
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise BadRequest(400, "invalid_request", "revision must be a non-negative integer")
        try:
            result = await run_in_threadpool(
                plane.rollback,
                revision,
                _actor(document, principal),
                str(document.get("message") or "")[:2000],
            )
        except NotFound as exc:
            return error_response(404, "not_found", str(exc))
        except PolicyError as exc:
            return error_response(409, "conflict", str(exc), problems=exc.problems)
        except PolicyTestFailed as exc:
            return _tests_failed(exc)
        plane.notify_changes()
        return JSONResponse(result.to_json())

    async def create_revocation(request: Request) -> Response:
        principal = await authenticate(request)
        document = await read_json(request, 64 * 1024)
        kind, value, reason = (
            document.get("kind"),
            document.get("value"),
            document.get("reason", ""),
        )
        kind = {"spiffeId": "subject", "spiffe_id": "subject"}.get(str(kind), kind)
        if kind not in ("jti", "subject", "workload", "cluster", "key"):
            raise BadRequest(
                400,
                "invalid_request",
                "kind must be jti, subject (or spiffeId), workload, cluster or key",
            )
        if not isinstance(value, str) or not value:
            raise BadRequest(400, "invalid_request", "value must be a non-empty string")
        if not isinstance(reason, str):
            raise BadRequest(400, "invalid_request", "reason must be a string")
        try:
            entry, created = await run_in_threadpool(
                plane.revoke, kind, value, reason, principal.name
            )
        except NotFound as exc:
            return error_response(404, "not_found", str(exc))
        except RevocationError as exc:
            return error_response(400, "invalid_request", str(exc))
        plane.notify_changes()
        return JSONResponse(
            {"created": created, "revocation": entry.to_json()}, 201 if created else 200
        )

    def _since(request: Request) -> int:
        raw = request.query_params.get("since", "0")
        if not raw.isdigit() or len(raw) > 18:
            raise BadRequest(
                400,
                "invalid_request",
                "since must be a revocation revision (a non-negative integer)",
            )
        since = int(raw)
        current = plane.revocations.revision
        if since > current:
            raise BadRequest(
                400,
                "invalid_request",
                f"since={since} is ahead of this control plane's revocation revision {current}; resync with since=0",
            )
        return since

    async def list_revocations(request: Request) -> Response:
        """Entries after ``since`` (all in force for 0). With ``wait``, a long poll:
        answers as soon as there is something newer, else empty after ``wait`` s."""
        await authenticate(request, admin_only=False)
        since = _since(request)
        try:
            wait = min(max(float(request.query_params.get("wait", "0")), 0.0), 30.0)
        except ValueError:
            raise BadRequest(400, "invalid_request", "wait must be a number of seconds") from None
        deadline = time.monotonic() + wait
        while plane.revocations.revision <= since and not plane.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(plane.wait_for_change().wait(), min(remaining, 0.5))
        current, entries = await run_in_threadpool(plane.revocation_store.since, since)
        return JSONResponse(
            {"revision": current, "since": since, "entries": [e.to_json() for e in entries]},
            headers=NO_STORE,
        )

    async def revocation_stream(request: Request) -> Response:
        """Server-sent events (text/event-stream): one ``revocation`` event per entry,
        its ``id`` the revision, so ``Last-Event-ID`` (or ``since``) resumes."""
        await authenticate(request, admin_only=False)
        last_event = request.headers.get("last-event-id")
        since = int(last_event) if last_event and last_event.isdigit() else _since(request)

        async def events() -> AsyncIterator[bytes]:
            cursor = since
            yield b": trustmesh revocations\n\n"
            while not plane.stopping:
                if plane.revocations.revision > cursor:
                    _, entries = await run_in_threadpool(plane.revocation_store.since, cursor)
                    for entry in entries:
                        data = json.dumps(entry.to_json())
                        yield f"id: {entry.revision}\nevent: revocation\ndata: {data}\n\n".encode()
                        cursor = max(cursor, entry.revision)
                    cursor = max(cursor, plane.revocations.revision)
                    continue
                try:
                    await asyncio.wait_for(plane.wait_for_change().wait(), 15.0)
                except TimeoutError:
                    yield b": keep-alive\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    async def agent_bundle(request: Request) -> Response:
        """Long poll: answers at once if the cluster's bundle is newer than ``after``,
        else when it changes, else 304 after ``wait`` seconds (at most 30)."""
        principal = await authenticate(request, admin_only=False)
        query = request.query_params
        cluster = principal.cluster or query.get("cluster") or ""
        if not principal.may_act_for(cluster):
            return error_response(
                403, "insufficient_scope", f"this credential is for cluster {principal.cluster}"
            )
        after = _parse_version(query.get("after"))
        try:
            wait = min(max(float(query.get("wait", "0")), 0.0), 30.0)
        except ValueError:
            raise BadRequest(400, "invalid_request", "wait must be a number of seconds") from None
        agent_id = query.get("agent", "")
        if after is not None and agent_id:
            if not _AGENT_ID.match(agent_id):
                raise BadRequest(
                    400, "invalid_request", "agent must be 1-64 letters, digits or '-'"
                )
            await run_in_threadpool(plane.record_agent, cluster, agent_id, after)
        deadline = time.monotonic() + wait
        while after is not None and plane.bundle_version() <= after:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or plane.stopping:
                return Response(status_code=304)
            with contextlib.suppress(TimeoutError):  # slices, so a shutdown ends the poll
                await asyncio.wait_for(plane.wait_for_change().wait(), min(remaining, 0.5))
        try:
            version, token = await run_in_threadpool(plane.signed_bundle, cluster)
        except NotFound as exc:
            return error_response(404, "not_found", str(exc))
        return JSONResponse({"version": list(version), "bundle": token})

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
        principal = await authenticate(request)
        record = await run_in_threadpool(plane.rotate_keys, principal.name)
        plane.notify_changes()
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
        Route("/v1/agent/bundle", agent_bundle, methods=["GET"]),
        Route("/v1/revocations", list_revocations, methods=["GET"]),
        Route("/v1/revocations", create_revocation, methods=["POST"]),
        Route("/v1/revocations/stream", revocation_stream, methods=["GET"]),
        Route("/v1/policy/versions", policy_versions, methods=["GET"]),
        Route("/v1/policy/versions/{revision}", policy_version, methods=["GET"]),
        Route("/v1/policy/rollback", policy_rollback, methods=["POST"]),
        *ssf_routes(plane, authenticate),
        *audit_routes(plane.audit, authenticate, lambda: plane.stopping),
    ]
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)


_AGENT_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def _actor(document: dict[str, Any], principal: Principal) -> str:
    return str(document.get("author") or principal.name)[:200]


def _parse_version(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    policy, _, registry = value.partition(".")
    if not policy.isdigit() or not registry.isdigit():
        raise BadRequest(
            400, "invalid_request", "after must be POLICY.REGISTRY revisions, e.g. 4.12"
        )
    return int(policy), int(registry)


def _tests_failed(exc: PolicyTestFailed) -> Response:
    return error_response(
        422,
        "policy_test_failed",
        str(exc),
        problems=[r.describe() for r in exc.failed],
        failed=[r.to_json() for r in exc.failed],
    )


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
