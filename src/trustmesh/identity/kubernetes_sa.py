"""Verification of Kubernetes projected service-account tokens (the RFC 8693
``subject_token``) against the issuing cluster's keys.

A cluster's keys come from its manifest (inline ``jwks``), from its key sources tried
in order (``jwksUris``, or the one ``jwksUri``: JWKS URLs, or OIDC discovery URLs), or
from its issuer's OIDC discovery document (OpenID Connect Discovery 1.0 §4: the
document's ``issuer`` must equal the configured issuer exactly, §4.3, and its
``jwks_uri`` must have the origin of the document, RFC 6454). Fetched key sets are
cached for their ``Cache-Control: max-age`` (bounded), refreshed when a token names an
unknown ``kid`` — at most once per ``min_refresh_interval`` per cluster, and one fetch
at a time, so a stream of garbage tokens cannot make us hammer a cluster — and kept
(stale) when no source answers, for at most ``--cluster-keys-max-age`` after they were
fetched (DESIGN §10). The last good set of each cluster is also kept in a
:class:`KeySetStore` (the control plane's database), so a replica that has just started
verifies with it while every source is down, within the same bound. A token lives at
most ``--max-sa-token-lifetime`` (``exp - iat``). Why a fetch failed is logged; callers
are told only that it failed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from trustmesh.common.addresses import check_fetch_url
from trustmesh.common.clock import Clock, system_clock
from trustmesh.common.errors import ClusterKeysTooOld, ClusterKeysUnavailable, InvalidToken
from trustmesh.identity.jws import (
    VerificationKey,
    check_registered_claims,
    decode_json_segment,
    split_compact,
    verify_compact,
)
from trustmesh.identity.svid import KeyRing
from trustmesh.manifests import DISCOVERY_SUFFIX, ClusterSpec

log = logging.getLogger("trustmesh.identity.kubernetes_sa")

# Kubernetes signs with RS256 (or ES256 with an EC key); accept the asymmetric families only.
SA_TOKEN_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
MAX_SA_TOKEN_BYTES = 16384
DEFAULT_MAX_SA_TOKEN_LIFETIME = 86400.0  # seconds between iat and exp (--max-sa-token-lifetime)
DEFAULT_CLUSTER_KEYS_MAX_AGE = 86400.0  # seconds fetched keys serve an unreachable cluster
DEFAULT_SA_TOKEN_CACHE_SIZE = 100_000  # verified SA tokens kept (--sa-token-cache-size)
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
    max_lifetime: float = DEFAULT_MAX_SA_TOKEN_LIFETIME,
) -> ServiceAccountToken:
    """Verify the signature over the token's exact bytes with the key its header names
    (pinned algorithm), then the claims: ``iss``, ``aud`` containing the cluster's
    audience, ``exp``/``nbf``/``iat`` within ``leeway``, a lifetime (``exp - iat``) of
    at most ``max_lifetime`` seconds, and the ``kubernetes.io`` layout."""
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
    # A token valid for a year is a credential that cannot be taken back: bound how long
    # a stolen one may be exchanged (projected tokens default to about an hour).
    lifetime = float(claims["exp"]) - float(claims["iat"])
    if lifetime > max_lifetime:
        raise InvalidToken(
            "lifetime_too_long",
            f"subject_token is valid for {lifetime:.0f} s (exp - iat), longer than the "
            f"{max_lifetime:.0f} s this control plane accepts (--max-sa-token-lifetime); "
            "request a shorter-lived projected token (expirationSeconds)",
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


@dataclass(frozen=True, slots=True)
class VerifiedSaToken:
    """What verifying one SA token established, and against what: the cluster it was
    verified for (name, issuer and audience as registered then) and the key object that
    verified it."""

    cluster: str
    issuer: str
    audience: str
    key: VerificationKey
    token: ServiceAccountToken


class VerifiedSaTokenCache:
    """Projected SA tokens are presented again and again until they expire (the kubelet
    refreshes them at 80 % of their life), so the signature and claim checks of one are
    kept, keyed by the token's SHA-256 (never the token), bounded (oldest evicted).

    An entry answers only while everything it was verified against still holds: the
    token has not expired (``exp`` + leeway on the caller's clock), the token's issuer
    still names the same cluster with the same issuer and audience, and the cluster's
    key set in force still holds the very key object that verified it (a refetched or
    changed key set, or a removed key, verifies again). Whatever is decided per
    exchange — the Workload match, suspension, revocation — is not cached."""

    def __init__(self, max_entries: int = DEFAULT_SA_TOKEN_CACHE_SIZE) -> None:
        self.max_entries = max_entries
        self._entries: dict[bytes, VerifiedSaToken] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float, leeway: float) -> VerifiedSaToken | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if now > entry.token.expires_at + leeway:
            del self._entries[digest]
            return None
        return entry

    def put(self, digest: bytes, entry: VerifiedSaToken) -> None:
        if self.max_entries <= 0:
            return
        entries = self._entries
        while len(entries) >= self.max_entries:
            del entries[next(iter(entries))]  # dicts keep insertion order: the oldest
        entries[digest] = entry

    def discard(self, digest: bytes) -> None:
        self._entries.pop(digest, None)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class StoredKeySet:
    """A cluster's last good key set as fetched: ``source`` (a digest of the Cluster's
    key-source fields: a set fetched for other fields is not used), the JWKS, when
    (clock seconds) and from which URL."""

    source: str
    jwks: dict[str, Any]
    fetched_at: float
    fetched_from: str


class KeySetStore(Protocol):
    """Where the last good key set of each cluster is kept between processes and shared
    by replicas (the control plane's database, ``server/cluster_keys.py``). Called on
    a worker thread; a failure is logged by the caller and verification goes on from
    memory."""

    def load(self, cluster: str) -> StoredKeySet | None: ...

    def save(self, cluster: str, keys: StoredKeySet) -> None:
        """Keep ``keys`` unless a newer set (of the same source) is kept already."""

    def expired(self, cluster: str, keys: StoredKeySet, max_age: float, now: float) -> None:
        """``keys`` are older than ``max_age`` and no source answers: say so once (the
        audit event), whichever replica finds it first."""


@dataclass(frozen=True)
class StoredKeysInUse:
    """A cluster served from its last good key set because no source answered."""

    fetched_at: float  # clock: when that set was fetched
    since: float  # clock: since when this replica serves it (no source answering)


@dataclass
class _Entry:
    source: str  # what the keys were loaded from; a changed manifest invalidates the entry
    spec: ClusterSpec
    keys: KeyRing
    fetched_at: float  # monotonic: the last fetch attempt (rate limit)
    expires_at: float  # clock: until when the keys are fresh (Cache-Control max-age)
    good_at: float  # clock: the last successful fetch (bounded by max_keys_age)
    stored: StoredKeySet | None = None  # the last good set, as fetched or loaded
    stale_since: float | None = None  # clock: no source answered since (None: one did)
    reported: float | None = None  # good_at of the set reported expired
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ClusterKeyCache:
    """Per-cluster key sets for SA-token verification, shared by all exchanges.

    Keys fetched from a cluster are used while they are fresh (their ``max-age``,
    30 s - 1 h), then fetched again when a token needs them, from the first of its
    sources that answers. When no source answers the last good keys stay in use —
    this replica's, or, when it has none or older ones, those kept in ``store`` —
    but for at most ``max_keys_age`` seconds after they were fetched
    (``--cluster-keys-max-age``, DESIGN §10): older keys may include one the cluster
    has since withdrawn, so the exchange is then refused (``invalid_grant``). Why a
    fetch failed is logged, never told to the caller."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        clock: Clock = system_clock,
        min_refresh_interval: float = 1.0,
        default_max_age: float = 300.0,
        max_max_age: float = 3600.0,
        min_max_age: float = 30.0,
        max_keys_age: float = DEFAULT_CLUSTER_KEYS_MAX_AGE,
        store: KeySetStore | None = None,
    ) -> None:
        self.client = client
        self.clock = clock
        self.min_refresh_interval = min_refresh_interval
        self.default_max_age = default_max_age
        self.max_max_age = max_max_age
        self.min_max_age = min_max_age
        self.max_keys_age = max_keys_age
        self.store = store
        self._entries: dict[str, _Entry] = {}
        self.fetches = 0

    def stored_in_use(self) -> dict[str, StoredKeysInUse]:
        """The clusters whose last fetch found no source answering and which are served
        from their last good key set (for ``/readyz`` and the metrics)."""
        return {
            name: StoredKeysInUse(entry.good_at, entry.stale_since)
            for name, entry in self._entries.items()
            if entry.stale_since is not None and len(entry.keys) > 0
        }

    def key_ages(self, now: float) -> dict[str, float]:
        """Seconds since each cluster's keys in use were fetched (inline keys: none)."""
        return {
            name: now - entry.good_at
            for name, entry in self._entries.items()
            if len(entry.keys) > 0 and entry.good_at != float("inf")
        }

    def _fresh(self, entry: _Entry, now: float) -> bool:
        return now < entry.expires_at and now - entry.good_at <= self.max_keys_age

    async def _still_usable(self, entry: _Entry, cluster_name: str, now: float) -> KeyRing:
        """The keys kept while no source answers, if not too old."""
        if len(entry.keys) == 0:
            raise ClusterKeysUnavailable(f"the keys of cluster {cluster_name} cannot be fetched")
        age = now - entry.good_at
        if age > self.max_keys_age:
            if entry.reported != entry.good_at and entry.stored is not None:
                entry.reported = entry.good_at
                await self._call_store(
                    "report", self._store_expired, cluster_name, entry.stored, now
                )
            raise ClusterKeysTooOld(
                f"the keys of cluster {cluster_name} are too old: its last good key set was "
                f"fetched {age:.0f} s ago, more than the {self.max_keys_age:.0f} s allowed "
                "(--cluster-keys-max-age), and none of its key sources answers now"
            )
        return entry.keys

    def _store_expired(self, cluster_name: str, keys: StoredKeySet, now: float) -> None:
        assert self.store is not None
        self.store.expired(cluster_name, keys, self.max_keys_age, now)

    async def _call_store(self, what: str, call: Any, *args: Any) -> Any:
        """Run a store call on a worker thread; a failure is logged (the database may be
        down: verification goes on from memory)."""
        if self.store is None:
            return None
        try:
            return await asyncio.to_thread(call, *args)
        except Exception as exc:
            log.warning("cluster keys: %s in the database failed: %s", what, exc)
            return None

    async def _adopt_stored(self, entry: _Entry, cluster_name: str) -> None:
        """No source answered: take the stored set if it is newer than ours (a replica
        that has just started has none; another replica may have fetched since)."""
        if self.store is None:
            return
        stored: StoredKeySet | None = await self._call_store(
            "loading the last good key set", self.store.load, cluster_name
        )
        if stored is None or stored.source != entry.source or stored.fetched_at <= entry.good_at:
            return
        try:
            keys = KeyRing(stored.jwks, SA_TOKEN_ALGS)
        except (ValueError, TypeError) as exc:
            log.warning("cluster keys: the stored key set of %s is unusable: %s", cluster_name, exc)
            return
        entry.keys = keys
        entry.good_at = stored.fetched_at
        entry.stored = stored
        log.warning(
            "cluster keys: no key source of cluster %s answers; verifying with its last good "
            "key set from the database (fetched %.0f s ago from %s)",
            cluster_name,
            self.clock() - stored.fetched_at,
            stored.fetched_from,
        )

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
                    source,
                    spec,
                    KeyRing(spec.jwks, SA_TOKEN_ALGS),
                    time.monotonic(),
                    float("inf"),
                    float("inf"),  # keys in the manifest are as old as the manifest
                )
                self._entries[cluster_name] = entry
            return entry.keys
        now = self.clock()
        if entry is not None and self._fresh(entry, now) and (kid is None or entry.keys.get(kid)):
            return entry.keys
        if entry is None:
            never = float("-inf")
            entry = _Entry(source, spec, KeyRing(None, SA_TOKEN_ALGS), never, never, never)
            self._entries[cluster_name] = entry
        async with entry.lock:  # one fetch at a time per cluster
            now = self.clock()
            if self._fresh(entry, now) and (kid is None or entry.keys.get(kid)):
                return entry.keys  # someone else refreshed while we waited
            started = time.monotonic()
            if started - entry.fetched_at < self.min_refresh_interval:
                if len(entry.keys) == 0:
                    raise ClusterKeysUnavailable(
                        f"the keys of cluster {cluster_name} could not be fetched recently; "
                        "retry later"
                    )
                # Rate limit: an unknown kid simply fails verification.
                return await self._still_usable(entry, cluster_name, now)
            entry.fetched_at = started
            fetched = await self._fetch(cluster_name, spec)
            if fetched is None:
                if entry.stale_since is None:
                    entry.stale_since = now
                await self._adopt_stored(entry, cluster_name)
                return await self._still_usable(entry, cluster_name, now)
            jwks, max_age, url = fetched
            self.fetches += 1
            entry.keys = KeyRing(jwks, SA_TOKEN_ALGS)
            entry.expires_at = now + max_age
            entry.good_at = now
            entry.stale_since = None
            entry.stored = StoredKeySet(source, jwks, now, url)
            if self.store is not None:
                await self._call_store(
                    "keeping the last good key set", self.store.save, cluster_name, entry.stored
                )
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

    async def _fetch(
        self, cluster_name: str, spec: ClusterSpec
    ) -> tuple[dict[str, Any], float, str] | None:
        """The key set from the first of the cluster's sources that answers one (the
        JWKS, its max-age, the URL it came from); None when none does (each failure
        logged)."""
        sources = spec.key_sources
        for number, url in enumerate(sources, 1):
            try:
                jwks, max_age = await self._fetch_from(spec, url)
            except (httpx.HTTPError, ValueError) as exc:
                # The detail (URLs, answers of a cluster's servers) is for the operator only.
                log.warning(
                    "fetching keys of cluster %s from source %d of %d failed: %s",
                    cluster_name,
                    number,
                    len(sources),
                    exc,
                )
                continue
            if number > 1:
                log.warning(
                    "fetched keys of cluster %s from source %d of %d (%s)",
                    cluster_name,
                    number,
                    len(sources),
                    url,
                )
            return jwks, max_age, url
        return None

    async def _fetch_from(self, spec: ClusterSpec, url: str) -> tuple[dict[str, Any], float]:
        jwks_uri = url  # listed in the manifest: allowed wherever it points
        if urlsplit(url).path.endswith(DISCOVERY_SUFFIX):
            document, _ = await self._get_json(url)
            if document.get("issuer") != spec.issuer:
                raise ValueError(
                    f"discovery document {url} names issuer {str(document.get('issuer'))[:200]!r}, "
                    f"not {spec.issuer}"
                )
            listed = document.get("jwks_uri")
            if not isinstance(listed, str):
                raise ValueError(f"discovery document {url} has no jwks_uri")
            # A discovery document may only point at its own origin; keys served
            # elsewhere (another port on loopback, any https host) must be listed in the
            # Cluster's jwksUris by whoever registers it.
            if origin(listed) != origin(url):
                where = (
                    "the issuer's origin" if origin(url) == origin(spec.issuer) else "its origin"
                )
                raise ValueError(
                    f"discovery document {url} points jwks_uri at {listed[:200]!r}, outside "
                    f"{where} (list it in the Cluster's jwksUris to allow it)"
                )
            jwks_uri = listed
        jwks, response = await self._get_json(jwks_uri)
        if not isinstance(jwks.get("keys"), list):
            raise ValueError(f"{jwks_uri} is not a JWKS (no keys list)")
        return jwks, self._max_age(response.headers.get("cache-control", ""))

    def _max_age(self, cache_control: str) -> float:
        match = _MAX_AGE.search(cache_control)
        age = float(match.group(1)) if match else self.default_max_age
        return max(self.min_max_age, min(self.max_max_age, age))


def origin(url: str) -> tuple[str, str, int | None]:
    """RFC 6454 origin of a URL: (scheme, host, port), the port made explicit."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url[:200]!r} has an invalid port") from None
    if port is None:
        port = {"https": 443, "http": 80}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def _source_of(spec: ClusterSpec) -> str:
    material = json.dumps(
        [spec.issuer, spec.jwks, spec.jwks_uri, list(spec.jwks_uris)], sort_keys=True
    )
    return hashlib.sha256(material.encode()).hexdigest()
