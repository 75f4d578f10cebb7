"""Federation with other trust domains at the control plane (DESIGN §9; SPIFFE
Federation §4, §5.2.1, §6.2).

* **Polling.** The loop looks every :data:`POLL_TICK` second at the registry's
  FederatedTrustDomains, so a new one is fetched within about a second of its apply.
  Each is then polled every refresh interval: the manifest's ``refreshHint``, else the
  bundle's ``spiffe_refresh_hint``, else :data:`DEFAULT_REFRESH` — never more often
  than every :data:`MIN_REFRESH` seconds, and at least every hour and four times per
  ``maxStale``, so a working endpoint never lets its bundle grow stale. A failed
  attempt is retried after 5, 10, 20… seconds, at most the refresh interval (§6.2: no
  aggressive retries). Replicas poll once between them (``registry/federation.py``).
* **Fetching** (``https_web``, §5.2.1.4): https verified against the system's roots,
  or against the manifest's ``caBundle`` alone; plain http only to a loopback address
  (the manifest refuses anything else); no proxy taken from the environment; a redirect
  is followed (at most :data:`MAX_REDIRECTS`) only to a URL that passes the same rule,
  and never remembered (§7.5.1); at most :data:`MAX_BUNDLE_BYTES` of answer and
  :data:`FETCH_TIMEOUT` seconds for the whole exchange. The answer is read by
  ``identity/spiffe_bundle.py``; what does not parse is refused and the last good
  bundle kept. Why an attempt failed is logged and shown by ``get trustdomains``.
* **Staleness.** A bundle serves until its last good fetch plus ``maxStale`` (default
  7 days); then it is dropped (``federation.bundle_dropped``) and agents and sidecars
  stop trusting that domain. A bundle whose content changed is a
  ``federation.bundle_updated`` event. Both are written in the transaction of the
  change.
* **Serving.** :meth:`Federation.published` is what ``GET /v1/federation/bundles``
  answers — public, like the bundles themselves: each trust domain's bundle and its
  ``use_until``; :meth:`Federation.status` is ``trustmesh get trustdomains``."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any
from urllib.parse import urljoin

import httpx
import orjson
from sqlalchemy import Connection

from trustmesh.audit import events as ev
from trustmesh.common.addresses import check_fetch_url
from trustmesh.common.answers import read_bounded
from trustmesh.common.clock import Clock
from trustmesh.common.errors import BundleError
from trustmesh.identity.spiffe_bundle import MAX_BUNDLE_BYTES, SpiffeBundle, parse_bundle
from trustmesh.manifests import FederatedTrustDomainSpec
from trustmesh.registry import RegistryStore
from trustmesh.registry.federation import BundleRecord, FederationStore
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.snapshots import Snapshots

log = logging.getLogger("trustmesh.server")

FEDERATION_KIND = "FederatedTrustDomain"
POLL_TICK = 1.0
CLAIM_LEASE = 30.0  # a replica that dies mid-poll holds it this long
RECHECK = 5.0  # a poll another replica holds is looked at again after this
FETCH_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
MAX_REDIRECTS = 3
MIN_REFRESH = 5.0
DEFAULT_REFRESH = 300.0
MAX_REFRESH = 3600.0
ACTOR = "system"


def refresh_interval(spec: FederatedTrustDomainSpec, bundle_hint: float | None) -> float:
    """Seconds between two polls of ``spec``'s endpoint (module docstring)."""
    if spec.refresh_hint is not None:
        hint = float(spec.refresh_hint)
    elif bundle_hint is not None:
        hint = bundle_hint
    else:
        hint = DEFAULT_REFRESH
    return max(MIN_REFRESH, min(hint, MAX_REFRESH, spec.max_stale / 4))


def retry_delay(spec: FederatedTrustDomainSpec, record: BundleRecord) -> float:
    """After a failed attempt: 5, 10, 20… seconds, at most the refresh interval."""
    backoff = MIN_REFRESH * 2.0 ** min(record.failures, 16)
    return min(backoff, refresh_interval(spec, record.refresh_hint))


