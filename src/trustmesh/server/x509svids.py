"""Issuance of X.509-SVIDs at ``POST /v1/x509-svid`` (DESIGN §9): a workload's CSR and
its pod's projected SA token in, a leaf certificate signed by the active CA root out.

Request (JSON, at most 64 KiB; duplicate or unknown members refused)::

    {"subject_token": SA_TOKEN, "csr": PEM, "bundle_sha256": [HEX, …]}

``bundle_sha256`` is optional, a trustmesh extension: the SHA-256 (hex, of the DER) of
each root the caller holds, at most 16; a sidecar sends it so
that a prepared root becomes active only once it holds it (``server/roots.py``).

Steps, each refusal a 4xx JSON in the RFC 6749 §5.2 shape the token endpoint uses:

1. the SA token is verified exactly as the exchange verifies it
   (:meth:`~trustmesh.oauth.rfc8693.TokenExchange.verify_subject`: ``invalid_request``
   for a malformed token, ``invalid_grant`` for one that fails, ``unauthorized_client``
   when no Workload selects its service account, 503 when the cluster's keys cannot be
   fetched);
2. a suspended workload, SPIFFE ID or origin cluster gets nothing (DESIGN §5,
   ``invalid_grant``);
3. the CSR is checked (``identity/x509svid.py``: ``invalid_request`` naming the
   problem, 413 for a CSR over 16 KiB);
4. the leaf is signed: notBefore 30 s in the past (clock skew), but after the latest
   subject or cluster revocation that covers this SPIFFE ID — a revocation covers the
   certificates whose notBefore is at or before its cut-off, whole seconds, as it
   covers the JWT-SVIDs whose ``iat`` is — and notAfter after the workload's
   ``maxTokenTTL`` (default and maximum 1 h), never after the root's;
5. ``svid.issued`` is committed to the audit log (the exchange's group commit) before
   the certificate leaves; if it cannot be, 503 and nothing is issued.

A refusal is recorded as a refused exchange (``token.exchange_failed`` with
``request.surface: x509-svid``) and folded with them (``audit/folding.py``).

Response: ``{"spiffe_id", "svid": [leaf PEM], "bundle": PEM of every published root,
"expires_at": notAfter in seconds since the epoch}`` (no intermediates: roots sign
leaves)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from trustmesh.audit import events as ev
from trustmesh.common.clock import Clock
from trustmesh.common.errors import InvalidRequest, NoWorkload, TrustmeshError, Unavailable
from trustmesh.common.strictjson import loads_strict
from trustmesh.common.tracing import Tracing
from trustmesh.identity.x509ca import MAX_SVID_TTL, CaSet, parse_fingerprints
from trustmesh.identity.x509svid import check_csr, pem_of, sign_svid
from trustmesh.oauth.rfc8693 import TokenExchange, VerifiedSubject
from trustmesh.registry import Registry
from trustmesh.registry.observed import TemplateObservations
from trustmesh.revocation.suspension import SuspensionSet
from trustmesh.server.issuance import observe
from trustmesh.server.metrics import ServerMetrics
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.roots import SIDECAR, RootHolders
from trustmesh.server.usage import X509_SVID, UsageTracker

log = logging.getLogger("trustmesh.server")

SPAN_NAME = "svid.x509"
SURFACE = "x509-svid"
MAX_BODY = 64 * 1024
DEFAULT_SVID_TTL = MAX_SVID_TTL  # DESIGN §9: 1 h
NOT_BEFORE_SKEW = 30  # seconds a leaf's notBefore lies in the past
MAX_POD_UID = 128
_MEMBERS = frozenset({"subject_token", "csr", "bundle_sha256"})


@dataclass(frozen=True)
class SvidRequest:
    subject_token: str
    csr: str
    bundle_sha256: tuple[str, ...] | None  # None: the caller does not report


@dataclass(frozen=True)
class SignedSvid:
    """A signed leaf and what audit and the holder reports need (never a key)."""

    response: dict[str, Any]
    certificate: x509.Certificate
    subject: VerifiedSubject
    spiffe_id: str
    root_id: str
    not_before: int
    not_after: int


def parse_request(body: bytes) -> SvidRequest:
    """The JSON body, strictly: an object with the string members ``subject_token`` and
    ``csr``, optionally ``bundle_sha256``, nothing else and nothing twice."""
    document = loads_strict(body)
    if not isinstance(document, dict):
        raise InvalidRequest("request body must be a JSON object")
    unknown = sorted(set(document) - _MEMBERS)
    if unknown:
        raise InvalidRequest(f"unknown member {unknown[0][:64]!r}")
    values = []
    for name in ("subject_token", "csr"):
        value = document.get(name)
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f"missing required member {name} (a non-empty string)")
        values.append(value)
    reported = document.get("bundle_sha256")
    roots = None if reported is None else parse_fingerprints(reported, "bundle_sha256")
    return SvidRequest(values[0], values[1], roots)


class X509Signer:
    """Steps 1-4: verify, check, sign. No I/O but the cluster key fetch the exchange
    may make; ``trustmesh bench svid`` measures its crypto part alone."""

    def __init__(
        self,
        *,
        exchange: TokenExchange,
        registry: Callable[[], Registry],
        ca: Callable[[], CaSet],
        revoked_until: Callable[[str, str], float | None],
        suspensions: Callable[[], SuspensionSet],
        clock: Clock,
        default_ttl: int = DEFAULT_SVID_TTL,
    ) -> None:
        self.exchange = exchange
        self.registry = registry
        self.ca = ca
        self.revoked_until = revoked_until
        self.suspensions = suspensions
        self.clock = clock
        self.default_ttl = min(default_ttl, MAX_SVID_TTL)

    async def sign(self, request: SvidRequest) -> SignedSvid:
        now = self.clock()
        registry = self.registry()
        subject = await self.exchange.verify_subject(request.subject_token, registry, now)
        spiffe_id = subject.identity.spiffe_id
        self.suspensions().check(
            workload=subject.identity.workload, spiffe_id=spiffe_id, cluster=subject.cluster
        )
        public_key = check_csr(request.csr, spiffe_id)
        max_ttl = min(subject.identity.max_token_ttl or MAX_SVID_TTL, MAX_SVID_TTL)
        ttl = min(self.default_ttl, max_ttl)
        not_before = int(now) - NOT_BEFORE_SKEW
        revoked_until = self.revoked_until(spiffe_id, subject.cluster)
        if revoked_until is not None and not_before <= revoked_until:
            # A revocation covers certificates whose notBefore is at or before it
            # (DESIGN §9); one issued after it must not fall under it.
            not_before = int(revoked_until) + 1
        ca = self.ca()
        not_after = min(int(now) + ttl, int(ca.active.not_after))  # never after the root's
        certificate = sign_svid(ca.active, public_key, spiffe_id, not_before, not_after)
        return SignedSvid(
            response={
                "spiffe_id": spiffe_id,
                "svid": [pem_of(certificate)],
                "bundle": ca.bundle_pem,
                "expires_at": not_after,
            },
            certificate=certificate,
            subject=subject,
            spiffe_id=spiffe_id,
            root_id=ca.active.id,
            not_before=not_before,
            not_after=not_after,
        )


class X509Issuance:
    """``POST /v1/x509-svid``: parse, sign, audit; every refusal recorded."""

    def __init__(
        self,
        signer: X509Signer,
        recorder: AuditRecorder,
        tracing: Tracing,
        metrics: ServerMetrics,
        holders: RootHolders,
        usage: UsageTracker,
        observations: TemplateObservations | None = None,
    ) -> None:
        self.observations = observations
        self.signer = signer
        self.usage = usage
        self.recorder = recorder
        self.tracing = tracing
        self.metrics = metrics
        self.holders = holders

    async def issue(
        self, body: Awaitable[bytes], traceparent: str | None, peer: str | None = None
    ) -> tuple[dict[str, Any], str]:
        """The response body and the span's traceparent; raises the TrustmeshError the
        caller is answered with once the refusal is recorded."""
        started = time.perf_counter()
        with self.tracing.span(SPAN_NAME, traceparent) as span:
            subject_token: str | None = None
            try:
                request = parse_request(await body)
                subject_token = request.subject_token
                signed = await self.signer.sign(request)
            except TrustmeshError as exc:
                self.metrics.x509_svids.labels(exc.error).inc()
                span.set("trustmesh.outcome", exc.error)
                self.recorder.exchange_refused(
                    exc.error,
                    exc.description,
                    subject_token,
                    peer,
                    span.trace_id,
                    span.span_id,
                    surface=SURFACE,
                )
                if isinstance(exc, NoWorkload):  # onboarding: trustmesh get pending
                    self.usage.refused(
                        exc.cluster, exc.namespace, exc.service_account, self.signer.clock()
                    )
                raise
            span.set("trustmesh.spiffe_id", signed.spiffe_id)
            span.set("trustmesh.outcome", "issued")
            try:
                await self.recorder.record(
                    svid_issued_event(
                        self.recorder.source, signed, subject_token, span.trace_id, span.span_id
                    )
                )
            except Exception:
                self.metrics.x509_svids.labels("audit_unavailable").inc()
                raise Unavailable(
                    "the audit log cannot be written; no certificate is issued without its "
                    "audit record"
                ) from None
        identity = signed.subject.identity
        self.usage.credential(  # the Workload named only for an explicit one, as for JWT-SVIDs
            signed.spiffe_id,
            identity.workload if identity.template is None else None,
            X509_SVID,
            self.signer.clock(),
        )
        await self._report_roots(request, signed)
        sa = signed.subject.sa_token
        await observe(
            self.observations,
            signed.subject.identity.template,
            signed.subject.cluster,
            sa.namespace,
            sa.service_account,
            signed.spiffe_id,
            self.signer.clock(),
        )
        self.metrics.x509_svids.labels("issued").inc()
        self.metrics.x509_svid_seconds.observe(time.perf_counter() - started)
        return signed.response, span.traceparent()

    async def _report_roots(self, request: SvidRequest, signed: SignedSvid) -> None:
        """A sidecar that sent ``bundle_sha256`` holds those roots (``server/roots.py``);
        it counts until twice its new certificate's lifetime has passed."""
        pod = signed.subject.sa_token.pod_uid
        if request.bundle_sha256 is None or not pod or len(pod) > MAX_POD_UID:
            return
        keep = 2 * max(1, signed.not_after - int(self.signer.clock()))
        try:
            await asyncio.to_thread(
                self.holders.report,
                SIDECAR,
                signed.subject.cluster,
                pod,
                request.bundle_sha256,
                keep,
                signed.spiffe_id,
            )
        except Exception:  # the certificate is issued; evidence is retried next renewal
            log.exception("recording the roots a sidecar holds failed")


