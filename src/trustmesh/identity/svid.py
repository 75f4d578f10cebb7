"""JWT-SVIDs: minting at the control plane, verification at agents and introspection.

Follows the SPIFFE JWT-SVID profile (§2: ``alg`` from the RS/ES/PS families, ``kid``,
``typ`` JWT or JOSE; §3: ``sub`` is the SPIFFE ID, ``aud`` required, ``exp`` required)
plus the federation claims of DESIGN §2. Verification allows only the algorithm of the
key the ``kid`` names, so ``alg: none``, HS256-with-the-public-key and algorithm
substitution all fail before any signature work."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from trustmesh.common.clock import Clock
from trustmesh.common.errors import InvalidToken, SpiffeIdError
from trustmesh.identity.jws import (
    VerificationKey,
    check_registered_claims,
    decode_json_segment,
    split_compact,
    verify_compact,
)
from trustmesh.identity.spiffe_bundle import SpiffeBundle
from trustmesh.spiffeid import parse_spiffe_id

if TYPE_CHECKING:  # annotations only: verifying a JWT-SVID needs no key store (SQLAlchemy)
    from trustmesh.identity.keys import ActiveKey

__all__ = [
    "ALLOWED_ALGS",
    "MAX_PARTNER_SVID_LIFETIME",
    "SVID_TYPS",
    "InvalidToken",
    "KeyRing",
    "PartnerVerifier",
    "SvidVerifier",
    "VerifiedIdentity",
    "check_signed_header",
    "mint_svid",
    "token_trust_domain",
]

# JWT-SVID profile §3: RS256/384/512, ES256/384/512, PS256/384/512. Never none/HS*/EdDSA.
ALLOWED_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
MAX_TOKEN_BYTES = 8192
FEDERATION_CLAIMS = ("workload_id", "cluster", "namespace", "service_account")
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "jti", *FEDERATION_CLAIMS)


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
        """The origin cluster; empty for an identity of a federated trust domain, whose
        claims name none of our clusters."""
        return str(self.claims.get("cluster", ""))


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


class _Signer:
    """One signing key's JWS parts built once: the encoded protected header
    (``{"alg","kid","typ":"JWT"}``, members sorted as PyJWT writes them) and the
    signature function with its algorithm objects. RFC 7518 §3.4: an ES signature is
    R || S, each the curve's coordinate size, not the DER ``cryptography`` returns."""

    __slots__ = ("header", "private_key", "sign")

    def __init__(self, key: ActiveKey) -> None:
        header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
        self.header = _b64(orjson.dumps(header, option=orjson.OPT_SORT_KEYS))
        self.private_key = key.private_key
        self.sign = _signature_function(key)


def _signature_function(key: ActiveKey) -> Callable[[bytes], bytes]:
    alg = key.alg
    hash_ = _HASHES[alg[2:]]()
    if alg.startswith("ES"):
        ec_key = key.private_key
        if not isinstance(ec_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"key {key.kid} is not an EC key for {alg}")
        size = (ec_key.curve.key_size + 7) // 8
        scheme = ec.ECDSA(hash_)

        def sign_ec(data: bytes) -> bytes:
            r, s = decode_dss_signature(ec_key.sign(data, scheme))
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")

        return sign_ec
    rsa_key = key.private_key
    if not isinstance(rsa_key, rsa.RSAPrivateKey):
        raise ValueError(f"key {key.kid} is not an RSA key for {alg}")
    pad: padding.AsymmetricPadding = (
        padding.PSS(mgf=padding.MGF1(hash_), salt_length=hash_.digest_size)
        if alg.startswith("PS")
        else padding.PKCS1v15()
    )

    def sign_rsa(data: bytes) -> bytes:
        return rsa_key.sign(data, pad, hash_)

    return sign_rsa


_signers: dict[str, _Signer] = {}


def mint_svid(key: ActiveKey, claims: dict[str, Any]) -> str:
    """Sign ``claims`` as a compact JWS (RFC 7515 §7.1) with ``key``: header ``alg``,
    ``kid``, ``typ: JWT``; the claims as compact JSON in their order. Any JOSE library
    (PyJWT, joserfc) verifies it; the header and algorithm objects are built once per
    key, so a token costs its JSON, its base64 and its signature."""
    signer = _signers.get(key.kid)
    if signer is None or signer.private_key is not key.private_key:
        if len(_signers) >= 16:  # keys rotate rarely; a handful are ever in use
            _signers.clear()
        signer = _signers[key.kid] = _Signer(key)
    signing_input = signer.header + b"." + _b64(orjson.dumps(claims))
    return (signing_input + b"." + _b64(signer.sign(signing_input))).decode("ascii")


