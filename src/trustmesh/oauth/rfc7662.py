"""RFC 7662 OAuth 2.0 Token Introspection for the JWT-SVIDs we issue.

§2.1: the request is form-encoded with ``token`` (and an optional, ignored
``token_type_hint``); the caller must be authenticated (§2.1, "MUST require some form of
authorization"), which the HTTP layer does. §2.2: ``active`` is false for anything we
would not accept — expired, not yet valid, badly signed, signed by a removed key,
revoked, or not ours — and then nothing else is disclosed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from trustmesh.common.errors import InvalidRequest, InvalidToken
from trustmesh.identity.svid import SvidVerifier, VerifiedIdentity


def introspect(
    form: Mapping[str, list[str]],
    verifier: SvidVerifier,
    is_revoked: Callable[[VerifiedIdentity], object] = lambda identity: None,
) -> dict[str, Any]:
    values = form.get("token")
    if not values or not values[0]:
        raise InvalidRequest("missing required parameter token")
    if len(values) > 1:
        raise InvalidRequest("parameter token must not be repeated (RFC 6749 §3.2)")
    try:
        identity = verifier.verify(values[0])
    except InvalidToken:
        return {"active": False}
    if is_revoked(identity):
        return {"active": False}
    return {"active": True, "token_type": "N_A", **identity.claims}
