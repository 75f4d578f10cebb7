"""SPIFFE bundles of other trust domains (SPIFFE Trust Domain and Bundle §4, SPIFFE
Federation §4.2), read under bounds and reduced to the keys we can use.

A partner's bundle endpoint is a stranger on the network, so everything here is
bounded before it is believed: at most :data:`MAX_BUNDLE_BYTES` of UTF-8 JSON, at most
:data:`MAX_BUNDLE_KEYS` elements in ``keys``, of which at most :data:`MAX_JWT_KEYS`
JWT-SVID keys and :data:`MAX_X509_ROOTS` X.509 roots.

* §4.1: ``keys`` must be present (a list); ``spiffe_sequence`` and
  ``spiffe_refresh_hint``, when present, are non-negative integers (§4.1.1, §4.1.2).
* §4.2.1, §4.2.2: an element of unknown ``kty`` or ``use`` is ignored, as the standard
  requires; an element that is not an object is malformed.
* ``use: jwt-svid`` (JWT-SVID §2): a ``kid``, an EC (P-256, P-384, P-521) or RSA
  (≥ 2048 bits) public key, no private member. Each key is pinned to one algorithm: its
  ``alg`` when it names one (it must fit the key), else the curve's ES algorithm, or
  RS256 for RSA (what SPIRE signs with) — never the token's choice. Kids are unique.
* ``use: x509-svid`` (X509-SVID §6): ``x5c`` holds exactly one certificate, a CA.

A key we would have to guess about (a broken certificate, a private member, a key too
small, two keys with one ``kid``) refuses the whole bundle: the caller keeps the last
good one. What is kept is the canonical :meth:`SpiffeBundle.document` — only the members
we use — which is what the control plane stores and ships to agents and sidecars, who
read it back with the same :func:`parse_bundle`."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography import x509

from trustmesh.common.errors import BundleError
from trustmesh.identity.jws import ASYMMETRIC_ALGS, VerificationKey
from trustmesh.identity.x509ca import MAX_REPORTED_ROOTS, MAX_X5C_BYTES

MAX_BUNDLE_BYTES = 256 * 1024
MAX_BUNDLE_KEYS = 64
MAX_JWT_KEYS = 32
MAX_X509_ROOTS = MAX_REPORTED_ROOTS
MAX_KID_LENGTH = 256
MAX_SEQUENCE = 2**63 - 1
MAX_REFRESH_HINT = 2**31 - 1

JWT_SVID = "jwt-svid"
X509_SVID = "x509-svid"
_KNOWN_KTY = ("EC", "RSA")
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_EC_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_MEMBERS = {
    "EC": ("kty", "use", "kid", "alg", "crv", "x", "y"),
    "RSA": ("kty", "use", "kid", "alg", "n", "e"),
}


@dataclass(frozen=True)
class SpiffeBundle:
    """One trust domain's keys: the JWT-SVID keys (each with ``kid`` and its pinned
    ``alg``) and the X.509 roots, with the bundle's sequence and refresh hint."""

    trust_domain: str
    jwt_keys: tuple[dict[str, Any], ...]
    x509_keys: tuple[dict[str, Any], ...]
    roots: tuple[x509.Certificate, ...]
    sequence: int | None
    refresh_hint: int | None

    def jwks(self) -> dict[str, Any]:
        """The JWT bundle (a JWKS of the ``jwt-svid`` keys)."""
        return {"keys": [dict(key) for key in self.jwt_keys]}

    def document(self) -> dict[str, Any]:
        """The bundle as we keep and ship it: a SPIFFE bundle of the keys we use."""
        document: dict[str, Any] = {
            "keys": [dict(key) for key in (*self.jwt_keys, *self.x509_keys)]
        }
        if self.sequence is not None:
            document["spiffe_sequence"] = self.sequence
        if self.refresh_hint is not None:
            document["spiffe_refresh_hint"] = self.refresh_hint
        return document

    def canonical(self) -> str:
        """:meth:`document` as sorted, compact JSON (what is stored and compared)."""
        return orjson.dumps(self.document(), option=orjson.OPT_SORT_KEYS).decode()


def _integer(document: dict[str, Any], name: str, maximum: int) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise BundleError(f"{name} must be an integer between 0 and {maximum}")
    return value


def _jwt_key(index: int, jwk: dict[str, Any]) -> dict[str, Any]:
    kty = jwk["kty"]
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH:
        raise BundleError(f"keys[{index}]: a jwt-svid key needs a kid (1-{MAX_KID_LENGTH} chars)")
    alg = jwk.get("alg")
    if kty == "EC":
        pinned = _EC_ALG.get(jwk.get("crv"))  # type: ignore[arg-type]
        if pinned is None:
            raise BundleError(f"keys[{index}] ({kid}): curve must be P-256, P-384 or P-521")
        if alg is not None and alg != pinned:
            raise BundleError(f"keys[{index}] ({kid}): alg {alg!r} does not fit its curve")
    else:
        pinned = alg if alg is not None else "RS256"
        if pinned not in ASYMMETRIC_ALGS or pinned.startswith("ES"):
            raise BundleError(f"keys[{index}] ({kid}): alg {str(alg)[:20]!r} is not RS or PS")
    key = {m: jwk[m] for m in _MEMBERS[kty] if m in jwk}
    key["alg"] = pinned
    try:
        VerificationKey.from_jwk(key)
    except ValueError as exc:
        raise BundleError(f"keys[{index}] ({kid}): {exc}") from None
    return key