class KeyRing:
    """Public keys by ``kid``, each pinned to its own algorithm, plus a small cache from
    a header segment to its key: tokens signed by one key share one header, so the
    header is decoded and checked once, not on every verification."""

    HEADER_CACHE_SIZE = 256

    def __init__(
        self,
        jwks: dict[str, Any] | None = None,
        allowed_algs: Iterable[str] = ALLOWED_ALGS,
        accepted_typs: frozenset[str | None] | None = None,
    ):
        self.allowed_algs = frozenset(allowed_algs)
        self.accepted_typs = accepted_typs
        self._keys: dict[str, VerificationKey] = {}
        self._by_header: dict[str, VerificationKey] = {}
        if jwks:
            self.replace(jwks)

    def replace(self, jwks: dict[str, Any]) -> set[str]:
        """Swap in a new JWKS; returns the kids that disappeared. Keys with an algorithm
        outside the allow-list, without kid or alg, or unusable, are skipped."""
        keys: dict[str, VerificationKey] = {}
        for jwk in jwks.get("keys", []):
            if not isinstance(jwk, dict) or jwk.get("alg") not in self.allowed_algs:
                continue
            try:
                key = VerificationKey.from_jwk(jwk)
            except ValueError:
                continue
            keys[key.kid] = key
        removed = set(self._keys) - set(keys)
        self._keys = keys
        self._by_header = {}
        return removed

    def get(self, kid: str) -> VerificationKey | None:
        return self._keys.get(kid)

    def kids(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def key_for_header(self, segment: str) -> VerificationKey:
        key = self._by_header.get(segment)
        if key is not None:
            return key
        key = check_signed_header(decode_json_segment(segment, "header"), self, self.accepted_typs)
        if len(self._by_header) >= self.HEADER_CACHE_SIZE:
            self._by_header = {}  # only well-formed headers naming our keys get here
        self._by_header[segment] = key
        return key


SVID_TYPS: frozenset[str | None] = frozenset({None, "JWT", "JOSE"})  # JWT-SVID profile §2.3


def check_signed_header(
    header: dict[str, Any], keys: KeyRing, typs: frozenset[str | None] | None = None
) -> VerificationKey:
    """RFC 8725 §3.1: the algorithm is the key's, never the token's choice; §3.11: with
    ``typs``, the token's type must be one of them."""
    if typs is not None and header.get("typ") not in typs:
        raise InvalidToken(
            "malformed", f"token type {str(header.get('typ'))[:40]!r} is not accepted here"
        )
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in keys.allowed_algs:
        raise InvalidToken("unsupported_alg", f"token algorithm {str(alg)[:20]!r} is not allowed")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken("unknown_kid", "token header has no kid")
    key = keys.get(kid)
    if key is None:
        raise InvalidToken("unknown_kid", f"token key id {kid[:64]!r} is not a known signing key")
    if key.alg != alg:
        raise InvalidToken(
            "unsupported_alg", f"token algorithm {alg} does not match its key ({key.alg})"
        )
    crit = header.get("crit")
    if crit is not None:
        raise InvalidToken(
            "malformed", "token header has crit extensions we do not understand (RFC 7515 §4.1.11)"
        )
    return key


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
        clock: Clock,
        leeway: float = 10.0,
    ) -> None:
        self.issuer = issuer
        self.trust_domain = trust_domain
        self.audience = audience
        self.keys = keys
        self.leeway = leeway
        self.clock = clock
        self._good_subjects: set[str] = set()

    def _check_subject(self, subject: Any) -> None:
        """``sub`` must be a SPIFFE ID of our trust domain. Subjects that passed are
        remembered (bounded), since a few thousand workloads present the same ones."""
        if subject_trust_domain(subject) != self.trust_domain:
            raise InvalidToken(
                "bad_subject", f"token sub is not in trust domain {self.trust_domain}"
            )
        if len(self._good_subjects) >= 65536:
            self._good_subjects.clear()
        self._good_subjects.add(subject)

    def verify(self, token: str, now: float | None = None) -> VerifiedIdentity:
        """The identity in ``token`` if it verifies at ``now`` (default: the clock's
        time); InvalidToken otherwise."""
        parts = split_compact(token, MAX_TOKEN_BYTES)
        key = self.keys.key_for_header(parts[0])
        claims = verify_compact(parts, key)
        check_registered_claims(
            claims,
            now=self.clock() if now is None else now,
            leeway=self.leeway,
            issuer=self.issuer,
            audience=self.audience,
            required=REQUIRED_CLAIMS,
        )
        kid = key.kid
        subject = claims["sub"]
        if subject not in self._good_subjects:
            self._check_subject(subject)

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


