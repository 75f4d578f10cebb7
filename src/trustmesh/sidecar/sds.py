"""Envoy's Secret Discovery Service, v3 (``envoy.service.secret.v3.SecretDiscoveryService``,
the xDS REST and gRPC protocol's state-of-the-world variant), over the sidecar's SDS
Unix socket, with the generated protos of the ``xds-protos`` package.

Resources, named as Istio's proxies ask for them (DESIGN §9):

* ``default`` — ``tls_certificate``: the SVID chain (PEM, leaf first) and its key;
* ``ROOTCA`` — ``validation_context.trusted_ca``: our trust domain's roots (PEM).
  Never a federated trust domain's: one flat list of roots would let a partner's CA
  vouch for IDs of our trust domain (SPIFFE Federation §4.2 forbids merging bundles);
  federated bundles reach workloads per trust domain, through the Workload API.

The protocol, per stream (xDS protocol, "ACK/NACK and resource type instance version"):

* A request whose ``response_nonce`` is not the nonce of our last response is stale and
  ignored.
* A request answering our last response is an ACK (``version_info`` = that version) or,
  with ``error_detail``, a NACK: logged, and the refused version is not sent
  again; the next rotation sends the next.
* A first request, or one naming other resources, is answered at once with the current
  version of the named resources (names we do not serve are left out and logged).
* Every rotation sends the new version to every stream that has subscribed.

``version_info`` is a hash of the public parts (chain and bundles), so it changes
exactly when Envoy must reload. ``FetchSecrets`` answers the current version once;
``DeltaSecrets`` is not served (``UNIMPLEMENTED``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator

import grpc
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from trustmesh.sidecar.keeper import SvidKeeper
from trustmesh.sidecar.x509 import X509Svid, der_certificates, pem_certificates

log = logging.getLogger("trustmesh.sidecar")

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105 (a type URL)
DEFAULT = "default"
ROOTCA = "ROOTCA"
SERVED = (DEFAULT, ROOTCA)
MAX_MESSAGE_BYTES = 1024 * 1024  # Envoy's Node (its extension list) is tens of KiB
QUEUED_EVENTS = 16
_ROTATED = object()


class SdsContent:
    """What SDS serves from one keeper state: the secrets by name and their version."""

    def __init__(self, svid: X509Svid, bundles: dict[str, tuple[x509.Certificate, ...]]) -> None:
        roots = [cert for domain in sorted(bundles) for cert in bundles[domain]]
        digest = hashlib.sha256(svid.chain_der())
        digest.update(der_certificates(roots))
        self.version = digest.hexdigest()[:16]
        self.secrets = {
            DEFAULT: secret_pb2.Secret(
                name=DEFAULT,
                tls_certificate=common_pb2.TlsCertificate(
                    certificate_chain=base_pb2.DataSource(inline_bytes=svid.chain_pem()),
                    private_key=base_pb2.DataSource(inline_bytes=svid.key_pem()),
                ),
            ),
            ROOTCA: secret_pb2.Secret(
                name=ROOTCA,
                validation_context=common_pb2.CertificateValidationContext(
                    trusted_ca=base_pb2.DataSource(inline_bytes=pem_certificates(roots))
                ),
            ),
        }

    def response(self, names: tuple[str, ...], nonce: str) -> discovery_pb2.DiscoveryResponse:
        resources = []
        for name in names:
            secret = self.secrets.get(name)
            if secret is not None:
                packed = any_pb2.Any()
                packed.Pack(secret)
                resources.append(packed)
        return discovery_pb2.DiscoveryResponse(
            version_info=self.version, resources=resources, type_url=SECRET_TYPE, nonce=nonce
        )


def current_content(keeper: SvidKeeper) -> SdsContent | None:
    svid = keeper.current
    return SdsContent(svid, {svid.trust_domain: svid.bundle}) if svid is not None else None


class SdsStream:
    """One ``StreamSecrets`` stream's state: what it subscribed to, what we sent."""

    def __init__(self, keeper: SvidKeeper, peer: str) -> None:
        self.keeper = keeper
        self.peer = peer
        self.names: tuple[str, ...] | None = None
        self.nonce = ""
        self.sent_version: str | None = None
        self.acked_version: str | None = None
        self._sequence = 0

    def _respond(self) -> discovery_pb2.DiscoveryResponse | None:
        content = current_content(self.keeper)
        if content is None or self.names is None:
            return None  # nothing valid to serve: Envoy keeps what it has
        self._sequence += 1
        self.nonce = str(self._sequence)
        self.sent_version = content.version
        return content.response(self.names, self.nonce)

    def on_request(
        self, request: discovery_pb2.DiscoveryRequest
    ) -> discovery_pb2.DiscoveryResponse | None:
        if request.type_url and request.type_url != SECRET_TYPE:
            raise ValueError(f"this stream serves {SECRET_TYPE} only")
        if request.response_nonce and request.response_nonce != self.nonce:
            return None  # stale: it answers a response that has been superseded
        if request.response_nonce:
            if request.HasField("error_detail"):
                log.warning(
                    "Envoy (%s) refused SDS version %s of %s: %s",
                    self.peer,
                    self.sent_version,
                    ", ".join(self.names or ()),
                    request.error_detail.message[:300],
                )
            else:
                self.acked_version = request.version_info
        names = tuple(sorted(set(request.resource_names)))
        if names == self.names:
            return None
        unknown = sorted(set(names) - set(SERVED))
        if unknown:
            log.warning(
                "Envoy (%s) asked SDS for %s; served are %s",
                self.peer,
                ", ".join(name[:100] for name in unknown[:5]),
                " and ".join(SERVED),
            )
        self.names = names
        return self._respond()

    def on_rotation(self) -> discovery_pb2.DiscoveryResponse | None:
        content = current_content(self.keeper)
        if content is None or content.version == self.sent_version:
            return None
        return self._respond()


class SecretDiscovery(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, keeper: SvidKeeper) -> None:
        self.keeper = keeper

    async def StreamSecrets(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        events: asyncio.Queue[object] = asyncio.Queue(QUEUED_EVENTS)
        stream = SdsStream(self.keeper, context.peer() or "unknown peer")

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await events.put(request)
            finally:
                await events.put(None)

        async def watch() -> None:
            seen = self.keeper.generation
            while True:
                await self.keeper.wait_change(seen)
                seen = self.keeper.generation
                await events.put(_ROTATED)

        tasks = [asyncio.create_task(read()), asyncio.create_task(watch())]
        try:
            while True:
                event = await events.get()
                if event is None:
                    return
                try:
                    if event is _ROTATED:
                        response = stream.on_rotation()
                    else:
                        assert isinstance(event, discovery_pb2.DiscoveryRequest)
                        response = stream.on_request(event)
                except ValueError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                if response is not None:
                    yield response
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def FetchSecrets(
        self, request: discovery_pb2.DiscoveryRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.DiscoveryResponse:
        content = current_content(self.keeper)
        if content is None:
            problem = self.keeper.problem or "no X.509-SVID has been issued yet"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no secret to serve: {problem}")
        assert content is not None
        names = tuple(sorted(set(request.resource_names))) or SERVED
        return content.response(names, nonce="")


def add_sds(server: grpc.aio.Server, sds: SecretDiscovery) -> None:
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(sds, server)