async def fetch_bundle(spec: FederatedTrustDomainSpec) -> bytes:
    """The body ``spec``'s bundle endpoint answers (module docstring); BundleError
    saying why there is none."""
    verify: ssl.SSLContext | bool = True
    if spec.ca_bundle is not None:
        verify = ssl.create_default_context(cadata=spec.ca_bundle)
    timeout = httpx.Timeout(FETCH_TIMEOUT, connect=CONNECT_TIMEOUT)
    url = spec.bundle_endpoint_url
    async with httpx.AsyncClient(verify=verify, timeout=timeout, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            request = client.build_request("GET", url, headers={"Accept": "application/json"})
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:
                    target = urljoin(url, response.headers.get("location", ""))
                    try:
                        url = check_fetch_url(target.partition("#")[0], "redirect")
                    except ValueError as exc:
                        raise BundleError(f"the bundle endpoint redirected: {exc}") from None
                    continue
                if response.status_code != 200:
                    raise BundleError(f"the bundle endpoint answered HTTP {response.status_code}")
                body = await read_bounded(response, MAX_BUNDLE_BYTES)
                if body is None:
                    raise BundleError(
                        f"the bundle endpoint answered more than {MAX_BUNDLE_BYTES} bytes"
                    )
                return body
            finally:
                await response.aclose()
    raise BundleError(f"the bundle endpoint redirected more than {MAX_REDIRECTS} times")


async def fetch_and_parse(spec: FederatedTrustDomainSpec) -> SpiffeBundle:
    """One attempt, bounded in time; BundleError saying why it failed."""
    try:
        body = await asyncio.wait_for(fetch_bundle(spec), FETCH_TIMEOUT)
    except TimeoutError:
        raise BundleError(f"the bundle endpoint took more than {FETCH_TIMEOUT:.0f} s") from None
    except httpx.HTTPError as exc:
        reason = str(exc)[:200] or exc.__class__.__name__
        raise BundleError(f"the bundle endpoint could not be reached: {reason}") from None
    except ssl.SSLError as exc:
        raise BundleError(f"TLS with the bundle endpoint failed: {exc.reason}") from None
    return parse_bundle(body, spec.trust_domain)


def _counts(record: BundleRecord | None) -> dict[str, Any]:
    if record is None or record.bundle is None:
        return {"jwt_keys": 0, "x509_roots": 0}
    keys = orjson.loads(record.bundle)["keys"]
    return {
        "jwt_keys": sum(1 for k in keys if k.get("use") == "jwt-svid"),
        "x509_roots": sum(1 for k in keys if k.get("use") == "x509-svid"),
    }


class Federation:
    """The partners' bundles: polled, stored, dropped, published (module docstring)."""

    def __init__(
        self,
        store: FederationStore,
        registry_store: RegistryStore,
        snapshots: Snapshots,
        recorder: AuditRecorder,
        clock: Clock,
    ) -> None:
        self.store = store
        self.registry_store = registry_store
        self.snapshots = snapshots
        self.recorder = recorder
        self.clock = clock
        # trust domain -> (the endpoint, when this replica looks at its poll next)
        self._look_at: dict[str, tuple[str, float]] = {}
        self._documents: dict[str, tuple[str, Any]] = {}  # trust domain -> (JSON, parsed)

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the next tick tries again; serving goes on meanwhile
                log.exception("federation: polling the bundle endpoints failed")
            await asyncio.sleep(POLL_TICK)

    async def tick(self) -> None:
        """Drop what is past ``maxStale``; poll what is due."""
        now = self.clock()
        records = self.snapshots.federation.records
        due = []
        changed = False
        for spec in self.snapshots.registry.federations.values():
            record = records.get(spec.trust_domain)
            use_until = record.use_until(spec.max_stale) if record is not None else None
            if record is not None and use_until is not None and use_until < now:
                changed |= await asyncio.to_thread(self._drop, spec, record, now)
            endpoint, when = self._look_at.get(spec.trust_domain, ("", 0.0))
            if endpoint != spec.bundle_endpoint_url or when <= now:
                due.append(self.poll(spec, now))
        results = await asyncio.gather(*due)
        if changed or any(results):
            await asyncio.to_thread(self.snapshots.refresh)

    async def poll(self, spec: FederatedTrustDomainSpec, now: float) -> bool:
        """Poll ``spec``'s endpoint if it is due and no other replica does; whether the
        stored state changed in a way replicas serve (a good fetch)."""
        domain = spec.trust_domain
        claimed = await asyncio.to_thread(
            self.store.claim, domain, spec.bundle_endpoint_url, now, CLAIM_LEASE
        )
        if claimed is None:
            self._look_at[domain] = (spec.bundle_endpoint_url, now + RECHECK)
            return False
        try:
            bundle = await fetch_and_parse(spec)
        except BundleError as exc:
            delay = retry_delay(spec, claimed)
            self._look_at[domain] = (spec.bundle_endpoint_url, now + delay)
            await asyncio.to_thread(self.store.failed, domain, exc.description, now + delay)
            kept = "keeping the last good bundle" if claimed.bundle else "no bundle held"
            log.warning(
                "federation: bundle of %s from %s refused: %s (%s; next attempt in %.0f s)",
                domain,
                spec.bundle_endpoint_url,
                exc.description,
                kept,
                delay,
            )
            return False
        fetched = self.clock()
        next_at = fetched + refresh_interval(spec, bundle.refresh_hint)
        self._look_at[domain] = (spec.bundle_endpoint_url, next_at)

        def updated(conn: Connection, before: BundleRecord | None, after: BundleRecord) -> None:
            self.recorder.stage(
                conn,
                ev.FEDERATION_BUNDLE_UPDATED,
                ACTOR,
                {
                    "trust_domain": domain,
                    "endpoint": spec.bundle_endpoint_url,
                    "sequence": after.sequence,
                    "previous_sequence": before.sequence if before is not None else None,
                    **_counts(after),
                },
            )

        if await asyncio.to_thread(self.store.succeeded, bundle, fetched, next_at, updated):
            await asyncio.to_thread(self.recorder.drain)
            log.info(
                "federation: bundle of %s updated (sequence %s, %d jwt-svid keys, %d roots)",
                domain,
                bundle.sequence,
                len(bundle.jwt_keys),
                len(bundle.roots),
            )
        return True

    def _drop(self, spec: FederatedTrustDomainSpec, record: BundleRecord, now: float) -> bool:
        why: list[str] = []

        def dropped(conn: Connection, before: BundleRecord | None, after: BundleRecord) -> None:
            why.append((before.error if before is not None else None) or "no error recorded")
            self.recorder.stage(
                conn,
                ev.FEDERATION_BUNDLE_DROPPED,
                ACTOR,
                {
                    "trust_domain": spec.trust_domain,
                    "endpoint": spec.bundle_endpoint_url,
                    "sequence": record.sequence,
                    "fetched_at": ev.now_time(record.fetched_at),
                    "max_stale": spec.max_stale,
                    "error": why[0],
                },
            )

        if not self.store.drop(record, now, dropped):
            return False
        self.recorder.drain()
        log.error(
            "federation: bundle of %s dropped: no good fetch for longer than maxStale (%d s); "
            "its identities are refused from now on (last error: %s)",
            spec.trust_domain,
            spec.max_stale,
            why[0] if why else "none",
        )
        return True

    # -- reads ---------------------------------------------------------------------------
    def published(self, now: float) -> dict[str, Any]:
        """``GET /v1/federation/bundles``: trust domain -> ``{"bundle", "sequence",
        "fetched_at", "use_until"}`` for every federated trust domain whose last good
        bundle is within its ``maxStale``."""
        records = self.snapshots.federation.records
        domains: dict[str, Any] = {}
        for spec in self.snapshots.registry.federations.values():
            record = records.get(spec.trust_domain)
            use_until = record.use_until(spec.max_stale) if record is not None else None
            if record is None or record.bundle is None or use_until is None or use_until < now:
                continue
            domains[spec.trust_domain] = {
                "bundle": self._document(spec.trust_domain, record.bundle),
                "sequence": record.sequence,
                "fetched_at": record.fetched_at,
                "use_until": use_until,
            }
        return {"trust_domains": domains}

    def _document(self, trust_domain: str, text: str) -> Any:
        """The stored bundle parsed once per version, not once per request."""
        cached = self._documents.get(trust_domain)
        if cached is None or cached[0] != text:
            cached = (text, orjson.loads(text))
            self._documents[trust_domain] = cached
        return cached[1]

    def status(self) -> list[dict[str, Any]]:
        """``trustmesh get trustdomains``: each FederatedTrustDomain as applied, with
        ``status.bundle``: last fetch, sequence, key counts, next refresh, the last
        error, and ``state`` — ``pending`` (no bundle yet), ``fresh``, ``stale`` (the
        last attempt failed: the last good bundle serves until ``useUntil``) or
        ``dropped``."""
        items = self.registry_store.list_bodies(FEDERATION_KIND)
        records = self.store.load().records
        for item in items:
            spec = item["spec"]
            record = records.get(spec["trustDomain"])
            if record is None:
                item["status"]["bundle"] = {"state": "pending"}
                continue
            if record.bundle is not None:
                state = "stale" if record.error else "fresh"
            else:
                state = "dropped" if record.dropped_at is not None else "pending"
            item["status"]["bundle"] = {
                "state": state,
                "sequence": record.sequence,
                "lastFetch": record.fetched_at,
                "lastChange": record.changed_at,
                "lastAttempt": record.attempted_at,
                "nextRefresh": record.next_refresh_at,
                "useUntil": record.use_until(spec["maxStale"]),
                "droppedAt": record.dropped_at,
                "error": record.error,
                "failures": record.failures,
                **_counts(record),
            }
        return items
