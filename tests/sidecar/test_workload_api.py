"""The SPIFFE Workload API of a real ``trustmesh sidecar`` beside a real control plane
and a simulated cluster, spoken to by py-spiffe (``WorkloadApiClient``, ``X509Source``)
unchanged, and by the raw generated stubs where py-spiffe would refuse to send what we
want to see refused. The Workload's ``maxTokenTTL`` is 20 s, so the X.509-SVID rotates
within the test."""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
from pathlib import Path

import grpc
import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sidecar_support import TTL, WORKLOAD_HEADER, Sidecar, issued_by, next_rotation, our_id
from spiffe import JwtSvid, TrustDomain
from spiffe._proto import workload_pb2, workload_pb2_grpc

from helpers import TRUST_DOMAIN, Federation


def public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_the_ready_line_names_the_spiffe_id(sidecar: Sidecar, federation: Federation) -> None:
    assert sidecar.ready_line is not None
    assert our_id(federation) in sidecar.ready_line


def test_py_spiffe_fetches_an_x509_svid_that_chains_to_the_bundle(
    sidecar: Sidecar, federation: Federation
) -> None:
    with sidecar.client() as client:
        svid = client.fetch_x509_svid()
        bundles = client.fetch_x509_bundles()
    assert str(svid.spiffe_id) == our_id(federation)
    leaf = svid.leaf
    assert public_der(leaf.public_key()) == public_der(svid.private_key.public_key())
    assert isinstance(svid.private_key, ec.EllipticCurvePrivateKey)
    assert svid.private_key.curve.name == "secp256r1"
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime.total_seconds() <= TTL + 60  # capped by the Workload, plus backdating
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
    assert bundle is not None
    roots = bundle.x509_authorities
    chain = svid.cert_chain
    for child, parent in itertools.pairwise(chain):
        child.verify_directlyissued_by(parent)
    assert any(issued_by(chain[-1], root) for root in roots)
    # the control plane's published roots are the same ones
    published = httpx.get(federation.server.url + "/v1/bundle.pem", timeout=10)
    assert published.status_code == 200, published.text
    assert set(x509.load_pem_x509_certificates(published.content)) >= set(roots)


def test_x509_source_receives_the_rotated_svid_on_its_stream(sidecar: Sidecar) -> None:
    first, second = next_rotation(sidecar)
    assert second.spiffe_id == first.spiffe_id
    assert second.leaf.serial_number != first.leaf.serial_number
    # a new key for every SVID: the old private key is not reused
    assert public_der(second.private_key.public_key()) != public_der(first.private_key.public_key())
    # renewed at about half-life: the old one was still valid when the new one came
    assert first.leaf.not_valid_after_utc > second.leaf.not_valid_before_utc
    assert "renewed X.509-SVID in service" in sidecar.log()


def test_renewals_report_the_roots_the_sidecar_holds(
    sidecar: Sidecar, federation: Federation
) -> None:
    """Each renewal sends bundle_sha256: the control plane lists the sidecar (by pod)
    among the holders a CA rotation waits for, with the roots of its bundle."""
    _, renewed = next_rotation(sidecar)
    with sidecar.client() as client:
        bundle = client.fetch_x509_bundles().get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
    assert bundle is not None
    held = {
        hashlib.sha256(r.public_bytes(serialization.Encoding.DER)).hexdigest()
        for r in bundle.x509_authorities
    }
    status = federation.server.admin.get("/v1/ca")
    assert status.status_code == 200, status.text
    ours = [
        h
        for h in status.json()["holders"]
        if h["kind"] == "sidecar" and h["subject"] == our_id(federation)
    ]
    assert ours, status.json()["holders"]
    assert any(set(h["roots"]) == held for h in ours)
    assert str(renewed.spiffe_id) == our_id(federation)


def test_py_spiffe_fetches_and_validates_a_jwt_svid(
    sidecar: Sidecar, federation: Federation
) -> None:
    audience = federation.audience
    with sidecar.client() as client:
        svid = client.fetch_jwt_svid({audience})
        validated = client.validate_jwt_svid(svid.token, audience)
        bundles = client.fetch_jwt_bundles()
    assert str(svid.spiffe_id) == our_id(federation)
    assert svid.audience == {audience}
    assert str(validated.spiffe_id) == our_id(federation)
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
    assert bundle is not None
    # the bundle alone verifies it (py-spiffe checks signature, kid, exp and aud)
    checked = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
    assert str(checked.spiffe_id) == our_id(federation)
    # and so do the control plane's published keys, with PyJWT
    jwks = httpx.get(federation.server.url + "/.well-known/jwks.json", timeout=10).json()
    kid = jwt.get_unverified_header(svid.token)["kid"]
    key = next(k for k in jwks["keys"] if k["kid"] == kid)
    claims = jwt.decode(
        svid.token,
        jwt.PyJWK(key).key,
        algorithms=[key["alg"]],
        audience=audience,
        issuer=federation.server.url,
    )
    assert claims["sub"] == our_id(federation)