def svid_issued_event(
    source: Mapping[str, Any],
    signed: SignedSvid,
    subject_token: str,
    trace_id: str,
    span_id: str,
) -> dict[str, Any]:
    """``svid.issued``: what a verifier or an investigator needs of the certificate
    (serial, validity, the root, the key's SPKI hash), never a key or the SA token."""
    sa = signed.subject.sa_token
    spki = signed.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return ev.new_event(
        ev.SVID_ISSUED,
        source=source,
        cluster=signed.subject.cluster,
        actor=signed.spiffe_id,
        identity={
            "spiffe_id": signed.spiffe_id,
            "workload": signed.subject.identity.workload,
            "origin_cluster": signed.subject.cluster,
            "sa_issuer": sa.issuer,
            "sa_subject": f"system:serviceaccount:{sa.namespace}:{sa.service_account}",
            "token_sha256": ev.token_sha256(subject_token),
            **(
                {"template": signed.subject.identity.template}
                if signed.subject.identity.template
                else {}
            ),
        },
        request={"surface": SURFACE},
        detail={
            "serial": format(signed.certificate.serial_number, "x"),
            "not_before": signed.not_before,
            "not_after": signed.not_after,
            "ca_root": signed.root_id,
            "public_key_sha256": digest.finalize().hex(),
            "sa_token": {
                k: v
                for k, v in (
                    ("jti", sa.jti),
                    ("kid", sa.kid),
                    ("pod", sa.pod_name),
                    ("pod_uid", sa.pod_uid),
                    ("node", sa.node_name),
                    ("service_account_uid", sa.service_account_uid),
                )
                if v is not None
            },
        },
        trace_id=trace_id,
        span_id=span_id,
    )
