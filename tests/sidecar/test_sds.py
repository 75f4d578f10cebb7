"""Envoy SDS v3 from a real ``trustmesh sidecar``, spoken to with grpcio and the
generated stubs of ``xds-protos`` as Envoy speaks it: a state-of-the-world stream
subscribing to ``default`` and ``ROOTCA``, ACKs and NACKs by version and nonce, pushes
on rotation (the Workload's SVIDs live 20 s), and ``FetchSecrets``."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2
from sidecar_support import TTL, Sidecar, issued_by, our_id

from helpers import Federation

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
NODE = base_pb2.Node(
    id="sidecar~10.0.0.1~payments-abcde.shop~shop.svc.cluster.local", cluster="payments"
)
WAIT = TTL + 30  # a rotation comes within about half of TTL


class SdsStream:
    """One StreamSecrets stream, driven as Envoy drives it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        self._responses: queue.Queue[discovery_pb2.DiscoveryResponse | Exception] = queue.Queue()
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        self._call = stub.StreamSecrets(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
        except grpc.RpcError as exc:
            self._responses.put(exc)

    def send(self, names: list[str], version: str = "", nonce: str = "", error: str = "") -> None:
        request = discovery_pb2.DiscoveryRequest(
            node=NODE,
            type_url=SECRET_TYPE,
            resource_names=names,
            version_info=version,
            response_nonce=nonce,
        )
        if error:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._requests.put(request)

    def receive(self, timeout: float = WAIT) -> discovery_pb2.DiscoveryResponse:
        item = self._responses.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


@pytest.fixture
def stream(sidecar: Sidecar) -> Iterator[SdsStream]:
    channel = sidecar.channel(sds=True)
    stream = SdsStream(channel)
    yield stream
    stream.close()
    channel.close()


def secrets_of(response: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    assert response.type_url == SECRET_TYPE
    found = {}
    for resource in response.resources:
        secret = secret_pb2.Secret()
        assert resource.Unpack(secret)
        found[secret.name] = secret
    return found


def leaf_of(secret: secret_pb2.Secret) -> x509.Certificate:
    return x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)[0]


@pytest.mark.slow
def test_default_and_rootca_are_served_then_pushed_on_rotation_with_ack_and_nack(
    stream: SdsStream, sidecar: Sidecar, federation: Federation
) -> None:
    stream.send(["default", "ROOTCA"])
    first = stream.receive()
    secrets = secrets_of(first)
    assert sorted(secrets) == ["ROOTCA", "default"]
    assert first.version_info and first.nonce
    chain = x509.load_pem_x509_certificates(
        secrets["default"].tls_certificate.certificate_chain.inline_bytes
    )
    key = serialization.load_pem_private_key(
        secrets["default"].tls_certificate.private_key.inline_bytes, None
    )
    roots = x509.load_pem_x509_certificates(
        secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes
    )
    leaf = chain[0]
    assert leaf.public_key() == key.public_key()
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [our_id(federation)]
    assert any(issued_by(chain[-1], root) for root in roots)

    # ACK, then a stale request (a nonce we never sent, asking for ROOTCA alone): ignored,
    # so the next message is the rotation, still with both resources
    stream.send(["default", "ROOTCA"], first.version_info, first.nonce)
    stream.send(["ROOTCA"], first.version_info, "stale-nonce")
    second = stream.receive()
    assert second.version_info != first.version_info
    assert second.nonce != first.nonce
    rotated = secrets_of(second)
    assert sorted(rotated) == ["ROOTCA", "default"]
    assert leaf_of(rotated["default"]).serial_number != leaf.serial_number

    # NACK of the second version: it is not sent again; the next push is a new version
    stream.send(["default", "ROOTCA"], first.version_info, second.nonce, error="bad certificate")
    third = stream.receive()
    assert third.version_info not in (first.version_info, second.version_info)
    assert "refused SDS version " + second.version_info in sidecar.log()

    # ACK it while subscribing to ROOTCA alone: answered at once, same version
    stream.send(["ROOTCA"], third.version_info, third.nonce)
    fourth = stream.receive()
    assert sorted(secrets_of(fourth)) == ["ROOTCA"]
    assert fourth.version_info == third.version_info
    assert fourth.nonce != third.nonce


def test_names_it_does_not_serve_are_left_out(stream: SdsStream) -> None:
    stream.send(["default", "file-cert:/etc/certs/cert.pem"])
    assert sorted(secrets_of(stream.receive())) == ["default"]


def test_another_resource_type_ends_the_stream_with_invalid_argument(stream: SdsStream) -> None:
    request_type = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    stream._requests.put(discovery_pb2.DiscoveryRequest(node=NODE, type_url=request_type))
    with pytest.raises(grpc.RpcError) as caught:
        stream.receive()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_fetch_secrets_answers_the_current_version_once(sidecar: Sidecar) -> None:
    channel = sidecar.channel(sds=True)
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    answer = stub.FetchSecrets(
        discovery_pb2.DiscoveryRequest(node=NODE, type_url=SECRET_TYPE, resource_names=["ROOTCA"]),
        timeout=10,
    )
    channel.close()
    assert sorted(secrets_of(answer)) == ["ROOTCA"]
    assert answer.version_info


def test_the_workload_api_is_not_served_on_the_sds_socket(sidecar: Sidecar) -> None:
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    channel = sidecar.channel(sds=True)
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["x"]),
            metadata=(("workload.spiffe.io", "true"),),
            timeout=10,
        )
    channel.close()
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
