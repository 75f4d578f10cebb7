"""RFC 8417 Security Event Tokens for the revocation list, profiled by OpenID Shared
Signals Framework 1.0 and CAEP (DESIGN §5).

Every revocation is one SET, built from its entry when it is delivered and signed then
with the active key, so it always verifies with the JWKS of the moment (even after a
key revocation). Per receiver the SET ``jti`` is ``<receiver>-<revocation revision>``:
unique per SET, stable across redeliveries, so receivers de-duplicate by ``jti``.
``txn`` (SSF 1.0 "The txn claim") names the revocation, the same for every receiver."""

from __future__ import annotations

from typing import Any

import jwt

from trustmesh.common.numbers import parse_decimal
from trustmesh.identity.keys import ActiveKey
from trustmesh.revocation import Revocation

SET_TYP = "secevent+jwt"  # RFC 8417 §2.3 explicit typing
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
CREDENTIAL_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/credential-change"
EVENTS_SUPPORTED = (SESSION_REVOKED, CREDENTIAL_CHANGE)
KEY_CREDENTIAL_TYPE = "jwt-svid-signing-key"  # CAEP credential-change: mutually agreed type
ANOMALY_EVENT = "https://trustmesh.io/secevent/anomaly"  # a finding, pushed (RFC 8935)


def receiver_audience(issuer: str, receiver: str) -> str:
    """The ``aud`` of every SET for one receiver (SSF 1.0 "The aud Claim": receivers not
    known to be one entity get distinct SETs)."""
    return f"{issuer}/ssf/receivers/{receiver}"


def set_jti(receiver: str, revision: int) -> str:
    return f"{receiver}-{revision}"


def revision_of(receiver: str, jti: str) -> int | None:
    """The revocation revision a receiver's SET ``jti`` names; None for anything else
    (another receiver's SET, or not ours at all)."""
    prefix = f"{receiver}-"
    if not jti.startswith(prefix):
        return None
    revision = parse_decimal(jti[len(prefix) :])
    # Only the exact jti we issued: "r-007" names no SET of ours.
    return revision if revision is not None and set_jti(receiver, revision) == jti else None


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


def anomaly_set_claims(
    finding: dict[str, Any], issuer: str, audience: str, jti: str, finding_id: str, now: float
) -> dict[str, Any]:
    """The SET of one finding for one push receiver (RFC 8417 §2.2): ``iss``, ``iat``
    (this attempt), ``jti`` (stable across attempts: receivers de-duplicate by it),
    ``aud`` (the EventReceiver's audience), ``txn`` (``anomaly-<finding id>``, the same
    for every receiver of one finding) and one event, the Finding JSON. Never ``sub``
    nor ``exp``."""
    return {
        "iss": issuer,
        "iat": int(now),
        "jti": jti,
        "aud": audience,
        "txn": f"anomaly-{finding_id}",
        "events": {ANOMALY_EVENT: finding},
    }


def sign_set(claims: dict[str, Any], key: ActiveKey) -> str:
    """A JWS with header ``alg``, ``kid`` and ``typ: secevent+jwt`` (RFC 8417 §2.3)."""
    return jwt.encode(
        claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": SET_TYP}
    )
