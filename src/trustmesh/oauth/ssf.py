"""OpenID Shared Signals Framework 1.0 transmitter for the revocation list (DESIGN §5):
its metadata, its streams, and per-receiver delivery state.

* ``GET /.well-known/ssf-configuration`` — Transmitter Configuration Metadata, public;
* ``POST /v1/ssf/poll`` — poll delivery of Security Event Tokens (RFC 8936 §2.4, see
  ``rfc8936``), with acknowledgements and error reports;
* ``GET /v1/ssf/stream`` and ``GET /v1/ssf/status`` — the caller's stream
  configuration and status ("Stream Configuration", "Stream Status"; read only:
  streams are implicit, see below).

Receivers and streams: every admin or cluster credential is one receiver with exactly
one stream, whose ``stream_id`` is the credential id. There is nothing to create: the
first poll starts the stream, and it holds every revocation in force
(``default_subjects: ALL``). Each revocation is one SET (``rfc8417``).

Delivery state (``ssf_deliveries``): a row per (receiver, revision) once the receiver
acknowledged the SET or reported an error for it; a SET without a row is offered on
every poll. A SET is offered until acknowledged or until its revocation expires
(revocation + the maximum token lifetime + skew: no token it covers can still be valid,
so the event is moot); then maintenance drops the revocation and this store the rows.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, delete, exists, select
from sqlalchemy.dialects import postgresql, sqlite

from trustmesh.identity.keys import ActiveKey
from trustmesh.oauth.rfc8417 import (
    EVENTS_SUPPORTED,
    receiver_audience,
    revision_of,
    set_claims,
    set_jti,
    sign_set,
)
from trustmesh.oauth.rfc8936 import POLL_DELIVERY
from trustmesh.revocation import Revocation
from trustmesh.revocation.store import entry_of_row
from trustmesh.storage import Database
from trustmesh.storage.schema import revocations, ssf_deliveries

SPEC_VERSION = "1_0"
BEARER_SCHEME = "urn:ietf:rfc:6750"  # SSF 1.0 authorization scheme (RFC 6750 bearer)
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


def stream_configuration(issuer: str, receiver: str, receiver_name: str) -> dict[str, Any]:
    """SSF 1.0 "Stream Configuration" of a receiver's implicit stream."""
    return {
        "stream_id": receiver,
        "iss": issuer,
        "aud": receiver_audience(issuer, receiver),
        "delivery": {"method": POLL_DELIVERY, "endpoint_url": endpoints(issuer)["poll"]},
        "events_supported": list(EVENTS_SUPPORTED),
        "events_requested": list(EVENTS_SUPPORTED),
        "events_delivered": list(EVENTS_SUPPORTED),
        "description": f"trustmesh revocations for {receiver_name}",
    }


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
        return [entry_of_row(row) for row in rows[:limit]], len(rows) > limit

    def deliver(
        self, receiver: str, limit: int, issuer: str, key: ActiveKey, now: float
    ) -> tuple[dict[str, str], bool]:
        """The receiver's pending SETs (``jti`` -> signed SET, up to ``limit``), signed
        now with ``key``, and whether there are more."""
        entries, more = self.pending(receiver, limit, now)
        sets = {
            set_jti(receiver, e.revision): sign_set(set_claims(e, issuer, receiver, now), key)
            for e in entries
        }
        return sets, more

    def errors(self, receiver: str) -> dict[int, tuple[str, str]]:
        """The errors this receiver reported, by revision (for operators and tests)."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(
                    ssf_deliveries.c.revision, ssf_deliveries.c.err, ssf_deliveries.c.description
                ).where(ssf_deliveries.c.receiver == receiver, ssf_deliveries.c.state == ERROR)
            )
            return {row.revision: (row.err or "", row.description or "") for row in rows}
