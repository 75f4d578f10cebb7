"""The SPIFFE Workload API (the SPIFFE Workload Endpoint and Workload API
specifications; service ``SpiffeWorkloadAPI`` of ``workload.proto``) over the sidecar's
Unix socket, with the generated stubs py-spiffe ships (``spiffe._proto``), so that any
go-spiffe, py-spiffe or java-spiffe client works unchanged.

* Every call must carry the metadata ``workload.spiffe.io: true`` (Workload Endpoint
  §5.1), else ``INVALID_ARGUMENT`` — checked by an interceptor, so no method can forget.
* ``FetchX509SVID`` and ``FetchX509Bundles`` stream: the current SVID (chain and PKCS#8
  key as DER, the bundle as concatenated DER; Workload API §5) at once, then again on
  every rotation; bundles only when they changed. ``FetchJWTBundles`` streams the
  trust domain's JWT keys (a JWKS per trust domain, every key with a ``kid``), and each
  federated trust domain's (DESIGN §9), as do the X.509 bundle maps.
* ``FetchJWTSVID`` exchanges the service-account token for a JWT-SVID for the requested
  audiences (``sidecar/jwt.py``); a ``spiffe_id`` in the request must be ours or empty.
* ``ValidateJWTSVID`` verifies against the JWT bundle of the token's trust domain (ours
  or a federated one) and the audience.
* Without an identity the answer says why: ``PERMISSION_DENIED`` when the control plane
  refused it (a revoked or expired service-account token, no Workload, a suspension),
  ``UNAVAILABLE`` otherwise (unreachable, expired); a stream that is waiting for a first
  SVID waits.

Trust domains are named ``spiffe://TD`` in the bundle maps, as SPIRE names them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import orjson
from google.protobuf import struct_pb2
from spiffe._proto import workload_pb2, workload_pb2_grpc

from trustmesh.client import ExchangeRejected, TokenUnavailable
from trustmesh.common.errors import InvalidToken, SpiffeIdError
from trustmesh.identity.svid import MAX_TOKEN_BYTES
from trustmesh.sidecar.jwt import JwtBundleKeeper, JwtSvids, token_subject
from trustmesh.sidecar.keeper import SvidKeeper
from trustmesh.sidecar.x509 import X509Svid, der_certificates
from trustmesh.spiffeid import parse_spiffe_id

HEADER = "workload.spiffe.io"
MAX_AUDIENCES = 16
MAX_AUDIENCE_LENGTH = 512
MAX_MESSAGE_BYTES = 64 * 1024


def domain_id(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}"


class RequireWorkloadHeader(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses (``INVALID_ARGUMENT``) every call without ``workload.spiffe.io: true``."""

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        details: Any,
    ) -> Any:
        handler = await continuation(details)
        metadata = details.invocation_metadata or ()
        if handler is None or any(k == HEADER and v == "true" for k, v in metadata):
            return handler

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"security header missing from request: {HEADER}: true",
            )

        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return make(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _no_identity(keeper: SvidKeeper, context: grpc.aio.ServicerContext) -> None:
    problem = keeper.problem or "no X.509-SVID has been issued yet"
    code = grpc.StatusCode.PERMISSION_DENIED if keeper.refused else grpc.StatusCode.UNAVAILABLE
    await context.abort(code, f"no identity issued: {problem}")


async def current_svid(
    keeper: SvidKeeper, context: grpc.aio.ServicerContext
) -> tuple[X509Svid, int]:
    """The SVID in service and its generation; waits for a first one while no attempt
    has failed yet; aborts the call when there is none, saying why."""
    while True:
        svid, generation = keeper.current, keeper.generation
        if svid is not None:
            return svid, generation
        if keeper.problem is not None:
            await _no_identity(keeper, context)
        await keeper.wait_change(generation)


def x509_bundle_map(keeper: SvidKeeper) -> dict[str, bytes]:
    return {
        domain_id(domain): der_certificates(roots)
        for domain, roots in keeper.x509_bundles().items()
    }


def _jwks_bytes(jwks: dict[str, Any]) -> bytes:
    return orjson.dumps({"keys": jwks.get("keys", [])})


class WorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def __init__(self, keeper: SvidKeeper, jwt_bundles: JwtBundleKeeper, jwt_svids: JwtSvids):
        self.keeper = keeper
        self.jwt_bundles = jwt_bundles
        self.jwt_svids = jwt_svids

    # -- X.509 -----------------------------------------------------------------------------
    async def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        while True:
            svid, generation = await current_svid(self.keeper, context)
            bundles = x509_bundle_map(self.keeper)
            ours = bundles.pop(domain_id(svid.trust_domain))
            yield workload_pb2.X509SVIDResponse(
                svids=[
                    workload_pb2.X509SVID(
                        spiffe_id=svid.spiffe_id,
                        x509_svid=svid.chain_der(),
                        x509_svid_key=svid.key_der(),
                        bundle=ours,
                    )
                ],
                federated_bundles=bundles,
            )
            await self.keeper.wait_change(generation)

    async def FetchX509Bundles(
        self, request: workload_pb2.X509BundlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        sent: dict[str, bytes] | None = None
        while True:
            _, generation = await current_svid(self.keeper, context)
            bundles = x509_bundle_map(self.keeper)
            if bundles != sent:
                yield workload_pb2.X509BundlesResponse(bundles=bundles)
                sent = bundles
            await self.keeper.wait_change(generation)

    # -- JWT -------------------------------------------------------------------------------
    async def FetchJWTSVID(
        self, request: workload_pb2.JWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> workload_pb2.JWTSVIDResponse:
        audiences = list(request.audience)
        if not audiences or not all(audiences):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if len(audiences) > MAX_AUDIENCES or any(len(a) > MAX_AUDIENCE_LENGTH for a in audiences):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_AUDIENCES} audiences of at most {MAX_AUDIENCE_LENGTH} characters",
            )
        wanted = request.spiffe_id
        if wanted:
            try:
                parse_spiffe_id(wanted)
            except SpiffeIdError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.description)
            svid = self.keeper.current
            if svid is not None and wanted != svid.spiffe_id:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"no identity issued for {wanted}"
                )
        try:
            token = await self.jwt_svids.fetch(audiences)
        except ExchangeRejected as exc:
            code = (
                grpc.StatusCode.INVALID_ARGUMENT
                if exc.error in ("invalid_target", "invalid_request")
                else grpc.StatusCode.PERMISSION_DENIED
            )
            await context.abort(code, f"no JWT-SVID issued: {exc}")
        except TokenUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no JWT-SVID issued: {exc}")
        subject = token_subject(token) or ""
        if wanted and subject != wanted:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"no identity issued for {wanted}"
            )
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id=subject, svid=token)]
        )

    async def FetchJWTBundles(
        self, request: workload_pb2.JWTBundlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        keeper = self.jwt_bundles
        while True:
            state, generation = keeper.state, keeper.generation
            if state is None:
                if keeper.problem is not None:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"no JWT bundle: {keeper.problem}"
                    )
            else:
                bundles = {
                    domain_id(domain): _jwks_bytes(found.bundle.jwks())
                    for domain, found in keeper.federated.items()
                }
                bundles[domain_id(state.trust_domain)] = _jwks_bytes(state.jwks)
                yield workload_pb2.JWTBundlesResponse(bundles=bundles)
            await keeper.wait_change(generation)

    async def ValidateJWTSVID(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        if not request.audience:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        if len(request.svid) > MAX_TOKEN_BYTES or len(request.audience) > MAX_AUDIENCE_LENGTH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "svid or audience too long")
        try:
            identity = await self.jwt_bundles.verify(request.svid, request.audience)
        except InvalidToken as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the JWT-SVID does not validate: {exc}"
            )
        claims = struct_pb2.Struct()
        claims.update(identity.claims)
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=identity.spiffe_id, claims=claims)


def add_workload_api(server: grpc.aio.Server, api: WorkloadApi) -> None:
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(api, server)  # type: ignore[no-untyped-call]
