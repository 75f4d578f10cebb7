"""RFC 7515 compact JWS verification for the asymmetric algorithms we accept, on the
``cryptography`` primitives directly.

PyJWT (which we keep for signing and for parsing JWKs) spends ~70 µs per verification
beyond the signature itself — mostly a per-character base64url check in Python and a
second parse of the header — which is three times the agent's whole overhead budget.
This module does only what verification needs, in the order RFC 7515 §5.2 gives: split
(§7.1), decode and check the header, verify the signature over the exact ASCII signing
input, and only then parse the payload. Keys are pinned to one algorithm; the header's
``alg`` must equal it (RFC 8725 §3.1), so ``none``, HMAC-with-a-public-key and
algorithm substitution fail before any signature work."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import jwt
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from trustmesh.common.errors import InvalidToken

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
# RFC 7518 §3.4: ES signatures are R || S, each the curve's coordinate size.
_EC_SIZES = {"ES256": 32, "ES384": 48, "ES512": 66}
ASYMMETRIC_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
# Three base64url segments (RFC 7515 §2: no padding, no other characters).
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class VerificationKey:
    """A public key pinned to one JWS algorithm, with its verification parameters built
    once (not per signature)."""

    __slots__ = ("_ec_size", "_hash", "_padding", "_scheme", "alg", "key", "kid")

    def __init__(
        self, kid: str, alg: str, key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    ) -> None:
        self.kid = kid
        self.alg = alg
        self.key = key
        self._hash = _HASHES[alg[2:]]()
        self._ec_size = _EC_SIZES.get(alg, 0)
        self._scheme = ec.ECDSA(self._hash)
        self._padding: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(self._hash), salt_length=self._hash.digest_size)
            if alg.startswith("PS")
            else padding.PKCS1v15()
        )

    @classmethod
    def from_jwk(cls, jwk: dict[str, Any]) -> VerificationKey:
        """Parse with PyJWT's JWK support; refuse algorithms outside the asymmetric set
        and keys whose type or size does not fit the algorithm."""
        kid, alg = jwk.get("kid"), jwk.get("alg")
        if not isinstance(kid, str) or not kid:
            raise ValueError("JWK has no kid")
        if alg not in ASYMMETRIC_ALGS:
            raise ValueError(f"JWK algorithm {alg!r} is not accepted")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg).key
        except jwt.PyJWTError as exc:
            raise ValueError(f"JWK {kid} is not a usable public key: {exc}") from None
        if alg.startswith("ES"):
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.key_size < 256:
                raise ValueError(f"JWK {kid} is not an EC public key for {alg}")
        elif not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
            raise ValueError(f"JWK {kid} is not an RSA public key of at least 2048 bits for {alg}")
        return cls(kid=kid, alg=alg, key=key)

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        try:
            if isinstance(self.key, ec.EllipticCurvePublicKey):
                size = self._ec_size
                if len(signature) != 2 * size:
                    return False
                der = encode_dss_signature(
                    int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
                )
                self.key.verify(der, signing_input, self._scheme)
            else:
                self.key.verify(signature, signing_input, self._padding, self._hash)
        except InvalidSignature:
            return False
        return True


def split_compact(token: str, max_bytes: int) -> list[str]:
    """Size first, then shape: nothing is decoded before both checks pass."""
    if len(token) > max_bytes:
        raise InvalidToken("malformed", f"token is larger than {max_bytes} bytes")
    if not _COMPACT.fullmatch(token):
        raise InvalidToken("malformed", "token is not a compact JWS (three base64url parts)")
    return token.split(".")


def decode_json_segment(segment: str, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(b64decode(segment))  # RFC 8259 JSON, ~3x faster than json
    except (ValueError, binascii.Error):
        raise InvalidToken("malformed", f"token {what} is not base64url-encoded JSON") from None
    if not isinstance(value, dict):
        raise InvalidToken("malformed", f"token {what} is not a JSON object")
    return value


def verify_compact(parts: list[str], key: VerificationKey) -> dict[str, Any]:
    """Verify the signature (RFC 7515 §5.2 steps 7-8) and return the parsed payload."""
    header_segment, payload_segment, signature_segment = parts
    try:
        signature = b64decode(signature_segment)
    except (ValueError, binascii.Error):
        raise InvalidToken("malformed", "token signature is not base64url") from None
    signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
    if not key.verify(signing_input, signature):
        raise InvalidToken("bad_signature", "token bad signature: it was not signed by its key")
    return decode_json_segment(payload_segment, "payload")


def _numeric(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken("malformed", f"token claim {name} is not a number")
    return float(value)


def check_registered_claims(
    claims: dict[str, Any],
    *,
    now: float,
    leeway: float,
    issuer: str | None,
    audience: str | None,
    required: tuple[str, ...],
) -> None:
    """RFC 7519 §4.1: ``exp`` (§4.1.4), ``nbf`` (§4.1.5), ``iat`` not in the future,
    ``iss`` equal (§4.1.1; None: not checked, as for a federated trust domain's
    JWT-SVIDs, which need not carry one), ``aud`` containing ours (§4.1.3), required
    claims present."""
    for name in required:
        if name not in claims:
            raise InvalidToken("missing_claim", f"token has no {name} claim")
    exp = _numeric(claims, "exp")
    if exp is not None and now > exp + leeway:
        raise InvalidToken("expired", "token expired")
    nbf = _numeric(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise InvalidToken("not_yet_valid", "token not yet valid (nbf is in the future)")
    iat = _numeric(claims, "iat")
    if iat is not None and now + leeway < iat:
        raise InvalidToken("not_yet_valid", "token not yet valid (issued in the future)")
    if issuer is not None and claims.get("iss") != issuer:
        raise InvalidToken("wrong_issuer", "token issuer is not the expected one")
    if audience is not None:
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or audience not in audiences:
            raise InvalidToken("wrong_audience", f"token audience does not include {audience}")
