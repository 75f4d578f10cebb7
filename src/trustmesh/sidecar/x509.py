"""The sidecar's X.509-SVID: its private key (ECDSA P-256, made here, kept in memory),
the certificate signing request (RFC 2986) sent to the control plane, and the check of
what comes back against the SPIFFE X509-SVID standard before anything is served.

An answer of ``POST /v1/x509-svid`` (DESIGN §9) is used only when

* the chain holds 1 to :data:`MAX_CHAIN` certificates, each one PEM certificate, and the
  bundle 1 to :data:`MAX_BUNDLE` roots (the bounds of docs/security.md);
* the leaf carries *our* public key (the private key never left us);
* the leaf is an X509-SVID leaf (X509-SVID §4.1, §4.3, §4.4): exactly one URI SAN, which
  is the answered ``spiffe_id``, a SPIFFE ID (SPIFFE-ID §2); ``CA:false``; key usage
  digitalSignature and no certificate or CRL signing;
* every certificate of the chain is signed by the next one, and the last by a root of
  the bundle (X509-SVID §5.2: the bundle is the trust anchor);
* the leaf is valid now and its lifetime is positive.

Anything else is :class:`UnusableSvid`, and the current SVID stays in service."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.common.errors import SpiffeIdError, UnusableSvid
from trustmesh.spiffeid import parse_spiffe_id

MAX_CHAIN = 8
MAX_BUNDLE = 32
MAX_PEM_BYTES = 64 * 1024
CLOCK_SKEW = 60.0  # seconds a leaf's notBefore may lie ahead of our clock


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key: one per SVID, never written anywhere but the credential
    folder's ``svid_key.pem`` when the operator asks for it."""
    return ec.generate_private_key(ec.SECP256R1())


