"""JWT-SVIDs of a federated trust domain (``identity/svid.py``: ``PartnerVerifier``,
``token_trust_domain``): verified with that domain's bundle only, for its own IDs only,
the algorithm pinned to the key, ``iss`` not required, a bounded lifetime, only the
registered claims handed on, and nothing past the bundle's ``use_until``."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.common.errors import InvalidToken
from trustmesh.identity.spiffe_bundle import parse_bundle
from trustmesh.identity.svid import MAX_PARTNER_SVID_LIFETIME, PartnerVerifier, token_trust_domain

DOMAIN = "partner.example"
AUDIENCE = "spiffe://corp.example/cluster/west"
NOW = time.time()


def jwk(private: Any, kid: str, **extra: str) -> dict[str, Any]:
    algorithm = (
        jwt.algorithms.ECAlgorithm
        if isinstance(private, ec.EllipticCurvePrivateKey)
        else jwt.algorithms.RSAAlgorithm
    )
    return {
        **algorithm.to_jwk(private.public_key(), as_dict=True),
        "kid": kid,
        "use": "jwt-svid",
        **extra,
    }


EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
BUNDLE = parse_bundle({"keys": [jwk(EC_KEY, "ec"), jwk(RSA_KEY, "rsa")]}, DOMAIN)


def token(claims: dict[str, Any], key: Any = EC_KEY, alg: str = "ES256", kid: str = "ec") -> str:
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


def claims(**overrides: Any) -> dict[str, Any]:
    base = {
        "sub": f"spiffe://{DOMAIN}/ns/shop/sa/web",
        "aud": [AUDIENCE],
        "iat": int(NOW),
        "exp": int(NOW) + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def verify(text: str, use_until: float = NOW + 3600, now: float = NOW) -> Any:
    return PartnerVerifier(BUNDLE, use_until).verify(text, AUDIENCE, now)


def test_a_spire_shaped_token_verifies_and_hands_on_only_registered_claims() -> None:
    identity = verify(token(claims(project="shop", cluster="east", workload_id="w")))
    assert identity.spiffe_id == f"spiffe://{DOMAIN}/ns/shop/sa/web"
    assert set(identity.claims) == {"sub", "aud", "iat", "exp"}  # the partner's own claims: gone
    assert identity.cluster == "" and identity.jti == "" and identity.kid == "ec"
    rsa_signed = verify(token(claims(jti="j1"), RSA_KEY, "RS256", "rsa"))
    assert rsa_signed.jti == "j1" and rsa_signed.kid == "rsa"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (token(claims(sub="spiffe://corp.example/ns/shop/sa/web")), "bad_subject"),
        (token(claims(sub="spiffe://third.example/x")), "bad_subject"),
        (token(claims(sub="not-a-spiffe-id")), "bad_subject"),
        (token(claims(aud=["spiffe://corp.example/cluster/east"])), "wrong_audience"),
        (token(claims(exp=None)), "missing_claim"),
        (token(claims(exp=int(NOW) - 60)), "expired"),
        (token(claims(exp=int(NOW) + MAX_PARTNER_SVID_LIFETIME + 60)), "lifetime_too_long"),
        (token(claims(iat=int(NOW) - 3 * 86400, exp=int(NOW) + 60)), "lifetime_too_long"),
        (token(claims(), RSA_KEY, "PS256", "rsa"), "unsupported_alg"),  # pinned to RS256
        (token(claims(), EC_KEY, "ES256", "rsa"), "unsupported_alg"),
        (token(claims(), EC_KEY, "ES256", "nobody"), "unknown_kid"),
        (token(claims(), ec.generate_private_key(ec.SECP256R1())), "bad_signature"),
    ],
)
def test_refusals(text: str, reason: str) -> None:
    with pytest.raises(InvalidToken) as refused:
        verify(text)
    assert refused.value.reason == reason


def test_nothing_verifies_past_use_until() -> None:
    good = token(claims())
    assert verify(good, use_until=NOW + 1).spiffe_id.startswith("spiffe://partner")
    with pytest.raises(InvalidToken) as refused:
        verify(good, use_until=NOW - 1)
    assert refused.value.reason == "stale_bundle"


def test_token_trust_domain_reads_only_the_subject() -> None:
    assert token_trust_domain(token(claims())) == DOMAIN
    with pytest.raises(InvalidToken) as refused:
        token_trust_domain(token(claims(sub=42)))
    assert refused.value.reason == "bad_subject"
    with pytest.raises(InvalidToken):
        token_trust_domain("not.a.token")
