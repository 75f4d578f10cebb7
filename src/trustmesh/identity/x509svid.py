"""X.509-SVIDs: checking a workload's certificate signing request (PKCS #10, RFC 2986)
and signing its leaf certificate as the SPIFFE X509-SVID standard says (DESIGN §9).

The CSR contributes its public key and nothing else: the certificate's subject,
validity and extensions are ours. It is still checked strictly, because a CSR that
asks for something else is a client that is confused or malicious, and each refusal is
a :class:`~trustmesh.common.errors.CsrRejected` that names the problem:

* at most :data:`MAX_CSR_BYTES` of PEM, exactly one ``CERTIFICATE REQUEST`` block and
  nothing around it but white space; strict base64; DER that parses;
* its self-signature verifies (RFC 2986 §3: proof of possession of the private key);
* its key is EC P-256 or P-384, RSA of 2048 to :data:`MAX_RSA_BITS` bits, or Ed25519;
* the only name it may request is the workload's SPIFFE ID: no subject alternative
  name at all, or exactly one URI SAN equal to it; any DNS name, IP address, e-mail
  address, other URI or other name is refused, and so is a subject ``commonName`` or
  ``emailAddress`` (names legacy clients match host names and people by); other subject
  attributes are ignored (the subject is ours);
* it does not ask for a CA certificate (``basicConstraints`` ``CA:TRUE``).

The leaf (X509-SVID §4, §5): one URI SAN, the SPIFFE ID (§2); ``basicConstraints``
critical ``CA:FALSE`` (§4.1); ``keyUsage`` critical, ``digitalSignature`` alone (§4.3;
``keyEncipherment`` is allowed and added for an RSA key, which TLS 1.2 RSA key exchange
needs); ``extendedKeyUsage`` ``serverAuth`` and ``clientAuth`` (§4.4); a random serial of
159 bits (RFC 5280 §4.1.2.2 allows up to 20 octets; at least 64 random bits, CA/B
Forum BR §7.1); ``subjectKeyIdentifier`` and ``authorityKeyIdentifier`` (the root's
SKI); subject ``O=trustmesh``. Validity is set by the caller: notBefore a little in
the past for clock skew, notAfter never after the root's."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from trustmesh.common.errors import CsrRejected, PayloadTooLarge
from trustmesh.identity.x509ca import ActiveRoot

MAX_CSR_BYTES = 16 * 1024
MAX_RSA_BITS = 8192
SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustmesh")])
_PEM = re.compile(
    r"-----BEGIN CERTIFICATE REQUEST-----\r?\n"
    r"(?P<body>[A-Za-z0-9+/=\r\n]+)"
    r"-----END CERTIFICATE REQUEST-----"
)
_FORBIDDEN_SUBJECT = {
    NameOID.COMMON_NAME: "a commonName",
    NameOID.EMAIL_ADDRESS: "an emailAddress",
}
_NAME_KINDS: dict[type, str] = {
    x509.DNSName: "a DNS name",
    x509.IPAddress: "an IP address",
    x509.RFC822Name: "an e-mail address",
    x509.DirectoryName: "a directory name",
    x509.RegisteredID: "a registered ID",
    x509.OtherName: "an otherName",
}

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def _der_of(pem: str) -> bytes:
    if len(pem.encode("utf-8", "surrogatepass")) > MAX_CSR_BYTES:
        raise PayloadTooLarge(f"csr: the CSR is larger than {MAX_CSR_BYTES} bytes of PEM")
    text = pem.strip()
    match = _PEM.fullmatch(text)
    if match is None:
        raise CsrRejected(
            "csr: not one PEM block '-----BEGIN CERTIFICATE REQUEST-----' … "
            "'-----END CERTIFICATE REQUEST-----' (nothing else around it)"
        )
    body = re.sub(r"\s", "", match.group("body"))
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise CsrRejected("csr: the PEM body is not valid base64") from None


def _checked_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CsrRejected("csr: its public key cannot be read") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise CsrRejected(
                f"csr: EC key on curve {key.curve.name}; only P-256 and P-384 are accepted"
            )
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= MAX_RSA_BITS:
            raise CsrRejected(
                f"csr: RSA key of {key.key_size} bits; 2048 to {MAX_RSA_BITS} bits are accepted"
            )
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise CsrRejected(
        f"csr: {type(key).__name__.removesuffix('PublicKey') or 'this'} key; accepted are "
        "EC P-256/P-384, RSA of at least 2048 bits and Ed25519"
    )


def _check_names(csr: x509.CertificateSigningRequest, spiffe_id: str) -> None:
    for attribute in csr.subject:
        what = _FORBIDDEN_SUBJECT.get(attribute.oid)
        if what is not None:
            raise CsrRejected(
                f"csr: the subject carries {what}; the only name an X.509-SVID holds is "
                f"its SPIFFE ID {spiffe_id} (leave the subject empty)"
            )
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CsrRejected(f"csr: its extensions cannot be read ({exc})"[:300]) from None
    for extension in extensions:
        if extension.oid == ExtensionOID.BASIC_CONSTRAINTS:
            constraints = extension.value
            assert isinstance(constraints, x509.BasicConstraints)
            if constraints.ca:
                raise CsrRejected("csr: asks for a CA certificate; an X.509-SVID is a leaf")
        if extension.oid != ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            continue
        san = extension.value
        assert isinstance(san, x509.SubjectAlternativeName)
        names: list[x509.GeneralName] = list(san)
        for name in names:
            if isinstance(name, x509.UniformResourceIdentifier):
                if name.value != spiffe_id:
                    raise CsrRejected(
                        f"csr: requests URI {name.value[:200]!r}; this workload's SPIFFE ID "
                        f"is {spiffe_id}"
                    )
                continue
            what = _NAME_KINDS.get(type(name), "a name")
            raise CsrRejected(
                f"csr: requests {what} ({str(getattr(name, 'value', ''))[:100]!r}); an "
                f"X.509-SVID names only its SPIFFE ID {spiffe_id}"
            )
        if len(names) > 1:
            raise CsrRejected(
                f"csr: requests {len(names)} subject alternative names; an X.509-SVID has "
                "exactly one, its SPIFFE ID"
            )


def check_csr(pem: str, spiffe_id: str) -> PublicKey:
    """The public key of a CSR that passes every check above, else CsrRejected (or
    PayloadTooLarge) naming the first problem."""
    der = _der_of(pem)
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError:
        raise CsrRejected("csr: the DER is not a PKCS #10 certificate request") from None
    key = _checked_key(csr)
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CsrRejected("csr: its signature does not verify with its own public key")
    _check_names(csr, spiffe_id)
    return key


def sign_svid(
    root: ActiveRoot,
    public_key: PublicKey,
    spiffe_id: str,
    not_before: float,
    not_after: float,
) -> x509.Certificate:
    """The leaf X.509-SVID for ``spiffe_id`` over ``public_key``, signed by ``root``."""
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(root.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.fromtimestamp(not_before, UTC))
        .not_valid_after(datetime.fromtimestamp(min(not_after, root.not_after), UTC))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=rsa_key,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(root.authority_key_identifier, critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
    )
    return builder.sign(root.private_key, hashes.SHA256())


def pem_of(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def csr_pem(private_key: ec.EllipticCurvePrivateKey) -> str:
    """What a workload sends (``POST /v1/x509-svid``): a PKCS #10 request over its EC
    key, empty subject, no names (the control plane names the certificate)."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return csr.sign(private_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
