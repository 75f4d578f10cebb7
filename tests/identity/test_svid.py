"""JWT-SVID minting and local verification with real keys, including the attacks."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from attacks import (
    GARBAGE,
    alg_none,
    hs256_with_public_key,
    signed_by_stranger,
    swapped_payload,
    with_kid,
)
from trustmesh.common.errors import InvalidToken
from trustmesh.identity.keys import ActiveKey, generate_private_key, public_jwk
from trustmesh.identity.svid import KeyRing, SvidVerifier, mint_svid

ISSUER = "https://tm.corp.example"
AUDIENCE = "spiffe://corp.example/cluster/beta"


@pytest.fixture(scope="module")
def signer() -> tuple[ActiveKey, dict[str, Any]]:
    key = generate_private_key("ES256")
    jwk = public_jwk(key, "ES256")
    return ActiveKey(kid=jwk["kid"], alg="ES256", private_key=key), jwk


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "sub": "spiffe://corp.example/cluster/alpha/ns/shop/sa/payments",
        "aud": [AUDIENCE],
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "j1",
        "workload_id": "payments",
        "project": "shop",
        "environment": "prod",
        "tier": "gold",
        "cluster": "alpha",
        "namespace": "shop",
        "service_account": "payments",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
def verifier(signer: tuple[ActiveKey, dict[str, Any]]) -> SvidVerifier:
    return SvidVerifier(
        issuer=ISSUER,
        trust_domain="corp.example",
        audience=AUDIENCE,
        keys=KeyRing({"keys": [signer[1]]}),
        clock=time.time,
    )


def reason(verifier: SvidVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        verifier.verify(token)
    assert token not in caught.value.description or not token
    return caught.value.reason


def test_valid_token_verifies(
    signer: tuple[ActiveKey, dict[str, Any]], verifier: SvidVerifier
) -> None:
    token = mint_svid(signer[0], claims())
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": signer[0].kid, "typ": "JWT"}
    identity = verifier.verify(token)
    assert identity.spiffe_id == "spiffe://corp.example/cluster/alpha/ns/shop/sa/payments"
    assert identity.cluster == "alpha" and identity.kid == signer[0].kid and identity.jti == "j1"
    assert identity.claims["tier"] == "gold"


def test_attacks_are_refused(
    signer: tuple[ActiveKey, dict[str, Any]], verifier: SvidVerifier
) -> None:
    good = mint_svid(signer[0], claims())
    assert reason(verifier, alg_none(good)) == "malformed"  # no signature: not a JWS we take
    assert reason(verifier, alg_none(good, keep_signature=True)) == "unsupported_alg"
    assert reason(verifier, hs256_with_public_key(good, signer[1])) == "unsupported_alg"
    assert (
        reason(verifier, swapped_payload(good, sub="spiffe://corp.example/admin"))
        == "bad_signature"
    )
    assert reason(verifier, signed_by_stranger(good)) == "bad_signature"
    assert reason(verifier, with_kid(good, "../../../etc/passwd")) == "unknown_kid"
    assert reason(verifier, with_kid(good, "")) == "unknown_kid"
    assert reason(verifier, "x" * 9000) == "malformed"
    for junk in GARBAGE:
        assert reason(verifier, junk) in {"malformed", "unsupported_alg", "unknown_kid"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"exp": "NOW-60"}, "expired"),
        ({"nbf": "NOW+120"}, "not_yet_valid"),
        ({"aud": ["spiffe://corp.example/cluster/gamma"]}, "wrong_audience"),
        ({"iss": "https://evil.example"}, "wrong_issuer"),
        ({"jti": None}, "missing_claim"),
        ({"cluster": None}, "missing_claim"),
        ({"workload_id": None}, "missing_claim"),
        ({"cluster": 7}, "missing_claim"),
        ({"sub": "system:serviceaccount:shop:payments"}, "bad_subject"),
        ({"sub": "spiffe://other.example/cluster/a/ns/b/sa/c"}, "bad_subject"),
    ],
)
def test_claim_checks(
    signer: tuple[ActiveKey, dict[str, Any]],
    verifier: SvidVerifier,
    overrides: dict[str, Any],
    expected: str,
) -> None:
    now = int(time.time())  # relative times resolved when the test runs, not at collection
    overrides = {
        k: now + int(v[3:]) if isinstance(v, str) and v.startswith("NOW") else v
        for k, v in overrides.items()
    }
    assert reason(verifier, mint_svid(signer[0], claims(**overrides))) == expected


def test_small_clock_skew_is_tolerated(
    signer: tuple[ActiveKey, dict[str, Any]], verifier: SvidVerifier
) -> None:
    # Verified at an explicit instant, so the margins do not depend on how long the
    # test takes. Within the leeway: a token just expired, issued by a clock a few
    # seconds ahead (iat and nbf in our future), still verifies.
    now = int(time.time())
    skew = verifier.leeway
    assert 5 < skew < 60
    token = mint_svid(signer[0], claims(iat=now + 5, nbf=now + 5, exp=now - 5))
    identity = verifier.verify(token, now=now)
    assert identity.spiffe_id == "spiffe://corp.example/cluster/alpha/ns/shop/sa/payments"
    assert identity.jti == "j1" and identity.expires_at == now - 5
    # Just past the leeway, either way, it does not.
    late = mint_svid(signer[0], claims(iat=now - 60, nbf=now - 60, exp=now - skew - 1))
    early = mint_svid(signer[0], claims(iat=now, nbf=now + skew + 1, exp=now + 300))
    issued_ahead = mint_svid(signer[0], claims(iat=now + skew + 1, nbf=now, exp=now + 300))
    for token, expected in [
        (late, "expired"),
        (early, "not_yet_valid"),
        (issued_ahead, "not_yet_valid"),
    ]:
        with pytest.raises(InvalidToken) as caught:
            verifier.verify(token, now=now)
        assert caught.value.reason == expected


def test_keyring_pins_algorithm_and_skips_unusable_keys(
    signer: tuple[ActiveKey, dict[str, Any]],
) -> None:
    rsa_jwk = public_jwk(generate_private_key("RS256"), "RS256")
    ring = KeyRing(
        {
            "keys": [
                signer[1],
                {**rsa_jwk, "alg": "HS256"},  # not allowed
                {"kty": "oct", "k": "c2VjcmV0", "kid": "sym", "alg": "HS256"},
                {
                    "kty": "EC",
                    "kid": "broken",
                    "alg": "ES256",
                    "crv": "P-256",
                    "x": "AA",
                    "y": "AA",
                },
                {k: v for k, v in rsa_jwk.items() if k != "kid"},
            ]
        }
    )
    assert ring.kids() == [signer[0].kid]
    removed = ring.replace({"keys": [rsa_jwk]})
    assert removed == {signer[0].kid} and ring.kids() == [rsa_jwk["kid"]]
    # An ES256 token whose kid names the RS256 key fails before any signature work.
    verifier = SvidVerifier(
        issuer=ISSUER, trust_domain="corp.example", audience=AUDIENCE, keys=ring, clock=time.time
    )
    forged = with_kid(mint_svid(signer[0], claims()), rsa_jwk["kid"])
    assert reason(verifier, forged) == "unsupported_alg"