# --- federated trust domains (DESIGN §9) ---------------------------------------------------

MAX_PARTNER_SVID_LIFETIME = 86400
"""The longest lifetime (``exp`` - ``iat``, or ``exp`` - now) of a federated trust
domain's JWT-SVID we accept, so that a revocation of one of its SPIFFE IDs need live no
longer than this (plus skew) to cover every token it must."""
PARTNER_REQUIRED_CLAIMS = ("sub", "aud", "exp")  # JWT-SVID §3; SPIRE sets no iss
PARTNER_CLAIMS = ("iss", "sub", "aud", "exp", "nbf", "iat", "jti")
"""The claims of a partner's JWT-SVID that reach policy: the registered ones. Whatever
else a partner writes into its tokens (``project``, ``cluster``…) is its own assertion,
which a binding written for our workloads must never match."""


def subject_trust_domain(subject: Any) -> str:
    """The trust domain of a ``sub`` claim; InvalidToken when it is no SPIFFE ID."""
    try:
        domain, _ = parse_spiffe_id(subject)
    except (SpiffeIdError, TypeError, AttributeError):
        raise InvalidToken("bad_subject", "token sub is not a SPIFFE ID") from None
    return domain


def token_trust_domain(token: str) -> str:
    """The trust domain of the SPIFFE ID in an unverified token's ``sub``: it only
    chooses whose keys verify the token (SPIFFE Federation §7.3: a verifier uses only
    the bundle of the trust domain the SPIFFE ID resides in); nothing read here is
    believed before the signature holds."""
    claims = decode_json_segment(split_compact(token, MAX_TOKEN_BYTES)[1], "payload")
    return subject_trust_domain(claims.get("sub"))


class PartnerVerifier:
    """JWT-SVIDs of one federated trust domain, verified with that domain's bundle and
    nothing else: the algorithm of the key its ``kid`` names, ``aud`` holding the
    audience asked for, ``exp``/``nbf`` within ``leeway``, a lifetime of at most
    :data:`MAX_PARTNER_SVID_LIFETIME`, and a ``sub`` in *this* trust domain — a
    partner's keys vouch for its own IDs only, never ours or a third's. ``iss`` is not
    required (SPIRE omits it). The bundle serves until ``use_until`` (its last good
    fetch plus ``maxStale``); after that every token is refused."""

    def __init__(self, bundle: SpiffeBundle, use_until: float, leeway: float = 10.0) -> None:
        self.trust_domain = bundle.trust_domain
        self.sequence = bundle.sequence
        self.use_until = use_until
        self.leeway = leeway
        self.keys = KeyRing(bundle.jwks(), accepted_typs=SVID_TYPS)

    def verify(self, token: str, audience: str | None, now: float) -> VerifiedIdentity:
        if now > self.use_until:
            raise InvalidToken(
                "stale_bundle",
                f"the bundle of trust domain {self.trust_domain} is past its maxStale",
            )
        parts = split_compact(token, MAX_TOKEN_BYTES)
        key = self.keys.key_for_header(parts[0])
        claims = verify_compact(parts, key)
        check_registered_claims(
            claims,
            now=now,
            leeway=self.leeway,
            issuer=None,
            audience=audience,
            required=PARTNER_REQUIRED_CLAIMS,
        )
        subject = claims["sub"]
        if subject_trust_domain(subject) != self.trust_domain:
            raise InvalidToken(
                "bad_subject",
                f"a key of trust domain {self.trust_domain} vouches only for its own IDs",
            )
        expires = float(claims["exp"])
        issued = claims.get("iat")
        longest = MAX_PARTNER_SVID_LIFETIME + self.leeway
        if expires - now > longest or (
            isinstance(issued, int | float) and expires - issued > longest
        ):
            raise InvalidToken(
                "lifetime_too_long",
                f"token lives longer than {MAX_PARTNER_SVID_LIFETIME} s, the most accepted "
                "from a federated trust domain",
            )
        jti = claims.get("jti")
        return VerifiedIdentity(
            spiffe_id=subject,
            claims={name: claims[name] for name in PARTNER_CLAIMS if name in claims},
            jti=jti if isinstance(jti, str) else "",
            kid=key.kid,
            expires_at=expires,
        )