def test_the_jwt_bundle_holds_only_jwt_keys_each_with_a_kid(sidecar: Sidecar) -> None:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(sidecar.channel())
    stream = stub.FetchJWTBundles(
        workload_pb2.JWTBundlesRequest(), metadata=WORKLOAD_HEADER, timeout=10
    )
    answer = next(stream)
    stream.cancel()
    assert list(answer.bundles) == [f"spiffe://{TRUST_DOMAIN}"]
    import json

    keys = json.loads(answer.bundles[f"spiffe://{TRUST_DOMAIN}"])["keys"]
    assert keys
    assert all(k.get("kid") and k.get("use") == "jwt-svid" and "x5c" not in k for k in keys)


def test_validate_refuses_another_audience_and_a_forged_token(
    sidecar: Sidecar, federation: Federation
) -> None:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(sidecar.channel())
    with sidecar.client() as client:
        token = client.fetch_jwt_svid({federation.audience}).token
    with pytest.raises(grpc.RpcError) as wrong_audience:
        stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(
                audience="spiffe://elsewhere.example/x", svid=token
            ),
            metadata=WORKLOAD_HEADER,
            timeout=10,
        )
    assert wrong_audience.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "audience" in (wrong_audience.value.details() or "")
    # the same claims signed by a key of our own making, under a kid nobody published
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode(
        claims,
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": "forged"},
    )
    with pytest.raises(grpc.RpcError) as refused:
        stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience=federation.audience, svid=forged),
            metadata=WORKLOAD_HEADER,
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a known signing key" in (refused.value.details() or "")


def test_jwt_svid_requests_are_checked(sidecar: Sidecar, federation: Federation) -> None:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(sidecar.channel())

    def fetch(audience: list[str], spiffe_id: str = "") -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(audience=audience, spiffe_id=spiffe_id),
                metadata=WORKLOAD_HEADER,
                timeout=10,
            )
        return caught.value

    assert fetch([]).code() == grpc.StatusCode.INVALID_ARGUMENT
    other = fetch([federation.audience], f"spiffe://{TRUST_DOMAIN}/someone/else")
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (
        fetch([federation.audience], "not-a-spiffe-id").code() == grpc.StatusCode.INVALID_ARGUMENT
    )
    # an audience the control plane cannot issue for: its reason comes back
    unknown = fetch([f"spiffe://{TRUST_DOMAIN}/cluster/nowhere"])
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid_target" in (unknown.details() or "")
    # naming our own ID is fine
    ours = stub.FetchJWTSVID(
        workload_pb2.JWTSVIDRequest(audience=[federation.audience], spiffe_id=our_id(federation)),
        metadata=WORKLOAD_HEADER,
        timeout=10,
    )
    assert ours.svids[0].spiffe_id == our_id(federation)


@pytest.mark.parametrize(
    ("method", "request_message", "streaming"),
    [
        ("FetchX509SVID", workload_pb2.X509SVIDRequest(), True),
        ("FetchX509Bundles", workload_pb2.X509BundlesRequest(), True),
        ("FetchJWTBundles", workload_pb2.JWTBundlesRequest(), True),
        ("FetchJWTSVID", workload_pb2.JWTSVIDRequest(audience=["x"]), False),
        ("ValidateJWTSVID", workload_pb2.ValidateJWTSVIDRequest(audience="x", svid="y"), False),
    ],
)
@pytest.mark.parametrize("metadata", [(), (("workload.spiffe.io", "false"),)])
def test_a_call_without_the_security_header_is_invalid_argument(
    sidecar: Sidecar,
    method: str,
    request_message: object,
    streaming: bool,
    metadata: tuple[tuple[str, str], ...],
) -> None:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(sidecar.channel())
    call = getattr(stub, method)
    with pytest.raises(grpc.RpcError) as caught:
        answer = call(request_message, metadata=metadata, timeout=10)
        if streaming:
            next(answer)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "workload.spiffe.io" in (caught.value.details() or "")


def test_the_credential_folder_holds_the_served_svid(sidecar: Sidecar) -> None:
    folder = sidecar.credential_dir
    assert folder is not None
    with sidecar.client() as client:
        served = client.fetch_x509_svid()
    # the folder is written before an SVID is served, so it holds this one or a newer one
    certs = x509.load_pem_x509_certificates((folder / "svid.pem").read_bytes())
    key = serialization.load_pem_private_key((folder / "svid_key.pem").read_bytes(), None)
    roots = x509.load_pem_x509_certificates((folder / "svid_bundle.pem").read_bytes())
    assert public_der(certs[0].public_key()) == public_der(key.public_key())
    assert certs[0].not_valid_after_utc >= served.leaf.not_valid_after_utc
    assert any(issued_by(certs[-1], root) for root in roots)
    assert _mode(folder / "svid_key.pem") == 0o600
    assert _mode(folder / "svid.pem") == 0o644
    assert _mode(folder / "svid_bundle.pem") == 0o644
    assert sorted(p.name for p in folder.iterdir()) == [
        "svid.pem",
        "svid_bundle.pem",
        "svid_key.pem",
    ]


def test_the_socket_is_private_to_the_sidecar_user(sidecar: Sidecar) -> None:
    assert stat.S_ISSOCK(os.stat(sidecar.socket).st_mode)
    assert _mode(sidecar.socket) == 0o600


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)
