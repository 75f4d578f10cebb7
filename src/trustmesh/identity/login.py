"""Person tokens for a cluster (``POST /v1/login``, ``trustmesh login``; issue 14 item 5).

A person logs in for one cluster and gets a short JWT the cluster's API server sends
to that cluster's agent in a TokenReview: signed with the control plane's active key,
header ``typ: trustmesh-login+jwt`` (RFC 8725 §3.11 explicit typing), claims ``iss``
(the control plane), ``sub`` ``user:NAME``, ``aud`` the cluster's audience (the one an
agent of that cluster requires), ``iat``, ``nbf``, ``exp``, ``jti``.

The type keeps it apart from every JWT-SVID: the SVID verifiers accept only the
profile's types (``svid.SVID_TYPS``), so a login token is refused at ``/v1/authorize``,
ext_authz and the token exchange, and this module's verifier accepts only
``trustmesh-login+jwt``, so a JWT-SVID is never taken for a person. A verified login
token becomes a :class:`~trustmesh.identity.svid.VerifiedIdentity` whose ``spiffe_id``
is the username ``user:NAME`` (never a SPIFFE ID, which starts ``spiffe://``): the
agent's revocation check then covers it with a subject revocation of ``user:NAME``."""

from __future__ import annotations

from typing import Any

import jwt
import orjson

from trustmesh.common.errors import InvalidToken
from trustmesh.common.names import USER_PREFIX, person_of
from trustmesh.identity.jws import (
    check_registered_claims,
    decode_json_segment,
    split_compact,
    verify_compact,
)
from trustmesh.identity.keys import ActiveKey
from trustmesh.identity.svid import MAX_TOKEN_BYTES, KeyRing, VerifiedIdentity

LOGIN_TYP = "trustmesh-login+jwt"
LOGIN_TYPS: frozenset[str | None] = frozenset({LOGIN_TYP})
PEOPLE_GROUP = "trustmesh:people"
DEFAULT_LOGIN_TTL = 900
MIN_LOGIN_TTL = 60
MAX_LOGIN_TTL = 3600
_REQUIRED = ("iss", "sub", "aud", "exp", "iat", "nbf", "jti")


def mint_login_token(key: ActiveKey, claims: dict[str, Any]) -> str:
    """``claims`` as a compact JWS typed ``trustmesh-login+jwt``."""
    return jwt.api_jws.encode(
        orjson.dumps(claims),
        key.private_key,
        algorithm=key.alg,
        headers={"kid": key.kid, "typ": LOGIN_TYP},
    )


def is_login_token(token: str) -> bool:
    """Whether an unverified token says it is a login token (it only chooses the
    verifier: nothing read here is believed before the signature holds)."""
    try:
        header = decode_json_segment(split_compact(token, MAX_TOKEN_BYTES)[0], "header")
    except InvalidToken:
        return False
    return header.get("typ") == LOGIN_TYP


def is_person(identity: VerifiedIdentity) -> bool:
    """A verified login token's identity (``user:NAME``), not a workload's."""
    return identity.spiffe_id.startswith(USER_PREFIX)


class LoginVerifier:
    """Login tokens for one cluster: typed ``trustmesh-login+jwt``, signed by a key of
    ``keys`` (the control plane's published set, accepting that type only), our
    ``iss``, ``aud`` holding the cluster's audience, ``exp``/``nbf`` within ``leeway``,
    a lifetime of at most :data:`MAX_LOGIN_TTL`, ``sub`` ``user:NAME``."""

    def __init__(self, *, issuer: str, audience: str, keys: KeyRing, leeway: float = 10.0) -> None:
        self.issuer = issuer
        self.audience = audience
        self.keys = keys
        self.leeway = leeway

    def verify(self, token: str, now: float) -> VerifiedIdentity:
        parts = split_compact(token, MAX_TOKEN_BYTES)
        key = self.keys.key_for_header(parts[0])
        claims = verify_compact(parts, key)
        check_registered_claims(
            claims,
            now=now,
            leeway=self.leeway,
            issuer=self.issuer,
            audience=self.audience,
            required=_REQUIRED,
        )
        subject = claims["sub"]
        if not isinstance(subject, str) or person_of(subject) is None:
            raise InvalidToken("bad_subject", "login token sub is not user:NAME")
        expires, issued = claims["exp"], claims["iat"]
        if not isinstance(expires, int | float) or not isinstance(issued, int | float):
            raise InvalidToken("malformed", "login token exp and iat must be numbers")
        if expires - issued > MAX_LOGIN_TTL + self.leeway:
            raise InvalidToken(
                "lifetime_too_long", f"login token lives longer than {MAX_LOGIN_TTL} s"
            )
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise InvalidToken("missing_claim", "login token jti is not a string")
        return VerifiedIdentity(
            spiffe_id=subject,
            claims={name: claims[name] for name in _REQUIRED},
            jti=jti,
            kid=key.kid,
            expires_at=float(expires),
        )
