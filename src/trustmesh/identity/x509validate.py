"""Validating a presented X.509-SVID (SPIFFE X509-SVID §5, "Validation"), as a relying
party does with a client certificate: the agent's mTLS path (``agent/xfcc.py``).

What is checked, in this order, each refusal an
:class:`~trustmesh.common.errors.InvalidToken` whose ``reason`` names the kind:

* **shape** (``malformed_certificate``): one PEM ``CERTIFICATE`` block per certificate,
  nothing around it but white space, strict base64, DER that parses; at most
  :data:`MAX_CERTIFICATE_BYTES` of PEM each and :data:`MAX_INTERMEDIATES`
  intermediates;
* **an X509-SVID** (``not_an_svid``): exactly one URI SAN, a SPIFFE ID (§2; other
  name types are allowed by §2 and ignored); ``basicConstraints`` present with
  ``CA:FALSE`` (§4.1); ``keyUsage`` present with ``digitalSignature`` and without
  ``keyCertSign`` or ``cRLSign`` (§4.3); ``extendedKeyUsage`` present with
  ``clientAuth`` (§4.4: the certificate is presented as a client's);
* **validity** on the caller's clock (``not_yet_valid``, ``expired``): no leeway, as a
  TLS handshake has none — certificates are issued with a 30 s backdate instead;
* **trust** (``untrusted``): the chain verifies, by ``cryptography``'s RFC 5280 path
  validator (client profile), to a root of the bundle of the SPIFFE ID's **own** trust
  domain (§5.2, Trust Domain and Bundle §6.4: a bundle vouches only for its own trust
  domain, so a partner's roots never vouch for our IDs nor ours for theirs), at the
  same time, with at most :data:`MAX_INTERMEDIATES` intermediates.

Which roots each trust domain has is the caller's (:class:`TrustStores`)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from trustmesh.common.errors import InvalidToken, SpiffeIdError
from trustmesh.identity.x509ca import fingerprint
from trustmesh.spiffeid import parse_spiffe_id

MAX_CERTIFICATE_BYTES = 8 * 1024  # PEM of one certificate; ours are under 1 KiB
MAX_INTERMEDIATES = 4
_PEM = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\r\n]+?)-----END CERTIFICATE-----"
)
_WHITE = re.compile(r"\s*")

TrustStores = Callable[[str], Store | None]
"""Trust domain -> the store of its bundle's roots, or None: a trust domain the agent
holds no bundle for (federated partners' bundles come in here)."""


@dataclass(frozen=True, slots=True)
class VerifiedSvid:
    """What a validated X.509-SVID tells: the SPIFFE ID and the facts an audit record
    and a revocation check need (never the certificate itself)."""

    spiffe_id: str
    trust_domain: str
    not_before: float
    not_after: float
    serial: str  # hex, lowercase, as svid.issued records it
    sha256: str  # of the leaf's DER, hex (what Envoy's XFCC Hash and openssl show)
    root: str  # fingerprint of the root the chain ends at


def _malformed(description: str) -> InvalidToken:
    return InvalidToken("malformed_certificate", description)


def certificates_of_pem(text: str, what: str, most: int) -> list[bytes]:
    """The DER of each ``CERTIFICATE`` block of ``text``, strictly: only white space
    around and between blocks, strict base64, at least one and at most ``most``."""
    if len(text) > MAX_CERTIFICATE_BYTES * most:
        raise _malformed(f"{what} is larger than {MAX_CERTIFICATE_BYTES * most} bytes")
    found: list[bytes] = []
    position = _WHITE.match(text).end()  # type: ignore[union-attr]
    while position < len(text):
        match = _PEM.match(text, position)
        if match is None:
            raise _malformed(f"{what} is not PEM CERTIFICATE blocks alone")
        if len(found) == most:
            raise _malformed(f"{what} has more than {most} certificates")
        body = re.sub(r"\s", "", match.group(1))
        try:
            found.append(base64.b64decode(body, validate=True))
        except (binascii.Error, ValueError):
            raise _malformed(f"{what}: a PEM body is not valid base64") from None
        position = _WHITE.match(text, match.end()).end()  # type: ignore[union-attr]
    if not found:
        raise _malformed(f"{what} holds no certificate")
    return found


def load_certificate(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise _malformed(f"{what} is not a DER X.509 certificate") from None


def _not_an_svid(description: str) -> InvalidToken:
    return InvalidToken("not_an_svid", description)


_E = TypeVar("_E", bound=x509.ExtensionType)


def _extension(extensions: x509.Extensions, kind: type[_E], name: str) -> _E:
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        raise _not_an_svid(f"the certificate has no {name} extension") from None


def svid_id(leaf: x509.Certificate) -> tuple[str, str]:
    """(SPIFFE ID, trust domain) of a leaf that is an X509-SVID a client may present
    (see the module docstring), else InvalidToken ``not_an_svid``."""
    try:
        extensions = leaf.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise _not_an_svid("the certificate's extensions cannot be read") from None
    names = _extension(extensions, x509.SubjectAlternativeName, "subjectAltName")
    constraints = _extension(extensions, x509.BasicConstraints, "basicConstraints")
    usage = _extension(extensions, x509.KeyUsage, "keyUsage")
    extended = _extension(extensions, x509.ExtendedKeyUsage, "extendedKeyUsage")
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise _not_an_svid(f"the certificate has {len(uris)} URI SANs; an X509-SVID has one")
    try:
        trust_domain, _ = parse_spiffe_id(uris[0])
    except SpiffeIdError:
        raise _not_an_svid("the certificate's URI SAN is not a SPIFFE ID") from None
    if constraints.ca:
        raise _not_an_svid("the certificate is a CA (CA:TRUE); an X509-SVID leaf is not")
    if not usage.digital_signature or usage.key_cert_sign or usage.crl_sign:
        raise _not_an_svid(
            "the certificate's keyUsage is not a leaf's (digitalSignature, no keyCertSign "
            "or cRLSign)"
        )
    if ExtendedKeyUsageOID.CLIENT_AUTH not in extended:
        raise _not_an_svid("the certificate's extendedKeyUsage does not allow clientAuth")
    return uris[0], trust_domain


def der_of(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def validate_svid(
    leaf_der: bytes, intermediates_der: Sequence[bytes], stores: TrustStores, now: float
) -> VerifiedSvid:
    """A presented X.509-SVID (leaf and intermediates, DER), validated at ``now``
    against the store of its own trust domain; InvalidToken naming the first problem."""
    leaf = load_certificate(leaf_der, "the certificate")
    if len(intermediates_der) > MAX_INTERMEDIATES:
        raise _malformed(f"the chain has more than {MAX_INTERMEDIATES} intermediates")
    intermediates = [load_certificate(der, "an intermediate") for der in intermediates_der]
    spiffe_id, trust_domain = svid_id(leaf)
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if now < not_before:
        raise InvalidToken("not_yet_valid", "the certificate is not valid yet (notBefore)")
    if now > not_after:
        raise InvalidToken("expired", "the certificate has expired (notAfter)")
    store = stores(trust_domain)
    if store is None:
        raise InvalidToken("untrusted", f"no trust bundle is held for trust domain {trust_domain}")
    verifier = (
        PolicyBuilder()
        .store(store)
        .time(datetime.fromtimestamp(now, UTC))
        .max_chain_depth(MAX_INTERMEDIATES + 1)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, intermediates)
    except VerificationError:
        raise InvalidToken(
            "untrusted", f"the certificate does not chain to the bundle of {trust_domain}"
        ) from None
    return VerifiedSvid(
        spiffe_id=spiffe_id,
        trust_domain=trust_domain,
        not_before=not_before,
        not_after=not_after,
        serial=format(leaf.serial_number, "x"),
        sha256=hashlib.sha256(leaf_der).hexdigest(),
        root=fingerprint(verified.chain[-1]),
    )
