"""OpenID Shared Signals Framework 1.0 transmitter for the revocation list (DESIGN §5).

* ``GET /.well-known/ssf-configuration`` — Transmitter Configuration Metadata
  (SSF 1.0 "Transmitter Configuration Metadata"), public.
* ``POST /v1/ssf/poll`` — poll delivery of Security Event Tokens (RFC 8936 §2.4), with
  acknowledgements and error reports.
* ``GET /v1/ssf/stream`` and ``GET /v1/ssf/status`` — the caller's stream configuration
  and status (SSF 1.0 "Stream Configuration", "Stream Status"; read only: streams are
  implicit, see below).

Receivers and streams: every admin or cluster credential is one receiver with exactly
one stream, whose ``stream_id`` is the credential id. There is nothing to create: the
first poll starts the stream, and it holds every revocation in force
(``default_subjects: ALL``).

Events: every revocation is one SET (RFC 8417), built from its ``revocations`` row when
it is delivered and signed then with the active key, so it always verifies with the
JWKS of the moment (even after a key revocation). Per receiver the SET ``jti`` is
``<credential id>-<revocation revision>``: unique per SET, stable across redeliveries,
so receivers de-duplicate by ``jti``. ``txn`` (SSF 1.0 "The txn claim") names the
revocation, the same for every receiver.

Delivery state (``ssf_deliveries``): a row per (receiver, revision) once the receiver
acknowledged the SET or reported an error for it; a SET without a row is offered on
every poll. A SET is offered until acknowledged or until its revocation expires
(revocation + the maximum token lifetime + skew: no token it covers can still be valid,
so the event is moot); then maintenance drops the revocation and this module the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
from sqlalchemy import Connection, delete, exists, select
from sqlalchemy.dialects import postgresql, sqlite
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.identity.keys import ActiveKey
from trustmesh.revocation import Revocation
from trustmesh.server.controlplane import ControlPlane
from trustmesh.server.credentials import Principal
from trustmesh.server.http import BadRequest, read_body
from trustmesh.storage import Database
from trustmesh.storage.schema import revocations, ssf_deliveries

SPEC_VERSION = "1_0"
POLL_DELIVERY = "urn:ietf:rfc:8936"  # SSF 1.0 "Poll Delivery using HTTP"
BEARER_SCHEME = "urn:ietf:rfc:6750"  # SSF 1.0 authorization scheme (RFC 6750 bearer)
SET_TYP = "secevent+jwt"  # RFC 8417 §2.3 explicit typing
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
CREDENTIAL_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/credential-change"
EVENTS_SUPPORTED = (SESSION_REVOKED, CREDENTIAL_CHANGE)
KEY_CREDENTIAL_TYPE = "jwt-svid-signing-key"  # CAEP credential-change: mutually agreed type

DEFAULT_MAX_EVENTS = 100
MAX_EVENTS_CAP = 1000  # larger requests get at most this many (RFC 8936 §2.4: "up to")
MAX_ACKS = 10_000
MAX_POLL_BODY = 1024 * 1024
LONG_POLL_SECONDS = 25.0

ACKED, ERROR = "acked", "error"


# -- documents ---------------------------------------------------------------------------
def endpoints(issuer: str) -> dict[str, str]:
    return {
        "configuration": f"{issuer}/.well-known/ssf-configuration",
        "poll": f"{issuer}/v1/ssf/poll",
        "stream": f"{issuer}/v1/ssf/stream",
        "status": f"{issuer}/v1/ssf/status",
    }


def transmitter_configuration(issuer: str) -> dict[str, Any]:
    """SSF 1.0 "Transmitter Configuration Metadata". ``poll_endpoint`` is ours ("Other
    Claims MAY also be returned"); the same URL is each stream's
    ``delivery.endpoint_url``."""
    urls = endpoints(issuer)
    return {
        "spec_version": SPEC_VERSION,
        "issuer": issuer,
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "delivery_methods_supported": [POLL_DELIVERY],
        "configuration_endpoint": urls["stream"],
        "status_endpoint": urls["status"],
        "authorization_schemes": [{"spec_urn": BEARER_SCHEME}],
        "default_subjects": "ALL",
        "poll_endpoint": urls["poll"],
    }


def receiver_audience(issuer: str, receiver: str) -> str:
    """The ``aud`` of every SET for one receiver (SSF 1.0 "The aud Claim": receivers not
    known to be one entity get distinct SETs)."""
    return f"{issuer}/ssf/receivers/{receiver}"


def stream_configuration(issuer: str, principal: Principal) -> dict[str, Any]:
    """SSF 1.0 "Stream Configuration" of the caller's implicit stream."""
    return {
        "stream_id": principal.credential_id,
        "iss": issuer,
        "aud": receiver_audience(issuer, principal.credential_id),
        "delivery": {"method": POLL_DELIVERY, "endpoint_url": endpoints(issuer)["poll"]},
        "events_supported": list(EVENTS_SUPPORTED),
        "events_requested": list(EVENTS_SUPPORTED),
        "events_delivered": list(EVENTS_SUPPORTED),
        "description": f"trustmesh revocations for {principal.name}",
    }


# -- Security Event Tokens -------------------------------------------------------------
def set_jti(receiver: str, revision: int) -> str:
    return f"{receiver}-{revision}"


def revision_of(receiver: str, jti: str) -> int | None:
    """The revocation revision a receiver's SET ``jti`` names; None for anything else
    (another receiver's SET, or not ours at all)."""
    prefix = f"{receiver}-"
    if not jti.startswith(prefix):
        return None
    rest = jti[len(prefix) :]
    if not rest.isdigit() or len(rest) > 18:
        return None
    return int(rest)


def subject_id(entry: Revocation, issuer: str) -> dict[str, Any]:
    """The top-level ``sub_id`` (SSF 1.0 "Subject Members", RFC 9493 subject identifiers):

    * subject (and workload) — ``uri``, the SPIFFE ID;
    * jti — ``jwt_id`` (SSF 1.0 JWT ID subject identifier format): our issuer and the
      token's ``jti``;
    * cluster — ``opaque``, the registered cluster name;
    * key — ``opaque``, the ``kid``."""
    if entry.kind == "subject":
        return {"format": "uri", "uri": entry.value}
    if entry.kind == "jti":
        return {"format": "jwt_id", "iss": issuer, "jti": entry.value}
    return {"format": "opaque", "id": entry.value}


def event_of(entry: Revocation) -> tuple[str, dict[str, Any]]:
    """The one event of a revocation's SET (SSF 1.0 "The events claim": one event per SET).

    jti, subject and cluster revocations end every session their tokens carry: CAEP
    ``session-revoked``. A key revocation is CAEP ``credential-change`` with
    ``change_type: revoke`` and ``credential_type: jwt-svid-signing-key`` (CAEP allows a
    type the two parties agree on; none of its listed ones is a JWT signing key).
    ``trustmesh`` carries the revocation itself (SSF 1.0 "Additional fields")."""
    event: dict[str, Any] = {
        "event_timestamp": int(entry.revoked_at),
        "initiating_entity": "admin",
    }
    if entry.reason:
        event["reason_admin"] = {"en": entry.reason}
    event["trustmesh"] = {
        "kind": entry.kind,
        "value": entry.value,
        "revision": entry.revision,
        "revoked_at": entry.revoked_at,
        "expires_at": entry.expires_at,
        "actor": entry.actor,
    }
    if entry.kind == "key":
        event["credential_type"] = KEY_CREDENTIAL_TYPE
        event["change_type"] = "revoke"
        event["friendly_name"] = f"trustmesh signing key {entry.value}"
        return CREDENTIAL_CHANGE, event
    return SESSION_REVOKED, event


def set_claims(entry: Revocation, issuer: str, receiver: str, now: float) -> dict[str, Any]:
    """RFC 8417 §2.2 claims: ``iss``, ``iat``, ``jti``, ``aud``, ``txn``, ``events``; SSF
    1.0 SET profile: ``sub_id`` at the top, never ``sub`` nor ``exp``."""
    event_type, event = event_of(entry)
    return {
        "iss": issuer,
        "iat": int(now),
        "jti": set_jti(receiver, entry.revision),
        "aud": receiver_audience(issuer, receiver),
        "txn": f"revocation-{entry.revision}",
        "sub_id": subject_id(entry, issuer),
        "events": {event_type: event},
    }


def sign_set(claims: dict[str, Any], key: ActiveKey) -> str:
    """A JWS with header ``alg``, ``kid`` and ``typ: secevent+jwt`` (RFC 8417 §2.3)."""
    return jwt.encode(
        claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": SET_TYP}
    )


# -- poll requests -----------------------------------------------------------------------
class PollError(Exception):
    """Rendered as ``{"err": …, "description": …}`` (the error object of RFC 8935
    §2.3, which RFC 8936 reuses; codes from the registry of RFC 8935 §7.1)."""

    def __init__(self, status: int, err: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.err = err
        self.description = description

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"err": self.err, "description": self.description},
            self.status,
            headers={"Cache-Control": "no-store"},
        )


