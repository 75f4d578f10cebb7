"""A federated trust domain's bundle at the sidecar (DESIGN §9): our control plane polls
a partner's bundle endpoint (a small real server on loopback holding the partner's own
CA root and JWT key), and a sidecar started beside it serves that bundle through the
SPIFFE Workload API to py-spiffe — per trust domain, apart from ours — validates the
partner's JWT-SVIDs with the partner's keys only, and keeps it out of the flat ROOTCA
and ``svid_bundle.pem``, which would merge it with ours."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from sidecar_support import Sidecar, short_dir, start_sidecar, write_token
from spiffe import TrustDomain
from spiffe._proto import workload_pb2, workload_pb2_grpc

from helpers import (
    TRUST_DOMAIN,
    BundleHost,
    Server,
    cluster_yaml,
    self_signed_ca,
    serve_cluster,
    start_server,
    workload_yaml,
)

PARTNER = "partner.example"
AUDIENCE = "spiffe://corp.example/reports"
HEADER = (("workload.spiffe.io", "true"),)
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass
class Partner:
    """A foreign trust domain's keys: a CA root and a JWT signing key."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    jwt_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls) -> Partner:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(key, self_signed_ca(key, PARTNER), ec.generate_private_key(ec.SECP256R1()))

    def bundle(self) -> bytes:
        """The partner's SPIFFE bundle, shaped as SPIRE serves it (no ``alg``)."""
        to_jwk = jwt.algorithms.ECAlgorithm.to_jwk
        root = to_jwk(self.root_key.public_key(), as_dict=True)
        root.update(
            use="x509-svid",
            x5c=[base64.b64encode(self.root.public_bytes(serialization.Encoding.DER)).decode()],
        )
        signing = to_jwk(self.jwt_key.public_key(), as_dict=True)
        signing.update(use="jwt-svid", kid="partner-1")
        return json.dumps(
            {"keys": [root, signing], "spiffe_sequence": 4, "spiffe_refresh_hint": 300}
        ).encode()

    def svid(self, subject: str) -> str:
        now = int(time.time())
        claims = {"sub": subject, "aud": [AUDIENCE], "iat": now, "exp": now + 300}
        return jwt.encode(claims, self.jwt_key, algorithm="ES256", headers={"kid": "partner-1"})


@dataclass
class Setup:
    server: Server
    partner: Partner
    sidecar: Sidecar


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    # a control plane of our own: a federated domain must not leak into other modules
    server = start_server(tmp_path_factory.mktemp("sc-federation") / "data")
    partner = Partner.create()
    host = BundleHost()
    host.body = partner.bundle()
    with serve_cluster("sc-fed") as origin, short_dir() as directory:
        server.apply(
            cluster_yaml("east", origin.issuer)
            + "---\n"
            + workload_yaml("payments", "east", "shop", "payments")
            + f"""---
apiVersion: trustmesh.io/v1alpha1
kind: FederatedTrustDomain
metadata: {{name: partner}}
spec:
  trustDomain: {PARTNER}
  bundleEndpointURL: "{host.url}"
"""
        )
        deadline = time.monotonic() + 30
        while (
            PARTNER not in httpx.get(server.url + "/v1/federation/bundles").json()["trust_domains"]
        ):
            assert time.monotonic() < deadline, "the control plane did not fetch the bundle"
            time.sleep(0.2)
        token = write_token(directory / "sa.token", origin, "shop", "payments")
        sidecar = start_sidecar([server.url], token, directory, sds=True, credential_dir=True)
        yield Setup(server, partner, sidecar)
        assert sidecar.stop() == 0, sidecar.log()
    host.close()
    server.stop()


def fingerprint(certificate: x509.Certificate) -> bytes:
    return certificate.fingerprint(hashes.SHA256())


def test_py_spiffe_receives_the_partner_bundle_apart_from_ours(setup: Setup) -> None:
    with setup.sidecar.client() as client:
        x509_bundles = client.fetch_x509_bundles()
        jwt_bundles = client.fetch_jwt_bundles()
        context = client.fetch_x509_context()
    partner = x509_bundles.get_bundle_for_trust_domain(TrustDomain(PARTNER))
    ours = x509_bundles.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
    assert partner is not None and ours is not None
    assert [fingerprint(c) for c in partner.x509_authorities] == [fingerprint(setup.partner.root)]
    assert fingerprint(setup.partner.root) not in {fingerprint(c) for c in ours.x509_authorities}
    jwt_partner = jwt_bundles.get_bundle_for_trust_domain(TrustDomain(PARTNER))
    assert jwt_partner is not None and jwt_partner.get_jwt_authority("partner-1") is not None
    federated = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(PARTNER))
    assert federated is not None  # FetchX509SVID's federated_bundles


def test_the_flat_trust_bundles_hold_only_our_roots(setup: Setup) -> None:
    folder = setup.sidecar.credential_dir
    assert folder is not None
    written = x509.load_pem_x509_certificates((folder / "svid_bundle.pem").read_bytes())
    channel = setup.sidecar.channel(sds=True)
    answer = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).FetchSecrets(
        discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=["ROOTCA"]),
        timeout=10,
    )
    channel.close()
    secret = secret_pb2.Secret()
    assert answer.resources[0].Unpack(secret)
    served = x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)
    for roots in (written, served):
        assert roots and fingerprint(setup.partner.root) not in {fingerprint(c) for c in roots}


def validate(setup: Setup, token: str) -> Any:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(setup.sidecar.channel())
    return stub.ValidateJWTSVID(
        workload_pb2.ValidateJWTSVIDRequest(audience=AUDIENCE, svid=token),
        metadata=HEADER,
        timeout=10,
    )


def test_validate_takes_the_partners_tokens_for_its_own_ids_only(setup: Setup) -> None:
    subject = f"spiffe://{PARTNER}/ns/web/sa/frontend"
    validated = validate(setup, setup.partner.svid(subject))
    assert validated.spiffe_id == subject
    for stolen in (
        f"spiffe://{TRUST_DOMAIN}/cluster/east/ns/shop/sa/payments",
        "spiffe://third.example/x",
    ):
        with pytest.raises(grpc.RpcError) as refused:
            validate(setup, setup.partner.svid(stolen))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
