"""Forged and broken variants of a valid JWT, built with real keys. Used against the
token endpoint (SA tokens) and the agent (federated tokens)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    return json.loads(unb64(header)), json.loads(unb64(payload)), signature


def assemble(header: dict[str, Any], payload: dict[str, Any], signature: str) -> str:
    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), signature]
    )


def alg_none(token: str, keep_signature: bool = False) -> str:
    """An unsecured JWS (RFC 7515 §A.5): empty signature, or the old one kept."""
    header, payload, signature = parts(token)
    return assemble({**header, "alg": "none"}, payload, signature if keep_signature else "")


def hs256_with_public_key(token: str, public_jwk: dict[str, Any]) -> str:
    """The classic key-confusion attack: HMAC-sign with the verifier's public key bytes."""
    header, payload, _ = parts(token)
    public = jwt.PyJWK(public_jwk).key
    secret = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged_header = {**header, "alg": "HS256"}
    signing_input = f"{b64(json.dumps(forged_header).encode())}.{b64(json.dumps(payload).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def swapped_payload(token: str, **changes: Any) -> str:
    """Keep header and signature, change the claims."""
    header, payload, signature = parts(token)
    return assemble(header, {**payload, **changes}, signature)


def with_kid(token: str, kid: str) -> str:
    header, payload, signature = parts(token)
    return assemble({**header, "kid": kid}, payload, signature)


def signed_by_stranger(token: str, alg: str = "ES256") -> str:
    """The same claims and kid, signed by a key nobody published."""
    header, payload, _ = parts(token)
    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(
        payload, key, algorithm="ES256", headers={"kid": header.get("kid"), "typ": "JWT"}
    )


GARBAGE = ["", "not-a-jwt", "a.b.c", "....", "eyJhbGciOiJFUzI1NiJ9.e30", "%00%ff", "😀.😀.😀"]
