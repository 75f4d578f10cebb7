"""Verification of Kubernetes projected service-account tokens (the RFC 8693
``subject_token``) against the issuing cluster's keys.

A cluster's keys come from its manifest (inline ``jwks``), from ``jwksUri``, or from
its OIDC discovery document (OpenID Connect Discovery 1.0 §4: the document's
``issuer`` must equal the configured issuer exactly, §4.3). Fetched key sets are
cached for their ``Cache-Control: max-age`` (bounded), refreshed when a token names an
unknown ``kid`` — at most once per ``min_refresh_interval`` per cluster, and one fetch
at a time, so a stream of garbage tokens cannot make us hammer a cluster — and kept
(stale) when the cluster cannot be reached."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from trustmesh.common.addresses import check_fetch_url
from trustmesh.common.errors import ClusterKeysUnavailable, InvalidToken
from trustmesh.identity.jws import (
    check_registered_claims,
    decode_json_segment,
    split_compact,
    verify_compact,
)
from trustmesh.identity.svid import KeyRing
from trustmesh.manifests import ClusterSpec

log = logging.getLogger("trustmesh.identity.kubernetes_sa")

# Kubernetes signs with RS256 (or ES256 with an EC key); accept the asymmetric families only.
SA_TOKEN_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
MAX_SA_TOKEN_BYTES = 16384
MAX_JWKS_BYTES = 256 * 1024
_MAX_AGE = re.compile(r"max-age=([0-9]{1,9})(?![0-9])")


@dataclass(frozen=True)
class ServiceAccountToken:
    """The verified facts of a projected SA token (``kubernetes.io`` claim layout)."""

    issuer: str
    namespace: str
    service_account: str
    service_account_uid: str | None
    pod_name: str | None
    pod_uid: str | None
    node_name: str | None
    jti: str | None
    kid: str
    expires_at: float


@dataclass(frozen=True)
class UnverifiedToken:
    """A size- and shape-checked token, its header and claims parsed but not trusted:
    ``iss`` and ``kid`` only choose which cluster's keys to verify it with."""

    parts: list[str]
    kid: str | None
    claims: dict[str, Any]

    @property
    def issuer(self) -> str:
        issuer = self.claims.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise InvalidToken("missing_claim", "subject_token has no iss claim")
        return issuer


def parse_unverified(token: str) -> UnverifiedToken:
    parts = split_compact(token, MAX_SA_TOKEN_BYTES)
    kid = decode_json_segment(parts[0], "header").get("kid")
    claims = decode_json_segment(parts[1], "payload")
    return UnverifiedToken(parts, kid if isinstance(kid, str) else None, claims)


