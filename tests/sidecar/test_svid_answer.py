"""What the sidecar accepts from ``POST /v1/x509-svid`` before serving it: an X509-SVID
by the SPIFFE standard, for the key it made, chaining to the answered bundle. The
certificates are real ones, made here by a small CA with ``cryptography``."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.common.errors import UnusableSvid
from trustmesh.sidecar.x509 import MAX_CHAIN, csr_pem, new_private_key, svid_from_answer

SPIFFE_ID = "spiffe://corp.example/cluster/east/ns/shop/sa/payments"


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_root(name: str = "root") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    public_key: Any,
    *,
    uris: tuple[str, ...] = (SPIFFE_ID,),
    ca_flag: bool = False,
    lifetime: datetime.timedelta = datetime.timedelta(hours=1),
    start: datetime.timedelta = datetime.timedelta(seconds=-5),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + start)
        .not_valid_after(now + start + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, True, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
    return builder.sign(ca_key, hashes.SHA256())


def answer(leaf: x509.Certificate, *chain: x509.Certificate, bundle: str) -> dict[str, Any]:
    return {
        "spiffe_id": SPIFFE_ID,
        "svid": [pem(leaf), *(pem(c) for c in chain)],
        "bundle": bundle,
        "expires_at": leaf.not_valid_after_utc.isoformat(),
    }


def test_a_proper_svid_is_accepted_with_its_times_and_encodings() -> None:
    ca_key, root = make_root()
    key = new_private_key()
    leaf = make_leaf(ca_key, root, key.public_key())
    svid = svid_from_answer(answer(leaf, bundle=pem(root)), key, time.time())
    assert svid.spiffe_id == SPIFFE_ID
    assert svid.trust_domain == "corp.example"
    assert svid.not_after == leaf.not_valid_after_utc.timestamp()
    assert x509.load_der_x509_certificate(svid.chain_der()) == leaf
    loaded = serialization.load_der_private_key(svid.key_der(), None)
    assert loaded.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert x509.load_pem_x509_certificates(svid.bundle_pem()) == [root]


def test_an_intermediate_between_leaf_and_root_is_followed() -> None:
    root_key, root = make_root()
    mid_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.subject)
        .public_key(mid_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    key = new_private_key()
    leaf = make_leaf(mid_key, intermediate, key.public_key())
    svid = svid_from_answer(answer(leaf, intermediate, bundle=pem(root)), key, time.time())
    assert svid.chain == (leaf, intermediate)


def test_the_csr_proves_possession_of_the_key_and_names_nothing() -> None:
    key = new_private_key()
    request = x509.load_pem_x509_csr(csr_pem(key).encode())
    assert request.is_signature_valid
    assert request.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert list(request.subject) == []
    assert list(request.extensions) == []


def _refused(document: dict[str, Any], key: ec.EllipticCurvePrivateKey, match: str) -> None:
    with pytest.raises(UnusableSvid, match=match):
        svid_from_answer(document, key, time.time())


def test_a_leaf_for_another_key_is_refused() -> None:
    ca_key, root = make_root()
    key = new_private_key()
    leaf = make_leaf(ca_key, root, new_private_key().public_key())
    _refused(answer(leaf, bundle=pem(root)), key, "key of our request")


@pytest.mark.parametrize(
    ("uris", "match"),
    [
        ((), "URI SANs"),
        ((SPIFFE_ID, "spiffe://corp.example/other"), "URI SANs"),
        (("spiffe://corp.example/other",), "URI SANs"),
    ],
)
def test_a_leaf_without_exactly_the_answered_spiffe_id_is_refused(
    uris: tuple[str, ...], match: str
) -> None:
    ca_key, root = make_root()
    key = new_private_key()
    leaf = make_leaf(ca_key, root, key.public_key(), uris=uris)
    _refused(answer(leaf, bundle=pem(root)), key, match)


def test_a_ca_certificate_as_leaf_is_refused() -> None:
    ca_key, root = make_root()
    key = new_private_key()
    leaf = make_leaf(ca_key, root, key.public_key(), ca_flag=True)
    _refused(answer(leaf, bundle=pem(root)), key, "CA certificate")


def test_a_chain_to_another_root_is_refused() -> None:
    ca_key, root = make_root()
    _, stranger = make_root("stranger")
    key = new_private_key()
    leaf = make_leaf(ca_key, root, key.public_key())
    _refused(answer(leaf, bundle=pem(stranger)), key, "does not lead to a root")


def test_an_expired_leaf_is_refused() -> None:
    ca_key, root = make_root()
    key = new_private_key()
    leaf = make_leaf(
        ca_key,
        root,
        key.public_key(),
        start=datetime.timedelta(hours=-2),
        lifetime=datetime.timedelta(hours=1),
    )
    _refused(answer(leaf, bundle=pem(root)), key, "already expired")


def test_malformed_and_oversized_answers_are_refused() -> None:
    ca_key, root = make_root()
    key = new_private_key()
    leaf = make_leaf(ca_key, root, key.public_key())
    good = answer(leaf, bundle=pem(root))
    _refused({**good, "spiffe_id": "https://corp.example/x"}, key, "not a SPIFFE ID")
    _refused({**good, "svid": pem(leaf)}, key, "list of 1 to")
    _refused({**good, "svid": [pem(leaf)] * (MAX_CHAIN + 1)}, key, "list of 1 to")
    _refused(
        {**good, "svid": ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]},
        key,
        "not a PEM certificate",
    )
    _refused({**good, "svid": [pem(leaf) + pem(root)]}, key, "holds 2 certificates")
    _refused({**good, "svid": ["A" * 70_000]}, key, "larger than")
    _refused({**good, "bundle": ""}, key, "bundle is not a PEM string")
    _refused({**good, "bundle": "junk"}, key, "bundle is not PEM")