def csr_pem(key: ec.EllipticCurvePrivateKey) -> str:
    """A PKCS#10 request proving possession of ``key``. It names nothing: the control
    plane decides the SPIFFE ID from the service-account token, and a request that named
    an ID the registry has since changed would only be refused."""
    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return request.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def der_certificates(certificates: Iterable[x509.Certificate]) -> bytes:
    """Certificates as the Workload API carries them: DER, concatenated."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certificates)


def pem_certificates(certificates: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


@dataclass(frozen=True)
class X509Svid:
    """One issued X.509-SVID with its key and the trust bundle it chains to. Times are
    seconds since the epoch."""

    spiffe_id: str
    chain: tuple[x509.Certificate, ...]
    """Leaf first, then intermediates."""
    key: ec.EllipticCurvePrivateKey
    bundle: tuple[x509.Certificate, ...]
    """The roots of our trust domain (X509-SVID §5)."""
    not_before: float
    not_after: float

    @property
    def trust_domain(self) -> str:
        return parse_spiffe_id(self.spiffe_id)[0]

    @property
    def serial(self) -> str:
        return f"{self.chain[0].serial_number:x}"

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    # -- the encodings each surface serves ------------------------------------------------
    def chain_der(self) -> bytes:
        """The Workload API's ``x509_svid``: the chain's DER certificates, concatenated."""
        return der_certificates(self.chain)

    def key_der(self) -> bytes:
        """The Workload API's ``x509_svid_key``: PKCS#8 DER, unencrypted."""
        return self._key_bytes(serialization.Encoding.DER)

    def _key_bytes(self, encoding: serialization.Encoding) -> bytes:
        return self.key.private_bytes(
            encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def bundle_der(self) -> bytes:
        return der_certificates(self.bundle)

    def chain_pem(self) -> bytes:
        return pem_certificates(self.chain)

    def key_pem(self) -> bytes:
        return self._key_bytes(serialization.Encoding.PEM)

    def bundle_pem(self) -> bytes:
        return pem_certificates(self.bundle)

    def version(self) -> str:
        """A short name for this certificate and bundle (SDS ``version_info``)."""
        return hashlib.sha256(self.chain_der() + self.bundle_der()).hexdigest()[:16]


def _epoch(moment: datetime) -> float:
    return moment.timestamp()


def _one_certificate(pem: object, what: str) -> x509.Certificate:
    if not isinstance(pem, str) or not pem.strip():
        raise UnusableSvid(f"{what} is not a PEM string")
    if len(pem) > MAX_PEM_BYTES:
        raise UnusableSvid(f"{what} is larger than {MAX_PEM_BYTES} bytes")
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise UnusableSvid(f"{what} is not a PEM certificate") from None
    if len(certificates) != 1:
        raise UnusableSvid(f"{what} holds {len(certificates)} certificates, not one")
    return certificates[0]


def _bundle(pem: object) -> tuple[x509.Certificate, ...]:
    if not isinstance(pem, str) or not pem.strip():
        raise UnusableSvid("the bundle is not a PEM string")
    if len(pem) > MAX_PEM_BYTES:
        raise UnusableSvid(f"the bundle is larger than {MAX_PEM_BYTES} bytes")
    try:
        roots = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise UnusableSvid("the bundle is not PEM certificates") from None
    if not 1 <= len(roots) <= MAX_BUNDLE:
        raise UnusableSvid(f"the bundle holds {len(roots)} roots (1 to {MAX_BUNDLE} allowed)")
    return tuple(roots)


def _check_leaf(leaf: x509.Certificate, spiffe_id: str) -> None:
    """X509-SVID §4.1 (one URI SAN), §4.3 (basic constraints), §4.4 (key usage)."""
    try:
        alternative = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = alternative.value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        names = []
    if names != [spiffe_id]:
        raise UnusableSvid(
            f"the leaf's URI SANs {names[:3]!r} are not exactly the SPIFFE ID {spiffe_id}"
        )
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise UnusableSvid("the leaf has no basic constraints (CA:false is required)") from None
    if constraints.ca:
        raise UnusableSvid("the leaf is a CA certificate")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise UnusableSvid("the leaf has no key usage") from None
    if not usage.digital_signature or usage.key_cert_sign or usage.crl_sign:
        raise UnusableSvid("the leaf's key usage is not that of an X509-SVID leaf")


def _check_signatures(chain: list[x509.Certificate], roots: tuple[x509.Certificate, ...]) -> None:
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise UnusableSvid(
                "the chain is broken: a certificate is not signed by the next"
            ) from None
    last = chain[-1]
    for root in roots:
        try:
            last.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise UnusableSvid("the chain does not lead to a root of the answered bundle")


def svid_from_answer(
    answer: dict[str, object], key: ec.EllipticCurvePrivateKey, now: float
) -> X509Svid:
    """The X.509-SVID in a ``POST /v1/x509-svid`` answer, checked as the module says."""
    spiffe_id = answer.get("spiffe_id")
    if not isinstance(spiffe_id, str):
        raise UnusableSvid("the answer has no spiffe_id")
    try:
        parse_spiffe_id(spiffe_id)
    except SpiffeIdError as exc:
        raise UnusableSvid(f"the answered spiffe_id is not a SPIFFE ID: {exc}") from None
    pems = answer.get("svid")
    if not isinstance(pems, list) or not 1 <= len(pems) <= MAX_CHAIN:
        raise UnusableSvid(f"svid must be a list of 1 to {MAX_CHAIN} PEM certificates")
    chain = [_one_certificate(pem, f"svid[{i}]") for i, pem in enumerate(pems)]
    roots = _bundle(answer.get("bundle"))
    leaf = chain[0]
    ours = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if ours != theirs:
        raise UnusableSvid("the leaf does not carry the key of our request")
    _check_leaf(leaf, spiffe_id)
    _check_signatures(chain, roots)
    not_before = _epoch(leaf.not_valid_before_utc)
    not_after = _epoch(leaf.not_valid_after_utc)
    if not_after <= not_before:
        raise UnusableSvid("the leaf's lifetime is not positive")
    if now >= not_after:
        raise UnusableSvid("the leaf has already expired")
    if not_before > now + CLOCK_SKEW:
        raise UnusableSvid("the leaf is not valid yet (is a clock wrong?)")
    return X509Svid(spiffe_id, tuple(chain), key, roots, not_before, not_after)
