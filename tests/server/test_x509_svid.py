"""X.509-SVID issuance (DESIGN §9) against a real control plane process and a real
simulated cluster: ``POST /v1/x509-svid`` over HTTP, certificates checked with
``cryptography`` (its X.509 path validator included) against the SPIFFE X509-SVID
standard, and the bundle as py-spiffe parses it."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import TrustDomain, X509Bundle

from helpers import (
    TRUST_DOMAIN,
    Federation,
    Server,
    register_federation,
    start_server,
    workload_yaml,
)
from trustmesh.sim import SimulatedCluster

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@pytest.fixture
def federation(shared_server: Server, sim_cluster: SimulatedCluster) -> Federation:
    return register_federation(shared_server, sim_cluster)


def spiffe_id_of(fed: Federation, service_account: str = "payments") -> str:
    return (
        f"spiffe://{TRUST_DOMAIN}/cluster/{fed.origin_name}/ns/{fed.namespace}/sa/{service_account}"
    )


def make_csr(
    key: PrivateKey | None = None,
    names: list[x509.GeneralName] | None = None,
    subject: x509.Name | None = None,
    ca: bool = False,
) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def request_svid(server: Server, token: str, csr: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/x509-svid",
        json={"subject_token": token, "csr": csr, **extra},
        timeout=10,
    )


def issue(fed: Federation, key: PrivateKey | None = None, **extra: Any) -> dict[str, Any]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    response = request_svid(fed.server, fed.sa_token(), make_csr(key), **extra)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def roots_of(bundle_pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle_pem.encode())


def audit_events(server: Server, **query: str) -> list[dict[str, Any]]:
    answer = server.admin.get("/v1/audit/query", params={"limit": "1000", **query})
    assert answer.status_code == 200, answer.text
    return [entry["event"] for entry in answer.json()["entries"]]


def test_issued_leaf_follows_the_x509_svid_standard(federation: Federation) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    before = time.time()
    body = issue(federation, key)
    spiffe_id = spiffe_id_of(federation)
    assert set(body) == {"spiffe_id", "svid", "bundle", "expires_at"}
    assert body["spiffe_id"] == spiffe_id
    assert len(body["svid"]) == 1  # roots sign leaves: no intermediate
    leaf = x509.load_pem_x509_certificate(body["svid"][0].encode())
    # the private key never left us: the certificate carries our public key
    assert leaf.public_key() == key.public_key()
    # X509-SVID §2: exactly one URI SAN, the SPIFFE ID, and no other name
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(spiffe_id)]
    assert not leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    # §4.1: a leaf, CA false, critical
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    # §4.3: key usage critical, digitalSignature, never keyCertSign or cRLSign
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    # §4.4: serverAuth and clientAuth
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.serial_number.bit_length() >= 64
    # default lifetime 1 h from now; notBefore a little in the past for skew
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    assert before - 120 < not_before <= before
    assert abs(not_after - (before + 3600)) < 60
    assert body["expires_at"] == int(not_after)
    # it chains to the bundle's roots under a real path validator, as a client cert
    roots = roots_of(body["bundle"])
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(datetime.fromtimestamp(before + 5, UTC))
        .build_client_verifier()
    )
    verified = verifier.verify(leaf, [])
    assert verified.subjects == [x509.UniformResourceIdentifier(spiffe_id)]
    issuer = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    signer = next(r for r in roots if r.subject == leaf.issuer)
    assert (
        issuer.key_identifier
        == signer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )


def test_roots_are_p256_cas_published_as_pem_and_in_the_spiffe_bundle(
    federation: Federation,
) -> None:
    server = federation.server
    pem = httpx.get(server.url + "/v1/bundle.pem")  # no credential
    assert pem.status_code == 200 and pem.headers["content-type"].startswith(
        "application/x-pem-file"
    )
    roots = roots_of(pem.text)
    assert len(roots) == 2  # the active root and the prepared one, published before it signs
    for root in roots:
        public = root.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
        constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
        usage = root.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
        assert root.issuer == root.subject
        root.verify_directly_issued_by(root)  # self-signed
        san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}")]
    document = httpx.get(server.url + "/.well-known/spiffe-bundle").json()
    x509_keys = [k for k in document["keys"] if k["use"] == "x509-svid"]
    jwt_keys = [k for k in document["keys"] if k["use"] == "jwt-svid"]
    assert jwt_keys and all("kid" in k for k in jwt_keys)
    assert all("kid" not in k for k in x509_keys)
    ders = [base64.b64decode(k["x5c"][0]) for k in x509_keys]
    assert ders == [r.public_bytes(serialization.Encoding.DER) for r in roots]
    for jwk, root in zip(x509_keys, roots, strict=True):
        public = root.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        x = int.from_bytes(base64.urlsafe_b64decode(jwk["x"] + "=="), "big")
        assert (jwk["kty"], jwk["crv"], x) == ("EC", "P-256", public.public_numbers().x)
    # py-spiffe reads the same roots from the PEM and from the DER, as its clients do
    trust_domain = TrustDomain(TRUST_DOMAIN)
    from_pem = X509Bundle.parse(trust_domain, pem.content)
    from_der = X509Bundle.parse_raw(trust_domain, b"".join(ders))
    expected = {r.public_bytes(serialization.Encoding.DER) for r in roots}
    for bundle in (from_pem, from_der):
        held = {c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities}
        assert held == expected


def test_svid_issued_event_is_audited_and_holds_no_secret(federation: Federation) -> None:
    token = federation.sa_token()
    csr_key = ec.generate_private_key(ec.SECP256R1())
    response = request_svid(federation.server, token, make_csr(csr_key))
    assert response.status_code == 200, response.text
    leaf = x509.load_pem_x509_certificate(response.json()["svid"][0].encode())
    serial = format(leaf.serial_number, "x")
    events = [
        e
        for e in audit_events(
            federation.server, type="svid.issued", subject=spiffe_id_of(federation)
        )
        if e["detail"]["serial"] == serial
    ]
    assert len(events) == 1
    event = events[0]
    assert event["cluster"] == federation.origin_name
    assert event["identity"]["workload"] == federation.workload
    assert event["detail"]["not_after"] == int(leaf.not_valid_after_utc.timestamp())
    assert event["detail"]["not_before"] == int(leaf.not_valid_before_utc.timestamp())
    assert event["request"]["surface"] == "x509-svid"
    text = json.dumps(event)
    private_pem = csr_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    assert token not in text and token.split(".")[2] not in text
    assert "PRIVATE KEY" not in text and private_pem.splitlines()[1] not in text
    assert "BEGIN CERTIFICATE" not in text


def test_workload_max_token_ttl_caps_the_certificate(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    shared_server.apply(
        workload_yaml(fed.workload, fed.origin_name, "shop", "payments", "  maxTokenTTL: 10s\n")
    )
    body = issue(fed)
    leaf = x509.load_pem_x509_certificate(body["svid"][0].encode())
    now = time.time()
    assert now < leaf.not_valid_after_utc.timestamp() <= now + 10 + 1


@pytest.mark.parametrize("kind", ["p384", "rsa2048", "ed25519"])
def test_every_accepted_key_type_is_signed(federation: Federation, kind: str) -> None:
    key: PrivateKey = {
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
    }[kind]()
    body = issue(federation, key)
    leaf = x509.load_pem_x509_certificate(body["svid"][0].encode())
    assert leaf.public_key() == key.public_key()


def test_a_csr_naming_exactly_the_spiffe_id_is_accepted(federation: Federation) -> None:
    spiffe_id = spiffe_id_of(federation)
    csr = make_csr(names=[x509.UniformResourceIdentifier(spiffe_id)])
    response = request_svid(federation.server, federation.sa_token(), csr)
    assert response.status_code == 200, response.text


def _tampered_csr() -> str:
    der = bytearray(
        x509.load_pem_x509_csr(make_csr().encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # the last byte of the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def _weak_rsa_csr() -> str:
    return make_csr(rsa.generate_private_key(65537, 1024))  # noqa: S505 (the point)


def _p521_csr() -> str:
    return make_csr(ec.generate_private_key(ec.SECP521R1()))


CSR_REFUSALS: dict[str, tuple[Any, int, str]] = {
    "not PEM": (lambda fed: "hello", 400, "not one PEM block"),
    "garbage around the PEM": (lambda fed: "junk\n" + make_csr(), 400, "not one PEM block"),
    "two CSRs": (lambda fed: make_csr() + make_csr(), 400, "not one PEM block"),
    "bad base64": (
        lambda fed: "-----BEGIN CERTIFICATE REQUEST-----\nAAA*\n-----END CERTIFICATE REQUEST-----",
        400,
        "not one PEM block",
    ),
    "not DER": (
        lambda fed: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----",
        400,
        "not a PKCS #10",
    ),
    "bad signature": (lambda fed: _tampered_csr(), 400, "signature does not verify"),
    "wrong SPIFFE ID": (
        lambda fed: make_csr(
            names=[x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/ns/other/sa/admin")]
        ),
        400,
        "requests URI",
    ),
    "extra DNS SAN": (
        lambda fed: make_csr(
            names=[
                x509.UniformResourceIdentifier(spiffe_id_of(fed)),
                x509.DNSName("payments.shop.svc"),
            ]
        ),
        400,
        "a DNS name",
    ),
    "IP SAN": (
        lambda fed: make_csr(names=[x509.IPAddress(ipaddress.ip_address("10.1.2.3"))]),
        400,
        "an IP address",
    ),
    "email SAN": (
        lambda fed: make_csr(names=[x509.RFC822Name("ops@corp.example")]),
        400,
        "an e-mail address",
    ),
    "SPIFFE ID twice": (
        lambda fed: make_csr(
            names=[
                x509.UniformResourceIdentifier(spiffe_id_of(fed)),
                x509.UniformResourceIdentifier(spiffe_id_of(fed)),
            ]
        ),
        400,
        "exactly one",
    ),
    "common name": (
        lambda fed: make_csr(
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "payments.shop.svc")])
        ),
        400,
        "commonName",
    ),
    "asks for a CA": (lambda fed: make_csr(ca=True), 400, "CA certificate"),
    "weak RSA key": (lambda fed: _weak_rsa_csr(), 400, "RSA key of 1024 bits"),
    "P-521 key": (lambda fed: _p521_csr(), 400, "secp521r1"),
    "too large": (lambda fed: make_csr() + " " * 17000, 413, "larger than 16384 bytes"),
}


@pytest.mark.parametrize("case", sorted(CSR_REFUSALS))
def test_bad_csrs_are_refused_with_a_clear_error(federation: Federation, case: str) -> None:
    build, status, phrase = CSR_REFUSALS[case]
    response = request_svid(federation.server, federation.sa_token(), build(federation))
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert phrase in body["error_description"], body
    assert "svid" not in body


BODY_REFUSALS: dict[str, tuple[Any, int, str]] = {
    "not JSON": (b"{", 400, "not valid JSON"),
    "not an object": (b"[]", 400, "must be a JSON object"),
    "no csr": (b'{"subject_token": "x"}', 400, "missing required member csr"),
    "unknown member": (b'{"subject_token": "x", "csr": "y", "dns": "z"}', 400, "unknown member"),
    "duplicate member": (b'{"subject_token": "x", "csr": "y", "csr": "z"}', 400, "appears twice"),
    "bad fingerprints": (
        b'{"subject_token": "x", "csr": "y", "bundle_sha256": ["abc"]}',
        400,
        "bundle_sha256 must be a list",
    ),
    "too large": (b'{"csr": "' + b"a" * (70 * 1024) + b'"}', 413, "larger than 65536 bytes"),
}


@pytest.mark.parametrize("case", sorted(BODY_REFUSALS))
def test_bad_request_bodies_are_refused(shared_server: Server, case: str) -> None:
    body, status, phrase = BODY_REFUSALS[case]
    response = httpx.post(
        shared_server.url + "/v1/x509-svid",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == status, response.text
    assert phrase in response.json()["error_description"]


def test_tokens_are_verified_as_the_exchange_verifies_them(federation: Federation) -> None:
    server, csr = federation.server, make_csr()
    expired = federation.sa_token(now=time.time() - 7200, ttl=600)
    answer = request_svid(server, expired, csr)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"
    assert "expired" in answer.json()["error_description"]
    wrong_audience = federation.sa_token(audience="someone-else")
    answer = request_svid(server, wrong_audience, csr)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"
    stranger = federation.origin.mint("shop", "unregistered")
    answer = request_svid(server, stranger, csr)
    assert answer.status_code == 400 and answer.json()["error"] == "unauthorized_client"
    answer = request_svid(server, "not-a-token", csr)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"
    # the exchange answers the same token the same way
    exchange = server.exchange(expired, federation.audience)
    assert exchange.json()["error"] == "invalid_grant"


def test_refusals_are_audited_as_refused_exchanges(
    tmp_path: Path, sim_cluster: SimulatedCluster
) -> None:
    # a server of its own: the shared one folds refusals beyond its quota per window
    server = start_server(tmp_path / "cp")
    try:
        federation = register_federation(server, sim_cluster)
        token = federation.sa_token()
        bad = make_csr(names=[x509.DNSName("evil.example")])
        assert request_svid(server, token, bad).status_code == 400
        digest = hashlib.sha256(token.encode()).hexdigest()

        def ours(event: dict[str, Any]) -> bool:
            return bool(event.get("identity", {}).get("token_sha256") == digest)

        events = [
            e
            for e in server.audit_events_until(
                "token.exchange_failed", lambda found: any(map(ours, found))
            )
            if ours(e)
        ]
    finally:
        assert server.stop() == 0
    assert len(events) == 1
    assert events[0]["request"]["surface"] == "x509-svid"
    assert "a DNS name" in events[0]["decision"]["reason"]
    assert token not in json.dumps(events[0])


@pytest.mark.parametrize("kind", ["workload", "cluster"])
def test_a_suspended_workload_or_cluster_gets_nothing(
    shared_server: Server, sim_cluster: SimulatedCluster, kind: str
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    issue(fed)
    target = fed.workload if kind == "workload" else fed.origin_name
    suspended = shared_server.admin.post(
        "/v1/suspensions", json={"kind": kind, "value": target, "reason": "test"}
    )
    assert suspended.status_code == 201, suspended.text
    answer = request_svid(shared_server, fed.sa_token(), make_csr())
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_grant"
    assert "is suspended" in answer.json()["error_description"]
    resumed = shared_server.admin.post(
        "/v1/suspensions/resume", json={"kind": kind, "value": target}
    )
    assert resumed.status_code == 200, resumed.text
    issue(fed)


def test_a_certificate_issued_after_a_revocation_starts_after_it(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    before = x509.load_pem_x509_certificate(issue(fed)["svid"][0].encode())
    revoked = shared_server.admin.post(
        "/v1/revocations",
        json={"kind": "workload", "value": fed.workload, "reason": "test"},
    )
    assert revoked.status_code == 201, revoked.text
    cut_off = revoked.json()["revocation"]["revoked_at"]
    # the revocation covers the earlier certificate (notBefore at or before it) ...
    assert before.not_valid_before_utc.timestamp() <= cut_off
    # ... and not the next one, whose notBefore starts after the cut-off
    after = x509.load_pem_x509_certificate(issue(fed)["svid"][0].encode())
    assert after.not_valid_before_utc.timestamp() > cut_off