@dataclass(frozen=True)
class PollRequest:
    """RFC 8936 §2.4 poll request members."""

    max_events: int = DEFAULT_MAX_EVENTS
    return_immediately: bool = False
    ack: list[str] = field(default_factory=list)
    set_errs: dict[str, tuple[str, str]] = field(default_factory=dict)


def _invalid(description: str) -> PollError:
    return PollError(400, "invalid_request", description)


def parse_poll_request(body: bytes) -> PollRequest:
    """Validate a poll body; unknown members are ignored (forward compatibility)."""
    try:
        document = json.loads(body)
    except ValueError:
        raise _invalid("request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise _invalid("request body must be a JSON object")
    max_events = document.get("maxEvents", DEFAULT_MAX_EVENTS)
    if not isinstance(max_events, int) or isinstance(max_events, bool) or max_events < 0:
        raise _invalid("maxEvents must be a non-negative integer")
    immediate = document.get("returnImmediately", False)
    if not isinstance(immediate, bool):
        raise _invalid("returnImmediately must be true or false")
    ack = document.get("ack", [])
    if not isinstance(ack, list) or not all(isinstance(j, str) for j in ack):
        raise _invalid("ack must be an array of SET jti strings")
    if len(ack) > MAX_ACKS:
        raise _invalid(f"ack may list at most {MAX_ACKS} jti values per poll")
    raw_errs = document.get("setErrs", {})
    if not isinstance(raw_errs, dict):
        raise _invalid('setErrs must be an object {jti: {"err": …, "description": …}}')
    if len(raw_errs) > MAX_ACKS:
        raise _invalid(f"setErrs may list at most {MAX_ACKS} jti values per poll")
    set_errs: dict[str, tuple[str, str]] = {}
    for jti, detail in raw_errs.items():
        if not isinstance(detail, dict) or not isinstance(detail.get("err"), str):
            raise _invalid(f"setErrs[{jti[:64]!r}] must be an object with a string err")
        description = detail.get("description", "")
        if not isinstance(description, str):
            raise _invalid(f"setErrs[{jti[:64]!r}].description must be a string")
        set_errs[jti] = (detail["err"][:64], description[:1000])
    return PollRequest(min(max_events, MAX_EVENTS_CAP), immediate, ack, set_errs)


# -- delivery state ----------------------------------------------------------------------
def _insert_ignoring_duplicates(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert delivery rows; a row that exists (a concurrent poll, a repeated ack) wins."""
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(ssf_deliveries).on_conflict_do_nothing(
        index_elements=["receiver", "revision"]
    )
    conn.execute(statement, rows)


class SsfStore:
    """Per-receiver delivery state in ``ssf_deliveries`` (SQLAlchemy Core, both engines)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(
        self,
        receiver: str,
        ack: list[str],
        set_errs: dict[str, tuple[str, str]],
        now: float | None = None,
    ) -> tuple[int, int]:
        """Apply acknowledgements and error reports; returns how many of each named a SET
        of this receiver whose revocation still exists. Anything else (unknown jtis,
        another receiver's, expired ones) is ignored: it names no SET to act on."""
        now = time.time() if now is None else now
        acked = {r for r in (revision_of(receiver, j) for j in ack) if r is not None}
        errors = {
            r: detail
            for r, detail in ((revision_of(receiver, j), d) for j, d in set_errs.items())
            if r is not None and r not in acked
        }
        with self.db.engine.begin() as conn:
            # Old rows of revocations that maintenance removed are of no further use.
            conn.execute(
                delete(ssf_deliveries).where(
                    ssf_deliveries.c.revision.not_in(select(revocations.c.revision))
                )
            )
            wanted = acked | set(errors)
            if not wanted:
                return 0, 0
            existing = set(
                conn.execute(
                    select(revocations.c.revision).where(revocations.c.revision.in_(wanted))
                ).scalars()
            )
            rows = [
                {
                    "receiver": receiver,
                    "revision": r,
                    "state": ACKED,
                    "err": None,
                    "description": None,
                    "recorded_at": now,
                }
                for r in sorted(acked & existing)
            ] + [
                {
                    "receiver": receiver,
                    "revision": r,
                    "state": ERROR,
                    "err": err,
                    "description": description,
                    "recorded_at": now,
                }
                for r, (err, description) in sorted(errors.items())
                if r in existing
            ]
            _insert_ignoring_duplicates(conn, rows)
            return len(acked & existing), len(set(errors) & existing)

    def pending(
        self, receiver: str, limit: int, now: float | None = None
    ) -> tuple[list[Revocation], bool]:
        """Up to ``limit`` revocations in force whose SET this receiver has neither
        acknowledged nor reported, oldest first, and whether there are more."""
        now = time.time() if now is None else now
        handled = exists().where(
            ssf_deliveries.c.receiver == receiver,
            ssf_deliveries.c.revision == revocations.c.revision,
        )
        with self.db.engine.connect() as conn:
            rows = list(
                conn.execute(
                    select(revocations)
                    .where(revocations.c.expires_at > now, ~handled)
                    .order_by(revocations.c.revision)
                    .limit(limit + 1)
                )
            )
        entries = [
            Revocation(
                revision=row.revision,
                kind=row.kind,
                value=row.value,
                revoked_at=row.revoked_at,
                expires_at=row.expires_at,
                reason=row.reason,
                actor=row.actor,
            )
            for row in rows[:limit]
        ]
        return entries, len(rows) > limit

    def errors(self, receiver: str) -> dict[int, tuple[str, str]]:
        """The errors this receiver reported, by revision (for operators and tests)."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(
                    ssf_deliveries.c.revision, ssf_deliveries.c.err, ssf_deliveries.c.description
                ).where(ssf_deliveries.c.receiver == receiver, ssf_deliveries.c.state == ERROR)
            )
            return {row.revision: (row.err or "", row.description or "") for row in rows}


# -- HTTP --------------------------------------------------------------------------------
class Authenticate(Protocol):
    def __call__(self, request: Request, admin_only: bool = ...) -> Awaitable[Principal]: ...


def ssf_routes(plane: ControlPlane, authenticate: Authenticate) -> list[Route]:
    """The SSF routes, added to the control plane's route list by ``build_app``."""
    store = SsfStore(plane.db)

    async def configuration(request: Request) -> Response:
        return JSONResponse(
            transmitter_configuration(plane.issuer),
            headers={"Cache-Control": "public, max-age=60"},
        )

    def _own_stream(request: Request, principal: Principal) -> None:
        wanted = request.query_params.get("stream_id")
        if wanted is not None and wanted != principal.credential_id:
            raise BadRequest(404, "not_found", f"no stream {wanted[:64]!r} for this credential")

    async def stream(request: Request) -> Response:
        """SSF 1.0 "Reading a Stream's Configuration": without ``stream_id``, the list
        of the caller's streams (here always one)."""
        principal = await authenticate(request, admin_only=False)
        _own_stream(request, principal)
        config = stream_configuration(plane.issuer, principal)
        if request.query_params.get("stream_id") is None:
            return JSONResponse([config], headers={"Cache-Control": "no-store"})
        return JSONResponse(config, headers={"Cache-Control": "no-store"})

    async def status(request: Request) -> Response:
        """SSF 1.0 "Reading a Stream's Status": implicit streams are always enabled."""
        principal = await authenticate(request, admin_only=False)
        _own_stream(request, principal)
        return JSONResponse(
            {"stream_id": principal.credential_id, "status": "enabled"},
            headers={"Cache-Control": "no-store"},
        )

    def deliver(receiver: str, limit: int) -> tuple[dict[str, str], bool]:
        entries, more = store.pending(receiver, limit)
        key, now = plane.keyset.active, time.time()
        sets = {
            set_jti(receiver, e.revision): sign_set(set_claims(e, plane.issuer, receiver, now), key)
            for e in entries
        }
        return sets, more

    async def changed_since(revision: int, deadline: float) -> None:
        """Return once the revocation revision moves past ``revision`` (this replica at
        once, others within their refresh interval), at ``deadline``, or on shutdown."""
        while plane.revocations.revision == revision and not plane.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):  # slices, so a shutdown ends the poll
                await asyncio.wait_for(plane.wait_for_change().wait(), min(remaining, 0.5))

    async def poll(request: Request) -> Response:
        """RFC 8936 §2.4: acknowledge, record errors, then answer with up to
        ``maxEvents`` unacknowledged SETs; unless ``returnImmediately``, wait up to 25 s
        for one to appear (§2.4: the transmitter MAY hold the request open)."""
        principal = await authenticate(request, admin_only=False)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return _invalid("Content-Type must be application/json").response()
        try:
            body = await read_body(request, MAX_POLL_BODY)
        except BadRequest as exc:
            return PollError(exc.status, "invalid_request", exc.description).response()
        try:
            poll_request = parse_poll_request(body)
        except PollError as exc:
            return exc.response()
        receiver = principal.credential_id
        await run_in_threadpool(store.record, receiver, poll_request.ack, poll_request.set_errs)
        deadline = time.monotonic() + LONG_POLL_SECONDS
        while True:
            seen = plane.revocations.revision
            sets, more = await run_in_threadpool(deliver, receiver, poll_request.max_events)
            if (
                sets
                or poll_request.return_immediately
                or poll_request.max_events == 0
                or plane.stopping
                or time.monotonic() >= deadline
            ):
                break
            await changed_since(seen, deadline)
        return JSONResponse(
            {"sets": sets, "moreAvailable": more},
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    handlers: list[tuple[str, Callable[[Request], Awaitable[Response]], str]] = [
        ("/.well-known/ssf-configuration", configuration, "GET"),
        ("/v1/ssf/stream", stream, "GET"),
        ("/v1/ssf/status", status, "GET"),
        ("/v1/ssf/poll", poll, "POST"),
    ]
    return [Route(path, handler, methods=[method]) for path, handler, method in handlers]