def _x509_key(index: int, jwk: dict[str, Any]) -> tuple[dict[str, Any], x509.Certificate]:
    chain = jwk.get("x5c")
    if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
        raise BundleError(f"keys[{index}]: an x509-svid key's x5c must hold one certificate")
    if len(chain[0]) > MAX_X5C_BYTES * 4 // 3 + 4:
        raise BundleError(f"keys[{index}]: its certificate is larger than {MAX_X5C_BYTES} bytes")
    try:
        certificate = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except (ValueError, binascii.Error, x509.ExtensionNotFound):
        raise BundleError(f"keys[{index}]: x5c is not a DER certificate of a CA") from None
    if not constraints.value.ca:
        raise BundleError(f"keys[{index}]: its certificate is not a CA (basicConstraints)")
    key = {m: jwk[m] for m in (*_MEMBERS[jwk["kty"]], "x5c") if m in jwk and m != "kid"}
    return key, certificate


def parse_bundle(data: bytes | dict[str, Any], trust_domain: str) -> SpiffeBundle:
    """The bundle ``data`` (bytes as served, or an already parsed document) for
    ``trust_domain`` — the trust domain comes from configuration, never from the
    bundle (Federation §5.1). BundleError naming the problem otherwise."""
    if isinstance(data, bytes):
        if len(data) > MAX_BUNDLE_BYTES:
            raise BundleError(f"the bundle is larger than {MAX_BUNDLE_BYTES} bytes")
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BundleError("the bundle is not UTF-8 JSON") from None
    else:
        document = data
    if not isinstance(document, dict):
        raise BundleError("the bundle is not a JSON object (a JWK Set)")
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise BundleError("the bundle has no keys list (SPIFFE bundle §4.1.3)")
    if len(keys) > MAX_BUNDLE_KEYS:
        raise BundleError(f"the bundle has more than {MAX_BUNDLE_KEYS} keys")
    sequence = _integer(document, "spiffe_sequence", MAX_SEQUENCE)
    refresh_hint = _integer(document, "spiffe_refresh_hint", MAX_REFRESH_HINT)
    jwt_keys: list[dict[str, Any]] = []
    x509_keys: list[dict[str, Any]] = []
    roots: list[x509.Certificate] = []
    for index, jwk in enumerate(keys):
        if not isinstance(jwk, dict):
            raise BundleError(f"keys[{index}] is not a JSON object")
        use, kty = jwk.get("use"), jwk.get("kty")
        if use not in (JWT_SVID, X509_SVID) or kty not in _KNOWN_KTY:
            continue  # §4.2.1, §4.2.2: ignored
        private = [m for m in _PRIVATE_MEMBERS if m in jwk]
        if private:
            raise BundleError(f"keys[{index}] holds private-key members ({', '.join(private)})")
        if use == JWT_SVID:
            jwt_keys.append(_jwt_key(index, jwk))
        else:
            key, root = _x509_key(index, jwk)
            x509_keys.append(key)
            roots.append(root)
    if len(jwt_keys) > MAX_JWT_KEYS:
        raise BundleError(f"the bundle has more than {MAX_JWT_KEYS} jwt-svid keys")
    if len(roots) > MAX_X509_ROOTS:
        raise BundleError(f"the bundle has more than {MAX_X509_ROOTS} x509-svid roots")
    kids = [key["kid"] for key in jwt_keys]
    if len(set(kids)) != len(kids):
        raise BundleError("two jwt-svid keys of the bundle share one kid")
    return SpiffeBundle(
        trust_domain=trust_domain,
        jwt_keys=tuple(jwt_keys),
        x509_keys=tuple(x509_keys),
        roots=tuple(roots),
        sequence=sequence,
        refresh_hint=refresh_hint,
    )


@dataclass(frozen=True)
class FederatedBundle:
    """A federated trust domain's bundle as the control plane ships it to agents and
    sidecars, usable until ``use_until`` (its last good fetch plus ``maxStale``)."""

    bundle: SpiffeBundle
    use_until: float


def read_federated(
    domains: Any, own_trust_domain: str
) -> tuple[dict[str, FederatedBundle], list[str]]:
    """The ``trust_domains`` of ``GET /v1/federation/bundles`` (trust domain ->
    ``{"bundle", "use_until"}``): the bundles that parse, and what was wrong with the
    others (skipped: a domain whose bundle we cannot read is a domain we do not trust).
    Our own trust domain is never taken from it."""
    found: dict[str, FederatedBundle] = {}
    problems: list[str] = []
    if not isinstance(domains, dict):
        return found, ["the federated bundles are not a JSON object"]
    for domain, entry in domains.items():
        if domain == own_trust_domain:
            problems.append(f"{domain}: our own trust domain is not federated")
            continue
        use_until = entry.get("use_until") if isinstance(entry, dict) else None
        if isinstance(use_until, bool) or not isinstance(use_until, int | float):
            problems.append(f"{domain}: no use_until")
            continue
        try:
            found[domain] = FederatedBundle(parse_bundle(entry.get("bundle"), domain), use_until)
        except BundleError as exc:
            problems.append(f"{domain}: {exc.description}")
    return found, problems
