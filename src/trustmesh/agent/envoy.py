"""Envoy HTTP ext_authz (DESIGN §4): what a check request means and how to answer it.

Envoy's HTTP ext_authz service (``envoy.filters.http.ext_authz`` with ``http_service``)
sends one request per client request, to ``path_prefix`` + the original path (query
included), with the original method, the original ``Host`` and the headers its config
allows, and no body. Envoy uses only the status and the headers of the answer:

* 200 — allow; ``x-trustmesh-spiffe-id``, ``x-trustmesh-decision-id`` and
  ``traceparent`` (the decision span as parent) reach the upstream when listed in
  ``authorization_response.allowed_upstream_headers`` (Envoy then overwrites any
  value the client sent itself);
* 401 with ``WWW-Authenticate: Bearer`` — missing, malformed or invalid token;
* 403 — the policy denies the request, or the request is refused before any policy
  is asked: a path, host or namespace the canonicalisation refuses (dot or empty
  segments, path parameters, encoded separators, control characters…:
  ``request/canonical.py``, DESIGN §3), a missing or repeated ``Host``;
* 503 — the agent has no verified policy bundle yet.

The destination namespace (DESIGN §3) comes from :data:`NAMESPACE_HEADER`. Envoy's
HTTP ext_authz service does not send ``context_extensions`` (they exist in the gRPC
``CheckRequest`` only), so the route carries the namespace as metadata and the filter
adds it to the check: ``http_service.authorization_request.headers_to_add`` with
``%METADATA(ROUTE:trustmesh:namespace)%`` — the value overrides a client's header of
that name, and a route without the metadata adds none (docs/agent-surfaces.md).

Envoy forwards the status, the body and the headers of a denial to the client, so a
denial says only that it is one and carries the decision id, never the names of the
bindings or roles involved (those are in ``/v1/authorize`` answers and the logs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trustmesh.agent.answer import Answer
from trustmesh.agent.decide import Outcome
from trustmesh.common.errors import RequestError
from trustmesh.identity.svid import VerifiedIdentity
from trustmesh.policy.engine import Decision
from trustmesh.request import ServiceRequest, parse_request

PREFIX = "/ext_authz"
NAMESPACE_HEADER = "x-trustmesh-namespace"
SPIFFE_ID_HEADER = "x-trustmesh-spiffe-id"
DECISION_ID_HEADER = "x-trustmesh-decision-id"
TRACEPARENT_HEADER = "traceparent"
REALM = "trustmesh"

_NO_STORE = {"Cache-Control": "no-store"}


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header value, or None."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def original_target(scope: Mapping[str, Any]) -> str:
    """The client's request target (path and query) from the check request's raw
    target, exactly as Envoy sent it: never decoded here, so the one canonicalisation
    (``request/canonical.py``) sees what the upstream will see."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        try:
            target = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("request.path is not valid UTF-8") from None
    else:
        target = str(scope.get("path", ""))
    path = target.split("?", 1)[0]
    if path != PREFIX and not path.startswith(PREFIX + "/"):
        raise RequestError(f"the check path must start with {PREFIX}/")
    rest = target[len(PREFIX) :]
    return rest if rest.startswith("/") else "/" + rest


def _one(values: list[str], what: str) -> str | None:
    if len(values) > 1:
        raise RequestError(f"the check request has more than one {what} header")
    return values[0] if values else None


def check_request(
    method: str, hosts: list[str], namespaces: list[str], scope: Mapping[str, Any]
) -> ServiceRequest:
    """The canonical service request an ext_authz check stands for (DESIGN §3): the
    client's method, ``Host`` and path, and the destination namespace the route set
    (:data:`NAMESPACE_HEADER`). RequestError, naming the problem, for anything the
    canonicalisation refuses — answered 403, never matched."""
    host = _one(hosts, "Host")
    if not host:
        raise RequestError("the check request has no Host header")
    namespace = _one(namespaces, NAMESPACE_HEADER) or ""
    request = parse_request(
        {
            "host": host,
            "path": original_target(scope),
            "method": method,
            "namespace": namespace,
        }
    )
    assert isinstance(request, ServiceRequest)
    return request


def response(outcome: Outcome, traceparent: str) -> Answer:
    """The answer Envoy acts on: 200 allow, 401 no or bad token, 403 denied."""
    if outcome.refusal is not None:
        return unauthenticated(outcome.refusal.reason, outcome.refusal.description)
    assert outcome.identity is not None and outcome.decision is not None
    if outcome.decision.allowed:
        return allowed(outcome.identity, outcome.decision, traceparent)
    return denied(outcome.decision)


def allowed(
    identity: VerifiedIdentity, decision: Decision, traceparent: str | None = None
) -> Answer:
    """``traceparent`` (the decision's span as the parent) reaches the upstream when
    ``allowed_upstream_headers`` lists it, so the upstream's spans join the trace."""
    headers = {
        SPIFFE_ID_HEADER: identity.spiffe_id,
        DECISION_ID_HEADER: decision.decision_id,
        **_NO_STORE,
    }
    if traceparent is not None:
        headers[TRACEPARENT_HEADER] = traceparent
    return Answer(200, {"allowed": True, "decision_id": decision.decision_id}, headers)


def denied(decision: Decision) -> Answer:
    return Answer(
        403,
        {
            "allowed": False,
            "error": "forbidden",
            "error_description": "the trustmesh policy does not allow this request",
            "decision_id": decision.decision_id,
        },
        {DECISION_ID_HEADER: decision.decision_id, **_NO_STORE},
    )


def unauthenticated(reason: str, description: str) -> Answer:
    """RFC 6750 §3: no ``error`` attribute when the request carried no token at all."""
    challenge = f'Bearer realm="{REALM}"'
    if reason != "missing_token":
        challenge += ', error="invalid_token"'
    return Answer(
        401,
        {
            "allowed": False,
            "error": "invalid_token" if reason != "missing_token" else "missing_token",
            "reason": reason,
            "error_description": description,
        },
        {"WWW-Authenticate": challenge, **_NO_STORE},
    )


def refused(description: str) -> Answer:
    """A request the canonicalisation refuses (DESIGN §3: 403 on ext_authz, never
    matched). Envoy passes the body to the client: it names the problem in the request,
    nothing about the policy."""
    return Answer(
        403,
        {
            "allowed": False,
            "error": "invalid_request",
            "error_description": description.replace("request.", "", 1),
        },
        _NO_STORE,
    )


def not_ready() -> Answer:
    return Answer(
        503,
        {
            "allowed": False,
            "error": "not_ready",
            "error_description": "the agent has no verified policy bundle yet",
        },
        {"Retry-After": "1", **_NO_STORE},
    )