def verify_service_account_token(
    token: UnverifiedToken,
    keys: KeyRing,
    cluster: ClusterSpec,
    leeway: float,
    now: float | None = None,
) -> ServiceAccountToken:
    """Verify the signature over the token's exact bytes with the key its header names
    (pinned algorithm), then the claims: ``iss``, ``aud`` containing the cluster's
    audience, ``exp``/``nbf``/``iat`` within ``leeway``, and the ``kubernetes.io`` layout."""
    key = keys.key_for_header(token.parts[0])
    claims = verify_compact(token.parts, key)
    check_registered_claims(
        claims,
        now=time.time() if now is None else now,
        leeway=leeway,
        issuer=cluster.issuer,
        audience=cluster.audience,
        required=("iss", "sub", "aud", "exp", "iat"),
    )
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        raise InvalidToken(
            "missing_claim",
            "subject_token has no kubernetes.io claim (not a projected service-account token)",
        )
    namespace = k8s.get("namespace")
    account = k8s.get("serviceaccount")
    if (
        not isinstance(namespace, str)
        or not isinstance(account, dict)
        or not isinstance(account.get("name"), str)
    ):
        raise InvalidToken(
            "missing_claim",
            "subject_token kubernetes.io claim lacks namespace or serviceaccount.name",
        )
    name = account["name"]
    if claims["sub"] != f"system:serviceaccount:{namespace}:{name}":
        raise InvalidToken(
            "bad_subject",
            "subject_token sub does not match its kubernetes.io namespace and service account",
        )
    pod = _mapping(k8s.get("pod"))
    node = _mapping(k8s.get("node"))
    return ServiceAccountToken(
        issuer=claims["iss"],
        namespace=namespace,
        service_account=name,
        service_account_uid=_str_or_none(account.get("uid")),
        pod_name=_str_or_none(pod.get("name")),
        pod_uid=_str_or_none(pod.get("uid")),
        node_name=_str_or_none(node.get("name")),
        jti=_str_or_none(claims.get("jti")),
        kid=key.kid,
        expires_at=float(claims["exp"]),
    )


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass
class _Entry:
    source: str  # what the keys were loaded from; a changed manifest invalidates the entry
    spec: ClusterSpec
    keys: KeyRing
    fetched_at: float
    expires_at: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ClusterKeyCache:
    """Per-cluster key sets for SA-token verification, shared by all exchanges."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        min_refresh_interval: float = 1.0,
        default_max_age: float = 300.0,
        max_max_age: float = 3600.0,
        min_max_age: float = 30.0,
    ) -> None:
        self.client = client
        self.min_refresh_interval = min_refresh_interval
        self.default_max_age = default_max_age
        self.max_max_age = max_max_age
        self.min_max_age = min_max_age
        self._entries: dict[str, _Entry] = {}
        self.fetches = 0

    async def keys_for(self, cluster_name: str, spec: ClusterSpec, kid: str | None) -> KeyRing:
        entry = self._entries.get(cluster_name)
        if entry is not None and entry.spec is not spec:
            # A new registry snapshot: keep the entry unless the key source changed.
            if entry.source != _source_of(spec):
                entry = None
            else:
                entry.spec = spec
        source = entry.source if entry is not None else _source_of(spec)
        if spec.jwks is not None:
            if entry is None:
                entry = _Entry(
                    source, spec, KeyRing(spec.jwks, SA_TOKEN_ALGS), time.time(), float("inf")
                )
                self._entries[cluster_name] = entry
            return entry.keys
        now = time.monotonic()
        if entry is not None and now < entry.expires_at and (kid is None or entry.keys.get(kid)):
            return entry.keys
        if entry is None:
            entry = _Entry(source, spec, KeyRing(None, SA_TOKEN_ALGS), float("-inf"), float("-inf"))
            self._entries[cluster_name] = entry
        async with entry.lock:  # one fetch at a time per cluster
            now = time.monotonic()
            fresh = now < entry.expires_at
            if fresh and (kid is None or entry.keys.get(kid)):
                return entry.keys  # someone else refreshed while we waited
            if now - entry.fetched_at < self.min_refresh_interval:
                if len(entry.keys) == 0:
                    raise ClusterKeysUnavailable(
                        f"keys of cluster {cluster_name} could not be fetched recently; retry later"
                    )
                return entry.keys  # rate limit: the unknown kid simply fails verification
            entry.fetched_at = now
            try:
                jwks, max_age = await self._fetch(spec)
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("fetching keys of cluster %s failed: %s", cluster_name, exc)
                if len(entry.keys) == 0:
                    raise ClusterKeysUnavailable(
                        f"keys of cluster {cluster_name} could not be fetched: {exc}"
                    ) from None
                return entry.keys  # keep serving stale keys while the cluster is unreachable
            self.fetches += 1
            entry.keys = KeyRing(jwks, SA_TOKEN_ALGS)
            entry.expires_at = now + max_age
            return entry.keys

    async def _get_json(self, url: str) -> tuple[dict[str, Any], httpx.Response]:
        check_fetch_url(url, "URL")
        async with self.client.stream("GET", url, follow_redirects=False) as response:
            if response.status_code != 200:
                raise ValueError(f"GET {url} answered HTTP {response.status_code}")
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"GET {url} answered more than {MAX_JWKS_BYTES} bytes")
        try:
            document = json.loads(body)
        except ValueError:
            raise ValueError(f"GET {url} did not answer JSON") from None
        if not isinstance(document, dict):
            raise ValueError(f"GET {url} did not answer a JSON object")
        return document, response

    async def _fetch(self, spec: ClusterSpec) -> tuple[dict[str, Any], float]:
        jwks_uri = spec.jwks_uri
        if jwks_uri is None:
            discovery_url = spec.issuer.rstrip("/") + "/.well-known/openid-configuration"
            document, _ = await self._get_json(discovery_url)
            if document.get("issuer") != spec.issuer:
                raise ValueError(
                    f"discovery document of {spec.issuer} names issuer {str(document.get('issuer'))[:200]!r}"
                )
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise ValueError(f"discovery document of {spec.issuer} has no jwks_uri")
        jwks, response = await self._get_json(jwks_uri)
        if not isinstance(jwks.get("keys"), list):
            raise ValueError(f"{jwks_uri} is not a JWKS (no keys list)")
        return jwks, self._max_age(response.headers.get("cache-control", ""))

    def _max_age(self, cache_control: str) -> float:
        match = _MAX_AGE.search(cache_control)
        age = float(match.group(1)) if match else self.default_max_age
        return max(self.min_max_age, min(self.max_max_age, age))


def _source_of(spec: ClusterSpec) -> str:
    material = json.dumps([spec.issuer, spec.jwks, spec.jwks_uri], sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()
