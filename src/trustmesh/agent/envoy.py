"""Envoy HTTP ext_authz (DESIGN §4): what a check request means and how to answer it.

Envoy's HTTP ext_authz service (``envoy.filters.http.ext_authz`` with ``http_service``)
sends one request per client request, to ``path_prefix`` + the original path (query
included), with the original method, the original ``Host`` and the headers its config
allows, and no body. Envoy uses only the status and the headers of the answer:

* 200 — allow; ``x-trustmesh-spiffe-id``, ``x-trustmesh-decision-id``,
  ``traceparent`` (the decision span as parent) and the gateway claims
  (``x-trustmesh-claim-<name>`` for each claim of :attr:`ExtAuthzOptions.gateway_claims`
  the identity carries, DESIGN §9 "Claims at the gateway") reach the upstream when
  listed in ``authorization_response.allowed_upstream_headers`` (Envoy then overwrites
  any value the client sent itself; a claim header the identity does not carry is
  removed from the client's request by the Envoy configuration, ``trustmesh envoy
  config``, before the check);
* 401 with ``WWW-Authenticate: Bearer`` — missing, malformed or invalid token, or, with
  ``--trust-xfcc`` and no bearer token, a forwarded client certificate that does not
  authenticate (``agent/xfcc.py``);
* 403 — the policy denies the request, or the request is refused before any policy
  is asked: a path, host or namespace the canonicalisation refuses (dot or empty
  segments, path parameters, encoded separators, control characters…:
  ``request/canonical.py``, DESIGN §3), a missing or repeated ``Host``;
* 503 — the agent has no verified policy bundle yet.

The client's address (``request.source`` of the decision's audit event) comes from
:data:`SOURCE_HEADER`, which the filter adds to every check the same way.

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

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from trustmesh.agent.answer import Answer
from trustmesh.common.errors import ConfigError, RequestError
from trustmesh.request import ServiceRequest, parse_request

if TYPE_CHECKING:  # annotations only: `trustmesh envoy config` imports this module light
    from trustmesh.agent.decide import Outcome
    from trustmesh.identity.svid import VerifiedIdentity
    from trustmesh.policy.engine import Decision

PREFIX = "/ext_authz"
NAMESPACE_HEADER = "x-trustmesh-namespace"
SOURCE_HEADER = "x-trustmesh-source"
"""The address of the client Envoy is checking a request of: Envoy adds it to the check
(``headers_to_add``, ``%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%``: the peer of
the downstream connection, never read from ``X-Forwarded-For``) after its
``header_mutation`` removed any the client sent. Recorded as ``request.source`` when it
is one IP address."""
SPIFFE_ID_HEADER = "x-trustmesh-spiffe-id"
DECISION_ID_HEADER = "x-trustmesh-decision-id"
TRACEPARENT_HEADER = "traceparent"
CLAIM_HEADER_PREFIX = "x-trustmesh-claim-"
DEFAULT_GATEWAY_CLAIMS = ("project", "environment", "tier", "cluster")
MAX_CLAIM_HEADER_VALUE = 1024
REALM = "trustmesh"
_CLAIM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# what a claim value keeps as it is in a header: visible ASCII but "%" (an escape's start)
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


@dataclass(frozen=True, slots=True)
class ExtAuthzOptions:
    """How the agent answers ext_authz checks. ``trust_xfcc``: read the identity from
    ``x-forwarded-client-cert`` when no bearer token is present (``--trust-xfcc``: only
    behind an Envoy that terminates mTLS and sets that header itself); ``gateway_claims``:
    the claims sent upstream as ``x-trustmesh-claim-<name>`` on allowed checks
    (``--gateway-claims``)."""

    trust_xfcc: bool = False
    gateway_claims: tuple[str, ...] = DEFAULT_GATEWAY_CLAIMS

    @property
    def claim_headers(self) -> tuple[tuple[str, str], ...]:
        """(claim, header name) of each gateway claim."""
        return tuple((name, CLAIM_HEADER_PREFIX + name) for name in self.gateway_claims)


def parse_gateway_claims(text: str) -> tuple[str, ...]:
    """``--gateway-claims a,b,c`` (empty: none): claim names as header-name tokens,
    lowercase letters, digits, ``_`` and ``-``, at most 32, none twice."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in names:
        if not _CLAIM_NAME.fullmatch(name):
            raise ConfigError(
                f"--gateway-claims: {name[:80]!r} is not a claim name for a header (lowercase "
                "letters, digits, '_' and '-', at most 64)"
            )
    if len(set(names)) != len(names) or len(names) > 32:
        raise ConfigError("--gateway-claims: at most 32 claim names, none twice")
    return names


def header_value(value: str) -> str:
    """A claim value as a header value: as it is when it is visible ASCII without "%",
    else percent-encoded UTF-8 (RFC 3986 §2.1) — never a control character, a line
    break or a leading or trailing space the upstream could misread."""
    if value.isascii() and value.isprintable() and " " not in value and "%" not in value:
        return value
    return quote(value, safe=_SAFE, errors="surrogatepass")


def claim_headers(claims: Mapping[str, Any], names: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The gateway-claim headers of an identity: each named claim that is a string (an
    empty one, or one past :data:`MAX_CLAIM_HEADER_VALUE` once encoded, is left out)."""
    headers = {}
    for claim, header_name in names:
        value = claims.get(claim)
        if isinstance(value, str) and value:
            encoded = header_value(value)
            if len(encoded) <= MAX_CLAIM_HEADER_VALUE:
                headers[header_name] = encoded
    return headers


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


def response(outcome: Outcome, traceparent: str, claims: Iterable[tuple[str, str]] = ()) -> Answer:
    """The answer Envoy acts on: 200 allow, 401 no or bad token, 403 denied.
    ``claims``: the gateway claims (:attr:`ExtAuthzOptions.claim_headers`)."""
    if outcome.refusal is not None:
        return unauthenticated(outcome.refusal.reason, outcome.refusal.description)
    assert outcome.identity is not None and outcome.decision is not None
    if outcome.decision.allowed:
        return allowed(outcome.identity, outcome.decision, traceparent, claims)
    return denied(outcome.decision)


def allowed(
    identity: VerifiedIdentity,
    decision: Decision,
    traceparent: str | None = None,
    claims: Iterable[tuple[str, str]] = (),
) -> Answer:
    """``traceparent`` (the decision's span as the parent) reaches the upstream when
    ``allowed_upstream_headers`` lists it, so the upstream's spans join the trace."""
    headers = {
        SPIFFE_ID_HEADER: identity.spiffe_id,
        DECISION_ID_HEADER: decision.decision_id,
        **claim_headers(identity.claims, claims),
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
