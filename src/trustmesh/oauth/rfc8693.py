"""RFC 8693 OAuth 2.0 Token Exchange: a Kubernetes projected service-account token in,
a JWT-SVID out (DESIGN §2).

Request (§2.1, form-encoded): ``grant_type`` = token-exchange, ``subject_token``,
``subject_token_type`` = ``urn:ietf:params:oauth:token-type:jwt``, ``audience``
(repeatable, required here), optional ``requested_token_type`` (only the JWT type) and
``lifetime`` (seconds; clamped to the workload's ``maxTokenTTL``). Parameters other
than ``audience`` must not repeat (RFC 6749 §3.2). Errors (§2.2.2, RFC 6749 §5.2):
``invalid_request`` for a malformed request, ``unsupported_grant_type``,
``invalid_grant`` for a subject token that fails verification (also one valid for
longer than ``--max-sa-token-lifetime``, ``exp - iat``, 24 h by default) or whose
subject is suspended (DESIGN §5: its workload, SPIFFE ID or origin cluster),
``unauthorized_client``
when no Workload entry matches the verified service account, ``invalid_target`` for an
audience we cannot issue for (a SPIFFE ID that is neither a registered cluster's nor
of a federated trust domain), and ``temporarily_unavailable`` (503) when the origin
cluster's keys cannot be fetched."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from trustmesh.common.clock import Clock
from trustmesh.common.errors import (
    ClusterKeysUnavailable,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    InvalidToken,
    NoWorkload,
    Unavailable,
    UnsupportedGrantType,
)
from trustmesh.common.numbers import parse_decimal
from trustmesh.common.token_exchange import JWT_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT
from trustmesh.identity.keys import MAX_TOKEN_TTL, KeySet
from trustmesh.identity.kubernetes_sa import (
    DEFAULT_MAX_SA_TOKEN_LIFETIME,
    ClusterKeyCache,
    ServiceAccountToken,
    VerifiedSaToken,
    VerifiedSaTokenCache,
    parse_unverified,
    verify_service_account_token,
)
from trustmesh.identity.svid import KeyRing, mint_svid
from trustmesh.manifests import ClusterSpec
from trustmesh.registry import Identity, Registry
from trustmesh.revocation.suspension import SuspensionSet
from trustmesh.spiffeid import cluster_audience, trust_domain_of

GRANT_TYPE = TOKEN_EXCHANGE_GRANT
DEFAULT_TTL = 300
MAX_AUDIENCES = 16
MAX_AUDIENCE_LENGTH = 512
MAX_FORM_FIELDS = 40
SINGLE_PARAMS = (
    "grant_type",
    "subject_token",
    "subject_token_type",
    "requested_token_type",
    "lifetime",
)
KNOWN_PARAMS = frozenset(
    (*SINGLE_PARAMS, "audience", "resource", "scope", "actor_token", "actor_token_type")
)
SA_TOKEN_LEEWAY = 30.0


@dataclass(frozen=True)
class VerifiedSubject:
    """A verified SA token and the Workload that selects its service account."""

    cluster: str
    sa_token: ServiceAccountToken
    identity: Identity
    token_sha256: bytes  # of the SA token: what audit records of it, never the token


@dataclass(frozen=True)
class Exchanged:
    """The response body plus what audit and metrics need to know (never the token)."""

    response: dict[str, Any]
    audiences: tuple[str, ...]  # the token's aud
    spiffe_id: str
    workload: str
    cluster: str
    sa_token: ServiceAccountToken
    jti: str
    kid: str
    subject_token_sha256: str  # hex, as audit events hold it
    template: str | None = None  # the WorkloadTemplate the identity comes from


def parse_form(body: bytes) -> dict[str, list[str]]:
    """Parse an ``application/x-www-form-urlencoded`` body strictly: exactly what
    ``urllib.parse.parse_qs(text, keep_blank_values=True, strict_parsing=True,
    max_num_fields=MAX_FORM_FIELDS)`` returns or refuses (a field without ``=``, an
    empty field, more than ``MAX_FORM_FIELDS`` fields), without its per-field calls
    for the fields that need no decoding (a token is base64url: nothing to unquote)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(_NOT_A_FORM) from None
    if not text:
        return {}
    if text.count("&") >= MAX_FORM_FIELDS:
        raise InvalidRequest(_NOT_A_FORM)
    form: dict[str, list[str]] = {}
    for field in text.split("&"):
        name, equals, value = field.partition("=")
        if not equals:
            raise InvalidRequest(_NOT_A_FORM)
        if "%" in name or "+" in name:
            name = _unquoted(name)
        if "%" in value or "+" in value:
            value = _unquoted(value)
        values = form.get(name)
        if values is None:
            form[name] = [value]
        else:
            values.append(value)
    return form


_NOT_A_FORM = "request body is not a valid form-encoded parameter list"
_decoded: dict[str, str] = {}


def _unquoted(text: str) -> str:
    """``unquote_plus``, remembered for the short values every request repeats (the
    grant and token type URNs, audiences): bounded in count and length."""
    value = _decoded.get(text)
    if value is None:
        value = unquote_plus(text)
        if len(text) <= 256:
            if len(_decoded) >= 1024:
                _decoded.clear()
            _decoded[text] = value
    return value


