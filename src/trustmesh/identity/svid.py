"""JWT-SVIDs: minting at the control plane, verification at agents and introspection.

Follows the SPIFFE JWT-SVID profile (§2: ``alg`` from the RS/ES/PS families, ``kid``,
``typ`` JWT or JOSE; §3: ``sub`` is the SPIFFE ID, ``aud`` required, ``exp`` required)
plus the federation claims of DESIGN §2. Verification allows only the algorithm of the
key the ``kid`` names, so ``alg: none``, HS256-with-the-public-key and algorithm
substitution all fail before any signature work."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt

from trustmesh.identity.keys import ActiveKey
from trustmesh.identity.spiffe import SpiffeIdError, parse_spiffe_id

# JWT-SVID profile §3: RS256/384/512, ES256/384/512, PS256/384/512. Never none/HS*/EdDSA.
ALLOWED_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
MAX_TOKEN_BYTES = 8192
FEDERATION_CLAIMS = ("workload_id", "cluster", "namespace", "service_account")
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "jti", *FEDERATION_CLAIMS)


class InvalidToken(Exception):
    """A token that does not verify. ``reason`` is a short machine code, the message a
    sentence for people; neither ever contains the token."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


@dataclass(frozen=True, slots=True)
class VerifiedIdentity:
    """What authentication hands to authorization: nothing else crosses (DESIGN §1)."""

    spiffe_id: str
    claims: dict[str, Any]
    jti: str
    kid: str
    expires_at: float

    @property
    def cluster(self) -> str:
        return str(self.claims["cluster"])


def mint_svid(key: ActiveKey, claims: dict[str, Any]) -> str:
    return jwt.encode(
        claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"}
    )


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def read_header(token: str, max_bytes: int = MAX_TOKEN_BYTES) -> dict[str, Any]:
    """Parse the JOSE header only, after cheap shape checks (size first)."""
    if len(token) > max_bytes:
        raise InvalidToken("malformed", f"token is larger than {max_bytes} bytes")
    if token.count(".") != 2:
        raise InvalidToken("malformed", "token is not a compact JWS (three dot-separated parts)")
    try:
        header = json.loads(_b64decode(token[: token.index(".")]))
    except (ValueError, binascii.Error):
        raise InvalidToken("malformed", "token header is not base64url-encoded JSON") from None
    if not isinstance(header, dict):
        raise InvalidToken("malformed", "token header is not a JSON object")
    return header


class KeyRing:
    """Public keys by ``kid``, each pinned to its own algorithm."""

    def __init__(
        self, jwks: dict[str, Any] | None = None, allowed_algs: Iterable[str] = ALLOWED_ALGS
    ):
        self.allowed_algs = frozenset(allowed_algs)
        self._keys: dict[str, jwt.PyJWK] = {}
        if jwks:
            self.replace(jwks)

    def replace(self, jwks: dict[str, Any]) -> set[str]:
        """Swap in a new JWKS; returns the kids that disappeared. Keys with an alg outside
        the allow-list, or without kid/alg, are skipped."""
        keys: dict[str, jwt.PyJWK] = {}
        for jwk in jwks.get("keys", []):
            kid, alg = jwk.get("kid"), jwk.get("alg")
            if not isinstance(kid, str) or alg not in self.allowed_algs:
                continue
            try:
                keys[kid] = jwt.PyJWK(jwk, algorithm=alg)
            except jwt.PyJWTError:
                continue
        removed = set(self._keys) - set(keys)
        self._keys = keys
        return removed

    def get(self, kid: str) -> jwt.PyJWK | None:
        return self._keys.get(kid)

    def kids(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def check_signed_header(header: dict[str, Any], keys: KeyRing) -> tuple[str, jwt.PyJWK]:
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in keys.allowed_algs:
        raise InvalidToken("unsupported_alg", f"token algorithm {str(alg)[:20]!r} is not allowed")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken("unknown_kid", "token header has no kid")
    key = keys.get(kid)
    if key is None:
        raise InvalidToken("unknown_kid", f"token key id {kid[:64]!r} is not a known signing key")
    if key.algorithm_name != alg:
        raise InvalidToken(
            "unsupported_alg",
            f"token algorithm {alg} does not match its key ({key.algorithm_name})",
        )
    return kid, key


_PYJWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidSignatureError, "bad_signature"),
)


def translate_pyjwt_error(exc: jwt.PyJWTError) -> InvalidToken:
    for kind, reason in _PYJWT_REASONS:
        if isinstance(exc, kind):
            return InvalidToken(reason, f"token {reason.replace('_', ' ')}: {exc}")
    return InvalidToken("malformed", f"token is invalid: {exc}")


class SvidVerifier:
    """Verifies federated tokens locally: allow-listed algorithm, known ``kid``, our
    ``iss``, the required audience, ``exp``/``nbf`` within ``leeway`` seconds, the
    required claims, and a ``sub`` that is a SPIFFE ID of our trust domain."""

    def __init__(
        self,
        *,
        issuer: str,
        trust_domain: str,
        audience: str | None,
        keys: KeyRing,
        leeway: float = 10.0,
    ) -> None:
        self.issuer = issuer
        self.trust_domain = trust_domain
        self.audience = audience
        self.keys = keys
        self.leeway = leeway
        self._options: Any = {
            "require": list(REQUIRED_CLAIMS),
            "verify_aud": audience is not None,
        }

    def verify(self, token: str) -> VerifiedIdentity:
        kid, key = check_signed_header(read_header(token), self.keys)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=self._options,
            )
        except jwt.PyJWTError as exc:
            raise translate_pyjwt_error(exc) from None
        subject = claims["sub"]
        try:
            domain, _ = parse_spiffe_id(subject)
        except (SpiffeIdError, TypeError):
            raise InvalidToken("bad_subject", "token sub is not a SPIFFE ID") from None
        if domain != self.trust_domain:
            raise InvalidToken(
                "bad_subject", f"token sub is not in trust domain {self.trust_domain}"
            )
        for name in FEDERATION_CLAIMS:
            if not isinstance(claims[name], str):
                raise InvalidToken("missing_claim", f"token claim {name} is not a string")
        return VerifiedIdentity(
            spiffe_id=subject,
            claims=claims,
            jti=str(claims["jti"]),
            kid=kid,
            expires_at=float(claims["exp"]),
        )