def _single(form: Mapping[str, list[str]], name: str, required: bool = True) -> str | None:
    values = form.get(name)
    if not values or values == [""]:
        if required:
            raise InvalidRequest(f"missing required parameter {name}")
        return None
    if len(values) > 1:
        raise InvalidRequest(f"parameter {name} must not be repeated (RFC 6749 §3.2)")
    return values[0]


class TokenExchange:
    """The exchange itself, over an immutable registry snapshot and key set supplied by
    the caller (the control plane swaps them when their revisions move)."""

    def __init__(
        self,
        *,
        issuer: str,
        trust_domain: str,
        cluster_keys: ClusterKeyCache,
        registry: Callable[[], Registry],
        keyset: Callable[[], KeySet],
        revoked_until: Callable[[str, str], float | None],
        suspensions: Callable[[], SuspensionSet],
        clock: Clock,
        default_ttl: int = DEFAULT_TTL,
        max_sa_token_lifetime: float = DEFAULT_MAX_SA_TOKEN_LIFETIME,
        sa_tokens: VerifiedSaTokenCache | None = None,
    ) -> None:
        """``registry``, ``keyset`` and ``suspensions`` return the snapshots in force;
        ``revoked_until`` the latest second up to which a (subject, cluster) is revoked,
        so a token issued right after a revocation does not fall under it.
        ``sa_tokens``: verified SA tokens kept between exchanges (none by default)."""
        self.issuer = issuer
        self.trust_domain = trust_domain
        self.cluster_keys = cluster_keys
        self.registry = registry
        self.keyset = keyset
        self.default_ttl = default_ttl
        self.clock = clock
        self.revoked_until = revoked_until
        self.max_sa_token_lifetime = max_sa_token_lifetime
        self.suspensions = suspensions
        self.sa_tokens = sa_tokens if sa_tokens is not None else VerifiedSaTokenCache(0)
        self._cluster_prefix = cluster_audience(trust_domain, "")

    def _check_request(self, form: Mapping[str, list[str]]) -> tuple[str, list[str], int | None]:
        grant_type = _single(form, "grant_type")
        if grant_type != GRANT_TYPE:
            raise UnsupportedGrantType(f"grant_type must be {GRANT_TYPE}")
        unknown = sorted(set(form) - KNOWN_PARAMS)
        if unknown:
            raise InvalidRequest(f"unknown parameter {unknown[0][:64]!r}")
        if form.get("actor_token") or form.get("actor_token_type"):
            raise InvalidRequest("actor_token (delegation, RFC 8693 §1.1) is not supported")
        if form.get("scope"):
            raise InvalidScope(
                "scope is not supported: authorization is decided by policy at each cluster",
            )
        subject_token = _single(form, "subject_token")
        assert subject_token is not None
        token_type = _single(form, "subject_token_type")
        if token_type != JWT_TOKEN_TYPE:
            raise InvalidRequest(f"subject_token_type must be {JWT_TOKEN_TYPE}")
        requested = _single(form, "requested_token_type", required=False)
        if requested is not None and requested != JWT_TOKEN_TYPE:
            raise InvalidRequest(
                f"requested_token_type must be {JWT_TOKEN_TYPE} (JWT-SVID) when given",
            )
        audiences = [a for a in form.get("audience", []) + form.get("resource", []) if a]
        if not audiences:
            raise InvalidRequest(
                "missing required parameter audience (the target, e.g. spiffe://TD/cluster/NAME)",
            )
        lifetime_text = _single(form, "lifetime", required=False)
        lifetime = None
        if lifetime_text is not None:
            lifetime = parse_decimal(lifetime_text, 9)
            if lifetime is None or not 0 < lifetime <= 86400:
                raise InvalidRequest("lifetime must be a positive number of seconds")
        return subject_token, audiences, lifetime

    def _check_audiences(self, audiences: list[str], registry: Registry) -> list[str]:
        if len(audiences) > MAX_AUDIENCES:
            raise InvalidTarget(f"at most {MAX_AUDIENCES} audiences per token")
        unique: list[str] = []
        for audience in audiences:
            if len(audience) > MAX_AUDIENCE_LENGTH:
                raise InvalidTarget(f"an audience is longer than {MAX_AUDIENCE_LENGTH} characters")
            if audience.startswith(self._cluster_prefix):
                cluster = audience[len(self._cluster_prefix) :]
                if cluster not in registry.clusters:
                    raise InvalidTarget(f"audience {audience} names no registered cluster")
            elif audience.startswith("spiffe://") and (
                trust_domain_of(audience) not in registry.federation_by_domain
            ):  # a federated trust domain's audience: a partner's service (DESIGN §9)
                raise InvalidTarget(
                    f"audience {audience[:100]} is a SPIFFE ID but not a cluster of trust domain "
                    f"{self.trust_domain} nor of a federated one",
                )
            if audience not in unique:
                unique.append(audience)
        return unique

    async def _verified_subject(
        self, subject_token: str, digest: bytes, registry: Registry, now: float
    ) -> tuple[str, ServiceAccountToken]:
        """The origin cluster and the verified facts of ``subject_token``: from the cache
        while everything it was verified against still holds (see
        ``VerifiedSaTokenCache``), else verified in full and kept."""
        cached = self.sa_tokens.get(digest, now, SA_TOKEN_LEEWAY)
        if cached is not None:
            name = registry.cluster_by_issuer.get(cached.issuer)
            spec = registry.clusters.get(name) if name is not None else None
            if (
                name == cached.cluster
                and spec is not None
                and spec.issuer == cached.issuer
                and spec.audience == cached.audience
            ):
                keys = await self._keys(name, spec, cached.token.kid)
                if keys.get(cached.token.kid) is cached.key:
                    self.sa_tokens.hits += 1
                    return name, cached.token
            self.sa_tokens.discard(digest)
        try:
            unverified = parse_unverified(subject_token)
            issuer = unverified.issuer
        except InvalidToken as exc:
            raise InvalidRequest(f"subject_token: {exc.description}") from None
        cluster_name = registry.cluster_by_issuer.get(issuer)
        if cluster_name is None:
            raise InvalidGrant(
                f"subject_token issuer {issuer[:200]!r} is not a registered cluster",
            )
        cluster = registry.clusters[cluster_name]
        keys = await self._keys(cluster_name, cluster, unverified.kid)
        try:
            sa = verify_service_account_token(
                unverified, keys, cluster, SA_TOKEN_LEEWAY, now, self.max_sa_token_lifetime
            )
        except InvalidToken as exc:
            raise InvalidGrant(
                f"subject_token from cluster {cluster_name}: {exc.description}"
            ) from None
        key = keys.get(sa.kid)
        if key is not None:
            self.sa_tokens.put(
                digest, VerifiedSaToken(cluster_name, cluster.issuer, cluster.audience, key, sa)
            )
        return cluster_name, sa

    async def _keys(self, name: str, cluster: ClusterSpec, kid: str | None) -> KeyRing:
        try:
            return await self.cluster_keys.keys_for(name, cluster, kid)
        except ClusterKeysUnavailable as exc:
            raise Unavailable(str(exc)) from None

    async def verify_subject(
        self, subject_token: str, registry: Registry, now: float
    ) -> VerifiedSubject:
        """Steps 1-5 of the exchange, shared by every issuer of credentials for a
        projected SA token (the X.509-SVID endpoint too): the token's issuer names a
        registered cluster, the token verifies with that cluster's keys (or is a verified
        token the cache still vouches for), and a Workload selects its service account.
        Raises the error the caller answers with."""
        digest = hashlib.sha256(subject_token.encode("utf-8", "surrogatepass")).digest()
        cluster_name, sa = await self._verified_subject(subject_token, digest, registry, now)
        identity = registry.resolve(cluster_name, sa.namespace, sa.service_account)
        if identity is None:
            raise NoWorkload(cluster_name, sa.namespace, sa.service_account)
        return VerifiedSubject(cluster_name, sa, identity, digest)

    async def exchange(self, form: Mapping[str, list[str]]) -> Exchanged:
        now = self.clock()
        subject_token, audiences, lifetime = self._check_request(form)
        registry = self.registry()
        audiences = self._check_audiences(audiences, registry)
        subject = await self.verify_subject(subject_token, registry, now)
        cluster_name, sa = subject.cluster, subject.sa_token
        identity = subject.identity
        workload_name = identity.workload
        max_ttl = min(identity.max_token_ttl or MAX_TOKEN_TTL, MAX_TOKEN_TTL)
        ttl = min(lifetime or min(self.default_ttl, max_ttl), max_ttl)
        issued_at = int(now)
        spiffe_id = identity.spiffe_id
        # DESIGN §5: a suspended subject gets no new credential of any kind.
        self.suspensions().check(workload=workload_name, spiffe_id=spiffe_id, cluster=cluster_name)
        revoked_until = self.revoked_until(spiffe_id, cluster_name)
        if revoked_until is not None and issued_at <= revoked_until:
            # A revocation covers tokens issued up to its whole second; a token issued
            # after it must not fall under it (DESIGN §5), so it starts a second later.
            issued_at = int(revoked_until) + 1
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": spiffe_id,
            "aud": audiences,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + ttl,
            "jti": secrets.token_urlsafe(16),
            **identity.claims,  # cluster, namespace and service_account included
        }
        key = self.keyset().active
        token = mint_svid(key, claims)
        return Exchanged(
            response={
                "access_token": token,
                "issued_token_type": JWT_TOKEN_TYPE,
                "token_type": "N_A",
                "expires_in": ttl,
            },
            audiences=tuple(audiences),
            spiffe_id=spiffe_id,
            workload=workload_name,
            cluster=cluster_name,
            sa_token=sa,
            jti=claims["jti"],
            kid=key.kid,
            subject_token_sha256=subject.token_sha256.hex(),
            template=identity.template,
        )
